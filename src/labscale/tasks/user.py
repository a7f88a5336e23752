"""Tasks defined in the experiment file over a local data file or an HF dataset.

    tasks:
      - name: tickets
        data: data/tickets.csv          # .csv .jsonl .json .parquet, or hf:<dataset id>[:<split>]
        type: classify                  # generate | classify | multiple_choice
        input: "Ticket: {{ subject }}\n{{ body }}"   # Jinja2 over the row's columns ({{ row["a col"] }} works too)
        target: category
        labels: [billing, bug, other]

The split: a seeded shuffle of the one file cut by `split_fractions` (default 60/10/30); or the data names it,
either one file per split (`data: {train: a.jsonl, dev: b.jsonl, test: c.jsonl}`, any may be left out; default ids
are `<split>-<row>`) or a column (`split_column: split`, values train / dev / test, SPLIT_NAMES lists synonyms such
as validation). Either way the order inside a split is seeded, so `limit` takes a seeded sample.

Everything that can be checked without reading the data (template syntax, labels, metric names) is checked when
the task is built; columns and values are checked when the data is loaded, naming the column or value at fault.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jinja2
import jinja2.meta

from labscale.config import DataSplits, TaskSpec
from labscale.data.files import is_missing, read_source
from labscale.errors import ConfigError, DataError, did_you_mean
from labscale.tasks.base import SPLITS, Task
from labscale.example import LETTERS, Example

DEFAULT_METRICS: dict[str, list[str]] = {
    "generate": ["rouge1", "rouge2", "rougeL", "bleu"],
    "classify": ["accuracy", "f1_weighted", "unparseable_rate"],
    "multiple_choice": ["acc", "acc_norm"],
}
ROW_VARIABLE = "row"  # {{ row["column with spaces"] }}
GOLD_PASSAGE = "gold_passage"  # Example.meta key the retrieval metrics read (metrics/retrieval.py GOLD_KEY)

_env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False, keep_trailing_newline=False)


def _columns_text(columns: list[str]) -> str:
    shown = ", ".join(columns[:30]) + (f", … ({len(columns)} in all)" if len(columns) > 30 else "")
    return f"available columns: {shown}" if columns else "the data has no columns"


def _compile(spec: TaskSpec) -> tuple[jinja2.Template, set[str]]:
    """The input template and the variables it names; ConfigError with the line on a syntax error."""
    try:
        ast = _env.parse(spec.input)
        template = _env.from_string(spec.input)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(
            f"task '{spec.name}': syntax error in the input template at line {e.lineno}: {e.message}",
            "fix the Jinja2 template under `input:` (columns are written {{ column }})",
        ) from None
    return template, set(jinja2.meta.find_undeclared_variables(ast)) - set(_env.globals)


def _check_metrics(spec: TaskSpec) -> tuple[list[str], str]:
    metrics = list(spec.metrics) if spec.metrics is not None else list(DEFAULT_METRICS[spec.type])
    if spec.metrics is None and spec.collection is not None:  # retrieval metrics (NaN outside rag:K runs)
        metrics += (["recall_at_k", "mrr"] if spec.gold_passage else []) + \
            (["faithfulness_overlap"] if spec.type == "generate" else [])
    if not metrics:
        raise ConfigError(f"task '{spec.name}' lists no metrics", f"remove `metrics:` to use the defaults ({', '.join(DEFAULT_METRICS[spec.type])})")
    return metrics, spec.main_metric or metrics[0]  # names and main metric are checked by Task


def _text(value: Any) -> str:
    return "" if is_missing(value) else str(value)


def _context(row: dict[str, Any]) -> dict[str, Any]:
    values = {k: ("" if is_missing(v) else v) for k, v in row.items()}
    if ROW_VARIABLE not in values:
        values[ROW_VARIABLE] = dict(values)
    return values


def _choice_list(value: Any, column: str, where: str) -> list[str]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(
                f"{where}: column '{column}' holds {value[:60]!r}, not a list of choices",
                'write the choices as a JSON list, e.g. ["red", "green"], or list one column per choice',
            ) from None
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"{where}: column '{column}' does not hold a non-empty list of choices", 'write e.g. ["red", "green"]')
    return [_text(v).strip() for v in value]


def _gold_index(value: Any, choices: list[str], column: str, where: str) -> int:
    """The gold choice from an index (int or digit string), the choice text, or its letter (A, B, …)."""
    if isinstance(value, bool):
        value = str(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        if 0 <= value < len(choices):
            return value
    else:
        text = _text(value).strip()
        if text in choices:
            return choices.index(text)
        if re.fullmatch(r"\d+", text) and int(text) < len(choices):
            return int(text)
        letter = text.rstrip(".)").lstrip("(")
        if len(letter) == 1 and letter.upper() in LETTERS[: len(choices)]:
            return LETTERS.index(letter.upper())
    raise DataError(
        f"{where}: target {value!r} in column '{column}' is neither a choice index (0-{len(choices) - 1}), a letter, "
        f"nor one of the choices {choices}",
        "the target column must hold the gold choice's index, letter or text",
    )


SPLIT_NAMES = {"train": "train", "training": "train", "dev": "dev", "development": "dev", "validation": "dev",
               "valid": "dev", "val": "dev", "test": "test", "testing": "test"}


def split_name(value: Any, column: str, where: str) -> str:
    """A split column's value as a split: train / dev / test (case-insensitive; SPLIT_NAMES lists the synonyms)."""
    text = _text(value).strip()
    split = SPLIT_NAMES.get(text.lower())
    if split is None:
        raise DataError(f"{where}: split column '{column}' holds {text!r}, which is not a split",
                        "use train, dev (or validation) or test")
    return split


def did_you_mean_column(column: str, columns: list[str]) -> str:
    suggestion = did_you_mean(column, columns)
    return f"; {suggestion.strip()}" if suggestion else ""


def _sources(spec: TaskSpec) -> list[tuple[str | None, str]]:
    """(split or None, data) for each file a task reads: one file, or one per split in train/dev/test order."""
    if isinstance(spec.data, DataSplits):
        return [(name, getattr(spec.data, name)) for name in SPLITS if getattr(spec.data, name)]
    return [(None, spec.data)]


def _source_text(spec: TaskSpec) -> str:
    return ", ".join(f"{split}: {data}" for split, data in _sources(spec)) if isinstance(spec.data, DataSplits) \
        else spec.data


def _example(spec: TaskSpec, template: jinja2.Template, labels: tuple[str, ...], choice_columns: list[str],
             row: dict[str, Any], where: str, default_id: str, unlabelled_ok: bool = False) -> Example:
    """One row as an Example; DataError naming the row and column at fault. `unlabelled_ok`: a row of the train
    split may leave the target empty (a teacher labels it, docs/distill.md): target "", no gold choice."""
    try:
        text = template.render(_context(row)).strip()
    except jinja2.UndefinedError as e:
        raise DataError(f"{where}: the input template failed: {e.message}", _columns_text(list(row))) from None
    except Exception as e:  # e.g. a filter applied to the wrong type
        raise DataError(f"{where}: the input template failed: {type(e).__name__}: {e}", "check the `input:` template") from None
    unlabelled = unlabelled_ok and (spec.target not in row or is_missing(row[spec.target]) or
                                    (spec.type != "multiple_choice" and not _text(row[spec.target]).strip()))
    if not unlabelled and (spec.target not in row or is_missing(row[spec.target])):
        raise DataError(f"{where} has no value in target column '{spec.target}'", "fill in or remove rows without a target")
    raw_target = None if unlabelled else row[spec.target]
    choices: tuple[str, ...] = ()
    gold = None
    if unlabelled:
        target = ""
        if spec.type == "multiple_choice":
            choices = tuple(_choice_list(row.get(spec.choices), spec.choices, where)) if isinstance(spec.choices, str) \
                else tuple(_text(row.get(c)).strip() for c in choice_columns)
    elif spec.type == "classify":
        target = _text(raw_target).strip()
        if target not in labels:
            raise DataError(
                f"{where}: target '{target}' in column '{spec.target}' is not one of the labels",
                f"labels are {', '.join(labels)}; add it to `labels:` or fix the data",
            )
    elif spec.type == "multiple_choice":
        if isinstance(spec.choices, str):
            choice_list = _choice_list(row.get(spec.choices), spec.choices, where)
        else:
            choice_list = [_text(row.get(c)).strip() for c in choice_columns]
        gold = _gold_index(raw_target, choice_list, spec.target, where)
        choices, target = tuple(choice_list), choice_list[gold]
    else:
        target = _text(raw_target).strip()
        if not target:
            raise DataError(f"{where} has an empty target in column '{spec.target}'", "fill in or remove rows without a target")
    ex_id = _text(row.get(spec.id_column)).strip() if spec.id_column else default_id
    if not ex_id:
        raise DataError(f"{where} has an empty id in column '{spec.id_column}'", "give every row an id")
    meta = {g: "(missing)" if is_missing(row.get(g)) else _text(row[g]).strip() for g in spec.groups}
    if spec.gold_passage and not is_missing(row.get(spec.gold_passage)) and _text(row[spec.gold_passage]).strip():
        meta[GOLD_PASSAGE] = _text(row[spec.gold_passage]).strip()
    return Example(id=ex_id, input=text, target=target, choices=choices, gold=gold, meta=meta)


def task_from_spec(spec: TaskSpec, base_dir: Path) -> Task:
    """A Task for a `tasks:` entry of the experiment file; the data is read on first use."""
    template, variables = _compile(spec)
    labels = tuple(label.strip() for label in spec.labels)
    if spec.type == "classify":
        if not labels or not all(labels):
            raise ConfigError(f"task '{spec.name}' is a classify task without labels", "list them under `labels:`")
        if len(set(labels)) != len(labels):
            raise ConfigError(f"task '{spec.name}' lists a label twice", "make the `labels:` unique")
    elif labels:
        raise ConfigError(f"task '{spec.name}': `labels:` is only for classify tasks", "remove it, or use type: classify")
    unknown = sorted(set(spec.label_aliases) - set(labels))
    if unknown:
        raise ConfigError(f"task '{spec.name}': label_aliases names '{unknown[0]}', which is not a label",
                          "key label_aliases by the task's labels")
    if spec.type == "multiple_choice":
        if not spec.choices:
            raise ConfigError(
                f"task '{spec.name}' is a multiple_choice task without `choices:`",
                "name a column holding a list of choices, or list one column per choice",
            )
    elif spec.choices:
        raise ConfigError(f"task '{spec.name}': `choices:` is only for multiple_choice tasks", "remove it, or use type: multiple_choice")
    metrics, main = _check_metrics(spec)
    choice_columns = [spec.choices] if isinstance(spec.choices, str) else list(spec.choices or [])

    sources = _sources(spec)
    assigned: dict[str, str] = {}  # example id -> the split its data names (files per split, a split column)

    def load() -> list[Example]:
        examples, seen = [], {}
        assigned.clear()
        for split, data in sources:
            rows = read_source(data, base_dir)
            if not rows:
                raise DataError(f"data '{data}' of task '{spec.name}' has no rows", "add rows or fix the `data:` path")
            columns = list(rows[0].keys())
            needed = [("input template", sorted(variables - {ROW_VARIABLE})), ("target", [spec.target])]
            needed += [("id_column", [spec.id_column] if spec.id_column else []), ("choices", choice_columns)]
            needed += [("groups", list(spec.groups)),
                       ("split_column", [spec.split_column] if spec.split_column else []),
                       ("gold_passage", [spec.gold_passage] if spec.gold_passage else [])]
            for what, names in needed:
                for col in names:
                    if col not in columns:
                        raise DataError(f"task '{spec.name}': the {what} names column '{col}', which '{data}' lacks",
                                        _columns_text(columns) + did_you_mean_column(col, columns))
            for i, row in enumerate(rows):
                where = f"task '{spec.name}', row {i}" if split is None else \
                    f"task '{spec.name}', {split} file '{data}', row {i}"
                row_split = split if split is not None else \
                    split_name(row.get(spec.split_column), spec.split_column, where) if spec.split_column else None
                ex = _example(spec, template, labels, choice_columns, row, where,
                              default_id=str(i) if split is None else f"{split}-{i}",
                              unlabelled_ok=row_split == "train")
                here = str(i) if split is None else f"{split} file '{data}' row {i}"
                if ex.id in seen:
                    both = f"rows {seen[ex.id]} and {i}" if split is None else f"{seen[ex.id]} and {here}"
                    raise DataError(f"task '{spec.name}': id '{ex.id}' appears in {both}",
                                    f"make column '{spec.id_column}' unique, or remove `id_column:`")
                seen[ex.id] = here
                if split is not None:
                    assigned[ex.id] = split
                elif spec.split_column:
                    assigned[ex.id] = split_name(row.get(spec.split_column), spec.split_column, where)
                examples.append(ex)
        return examples

    instruction = spec.instruction.strip()
    if not instruction and spec.type == "classify":
        instruction = f"Classify the input. Answer with exactly one of: {', '.join(labels)}."
    return Task(
        name=spec.name,
        description=spec.description or f"user task over {_source_text(spec)}",
        type=spec.type,
        instruction=instruction,
        metrics=metrics,
        main_metric=main,
        source=_source_text(spec),
        license=spec.license,
        load=load,
        labels=labels,
        split_fractions=tuple(spec.split_fractions),
        split_by=(lambda ex: assigned[ex.id]) if spec.split_column or isinstance(spec.data, DataSplits) else None,
        group_fields=tuple(spec.groups),
        label_aliases={label: tuple(a.strip() for a in aliases) for label, aliases in spec.label_aliases.items()},
    )
