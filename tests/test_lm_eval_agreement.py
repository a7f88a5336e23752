"""labscale's log-likelihood scoring (shared-prefix packing, models/hf/loglikelihood.py) against
lm-evaluation-harness's `hf` backend on the same model and OpenBookQA questions: the same choice per question
(acc and acc_norm) and the same per-choice log-likelihoods within float noise. lm_eval is a test-only dependency
(the dev extra); the test skips where it is not installed.
"""

from __future__ import annotations

import math

import pytest

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

N = 6  # questions



def test_choices_equal_lm_eval_hf(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from labscale.config import ModelSpec
    from labscale.models.base import LoglikelihoodRequest
    from labscale.models.embedded import ensure_converted
    from labscale.models.registry import resolve_model
    from labscale.settings.setting import loglikelihood_prompt, parse_setting
    from labscale.tasks.lm_eval_task import picks, write_lm_eval_task
    from labscale.tasks.registry import get_task

    task = get_task("openbookqa", tmp_path)
    examples = task.split("test", N)
    tasks = write_lm_eval_task(examples, tmp_path)
    folder = ensure_converted("smollm2-135m-instruct")
    out = simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32", tasks=["obqa_local"],
                          task_manager=TaskManager(include_path=str(tasks)), batch_size=4,
                          device="cpu", log_samples=True)
    theirs = {s["doc"]["id"]: [float(r[0]) for r in s["filtered_resps"]] for s in out["samples"]["obqa_local"]}

    backend = resolve_model(ModelSpec(id="embedded:smollm2-135m-instruct", batch_size=4))
    setting = parse_setting("zero-shot")
    reqs, spans = [], []
    for ex in examples:
        context, continuations = loglikelihood_prompt(task, setting, ex, 0)
        spans.append((len(reqs), len(continuations)))
        reqs += [LoglikelihoodRequest(context, c) for c in continuations]
    results = backend.loglikelihood(reqs)
    assert backend.pack_loglikelihoods and backend.pack_verified  # the shared-prefix path did the scoring
    for ex, (start, k) in zip(examples, spans):
        ours = [r.logprob for r in results[start : start + k]]
        assert picks(ours, ex.choices) == picks(theirs[ex.id], ex.choices), ex.id
        for a, b in zip(ours, theirs[ex.id]):
            assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-3), (ex.id, ours, theirs[ex.id])
    backend.close()
