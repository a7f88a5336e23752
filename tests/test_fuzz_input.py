"""Property-based fuzzing of what a user can hand `labscale run`: experiment files and data files, valid-looking
and hostile. For every one: exit 0, or exit 2 with exactly one `error:` line and no traceback — and an existing
database is byte-identical after a refusal. The example count is bounded so CI stays fast."""

from __future__ import annotations

import contextlib
import io
import shutil
import sys

import pytest
import yaml
from helpers import write_experiment

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

EXAMPLES = 120

_scalar = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["zero-shot", "few-shot:2", "cot", "few-shot:0", "few-shot:-1", "rag:3",
                                     "embedded:smollm2-135m-instruct", "openai:gpt-4o-mini", "hf:", "fact-check",
                                     "yes", "no", "", "  ", "\x00", "../../etc/passwd"]))
_value = st.recursive(_scalar, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=8)

FIELDS = ["name", "models", "tasks", "settings", "limit", "seed", "generation", "bootstrap_samples", "cost_limit",
          "adaptations"]
TASK_FIELDS = ["name", "data", "type", "input", "target", "labels", "choices", "metrics", "main_metric",
               "id_column", "split_fractions", "groups", "label_aliases", "instruction"]


def _base(model: str) -> dict:
    return {"name": "fz", "models": [model], "settings": ["zero-shot"], "limit": 2,
            "generation": {"max_new_tokens": 2}, "bootstrap_samples": 100,
            "tasks": [{"name": "t", "data": "d.csv", "type": "classify", "input": "{{ text }}", "target": "label",
                       "labels": ["a", "b"], "id_column": "id"}]}


@st.composite
def experiments(draw, model: str):
    """A valid experiment with a few fields replaced by anything, or something that is not an experiment."""
    kind = draw(st.sampled_from(["mutate", "mutate", "mutate", "task", "hostile"]))
    exp = _base(model)
    if kind == "hostile":
        return draw(st.one_of(_value, st.binary(max_size=64)))
    if kind == "task":
        task = exp["tasks"][0]
        for key in draw(st.lists(st.sampled_from(TASK_FIELDS + ["bogus"]), min_size=1, max_size=3)):
            task[key] = draw(_value)
        return exp
    for key in draw(st.lists(st.sampled_from(FIELDS + ["bogus"]), min_size=1, max_size=3)):
        if draw(st.booleans()):
            exp.pop(key, None)
        else:
            exp[key] = draw(_value)
    return exp


_cell = st.one_of(st.text(max_size=10), st.sampled_from(["a", "b", "", "NaN", "\n", '"', ",", "\x00"]))
data_files = st.one_of(
    st.lists(st.tuples(_cell, _cell, _cell), max_size=6).map(
        lambda rows: "id,text,label\n" + "".join(f"{i},{t},{label}\n" for i, t, label in rows)),
    st.binary(max_size=80).map(lambda b: b.decode("latin-1")),
    st.just("id,text,label\n1,x,a\n1,y,b\n2,z,a\n3,w,b\n"),  # duplicate ids
    st.just("text,label\n" + "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(12))),  # no id column
)


def _run(args: list[str]) -> tuple[int, str, str]:
    from labscale.cli import main

    out, err = io.StringIO(), io.StringIO()
    old = sys.argv
    sys.argv = ["labscale", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_llm):
    """A folder with good data, an experiment that ran, and the database it wrote (the one refusals must keep)."""
    ws = tmp_path_factory.mktemp("fuzz")
    rows = "".join(f"r{i},patient {i} feels {'ab'[i % 2]},{'ab'[i % 2]}\n" for i in range(20))
    (ws / "d.csv").write_text("id,text,label\n" + rows)
    exp = write_experiment(ws / "good.yaml", **_base(f"hf:{tiny_llm}"))
    code, _, err = _run(["run", str(exp), "--db", str(ws / "base.db")])
    assert code == 0, err
    return ws, f"hf:{tiny_llm}"


def _check(ws, code: int, err: str, db, before: bytes) -> None:
    assert "Traceback" not in err, err
    if code == 0:
        return
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and err.count("\n") == err.rstrip("\n").count("\n") + 1, (code, err)
    assert lines[0] == err.strip().splitlines()[-1]  # the error is the last thing printed
    assert db.read_bytes() == before, "a refused run changed the database"


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@pytest.mark.slow
@given(data=st.data())
def test_fuzzed_experiment_files_exit_cleanly(workspace, data):
    ws, model = workspace
    exp = data.draw(experiments(model))
    path = ws / "fuzz.yaml"
    if isinstance(exp, bytes):
        path.write_bytes(exp)
    else:
        path.write_text(yaml.safe_dump(exp, allow_unicode=True))
    db = ws / "fz.db"
    shutil.copy(ws / "base.db", db)
    before = db.read_bytes()
    code, out, err = _run(["run", str(path), "--db", str(db)])
    _check(ws, code, err, db, before)


@settings(max_examples=EXAMPLES // 2, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@pytest.mark.slow
@given(content=data_files)
def test_fuzzed_data_files_exit_cleanly(workspace, content):
    ws, model = workspace
    sub = ws / "data-fuzz"
    sub.mkdir(exist_ok=True)
    (sub / "d.csv").write_text(content, encoding="utf-8", errors="surrogateescape")
    exp = write_experiment(sub / "exp.yaml", **_base(model))
    db = sub / "fz.db"
    shutil.copy(ws / "base.db", db)
    before = db.read_bytes()
    code, out, err = _run(["run", str(exp), "--db", str(db)])
    _check(ws, code, err, db, before)
