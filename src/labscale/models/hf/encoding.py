"""Tokenization, shared by `count_tokens`, `generate`, `loglikelihood` and fine-tuning (adapt/data.py).

Text is encoded without the tokenizer's automatic special tokens (chat templates already contain them), except
that a BOS token is prepended when the tokenizer normally adds one and the text does not already start with it.

Context/continuation pairs follow lm-evaluation-harness: whitespace at the end of the context moves to the
continuation, continuation tokens are `encode(context + continuation)[len(encode(context)):]`, and an empty
context is replaced by the BOS (or else the first EOS) token.

EOS ids are the tokenizer's and the generation config's; the pad id is the tokenizer's, else the first EOS.
"""

from __future__ import annotations


class Encoder:
    """The encoding rules above, over one tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        # Does the tokenizer add a BOS by itself? Then `encode` (which never adds special tokens) prepends it.
        self.bos_prefix: list[int] = []
        bos = tokenizer.bos_token_id
        if bos is not None:
            with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
            if with_special and with_special[0] == bos:
                self.bos_prefix = [bos]

    def encode(self, text: str, bos: bool = True) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if bos and self.bos_prefix and (not ids or ids[0] != self.bos_prefix[0]):
            ids = self.bos_prefix + ids
        return ids

    def encode_pair(self, context: str, continuation: str, eos_ids: list[int]) -> tuple[list[int], list[int]]:
        """(context tokens, continuation tokens), lm-evaluation-harness style (see the module docstring)."""
        if context == "":
            tok = self.tokenizer
            prefix = tok.bos_token_id if tok.bos_token_id is not None else (eos_ids or [0])[0]
            return [prefix], self.encode(continuation, bos=False)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx) :]

    def eos_ids(self, generation_config=None) -> list[int]:
        """The generation config's EOS ids (when given) followed by the tokenizer's, without repeats."""
        ids: list[int] = []
        for e in (getattr(generation_config, "eos_token_id", None), self.tokenizer.eos_token_id):
            for x in e if isinstance(e, (list, tuple)) else [e]:
                if x is not None and x not in ids:
                    ids.append(int(x))
        return ids

    def pad_id(self, eos_ids: list[int]) -> int:
        if self.tokenizer.pad_token_id is not None:
            return self.tokenizer.pad_token_id
        return eos_ids[0] if eos_ids else 0
