"""Log-probabilities for `labscale serve`: the prompt's (completions `echo` + `logprobs`) and the completion's
(completions `logprobs`, chat `logprobs` / `top_logprobs`), in OpenAI's two response shapes.

Completions (legacy, also vLLM's): `{"tokens": [...], "token_logprobs": [...], "top_logprobs": [{token: lp}, ...],
"text_offset": [...]}`, prompt tokens first when echoed (the first token's log-probability and alternatives are
null: it has no context). Chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token",
"logprob", "bytes"}]}], "refusal": null}` for the completion's tokens.

A text prompt is scored as the server generates from it (`backend.encode`: BOS where the tokenizer adds one); a
token-id prompt exactly as sent. The completion's tokens are its text encoded after the prompt (the generated
ids are not kept by the batcher; for ordinary text the two agree). Methods run on the app's scoring thread.
"""

from __future__ import annotations

from labscale.models.hf.scoring import Scored, token_logprobs
from labscale.serve.protocol import APIError, CompletionRequest


class PromptScorer:
    def __init__(self, backend, context_length: int, adapters_loaded: bool):
        self.backend = backend
        self.context_length = context_length
        self.adapters_loaded = adapters_loaded

    # -------------------------------------------------------------------------------------------- checks

    def check(self, adapter: str | None) -> None:
        """A 400 where log-probabilities cannot be served (see serve/app.py)."""
        if not hasattr(self.backend, "encode") or not hasattr(self.backend, "model"):
            raise APIError(400, "this server's model gives no log-probabilities", param="logprobs")
        if self.adapters_loaded:
            raise APIError(400, "log-probabilities are not served while LoRA adapters are loaded with --adapter "
                                "(they switch per batch); serve the adapter alone: labscale serve --model "
                                "adapter:<folder>", param="logprobs")

    @property
    def tokenizer(self):
        return self.backend.tokenizer

    def prompt_text(self, prompt: str | list[int], field: str) -> str:
        """A prompt's text; token ids are checked against the vocabulary and decoded."""
        if isinstance(prompt, str):
            return prompt
        vocab = len(self.tokenizer)
        bad = next((t for t in prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"invalid '{field}': token id {bad} is outside the vocabulary (0 … {vocab - 1})",
                           param=field)
        return self.tokenizer.decode(prompt, skip_special_tokens=False)

    def _ids(self, prompt: str | list[int]) -> list[int]:
        return self.backend.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def _fits(self, n: int, field: str) -> None:
        if n > self.context_length:
            raise APIError(400, f"this model's maximum context length is {self.context_length} tokens; the request "
                                f"asks to score {n}", param=field, code="context_length_exceeded")
        if n == 0:
            raise APIError(400, f"the {field} is empty: it has no tokens to score", param=field)

    # ---------------------------------------------------------------------------------------- formatting

    def _piece(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def _offsets(self, text: str, ids: list[int], from_text: bool) -> list[int]:
        """Character offsets of `ids` in `text`: the fast tokenizer's offsets for a text prompt, else the
        running length of the decoded tokens."""
        tok = self.tokenizer
        if from_text and getattr(tok, "is_fast", False):
            enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
            body = list(enc["input_ids"])
            extra = len(ids) - len(body)
            if extra >= 0 and ids[extra:] == body:
                return [0] * extra + [a for a, _ in enc["offset_mapping"]]
        offsets, at = [], 0
        for t in ids:
            offsets.append(at)
            at += len(self._piece(t))
        return offsets

    def _legacy(self, ids: list[int], logprobs: list[float | None], tops: list[list[tuple[int, float]]],
                offsets: list[int]) -> dict:
        return {"tokens": [self._piece(t) for t in ids], "token_logprobs": logprobs,
                "top_logprobs": [None if lp is None else {self._piece(t): v for t, v in top}
                                 for lp, top in zip(logprobs, tops)],
                "text_offset": offsets}

    @staticmethod
    def _join(a: dict, b: dict) -> dict:
        return {k: a[k] + b[k] for k in a}

    # ------------------------------------------------------------------------------------------ requests

    def echo_fast(self, req: CompletionRequest, prompt: str | list[int], text: str, field: str) -> dict | None:
        """A completions choice answered from one scoring pass (max_tokens 0, or 1 greedy token without stop
        strings), or None when the request has to generate."""
        n_new = req.max_tokens
        greedy_one = (n_new == 1 and req.params(1).temperature == 0 and not req.stops())
        if n_new != 0 and not greedy_one:
            return None
        ids = self._ids(prompt)
        self._fits(len(ids) + (n_new or 0), field)
        top_n = req.logprobs or 0
        (scored,) = token_logprobs(self.backend, [ids], top_n, next_token=greedy_one)
        echo = bool(req.echo)
        logprobs = self._legacy(ids, scored.logprobs, scored.top, self._offsets(text, ids, isinstance(prompt, str))) \
            if echo else {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        out_text, finish = (text if echo else ""), "length"
        new = 0
        if greedy_one and scored.next_token is not None:
            token, value, top = scored.next_token
            eos = token in self.backend.eos_ids
            piece = "" if eos else self._piece(token)
            logprobs = self._join(logprobs, self._legacy([token], [value], [top], [len(out_text)]))
            out_text += piece
            finish, new = ("stop" if eos else "length"), 1
        return {"text": out_text, "logprobs": logprobs, "finish_reason": finish, "_prompt_tokens": len(ids),
                "_completion_tokens": new}

    def _score_with(self, prompt_ids: list[int], completion: str, top_n: int, field: str) -> tuple[Scored, int]:
        new = self.backend.encode(completion, bos=False) if completion else []
        self._fits(len(prompt_ids) + len(new), field)
        (scored,) = token_logprobs(self.backend, [prompt_ids + new], top_n)
        return scored, len(prompt_ids)

    def completion_logprobs(self, prompt: str | list[int], text: str, completion: str, top_n: int, echo: bool,
                            field: str) -> dict:
        ids = self._ids(prompt)
        scored, n = self._score_with(ids, completion, top_n, field)
        new = scored.ids[n:]
        base = len(text) if echo else 0
        tail = self._legacy(new, scored.logprobs[n:], scored.top[n:],
                            [base + o for o in self._offsets(completion, new, True)])
        if not echo:
            return tail
        head = self._legacy(ids, scored.logprobs[:n], scored.top[:n], self._offsets(text, ids, isinstance(prompt, str)))
        return self._join(head, tail)

    def chat_logprobs(self, rendered: str, completion: str, top_n: int) -> dict:
        scored, n = self._score_with(self.backend.encode(rendered), completion, top_n, "messages")
        content = []
        for t, lp, top in zip(scored.ids[n:], scored.logprobs[n:], scored.top[n:]):
            piece = self._piece(t)
            content.append({"token": piece, "logprob": lp, "bytes": list(piece.encode("utf-8")),
                            "top_logprobs": [{"token": self._piece(a), "logprob": v,
                                              "bytes": list(self._piece(a).encode("utf-8"))} for a, v in top]})
        return {"content": content, "refusal": None}
