"""Adaptation: LoRA / QLoRA fine-tuning of local models, with recipes, validation, cost, carbon and a budget.

`finetune.py` runs a job (also from `labscale finetune` and experiment `adaptations:`), `recipes.py` holds the
hyper-parameter table, `data.py` renders training examples exactly as evaluation renders prompts, `trainer.py` is
TRL's SFTTrainer with a completion-only head, `budget.py` / `carbon.py` / `ledger.py` account for money and CO2eq,
`card.py` writes the adapter's `labscale.json`, `tracking.py` wires optional W&B / MLflow, and `experiment.py`
connects adaptations to the planner. See docs/finetune.md.
"""
