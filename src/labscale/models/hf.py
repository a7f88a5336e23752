"""The local transformers backend: any causal LM folder or hub id, on CPU or CUDA, optionally 8/4-bit quantized.

Loading is lazy: the constructor reads nothing; `render`/`count_tokens` load the tokenizer; `info` reads the
config; `generate`/`loglikelihood` load the weights.

Rendering. A chat prompt (list of messages) goes through the tokenizer's chat template with the generation
prompt. A model without a chat template gets this plain format, one block per message, blank-line separated,
ending with the assistant cue (no trailing space)::

    System: <content>

    User: <content>

    Assistant: <content>

    User: <content>

    Assistant:

A str prompt is used as-is.

Tokenization. Text is encoded without the tokenizer's automatic special tokens (chat templates already contain
them), except that a BOS token is prepended when the tokenizer normally adds one and the text does not already
start with it. `count_tokens`, `generate` and `loglikelihood` all use this same encoding.

Generation. Requests are grouped by decoding parameters, sorted by prompt length (longest first) and run in
batches of `spec.batch_size`. Within a batch (see `_generate_fast`): prompts are prefilled in length groups,
right-padded without a mask (causal attention keeps each row exact), their key/value caches laid out
left-padded in preallocated buffers; then one token per row and step is decoded with explicit position ids and
an attention mask, finished rows are dropped from the batch, and attention runs per bucket of similar-length
rows over only the keys those rows use. Models this does not suit (sliding-window or recurrent caches, no
position ids) fall back to one left-padded `model.generate` call per batch. Greedy when temperature is 0, else
sampling with temperature and top_p (top_k off) after `torch.manual_seed(seed)` per batch. The model's own
`generation_config` sampling defaults (repetition penalty, top_k, …) are not applied: the experiment's decoding
parameters are the whole story. A row stops at EOS (the tokenizer's and the generation config's) or once its
generated text contains a stop string; its text is then cut at the first stop string. Greedy batched output
equals one-at-a-time `model.generate` output (tested); in floating point the two can in principle differ on a
near-tie, as any change of batch shape can.

LoRA adapters. `load_adapter(name, path)` loads a peft adapter onto the one in-memory model (`PeftModel`
for the first, `load_adapter` for the rest); `GenerationRequest.adapter` selects it per request. Adapter layers
are disabled except while a batch that uses one runs: then every forward pass (prefill groups, decode steps,
the `model.generate` fallback) gets peft's `adapter_names`, one per row ("__base__" for none), so requests for
different adapters and the base model share a batch. A batch without adapter requests runs exactly as it would
with no adapter loaded.

Streaming. `generate(..., on_token=f)` calls `f(request index, token id)` for every new token as the fast path
produces it (EOS included); the `model.generate` fallback produces no per-token calls.

Log-likelihoods follow lm-evaluation-harness: whitespace at the end of the context moves to the continuation,
continuation tokens are `encode(context + continuation)[len(encode(context)):]`, an empty context is replaced by
the BOS (or EOS) token, and input longer than the context window is truncated from the left.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import inspect
import json
import os
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from labscale.config import ModelSpec
from labscale.errors import ModelError
from labscale.hub import hub_reachable
from labscale.models.base import (
    GenerationRequest,
    GenerationResult,
    LoglikelihoodRequest,
    LoglikelihoodResult,
    ModelBackend,
    ModelInfo,
    Progress,
    Prompt,
)

# Prefill groups: at most this many tokens (rows x width) per forward pass, and at most this fraction padding.
PREFILL_TOKENS = 2048
PREFILL_WASTE = 0.15

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed-adapter batch
TokenCallback = Callable[[int, int], None]  # (request index, new token id)

PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}


def render_plain(messages: list[dict]) -> str:
    """The documented fallback chat format for models without a chat template."""
    blocks = [f"{PLAIN_ROLES.get(m['role'], str(m['role']).capitalize())}: {m['content']}" for m in messages]
    blocks.append("Assistant:")
    return "\n\n".join(blocks)


def looks_like_local_path(s: str) -> bool:
    """A hub id is `name` or `owner/name`; anything starting like a path, with more slashes, or existing on disk
    is a local path."""
    return (
        s.startswith((".", "/", "~"))
        or s.count("/") > 1
        or "\\" in s
        or Path(os.path.expanduser(s)).exists()
    )


class HFBackend(ModelBackend):
    supports_loglikelihood = True

    def __init__(
        self,
        spec: ModelSpec,
        path_or_id: str,
        display_name: str,
        fingerprint: str | None = None,
        extra: dict | None = None,
    ):
        self.spec = spec
        self.display_name = display_name
        self.is_local = looks_like_local_path(path_or_id)
        self.source = str(Path(os.path.expanduser(path_or_id)).resolve()) if self.is_local else path_or_id
        if self.is_local and not Path(self.source).exists():
            raise ModelError(f"model path '{path_or_id}' does not exist", "check the path in hf:<local path>")
        self._fingerprint = fingerprint
        self._extra = dict(extra or {})
        self._config = None
        self._tokenizer = None
        self._model = None
        self._info: ModelInfo | None = None
        self._parameters: int | None = None
        self._bos_prefix: list[int] | None = None
        self._accepts_logits_to_keep = False
        self._fast: bool | None = None  # whether the model suits `_generate_fast`; None: not yet known
        self._ragged = False  # whether decoding may pass per-bucket key ranges to the attention (see below)
        self._ragged_verified: bool | None = None
        self._peft = None  # the PeftModel wrapping `_model` once an adapter is loaded
        self._adapters: dict[str, str] = {}  # adapter name -> folder

    # ----------------------------------------------------------------------------------------------- loading

    def _hub_error(self, e: Exception) -> ModelError:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        return ModelError(
            f"cannot load '{self.source}' from the Hugging Face hub: {reason}",
            "check the id; hub models need network access (or a copy in the local HF cache), or use hf:<local path>",
        )

    def _load_kwargs(self) -> dict:
        kw: dict[str, Any] = {}
        if not self.is_local and self.spec.revision:
            kw["revision"] = self.spec.revision
        if not self.is_local and not hub_reachable():
            kw["local_files_only"] = True  # use the local HF cache at once instead of ~25 s of retries
        return kw

    def _wrap_load(self, fn, what: str):
        try:
            return fn()
        except ModelError:
            raise
        except (OSError, ValueError, EnvironmentError) as e:
            if not self.is_local:
                raise self._hub_error(e) from None
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelError(
                f"cannot load the {what} of '{self.source}': {first}", "is it a transformers model folder?"
            ) from None

    @property
    def config(self):
        if self._config is None:
            from transformers import AutoConfig

            kw = self._load_kwargs()
            self._config = self._wrap_load(lambda: AutoConfig.from_pretrained(self.source, **kw), "config")
        return self._config

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            kw = self._load_kwargs()
            tok = self._wrap_load(lambda: AutoTokenizer.from_pretrained(self.source, **kw), "tokenizer")
            self._tokenizer = tok
            # Does the tokenizer add a BOS by itself? Then our encoding (which never adds special tokens) prepends it.
            self._bos_prefix = []
            bos = tok.bos_token_id
            if bos is not None:
                with_special = tok("a", add_special_tokens=True)["input_ids"]
                if with_special and with_special[0] == bos:
                    self._bos_prefix = [bos]
        return self._tokenizer

    def _device(self) -> str:
        import torch

        if self.spec.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.spec.device

    def _dtype(self):
        import torch

        if self.spec.dtype == "auto":
            return torch.bfloat16 if self._device().startswith("cuda") else torch.float32
        return getattr(torch, self.spec.dtype)

    def _quantization_config(self):
        q = self.spec.quantization
        if q == "none":
            return None
        import torch

        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise ModelError(
                f"quantization '{q}' needs the bitsandbytes package", "pip install 'labscale[quant]'"
            ) from None
        if q == "8bit":
            return BitsAndBytesConfig(load_in_8bit=True)
        compute = torch.bfloat16 if self._device().startswith("cuda") else torch.float32
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )

    @property
    def model(self):
        if self._model is None:
            import torch
            from transformers import AutoModelForCausalLM

            _ = self.tokenizer
            device = self._device()
            kw = self._load_kwargs()
            kw["dtype"] = self._dtype()
            kw["device_map"] = {"": device}  # load straight onto the device
            qc = self._quantization_config()
            if qc is not None:
                kw["quantization_config"] = qc
            if self.spec.quantization == "8bit":  # bitsandbytes warns on every matmul of a float32 model
                warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # labscale shows its own progress
            model = self._wrap_load(lambda: AutoModelForCausalLM.from_pretrained(self.source, **kw), "weights")
            model.eval()
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            self._model = model
            self._accepts_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
            self._ragged = _enable_ragged_attention(model)
            if self._parameters is None:
                self._parameters = model.num_parameters()
            if self._info is not None:
                self._info.parameters = self._parameters
        return self._model

    @property
    def adapters(self) -> dict[str, str]:
        """Loaded LoRA adapters: name -> folder."""
        return dict(self._adapters)

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load the peft adapter saved in `path` onto the in-memory model as `name` (loads the weights first)."""
        folder = Path(os.path.expanduser(str(path))).resolve()
        if not name or name == BASE_ADAPTER or name in self._adapters:
            raise ModelError(f"adapter name '{name}' is empty, reserved or already used", "pick another name")
        try:
            cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise ModelError(f"'{path}' is not a peft adapter folder (no readable adapter_config.json)",
                             "check the path") from None
        if cfg.get("peft_type") != "LORA" or cfg.get("use_dora"):
            kind = "DoRA" if cfg.get("use_dora") else cfg.get("peft_type")
            raise ModelError(f"adapter '{name}' is {kind}, not LoRA", "only LoRA adapters can share a batch")
        import logging

        bnb_log = logging.getLogger("bitsandbytes")  # peft imports bitsandbytes, which warns about CPU kernels
        level = bnb_log.level
        bnb_log.setLevel(logging.ERROR)
        try:
            from peft import PeftModel
        except ImportError:
            raise ModelError("LoRA adapters need the peft package", "pip install peft") from None
        finally:
            bnb_log.setLevel(level)
        model = self.model
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # peft's deprecation notices about transformers internals
                if self._peft is None:
                    self._peft = PeftModel.from_pretrained(model, str(folder), adapter_name=name)
                else:
                    self._peft.load_adapter(str(folder), adapter_name=name)
        except (OSError, ValueError, RuntimeError, KeyError) as e:
            lines = [x.strip() for x in str(e).splitlines() if x.strip()] or [type(e).__name__]
            first = next((x for x in lines if "size mismatch" in x), lines[0])[:200].rstrip(":")
            raise ModelError(f"cannot load adapter '{name}' from '{path}': {first}",
                             f"is it a LoRA adapter trained for {self.display_name}?") from None
        self._peft.eval()
        self._peft.base_model.disable_adapter_layers()  # the plain model is the base model; see `_adapter_scope`
        self._adapters[name] = str(folder)

    def _adapter_names(self, adapters: list[str | None]) -> list[str] | None:
        """peft's per-row adapter names for a batch, or None when no row uses an adapter."""
        if not any(adapters):
            return None
        return [a or BASE_ADAPTER for a in adapters]

    @contextlib.contextmanager
    def _adapter_scope(self, names: list[str] | None):
        """Adapter layers on for the duration of a batch that uses adapters (off otherwise)."""
        if names is None:
            yield
            return
        self._peft.base_model.enable_adapter_layers()
        try:
            yield
        finally:
            self._peft.base_model.disable_adapter_layers()

    def _forward(self, names: list[str] | None):
        """The model's forward for a batch whose rows use adapters `names` (None: the plain model)."""
        return self.model if names is None else functools.partial(self._peft, adapter_names=names)

    # --------------------------------------------------------------------------------------------- metadata

    def _count_parameters_from_config(self) -> int | None:
        """Exact parameter count without loading weights: build the model on the meta device."""
        try:
            import torch
            from transformers import AutoModelForCausalLM

            with torch.device("meta"):
                m = AutoModelForCausalLM.from_config(self.config)
            return m.num_parameters()
        except Exception:  # noqa: BLE001 - exotic architectures: fill in after loading
            return None

    @property
    def context_length(self) -> int:
        """From the config: max_position_embeddings or its equivalent (2048, lm-eval's default, if none)."""
        cfg = self.config
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
            ctx = getattr(text_cfg, attr, None)
            if isinstance(ctx, int) and ctx > 0:
                return ctx
        return 2048

    @property
    def info(self) -> ModelInfo:
        """Reads the config and hashes the model files (once; see fingerprint.py), never loads weights."""
        if self._info is None:
            cfg = self.config
            ctx = self.context_length
            if self._fingerprint is None:
                from labscale.models.fingerprint import fingerprint_hub, fingerprint_path

                if self.is_local:
                    self._fingerprint = fingerprint_path(self.source)
                else:
                    self._fingerprint = fingerprint_hub(
                        self.source, self.spec.revision, getattr(cfg, "_commit_hash", None)
                    )
            if self._parameters is None:
                self._parameters = self._count_parameters_from_config()
            self._info = ModelInfo(
                name=self.display_name,
                fingerprint=self._fingerprint,
                backend="hf",
                context_length=int(ctx),
                parameters=self._parameters,
                dtype=str(self._dtype()).removeprefix("torch."),
                device=self._device(),
                quantization=None if self.spec.quantization == "none" else self.spec.quantization,
                extra={
                    "source": self.source,
                    **({"revision": self.spec.revision} if self.spec.revision else {}),
                    **self._extra,
                },
            )
        return self._info

    # ------------------------------------------------------------------------------------------- tokenizing

    def render(self, prompt: Prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        tok = self.tokenizer
        messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return render_plain(messages)

    def _encode(self, text: str, bos: bool = True) -> list[int]:
        tok = self.tokenizer
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if bos and self._bos_prefix and (not ids or ids[0] != self._bos_prefix[0]):
            ids = self._bos_prefix + ids
        return ids

    def count_tokens(self, text: str) -> int:
        return len(self._encode(text))

    def _eos_ids(self) -> list[int]:
        ids: list[int] = []
        gc_eos = getattr(getattr(self._model, "generation_config", None), "eos_token_id", None)
        for e in (gc_eos, self.tokenizer.eos_token_id):
            for x in e if isinstance(e, (list, tuple)) else [e]:
                if x is not None and x not in ids:
                    ids.append(int(x))
        return ids

    def _pad_id(self) -> int:
        tok = self.tokenizer
        if tok.pad_token_id is not None:
            return tok.pad_token_id
        eos = self._eos_ids()
        return eos[0] if eos else 0

    # ------------------------------------------------------------------------------------------- generating

    def generate(
        self,
        requests: list[GenerationRequest],
        progress: Progress | None = None,
        on_token: TokenCallback | None = None,
    ) -> list[GenerationResult]:
        if not requests:
            return []
        for r in requests:
            if r.adapter is not None and r.adapter not in self._adapters:
                known = ", ".join(sorted(self._adapters)) or "none"
                raise ModelError(f"unknown adapter '{r.adapter}' (loaded: {known})", "load it with load_adapter")
        encoded = [self._encode(r.prompt) for r in requests]
        ctx = self.context_length
        for r, ids in zip(requests, encoded):
            if len(ids) + r.params.max_new_tokens > ctx:
                raise ModelError(
                    f"a prompt of {len(ids)} tokens plus {r.params.max_new_tokens} new tokens exceeds "
                    f"{self.display_name}'s context length of {ctx}",
                    "use fewer or shorter examples in the prompt, or lower max_new_tokens",
                )
        _ = self.model
        groups: dict[Any, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            groups[r.params].append(i)
        results: list[GenerationResult | None] = [None] * len(requests)
        bs = self.spec.batch_size
        for params, idxs in groups.items():
            idxs.sort(key=lambda i: (-len(encoded[i]), i))
            for start in range(0, len(idxs), bs):
                batch = idxs[start : start + bs]
                cb = None if on_token is None else (lambda j, t, batch=batch: on_token(batch[j], t))
                with self._oom_guard(len(batch)):
                    out = self._generate_batch(
                        [encoded[i] for i in batch], params, [requests[i].adapter for i in batch], cb
                    )
                for i, res in zip(batch, out):
                    results[i] = res
                if progress is not None:
                    progress(len(batch))
        return results  # type: ignore[return-value]

    @contextlib.contextmanager
    def _oom_guard(self, batch_size: int):
        import torch

        try:
            yield
        except torch.OutOfMemoryError:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise ModelError(
                f"{self.display_name} ran out of memory on {self._device()} with a batch of {batch_size}",
                "lower batch_size for this model in the experiment file, or use quantization: 4bit",
            ) from None

    def _generate_batch(
        self,
        batch: list[list[int]],
        params,
        adapters: list[str | None] | None = None,
        on_token: TokenCallback | None = None,
    ) -> list[GenerationResult]:
        import torch

        device = self.model.device
        names = self._adapter_names(adapters) if adapters else None
        if params.temperature > 0:
            torch.manual_seed(params.seed)
        t0 = time.perf_counter()
        with torch.inference_mode(), self._adapter_scope(names):
            out = self._generate_fast(batch, params, names, on_token) if self._fast is not False else None
            if out is None:
                out = self._generate_hf(batch, params, names)
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        results = []
        for ids, (gen, reason) in zip(batch, out):
            text = self.tokenizer.decode(gen, skip_special_tokens=True)
            if params.stop:
                cut = min((p for p in (text.find(s) for s in params.stop) if p >= 0), default=-1)
                if cut >= 0:
                    text, reason = text[:cut], "stop"
            results.append(
                GenerationResult(
                    text=text,
                    prompt_tokens=len(ids),
                    new_tokens=len(gen),
                    latency_s=wall,
                    compute_s=wall / len(batch),
                    finish_reason=reason,
                )
            )
        return results

    def _hits_stop(self, tokens: list[int], stops: tuple[str, ...]) -> bool:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return any(s in text for s in stops)

    def _generate_fast(
        self,
        batch: list[list[int]],
        params,
        names: list[str] | None = None,
        on_token: TokenCallback | None = None,
    ) -> list[tuple[list[int], str]] | None:
        """Prefill (see `_prefill`), then a decode loop that feeds one token per live row and per step, with
        explicit position ids and a left-padded attention mask; rows that finished (EOS or stop string) are
        dropped from the batch when that saves more than it costs. With ragged
        attention (see `_enable_ragged_attention`) each group of rows of similar length attends only over its
        own key range instead of the whole padded width.

        Per row: the new tokens up to and including EOS / the token completing a stop string, and the finish
        reason. Returns None when the model does not suit this path (then `generate` is used). `names`: peft
        adapter names per row (None: no adapters); `on_token(row, token)` is called for each new token."""
        import torch

        prefilled = self._prefill(batch, params.max_new_tokens, names)
        if prefilled is None:
            return None
        cache, cached = prefilled
        model = self.model
        forward = self._forward(names)
        device = model.device
        eos = set(self._eos_ids())
        max_new = params.max_new_tokens
        mask = torch.zeros((len(batch), cached + max_new), dtype=torch.long, device=device)
        for j, ids in enumerate(batch):
            mask[j, cached - (len(ids) - 1) : cached] = 1
        pos = torch.tensor([len(ids) - 1 for ids in batch], dtype=torch.long, device=device)
        cur = torch.tensor([ids[-1] for ids in batch], dtype=torch.long, device=device)
        rows = list(range(len(batch)))  # tensor row -> batch index
        live = [True] * len(batch)
        gen: list[list[int]] = [[] for _ in batch]
        reason = ["length"] * len(batch)
        warp = None
        if params.temperature > 0:
            from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

            warp = LogitsProcessorList([TemperatureLogitsWarper(float(params.temperature))])
            if params.top_p < 1.0:
                warp.append(TopPLogitsWarper(float(params.top_p)))
        kw: dict[str, Any] = {"logits_to_keep": 1} if self._accepts_logits_to_keep else {}
        starts = [cached - (len(ids) - 1) for ids in batch]  # first real cache position of each tensor row
        if self._ragged and self._ragged_verified is None:
            self._ragged_verified = self._verify_ragged()
        if self._ragged:
            kw[RAGGED_KWARG] = _plan_buckets(starts, cached + max_new // 2)
        n = cached
        for step in range(max_new):
            mask[:, n] = 1
            logits = forward(
                input_ids=cur[:, None],
                attention_mask=mask[:, : n + 1],
                position_ids=pos[:, None],
                past_key_values=cache,
                use_cache=True,
                **kw,
            ).logits[:, -1, :].float()
            n += 1
            if warp is None:
                nxt = logits.argmax(-1)
            else:
                scores = warp(None, logits)
                nxt = torch.multinomial(scores.softmax(-1), 1).squeeze(1)
            for k, t in enumerate(nxt.tolist()):
                if not live[k]:
                    continue
                j = rows[k]
                gen[j].append(t)
                if on_token is not None:
                    on_token(j, t)
                if t in eos or (params.stop and self._hits_stop(gen[j], params.stop)):
                    live[k], reason[j] = False, "stop"
            remaining = sum(live)
            if remaining == 0 or step == max_new - 1:
                break
            # Drop finished rows when they would cost more than moving the cache does: a dead row costs its share
            # of the linear layers on every remaining step; moving the live rows' cache costs about one step.
            if (len(rows) - remaining) * (max_new - step - 1) >= 2 * len(rows):
                keep = [k for k, alive in enumerate(live) if alive]
                idx = torch.tensor(keep, dtype=torch.long, device=device)
                for layer in cache.layers:
                    layer.batch_select_indices(idx)
                mask, pos, nxt = mask[idx], pos[idx], nxt[idx]
                rows = [rows[k] for k in keep]
                starts = [starts[k] for k in keep]
                if names is not None:
                    names = [names[k] for k in keep]
                    forward = self._forward(names)
                if self._ragged:
                    kw[RAGGED_KWARG] = _plan_buckets(starts, n + (max_new - step) // 2)
                live = [True] * len(keep)
            cur, pos = nxt, pos + 1
        return list(zip(gen, reason))

    def _verify_ragged(self) -> bool:
        """One one-token forward pass checking that a bucket plan passed to the model reaches the attention
        function (a model may not hand its keyword arguments down); if not, back to plain SDPA."""
        import torch

        model = self.model
        before = _RAGGED_SEEN[0]
        try:
            x = torch.tensor([[self._pad_id()]], dtype=torch.long, device=model.device)
            model(input_ids=x, use_cache=False, **{RAGGED_KWARG: [(0, 1, 0)]})
            ok = _RAGGED_SEEN[0] > before
        except TypeError:
            ok = False
        if not ok:
            self._ragged = False
            try:
                model.set_attn_implementation("sdpa")
            except Exception:  # noqa: BLE001
                pass
        return ok

    def _prefill(self, batch: list[list[int]], max_new_tokens: int, names: list[str] | None = None):
        """The key/value cache of every prompt but its last token, laid out left-padded (as a padded batched
        prefill would leave it) in buffers with room for the new tokens. Returns (cache, cached length), or None
        for models whose cache is not a plain full-attention DynamicCache (sliding windows, linear attention, …)
        or whose forward takes no position ids.

        Prompts are grouped by length and each group runs RIGHT-padded with no attention mask: causal attention
        never lets a real token see the padding after it, so each row's keys/values are those of the prompt
        alone (rotary positions 0…n-2, the positions a left-padded row gets from its mask), with no wasted
        attention-mask work and little padding. Keys/values go into preallocated buffers: DynamicCache's
        `torch.cat` on every step copies the whole cache, which with long prompts costs more than the forward.
        `names`: peft adapter names per row, or None."""
        import torch
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        model = self.model
        if self._fast is None:
            params = inspect.signature(model.forward).parameters
            self._fast = bool(
                not getattr(model.config, "is_encoder_decoder", False)
                and "position_ids" in params
                and "past_key_values" in params
            )
        if not self._fast:
            return None
        prefix = [len(ids) - 1 for ids in batch]
        cached = max(prefix)
        if cached == 0:
            return None  # one-token prompts only: nothing to prefill
        device = model.device
        pad = self._pad_id()
        kw = {"logits_to_keep": 1} if self._accepts_logits_to_keep else {}
        order = sorted((j for j in range(len(batch)) if prefix[j] > 0), key=lambda j: -prefix[j])
        groups: list[list[int]] = []
        for j in order:
            g = groups[-1] if groups else None
            if g is not None:
                width = prefix[g[0]]
                size = len(g) + 1
                used = sum(prefix[i] for i in g) + prefix[j]
                if size * width <= max(PREFILL_TOKENS, width) and used >= (1 - PREFILL_WASTE) * size * width:
                    g.append(j)
                    continue
            groups.append([j])
        room = cached + max_new_tokens + 1
        keys: list | None = None
        values: list = []
        for g in groups:
            width = prefix[g[0]]
            x = torch.full((len(g), width), pad, dtype=torch.long)
            for i, j in enumerate(g):
                x[i, : prefix[j]] = torch.tensor(batch[j][:-1], dtype=torch.long)
            forward = self._forward(None if names is None else [names[j] for j in g])
            pkv = forward(input_ids=x.to(device), use_cache=True, **kw).past_key_values
            if keys is None:
                if type(pkv) is not DynamicCache or not all(type(layer) is DynamicLayer for layer in pkv.layers):
                    self._fast = False
                    return None
                # uninitialised: each row's left padding is zeroed below, and past `cached` only what
                # decoding writes is ever read
                keys = [
                    layer.keys.new_empty((len(batch), layer.keys.shape[1], room, layer.keys.shape[3]))
                    for layer in pkv.layers
                ]
                values = [
                    layer.values.new_empty((len(batch), layer.values.shape[1], room, layer.values.shape[3]))
                    for layer in pkv.layers
                ]
            for li, layer in enumerate(pkv.layers):
                for i, j in enumerate(g):
                    keys[li][j, :, cached - prefix[j] : cached] = layer.keys[i, :, : prefix[j]]
                    values[li][j, :, cached - prefix[j] : cached] = layer.values[i, :, : prefix[j]]
                    # masked out, but must be finite: softmax weight 0 times NaN would still be NaN
                    keys[li][j, :, : cached - prefix[j]] = 0
                    values[li][j, :, : cached - prefix[j]] = 0
            del pkv
        for j in range(len(batch)):
            if prefix[j] == 0:  # a one-token prompt: all padding
                for k, v in zip(keys, values):
                    k[j, :, :cached] = 0
                    v[j, :, :cached] = 0
        cls = _prealloc_layer_class()
        cache = DynamicCache()
        cache.layers = [cls(k, v, cached) for k, v in zip(keys, values)]
        return cache, cached

    def _generation_config(self, params):
        from transformers import GenerationConfig

        sample = params.temperature > 0
        eos = self._eos_ids()
        return GenerationConfig(
            max_new_tokens=params.max_new_tokens,
            do_sample=sample,
            temperature=float(params.temperature) if sample else 1.0,
            top_p=float(params.top_p) if sample else 1.0,
            top_k=0 if sample else None,
            repetition_penalty=1.0,
            no_repeat_ngram_size=0,
            num_beams=1,
            eos_token_id=eos or None,
            pad_token_id=self._pad_id(),
            use_cache=True,
        )

    def _generate_hf(
        self, batch: list[list[int]], params, names: list[str] | None = None
    ) -> list[tuple[list[int], str]]:
        """Fallback for models the fast path does not handle: one left-padded `model.generate` call (through
        peft, with per-row `adapter_names`, when `names` is given)."""
        import torch
        from transformers import StoppingCriteriaList

        model = self.model
        device = model.device
        pad = self._pad_id()
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, ids in enumerate(batch):
            input_ids[j, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            mask[j, width - len(ids) :] = 1
        eos = set(self._eos_ids())
        stopper = _stop_strings(self.tokenizer, params.stop, width, len(batch), eos) if params.stop else None
        kw: dict[str, Any] = {}
        if stopper is not None:
            kw["stopping_criteria"] = StoppingCriteriaList([stopper])
        if names is not None:
            model, kw["adapter_names"] = self._peft, names
        out = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            generation_config=self._generation_config(params),
            **kw,
        )
        results = []
        for j, gen in enumerate(out[:, width:].tolist()):
            stop_at = stopper.stopped_at[j] if stopper is not None else None
            eos_at = next((k for k, t in enumerate(gen) if t in eos), None)
            if stop_at is not None and (eos_at is None or stop_at <= eos_at):
                results.append((gen[:stop_at], "stop"))
            elif eos_at is not None:
                results.append((gen[: eos_at + 1], "stop"))
            else:
                results.append((gen, "length"))
        return results

    # ------------------------------------------------------------------------------------------ likelihoods

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        if context == "":
            tok = self.tokenizer
            prefix = tok.bos_token_id if tok.bos_token_id is not None else (self._eos_ids() or [0])[0]
            return [prefix], self._encode(continuation, bos=False)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces > 0:
            continuation = context[-n_spaces:] + continuation
            context = context[:-n_spaces]
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        return ctx, whole[len(ctx) :]

    def loglikelihood(
        self, requests: list[LoglikelihoodRequest], progress: Progress | None = None
    ) -> list[LoglikelihoodResult]:
        if not requests:
            return []
        max_len = self.context_length
        pairs = [self._encode_pair(r.context, r.continuation) for r in requests]
        items = []  # (input tokens, continuation length)
        for (ctx, cont), r in zip(pairs, requests):
            if not cont:
                raise ModelError(
                    f"empty continuation for context ending '{r.context[-40:]}'", "every choice must be non-empty"
                )
            if len(cont) > max_len:
                raise ModelError(
                    f"a continuation of {len(cont)} tokens exceeds {self.display_name}'s context length of {max_len}",
                    "shorten the answer choices",
                )
            inp = (ctx + cont)[-(max_len + 1) :][:-1]
            items.append((inp, cont))
        _ = self.model
        # Identical inputs are computed once; longest first, and ties kept together so shared contexts batch.
        unique: dict[tuple, list[int]] = defaultdict(list)
        for i, (inp, cont) in enumerate(items):
            unique[(tuple(inp), tuple(cont))].append(i)
        keys = sorted(unique, key=lambda k: (-len(k[0]), k[0][:64]))
        results: list[LoglikelihoodResult | None] = [None] * len(requests)
        bs = self.spec.batch_size
        for start in range(0, len(keys), bs):
            batch = keys[start : start + bs]
            with self._oom_guard(len(batch)):
                out = self._loglikelihood_batch(batch)
            for key, res in zip(batch, out):
                for i in unique[key]:
                    results[i] = LoglikelihoodResult(res.logprob, res.is_greedy, res.n_tokens, res.compute_s)
            if progress is not None:
                progress(sum(len(unique[k]) for k in batch))
        # compute_s is shared among duplicates so it still sums to the compute time
        for idxs in unique.values():
            for i in idxs:
                results[i].compute_s /= len(idxs)  # type: ignore[union-attr]
        return results  # type: ignore[return-value]

    def _loglikelihood_batch(self, batch: list[tuple[tuple, tuple]]) -> list[LoglikelihoodResult]:
        import torch

        model = self.model
        device = model.device
        pad = self._pad_id()
        width = max(len(inp) for inp, _ in batch)
        input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for j, (inp, _) in enumerate(batch):  # right padding: positions are those of the unpadded input
            input_ids[j, : len(inp)] = torch.tensor(inp, dtype=torch.long)
            mask[j, : len(inp)] = 1
        # logits are needed at positions len(inp) - len(cont) … len(inp) - 1 of each row; compute only their union
        lo = min(len(inp) - len(cont) for inp, cont in batch)
        hi = max(len(inp) for inp, _ in batch)
        kw: dict[str, Any] = {}
        if self._accepts_logits_to_keep:
            kw["logits_to_keep"] = torch.arange(lo, hi, device=device)
            offset = lo
        else:
            offset = 0
        t0 = time.perf_counter()
        with torch.inference_mode():
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device), use_cache=False, **kw).logits
            out = []
            for j, (inp, cont) in enumerate(batch):
                a = len(inp) - len(cont) - offset
                lp = logits[j, a : a + len(cont)].float().log_softmax(-1)
                target = torch.tensor(cont, dtype=torch.long, device=lp.device)
                logprob = lp.gather(-1, target[:, None]).sum().item()
                greedy = bool((lp.argmax(-1) == target).all().item())
                out.append((logprob, greedy, len(cont)))
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        return [LoglikelihoodResult(lp, g, n, wall / len(batch)) for lp, g, n in out]

    # ---------------------------------------------------------------------------------------------- memory

    def close(self) -> None:
        if self._model is None:
            return
        import torch

        self._model = None
        self._peft = None
        self._adapters = {}
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def peak_memory_bytes(self) -> int | None:
        import torch

        if self._model is not None and self._device().startswith("cuda") and torch.cuda.is_available():
            return int(torch.cuda.max_memory_allocated())
        return None


def _stop_strings(tokenizer, stops: tuple[str, ...], prompt_width: int, batch: int, eos: set[int]):
    """Stopping criterion: a row stops once its generated text (special tokens skipped) contains a stop string.

    Looks only at the generated part (a stop string spanning the prompt does not count) and records, per row, how
    many tokens had been generated when it stopped (`stopped_at`). Rows that already produced EOS are left to
    `generate`. One batched decode per step, only for rows still running: negligible next to a forward pass.
    """
    import torch
    from transformers import StoppingCriteria

    class StopStrings(StoppingCriteria):
        def __init__(self):
            self.stopped_at: list[int | None] = [None] * batch

        def __call__(self, input_ids, scores, **kwargs):
            gen = input_ids[:, prompt_width:].tolist()
            todo = [j for j, g in enumerate(gen) if self.stopped_at[j] is None and not (eos & set(g))]
            if todo:
                texts = tokenizer.batch_decode([gen[j] for j in todo], skip_special_tokens=True)
                for j, text in zip(todo, texts):
                    if any(s in text for s in stops):
                        self.stopped_at[j] = len(gen[j])
            done = [s is not None for s in self.stopped_at]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StopStrings()


_PREALLOC = None


def _prealloc_layer_class():
    """A DynamicLayer that appends into a preallocated buffer instead of concatenating (values identical)."""
    global _PREALLOC
    if _PREALLOC is not None:
        return _PREALLOC
    import torch
    from transformers.cache_utils import DynamicLayer

    class PreallocLayer(DynamicLayer):
        def __init__(self, kbuf, vbuf, length: int):
            super().__init__()
            self._k, self._v, self._n = kbuf, vbuf, length
            self.dtype, self.device = kbuf.dtype, kbuf.device
            self.is_initialized = True
            self._views()

        def _views(self):
            self.keys = self._k[:, :, : self._n]
            self.values = self._v[:, :, : self._n]

        def update(self, key_states, value_states, *args, **kwargs):
            end = self._n + key_states.shape[-2]
            if end > self._k.shape[2]:  # out of room (not expected): grow by doubling
                pad = (0, 0, 0, max(end, 2 * self._k.shape[2]) - self._k.shape[2])
                self._k = torch.nn.functional.pad(self._k, pad)
                self._v = torch.nn.functional.pad(self._v, pad)
            self._k[:, :, self._n : end] = key_states
            self._v[:, :, self._n : end] = value_states
            self._n = end
            self._views()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self._n

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove < 0:
                self._n = max(0, self._n + tokens_to_remove)
                self._views()

        def batch_select_indices(self, indices) -> None:
            """Keep the rows `indices` (ascending), moved in place to the front: no new buffer, no page faults."""
            keep = [int(i) for i in indices]
            if keep != sorted(keep):
                self._k, self._v = self._k[indices], self._v[indices]
            else:
                for new, old in enumerate(keep):
                    if new != old:
                        self._k[new, :, : self._n] = self._k[old, :, : self._n]
                        self._v[new, :, : self._n] = self._v[old, :, : self._n]
                self._k, self._v = self._k[: len(keep)], self._v[: len(keep)]
            self._views()

        def batch_repeat_interleave(self, repeats: int) -> None:
            self._k = self._k.repeat_interleave(repeats, dim=0)
            self._v = self._v.repeat_interleave(repeats, dim=0)
            self._views()

        def reorder_cache(self, beam_idx) -> None:
            self._k = self._k.index_select(0, beam_idx.to(self._k.device))
            self._v = self._v.index_select(0, beam_idx.to(self._v.device))
            self._views()

        def reset(self) -> None:
            self._n = 0
            self._views()

    _PREALLOC = PreallocLayer
    return PreallocLayer


# ------------------------------------------------------------------------------------------ ragged attention
#
# Decoding one token for B rows reads the whole key/value cache, padding included: B x (padded width) entries
# per layer. On CPU that read, not arithmetic, is what attention costs, and a batch with one long prompt makes
# every short row pay for it. The model keeps its linear layers batched (that is where batching pays), but its
# attention runs per bucket of rows of similar length, each over the key range its rows actually use. Rows are
# sorted by length, so a bucket is a contiguous row range and its keys are a view, not a copy. Numerically this
# is the same attention (the skipped positions are masked out anyway).

RAGGED_ATTENTION = "labscale_sdpa"
RAGGED_KWARG = "labscale_buckets"
# Fixed cost of one extra attention call, in units of one row's key/value entry read.
RAGGED_CALL_COST = 128
_RAGGED_SEEN = [0]  # calls that received a plan (checked once per model by `_verify_ragged`)


def _plan_buckets(starts: list[int], length: int) -> list[tuple[int, int, int]]:
    """Split rows into contiguous buckets (row_from, row_to, first key position) minimising
    sum(RAGGED_CALL_COST + rows x (length - first key position)); O(B^2) dynamic programming."""
    n = len(starts)
    best = [0.0] + [float("inf")] * n
    cut = [0] * (n + 1)
    for i in range(1, n + 1):
        lo = starts[i - 1]
        for j in range(i - 1, -1, -1):
            lo = min(lo, starts[j])
            c = best[j] + RAGGED_CALL_COST + (i - j) * max(length - lo, 1)
            if c < best[i]:
                best[i], cut[i] = c, j
    buckets = []
    i = n
    while i > 0:
        j = cut[i]
        buckets.append((j, i, min(starts[j:i])))
        i = j
    return buckets[::-1]


def _enable_ragged_attention(model) -> bool:
    """Switch an SDPA model to `labscale_sdpa`: SDPA, except that when decoding with a bucket plan it attends per
    bucket. Without a plan (prefill, log-likelihoods, `generate`) it is plain SDPA. False when not applicable."""
    try:
        if getattr(model.config, "_attn_implementation", None) != "sdpa":
            return False
        params = inspect.signature(model.forward).parameters.values()
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return False  # no way to pass the plan down
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        if RAGGED_ATTENTION not in AttentionInterface._global_mapping:
            AttentionInterface.register(RAGGED_ATTENTION, _ragged_sdpa)
            AttentionMaskInterface.register(RAGGED_ATTENTION, sdpa_mask)
        model.set_attn_implementation(RAGGED_ATTENTION)
        return model.config._attn_implementation == RAGGED_ATTENTION
    except Exception:  # noqa: BLE001 - an optimisation only: never fail a load over it
        return False


def _ragged_sdpa(module, query, key, value, attention_mask, *args, **kwargs):
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    buckets = kwargs.pop(RAGGED_KWARG, None)
    if buckets is not None:
        _RAGGED_SEEN[0] += 1
    plain = (
        not buckets
        or (len(buckets) == 1 and buckets[0][2] == 0)
        or buckets[-1][1] != query.shape[0]
        or query.shape[2] != 1
        or attention_mask is None
        or attention_mask.shape[0] != query.shape[0]
    )
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    outs = []
    for r0, r1, s in buckets:
        out, _ = sdpa_attention_forward(
            module,
            query[r0:r1],
            key[r0:r1, :, s:],
            value[r0:r1, :, s:],
            attention_mask[r0:r1, ..., s:],
            *args,
            **kwargs,
        )
        outs.append(out)
    return torch.cat(outs, dim=0), None
