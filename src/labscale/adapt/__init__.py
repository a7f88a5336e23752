"""Adaptation: LoRA / QLoRA fine-tuning of local models, with recipes, validation, cost, carbon and a budget.

`finetune.py` prepares and runs a job (also from `labscale finetune` and experiment `adaptations:`; the options
are config.FinetuneSpec), `session.py` is what every training run shares (announce, estimate / refuse, metering,
budget stop, canaries, card), `sft.py` trains with TRL and `dp.py` with DP-SGD, `recipes.py` holds the
hyper-parameter table, `data.py` renders training examples exactly as evaluation renders prompts, `trainer.py` is
TRL's SFTTrainer with a completion-only head, `budget.py` / `carbon.py` / `ledger.py` account for money and CO2eq,
`card.py` writes the adapter's `labscale.json`, `tracking.py` wires optional W&B / MLflow, and `experiment.py`
connects adaptations to the planner. See docs/finetune.md. Distillation (docs/distill.md): `distill.py` (task
distillation — a teacher labels a task's train inputs through the generation cache, rationales, the teacher's
budget and accounting, `labscale distill`) and `instructions.py` (LaMini instruction generation, filters and
responses) train their students with the same machinery.
"""
