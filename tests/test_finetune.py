"""Fine-tuning on the tiny random Llama (fast): training data = evaluation prompts, the CLI end to end and its
card, interruption + resume, the budget (refusal and mid-training stop), optional trackers, one-line errors, the
`adapter:` backend, QLoRA on CPU, and adaptations declared in an experiment file reaching the report.

Real-model tests (SmolLM2 on MTS-Dialog) are in test_finetune_real.py; `accelerate launch` in test_finetune_ddp.py.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from helpers import cli, counts, dump, interrupt_at, notes_spec, write_experiment
from transformers import TrainerCallback

from labscale.adapt.data import build_split, encode_example
from labscale.adapt.finetune import CHECKPOINTS, FinetuneOptions, finetune
from labscale.config import ModelSpec, TaskSpec
from labscale.errors import DataError, ModelError
from labscale.models.registry import resolve_model
from labscale.settings.setting import chat_prompt, loglikelihood_prompt, parse_setting
from labscale.tasks.registry import get_task

pytestmark = pytest.mark.usefixtures("one_thread")

QUICK = ["--set", "eval_every=2", "--set", "grad_accum=2"]


def notes_task(notes: Path):
    return get_task(TaskSpec(**notes_spec()), notes)


def options(tiny_llm, notes, out, **kw) -> FinetuneOptions:
    overrides = {"eval_every": 2, "grad_accum": 2, **kw.pop("overrides", {})}
    return FinetuneOptions(model=ModelSpec(id=f"hf:{tiny_llm}", quantization=kw.pop("quant", "none")),
                           task=notes_task(notes), overrides=overrides, out=out, **{"max_steps": 4, **kw})


@pytest.fixture(scope="module")
def trained(tiny_llm, notes, tmp_path_factory) -> Path:
    """An adapter trained hard enough (lr 1e-2) to change the tiny model's outputs."""
    out = tmp_path_factory.mktemp("adapter") / "a"
    finetune(options(tiny_llm, notes, out, overrides={"learning_rate": 1e-2}), say=lambda m: None)
    return out


def _lora_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


# ------------------------------------------------------------------------------------------------ training data


def test_training_examples_are_the_evaluation_prompts(tiny_llm, notes):
    backend = resolve_model(ModelSpec(id=f"hf:{tiny_llm}"))
    task = notes_task(notes)
    for ex in task.split("train")[:5]:
        prompt, completion = encode_example(backend, task, ex, 0)
        rendered = backend.render(chat_prompt(task, parse_setting("zero-shot"), ex, 0))
        assert prompt == backend.encode(rendered)  # the tokens `generate` is fed at evaluation
        assert backend.tokenizer.decode(completion) == ex.target + "<|im_end|>"  # answer + end of turn, nothing more


def test_plain_format_model_trains_on_the_plain_format(tiny_llm_plain, notes):
    backend = resolve_model(ModelSpec(id=f"hf:{tiny_llm_plain}"))
    task = notes_task(notes)
    ex = task.split("train")[0]
    prompt, completion = encode_example(backend, task, ex, 0)
    assert prompt[0] == backend.tokenizer.bos_token_id  # this tokenizer adds BOS, as evaluation does
    assert backend.tokenizer.decode(prompt, skip_special_tokens=True).endswith("Assistant:")
    assert backend.tokenizer.decode(completion) == " " + ex.target + "<|im_end|>"


def test_multiple_choice_trains_on_the_loglikelihood_format(tiny_llm):
    backend = resolve_model(ModelSpec(id=f"hf:{tiny_llm}"))
    task = get_task("openbookqa", Path("."))
    ex = task.split("train")[0]
    context, continuations = loglikelihood_prompt(task, parse_setting("zero-shot"), ex, 0)
    assert encode_example(backend, task, ex, 0) == backend.encode_pair(context, continuations[ex.gold])


def test_long_examples_are_skipped_never_truncated(tiny_llm, notes):
    backend = resolve_model(ModelSpec(id=f"hf:{tiny_llm}"))
    task = notes_task(notes)
    full = build_split(backend, task, "train", 0, 1024)
    lengths = sorted(len(e.input_ids) for e in full.examples)
    cut = lengths[len(lengths) // 2]
    half = build_split(backend, task, "train", 0, cut)
    assert len(half.examples) + len(half.skipped) == len(full.examples) and half.skipped
    assert all(len(e.input_ids) <= cut for e in half.examples)
    assert {e.id: e.input_ids for e in half.examples}.items() <= {e.id: e.input_ids for e in full.examples}.items()
    with pytest.raises(DataError, match="longer than max_seq_len=16"):
        build_split(backend, task, "train", 0, 16)


def test_completion_head_equals_the_models_own_loss_and_packs(tiny_llm):
    """The completion-only head gives the model's own loss on the completion tokens, and packed rows (position ids
    restarting per example, as TRL's packing makes them) give the same sum as separate examples."""
    import torch
    from transformers import AutoModelForCausalLM

    from labscale.adapt.trainer import add_completion_head

    model = AutoModelForCausalLM.from_pretrained(tiny_llm).eval()
    add_completion_head(model)
    torch.manual_seed(0)
    rows = []
    for n_prompt, n_completion in ((20, 6), (35, 9)):
        ids = torch.randint(4, 300, (1, n_prompt + n_completion))
        labels = ids.clone()
        labels[:, :n_prompt] = -100
        rows.append((ids, labels))
    with torch.no_grad():
        sums = []
        for ids, labels in rows:
            out = model(input_ids=ids, labels=labels, completion_loss=True)
            reference = model(input_ids=ids, labels=labels)  # the model's own mean loss over the same tokens
            assert out.loss.item() / out.n_tokens.item() == pytest.approx(reference.loss.item(), rel=1e-5)
            sums.append(out.loss.item())
        ids = torch.cat([r[0] for r in rows], 1)
        labels = torch.cat([r[1] for r in rows], 1)
        pos = torch.cat([torch.arange(r[0].shape[1]) for r in rows])[None]
        packed = model(input_ids=ids, labels=labels, position_ids=pos, completion_loss=True)
    assert packed.n_tokens.item() == 6 + 9
    assert packed.loss.item() == pytest.approx(sum(sums), rel=1e-5)


@pytest.mark.slow
def test_adapter_identities_are_stable(tiny_llm, notes, tmp_path):
    """Identities computed before the options moved into one pydantic model (config.FinetuneSpec): the same inputs
    still give the same identity, so adapters trained before are reused, not trained again."""
    from labscale.adapt.finetune import prepare_job
    from labscale.config import DPSpec

    assert resolve_model(ModelSpec(id=f"hf:{tiny_llm}")).info.fingerprint == "cf0da361890989c3"  # the tiny model

    def identity(**kw):
        return prepare_job(options(tiny_llm, notes, None, adapters_dir=tmp_path, **kw), world_size=1).identity

    assert identity() == "90f988eb7f8d825a"
    assert identity(seed=3) == "accfb9ce4fbaab84"
    assert identity(quant="4bit") == "87c20453e5b29f34"
    assert identity(dp=DPSpec(epsilon=8)) == "06203c76e692e577"
    assert identity(dp=DPSpec(epsilon=4, delta=1e-3, max_grad_norm=0.5)) == "50b046310960f99d"
    assert identity(canaries=2, canary_repeats=2, canary_candidates=100) == "90c434e6fd00e9ba"


# ----------------------------------------------------------------------------------------------------- the CLI


@pytest.mark.slow
def test_finetune_cli_end_to_end(tiny_llm, notes, exp_file, tmp_path, capsys, monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "adapter"
    args = ["finetune", "--model", f"hf:{tiny_llm}", "--task", "notes", "--experiment", exp_file,
            "--max-steps", "4", *QUICK, "--out", out]
    code, stdout, err = cli(capsys, monkeypatch, *args)
    assert code == 0, err
    assert stdout.strip() == f"adapter: {out}"
    for line in ("recipe    cpu-tiny-lora", "LoRA      r=16 alpha=32", "estimate  ~", "dev loss", "step 4/4"):
        assert line in err
    card = json.loads((out / "labscale.json").read_text())
    base = resolve_model(ModelSpec(id=f"hf:{tiny_llm}"))
    assert card["base_model"]["fingerprint"] == base.info.fingerprint
    assert card["task"]["name"] == "notes" and card["seed"] == 0 and card["stopped"] == "max_steps"
    assert card["data"]["train"]["examples"] == 24 and card["data"]["dev"]["examples"] == 4
    assert card["recipe"]["name"] == "cpu-tiny-lora" and card["recipe"]["max_steps"] == 4
    t, a = card["training"], card["accounting"]
    assert t["steps"] == 4 and [s for s, _ in t["train_loss_curve"]] == [1, 2, 3, 4]
    assert [s for s, _ in t["dev_loss_curve"]] == [2, 4]
    assert t["best_dev_loss"] == pytest.approx(min(v for _, v in t["dev_loss_curve"]), abs=1e-6)
    assert t["dev_loss_before"] > 0
    assert t["wall_s"] > 0 and t["train_tokens"] > 0 and t["train_tokens_per_s"] > 0 and t["peak_rss_bytes"] > 0
    assert a["hardware"] == "cpu" and a["usd_per_hour"] == 0.1 and a["energy_kwh"] > 0 and a["co2eq_kg"] > 0
    assert a["cost_usd"] == pytest.approx(t["wall_s"] / 3600 * 0.1, rel=1e-3)
    assert a["estimate"]["usd"] > 0 and a["budget_usd"] == 25
    assert not (out / CHECKPOINTS).exists()
    # a standard PEFT adapter: plain PeftModel.from_pretrained loads exactly the saved weights
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llm), str(out))
    saved = _lora_weights(out)
    state = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    assert saved and all(state[k].equal(v) for k, v in saved.items())
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in saved.items())  # it trained
    # the same command again reuses the adapter
    before = (out / "labscale.json").stat().st_mtime_ns
    code, _, err = cli(capsys, monkeypatch, *args)
    assert code == 0 and "reusing it" in err and "step 1/4" not in err
    assert (out / "labscale.json").stat().st_mtime_ns == before
    # other settings into the same folder: refused
    code, _, err = cli(capsys, monkeypatch, *args, "--set", "lora_r=8")
    assert code == 2 and "already holds an adapter trained with other settings" in err


@pytest.mark.slow
def test_interrupt_and_resume_equals_an_uninterrupted_run(tiny_llm, notes, tmp_path):
    straight = finetune(options(tiny_llm, notes, tmp_path / "straight", max_steps=6), say=lambda m: None)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        finetune(options(tiny_llm, notes, out, max_steps=6), say=lambda m: None, callbacks=(interrupt_at(3),))
    assert (out / CHECKPOINTS / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (out / "labscale.json").exists()
    said = []
    resumed = finetune(options(tiny_llm, notes, out, max_steps=6), say=said.append)
    assert "resuming from checkpoint-2" in said
    t = resumed.card["training"]
    assert t["resumed_from"] == ["checkpoint-2"] and t["segments"] == 2 and t["steps"] == 6
    assert [s for s, _ in t["train_loss_curve"]] == [1, 2, 3, 4, 5, 6]
    a, b = _lora_weights(straight.out), _lora_weights(out)
    assert a.keys() == b.keys() and all(a[k].allclose(b[k], atol=1e-6) for k in a)
    losses = [v for _, v in straight.card["training"]["train_loss_curve"]]
    assert [v for _, v in t["train_loss_curve"]] == pytest.approx(losses, abs=1e-5)


@pytest.mark.slow
@pytest.mark.subprocess
def test_kill_9_then_the_same_command_resumes(tiny_llm, exp_file, tmp_path):
    import os
    import subprocess
    import sys
    import time

    out = tmp_path / "a"
    cmd = [sys.executable, "-m", "labscale", "finetune", "--model", f"hf:{tiny_llm}", "--task", "notes",
           "--experiment", str(exp_file), "--max-steps", "60", "--set", "eval_every=5", "--set", "grad_accum=2",
           "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not any((p / "trainer_state.json").is_file() for p in (out / CHECKPOINTS).glob("checkpoint-*")):
        assert proc.poll() is None and time.time() < deadline, "no checkpoint before the run ended"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert not (out / "labscale.json").exists()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resuming from checkpoint-" in res.stderr
    t = json.loads((out / "labscale.json").read_text())["training"]
    assert t["steps"] == 60 and len(t["resumed_from"]) == 1 and t["segments"] == 2
    assert [s for s, _ in t["train_loss_curve"]] == list(range(1, 61))


# -------------------------------------------------------------------------------------------------- the budget


def test_budget_refusal_leaves_nothing_behind(tiny_llm, exp_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "adapter"
    base = ["finetune", "--model", f"hf:{tiny_llm}", "--task", "notes", "--experiment", exp_file, "--out", out]
    code, _, err = cli(capsys, monkeypatch, *base, "--price-per-hour", "1000000", "--budget", "0.01")
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("error: estimated cost $") and "exceeds the budget $0.01" in lines[-1]
    assert "raise the cap" in lines[-1] and not out.exists()
    code, _, err = cli(capsys, monkeypatch, *base, "--co2-cap", "1e-12")
    assert code == 2 and "error: estimated emissions" in err and not out.exists()


class FakeClock:
    """The session's clock in tests: time passes only when a test says so."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _OneSecondSteps(TrainerCallback):
    """Every optimizer step takes one second of the fake clock."""

    def __init__(self, clock: FakeClock):
        self.clock = clock

    def on_step_begin(self, args, state, control, **kwargs):
        self.clock.now += 1.0


@pytest.mark.slow
def test_budget_stops_training_cleanly(tiny_llm, notes, tmp_path):
    # $1 per second on a fake clock: the probe takes no time, so the estimate fits in $8; the 1-second steps do not
    clock = FakeClock()
    opts = options(tiny_llm, notes, tmp_path / "a", max_steps=40, price_per_hour=3600.0, budget_usd=8.0)
    result = finetune(opts, say=lambda m: None, callbacks=(_OneSecondSteps(clock),), clock=clock)
    card = result.card
    assert card["stopped"] == "budget" and 1 <= card["training"]["steps"] < 40
    # the cost is the fake clock's: one second per step at $1 a second
    assert card["accounting"]["cost_usd"] == pytest.approx(card["training"]["steps"])
    assert card["accounting"]["cost_usd"] <= 8.0
    assert card["training"]["dev_loss_curve"] and (result.out / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------ bad input etc.


@pytest.mark.parametrize("log", ["wandb", "mlflow"])
def test_trackers_are_optional(log, tiny_llm, exp_file, tmp_path, capsys, monkeypatch):
    import importlib.util

    if importlib.util.find_spec(log) is not None:
        pytest.skip(f"{log} is installed")
    out = tmp_path / "a"
    code, _, err = cli(capsys, monkeypatch, "finetune", "--model", f"hf:{tiny_llm}", "--task", "notes",
                       "--experiment", exp_file, "--log", log, "--out", out)
    assert code == 2 and err.strip() == f"error: --log {log} needs the {log} package, which is not installed — " \
                                        f"pip install {log}"
    assert not out.exists()


@pytest.mark.parametrize("extra, message", [
    (["--recipe", "nope"], "unknown recipe 'nope'"),
    (["--set", "bogus=1"], "unknown recipe field 'bogus'"),
    (["--set", "lora_r=abc"], "recipe override 'lora_r'"),
    (["--set", "size=7b"], "recipe field 'size' cannot be overridden"),
    (["--set", "lora_r"], "--set 'lora_r' is not FIELD=VALUE"),
    (["--quant", "3bit"], "unknown --quant '3bit'"),
    (["--country", "XYZ"], "unknown country code 'XYZ'"),
    (["--hardware", "tpu"], "unknown hardware class 'tpu'"),
    (["--budget", "0"], "the budget must be a positive number"),
    (["--log", "tensorboard"], "unknown --log 'tensorboard'"),
    (["--recipe", "t4-7b-qlora", "--set", "max_seq_len=16"], "longer than max_seq_len=16"),
])
def test_bad_input_is_one_line(extra, message, tiny_llm, exp_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "a"
    code, _, err = cli(capsys, monkeypatch, "finetune", "--model", f"hf:{tiny_llm}", "--task", "notes",
                       "--experiment", exp_file, "--out", out, *extra)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert not out.exists()


def test_finetune_help_states_the_options_defaults():
    """The flags' defaults are config.FinetuneSpec's (the flags default to "not given"); where a help text names a
    default, it is that one."""
    import re

    import typer.main

    from labscale.cli import FINETUNE_FLAGS, app
    from labscale.config import DPSpec, FinetuneSpec

    fields = {**FinetuneSpec.model_fields, **DPSpec.model_fields}
    field_of = {FINETUNE_FLAGS.get(name, "--" + name.replace("_", "-")): name for name in fields}
    checked = []
    for param in typer.main.get_command(app).commands["finetune"].params:
        stated = re.search(r"\(default ([^),]+)", param.help or "")
        name = field_of.get(param.opts[0])
        if name is not None:
            assert param.default is None or param.default is False, param.opts  # "not given": the model decides
        if stated and name is not None and fields[name].default is not None:
            default = fields[name].default
            assert stated.group(1) == (f"{default:g}" if isinstance(default, float) else str(default)), param.opts
            checked.append(name)
    assert set(checked) == {"budget_usd", "country", "canary_repeats", "canary_candidates", "max_grad_norm"}


@pytest.mark.parametrize("model, message", [("openai:gpt-4o", "cannot fine-tune 'openai:gpt-4o'"),
                                            ("adapter:/nowhere", "cannot fine-tune 'adapter:/nowhere'")])
def test_only_local_models_are_fine_tuned(model, message, capsys, monkeypatch):
    code, _, err = cli(capsys, monkeypatch, "finetune", "--model", model, "--task", "fact-check")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------ the adapter: backend


def test_adapter_backend(trained, tiny_llm, notes, tmp_path):
    import shutil

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from labscale.models.base import DecodingParams, GenerationRequest, LoglikelihoodRequest

    adapter = resolve_model(ModelSpec(id=f"adapter:{trained}"))
    base = resolve_model(ModelSpec(id=f"hf:{tiny_llm}"))
    assert adapter.info.backend == "adapter" and adapter.info.fingerprint != base.info.fingerprint
    assert resolve_model(ModelSpec(id=f"adapter:{trained}")).info.fingerprint == adapter.info.fingerprint
    assert adapter.info.extra["base_fingerprint"] == base.info.fingerprint
    assert adapter.info.extra["adaptation"]["recipe"] == "cpu-tiny-lora"
    task = notes_task(notes)
    prompts = [adapter.render(chat_prompt(task, parse_setting("zero-shot"), ex, 0)) for ex in task.split("test")[:4]]
    assert prompts == [base.render(chat_prompt(task, parse_setting("zero-shot"), ex, 0))
                       for ex in task.split("test")[:4]]  # same tokenizer and chat template
    params = DecodingParams(max_new_tokens=8)
    got = [r.text for r in adapter.generate([GenerationRequest(p, params) for p in prompts])]
    plain = [r.text for r in base.generate([GenerationRequest(p, params) for p in prompts])]
    assert got != plain  # the adapter is on
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llm), str(trained)).eval()
    for p, text in zip(prompts, got):
        ids = torch.tensor([adapter.encode(p)])
        out = peft.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
        assert adapter.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == text
    # log-likelihoods (multiple-choice tasks) run with the adapter active too
    req = [LoglikelihoodRequest(prompts[0], "fever since friday")]
    with torch.no_grad():
        ctx, cont = adapter.encode_pair(prompts[0], "fever since friday")  # lm-eval's split of the two
        ids, n = torch.tensor([ctx + cont]), len(ctx)
        logp = peft(input_ids=ids).logits[0, n - 1:-1].log_softmax(-1).gather(-1, ids[0, n:, None]).sum().item()
    assert adapter.loglikelihood(req)[0].logprob == pytest.approx(logp, abs=1e-4)
    assert base.loglikelihood(req)[0].logprob != pytest.approx(logp, abs=1e-3)
    # an adapter without a card: the base comes from adapter_config.json
    bare = tmp_path / "bare"
    shutil.copytree(trained, bare)
    (bare / "labscale.json").unlink()
    assert resolve_model(ModelSpec(id=f"adapter:{bare}")).info.extra["base_fingerprint"] == base.info.fingerprint
    # a card naming other base weights: refused
    wrong = tmp_path / "wrong"
    shutil.copytree(trained, wrong)
    card = json.loads((wrong / "labscale.json").read_text())
    card["base_model"]["fingerprint"] = "0" * 16
    (wrong / "labscale.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="was trained on base weights 0000000000000000"):
        _ = resolve_model(ModelSpec(id=f"adapter:{wrong}")).info
    with pytest.raises(ModelError, match="not a LoRA adapter folder"):
        resolve_model(ModelSpec(id=f"adapter:{tmp_path}"))


@pytest.mark.slow
def test_qlora_4bit_trains_on_cpu(tiny_llm, notes, tmp_path):
    result = finetune(options(tiny_llm, notes, tmp_path / "q", quant="4bit", overrides={"learning_rate": 1e-2}),
                      say=lambda m: None)
    assert result.card["base_model"]["quantization"] == "4bit" and result.card["recipe"]["name"] == "cpu-tiny-qlora"
    weights = _lora_weights(result.out)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())
    adapter = resolve_model(ModelSpec(id=f"adapter:{result.out}"))
    assert adapter.info.quantization == "4bit"  # evaluated on the base it was trained on
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in adapter.model.modules())


# ------------------------------------------------------------------------------------------ experiment files


@pytest.mark.slow
def test_experiment_adaptation_reaches_the_report(tiny_llm, notes, tmp_path, capsys, monkeypatch):
    import shutil

    shutil.copy(notes / "notes.csv", tmp_path / "notes.csv")
    monkeypatch.chdir(tmp_path)
    exp = write_experiment(
        tmp_path / "ft.yaml", name="ft", models=[f"hf:{tiny_llm}"], tasks=[notes_spec()], settings=["zero-shot"],
        limit=3, generation={"max_new_tokens": 6},
        adaptations=[{"model": f"hf:{tiny_llm}", "task": "notes", "max_steps": 2, "overrides": {"eval_every": 1}}],
    )
    code, out, err = cli(capsys, monkeypatch, "run", exp)
    assert code == 0, err
    assert "recipe    cpu-tiny-lora" in err and counts(out) == (6, 0)
    report = (tmp_path / "runs" / "ft.md").read_text()
    finetuned = report.split("## Results by task — finetuned")[1].split("##")[0]
    assert f"| task (main metric) | hf:{tiny_llm} |" in finetuned and "| notes (rouge1, n=3) |" in finetuned
    assert "## Results by task — zero-shot" in report
    adaptations = report.split("## Adaptations")[1].split("## ")[0]
    assert "cpu-tiny-lora" in adaptations and "2 (max_steps)" in adaptations and "Total fine-tuning cost: $" in report
    (adapter,) = list((tmp_path / "runs" / "adapters").iterdir())
    assert (adapter / "labscale.json").is_file()
    conn = sqlite3.connect(tmp_path / "runs" / "ft.db")
    rows = conn.execute("SELECT id, setting, model_fingerprint FROM runs ORDER BY setting").fetchall()
    assert [r[1] for r in rows] == ["finetuned", "zero-shot"] and rows[0][2] != rows[1][2]
    prompts = [p for (p,) in conn.execute("SELECT prompt FROM predictions WHERE run_id=? ORDER BY position",
                                          (rows[0][0],))]
    conn.close()
    backend = resolve_model(ModelSpec(id=f"hf:{tiny_llm}"))
    task = notes_task(tmp_path)
    for ex, prompt in zip(task.split("test")[:3], prompts):  # evaluated with exactly the prompts it trained on
        assert backend.encode(prompt) == encode_example(backend, task, ex, 0)[0]
    # again: the adapter is reused and every generation is cached
    code, out, err = cli(capsys, monkeypatch, "run", exp)
    assert code == 0 and "reusing it" in err and counts(out) == (0, 6)


@pytest.mark.slow
def test_bad_adaptation_leaves_the_database_untouched(tiny_llm, notes, tmp_path, capsys, monkeypatch):
    import shutil

    shutil.copy(notes / "notes.csv", tmp_path / "notes.csv")
    monkeypatch.chdir(tmp_path)
    fields = dict(name="bad", models=[f"hf:{tiny_llm}"], tasks=[notes_spec()], settings=["zero-shot"], limit=2,
                  generation={"max_new_tokens": 4})
    exp = write_experiment(tmp_path / "ok.yaml", **fields)
    db = tmp_path / "bad.db"
    assert cli(capsys, monkeypatch, "run", exp, "--db", db)[0] == 0
    before = dump(db)
    cases = [
        ({"model": f"hf:{tiny_llm}", "task": "fact-check"}, "adaptation task 'fact-check' is not one of this"),
        ({"model": "openai:gpt-4o", "task": "notes"}, "neither a model of this experiment nor an embedded:/hf: id"),
        ({"model": f"hf:{tiny_llm}", "task": "notes", "recipe": "nope"}, "unknown recipe 'nope'"),
        ({"model": f"hf:{tiny_llm}", "task": "notes", "price_per_hour": 1e7, "budget_usd": 0.001},
         "exceeds the budget $0.001"),
    ]
    for adaptation, message in cases:
        exp = write_experiment(tmp_path / "bad.yaml", **fields, adaptations=[adaptation])
        code, _, err = cli(capsys, monkeypatch, "run", exp, "--db", db)
        assert code == 2 and message in err.strip().splitlines()[-1], err
        assert dump(db) == before
    assert not (tmp_path / "runs" / "adapters").exists() or not any((tmp_path / "runs" / "adapters").iterdir())


def test_a_budget_refusal_is_a_one_line_cli_error(capsys, monkeypatch):
    """BudgetExceeded reaches the user like every LabscaleError: one line, cause — fix, exit 2."""
    import labscale.cli as cli_module
    from labscale.adapt.budget import BudgetExceeded

    def refuse(*a, **k):
        raise BudgetExceeded("estimated $3.10 exceeds the budget $1", "raise --budget or lower --max-steps")

    monkeypatch.setattr(cli_module, "app", refuse)
    code, out, err = cli(capsys, monkeypatch, "finetune")
    assert code == 2 and err.strip() == "error: estimated $3.10 exceeds the budget $1 — raise --budget or lower " \
                                       "--max-steps", err
