"""`labscale serve`: an OpenAI-compatible HTTP server for one local model and its LoRA adapters.

- `protocol`: OpenAI request schemas, their translation to labscale requests, error bodies.
- `batcher`: the worker thread that batches concurrent requests into `backend.generate` calls.
- `stream`: incremental detokenization for streamed answers.
- `app`: the FastAPI routes.
- `server`: model loading and the uvicorn process (`labscale serve`).

Nothing here is imported by the rest of labscale: FastAPI and uvicorn load only when serving.
"""
