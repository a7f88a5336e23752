"""TRL's SFTTrainer with a completion-only LM head: the loss is computed on completion tokens only, and only their
hidden states go through the LM head.

SFTTrainer's own loss projects every position through the LM head (on CPU it scores all of them) and computes
entropy and accuracy over the full vocabulary. With the prompt masked, most of that is thrown away: a
clinical-dialogue prompt is ~80% of the tokens, and SmolLM2-135M's LM head is a fifth of its forward FLOPs. Here
`model(..., completion_loss=True)` runs the backbone, selects the positions whose next-token label is a completion
token, and projects only those (logit scaling and soft-capping applied as the model's own head would). The loss is
the summed negative log-likelihood divided by the number of completion tokens in the whole optimizer step
(`num_items_in_batch`), i.e. exactly the token-mean loss the Trainer's gradient accumulation expects; accuracy is
logged from the same logits. Rows may carry a loss weight (`weight`, rationale distillation): each row's summed
NLL is then scaled by it before the division.

The head is installed on the base model's `forward`, so the call still goes through DDP, PEFT and gradient
checkpointing like any forward pass (nothing else is bypassed).
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput
from trl import SFTTrainer

from labscale.adapt.data import IGNORE


@dataclass
class CompletionLossOutput(ModelOutput):
    loss: torch.Tensor | None = None  # summed NLL over completion tokens
    n_tokens: torch.Tensor | None = None
    n_correct: torch.Tensor | None = None
    row_nll: torch.Tensor | None = None  # summed NLL per row (DP training clips each example's own loss)
    row_tokens: torch.Tensor | None = None  # completion tokens per row


def _logit_transform(config):
    """(scale, soft cap) the model applies to its logits, read from the config like TRL's fused head does."""
    text = config.get_text_config()
    scale = getattr(text, "logit_scale", None)
    if scale is None:
        scale = getattr(text, "output_multiplier", None)
    if scale is None:
        scale = getattr(text, "lm_head_multiplier", None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scale = text.logits_scaling if text.model_type == "hyperclovax" else 1 / text.logits_scaling
    return (1.0 if scale is None else float(scale)), getattr(text, "final_logit_softcapping", None)


def add_completion_head(model) -> None:
    """Patch `model.forward` (a causal LM, before or inside PEFT) to accept `completion_loss=True`."""
    inner = model.forward
    scale, softcap = _logit_transform(model.config)

    @functools.wraps(type(model).forward)
    def forward(self, *args, completion_loss=False, labels=None, **kwargs):
        if not completion_loss:
            if labels is not None:
                kwargs["labels"] = labels
            return inner(*args, **kwargs)
        kwargs.pop("num_items_in_batch", None)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        mask = targets != IGNORE
        head = self.get_output_embeddings()
        logits = head(hidden[mask].to(head.weight.device)).float()
        if scale != 1.0:
            logits = logits * scale
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        wanted = targets[mask].to(logits.device)
        token_nll = F.cross_entropy(logits, wanted, reduction="none")
        rows = mask.nonzero()[:, 0].to(logits.device)
        row_nll = token_nll.new_zeros(mask.shape[0]).index_add(0, rows, token_nll)
        correct = (logits.detach().argmax(-1) == wanted).sum()
        return CompletionLossOutput(loss=token_nll.sum(), n_tokens=mask.sum(), n_correct=correct, row_nll=row_nll,
                                    row_tokens=mask.sum(1))

    model.forward = types.MethodType(forward, model)


class CompletionSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss uses the completion-only head (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        add_completion_head(base)
        self.loss_is_scaled_for_ga = True  # compute_loss divides by the step's completion tokens itself
        collate = self.data_collator

        def weighted(examples):
            """The collator's batch plus `row_weight` when the rows carry loss weights (data.TrainExample)."""
            batch = collate(examples)
            if "weight" in examples[0]:
                batch["row_weight"] = torch.tensor([float(e["weight"]) for e in examples])
            return batch

        self.data_collator = weighted

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "weight" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "weight"]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        weights = inputs.get("row_weight")
        inputs = {k: v for k, v in inputs.items() if k not in ("use_cache", "row_weight")}
        out = model(**inputs, completion_loss=True)
        total = out.loss if weights is None else (out.row_nll * weights.to(out.row_nll.device)).sum()
        if num_items_in_batch is None:
            loss = total / out.n_tokens.clamp(min=1)
            if mode == "train":
                loss = loss / getattr(self, "current_gradient_accumulation_steps", 1)
        else:
            loss = total / torch.as_tensor(num_items_in_batch, device=out.loss.device).clamp(min=1)
            if self.args.average_tokens_across_devices:  # counted over all ranks; DDP averages gradients
                loss = loss * self.accelerator.num_processes
        n = self.accelerator.gather_for_metrics(out.n_tokens.detach().reshape(1)).sum()
        correct = self.accelerator.gather_for_metrics(out.n_correct.reshape(1)).sum()
        self._metrics[mode]["mean_token_accuracy"].append((correct / n).item() if n > 0 else 0.0)
        return (loss, out) if return_outputs else loss
