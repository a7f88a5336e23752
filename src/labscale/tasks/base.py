"""The Task: examples with targets, an instruction, metrics, and a deterministic seeded train/dev/test split."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Callable, Literal

from labscale.errors import ConfigError, DataError
from labscale.example import LETTERS, Demo, Example

if TYPE_CHECKING:
    from labscale.retrieval.collection import Collection

__all__ = ["LETTERS", "SPLITS", "Example", "Task", "TaskType"]

TaskType = Literal["generate", "classify", "multiple_choice"]
SPLITS = ("train", "dev", "test")


@dataclass(eq=False)
class Task:
    """A task family instance. `load` returns every example; splitting and limits happen here, identically for all."""

    name: str
    description: str
    type: TaskType
    instruction: str
    metrics: list[str]
    main_metric: str
    source: str
    license: str
    load: Callable[[], list[Example]] = field(repr=False)
    labels: tuple[str, ...] = ()
    split_fractions: tuple[float, float, float] = (0.6, 0.1, 0.3)
    split_seed: int = 0
    # Multiple choice scored by log-likelihood follows lm-evaluation-harness: context = `input`,
    # continuation = target_delimiter + choice.
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    # Keys of Example.meta to break every metric down by (per group, worst group, largest gap in the report).
    group_fields: tuple[str, ...] = ()
    # Other phrasings that count as a label when parsing classify answers, e.g. {"unanswerable": ("not answerable",)}.
    label_aliases: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # Facts about how the data was built that a reader of the report needs (e.g. blocking recall); JSON-able.
    notes: dict = field(default_factory=dict)
    # The split the data itself puts an example in ("train" | "dev" | "test": files per split, a split column);
    # None: the seeded `split_fractions` shuffle decides.
    split_by: Callable[[Example], str] | None = field(default=None, repr=False)
    # Opt-in input truncation (settings/truncate.py): each example's input cut to this many tokens of the model.
    max_input_tokens: int | None = None
    truncate: Literal["middle", "end"] = "middle"
    # The document collection a retrieval setting (rag:K) searches for this task: a callable returning a
    # labscale.retrieval.Collection (called on first use, so listing tasks stays cheap), or None. Examples then
    # name their gold passage or document in meta["gold_passage"] when retrieval can be scored.
    collection: Callable[[], "Collection"] | None = field(default=None, repr=False)
    # Fixed demonstrations every prompt starts with (user/assistant turns; solved blocks for log-likelihood), e.g.
    # a compiled prompt exported by `labscale export-prompt`; a compiled (optimized) setting replaces them.
    demos: tuple[Demo, ...] = ()

    def __post_init__(self) -> None:
        from labscale.metrics.registry import get_metric  # lazy: metrics import this module

        for metric in self.metrics:
            get_metric(metric)
        if self.main_metric not in self.metrics:
            raise ConfigError(f"task '{self.name}': main_metric '{self.main_metric}' is not among its metrics",
                              f"use one of: {', '.join(self.metrics)}")
        if self.type == "classify" and not self.labels:
            raise ConfigError(f"task '{self.name}' is a classify task without labels", "list them under `labels:`")
        if abs(sum(self.split_fractions) - 1.0) > 1e-6 or min(self.split_fractions) < 0:
            raise ConfigError(f"task '{self.name}': split fractions {self.split_fractions} must be >= 0 and sum to 1")

    @cached_property
    def examples(self) -> list[Example]:
        examples = self.load()
        if not examples:
            raise DataError(f"task '{self.name}' has an empty dataset", "check the data file or its filters")
        ids = [e.id for e in examples]
        if len(set(ids)) != len(ids):
            raise DataError(f"task '{self.name}' has duplicate example ids", "give every row a unique id")
        return examples

    def _shuffled_groups(self, examples: list[Example]) -> tuple[list[str], dict[str, list[Example]]]:
        groups: dict[str, list[Example]] = {}
        for ex in examples:
            groups.setdefault(ex.group or ex.id, []).append(ex)
        keys = sorted(groups)
        random.Random(self.split_seed).shuffle(keys)
        return keys, groups

    @cached_property
    def splits(self) -> dict[str, list[Example]]:
        """Shuffle groups with `split_seed` and cut them by `split_fractions`; example order inside a split is seeded
        too. Where the data names each example's split (`split_by`), that split holds, in a seeded order."""
        if self.split_by is not None:
            named: dict[str, list[Example]] = {name: [] for name in SPLITS}
            for ex in self.examples:
                named[self.split_by(ex)].append(ex)
            out = {}
            for name, examples in named.items():
                keys, groups = self._shuffled_groups(examples)
                out[name] = [ex for k in keys for ex in groups[k]]
            return out
        keys, groups = self._shuffled_groups(self.examples)
        n = len(keys)
        n_train = round(n * self.split_fractions[0])
        n_dev = round(n * self.split_fractions[1])
        cuts = {"train": keys[:n_train], "dev": keys[n_train : n_train + n_dev], "test": keys[n_train + n_dev :]}
        return {name: [ex for k in ks for ex in groups[k]] for name, ks in cuts.items()}

    def split(self, name: str, limit: int | None = None) -> list[Example]:
        """Examples of one split; `limit` takes the first N, which is deterministic because the split is seeded."""
        if name not in SPLITS:
            raise ConfigError(f"unknown split '{name}'", f"use one of {', '.join(SPLITS)}")
        examples = self.splits[name]
        if not examples:
            raise DataError(
                f"task '{self.name}' has an empty {name} split ({len(self.examples)} examples in all)",
                f"add a {name} file under `data:` (or {name} rows in its split column)" if self.split_by else
                "add data or change the task's split fractions",
            )
        return examples if limit is None else examples[:limit]

    def info(self) -> dict:
        """Summary for `labscale tasks` and the report."""
        sizes = {k: len(v) for k, v in self.splits.items()}
        return {
            "name": self.name,
            "description": self.description,
            "type": self.type,
            "metrics": self.metrics,
            "main_metric": self.main_metric,
            "splits": sizes,
            "source": self.source,
            "license": self.license,
            **({"group_fields": list(self.group_fields)} if self.group_fields else {}),
            **({"label_aliases": {k: list(v) for k, v in self.label_aliases.items()}} if self.label_aliases else {}),
            **({"notes": self.notes} if self.notes else {}),
            **({"split_by": "data"} if self.split_by else {}),
            **({"max_input_tokens": self.max_input_tokens, "truncate": self.truncate}
               if self.max_input_tokens else {}),
            **({"demos": len(self.demos)} if self.demos else {}),
        }
