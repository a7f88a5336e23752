"""A user's own data (issue 11): long inputs cut by an explicit max_input_tokens, data split by files or a column,
a warning for a max_new_tokens far below the references, progress off a terminal, "did you mean", one-line usage
errors, and reports written with the user's umask."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import stat

import pytest
from helpers import cli, dump, write_experiment

from labscale.config import TaskSpec, parse_experiment
from labscale.errors import ConfigError, DataError, ModelError
from labscale.settings.truncate import MARKERS, cut_text
from labscale.tasks.registry import get_task

WORDS = "doctor patient pain fever cough since yesterday chest knee back the a and reports".split()


def words(n: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path.name


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


# -- truncation: the algorithm ---------------------------------------------------------------------------------

def count_words(text: str) -> int:
    return len(text.split())


@pytest.mark.parametrize("strategy", ["middle", "end"])
def test_cut_text_keeps_within_the_limit_with_a_visible_marker(strategy):
    text = " ".join(f"w{i}" for i in range(100))
    cut = cut_text(text, 10, strategy, count_words)
    assert count_words(cut) <= 10 and MARKERS[strategy].strip() in cut
    assert cut.startswith("w0 w1 w2")
    if strategy == "middle":
        assert cut.endswith("w98 w99") and cut.index("[…]") > 0
    else:
        assert cut.endswith("[…]")
    assert cut_text("short text", 10, strategy, count_words) is None  # what fits is left exactly as it is


def test_cut_text_is_tight_and_never_splits_words_when_it_can_help_it():
    text = words(3000, 0)
    cut = cut_text(text, 200, "middle", count_words)
    assert 195 <= count_words(cut) <= 200  # uses the room (binary search), never more
    head, tail = cut.split(" […] ")
    assert text.startswith(head) and text.endswith(tail)
    assert all(w in WORDS for w in head.split() + tail.split())  # whole words only


def test_cut_text_by_characters():
    cut = cut_text("abcdefghij" * 10, 20, "middle", len)
    assert len(cut) <= 20 and cut.startswith("abcd") and cut.endswith("ghij")


# -- truncation: options in the experiment file ------------------------------------------------------------------

BASE = {"name": "x", "models": ["embedded:smollm2-135m-instruct"], "tasks": ["fact-check"]}


def user_spec(**kw) -> dict:
    return {"name": "notes", "data": "notes.jsonl", "type": "generate", "input": "{{ dialogue }}", "target": "note",
            "instruction": "Write the clinical note.", **kw}


def test_builtin_task_entry_with_options_and_task_defaults(tmp_path):
    exp = parse_experiment({**BASE, "tasks": [{"name": "fact-check", "max_input_tokens": 64},
                                              "mts-summarization"],
                            "task_defaults": {"truncate": "end"}})
    assert exp.task_options("fact-check").model_dump() == {"max_input_tokens": 64, "truncate": "end"}
    assert exp.task_options("mts-summarization").max_input_tokens is None
    task = get_task(exp.tasks[0], tmp_path, exp.tasks, exp.task_options("fact-check"))
    assert (task.name, task.max_input_tokens, task.truncate) == ("fact-check", 64, "end")
    assert task.info()["max_input_tokens"] == 64
    # a default for every task; an entry's own value wins
    exp = parse_experiment({**BASE, "tasks": ["fact-check", {"name": "mts-summarization", "max_input_tokens": 9}],
                            "task_defaults": {"max_input_tokens": 512}})
    assert exp.task_options("fact-check").max_input_tokens == 512
    assert exp.task_options("mts-summarization").max_input_tokens == 9


def test_new_fields_leave_old_config_hashes_alone():
    before = parse_experiment({**BASE, "tasks": ["fact-check", user_spec()]}).config_hash()
    assert before == "9716915edfa1552d"  # the hash this experiment had before the fields existed
    assert parse_experiment({**BASE, "tasks": ["fact-check", user_spec(max_input_tokens=5)]}).config_hash() != before


@pytest.mark.parametrize("patch, match", [
    ({"tasks": [{"name": "fact-check", "max_input_token": 5}]},
     "unknown key 'max_input_token' at 'tasks.0' — did you mean 'max_input_tokens'"),
    ({"tasks": [{"name": "fact-check", "max_input_tokens": 0}]}, "tasks.0.max_input_tokens"),
    ({"tasks": [{"name": "fact-check", "truncate": "start", "max_input_tokens": 5}]}, "tasks.0.truncate"),
    ({"tasks": [{"name": "fact-check", "truncate": "end"}]}, "sets `truncate` without `max_input_tokens`"),
    ({"task_defaults": {"truncate": "end"}}, "no task has `max_input_tokens`"),
])
def test_bad_truncation_options(patch, match):
    with pytest.raises(ConfigError, match=match):
        parse_experiment({**BASE, **patch})


@pytest.fixture(scope="module")
def long_notes(tmp_path_factory):
    """A folder with notes.jsonl: 10 dialogues, the even ones far longer than the tiny model's 512-token context,
    and long notes (so a tiny max_new_tokens is flagged)."""
    folder = tmp_path_factory.mktemp("long-notes")
    jsonl(folder / "notes.jsonl", [{"id": f"d{i}", "dialogue": words(900 if i % 2 == 0 else 20, i),
                                    "note": words(80, 100 + i)} for i in range(10)])
    return folder


def test_without_max_input_tokens_the_context_error_counts_and_names_the_misfits(long_notes, tiny_llm, capsys,
                                                                                 monkeypatch):
    exp = write_experiment(long_notes / "nolimit.yaml", name="nolimit", models=[f"hf:{tiny_llm}"],
                           tasks=[user_spec(split_fractions=[0.0, 0.0, 1.0], id_column="id")],
                           generation={"max_new_tokens": 4})
    db = long_notes / "nolimit.db"
    code, _, err = cli(capsys, monkeypatch, "run", exp, "--db", db)
    line = one_line(err)
    assert code == 2 and not db.exists()
    assert "5 of 10 examples of task 'notes' (zero-shot) do not fit" in line and "context of 512" in line
    assert line.count("'d") == 3 and "… (2 more)" in line  # the first few by name
    assert "set `max_input_tokens: " in line


@pytest.mark.slow
def test_max_input_tokens_end_to_end(long_notes, tiny_llm, capsys, monkeypatch):
    exp = write_experiment(long_notes / "limit.yaml", name="limit", models=[f"hf:{tiny_llm}"],
                           tasks=[user_spec(split_fractions=[0.0, 0.0, 1.0], id_column="id", max_input_tokens=150)],
                           generation={"max_new_tokens": 2})
    db = long_notes / "limit.db"
    code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", db)
    assert code == 0, err
    # the output budget: a warning on stderr ...
    assert "warning: task 'notes': max_new_tokens=2 is under a quarter of the median reference length" in err
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    run = conn.execute("SELECT id, task_json FROM runs").fetchone()
    info = json.loads(run["task_json"])
    assert info["input_limit"] == {"max_input_tokens": 150, "truncate": "middle", "truncated": 5, "of": 10}
    assert info["output_budget"]["max_new_tokens"] == 2 and info["output_budget"]["median_target_tokens"] > 8
    prompts = [r["prompt"] for r in conn.execute("SELECT prompt FROM predictions")]
    conn.close()
    assert sum(" […] " in p for p in prompts) == 5
    assert all("Write the clinical note." in p and p.endswith("<|im_start|>assistant\n") for p in prompts)
    # ... and the report, rebuilt from the database alone, shows both next to the task's scores
    os.remove(long_notes / "limit.md")
    code, out, err = cli(capsys, monkeypatch, "report", "--db", db)
    report = (long_notes / "limit.md").read_text()
    assert code == 0 and "5 of 10 inputs truncated (max_input_tokens=150, cut at the middle)" in report
    assert "**warning** — max_new_tokens=2 is under a quarter of the median reference length" in report
    section = report.split("### notes", 1)[1]
    assert "5 of 10 inputs truncated" in section.split("| model |")[0]  # right above the task's metric table
    # the option is part of the run id: another limit is another run
    exp2 = write_experiment(long_notes / "limit2.yaml", name="limit", models=[f"hf:{tiny_llm}"],
                            tasks=[user_spec(split_fractions=[0.0, 0.0, 1.0], id_column="id", max_input_tokens=140)],
                            generation={"max_new_tokens": 2})
    from labscale.config import load_experiment
    from labscale.experiment import validate

    ids = {validate(load_experiment(p)).plans[0].id for p in (exp, exp2)}
    assert len(ids) == 2 and run["id"] in ids


def test_no_budget_warning_when_max_new_tokens_is_enough(long_notes, tiny_llm):
    from labscale.experiment import validate, warnings

    exp = parse_experiment({"name": "ok", "models": [f"hf:{tiny_llm}"], "generation": {"max_new_tokens": 200},
                            "tasks": [user_spec(split_fractions=[0.0, 0.0, 1.0], max_input_tokens=150)]},
                           base_dir=long_notes)
    plans = validate(exp).plans
    assert plans[0].output_budget is None and warnings(plans) == []
    assert "output_budget" not in plans[0].record()["task_info"]


def test_few_shot_demonstrations_are_cut_too(long_notes, tiny_llm):
    from labscale.experiment import validate

    exp = parse_experiment({"name": "fs", "models": [f"hf:{tiny_llm}"], "settings": ["few-shot:1"],
                            "generation": {"max_new_tokens": 4}, "limit": 3,
                            "tasks": [user_spec(split_fractions=[0.5, 0.0, 0.5], max_input_tokens=100)]},
                           base_dir=long_notes)
    plan = validate(exp).plans[0]
    assert all(it.tokens < 512 for it in plan.items)
    assert all(it.prompt.count("<|im_start|>user") == 2 for it in plan.items)


# -- splits named by the data ---------------------------------------------------------------------------------

def rows(prefix: str, n: int, **extra) -> list[dict]:
    return [{"text": f"{prefix} text {i}", "label": f"{prefix} {i}", **extra} for i in range(n)]


def spec(**kw) -> TaskSpec:
    return TaskSpec(**{"name": "mine", "type": "generate", "input": "{{ text }}", "target": "label", **kw})


def test_one_file_per_split(tmp_path):
    jsonl(tmp_path / "a.jsonl", rows("train", 5))
    jsonl(tmp_path / "b.jsonl", rows("dev", 2))
    jsonl(tmp_path / "c.jsonl", rows("test", 3))
    task = get_task(spec(data={"train": "a.jsonl", "dev": "b.jsonl", "test": "c.jsonl"}), tmp_path)
    assert task.info()["splits"] == {"train": 5, "dev": 2, "test": 3}
    assert {e.target.split()[0] for e in task.splits["train"]} == {"train"}
    assert sorted(e.id for e in task.split("test")) == ["test-0", "test-1", "test-2"]  # default ids: split-row
    assert "train: a.jsonl" in task.source
    again = get_task(spec(data={"train": "a.jsonl", "dev": "b.jsonl", "test": "c.jsonl"}), tmp_path)
    assert [e.id for e in again.split("test")] == [e.id for e in task.split("test")]  # seeded order


def test_test_only_file_is_fine_for_zero_shot_and_few_shot_names_the_missing_split(tmp_path):
    from labscale.settings.setting import check_shots, parse_setting

    jsonl(tmp_path / "c.jsonl", rows("test", 3))
    task = get_task(spec(data={"test": "c.jsonl"}), tmp_path)
    assert len(task.split("test")) == 3
    check_shots(task, parse_setting("zero-shot"))
    with pytest.raises(DataError, match="few-shot:2 needs 2 examples but task 'mine' has no train split") as e:
        check_shots(task, parse_setting("few-shot:2"))
    assert "data: {train:" in e.value.hint and "few-shot:0" not in str(e.value)
    with pytest.raises(DataError, match="empty dev split") as e:
        task.split("dev")
    assert "add a dev file under `data:`" in e.value.hint


def test_split_column_with_synonyms(tmp_path):
    data = rows("a", 3, split="train") + rows("b", 2, split="Validation") + rows("c", 2, split="val") + \
        rows("d", 4, split=" TEST ")
    jsonl(tmp_path / "all.jsonl", data)
    task = get_task(spec(data="all.jsonl", split_column="split"), tmp_path)
    assert task.info()["splits"] == {"train": 3, "dev": 4, "test": 4}
    assert task.info()["split_by"] == "data"


def test_split_errors(tmp_path):
    jsonl(tmp_path / "all.jsonl", rows("a", 2, split="train") + rows("b", 1, split="holdout"))
    with pytest.raises(DataError, match=r"row 2: split column 'split' holds 'holdout', which is not a split"):
        get_task(spec(data="all.jsonl", split_column="split"), tmp_path).examples
    with pytest.raises(DataError, match="the split_column names column 'splt'.*did you mean 'split'"):
        get_task(spec(data="all.jsonl", split_column="splt"), tmp_path).examples
    jsonl(tmp_path / "a.jsonl", [{"id": "x", "text": "t", "label": "l"}])
    jsonl(tmp_path / "b.jsonl", [{"id": "x", "text": "t", "label": "l"}])
    with pytest.raises(DataError, match="id 'x' appears in train file 'a.jsonl' row 0 and test file 'b.jsonl' row 0"):
        get_task(spec(data={"train": "a.jsonl", "test": "b.jsonl"}, id_column="id"), tmp_path).examples
    with pytest.raises(ConfigError, match="splits its data two ways"):
        parse_experiment({**BASE, "tasks": [{**user_spec(), "split_column": "s", "split_fractions": [0.5, 0.2, 0.3]}]})
    with pytest.raises(ConfigError, match="unknown key 'tset' at 'tasks.0.data' — did you mean 'test'"):
        parse_experiment({**BASE, "tasks": [{**user_spec(), "data": {"tset": "a.csv"}}]})
    with pytest.raises(ConfigError, match="names no file"):
        parse_experiment({**BASE, "tasks": [{**user_spec(), "data": {}}]})


# -- progress off a terminal, and the estimate up front ------------------------------------------------------

@pytest.mark.slow
def test_plain_progress_lines_and_the_request_estimate(tmp_path, tiny_llm, capsys, monkeypatch):
    jsonl(tmp_path / "n.jsonl", [{"text": f"patient {i} reports pain", "label": "pain"} for i in range(6)])
    exp = write_experiment(tmp_path / "p.yaml", name="p", models=[f"hf:{tiny_llm}"], settings=["zero-shot", "cot"],
                           tasks=[{"name": "n", "data": "n.jsonl", "type": "generate", "input": "{{ text }}",
                                   "target": "label", "split_fractions": [0, 0, 1]}],
                           generation={"max_new_tokens": 2, "cot_max_new_tokens": 2})
    code, _, err = cli(capsys, monkeypatch, "run", exp, "--db", tmp_path / "p.db")
    assert code == 0, err
    assert "evaluate: 2 runs, 12 requests (0 cached, 12 to make)" in err
    assert f"evaluate [1/2] hf:{tiny_llm} · n · zero-shot: 0/6 examples, starting" in err
    assert f"evaluate [2/2] hf:{tiny_llm} · n · cot: 6/6 examples, done in" in err
    code, _, err = cli(capsys, monkeypatch, "run", exp, "--db", tmp_path / "p.db")
    assert "evaluate: 2 runs, 12 requests (12 cached, 0 to make)" in err
    assert f"evaluate [1/2] hf:{tiny_llm} · n · zero-shot (stored): 6/6 examples" in err


def test_plain_progress_prints_rate_and_eta_periodically(monkeypatch):
    from rich.console import Console

    from labscale.engine import runner

    clock = iter(range(0, 1000, 10))
    monkeypatch.setattr(runner.time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(runner, "PLAIN_INTERVAL_S", 25)
    console = Console(record=True, width=60)
    with runner.PlainProgress(console, 3) as p:
        bar = p.add_task("m · t · zero-shot", total=100)  # t=0
        p.advance(bar, 0)   # t=10: the cache held nothing
        p.advance(bar, 10)  # t=20: 20 s since the last line, quiet
        p.advance(bar, 10)  # t=30: a line; 20 made in the 20 s since the cache's share → 1/s, 80 left
        p.advance(bar, 80)  # t=40
    lines = console.export_text().splitlines()
    assert lines == ["evaluate [1/3] m · t · zero-shot: 0/100 examples, starting",
                     "evaluate [1/3] m · t · zero-shot: 20/100 examples (1.00/s, ETA 1m20s)",
                     "evaluate [1/3] m · t · zero-shot: 100/100 examples, done in 40s"]


def test_a_terminal_keeps_the_rich_bar(tmp_path, tiny_llm):
    from rich.console import Console

    from labscale.engine import runner

    console = Console(force_terminal=True)
    seen = []

    class Spy(runner.Progress):
        def __init__(self, *a, **kw):
            seen.append(type(self))
            super().__init__(*a, **kw)

    r = runner.Runner.__new__(runner.Runner)
    r.console = console
    orig = runner.Progress
    runner.Progress = Spy
    try:
        r.run_all([])
    finally:
        runner.Progress = orig
    assert seen == [Spy]


# -- did you mean ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("patch, match", [
    ({"setings": ["cot"]}, "unknown key 'setings' — did you mean 'settings'"),
    ({"models": [{"id": "openai:x", "api_key": "A"}]}, "unknown key 'api_key' at 'models.0' — did you mean 'api_key_env'"),
    ({"generation": {"max_new_token": 3}}, "at 'generation' — did you mean 'max_new_tokens'"),
    ({"tasks": [{**user_spec(), "instrution": "x"}]}, "unknown key 'instrution' at 'tasks.0' — did you mean 'instruction'"),
    ({"tasks": [{**user_spec(), "zzz": 1}]}, "unknown key 'zzz' at 'tasks.0' — keys allowed here: max_input_tokens"),
])
def test_unknown_keys_suggest_the_closest_allowed_key(patch, match):
    with pytest.raises(ConfigError, match=match):
        parse_experiment({**BASE, **patch})


def test_unknown_names_suggest_the_closest(tmp_path):
    from labscale.metrics.registry import get_metric
    from labscale.models.embedded import _get
    from labscale.settings.setting import parse_setting

    with pytest.raises(ConfigError, match="did you mean 'mts-summarization'"):
        get_task("mts-sumarization", tmp_path)
    with pytest.raises(ConfigError, match="did you mean 'rougeL'"):
        get_metric("rouge-l")
    for name, guess in (("two-shot", "few-shot:2"), ("fewshot:3", "few-shot:3"), ("zeroshot", "zero-shot"),
                        ("COT", "cot"), ("few-shot:0", "zero-shot")):
        with pytest.raises(ConfigError, match=f"did you mean '{guess}'"):
            parse_setting(name)
    with pytest.raises(ConfigError, match="did you mean 'embedded:smollm2-135m-instruct'"):
        _get("smollm2-135m")


# -- bad input through the CLI: one line, exit 2, the database untouched ---------------------------------------

@pytest.fixture(scope="module")
def existing_db(tmp_path_factory, tiny_llm):
    from _pytest.monkeypatch import MonkeyPatch

    from labscale.cli import main

    folder = tmp_path_factory.mktemp("existing")
    exp = write_experiment(folder / "good.yaml", name="good", models=[f"hf:{tiny_llm}"], tasks=["fact-check"],
                           limit=2, generation={"max_new_tokens": 2})
    mp = MonkeyPatch()
    mp.setattr("sys.argv", ["labscale", "run", str(exp), "--db", str(folder / "good.db")])
    try:
        main()
    except SystemExit as e:
        assert not e.code
    finally:
        mp.undo()
    return folder / "good.db"


BAD = {
    "few-shot on a test-only task": (
        {"settings": ["few-shot:1"], "tasks": [{**user_spec(), "data": {"test": "c.jsonl"}}]}, "has no train split"),
    "unknown split value": (
        {"tasks": [{**user_spec(), "data": "s.jsonl", "split_column": "split"}]}, "which is not a split"),
    "misspelt key": ({"taks": ["fact-check"]}, "did you mean 'tasks'"),
    "misspelt task": ({"tasks": ["fact-chek"]}, "did you mean 'fact-check'"),
    "misspelt setting": ({"settings": ["3-shot"]}, "did you mean 'few-shot:3'"),
    "misspelt embedded model": ({"models": ["embedded:smollm2"]}, "did you mean 'embedded:smollm2-135m-instruct'"),
    "misspelt option": ({"tasks": [{"name": "fact-check", "max_input_tokes": 3}]}, "did you mean 'max_input_tokens'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_user_data_is_one_line(case, tmp_path, tiny_llm, existing_db, capsys, monkeypatch):
    patch, expected = BAD[case]
    jsonl(tmp_path / "c.jsonl", [{"dialogue": "d", "note": "n"}])
    jsonl(tmp_path / "s.jsonl", [{"dialogue": "d", "note": "n", "split": "heldout"}])
    before = dump(existing_db)
    exp = write_experiment(tmp_path / "bad.yaml", **{"name": "good", "models": [f"hf:{tiny_llm}"],
                                                     "tasks": ["fact-check"], "limit": 2, **patch})
    code, out, err = cli(capsys, monkeypatch, "run", exp, "--db", existing_db)
    line = one_line(err)
    assert code == 2 and expected in line and " — " in line, err
    assert dump(existing_db) == before


@pytest.mark.parametrize("args, expected", [
    (["run", "x.yaml", "--limit", "abc"], "error: invalid value for --limit: input should be a valid integer"),
    (["run", "x.yaml", "--limit", "0"], "error: invalid value for --limit: input should be greater than or equal"),
    (["run"], "error: missing argument 'file' — see `labscale run --help`"),
    (["run", "x.yaml", "--limt", "3"], "error: unknown option --limt for `labscale run` — did you mean --limit?"),
    (["runn"], "error: unknown command 'runn' — did you mean 'run'?"),
    (["report", "--db"], "error: option '--db' requires an argument"),
    (["serve", "--model", "m", "--port", "99999"], "error: invalid value for --port"),
    (["run", "a.yaml", "b.yaml"], "error: got unexpected extra argument(s) (b.yaml)"),
])
def test_usage_errors_are_one_line(args, expected, capsys, monkeypatch):
    code, out, err = cli(capsys, monkeypatch, *args)
    assert code == 2 and one_line(err).startswith(expected), err
    assert "Usage:" not in err + out and "╭" not in err + out


def test_help_still_works(capsys, monkeypatch):
    code, out, err = cli(capsys, monkeypatch, "run", "--help")
    assert code == 0 and "experiment YAML file" in out


# -- permissions -----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_report_is_written_with_the_users_umask(tmp_path, tiny_llm, capsys, monkeypatch):
    exp = write_experiment(tmp_path / "u.yaml", name="u", models=[f"hf:{tiny_llm}"], tasks=["fact-check"], limit=1,
                           generation={"max_new_tokens": 1})
    old = os.umask(0o027)
    try:
        code, _, err = cli(capsys, monkeypatch, "run", exp, "--db", tmp_path / "u.db")
        assert code == 0, err
        assert stat.S_IMODE((tmp_path / "u.md").stat().st_mode) == 0o640
        code, _, _ = cli(capsys, monkeypatch, "report", "--db", tmp_path / "u.db", "--out", tmp_path / "r.md")
        assert code == 0 and stat.S_IMODE((tmp_path / "r.md").stat().st_mode) == 0o640
    finally:
        os.umask(old)


# -- the real embedded model ------------------------------------------------------------------------------------

@pytest.mark.real_model
@pytest.mark.slow
def test_truncation_on_the_embedded_model(tmp_path):
    """SmolLM2's own tokenizer counts: an input of ~3000 words cut to 256 tokens, head and tail kept."""
    from labscale.experiment import validate

    jsonl(tmp_path / "long.jsonl", [{"dialogue": words(9000, 1), "note": "n"}, {"dialogue": "short one", "note": "n"}])
    exp = parse_experiment({"name": "real", "models": ["embedded:smollm2-135m-instruct"],
                            "tasks": [{"name": "long", "data": {"test": "long.jsonl"}, "type": "generate",
                                       "input": "{{ dialogue }}", "target": "note", "max_input_tokens": 256,
                                       "truncate": "middle"}]}, base_dir=tmp_path)
    plan = validate(exp).plans[0]
    long_item = next(it for it in plan.items if it.truncated)
    assert sum(it.truncated for it in plan.items) == 1 and plan.backend.count_tokens(long_item.example.input) > 8192
    body = long_item.prompt.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
    assert 240 <= plan.backend.count_tokens(body) <= 256
    head, tail = body.split(" […] ")
    assert long_item.example.input.startswith(head) and long_item.example.input.endswith(tail)
    assert plan.input_limit() == {"max_input_tokens": 256, "truncate": "middle", "truncated": 1, "of": 2}
    with pytest.raises(ModelError, match="1 of 2 examples"):  # without the option it does not fit SmolLM2's context
        validate(parse_experiment({"name": "real", "models": ["embedded:smollm2-135m-instruct"],
                                   "tasks": [{"name": "long", "data": {"test": "long.jsonl"}, "type": "generate",
                                              "input": "{{ dialogue }}", "target": "note"}]}, base_dir=tmp_path))


def test_ctrl_c_says_how_to_resume(capsys, monkeypatch):
    import labscale.experiment

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(labscale.experiment, "run_experiment", interrupted)
    code, _, err = cli(capsys, monkeypatch, "run", "x.yaml")
    assert code == 130 and one_line(err) == ("error: interrupted; finished work is stored — run the same command "
                                             "again to resume")
