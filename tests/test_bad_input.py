"""Every bad input gives a one-line error naming cause and fix, exit code 2, no traceback, and leaves an existing
database unchanged."""

from __future__ import annotations

import pytest
from helpers import cli, dump, write_experiment


@pytest.fixture(scope="module")
def base(tiny_llm):
    return {"name": "bad", "models": [f"hf:{tiny_llm}"], "tasks": ["fact-check"], "settings": ["zero-shot"],
            "limit": 2, "generation": {"max_new_tokens": 4}}


@pytest.fixture(scope="module")
def finished_db(tmp_path_factory, base):
    """A database holding one finished experiment (made once; each test gets its own copy)."""
    tmp = tmp_path_factory.mktemp("finished")
    path = tmp / "existing.db"
    exp = write_experiment(tmp / "good.yaml", **base)
    with pytest.MonkeyPatch.context() as mp:
        code, _, err = cli(_NoCapture(), mp, "run", exp, "--db", path)
    assert code == 0, err
    return path


class _NoCapture:
    """capsys for a module-scoped fixture: nothing to read back."""

    def readouterr(self):
        return "", ""


@pytest.fixture
def db(tmp_path, finished_db):
    """A copy of a database holding one finished experiment."""
    import shutil

    path = tmp_path / "existing.db"
    shutil.copy(finished_db, path)
    return path


def csv(tmp_path, text, name="data.csv"):
    (tmp_path / name).write_text(text)
    return name


def user_task(**kw):
    return {"name": "mine", "data": "data.csv", "type": "generate", "input": "{{ text }}", "target": "label", **kw}


CASES = {
    "unknown task": (lambda t, b: {**b, "tasks": ["summarise-everything"]}, "unknown task 'summarise-everything'"),
    "unknown model": (lambda t, b: {**b, "models": ["gpt5:big"]}, "unknown model 'gpt5:big'"),
    "missing local model": (lambda t, b: {**b, "models": [f"hf:{t}/no-such-model"]}, "no-such-model"),
    "unknown embedded model": (lambda t, b: {**b, "models": ["embedded:giant-70b"]}, "giant-70b"),
    "unknown setting": (lambda t, b: {**b, "settings": ["two-shot"]}, "unknown setting 'two-shot'"),
    "unknown metric": (
        lambda t, b: {**b, "tasks": [user_task(metrics=["rouge9"])]} if csv(t, "text,label\na,b\n") else None,
        "unknown metric 'rouge9'"),
    "missing user data file": (lambda t, b: {**b, "tasks": [user_task(data="nope.csv")]}, "nope.csv"),
    "missing template column": (
        lambda t, b: {**b, "tasks": [user_task(input="{{ body }}")]} if csv(t, "text,label\na,b\n") else None,
        "body"),
    "missing target column": (
        lambda t, b: {**b, "tasks": [user_task(target="gold")]} if csv(t, "text,label\na,b\n") else None, "gold"),
    "empty dataset": (lambda t, b: {**b, "tasks": [user_task()]} if csv(t, "text,label\n") else None, "no rows"),
    "too many shots": (lambda t, b: {**b, "settings": ["few-shot:5000"]}, "few-shot:5000 needs 5000 examples"),
    "prompt longer than context": (
        lambda t, b: {**b, "tasks": [user_task()]} if csv(t, "text,label\n" + ("word " * 3000 + ",x\n") * 10) else None,
        "context of 512"),
    "negative limit": (lambda t, b: {**b, "limit": -1}, "limit"),
    # values that used to pass validation and crash after generating
    "negative seed": (lambda t, b: {**b, "seed": -1}, "at 'seed'"),
    "seed beyond 64 bits": (lambda t, b: {**b, "seed": 2**63}, "at 'seed'"),
    "huge bootstrap": (lambda t, b: {**b, "bootstrap_samples": 10**8}, "at 'bootstrap_samples'"),
    "infinite temperature": (lambda t, b: {**b, "generation": {"temperature": float("inf")}}, "finite number"),
    "vanishing temperature": (lambda t, b: {**b, "generation": {"temperature": 1e-100}}, "too small to sample"),
    "empty stop string": (lambda t, b: {**b, "generation": {"stop": [""]}}, "empty stop string"),
    "few-shot without a train split": (
        lambda t, b: {**b, "settings": ["few-shot:1"], "tasks": [user_task(split_fractions=[0, 0, 1])]}
        if csv(t, "text,label\na,b\nc,d\n") else None, "has no train split — use zero-shot"),
    "a task mapping with a wrong field type": (
        lambda t, b: {**b, "tasks": [user_task(labels="yes")]} if csv(t, "text,label\na,b\n") else None,
        "at 'tasks.0.labels'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_experiment(case, tmp_path, base, db, capsys, monkeypatch):
    make, expected = CASES[case]
    before = dump(db)
    exp = write_experiment(tmp_path / "bad.yaml", **make(tmp_path, base))
    code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", db)
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert "Traceback" not in err and " — " in lines[0]  # cause — fix
    assert dump(db) == before


def test_malformed_yaml_and_missing_file(tmp_path, db, capsys, monkeypatch):
    before = dump(db)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodels: [a\n")
    for path, expected in ((bad, "malformed YAML"), (tmp_path / "absent.yaml", "does not exist")):
        code, _, err = cli(capsys, monkeypatch, "run", path, "--db", db)
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1
    assert dump(db) == before


def test_odd_experiment_paths_and_encodings(tmp_path, db, capsys, monkeypatch):
    before = dump(db)
    (tmp_path / "binary.yaml").write_bytes(bytes(range(256)))
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (tmp_path / "dup.yaml").write_text("name: a\nmodels: [x]\nname: b\n")
    folder = tmp_path / "afolder"
    folder.mkdir()
    for path, expected in ((tmp_path / "binary.yaml", "binary file"), (tmp_path / "latin1.yaml", "not UTF-8"),
                           (folder, "is a folder"), (tmp_path / "dup.yaml", "duplicate key 'name' at line 3")):
        code, _, err = cli(capsys, monkeypatch, "run", path, "--db", db)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and expected in lines[0] and "Traceback" not in err, err
    assert dump(db) == before


@pytest.mark.slow
def test_yaml_11_booleans_and_numbers_are_the_labels_written(tmp_path, base, capsys, monkeypatch):
    (tmp_path / "yn.csv").write_text("text,label\n" + "".join(f"t{i},{'yes' if i % 2 else 'no'}\n" for i in range(9)))
    (tmp_path / "01.csv").write_text("text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(9)))
    exp = tmp_path / "labels.yaml"
    exp.write_text(f"name: lab\nmodels: [{base['models'][0]}]\nlimit: 2\ngeneration: {{max_new_tokens: 2}}\n"
                   "tasks:\n"
                   "  - {name: yn, data: yn.csv, type: classify, input: '{{ text }}', target: label, labels: [yes, no]}\n"
                   "  - {name: bits, data: 01.csv, type: classify, input: '{{ text }}', target: label, labels: [0, 1]}\n")
    code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", tmp_path / "lab.db")
    assert code == 0, err
    import sqlite3

    labels = [row[0] for row in sqlite3.connect(tmp_path / "lab.db").execute("SELECT task_json FROM runs")]
    assert any('"labels": ["yes", "no"]' in x for x in labels) and any('"labels": ["0", "1"]' in x for x in labels)


def test_report_out_and_foreign_databases(tmp_path, base, db, capsys, monkeypatch):
    import sqlite3

    for out, expected in ((tmp_path / "nope" / "r.md", "does not exist"), (tmp_path, "is a folder")):
        code, _, err = cli(capsys, monkeypatch, "report", "--db", db, "--out", out)
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE users (id INTEGER)")
    conn.commit()
    conn.close()
    before = other.read_bytes()
    exp = write_experiment(tmp_path / "good2.yaml", **base)
    code, _, err = cli(capsys, monkeypatch, "run", exp, "--db", other)
    assert code == 2 and "another program" in err and len(err.strip().splitlines()) == 1, err
    assert other.read_bytes() == before
    code, _, err = cli(capsys, monkeypatch, "run", exp, "--db", tmp_path)
    assert code == 2 and "is a folder" in err, err


def test_not_a_database(tmp_path, base, capsys, monkeypatch):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 100)
    exp = write_experiment(tmp_path / "good.yaml", **base)
    code, _, err = cli(capsys, monkeypatch, "run", exp, "--db", junk)
    assert code == 2 and "not a usable labscale database" in err
    assert junk.read_bytes() == b"this is not sqlite" * 100
    code, _, err = cli(capsys, monkeypatch, "report", "--db", tmp_path / "missing.db")
    assert code == 2 and "does not exist" in err
