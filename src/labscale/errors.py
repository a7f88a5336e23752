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
