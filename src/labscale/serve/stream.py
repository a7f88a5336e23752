"""Incremental detokenization for streaming: new token ids in, text that is safe to send out.

The text sent for a request must end up exactly equal to the non-streamed result, so a piece is only released
once later tokens cannot change it: text is decoded from all tokens so far (as the backend decodes the final
result) and the tail is held back while it ends in an incomplete UTF-8 sequence, could be the start of a stop
string (the final text is cut before it), or, for tokenizers that clean up spaces before punctuation, after the
last whitespace. The caller sends the rest of the final text when the request finishes.
"""

from __future__ import annotations

from collections.abc import Callable


class TextStream:
    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...] = (), hold_words: bool = False):
        self._decode = decode
        self._stops = tuple(s for s in stops if s)
        self._hold_words = hold_words
        self._tokens: list[int] = []
        self.sent = ""  # text released so far
        self._done = False  # a stop string appeared: the rest comes from the final result

    def push(self, token: int) -> str:
        """Add one token; returns the newly releasable text ("" if none)."""
        if self._done:
            return ""
        self._tokens.append(token)
        text = self._decode(self._tokens)
        hits = [p for p in (text.find(s) for s in self._stops) if p >= 0]
        if hits:
            self._done = True
            safe = min(hits)
        else:
            safe = len(text) - self._held_back(text)
        if safe <= len(self.sent) or not text.startswith(self.sent):
            return ""
        piece = text[len(self.sent) : safe]
        self.sent += piece
        return piece

    def _held_back(self, text: str) -> int:
        hold = 0
        if text.endswith("\ufffd"):  # an incomplete multi-byte character
            hold = len(text) - len(text.rstrip("\ufffd"))
        for s in self._stops:  # the longest tail that is a proper prefix of a stop string
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        if self._hold_words:
            cut = max(text.rfind(" "), text.rfind("\n"), text.rfind("\t"))
            if cut >= 0:
                hold = max(hold, len(text) - cut)
        return hold

    def finish(self, final_text: str) -> str:
        """The rest of the final text, once the request is done."""
        if not final_text.startswith(self.sent):  # cannot happen with a prefix-stable decode; never resend
            return ""
        rest = final_text[len(self.sent) :]
        self.sent = final_text
        return rest
