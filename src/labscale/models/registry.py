"""From an experiment's model entry to a backend: `resolve_model(spec)`.

Model ids are `<prefix>:<rest>`. Each prefix maps to a factory in `FACTORIES`; add a backend by adding an entry
(`embedded:`, `hf:`, `openai:` for OpenAI-compatible APIs, `adapter:` for a LoRA adapter folder).
"""

from __future__ import annotations

from typing import Callable

from labscale.config import ModelSpec
from labscale.errors import ConfigError
from labscale.models.base import ModelBackend

Factory = Callable[[ModelSpec, str], ModelBackend]  # (spec, the id after the prefix) -> backend


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


FACTORIES: dict[str, Factory] = {
    "embedded": _embedded,
    "hf": _hf,
    "openai": _openai,
    "adapter": _adapter,
}


def resolve_model(spec: ModelSpec) -> ModelBackend:
    prefix, sep, rest = spec.id.partition(":")
    factory = FACTORIES.get(prefix) if sep else None
    if factory is None:
        raise ConfigError(
            f"unknown model '{spec.id}'",
            "use embedded:<name> (see `labscale models`), hf:<hub id or local path>, adapter:<folder> or "
            "openai:<API model>",
        )
    return factory(spec, rest)
