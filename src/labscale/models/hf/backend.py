"""`HFBackend`: the local transformers backend, tying together loading, rendering, encoding, generation,
log-likelihoods and adapters (one module each in this package).

Loading is lazy: the constructor reads nothing; `render`/`count_tokens`/`encode` load the tokenizer; `info` reads
the config and hashes the model files; `generate`/`loglikelihood` load the weights (once).

What fine-tuning (labscale.adapt) uses: `encode` / `encode_pair` / `pad_id` / `eos_ids` (the exact encoding
evaluation uses), `load_for_training` (a fresh copy of the base weights with the one quantization config), and
`with_model` (a backend over an in-memory model, e.g. the trained PeftModel, for scoring canaries).
"""

from __future__ import annotations

import gc
import inspect
from pathlib import Path

from labscale.config import ModelSpec
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
from labscale.models.hf.adapters import Adapters
from labscale.models.hf.encoding import Encoder
from labscale.models.hf.fastdecode import FastDecoder
from labscale.models.hf.generation import Admit, ResultCallback, ShouldStop, TokenCallback
from labscale.models.hf.generation import generate as generate_requests
from labscale.models.hf.loading import Loader, resolve_device, resolve_dtype
from labscale.models.hf.loglikelihood import loglikelihood as score_requests
from labscale.models.hf.render import render as render_prompt


class HFBackend(ModelBackend):

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
        self.loader = Loader(path_or_id, spec.revision)
        self.is_local = self.loader.is_local
        self.source = self.loader.source
        self._fingerprint = fingerprint
        self._extra = dict(extra or {})
        self._config = None
        self._tokenizer = None
        self._encoder: Encoder | None = None
        self._model = None
        self._info: ModelInfo | None = None
        self._parameters: int | None = None
        self._logits_to_keep = False
        self.fast_decoder = FastDecoder()  # labscale's decode path and what it learnt about this model
        # shared-prefix log-likelihood scoring (loglikelihood.py): whether it applies (None: not yet known) and
        # whether the first batch agreed with plain scoring (None: not yet checked)
        self.pack_loglikelihoods: bool | None = None
        self.pack_verified: bool | None = None
        self.adapter_set = Adapters()  # LoRA adapters loaded onto the model

    # ----------------------------------------------------------------------------------------------- loading

    @property
    def device(self) -> str:
        return resolve_device(self.spec.device)

    @property
    def dtype(self):
        return resolve_dtype(self.spec.dtype, self.device)

    @property
    def extra(self) -> dict:
        """What the registry added to `info.extra` (e.g. the embedded model's package)."""
        return dict(self._extra)

    @property
    def config(self):
        if self._config is None:
            self._config = self.loader.config()
        return self._config

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            tok = self.loader.tokenizer()
            self._encoder = Encoder(tok)
            self._tokenizer = tok
        return self._tokenizer

    @property
    def encoder(self) -> Encoder:
        _ = self.tokenizer
        assert self._encoder is not None
        return self._encoder

    @property
    def loaded(self) -> bool:
        """Whether the weights are in memory."""
        return self._model is not None

    @property
    def model(self):
        if self._model is None:
            import torch

            _ = self.tokenizer
            device = self.device
            compute = torch.bfloat16 if device.startswith("cuda") else torch.float32  # of 4-bit layers
            spread = self.spec.device_map == "auto"  # accelerate: every visible GPU, then CPU memory
            model = self.loader.causal_lm(self.dtype, self.spec.quantization, compute,
                                          device_map="auto" if spread else {"": device})
            model.eval()
            if device.startswith("cuda"):
                for i in range(torch.cuda.device_count()) if spread else [None]:
                    torch.cuda.reset_peak_memory_stats(i)
            self._attach(model, ragged=True)
            placed = set(str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()) or \
                {str(model.device)}
            if spread and len(placed) > 1:
                # layers on several devices: transformers' own generate moves the KV cache between them
                self.fast_decoder.suitable = False
            if spread:
                self._extra["device_map"] = sorted(placed)
        return self._model

    def _attach(self, model, ragged: bool) -> None:
        self._model = model
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.fast_decoder.attach(model, ragged=ragged)
        if self._parameters is None:
            self._parameters = model.num_parameters()
        if self._info is not None:
            self._info.parameters = self._parameters

    @property
    def accepts_logits_to_keep(self) -> bool:
        """Whether the model's forward can compute logits at chosen positions only (loads the weights)."""
        _ = self.model
        return self._logits_to_keep

    def load_for_training(self, device: str, dtype):
        """A fresh copy of the base weights for training (not this backend's own inference copy): the entry's
        quantization (4-bit layers computing in `dtype`), placed on `device` when quantized (otherwise left where
        it loads, for the trainer to move), with the KV cache off."""
        q = self.spec.quantization
        model = self.loader.causal_lm(dtype, q, dtype, device_map={"": device} if q != "none" else None)
        model.config.use_cache = False
        return model

    def with_model(self, model, batch_size: int | None = None) -> HFBackend:
        """A backend that generates and scores with the in-memory `model` (e.g. a trained PeftModel with its
        adapter on) instead of loading weights; tokenizer, config and metadata are this backend's. `batch_size`
        overrides the entry's."""
        spec = self.spec if batch_size is None else self.spec.model_copy(update={"batch_size": batch_size})
        other = HFBackend(spec, self.source, self.display_name, self._fingerprint, self._extra)
        other._config, other._tokenizer, other._encoder = self._config, self._tokenizer, self._encoder
        other._parameters = self._parameters
        other._attach(model, ragged=False)  # leave the caller's model as it is
        return other

    # ---------------------------------------------------------------------------------------------- adapters

    @property
    def adapters(self) -> dict[str, str]:
        """Loaded LoRA adapters: name -> folder."""
        return dict(self.adapter_set.folders)

    def load_adapter(self, name: str, path: str | Path) -> None:
        """Load the peft adapter saved in `path` onto the in-memory model as `name` (loads the weights first)."""
        self.adapter_set.load(lambda: self.model, name, path, self.display_name)

    def pin_adapter(self, name: str) -> None:
        """Keep loaded adapter `name` on for every request, which then names no adapter."""
        self.adapter_set.pin(name)

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
    def fingerprint(self) -> str:
        """Hash of the model files (local folder) or the resolved hub commit; see fingerprint.py."""
        if self._fingerprint is None:
            from labscale.models.fingerprint import fingerprint_hub, fingerprint_path

            if self.is_local:
                self._fingerprint = fingerprint_path(self.source)
            else:
                self._fingerprint = fingerprint_hub(
                    self.source, self.spec.revision, getattr(self.config, "_commit_hash", None)
                )
        return self._fingerprint

    def describe(self) -> ModelInfo:
        """A fresh ModelInfo: reads the config and hashes the model files, never loads weights."""
        _ = self.config
        ctx = self.context_length
        fingerprint = self.fingerprint
        if self._parameters is None:
            self._parameters = self._count_parameters_from_config()
        return ModelInfo(
            name=self.display_name,
            fingerprint=fingerprint,
            backend="hf",
            context_length=int(ctx),
            parameters=self._parameters,
            dtype=str(self.dtype).removeprefix("torch."),
            device=f"auto ({self.device} first)" if self.spec.device_map == "auto" else self.device,
            quantization=None if self.spec.quantization == "none" else self.spec.quantization,
            extra={
                "source": self.source,
                **({"revision": self.spec.revision} if self.spec.revision else {}),
                **self._extra,
            },
        )

    @property
    def info(self) -> ModelInfo:
        """`describe()`, once."""
        if self._info is None:
            self._info = self.describe()
        return self._info

    # ------------------------------------------------------------------------------------------- tokenizing

    def render(self, prompt: Prompt) -> str:
        return render_prompt(self.tokenizer, prompt)

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """The token ids `generate` feeds the model for `text` (see encoding.py)."""
        return self.encoder.encode(text, bos)

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) exactly as `loglikelihood` scores them (lm-evaluation-harness style)."""
        return self.encoder.encode_pair(context, continuation, self.eos_ids)

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    @property
    def eos_ids(self) -> list[int]:
        """The generation config's EOS ids (once the weights are loaded) and the tokenizer's."""
        return self.encoder.eos_ids(getattr(self._model, "generation_config", None))

    @property
    def pad_id(self) -> int:
        return self.encoder.pad_id(self.eos_ids)

    # ----------------------------------------------------------------------------------- generating, scoring

    def generate(
        self,
        requests: list[GenerationRequest],
        progress: Progress | None = None,
        on_token: TokenCallback | None = None,
        should_stop: ShouldStop | None = None,
        admit: Admit | None = None,
        on_result: ResultCallback | None = None,
    ) -> list[GenerationResult]:
        """See generation.py: `on_token` streams new tokens, `should_stop` cancels (rows end "cancelled"),
        `admit` / `on_result` batch continuously (requests join a running batch at the next decode step)."""
        return generate_requests(self, requests, progress, on_token, should_stop, admit, on_result)

    def loglikelihood(
        self, requests: list[LoglikelihoodRequest], progress: Progress | None = None
    ) -> list[LoglikelihoodResult]:
        return score_requests(self, requests, progress)

    # ---------------------------------------------------------------------------------------------- memory

    def close(self) -> None:
        if self._model is None:
            return
        import torch

        self._model = None
        self.fast_decoder.detach()
        self.adapter_set = Adapters()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def peak_memory_bytes(self) -> int | None:
        import torch

        if self._model is not None and self.device.startswith("cuda") and torch.cuda.is_available():
            if self.spec.device_map == "auto":  # spread over every GPU: their peaks added up
                return sum(int(torch.cuda.max_memory_allocated(i)) for i in range(torch.cuda.device_count()))
            return int(torch.cuda.max_memory_allocated())
        return None
