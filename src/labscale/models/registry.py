"""From an experiment's model entry to a backend: `resolve_model(spec)`.

Model ids are `<prefix>:<rest>`. Each prefix maps to a `Backend` entry in `FACTORIES`; add a backend by adding an
entry (`embedded:`, `hf:`, `openai:` for OpenAI-compatible APIs, `adapter:` for a LoRA adapter folder). An entry
marked `remote` takes the API fields of a model entry (base_url, api_key_env, optional, price, …) and has its key
checked before any work starts; everything else about a backend (log-likelihoods, price, context) is read from
its typed `ModelInfo`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from labscale.config import API_FIELDS, ModelSpec
from labscale.errors import ConfigError, ModelError, closest
from labscale.models.base import ModelBackend

Factory = Callable[[ModelSpec, str], ModelBackend]  # (spec, the id after the prefix) -> backend


@dataclass(frozen=True)
class Backend:
    factory: Factory
    remote: bool = False  # an API: the entry's API fields apply, and its key must be set (or the model optional)


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


FACTORIES: dict[str, Backend] = {
    "embedded": Backend(_embedded),
    "hf": Backend(_hf),
    "openai": Backend(_openai, remote=True),
    "adapter": Backend(_adapter),
}


def _entry(spec: ModelSpec) -> tuple[Backend, str]:
    prefix, sep, rest = spec.id.partition(":")
    entry = FACTORIES.get(prefix) if sep else None
    if entry is None:
        close = closest(prefix, FACTORIES) if sep else None
        raise ConfigError(
            f"unknown model '{spec.id}'",
            (f"did you mean '{close}:{rest}'? " if close else "") +
            "use embedded:<name> (see `labscale models`), hf:<hub id or local path>, adapter:<folder> or "
            "openai:<API model>",
        )
    return entry, rest


def is_remote(spec: ModelSpec) -> bool:
    return _entry(spec)[0].remote


def check_fields(spec: ModelSpec) -> None:
    """API fields on a local model's entry are a mistake, not something to ignore."""
    if is_remote(spec):
        return
    given = [f for f in API_FIELDS if getattr(spec, f) is not None] + (["optional"] if spec.optional else [])
    if given:
        raise ConfigError(f"model '{spec.label}': {', '.join(given)} only apply to openai:<model> entries "
                          "(remote API models)", "remove them from this model's entry")


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
