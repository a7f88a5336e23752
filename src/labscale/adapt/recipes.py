"""Fine-tuning recipes: a readable table of LoRA / QLoRA hyper-parameters keyed by model size class, task type,
quantization and hardware class, and `pick_recipe` that chooses one (`--recipe auto`) or looks one up by name.

Keys. Size class by parameter count: `tiny` (< 0.6B: SmolLM2-135M/360M, Qwen2.5-0.5B), `small` (0.6–4B), `7b`
(4–10B), `13b` (10–20B). Task type: `generate` (long outputs, e.g. summaries) or `short` (classify and
multiple-choice: an answer of a few tokens). Quantization: `none`, `8bit`, `4bit` (QLoRA). Hardware: `cpu`,
`t4` (16 GB T4 class), `a100` (40 GB A100 class). A key of `*` matches anything; `auto` picks the matching recipe
with the fewest `*`, and fails with a one-line error when none matches.

Sources. The 7B/13B QLoRA rows follow the QLoRA paper (Dettmers et al. 2023, appendix B: r=64, alpha=16, dropout
0.1 up to 13B, all linear layers, lr 2e-4, constant schedule, effective batch 16, max grad norm 0.3, paged AdamW).
The LoRA rows use the common r=16, alpha=32 (Hu et al. 2021; the PEFT / TRL examples). The CPU rows are sized for a
laptop: micro-batch 1 (no padding at all) with gradient accumulation, no gradient checkpointing.

Every field can be overridden (`--set FIELD=VALUE`, or `overrides:` in the experiment file).
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from labscale.errors import ConfigError

SIZE_CLASSES = ("tiny", "small", "7b", "13b")
HARDWARE_CLASSES = ("cpu", "t4", "a100")
TASK_KINDS = ("generate", "short")


class Recipe(BaseModel):
    """One row of the table: what LoRA to attach and how to train it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    size: str = Field(description="size class: tiny | small | 7b | 13b | *")
    task: str = Field(description="generate | short | *")
    quant: str = Field(description="none | 8bit | 4bit | *")
    hardware: str = Field(description="cpu | t4 | a100 | *")
    lora_r: int = Field(ge=1)
    lora_alpha: float = Field(gt=0)
    lora_dropout: float = Field(ge=0, lt=1)
    target_modules: Union[Literal["all-linear"], list[str]] = "all-linear"
    learning_rate: float = Field(gt=0)
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "cosine"
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    batch_size: int = Field(ge=1, description="micro-batch per device")
    grad_accum: int = Field(ge=1, description="micro-batches per optimizer step")
    max_seq_len: int = Field(ge=16, description="longer examples are skipped (and counted), never truncated")
    epochs: float = Field(3.0, gt=0)
    max_steps: Optional[int] = Field(None, ge=1, description="overrides epochs")
    eval_every: int = Field(10, ge=1, description="steps between dev-loss evaluations (and checkpoints)")
    patience: int = Field(3, ge=0, description="evaluations without improvement before stopping; 0: never")
    gradient_checkpointing: bool = False
    packing: bool = Field(False, description="pack examples into max_seq_len rows (best with flash-attention)")
    optimizer: str = "adamw_torch"
    note: str = ""

    @field_validator("target_modules", mode="before")
    @classmethod
    def _modules(cls, v):
        if isinstance(v, str) and v != "all-linear":
            return [m.strip() for m in v.strip("[]").split(",") if m.strip()]
        return v

    def steps(self, n_train: int, world_size: int = 1) -> int:
        """Optimizer steps: max_steps, else epochs over `n_train` examples at the effective batch."""
        if self.max_steps is not None:
            return self.max_steps
        per_epoch = math.ceil(n_train / (self.batch_size * self.grad_accum * world_size))
        return max(1, math.ceil(per_epoch * self.epochs))

    def lora_config(self):
        """peft's LoraConfig for this recipe (both trainers attach exactly this)."""
        from peft import LoraConfig

        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=self.target_modules, bias="none", task_type="CAUSAL_LM")

    def training_fields(self) -> dict:
        """What determines the trained adapter (the match keys, name and note do not)."""
        return self.model_dump(mode="json", exclude={"name", "size", "task", "quant", "hardware", "note"})


_QLORA_PAPER = "QLoRA paper (Dettmers et al. 2023), appendix B"

_CPU_TINY = dict(lora_r=16, lora_alpha=32, lora_dropout=0.05, learning_rate=3e-4, batch_size=1, grad_accum=8,
                 max_seq_len=1024, epochs=3, eval_every=5, patience=3, lr_scheduler="cosine", warmup_ratio=0.05)

# GPU LoRA defaults, and the QLoRA paper's hyper-parameters (r 64, alpha 16, constant LR, paged AdamW, clip 0.3).
_GPU_LORA = dict(lora_r=16, lora_alpha=32, lora_dropout=0.05, epochs=3)
_QLORA = dict(lora_r=64, lora_alpha=16, lora_dropout=0.1, learning_rate=2e-4, lr_scheduler="constant",
              warmup_ratio=0.03, max_grad_norm=0.3, epochs=3, eval_every=20, gradient_checkpointing=True,
              optimizer="paged_adamw_32bit")

RECIPES: list[Recipe] = [
    # --- laptop / cloud CPU: tiny models only -------------------------------------------------------------------
    Recipe(name="cpu-tiny-lora", size="tiny", task="generate", quant="none", hardware="cpu", **_CPU_TINY,
           note="micro-batch 1 + accumulation: no padding; fp32"),
    Recipe(name="cpu-tiny-lora-short", size="tiny", task="short", quant="none", hardware="cpu",
           **{**_CPU_TINY, "max_seq_len": 512, "epochs": 2, "grad_accum": 16, "eval_every": 10},
           note="short answers: more examples per step, fewer epochs"),
    Recipe(name="cpu-tiny-qlora", size="tiny", task="*", quant="4bit", hardware="cpu",
           **{**_CPU_TINY, "learning_rate": 2e-4},
           note="NF4 base on CPU: works, slower than fp32 LoRA at this size"),
    Recipe(name="cpu-tiny-lora8", size="tiny", task="*", quant="8bit", hardware="cpu",
           **{**_CPU_TINY, "learning_rate": 2e-4}),
    # --- 16 GB T4 -------------------------------------------------------------------------------------------------
    Recipe(name="t4-tiny-lora", size="tiny", task="*", quant="*", hardware="t4", **_GPU_LORA, learning_rate=3e-4,
           batch_size=8, grad_accum=1, max_seq_len=1024, eval_every=10),
    Recipe(name="t4-small-lora", size="small", task="*", quant="none", hardware="t4", **_GPU_LORA,
           learning_rate=2e-4, batch_size=4, grad_accum=4, max_seq_len=1024, eval_every=20,
           gradient_checkpointing=True),
    Recipe(name="t4-small-qlora", size="small", task="*", quant="4bit", hardware="t4", **_QLORA, batch_size=4,
           grad_accum=4, max_seq_len=1024, note=_QLORA_PAPER),
    Recipe(name="t4-7b-qlora", size="7b", task="*", quant="4bit", hardware="t4", **_QLORA, batch_size=1,
           grad_accum=16, max_seq_len=1024, note=_QLORA_PAPER + "; the ~$25 single-GPU setting"),
    # --- 40 GB A100 -----------------------------------------------------------------------------------------------
    Recipe(name="a100-small-lora", size="small", task="*", quant="*", hardware="a100", **_GPU_LORA,
           learning_rate=2e-4, batch_size=16, grad_accum=1, max_seq_len=2048, eval_every=20),
    Recipe(name="a100-tiny-lora", size="tiny", task="*", quant="*", hardware="a100", **_GPU_LORA,
           learning_rate=3e-4, batch_size=16, grad_accum=1, max_seq_len=2048, eval_every=10),
    Recipe(name="a100-7b-lora", size="7b", task="*", quant="none", hardware="a100", **_GPU_LORA, learning_rate=2e-4,
           batch_size=4, grad_accum=4, max_seq_len=2048, eval_every=20, gradient_checkpointing=True),
    Recipe(name="a100-7b-qlora", size="7b", task="*", quant="4bit", hardware="a100", **_QLORA, batch_size=8,
           grad_accum=2, max_seq_len=2048, note=_QLORA_PAPER),
    Recipe(name="a100-13b-qlora", size="13b", task="*", quant="4bit", hardware="a100", **_QLORA, batch_size=4,
           grad_accum=4, max_seq_len=2048, note=_QLORA_PAPER),
]


def size_class(parameters: int | None) -> str:
    """The size class of a model with this many parameters (unknown counts as `small`)."""
    if parameters is None:
        return "small"
    billions = parameters / 1e9
    if billions < 0.6:
        return "tiny"
    if billions < 4:
        return "small"
    if billions < 10:
        return "7b"
    return "13b"


def task_kind(task_type: str) -> str:
    return "generate" if task_type == "generate" else "short"


def _matches(recipe: Recipe, keys: dict[str, str]) -> bool:
    return all(getattr(recipe, k) in ("*", v) for k, v in keys.items())


def get_recipe(name: str) -> Recipe:
    for r in RECIPES:
        if r.name == name:
            return r
    raise ConfigError(f"unknown recipe '{name}'", f"use auto or one of: {', '.join(r.name for r in RECIPES)} "
                                                  "(see `labscale recipes`)")


def pick_recipe(name: str, size: str, task: str, quant: str, hardware: str) -> Recipe:
    """`auto`: the matching recipe with the fewest wildcards (first in table order on a tie); else by name."""
    if name != "auto":
        return get_recipe(name)
    keys = {"size": size, "task": task, "quant": quant, "hardware": hardware}
    found = [r for r in RECIPES if _matches(r, keys)]
    if not found:
        raise ConfigError(
            f"no recipe for a {size} model, {task} task, quantization {quant} on {hardware}",
            "name one with --recipe (see `labscale recipes`) and override fields with --set, or use another "
            "--quant / --hardware",
        )
    return min(found, key=lambda r: sum(getattr(r, k) == "*" for k in keys))


def apply_overrides(recipe: Recipe, overrides: dict) -> Recipe:
    """The recipe with `overrides` (field -> value; strings are converted) applied and validated."""
    if not overrides:
        return recipe
    fixed = {"name", "size", "task", "quant", "hardware"}
    bad = sorted(set(overrides) & fixed)
    if bad:
        raise ConfigError(f"recipe field '{bad[0]}' cannot be overridden", "pick another recipe with --recipe")
    unknown = sorted(set(overrides) - set(Recipe.model_fields))
    if unknown:
        fields = ", ".join(f for f in Recipe.model_fields if f not in fixed | {"note"})
        raise ConfigError(f"unknown recipe field '{unknown[0]}'", f"overridable fields: {fields}")
    data = {**recipe.model_dump(), **{k: _coerce(v) for k, v in overrides.items()}}
    try:
        return Recipe(**data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"recipe override '{where}': {first['msg']}", "see `labscale recipes` for the fields") \
            from None


def _coerce(v):
    if isinstance(v, str):
        low = v.strip().lower()
        if low in ("none", "null"):
            return None
        if low in ("true", "false"):
            return low == "true"
    return v


def parse_set(items: list[str]) -> dict:
    """`--set FIELD=VALUE` arguments to an overrides dict."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set '{item}' is not FIELD=VALUE", "e.g. --set lora_r=8 --set learning_rate=1e-4")
        out[key.strip()] = value.strip()
    return out


def describe(recipe: Recipe, steps: int | None = None) -> list[tuple[str, str]]:
    """(field, value) rows for printing a recipe."""
    targets = recipe.target_modules if isinstance(recipe.target_modules, str) else ",".join(recipe.target_modules)
    rows = [
        ("recipe", recipe.name + (f" — {recipe.note}" if recipe.note else "")),
        ("for", f"size {recipe.size} · task {recipe.task} · quant {recipe.quant} · hardware {recipe.hardware}"),
        ("LoRA", f"r={recipe.lora_r} alpha={recipe.lora_alpha:g} dropout={recipe.lora_dropout:g} on {targets}"),
        ("optimizer", f"{recipe.optimizer} lr={recipe.learning_rate:g} ({recipe.lr_scheduler}, warmup "
                      f"{recipe.warmup_ratio:g}) weight decay {recipe.weight_decay:g} max grad norm "
                      f"{recipe.max_grad_norm:g}"),
        ("batch", f"{recipe.batch_size} × {recipe.grad_accum} accumulation · max_seq_len {recipe.max_seq_len}"
                  + (" · packing" if recipe.packing else "")
                  + (" · gradient checkpointing" if recipe.gradient_checkpointing else "")),
        ("length", (f"{recipe.max_steps} steps" if recipe.max_steps else f"{recipe.epochs:g} epochs")
                   + (f" = {steps} steps" if steps is not None and not recipe.max_steps else "")
                   + f" · dev loss every {recipe.eval_every} steps · patience {recipe.patience}"),
    ]
    return rows
