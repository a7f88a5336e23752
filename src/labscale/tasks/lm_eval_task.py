"""labscale's OpenBookQA questions as an lm-evaluation-harness task, for checking labscale against lm-eval.

`write_lm_eval_task(examples, folder)` writes the questions as JSONL and a task `obqa_local` (lm-eval's own
`openbookqa.yaml`, with a local `dataset_path`: context = the question stem, continuations = the choice texts,
acc and acc_norm) into `folder/tasks`; pass that folder to lm-eval as `--include_path`. `lm_eval_samples(out)`
reads the per-choice log-likelihoods lm-eval logged (`--log_samples`), and `picks(lls, choices)` makes the
choice lm-eval's multiple_choice `process_results` makes (acc: the largest log-likelihood; acc_norm: the largest
per character of the choice). Used by benchmarks/loglikelihood_throughput.py and the lm-eval agreement tests.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from labscale.example import Example

TASK_NAME = "obqa_local"
TASK_YAML = """task: obqa_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
output_type: multiple_choice
test_split: test
doc_to_text: question_stem
doc_to_target: "{{{{choices.label.index(answerKey.lstrip())}}}}"
doc_to_choice: "{{{{choices.text}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_lm_eval_task(examples: Sequence[Example], folder: Path) -> Path:
    """The folder to pass as lm-eval's `--include_path` (task `obqa_local` over these four-choice questions)."""
    letters = "ABCD"
    data = folder / "obqa.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps({"id": ex.id, "question_stem": ex.input, "answerKey": letters[int(ex.gold)],
                                "choices": {"text": list(ex.choices or ()), "label": list(letters)}}) + "\n")
    tasks = folder / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / f"{TASK_NAME}.yaml").write_text(TASK_YAML.format(path=data), encoding="utf-8")
    return tasks


def lm_eval_samples(out: Path) -> dict[str, list[float]]:
    """{question id: per-choice log-likelihoods} from the newest samples file lm-eval wrote under `out`."""
    samples = sorted(out.rglob(f"samples_{TASK_NAME}_*.jsonl"))
    if not samples:
        raise FileNotFoundError(f"lm-eval wrote no samples under {out}")
    per = {}
    for line in samples[-1].read_text(encoding="utf-8").splitlines():
        s = json.loads(line)
        per[s["doc"]["id"]] = [float(r[0]) for r in s["filtered_resps"]]
    return per


def picks(lls: Sequence[float], choices: Sequence[str]) -> tuple[int, int]:
    """(acc's choice, acc_norm's choice), as lm-eval's multiple_choice process_results."""
    norm = [ll / float(len(c)) for ll, c in zip(lls, choices)]
    return max(range(len(lls)), key=lambda i: (lls[i], -i)), max(range(len(norm)), key=lambda i: (norm[i], -i))
