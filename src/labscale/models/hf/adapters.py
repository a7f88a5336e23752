"""LoRA adapters on one in-memory model, selectable per request (and so per row of a batch).

`Adapters.load(model, name, folder)` loads a peft LoRA adapter onto the model (`PeftModel` for the first,
`load_adapter` for the rest); `GenerationRequest.adapter` selects it per request. Adapter layers are disabled
except while a batch that uses one runs (`scope`): then every forward pass (prefill groups, decode steps, the
`model.generate` fallback) gets peft's `adapter_names`, one per row ("__base__" for none), so requests for
different adapters and the base model share a batch. A batch without adapter requests runs exactly as it would
with no adapter loaded. `pin(name)` instead keeps one adapter always on (the `adapter:` backend): requests then need
no adapter name.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import warnings
from pathlib import Path

from labscale.errors import ModelError

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch


def _import_peft():
    bnb_log = logging.getLogger("bitsandbytes")  # peft imports bitsandbytes, which warns about CPU kernels
    level = bnb_log.level
    bnb_log.setLevel(logging.ERROR)
    try:
        from peft import PeftModel
    except ImportError:
        raise ModelError("LoRA adapters need the peft package", "pip install peft") from None
    finally:
        bnb_log.setLevel(level)
    return PeftModel


def check_lora_folder(name: str, path: str | Path) -> Path:
    """The resolved folder of a LoRA (not DoRA) peft adapter; one-line errors otherwise."""
    folder = Path(os.path.expanduser(str(path))).resolve()
    try:
        cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise ModelError(f"'{path}' is not a peft adapter folder (no readable adapter_config.json)",
                         "check the path") from None
    if cfg.get("peft_type") != "LORA" or cfg.get("use_dora"):
        kind = "DoRA" if cfg.get("use_dora") else cfg.get("peft_type")
        raise ModelError(f"adapter '{name}' is {kind}, not LoRA", "only LoRA adapters can share a batch")
    return folder


class Adapters:
    """The adapters loaded onto one model: name → folder, and the PeftModel wrapping the model once there is one."""

    def __init__(self):
        self.peft = None
        self.folders: dict[str, str] = {}
        self.pinned: str | None = None
        self._depth = 0  # open `scope`s

    def load(self, load_model, name: str, path: str | Path, model_name: str) -> None:
        """Load the adapter in `path` as `name` onto the model `load_model()` returns (called once the adapter
        folder checked out, so a bad folder fails before the weights load)."""
        if not name or name == BASE_ADAPTER or name in self.folders:
            raise ModelError(f"adapter name '{name}' is empty, reserved or already used", "pick another name")
        folder = check_lora_folder(name, path)
        PeftModel = _import_peft()
        model = load_model()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # peft's deprecation notices about transformers internals
                if self.peft is None:
                    self.peft = PeftModel.from_pretrained(model, str(folder), adapter_name=name)
                else:
                    self.peft.load_adapter(str(folder), adapter_name=name)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            lines = [x.strip() for x in str(e).splitlines() if x.strip()] or [type(e).__name__]
            first = next((x for x in lines if "size mismatch" in x), lines[0])[:200].rstrip(":")
            raise ModelError(f"cannot load adapter '{name}' from '{path}': {first}",
                             f"is it a LoRA adapter trained for {model_name}?") from None
        self.peft.eval()
        if self.pinned is None:
            self.peft.base_model.disable_adapter_layers()  # the plain model is the base model; see `scope`
        self.folders[name] = str(folder)

    def pin(self, name: str) -> None:
        """Keep adapter `name` on for every request (no per-request selection)."""
        self.peft.base_model.set_adapter(name)
        self.peft.base_model.enable_adapter_layers()
        self.pinned = name

    def check(self, names: list[str | None]) -> None:
        for a in names:
            if a is not None and a not in self.folders:
                known = ", ".join(sorted(self.folders)) or "none"
                raise ModelError(f"unknown adapter '{a}' (loaded: {known})", "load it with load_adapter")

    def row_names(self, adapters: list[str | None] | None) -> list[str] | None:
        """peft's per-row adapter names for a batch, or None when no row uses an adapter."""
        if not adapters or not any(adapters):
            return None
        return [a or BASE_ADAPTER for a in adapters]

    @contextlib.contextmanager
    def scope(self, names: list[str] | None):
        """Adapter layers on for the duration of a batch that uses adapters (off otherwise); scopes nest (a
        continuous batch keeps them on while a fallback batch inside it opens its own)."""
        if names is None:
            yield
            return
        if self._depth == 0:
            self.peft.base_model.enable_adapter_layers()
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.peft.base_model.disable_adapter_layers()

    def forward(self, model, names: list[str] | None):
        """The forward for a batch whose rows use adapters `names` (None: `model` itself)."""
        return model if names is None else functools.partial(self.peft, adapter_names=names)

    def generating_model(self, model, names: list[str] | None):
        """(the module whose `.generate` to call, extra keyword arguments) for a batch using `names`."""
        return (model, {}) if names is None else (self.peft, {"adapter_names": names})
