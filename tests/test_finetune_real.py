"""Fine-tuning the real embedded SmolLM2-135M-Instruct on the real MTS-Dialog train split (slow): a few steps lower
the loss, the adapter changes generations, the saved adapter reproduces the trained model's greedy outputs exactly,
QLoRA (4-bit NF4) trains on CPU, and an experiment file evaluates the adapter into the report's fine-tuned table.

Short examples only (max_seq_len 320: 40 of 60 train dialogues) and a high learning rate keep this to about a
minute of training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import cli, counts, write_experiment

from labscale.adapt.finetune import FinetuneOptions, finetune
from labscale.config import ModelSpec
from labscale.models.base import DecodingParams, GenerationRequest, LoglikelihoodRequest
from labscale.models.registry import resolve_model
from labscale.settings.setting import chat_prompt, parse_setting
from labscale.tasks.registry import get_task

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

MODEL = "embedded:smollm2-135m-instruct"
SETTINGS = {"max_seq_len": 320, "grad_accum": 2, "eval_every": 4, "learning_rate": 1e-3}
STEPS = 6




@pytest.fixture(scope="module")
def mts():
    return get_task("mts-summarization", Path("."))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mts):
    out = tmp_path_factory.mktemp("smollm-mts") / "adapter"
    options = FinetuneOptions(model=ModelSpec(id=MODEL), task=mts, overrides=dict(SETTINGS), max_steps=STEPS, out=out)
    result = finetune(options, say=lambda m: None, keep_model=True)
    result.model.eval()
    return result


@pytest.fixture(scope="module")
def prompts(mts):
    base = resolve_model(ModelSpec(id=MODEL))
    rendered = [base.render(chat_prompt(mts, parse_setting("zero-shot"), ex, 0)) for ex in mts.split("test")]
    return sorted(rendered, key=base.count_tokens)[:3]  # the three shortest test prompts


def _generate(backend, prompts):
    params = DecodingParams(max_new_tokens=24)
    return [r.text for r in backend.generate([GenerationRequest(p, params) for p in prompts])]


def test_a_few_steps_lower_the_loss(trained, mts):
    t = trained.card["training"]
    assert t["steps"] == STEPS and t["best_dev_loss"] < t["dev_loss_before"] - 0.1
    # the training loss on the same training examples, base vs adapter (completion log-likelihood, per token)
    base, adapter = resolve_model(ModelSpec(id=MODEL)), resolve_model(ModelSpec(id=f"adapter:{trained.out}"))
    from labscale.adapt.data import build_split

    kept = {e.id for e in build_split(base, mts, "train", 0, SETTINGS["max_seq_len"]).examples}
    examples = [ex for ex in mts.split("train") if ex.id in kept][:6]
    reqs = [LoglikelihoodRequest(base.render(chat_prompt(mts, parse_setting("zero-shot"), ex, 0)), ex.target)
            for ex in examples]

    def nll(backend):
        res = backend.loglikelihood(reqs)
        return -sum(r.logprob for r in res) / sum(r.n_tokens for r in res)

    assert nll(adapter) < nll(base) - 0.05


def test_the_adapter_changes_generations_and_reloads_exactly(trained, prompts):
    import torch

    adapter = resolve_model(ModelSpec(id=f"adapter:{trained.out}"))
    base = resolve_model(ModelSpec(id=MODEL))
    got = _generate(adapter, prompts)
    assert got != _generate(base, prompts)
    # the in-memory trained model (best checkpoint) and the saved-then-reloaded adapter: identical greedy outputs
    model, tok = trained.model, adapter.tokenizer
    for prompt, text in zip(prompts, got):
        ids = torch.tensor([adapter.encode(prompt)])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                 do_sample=False, eos_token_id=adapter.eos_ids, pad_token_id=tok.pad_token_id)
        assert tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == text


def test_the_card(trained):
    card = json.loads((trained.out / "labscale.json").read_text())
    assert card["base_model"]["id"] == MODEL and card["base_model"]["size_class"] == "tiny"
    assert card["data"]["train"]["examples"] + card["data"]["train"]["skipped_too_long"] == 60
    assert card["recipe"]["name"] == "cpu-tiny-lora" and card["recipe"]["lora_r"] == 16
    a = card["accounting"]
    assert a["energy_kwh"] > 0 and a["co2eq_kg"] > 0 and 0 < a["cost_usd"] < 0.01
    assert card["training"]["train_tokens_per_s"] > 0


def test_qlora_4bit_trains_on_cpu(tmp_path, mts):
    options = FinetuneOptions(model=ModelSpec(id=MODEL, quantization="4bit"), task=mts, max_steps=2,
                              overrides={"max_seq_len": 200, "grad_accum": 2, "eval_every": 2}, out=tmp_path / "q")
    card = finetune(options, say=lambda m: None).card
    assert card["base_model"]["quantization"] == "4bit" and card["recipe"]["name"] == "cpu-tiny-qlora"
    assert card["training"]["steps"] == 2 and card["training"]["best_dev_loss"] < card["training"]["dev_loss_before"]
    adapter = resolve_model(ModelSpec(id=f"adapter:{tmp_path / 'q'}"))
    assert adapter.info.quantization == "4bit"
    prompt = adapter.render([{"role": "user", "content": "Say hello."}])
    assert _generate(adapter, [prompt])[0].strip()


def test_experiment_reuses_the_adapter_into_the_finetuned_table(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exp = write_experiment(
        tmp_path / "smol.yaml", name="smol", models=[MODEL], tasks=["mts-summarization"], settings=["zero-shot"],
        limit=2, generation={"max_new_tokens": 16},
        adaptations=[{"model": MODEL, "task": "mts-summarization", "max_steps": STEPS, "overrides": SETTINGS,
                      "out": str(trained.out)}],
    )
    code, out, err = cli(capsys, monkeypatch, "run", exp)
    assert code == 0, err
    assert "reusing it" in err and counts(out) == (4, 0)
    report = (tmp_path / "runs" / "smol.md").read_text()
    table = report.split("## Results by task — finetuned")[1].split("##")[0]
    assert f"| task (main metric) | {MODEL} |" in table and "| mts-summarization (rougeL, n=2) |" in table
    assert "## Adaptations" in report and "cpu-tiny-lora" in report.split("## Adaptations")[1]
