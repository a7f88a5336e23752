"""From an experiment's model entry to a backend: `resolve_model(spec)`.

Model ids are `<prefix>:<rest>`. Each prefix maps to a `Backend` entry in `FACTORIES`; add a backend by adding an
entry (`embedded:`, `hf:`, `openai:` for OpenAI-compatible APIs, `adapter:` for a LoRA adapter folder,
`llamacpp:` for a GGUF file served by a local llama-server). An entry lists the optional model-entry fields it
takes (`takes`: the API fields for `openai:`, `device_map` for local transformers models, `server` for
`llamacpp:`); an entry marked `remote` has its key checked before any work starts. Everything else about a backend
(log-likelihoods, price, context) is read from its typed `ModelInfo`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from labscale.config import API_FIELDS, ModelSpec
from labscale.errors import ConfigError, ModelError, closest
from labscale.models.base import ModelBackend

Factory = Callable[[ModelSpec, str], ModelBackend]  # (spec, the id after the prefix) -> backend


# Optional fields of a model entry that only some backends take (set on another backend's entry: an error).
ENTRY_FIELDS = (*API_FIELDS, "optional", "loglikelihood", "loglikelihood_fallback", "device_map", "server")
LOCAL_FIELDS = ("device_map",)


@dataclass(frozen=True)
class Backend:
    factory: Factory
    remote: bool = False  # an API: its key must be set (or the model optional)
    takes: tuple[str, ...] = ()  # of ENTRY_FIELDS, the ones this backend's entries may set


def _embedded(spec: ModelSpec, name: str) -> ModelBackend:
    from labscale.models.embedded import EMBEDDED, ensure_converted
    from labscale.models.hf import HFBackend

    folder = ensure_converted(name)  # once per machine; the fingerprint is that of this folder (see `info`)
    m = EMBEDDED[name]
    return HFBackend(
        spec,
        str(folder),
        spec.label,
        extra={"embedded": name, "package": m.requirement, "license": m.license},
    )


def _hf(spec: ModelSpec, path_or_id: str) -> ModelBackend:
    from labscale.models.hf import HFBackend

    if not path_or_id.strip():
        raise ConfigError(f"model '{spec.id}' names no model", "write hf:<hub id or local path>")
    return HFBackend(spec, path_or_id, spec.label)


def _adapter(spec: ModelSpec, folder: str) -> ModelBackend:
    from labscale.models.adapter import AdapterBackend

    if not folder.strip():
        raise ConfigError(f"model '{spec.id}' names no folder", "write adapter:<folder written by labscale finetune>")
    return AdapterBackend(spec, folder)


def _openai(spec: ModelSpec, model: str) -> ModelBackend:
    from labscale.models.openai_api import OpenAIBackend

    return OpenAIBackend(spec, model)


def _llamacpp(spec: ModelSpec, source: str) -> ModelBackend:
    from labscale.models.llamacpp import LlamaCppBackend

    return LlamaCppBackend(spec, source)


FACTORIES: dict[str, Backend] = {
    "embedded": Backend(_embedded, takes=LOCAL_FIELDS),
    "hf": Backend(_hf, takes=LOCAL_FIELDS),
    "openai": Backend(_openai, remote=True,
                      takes=(*API_FIELDS, "optional", "loglikelihood", "loglikelihood_fallback")),
    "adapter": Backend(_adapter, takes=LOCAL_FIELDS),
    "llamacpp": Backend(_llamacpp, takes=("server",)),
}


def _entry(spec: ModelSpec) -> tuple[Backend, str]:
    prefix, sep, rest = spec.id.partition(":")
    entry = FACTORIES.get(prefix) if sep else None
    if entry is None:
        close = closest(prefix, FACTORIES) if sep else None
        raise ConfigError(
            f"unknown model '{spec.id}'",
            (f"did you mean '{close}:{rest}'? " if close else "") +
            "use embedded:<name> (see `labscale models`), hf:<hub id or local path>, adapter:<folder>, "
            "llamacpp:<file.gguf or embedded:name> or openai:<API model>",
        )
    return entry, rest


def is_remote(spec: ModelSpec) -> bool:
    return _entry(spec)[0].remote


def check_fields(spec: ModelSpec) -> None:
    """A field on an entry whose backend does not take it (e.g. base_url on a local model) is a mistake, not
    something to ignore."""
    entry, _ = _entry(spec)
    defaults = ModelSpec.model_fields
    given = [f for f in ENTRY_FIELDS if getattr(spec, f) != defaults[f].default and f not in entry.takes]
    if not given:
        return
    where = [p for p, b in FACTORIES.items() if given[0] in b.takes]
    owners = "openai:<model> entries (remote API models)" if where == ["openai"] else \
        " / ".join(f"{p}:" for p in where) + " entries"
    raise ConfigError(f"model '{spec.label}': {', '.join(given)} only apply to {owners}",
                      "remove them from this model's entry")


def missing_key(spec: ModelSpec) -> str | None:
    """The unset environment variable a remote model's key should be in, or None (set, or no key needed)."""
    var = spec.api_key_env if is_remote(spec) else None
    return var if var and not os.environ.get(var) else None


def missing_key_error(spec: ModelSpec, var: str) -> ModelError:
    return ModelError(f"model '{spec.label}' needs an API key in ${var}, which is not set",
                      f"export {var}=…, or mark the model optional: true to skip it without a key")


def resolve_model(spec: ModelSpec) -> ModelBackend:
    entry, rest = _entry(spec)
    check_fields(spec)
    return entry.factory(spec, rest)
