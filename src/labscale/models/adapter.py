"""`adapter:DIR` — a LoRA adapter folder used as a model: its base model with the adapter always on.

The base model comes from the adapter's `labscale.json` card (the model id it was trained from, e.g.
`embedded:smollm2-135m-instruct`, and its quantization), or, for adapters trained elsewhere, from
`base_model_name_or_path` in `adapter_config.json` (as `hf:<that>`). A card whose base fingerprint differs from the
base model found now is an error: the adapter would be evaluated on other weights than it was trained on.

Tokenizer and chat template are the base model's, exactly as in training. The fingerprint is
sha256(base fingerprint, adapter weights, adapter config without machine-specific paths)[:16], so the generation
cache never mixes the adapter with its base or with another adapter. Weights load lazily; once loaded, the adapter
layers stay enabled, so generation and log-likelihoods (multiple-choice tasks) both run with the adapter active.
The adapter is not merged into the weights: outputs are those of the trained PeftModel, also on a 4-bit base.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from labscale.config import ModelSpec
from labscale.errors import ModelError
from labscale.models.base import ModelInfo
from labscale.models.hf import HFBackend

CARD_FILE = "labscale.json"
ADAPTER_NAME = "labscale"
# adapter_config.json keys that say where the base lived on the training machine, not what the adapter is
_MACHINE_KEYS = {"base_model_name_or_path", "revision", "_name_or_path"}


def read_card(folder: Path) -> dict | None:
    try:
        data = json.loads((folder / CARD_FILE).read_text())
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def adapter_hash(folder: Path) -> str:
    """Hash of what defines the adapter: its weights and its config (without machine-specific paths)."""
    from labscale.models.fingerprint import fingerprint_path

    config = json.loads((folder / "adapter_config.json").read_text())
    h = hashlib.sha256(json.dumps({k: v for k, v in config.items() if k not in _MACHINE_KEYS}, sort_keys=True,
                                  default=str).encode())
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (folder / name).is_file():
            h.update(f"{name}\0{fingerprint_path(folder / name)}".encode())
    return h.hexdigest()[:16]


def base_spec(folder: Path, spec: ModelSpec, card: dict | None) -> ModelSpec:
    """The base model's spec: id from the card (or adapter_config.json); dtype, device and batch size from the
    adapter's own entry; quantization as written there, else as trained."""
    if card and card.get("base_model", {}).get("id"):
        base_id = card["base_model"]["id"]
    else:
        config = json.loads((folder / "adapter_config.json").read_text())
        base = config.get("base_model_name_or_path")
        if not base:
            raise ModelError(f"adapter '{folder}' names no base model", "add base_model_name_or_path to its "
                                                                         "adapter_config.json")
        base_id = f"hf:{base}"
    if base_id.startswith("adapter:"):
        raise ModelError(f"adapter '{folder}' is based on another adapter", "stacked adapters are not supported")
    trained_quant = (card or {}).get("base_model", {}).get("quantization", "none")
    quant = spec.quantization if "quantization" in spec.model_fields_set else trained_quant
    return spec.model_copy(update={"id": base_id, "quantization": quant, "name": None})


class AdapterBackend(HFBackend):
    """A LoRA adapter on its base model, evaluated like any local model."""

    def __init__(self, spec: ModelSpec, folder: str):
        from labscale.models.registry import resolve_model

        path = Path(os.path.expanduser(folder)).resolve()
        if not (path / "adapter_config.json").is_file():
            raise ModelError(f"'{folder}' is not a LoRA adapter folder (no adapter_config.json)",
                             "pass the folder written by `labscale finetune`")
        self.folder = path
        self.card = read_card(path)
        self._adapter_fingerprint: str | None = None
        base = resolve_model(base_spec(path, spec, self.card))
        if not isinstance(base, HFBackend):
            raise ModelError(f"the base model of adapter '{folder}' is not a local model", "use embedded: or hf:")
        self.base = base
        super().__init__(base.spec.model_copy(update={"name": spec.label}), base.source, spec.label,
                         extra=base.extra)

    @property
    def fingerprint(self) -> str:
        """sha256(base fingerprint, adapter hash)[:16]; refuses an adapter trained on other base weights."""
        if self._adapter_fingerprint is None:
            base_fp = self.base.info.fingerprint
            trained_on = (self.card or {}).get("base_model", {}).get("fingerprint")
            if trained_on and trained_on != base_fp:
                raise ModelError(
                    f"adapter '{self.folder}' was trained on base weights {trained_on}, but "
                    f"{self.base.info.name} is now {base_fp}",
                    "evaluate it with the base model it was trained on, or fine-tune again",
                )
            self._adapter_fingerprint = hashlib.sha256(
                f"{base_fp}\0{adapter_hash(self.folder)}".encode()).hexdigest()[:16]
        return self._adapter_fingerprint

    def describe(self) -> ModelInfo:
        info = super().describe()
        info.backend = "adapter"
        summary = (self.card or {}).get("summary")
        info.adaptation = summary
        info.extra.update(adapter=str(self.folder), base_model=self.base.info.name,
                          base_fingerprint=self.base.info.fingerprint, **({"adaptation": summary} if summary else {}))
        return info

    @property
    def model(self):
        if not self.loaded:
            _ = super().model  # the base weights
            self.load_adapter(ADAPTER_NAME, self.folder)
            self.pin_adapter(ADAPTER_NAME)  # always on: requests need no adapter name
        return super().model

    def load_adapter(self, name: str, path) -> None:
        if name != ADAPTER_NAME:
            raise ModelError("an adapter: model holds exactly one adapter", "serve several adapters with "
                                                                            "`labscale serve --adapter`")
        super().load_adapter(name, path)
