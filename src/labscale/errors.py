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
        from labscale.secrets import redact

        line = self.message.rstrip(".")
        return redact(f"{line} — {self.hint}" if self.hint else line) or ""


class ConfigError(LabscaleError):
    """The experiment file is malformed or names something unknown."""


class DataError(LabscaleError):
    """A dataset is missing, empty, or lacks a named column."""


class ModelError(LabscaleError):
    """A model cannot be resolved or loaded, or a prompt does not fit it."""


class RunFailed(LabscaleError):
    """The experiment ran, but some of its runs have no result (e.g. every request to a model failed)."""

    exit_code = 1


def closest(word: object, candidates) -> str | None:
    """The candidate closest to a misspelt `word` (difflib, case-insensitive; else the one candidate `word` begins),
    or None when none is close."""
    import difflib

    if not isinstance(word, str) or not word:
        return None
    by_lower = {str(c).lower(): str(c) for c in candidates}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    if close:
        return by_lower[close[0]]
    longer = [c for c in by_lower if c.startswith(word.lower())]  # a name cut short: 'smollm2' → 'smollm2-135m-…'
    return by_lower[longer[0]] if len(longer) == 1 else None


def did_you_mean(word: object, candidates) -> str:
    """"did you mean 'x'? " for the closest of `candidates` to `word`, or "": the start of a hint, so every
    unknown-name error suggests the same way."""
    match = closest(word, candidates)
    return f"did you mean '{match}'? " if match else ""
