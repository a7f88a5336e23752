"""Privacy: DP-SGD fine-tuning with Opacus (LoRA weights only) and canary exposure (Carlini et al., 2019).

Fast tests on the tiny random Llama: the exposure formula against hand-computed values, canary generation and
insertion, per-example gradients, DP runs (ε spent, δ, card, frozen base, resume, QLoRA, the budget), one-line CLI
errors, identities, and an experiment file training a LoRA and a DP adapter side by side. Slow tests on the real
embedded SmolLM2 and MTS-Dialog: a non-DP and a DP adapter with canaries, their ε and exposures.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import cli, interrupt_at, notes_spec, write_experiment

from labscale.adapt import canary
from labscale.adapt.canary import PREFIX, CanarySpec, fitted_exposure, rank_and_exposure
from labscale.adapt.card import summary
from labscale.adapt.data import IGNORE, build_split
from labscale.adapt.finetune import CHECKPOINTS, FinetuneOptions, finetune, prepare_job
from labscale.config import DPSpec, ModelSpec, TaskSpec
from labscale.errors import ConfigError
from labscale.models.registry import resolve_model
from labscale.tasks.registry import get_task

pytestmark = pytest.mark.usefixtures("one_thread")

DP_KEYS = {"epsilon_spent", "epsilon_target", "delta", "max_grad_norm", "noise_multiplier"}
CANARY_KEYS = {"k", "repeats", "candidates", "space_bits", "exposure_mean", "exposure_ci_low", "exposure_ci_high",
               "exposure_max", "control_exposure_mean", "exposure_measurable_max"}


def options(tiny_llm, notes, out, **kw) -> FinetuneOptions:
    overrides = {"eval_every": 2, "grad_accum": 4, "learning_rate": 1e-2, **kw.pop("overrides", {})}
    return FinetuneOptions(model=ModelSpec(id=f"hf:{tiny_llm}", quantization=kw.pop("quant", "none")),
                           task=get_task(TaskSpec(**notes_spec()), notes), overrides=overrides, out=out,
                           **{"max_steps": 4, **kw})


def quiet(msg: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------- the formula


def test_exposure_formula_by_hand():
    # rank = 1 + candidates with lower log-perplexity; exposure = log2|R| - log2(rank |R| / (m + 1))
    assert rank_and_exposure(2.0, [1.0, 3.0, 4.0, 5.0]) == (2, pytest.approx(math.log2(5 / 2)))  # 1.3219 bits
    assert rank_and_exposure(2.0, [1.0, 3.0, 4.0, 5.0])[1] == pytest.approx(1.321928, abs=1e-6)
    assert rank_and_exposure(0.5, [1.0, 3.0, 4.0, 5.0]) == (1, pytest.approx(math.log2(5)))  # best: log2(m + 1)
    assert rank_and_exposure(9.0, [1.0, 3.0, 4.0, 5.0]) == (5, pytest.approx(0.0, abs=1e-12))  # worst: 0
    assert rank_and_exposure(3.0, [1.0, 3.0, 4.0, 5.0])[0] == 2  # a tie is not "lower"
    # |R| cancels: the estimate only depends on the rank among the m + 1 sampled secrets
    assert rank_and_exposure(0.8, [0.5, 0.7, 0.9], space=10**6) == (3, pytest.approx(math.log2(4 / 3)))
    assert rank_and_exposure(0.8, [0.5, 0.7, 0.9], space=8) == (3, pytest.approx(0.415037, abs=1e-6))
    # every other secret as a candidate: the exact definition, log2|R| - log2 rank (|R| = 8, rank 4 -> 1 bit)
    assert rank_and_exposure(3.5, [1, 2, 3, 4, 5, 6, 7], space=8) == (4, pytest.approx(1.0))
    assert rank_and_exposure(0.0, [1, 2, 3, 4, 5, 6, 7], space=8) == (1, pytest.approx(3.0))


def test_fitted_exposure_extrapolates_beyond_the_sample():
    import numpy as np

    cand = list(np.random.default_rng(0).normal(60.0, 5.0, 2000))
    assert fitted_exposure(60.0, cand) == pytest.approx(1.0, abs=0.15)  # the median: CDF 1/2
    assert fitted_exposure(60.0 - 5 * 5.0, cand) > math.log2(2001)  # beyond what ranking 2000 candidates can show
    assert fitted_exposure(0.0, cand) == pytest.approx(math.log2(10**6))  # capped at log2|R|
    assert fitted_exposure(90.0, cand) == pytest.approx(0.0, abs=1e-3)


def test_canaries_are_deterministic_and_disjoint():
    spec = CanarySpec(k=4, repeats=3, candidates=200, seed=0)
    inserted, controls, candidates = spec.draw()
    assert spec.draw() == (inserted, controls, candidates)
    assert CanarySpec(k=4, seed=1).draw()[0] != inserted
    assert len(inserted) == len(controls) == 4 and len(candidates) == 200
    assert all(len(s) == 6 and s.isdigit() for s in inserted + controls + candidates)
    assert len(set(inserted + controls + candidates)) == 208  # candidates exclude every canary and control


def test_canaries_are_inserted_and_trained_on_the_secret(tiny_llm, notes):
    backend = resolve_model(ModelSpec(id=f"hf:{tiny_llm}"))
    task = get_task(TaskSpec(**notes_spec()), notes)
    train = build_split(backend, task, "train", 0, 1024)
    spec = CanarySpec(k=3, repeats=5, candidates=50)
    with_canaries = canary.insert(train, backend, spec)
    assert len(with_canaries.examples) == len(train.examples) + 15
    extra = with_canaries.examples[len(train.examples):]
    assert [e.id for e in extra[:6]] == ["canary-0-0", "canary-0-1", "canary-0-2", "canary-0-3", "canary-0-4",
                                         "canary-1-0"]
    inserted = spec.draw()[0]
    for i, secret in enumerate(inserted):
        ex = extra[5 * i]
        prompt, completion = backend.encode_pair(PREFIX, " " + secret)  # what exposure scores
        assert ex.input_ids == prompt + completion + [backend.tokenizer.eos_token_id]
        assert ex.labels == [IGNORE] * len(prompt) + completion + [backend.tokenizer.eos_token_id]
        assert backend.tokenizer.decode([t for t in ex.labels if t != IGNORE]) == f" {secret}<|im_end|>"


def test_card_summary_fields():
    base = {"training": {"steps": 3}, "accounting": {}, "task": {"name": "t"}}
    assert summary(base)["dp"] is None and summary(base)["canaries"] is None
    card = {**base, "dp": {k: 1.0 for k in DP_KEYS | {"accountant"}},
            "canaries": {k: 1.0 for k in CANARY_KEYS | {"inserted"}}}
    s = summary(card)
    assert set(s["dp"]) == DP_KEYS and set(s["canaries"]) == CANARY_KEYS


# ------------------------------------------------------------------------------------------------- DP on tiny


@pytest.fixture(scope="module")
def dp_run(tiny_llm, notes, tmp_path_factory):
    out = tmp_path_factory.mktemp("dp") / "a"
    said: list[str] = []
    opts = options(tiny_llm, notes, out, dp=DPSpec(epsilon=4.0, delta=0.005, max_grad_norm=0.5), canaries=2,
                   canary_candidates=40)
    result = finetune(opts, say=said.append, keep_model=True)
    return result, said


def test_dp_run_spends_at_most_epsilon(dp_run):
    result, said = dp_run
    card = result.card
    dp = card["dp"]
    assert math.isfinite(dp["epsilon_spent"]) and 0 < dp["epsilon_spent"] <= dp["epsilon_target"] == 4.0
    assert dp["delta"] == 0.005 and dp["delta_source"] == "--delta" and dp["max_grad_norm"] == 0.5
    n = card["data"]["train"]["examples"]
    assert n == 24 + 2 * 4  # 24 train examples + 2 canaries × 4 copies
    assert dp["sample_rate"] == pytest.approx(1 / math.ceil(n / 4)) and dp["expected_batch_size"] == 4
    assert dp["noise_multiplier"] > 0 and dp["accountant"] == "rdp" and dp["sampling"] == "Poisson"
    assert dp["steps"] == card["training"]["steps"] == 4 and sum(h[2] for h in dp["accountant_history"]) == 4
    assert dp["epochs"] == pytest.approx(4 * dp["sample_rate"], abs=1e-4)
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()  # ε recomputed from the recorded history
    acc.history = [tuple(h) for h in dp["accountant_history"]]
    assert acc.get_epsilon(0.005) == pytest.approx(dp["epsilon_spent"])
    assert set(card["summary"]["dp"]) == DP_KEYS and card["summary"]["dp"]["epsilon_spent"] == dp["epsilon_spent"]
    t = card["training"]
    assert [s for s, _ in t["dev_loss_curve"]] == [2, 4] and t["dev_loss_before"] > 0 and t["wall_s"] > 0
    assert any(line.startswith("privacy: ε ") for line in said) and any("· ε " in line for line in said)
    assert not (result.out / CHECKPOINTS).exists()


def test_dp_trains_only_the_lora_weights(dp_run, tiny_llm):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    result, _ = dp_run
    saved = load_file(str(result.out / "adapter_model.safetensors"))
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in saved.items())  # it trained
    model = result.model
    assert all(("lora_A" in n or "lora_B" in n) == p.requires_grad for n, p in model.named_parameters())
    original = AutoModelForCausalLM.from_pretrained(tiny_llm).state_dict()
    base = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
            for k, v in model.state_dict().items() if "lora_" not in k}
    assert set(base) == set(original) and all(base[k].equal(original[k]) for k in original)


def test_dp_canaries_and_the_adapter_backend(dp_run):
    result, _ = dp_run
    c = result.card["canaries"]
    assert c["k"] == 2 and c["repeats"] == 4 and c["inserted_examples"] == 8 and c["candidates"] == 40
    assert c["space_bits"] == pytest.approx(math.log2(10**6))
    assert c["exposure_measurable_max"] == pytest.approx(math.log2(41))
    assert len(c["inserted"]) == len(c["controls"]) == 2
    assert c["exposure_mean"] == pytest.approx(sum(r["exposure"] for r in c["inserted"]) / 2)
    assert c["exposure_ci_low"] <= c["exposure_mean"] <= c["exposure_ci_high"]
    assert set(result.card["summary"]["canaries"]) == CANARY_KEYS
    # the saved adapter, evaluated as `adapter:DIR`, scores the canaries exactly as measured after training
    adapter = resolve_model(ModelSpec(id=f"adapter:{result.out}"))
    assert adapter.info.extra["adaptation"]["dp"]["epsilon_spent"] == result.card["dp"]["epsilon_spent"]
    again = canary.measure(adapter, adapter.model, CanarySpec(2, 4, 40, 0))
    assert [r["log_perplexity"] for r in again["inserted"]] == pytest.approx(
        [r["log_perplexity"] for r in c["inserted"]], abs=1e-3)


def test_per_example_gradients_are_each_examples_own(tiny_llm, notes, tmp_path):
    """Opacus' per-example gradients of a padded micro-batch equal each example's gradient computed alone."""
    import torch

    from labscale.adapt.dp import DPTrainer

    job = prepare_job(options(tiny_llm, notes, tmp_path / "g", dp=DPSpec(epsilon=8),
                              overrides={"batch_size": 3, "grad_accum": 1, "lora_dropout": 0.0}))
    trainer = DPTrainer(job)
    rows = sorted(trainer.rows[:3], key=lambda r: r["length"])
    assert len({r["length"] for r in rows}) > 1  # padding is exercised
    for p in trainer.params:  # LoRA B starts at zero: make the A gradients non-trivial too
        if p.abs().sum() == 0:
            p.data.normal_(0, 0.1)
    losses = trainer._backward(rows)
    per_example = [p.grad_sample.clone() for p in trainer.params]
    trainer.optimizer.zero_grad(set_to_none=True)
    for i, row in enumerate(rows):
        loss = trainer._backward([row])[0]
        assert loss == pytest.approx(losses[i], abs=1e-5)
        for p, gs in zip(trainer.params, per_example):
            assert torch.allclose(p.grad_sample[0], gs[i], atol=1e-5)
        trainer.optimizer.zero_grad(set_to_none=True)


@pytest.mark.slow
def test_dp_resume_keeps_the_accountant(tiny_llm, notes, tmp_path):
    dp = DPSpec(epsilon=8)
    straight = finetune(options(tiny_llm, notes, tmp_path / "straight", max_steps=6, dp=dp), say=quiet)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        finetune(options(tiny_llm, notes, out, max_steps=6, dp=dp), say=quiet, callbacks=(interrupt_at(5),))
    state = json.loads((out / CHECKPOINTS / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and sum(h[2] for h in state["accountant"]["history"]) == 4
    said: list[str] = []
    resumed = finetune(options(tiny_llm, notes, out, max_steps=6, dp=dp), say=said.append)
    assert "resuming from checkpoint-4" in said
    a, b = straight.card, resumed.card
    assert b["training"]["resumed_from"] == ["checkpoint-4"] and b["training"]["segments"] == 2
    assert b["dp"]["epsilon_spent"] == pytest.approx(a["dp"]["epsilon_spent"]) and b["dp"]["steps"] == 6
    assert b["dp"]["accountant_history"] == a["dp"]["accountant_history"]
    curve = a["training"]["train_loss_curve"]  # a step whose Poisson batch is empty has no loss
    assert [s for s, _ in b["training"]["train_loss_curve"]] == [s for s, _ in curve]
    assert [v for _, v in b["training"]["train_loss_curve"]] == pytest.approx([v for _, v in curve], abs=1e-5)
    from safetensors.torch import load_file

    wa, wb = (load_file(str(r.out / "adapter_model.safetensors")) for r in (straight, resumed))
    assert wa.keys() == wb.keys() and all(wa[k].allclose(wb[k], atol=1e-6) for k in wa)


@pytest.mark.slow
def test_qlora_with_dp_trains_on_cpu(tiny_llm, notes, tmp_path):
    result = finetune(options(tiny_llm, notes, tmp_path / "q", quant="4bit", max_steps=2, dp=DPSpec(epsilon=8)),
                      say=quiet)
    card = result.card
    assert card["base_model"]["quantization"] == "4bit" and card["recipe"]["name"] == "cpu-tiny-qlora"
    assert 0 < card["dp"]["epsilon_spent"] <= 8 and card["training"]["steps"] == 2
    assert resolve_model(ModelSpec(id=f"adapter:{result.out}")).info.quantization == "4bit"


@pytest.mark.slow
def test_identity_covers_dp_and_canaries(tiny_llm, notes, tmp_path):
    def identity(**kw):
        return prepare_job(options(tiny_llm, notes, None, adapters_dir=tmp_path, **kw)).identity

    plain = identity()
    variants = [identity(dp=DPSpec(epsilon=8)), identity(dp=DPSpec(epsilon=4)),
                identity(dp=DPSpec(epsilon=8, max_grad_norm=0.5)), identity(dp=DPSpec(epsilon=8, delta=1e-3)),
                identity(canaries=2), identity(canaries=3), identity(canaries=2, canary_repeats=2),
                identity(canaries=2, canary_candidates=100), identity(canaries=2, dp=DPSpec(epsilon=8))]
    assert len({plain, *variants}) == 1 + len(variants)
    assert identity(dp=DPSpec(epsilon=8)) == variants[0]  # deterministic


# ------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("extra, message", [
    (["--dp"], "--dp needs a privacy budget — add --epsilon E"),
    (["--epsilon", "8"], "--epsilon only applies to differentially private training — add --dp"),
    (["--delta", "1e-5"], "--delta only applies to differentially private training"),
    (["--dp", "--epsilon", "0"], "--epsilon 0 is not a positive number"),
    (["--dp", "--epsilon", "-2"], "--epsilon -2 is not a positive number"),
    (["--dp", "--epsilon", "8", "--delta", "1"], "--delta 1 is not between 0 and 1"),
    (["--dp", "--epsilon", "8", "--delta", "0.2"], "δ 0.2 is not below 1/n = 0.0417 (24 training examples)"),
    (["--dp", "--epsilon", "8", "--max-grad-norm", "0"], "--max-grad-norm 0 is not positive"),
    (["--dp", "--epsilon", "0.01", "--delta", "1e-12"], "ε 0.01 is too small for 9 steps at sampling rate 0.333"),
    (["--dp", "--epsilon", "8", "--set", "gradient_checkpointing=true"], "does not support gradient checkpointing"),
    (["--dp", "--epsilon", "8", "--set", "packing=true"], "cannot pack examples — add --set packing=false"),
    (["--canaries", "-1"], "--canaries -1 is out of range"),
    (["--canaries", "2", "--canary-repeats", "0"], "--canary-repeats 0 is not a positive count"),
    (["--canaries", "2", "--canary-candidates", "5"], "--canary-candidates 5 is out of range"),
    (["--canary-repeats", "2"], "--canary-repeats only applies with canaries — add --canaries K"),
])
def test_bad_privacy_input_is_one_line(extra, message, tiny_llm, exp_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "a"
    code, _, err = cli(capsys, monkeypatch, "finetune", "--model", f"hf:{tiny_llm}", "--task", "notes",
                       "--experiment", exp_file, "--out", out, *extra)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not out.exists()


@pytest.mark.slow
def test_dp_budget_refusal_leaves_nothing_behind(tiny_llm, exp_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "a"
    code, _, err = cli(capsys, monkeypatch, "finetune", "--model", f"hf:{tiny_llm}", "--task", "notes",
                       "--experiment", exp_file, "--out", out, "--dp", "--epsilon", "8", "--price-per-hour", "1e6",
                       "--budget", "0.01")
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("error: estimated cost $") and "privacy   DP-SGD" in err
    assert not out.exists()


# ------------------------------------------------------------------------------------------ experiment files


@pytest.mark.slow
def test_experiment_trains_lora_and_dp_side_by_side(tiny_llm, notes, tmp_path, capsys, monkeypatch):
    import shutil

    shutil.copy(notes / "notes.csv", tmp_path / "notes.csv")
    monkeypatch.chdir(tmp_path)
    common = {"model": f"hf:{tiny_llm}", "task": "notes", "max_steps": 2, "canaries": 2,
              "overrides": {"eval_every": 2, "grad_accum": 4}}
    exp = write_experiment(
        tmp_path / "priv.yaml", name="priv", models=[f"hf:{tiny_llm}"], tasks=[notes_spec()], settings=["zero-shot"],
        limit=2, generation={"max_new_tokens": 4},
        adaptations=[{**common, "name": "tiny-lora"}, {**common, "name": "tiny-dp", "dp": {"epsilon": 8}}],
    )
    code, out, err = cli(capsys, monkeypatch, "run", exp)
    assert code == 0, err
    report = (tmp_path / "runs" / "priv.md").read_text()
    finetuned = report.split("## Results by task — finetuned")[1].split("\n## ")[0]
    assert "tiny-lora" in finetuned and "tiny-dp" in finetuned
    privacy = report.split("### Privacy")[1].split("\n## ")[0]
    rows = {line.split(" | ")[0].strip("| "): line for line in privacy.splitlines() if line.startswith("| tiny-")}
    assert set(rows) == {"tiny-lora", "tiny-dp"}
    assert "| no |" in rows["tiny-lora"] and "ε " in rows["tiny-dp"] and "of 8.000" in rows["tiny-dp"]
    assert all("2 × 4" in line for line in rows.values())  # 2 canaries × 4 copies each
    cards = [json.loads((p / "labscale.json").read_text()) for p in (tmp_path / "runs" / "adapters").iterdir()]
    assert len(cards) == 2 and len({c["identity"] for c in cards}) == 2
    lora, dp = sorted(cards, key=lambda c: c["dp"] is not None)
    assert lora["summary"]["dp"] is None and set(lora["summary"]["canaries"]) == CANARY_KEYS
    assert set(dp["summary"]["dp"]) == DP_KEYS and dp["summary"]["dp"]["epsilon_spent"] <= 8
    assert set(dp["summary"]["canaries"]) == CANARY_KEYS and dp["canaries"]["candidates"] == 1000
    import sqlite3

    conn = sqlite3.connect(tmp_path / "runs" / "priv.db")
    settings = sorted(s for (s,) in conn.execute("SELECT setting FROM runs"))
    conn.close()
    assert settings == ["finetuned", "finetuned", "zero-shot"]


def test_dp_spec_validation_in_the_experiment_file(tiny_llm, notes, tmp_path, capsys, monkeypatch):
    import shutil

    shutil.copy(notes / "notes.csv", tmp_path / "notes.csv")
    monkeypatch.chdir(tmp_path)
    base = dict(name="bad", models=[f"hf:{tiny_llm}"], tasks=[notes_spec()], limit=2)
    for dp, message in [({"epsilon": 0}, "dp.epsilon"), ({"epsilon": 8, "delta": 0.3}, "is not below 1/n")]:
        exp = write_experiment(tmp_path / "bad.yaml", **base,
                               adaptations=[{"model": f"hf:{tiny_llm}", "task": "notes", "dp": dp}])
        code, _, err = cli(capsys, monkeypatch, "run", exp)
        assert code == 2 and message in err.strip().splitlines()[-1], err
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("labscale.json"))


def test_dp_errors_are_config_errors():
    from labscale.adapt.dp import plan_dp
    from labscale.adapt.recipes import get_recipe

    with pytest.raises(ConfigError, match="single process"):
        plan_dp(DPSpec(epsilon=8), get_recipe("cpu-tiny-lora"), 100, 10, world_size=2)


# ---------------------------------------------------------------------------- the real embedded model (slow)

REAL = "embedded:smollm2-135m-instruct"
REAL_SETTINGS = {"max_seq_len": 320, "grad_accum": 4, "eval_every": 8, "learning_rate": 2e-3}
REAL_STEPS = 8


@pytest.fixture(scope="module")
def real_pair(tmp_path_factory):
    """SmolLM2-135M on MTS-Dialog (48 train dialogues ≤ 320 tokens), 4 canaries × 16 copies, 8 steps of 4 examples
    (expected, for DP): a LoRA and a DP (ε = 8) adapter, about 45 s each on 2 cores."""
    mts = get_task("mts-summarization", Path("."))
    folder = tmp_path_factory.mktemp("real-privacy")
    cards = {}
    for kind, dp in (("lora", None), ("dp", DPSpec(epsilon=8))):
        opts = FinetuneOptions(model=ModelSpec(id=REAL), task=mts, overrides=dict(REAL_SETTINGS), max_steps=REAL_STEPS,
                               out=folder / kind, dp=dp, canaries=4, canary_repeats=16, canary_candidates=200)
        cards[kind] = finetune(opts, say=quiet).card
    return cards


@pytest.mark.real_model
@pytest.mark.slow
def test_real_dp_run_spends_a_finite_epsilon_below_the_target(real_pair):
    dp = real_pair["dp"]["dp"]
    assert math.isfinite(dp["epsilon_spent"]) and 0 < dp["epsilon_spent"] <= dp["epsilon_target"] == 8
    assert dp["steps"] == REAL_STEPS and dp["delta"] == pytest.approx(1 / (2 * dp["examples"]))
    assert 0 < dp["noise_multiplier"] < 10 and dp["sample_rate"] == pytest.approx(1 / math.ceil(dp["examples"] / 4))
    t = real_pair["dp"]["training"]
    assert t["steps"] == REAL_STEPS and t["dev_loss_before"] > 0 and t["train_tokens_per_s"] > 0


@pytest.mark.real_model
@pytest.mark.slow
def test_real_canary_exposure_lora_vs_dp(real_pair, capsys):
    lora, dp = real_pair["lora"]["summary"]["canaries"], real_pair["dp"]["summary"]["canaries"]
    for s in (lora, dp):
        assert set(s) == CANARY_KEYS and s["k"] == 4 and s["candidates"] == 200
        assert 0 <= s["exposure_ci_low"] <= s["exposure_mean"] <= s["exposure_ci_high"] <= math.log2(201) + 1e-9
    with capsys.disabled():
        for kind, s in (("LoRA", lora), ("DP ε=8", dp)):
            c = real_pair["lora" if kind == "LoRA" else "dp"]
            print(f"\n{kind}: exposure {s['exposure_mean']:.2f} [{s['exposure_ci_low']:.2f}, "
                  f"{s['exposure_ci_high']:.2f}] max {s['exposure_max']:.2f}, controls "
                  f"{s['control_exposure_mean']:.2f}; ranks {[r['rank'] for r in c['canaries']['inserted']]}; dev loss "
                  f"{c['training']['dev_loss_before']:.3f} → {c['training']['best_dev_loss']:.3f}; "
                  f"{c['training']['wall_s']:.0f} s", end="")
    # with this seed the non-private adapter ranks its canaries far above chance and the DP one does not
    # (observed: 4.11 [2.79, 6.44] vs 1.24 [0.25, 2.26] bits; controls 1.94 and 1.25)
    assert lora["exposure_mean"] > dp["exposure_mean"]
