import pytest

from labscale.errors import ConfigError, DataError
from labscale.settings.setting import (
    chat_prompt,
    check_shots,
    loglikelihood_prompt,
    parse_setting,
    protocol_for,
    select_shots,
)
from labscale.tasks.base import Task
from labscale.example import Example


def make_task(kind="classify", n=20):
    def load():
        if kind == "multiple_choice":
            return [Example(f"e{i}", f"q{i}", "b", ("a", "b"), 1) for i in range(n)]
        return [Example(f"e{i}", f"input {i}", "YES" if i % 2 else "NO") for i in range(n)]

    metrics = ["acc"] if kind == "multiple_choice" else ["accuracy"]
    return Task("toy", "toy", kind, "Decide.", metrics, metrics[0], "test", "none", load,
                labels=("YES", "NO") if kind == "classify" else ())


@pytest.mark.parametrize("name", ["zero-shot", "few-shot:3", "cot"])
def test_parse_known(name):
    assert parse_setting(name).name == name


@pytest.mark.parametrize("name", ["few-shot", "few-shot:0", "few-shot:x", "one-shot", "COT"])
def test_parse_unknown(name):
    with pytest.raises(ConfigError, match="unknown setting"):
        parse_setting(name)


def test_shots_come_from_train_only_and_are_deterministic():
    task = make_task()
    setting = parse_setting("few-shot:3")
    ex = task.split("test")[0]
    shots = select_shots(task, setting, ex, seed=0)
    assert len(shots) == 3 and all(s in task.splits["train"] for s in shots)
    assert shots == select_shots(task, setting, ex, seed=0)
    assert shots != select_shots(task, setting, ex, seed=1) or shots != select_shots(task, setting, ex, seed=2)


def test_too_many_shots_is_a_data_error():
    task = make_task(n=10)  # 6 train examples
    with pytest.raises(DataError, match="few-shot:7 needs 7 examples.*only 6.*few-shot:6"):
        check_shots(task, parse_setting("few-shot:7"))


def test_few_shot_chat_has_alternating_turns_and_cot_asks_for_answer_line():
    task = make_task()
    ex = task.split("test")[0]
    msgs = chat_prompt(task, parse_setting("few-shot:2"), ex, 0)
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
    assert msgs[-1]["content"] == f"Decide.\n\n{ex.input}"
    cot = chat_prompt(task, parse_setting("cot"), ex, 0)
    assert len(cot) == 1 and cot[0]["content"].endswith('starts with "Answer:".')


def test_loglikelihood_prompt_follows_lm_eval_format():
    task = make_task("multiple_choice")
    ex = task.split("test")[0]
    ctx, conts = loglikelihood_prompt(task, parse_setting("zero-shot"), ex, 0)
    assert ctx == ex.input and conts == [" a", " b"]
    ctx3, _ = loglikelihood_prompt(task, parse_setting("few-shot:2"), ex, 0)
    blocks = ctx3.split("\n\n")
    assert len(blocks) == 3 and blocks[0].endswith(" b") and blocks[-1] == ex.input


def test_protocols():
    mc, gen = make_task("multiple_choice"), make_task()
    assert protocol_for(mc, parse_setting("zero-shot"), True) == "loglikelihood"
    assert protocol_for(mc, parse_setting("cot"), True) == "generate"
    assert protocol_for(mc, parse_setting("zero-shot"), False) == "generate"
    assert protocol_for(gen, parse_setting("few-shot:1"), True) == "generate"
    letters = chat_prompt(mc, parse_setting("cot"), mc.split("test")[0], 0)[0]["content"]
    assert "A. a\nB. b" in letters and "(A, B)" in letters
