"""The recipe table: auto selection by size / task / quantization / hardware, overrides, step counts, and the
`labscale recipes` listing."""

from __future__ import annotations

import pytest
from helpers import cli

from labscale.adapt.recipes import (
    RECIPES,
    apply_overrides,
    get_recipe,
    parse_set,
    pick_recipe,
    size_class,
    task_kind,
)
from labscale.errors import ConfigError


@pytest.mark.parametrize("keys, expected", [
    (("tiny", "generate", "none", "cpu"), "cpu-tiny-lora"),
    (("tiny", "short", "none", "cpu"), "cpu-tiny-lora-short"),
    (("tiny", "generate", "4bit", "cpu"), "cpu-tiny-qlora"),
    (("tiny", "short", "4bit", "cpu"), "cpu-tiny-qlora"),
    (("7b", "generate", "4bit", "t4"), "t4-7b-qlora"),
    (("7b", "short", "none", "a100"), "a100-7b-lora"),
    (("13b", "generate", "4bit", "a100"), "a100-13b-qlora"),
    (("small", "generate", "4bit", "t4"), "t4-small-qlora"),
])
def test_auto_picks_the_most_specific_match(keys, expected):
    assert pick_recipe("auto", *keys).name == expected


@pytest.mark.parametrize("keys", [("small", "generate", "none", "cpu"), ("7b", "generate", "none", "t4"),
                                  ("13b", "short", "none", "a100")])
def test_no_matching_recipe_is_a_one_line_error(keys):
    with pytest.raises(ConfigError, match=f"no recipe for a {keys[0]} model") as e:
        pick_recipe("auto", *keys)
    assert "--recipe" in str(e.value) and "\n" not in str(e.value)


def test_named_recipes_and_unknown_names():
    assert pick_recipe("t4-7b-qlora", "tiny", "generate", "none", "cpu").name == "t4-7b-qlora"
    with pytest.raises(ConfigError, match="unknown recipe 'x'"):
        get_recipe("x")
    assert len({r.name for r in RECIPES}) == len(RECIPES)


def test_qlora_rows_follow_the_paper():
    r = get_recipe("t4-7b-qlora")
    assert (r.lora_r, r.lora_alpha, r.lora_dropout, r.learning_rate, r.max_grad_norm) == (64, 16, 0.1, 2e-4, 0.3)
    assert r.target_modules == "all-linear" and r.batch_size * r.grad_accum == 16 and r.gradient_checkpointing


def test_overrides_are_converted_and_validated():
    base = get_recipe("cpu-tiny-lora")
    r = apply_overrides(base, parse_set(["lora_r=8", "learning_rate=1e-4", "gradient_checkpointing=true",
                                         "target_modules=q_proj,v_proj", "max_steps=none"]))
    assert (r.lora_r, r.learning_rate, r.gradient_checkpointing) == (8, 1e-4, True)
    assert r.target_modules == ["q_proj", "v_proj"] and r.max_steps is None and base.lora_r == 16
    for items, message in ((["bogus=1"], "unknown recipe field 'bogus'"), (["lora_r=0"], "recipe override 'lora_r'"),
                           (["hardware=t4"], "cannot be overridden"), (["lora_dropout=2"], "lora_dropout")):
        with pytest.raises(ConfigError, match=message):
            apply_overrides(base, parse_set(items))
    with pytest.raises(ConfigError, match="is not FIELD=VALUE"):
        parse_set(["lora_r"])


def test_steps_from_epochs_or_max_steps():
    r = get_recipe("cpu-tiny-lora")  # 1 × 8, 3 epochs
    assert r.steps(60) == 24 and r.steps(60, world_size=2) == 12 and r.steps(1) == 3
    assert apply_overrides(r, {"max_steps": 5}).steps(60) == 5
    assert apply_overrides(r, {"epochs": 0.5}).steps(60) == 4


def test_size_classes_and_task_kinds():
    assert [size_class(n) for n in (134_515_008, 494_000_000, 1_500_000_000, 7_000_000_000, 13_000_000_000)] == \
        ["tiny", "tiny", "small", "7b", "13b"]
    assert size_class(None) == "small"
    assert [task_kind(t) for t in ("generate", "classify", "multiple_choice")] == ["generate", "short", "short"]


def test_recipes_command_lists_every_recipe(capsys, monkeypatch):
    code, out, _ = cli(capsys, monkeypatch, "recipes")
    assert code == 0
    for r in RECIPES:
        assert r.name in out
    assert "QLoRA paper" in out and "--recipe auto" in out.replace("\n", " ")
