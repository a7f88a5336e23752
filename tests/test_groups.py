"""Per-group metrics (worst group, largest gap) and counterfactual name swaps (`<task>+names`)."""

from __future__ import annotations

import json
import random
import sqlite3

import numpy as np
import pytest
from helpers import cli, write_experiment
from sklearn.metrics import accuracy_score, f1_score

from labscale.metrics.base import mean_of_first_column
from labscale.example import Example, Outcome
from labscale.metrics.groups import group_breakdown
from labscale.metrics.registry import get_metric


def test_breakdown_by_hand():
    stats = np.array([[1.0], [0.0], [1.0], [1.0], [0.0], [0.0], [1.0]])
    labels = ["a", "a", "b", "b", "c", "c", None]
    rows = group_breakdown(stats, mean_of_first_column, labels, higher_is_better=True, n_boot=200, seed=0)
    by = {(r["kind"], r["group"]): r for r in rows}
    assert by[("group", "a")]["value"] == 0.5 and by[("group", "a")]["n"] == 2
    assert by[("group", "b")]["value"] == 1.0 and by[("group", "c")]["value"] == 0.0
    assert by[("worst", "c")]["value"] == 0.0 and by[("worst", "c")]["n"] == 2
    assert by[("gap", "b − c")]["value"] == 1.0 and by[("gap", "b − c")]["n"] == 6  # the None row is left out
    for r in rows:
        assert r["ci_low"] <= r["value"] <= r["ci_high"]
    # constant groups have zero-width CIs; the gap CI comes from the same per-group resamples
    assert (by[("group", "b")]["ci_low"], by[("group", "b")]["ci_high"]) == (1.0, 1.0)
    assert by[("gap", "b − c")]["ci_low"] == 1.0
    # lower is better: the worst group is the highest
    rows = group_breakdown(stats, mean_of_first_column, labels, higher_is_better=False, n_boot=200, seed=0)
    assert [r["group"] for r in rows if r["kind"] == "worst"] == ["b"]


def test_breakdown_skips_undefined_groups():
    nan = float("nan")
    stats = np.array([[nan], [nan], [1.0], [0.0]])
    rows = group_breakdown(stats, get_metric("acc_norm").aggregate, ["a", "a", "b", "b"], True, n_boot=100)
    assert [r["kind"] for r in rows] == ["group", "group"]  # one defined group: no worst / gap
    assert np.isnan(rows[0]["value"]) and rows[1]["value"] == 0.5


@pytest.fixture
def grouped_experiment(tmp_path):
    rng = random.Random(1)
    lines = ["id,text,label,site"]
    facts = [("The sky is blue.", "yes"), ("Fire is cold.", "no"), ("Water is wet.", "yes"), ("Ice is hot.", "no"),
             ("Cats are animals.", "yes"), ("The sun is dark.", "no")]
    for i in range(30):
        text, label = rng.choice(facts)
        lines.append(f"r{i},{text},{label},{['north', 'south', 'east'][i % 3]}")
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    return write_experiment(
        tmp_path / "exp.yaml", name="grouped", models=["embedded:smollm2-135m-instruct"],
        tasks=[{"name": "claims", "data": "data.csv", "type": "classify", "input": "{{ text }}", "target": "label",
                "labels": ["yes", "no"], "id_column": "id", "groups": ["site"],
                "instruction": "Is the statement true? Answer with exactly one word: yes or no.",
                "split_fractions": [0.0, 0.0, 1.0]}],
        generation={"max_new_tokens": 4}, bootstrap_samples=200,
    )


@pytest.mark.slow
def test_per_group_metrics_equal_direct_computation(tmp_path, grouped_experiment, capsys, monkeypatch):
    db = tmp_path / "g.db"
    code, out, err = cli(capsys, monkeypatch, "run", grouped_experiment, "--db", db)
    assert code == 0, err
    conn = sqlite3.connect(db)
    preds = conn.execute("SELECT example_id, prediction, target FROM predictions").fetchall()
    site = {f"r{i}": ["north", "south", "east"][i % 3] for i in range(40)}
    stored = {(f, m, k, g): (v, lo, hi, n) for f, m, k, g, v, lo, hi, n in conn.execute(
        "SELECT field, metric, kind, group_name, value, ci_low, ci_high, n FROM group_scores")}
    direct = {}
    for g in ("north", "south", "east"):
        rows = [(p, t) for i, p, t in preds if site[i] == g]
        y_pred, y_true = [p for p, _ in rows], [t for _, t in rows]
        direct[g] = accuracy_score(y_true, y_pred)
        acc = stored[("site", "accuracy", "group", g)]
        assert acc[0] == pytest.approx(direct[g]) and acc[3] == len(rows)
        f1 = f1_score(y_true, y_pred, average="weighted", labels=sorted(set(y_true)), zero_division=0)
        assert stored[("site", "f1_weighted", "group", g)][0] == pytest.approx(f1)
    assert len(set(direct.values())) > 1, direct  # the check below means something only if groups differ
    worst = min(direct, key=lambda g: (direct[g], g))
    assert stored[("site", "accuracy", "worst", worst)][0] == pytest.approx(direct[worst])
    best = max(direct, key=lambda g: (direct[g], g))
    assert stored[("site", "accuracy", "gap", f"{best} − {worst}")][0] == pytest.approx(direct[best] - direct[worst])
    report = (tmp_path / "g.md").read_text()
    assert "## Values" in report and "**claims** by `site`" in report
    assert "north (n=10)" in report and f"{worst}: " in report


def test_name_swaps_are_consistent_and_drawn_from_the_group():
    from labscale.tasks.counterfactual import GROUPS, find_names, name_lists, swap_names

    names = name_lists()
    text = "John Bryant met Dr. Bryant. Later John Bryant called Maria Lopez."
    assert [(f, la) for _, _, f, la in find_names(text, names)] == [
        ("John", "Bryant"), (None, "Bryant"), ("John", "Bryant"), ("Maria", "Lopez")]
    for g in GROUPS:
        out, used = swap_names(text, g, random.Random(0), names, "Name: {name}")
        found = find_names(out, names)
        assert len(found) == 4, out
        (_, _, f1, l1), (_, _, _, l2), (_, _, f3, l3), (_, _, f4, l4) = found
        assert (f1, l1) == (f3, l3) and l2 == l1  # the same person keeps one new name, titles stay
        assert out.count("Dr. ") == 1 and "Bryant" not in out and "Lopez" not in out
        assert {f1, f4} <= set(names.first[g]) and {l1, l4} <= set(names.last[g])
        assert used == sorted({f1, l1, f4, l4})
        # nobody named: a header line with a name of the group
        plain, used = swap_names("Doctor: Any pain?", g, random.Random(0), names, "Patient name: {name}")
        first, last = plain.split("\n")[0].removeprefix("Patient name: ").split()
        assert used == [first, last]
        assert first in names.first[g] and last in names.last[g] and plain.endswith("\n\nDoctor: Any pain?")


def test_counterfactual_task_variants():
    from pathlib import Path

    from labscale.tasks import get_task

    base = get_task("mts-summarization", Path("."))
    cf = get_task("mts-summarization+names", Path("."))
    assert cf.split("train") == base.split("train") and cf.split("dev") == base.split("dev")
    test = cf.split("test")
    assert len(test) == 5 * len(base.split("test"))
    first = test[:5]
    assert [e.meta["name_group"] for e in first] == [None, "asian", "black", "hispanic", "white"]
    assert first[0].input == base.split("test")[0].input
    assert all(e.target == first[0].target and e.input.startswith("Patient name: ") for e in first[1:])
    assert all(" ".join(e.meta["names"]) in e.input for e in first[1:])
    assert len({e.input for e in first}) == 5 and len({e.group for e in first}) == 1
    assert cf.info()["group_fields"] == ["name_group"] and "name_output_change" in cf.metrics
    assert [e.input for e in get_task("mts-summarization+names", Path(".")).split("test")] == [e.input for e in test]


def test_name_output_change_by_hand():
    def ex(i, group, names=(), of="x"):
        return Example(i, "", "t", meta={"name_group": group, "counterfactual_of": of, "names": list(names)})

    outcomes = [
        Outcome(ex("x", None), "", "the answer"),  # the original: not compared with
        Outcome(ex("x~asian", "asian", ["Wei", "Chen"]), "", "Wei Chen has  pain"),
        Outcome(ex("x~black", "black", ["Jada", "Bowie"]), "", "Jada Bowie has pain"),  # same once names are masked
        Outcome(ex("x~white", "white", ["Knox", "Teal"]), "", "no pain"),
        Outcome(ex("x~hispanic", "hispanic"), "", "", failed="HTTP 500"),
        Outcome(ex("y~asian", "asian", of="y"), "", "alone"),
    ]
    metric = get_metric("name_output_change")
    stats = metric.stats(outcomes)[:, 0]
    # asian differs from white only (1 of 2 others), black likewise, white differs from both
    assert np.isnan(stats[0]) and stats[1] == 0.5 and stats[2] == 0.5 and stats[3] == 1.0
    assert np.isnan(stats[4]) and np.isnan(stats[5])
    assert metric.score(outcomes) == pytest.approx(2 / 3) and metric.family == "bias" and not metric.higher_is_better


@pytest.mark.real_model
@pytest.mark.slow
def test_counterfactual_names_on_the_embedded_model(tmp_path, capsys, monkeypatch):
    exp = write_experiment(tmp_path / "cf.yaml", name="cf", models=["embedded:smollm2-135m-instruct"],
                           tasks=["mts-summarization+names"], limit=5, generation={"max_new_tokens": 16},
                           bootstrap_samples=200)
    code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", tmp_path / "cf.db")
    assert code == 0, err
    conn = sqlite3.connect(tmp_path / "cf.db")
    groups = {g: (v, n) for g, v, n in conn.execute(
        "SELECT group_name, value, n FROM group_scores WHERE metric='rougeL' AND kind='group'")}
    assert set(groups) == {"asian", "black", "hispanic", "white"} and all(n == 1 for _, n in groups.values())
    preds = {i: json.loads(s) for i, s in conn.execute("SELECT example_id, stats_json FROM predictions")}
    for g, (value, _) in groups.items():  # equals the direct mean over that group's examples
        assert value == pytest.approx(np.mean([s["rougeL"] for i, s in preds.items() if i.endswith("~" + g)]))
    change = conn.execute("SELECT value FROM scores WHERE metric='name_output_change'").fetchone()[0]
    assert 0.0 <= change <= 1.0
    report = (tmp_path / "cf.md").read_text()
    assert "### Bias" in report and "**mts-summarization+names** by `name_group`" in report


def test_names_variant_of_an_unknown_task_is_a_one_line_error():
    from pathlib import Path

    from labscale.errors import ConfigError
    from labscale.tasks import get_task

    with pytest.raises(ConfigError, match="unknown task 'nope'") as e:
        get_task("nope+names", Path("."))
    assert "+names" in e.value.hint and "\n" not in str(e.value)
