"""Read tabular data into a list of row dicts: local CSV / JSONL / JSON / Parquet files, or an HF dataset by id.

Values are kept as faithful as the format allows: CSV cells are read as text (no "007" → 7 or date guessing; an
empty cell is ""), JSON(L) values keep their JSON types, Parquet values are converted to plain Python (lists stay
lists, missing values become None).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from labscale.errors import DataError

Row = dict[str, Any]
SUPPORTED_EXTENSIONS = (".csv", ".jsonl", ".json", ".parquet")
HF_PREFIX = "hf:"


def is_missing(value: Any) -> bool:
    """None, NaN or pandas' NA / NaT."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    try:
        import pandas as pd

        return value is pd.NA or value is pd.NaT
    except ImportError:  # pragma: no cover
        return False


def resolve_path(data: str, base_dir: Path) -> Path:
    """`data` as written in the experiment file, relative to its folder unless absolute."""
    path = Path(data).expanduser()
    return path if path.is_absolute() else Path(base_dir) / path


def read_source(data: str, base_dir: Path) -> list[Row]:
    """Rows of `data`: `hf:<dataset id>[:<split>]` or a file path relative to `base_dir`."""
    if data.startswith(HF_PREFIX):
        dataset_id, _, split = data[len(HF_PREFIX) :].partition(":")
        return read_hf(dataset_id.strip(), split.strip() or None)
    return read_file(resolve_path(data, base_dir))


def read_file(path: Path) -> list[Row]:
    """Rows of a local .csv, .jsonl, .json (a list of objects) or .parquet file."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise DataError(
            f"unsupported data file type '{suffix or path.name}' for '{path}'",
            f"use one of {', '.join(SUPPORTED_EXTENSIONS)}, or hf:<dataset id>[:<split>]",
        )
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise DataError(f"data file '{path}' {what}", "check the `data:` path (relative to the experiment file)")
    try:
        if suffix == ".csv":
            return _read_csv(path)
        if suffix == ".jsonl":
            return _read_jsonl(path)
        if suffix == ".json":
            return _read_json(path)
        return _read_parquet(path)
    except UnicodeDecodeError as e:
        raise DataError(f"data file '{path}' is not valid UTF-8 ({e.reason} at byte {e.start})", "save it as UTF-8") from None


def _read_csv(path: Path) -> list[Row]:
    import pandas as pd

    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        return []
    except pd.errors.ParserError as e:
        detail = str(e).strip().splitlines()[-1] if str(e).strip() else "parse error"
        raise DataError(f"malformed CSV file '{path}': {detail}", "check quoting and the number of fields per row") from None
    return df.to_dict(orient="records")


def _check_object(value: Any, path: Path, where: str) -> Row:
    if not isinstance(value, dict):
        raise DataError(
            f"{where} of '{path}' is a JSON {type(value).__name__}, not an object",
            "each row must be an object mapping column names to values",
        )
    return value


def _read_jsonl(path: Path) -> list[Row]:
    rows = []
    with path.open(encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"malformed JSON on line {lineno} of '{path}': {e.msg}", "each line must be one JSON object") from None
            rows.append(_check_object(value, path, f"line {lineno}"))
    return rows


def _read_json(path: Path) -> list[Row]:
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON in '{path}' at line {e.lineno}, column {e.colno}: {e.msg}", "fix the JSON syntax") from None
    if not isinstance(value, list):
        raise DataError(
            f"'{path}' holds a JSON {type(value).__name__}, not a list of rows",
            "a .json data file must be a list of objects (or use .jsonl, one object per line)",
        )
    return [_check_object(v, path, f"item {i}") for i, v in enumerate(value)]


def _plain(value: Any) -> Any:
    """numpy / pandas scalars and arrays → plain Python; missing → None."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return None if is_missing(value) else value


def _read_parquet(path: Path) -> list[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError subclasses for corrupt files
        raise DataError(f"cannot read Parquet file '{path}': {str(e).splitlines()[0]}", "check that it is a valid Parquet file") from None
    return [{k: _plain(v) for k, v in row.items()} for row in table.to_pylist()]


def read_hf(dataset_id: str, split: str | None = None) -> list[Row]:
    """Rows of one split of an HF Hub dataset (needs the network unless it is cached).

    Without a split, a dataset with a single split uses it; one with several must name it.
    """
    hint = "check the dataset id and your network connection, or use a local file"
    if not dataset_id:
        raise DataError("empty HF dataset id in 'hf:'", "write hf:<dataset id>[:<split>], e.g. hf:imdb:test")
    from labscale.hub import hub_reachable

    if not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"  # the process is offline: read the local cache or fail at once
    try:
        import datasets
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
        loaded = datasets.load_dataset(dataset_id, split=split)
    except Exception as e:  # offline, unknown id or split, gated, a broken loading script, ...
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        where = f"'{dataset_id}'" + (f" (split '{split}')" if split else "")
        raise DataError(f"could not load HF dataset {where}: {reason}", hint) from None
    if split is None:  # a DatasetDict
        splits = list(loaded.keys())
        if len(splits) != 1:
            raise DataError(
                f"HF dataset '{dataset_id}' has several splits ({', '.join(splits)})",
                f"name one, e.g. hf:{dataset_id}:{splits[0] if splits else 'train'}",
            )
        loaded = loaded[splits[0]]
    return [{k: _plain(v) for k, v in row.items()} for row in loaded]
