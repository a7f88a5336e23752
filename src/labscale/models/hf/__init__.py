"""The local transformers backend: any causal LM folder or hub id, on CPU or CUDA, optionally 8/4-bit quantized.

`HFBackend` (backend.py) ties together one module per concept, each stating its part of the contract:

* loading.py — local folder or hub id, device, dtype, the one quantization config, one-line load errors;
* render.py — the chat template, or the documented plain format for models without one;
* encoding.py — tokenization (the BOS rule), lm-evaluation-harness context/continuation pairs, EOS and pad ids;
* generation.py — the batching driver, the `model.generate` fallback, stop strings, streaming;
* fastdecode.py — labscale's own decode path: length-grouped prefill, preallocated KV cache, ragged attention;
* loglikelihood.py — continuation log-likelihoods, lm-evaluation-harness style;
* adapters.py — peft LoRA adapters on one model, selected per row of a batch.

Loading is lazy: the constructor reads nothing; `render`/`count_tokens` load the tokenizer; `info` reads the
config; `generate`/`loglikelihood` load the weights.
"""

from labscale.models.hf.adapters import BASE_ADAPTER
from labscale.models.hf.backend import HFBackend
from labscale.models.hf.generation import TokenCallback
from labscale.models.hf.loading import looks_like_local_path
from labscale.models.hf.render import render_plain

__all__ = ["BASE_ADAPTER", "HFBackend", "TokenCallback", "looks_like_local_path", "render_plain"]
