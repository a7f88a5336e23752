"""Where a local model's files come from, and how its config, tokenizer and weights are loaded.

Source. `hf:<x>` names a local folder when `x` starts like a path (`.`, `/`, `~`), has more than one slash, or
exists on disk; otherwise a hub id (`name` or `owner/name`, at the entry's `revision`). When the hub is unreachable
(HF_HUB_OFFLINE, no DNS) hub ids load from the local HF cache at once instead of after ~25 s of retries. Every
failure to load is a one-line `ModelError` naming the folder or the hub id.

Device and dtype. `device: auto` is `cuda` when available, else `cpu`; `dtype: auto` is bfloat16 on CUDA and
float32 on CPU.

Quantization (bitsandbytes). `8bit` is LLM.int8(); `4bit` is NF4 with double quantization (QLoRA), computing in
the dtype the caller names. `quantization_config` is the one place these settings are written: evaluation
(`Loader.causal_lm` from `HFBackend.model`) and training (`HFBackend.load_for_training`) both use it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import warnings
from pathlib import Path
from typing import Any

from labscale.errors import ModelError
from labscale.hub import hub_reachable


def looks_like_local_path(s: str) -> bool:
    """A hub id is `name` or `owner/name`; anything starting like a path, with more slashes, or existing on disk
    is a local path."""
    return (
        s.startswith((".", "/", "~"))
        or s.count("/") > 1
        or "\\" in s
        or Path(os.path.expanduser(s)).exists()
    )


def resolve_device(device: str) -> str:
    """`auto` → cuda when available (in a data-parallel launch, this process's GPU: cuda:$LOCAL_RANK), else cpu;
    anything else as written."""
    import torch

    if device == "auto":
        if not torch.cuda.is_available():
            return "cpu"
        rank = os.environ.get("LOCAL_RANK")
        if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and rank and rank.isdigit():
            return f"cuda:{int(rank) % torch.cuda.device_count()}"
        return "cuda"
    return device


def resolve_dtype(dtype: str, device: str):
    """`auto` → bfloat16 on CUDA, float32 elsewhere; else the torch dtype of that name."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def quantization_config(quantization: str, compute_dtype):
    """The bitsandbytes config for `quantization` (none | 8bit | 4bit), or None for none."""
    if quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ModelError(
            f"quantization '{quantization}' needs the bitsandbytes package", "pip install 'labscale[quant]'"
        ) from None
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


class Loader:
    """A local folder or a hub id (at a revision), and the three things loaded from it."""

    def __init__(self, path_or_id: str, revision: str | None = None):
        self.is_local = looks_like_local_path(path_or_id)
        self.source = str(Path(os.path.expanduser(path_or_id)).resolve()) if self.is_local else path_or_id
        self.revision = revision
        if self.is_local and not Path(self.source).exists():
            raise ModelError(f"model path '{path_or_id}' does not exist", "check the path in hf:<local path>")

    def hub_error(self, e: Exception) -> ModelError:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        return ModelError(
            f"cannot load '{self.source}' from the Hugging Face hub: {reason}",
            "check the id; hub models need network access (or a copy in the local HF cache), or use hf:<local path>",
        )

    def load_kwargs(self) -> dict:
        """`from_pretrained` keyword arguments every load shares: the revision, and offline use of the cache."""
        kw: dict[str, Any] = {}
        if not self.is_local and self.revision:
            kw["revision"] = self.revision
        if not self.is_local and not hub_reachable():
            kw["local_files_only"] = True  # use the local HF cache at once instead of ~25 s of retries
        return kw

    def wrap(self, fn, what: str):
        """`fn()`, with loading errors turned into one-line ModelErrors (`what`: config, tokenizer, weights)."""
        try:
            return fn()
        except ModelError:
            raise
        except (OSError, ValueError, EnvironmentError) as e:
            if not self.is_local:
                raise self.hub_error(e) from None
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(
                f"cannot load the {what} of '{self.source}': {first}", "is it a transformers model folder?"
            ) from None

    def config(self):
        from transformers import AutoConfig

        kw = self.load_kwargs()
        return self.wrap(lambda: AutoConfig.from_pretrained(self.source, **kw), "config")

    def tokenizer(self):
        from transformers import AutoTokenizer

        kw = self.load_kwargs()
        return self.wrap(lambda: AutoTokenizer.from_pretrained(self.source, **kw), "tokenizer")

    def causal_lm(self, dtype, quantization: str = "none", compute_dtype=None, device_map: dict | None = None):
        """The weights as an AutoModelForCausalLM (in whatever mode transformers leaves it)."""
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        kw = self.load_kwargs()
        kw["dtype"] = dtype
        if device_map is not None:
            kw["device_map"] = device_map
        qc = quantization_config(quantization, compute_dtype if compute_dtype is not None else dtype)
        if qc is not None:
            kw["quantization_config"] = qc
        if quantization == "8bit":  # bitsandbytes warns on every matmul of a float32 model
            warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
        hf_logging.disable_progress_bar()  # labscale shows its own progress
        return self.wrap(lambda: AutoModelForCausalLM.from_pretrained(self.source, **kw), "weights")


@contextlib.contextmanager
def oom_guard(model_name: str, device: str, batch_size: int):
    """Out of accelerator memory inside the block → a one-line ModelError suggesting a smaller batch."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise ModelError(
            f"{model_name} ran out of memory on {device} with a batch of {batch_size}",
            "lower batch_size for this model in the experiment file, or use quantization: 4bit",
        ) from None
