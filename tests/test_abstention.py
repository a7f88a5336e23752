"""abstention-qa: the data construction (deterministic, half unanswerable, safe pairings, no leaks, fits the embedded
model), the abstention metrics on hand-made outcomes, and one real end-to-end run."""

from __future__ import annotations

import math
import sqlite3
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from helpers import cli, write_experiment

from labscale.example import UNPARSEABLE, Example, Outcome
from labscale.metrics.registry import get_metric
from labscale.tasks import abstention
from labscale.tasks.registry import get_task

METRICS = ["accuracy", "answerable_accuracy", "abstain_rate_answerable", "abstain_rate_unanswerable", "coverage",
           "selective_accuracy", "unparseable_rate"]


@pytest.fixture(scope="module")
def task():
    return get_task("abstention-qa", Path("."))


@pytest.fixture(scope="module")
def rows():
    return {(r["source"], r["row"]): r for r in abstention.boolq_rows() + abstention.pubmedqa_rows()}


def _context(example: Example) -> str:
    return example.input.rsplit("\nQuestion: ", 1)[0].removeprefix("Context: ")


def test_deterministic(task):
    again = get_task("abstention-qa", Path("."))
    assert again.examples == task.examples and [e.meta for e in again.examples] == [e.meta for e in task.examples]
    ids = {k: [e.id for e in v] for k, v in task.splits.items()}
    assert {k: [e.id for e in v] for k, v in again.splits.items()} == ids
    assert task.info()["splits"] == {"train": 628, "dev": 103, "test": 314}
    assert task.group_fields == ("source", "answerable") and task.main_metric == "accuracy"


def test_half_unanswerable_per_source(task):
    counts = Counter((e.meta["source"], e.meta["answerable"]) for e in task.examples)
    assert counts == {("boolq", "answerable"): 300, ("boolq", "unanswerable"): 300,
                      ("pubmedqa", "answerable"): 223, ("pubmedqa", "unanswerable"): 222}
    for e in task.examples:
        assert (e.target == "unanswerable") == (e.meta["answerable"] == "unanswerable")
        assert e.target in task.labels


def test_pairings_never_give_a_question_a_context_that_may_answer_it(task, rows):
    answerable = {}
    for e in task.examples:
        if e.meta["answerable"] == "answerable":
            answerable[(e.meta["source"], e.meta["row"])] = e
    assert len(set(rows[(e.meta["source"], e.meta["row"])]["title"] for e in task.examples)) == len(task.examples)
    for e in task.examples:
        asker, host = rows[(e.meta["source"], e.meta["row"])], rows[(e.meta["source"], e.meta["context_row"])]
        assert e.input == f"Context: {host['context']}\nQuestion: {asker['question']}"
        if e.meta["answerable"] == "answerable":
            assert asker is host and e.target == asker["answer"]
            continue
        assert asker["title"] != host["title"] and asker["context"] != host["context"]
        overlap = abstention._content_words(asker["question"]) & abstention._content_words(host["context"])
        assert len(overlap) < 2, (e.id, overlap)
        partner = answerable[(e.meta["source"], e.meta["context_row"])]  # the host shows the same context
        assert partner.group == e.group and _context(partner) == _context(e)


def test_no_passage_in_two_splits(task, rows):
    where: dict[str, set[str]] = {}
    for split, examples in task.splits.items():
        for e in examples:
            where.setdefault(_context(e), set()).add(split)
    assert all(len(s) == 1 for s in where.values())
    for e in task.examples:  # an unanswerable question's own passage is never shown at all
        assert e.meta["answerable"] == "answerable" or rows[(e.meta["source"], e.meta["row"])]["context"] not in where
    shown = Counter(_context(e) for e in task.examples)
    assert set(shown.values()) <= {1, 2}


def test_inputs_are_short_enough(task):
    """A character bound; test_prompts_fit_the_embedded_model checks tokens with the real tokenizer."""
    assert max(len(_context(e)) for e in task.examples if e.meta["source"] == "boolq") <= abstention.MAX_CONTEXT_CHARS
    assert max(len(e.input) for e in task.examples) < 2800


# --- metrics on hand-made outcomes ---------------------------------------------------------------------------------

def _outcome(target: str, prediction: str, failed: str | None = None) -> Outcome:
    return Outcome(Example(id=f"{target}-{prediction}", input="", target=target), prediction, prediction,
                   failed=failed)


HAND = [
    _outcome("yes", "yes"),  # answerable, right
    _outcome("no", "yes"),  # answerable, wrong
    _outcome("yes", "unanswerable"),  # answerable, abstained
    _outcome("no", UNPARSEABLE),  # answerable, unparseable: answered and wrong
    _outcome("unanswerable", "unanswerable"),  # unanswerable, abstained (right)
    _outcome("unanswerable", "no"),  # unanswerable, answered (wrong)
    _outcome("unanswerable", "unanswerable", failed="timeout"),  # failed: wrong, not abstained
]


def _score(name: str, outcomes: list[Outcome]) -> float:
    return get_metric(name).score(outcomes)


def test_metrics_by_hand():
    assert _score("accuracy", HAND) == pytest.approx(2 / 7)
    assert _score("answerable_accuracy", HAND) == pytest.approx(1 / 4)
    assert _score("abstain_rate_answerable", HAND) == pytest.approx(1 / 4)
    assert _score("abstain_rate_unanswerable", HAND) == pytest.approx(1 / 3)
    assert _score("coverage", HAND) == pytest.approx(5 / 7)
    assert _score("selective_accuracy", HAND) == pytest.approx(1 / 5)
    assert _score("unparseable_rate", HAND) == pytest.approx(1 / 7)
    for name in METRICS[1:6]:
        metric = get_metric(name)
        assert metric.family == "abstention"
        assert metric.higher_is_better == (name != "abstain_rate_answerable")


def test_aggregates_on_row_subsets_and_nan():
    for name in METRICS[1:6]:
        metric = get_metric(name)
        stats = metric.stats(HAND)
        assert stats.shape == (7, 1)
        for rows in ([0, 1, 4], [2, 3, 5, 6], [1, 1, 2]):
            assert metric.aggregate(stats[rows]) == pytest.approx(metric.score([HAND[i] for i in rows]), nan_ok=True)
    answerable, unanswerable = HAND[:4], HAND[4:]
    assert math.isnan(_score("answerable_accuracy", unanswerable))
    assert math.isnan(_score("abstain_rate_answerable", unanswerable))
    assert math.isnan(_score("abstain_rate_unanswerable", answerable))
    assert _score("abstain_rate_unanswerable", unanswerable) == pytest.approx(1 / 3)
    assert math.isnan(_score("selective_accuracy", [HAND[2], HAND[4]]))  # abstained on everything
    assert _score("coverage", [HAND[2], HAND[4]]) == 0.0
    assert np.isnan(get_metric("selective_accuracy").stats(HAND)[[2, 4], 0]).all()


# --- the real embedded model ---------------------------------------------------------------------------------------

@pytest.mark.real_model
@pytest.mark.slow
def test_prompts_fit_the_embedded_model(task):
    """The worst few-shot:1 prompt (longest train input as the shot, longest input overall) plus the cot budget."""
    from transformers import AutoTokenizer

    from labscale.models.embedded import ensure_converted

    tok = AutoTokenizer.from_pretrained(ensure_converted("smollm2-135m-instruct"))
    shot = max(task.splits["train"], key=lambda e: len(tok(e.input).input_ids))
    query = max(task.examples, key=lambda e: len(tok(e.input).input_ids))
    turn = f"{task.instruction}\n\n{{}}"
    messages = [{"role": "user", "content": turn.format(shot.input)}, {"role": "assistant", "content": shot.target},
                {"role": "user", "content": turn.format(query.input)}]
    n = len(tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"])
    assert n + 256 <= 2048


@pytest.mark.real_model
@pytest.mark.slow
def test_end_to_end_with_the_embedded_model(tmp_path, capsys, monkeypatch):
    exp = write_experiment(tmp_path / "a.yaml", name="a", models=[{"id": "embedded:smollm2-135m-instruct"}],
                           tasks=["abstention-qa"], settings=["zero-shot"], limit=6,
                           generation={"max_new_tokens": 8})
    code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", tmp_path / "a.db")
    assert code == 0, err
    conn = sqlite3.connect(tmp_path / "a.db")
    scores = {m: (v, lo, hi, n) for m, v, lo, hi, n in
              conn.execute("SELECT metric, value, ci_low, ci_high, n FROM scores")}
    preds = conn.execute("SELECT prediction, target, error FROM predictions ORDER BY position").fetchall()
    assert set(scores) == set(METRICS) and len(preds) == 6
    assert Counter(t == "unanswerable" for _, t, _ in preds) == {True: 3, False: 3}
    for value, low, high, n in scores.values():
        assert n == 6
        if value is not None:
            assert 0.0 <= low <= value <= high <= 1.0
    answered = [(p, t) for p, t, e in preds if e is not None or p != "unanswerable"]
    assert scores["coverage"][0] == pytest.approx(len(answered) / 6)
    assert scores["accuracy"][0] == pytest.approx(np.mean([p == t and e is None for p, t, e in preds]))


def test_paraphrased_abstentions_count_as_abstaining():
    from labscale.answers import parse_answer
    from labscale.tasks.abstention import make_task

    task = make_task()
    ex = task.split("test")[0]
    for text, label in [("Unanswerable.", "unanswerable"), ("The question cannot be answered from this context.",
                        "unanswerable"), ("The context does not mention it.", "unanswerable"), ("Yes.", "yes"),
                        ("No, it is not stated.", "no")]:
        assert parse_answer(task, ex, text, cot=False) == label
