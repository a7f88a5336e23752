"""Model backends.

- `base`: the `ModelBackend` protocol every backend implements (render, count_tokens, generate, loglikelihood).
- `registry.resolve_model(spec)`: turns an experiment's model entry (`embedded:<name>`, `hf:<id or path>`, …)
  into a backend.
- `embedded`: models that ship inside pip packages (SmolLM2-135M-Instruct as GGUF), converted once to a
  safetensors folder under the labscale home.
- `hf`: the local transformers backend (batched, left-padded generation; lm-eval style log-likelihoods).
- `fingerprint`: content hashes of model folders, cached by (path, size, mtime).
"""
