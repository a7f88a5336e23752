"""Optional experiment tracking: Weights & Biases (offline unless told otherwise) or MLflow (a SQLite store beside
the adapter unless MLFLOW_TRACKING_URI is set). Neither is a dependency: asking for one that is not installed is a
one-line error naming the pip command. The Trainer's own integrations do the logging (`report_to`).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from labscale.errors import ConfigError

CHOICES = ("none", "wandb", "mlflow")


def check_tracking(log: str) -> None:
    """Validate `--log` before any work starts."""
    if log not in CHOICES:
        raise ConfigError(f"unknown --log '{log}'", "use none, wandb or mlflow")
    if log != "none" and importlib.util.find_spec(log) is None:
        raise ConfigError(f"--log {log} needs the {log} package, which is not installed", f"pip install {log}")


def report_to(log: str, out: Path, run_name: str) -> list[str]:
    """The Trainer's `report_to`, with the environment its integration reads (set only where unset)."""
    check_tracking(log)
    if log == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")  # works without an account; `wandb sync` uploads later
        os.environ.setdefault("WANDB_DIR", str(out))
        os.environ.setdefault("WANDB_PROJECT", "labscale")
        os.environ.setdefault("WANDB_NAME", run_name)
        return ["wandb"]
    if log == "mlflow":
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{(out / 'mlflow.db').resolve()}")
        os.environ.setdefault("MLFLOW_EXPERIMENT_NAME", "labscale")
        os.environ.setdefault("MLFLOW_RUN_NAME", run_name)
        return ["mlflow"]
    return []
