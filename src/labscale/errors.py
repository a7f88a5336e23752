"""User-facing errors: one line that names the cause and the fix. The CLI prints them without a traceback."""

from __future__ import annotations


class LabscaleError(Exception):
    """An error the user can fix. `hint` says how; the CLI exits with code 2."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        line = self.message.rstrip(".")
        return f"{line} — {self.hint}" if self.hint else line


class ConfigError(LabscaleError):
    """The experiment file is malformed or names something unknown."""


class DataError(LabscaleError):
    """A dataset is missing, empty, or lacks a named column."""


class ModelError(LabscaleError):
    """A model cannot be resolved or loaded, or a prompt does not fit it."""


def did_you_mean(word: object, candidates, n: int = 1) -> str:
    """"did you mean 'x'? " for the closest of `candidates` to a misspelt `word` (difflib), or "" when none is
    close: the start of a hint, so every unknown-name error suggests the same way."""
    import difflib

    if not isinstance(word, str) or not word:
        return ""
    pool = [str(c) for c in candidates]
    by_lower = {c.lower(): c for c in pool}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=n, cutoff=0.6)
    if not close:
        return ""
    return "did you mean " + " or ".join(f"'{by_lower[c]}'" for c in close) + "? "
