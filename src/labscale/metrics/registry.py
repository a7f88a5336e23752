"""Metric names → Metric objects."""

from __future__ import annotations

from labscale.errors import ConfigError, did_you_mean
from labscale.metrics import (abstention, bias, classification, counterfactual, matching, multiple_choice, retrieval,
                              text)
from labscale.metrics.base import Metric

_MODULES = (text, classification, multiple_choice, matching, bias, abstention, counterfactual, retrieval)
_METRICS: dict[str, Metric] = {m.name: m for module in _MODULES for m in module.METRICS}


def metric_names() -> list[str]:
    return list(_METRICS)


def get_metric(name: str) -> Metric:
    try:
        return _METRICS[name]
    except KeyError:
        raise ConfigError(f"unknown metric '{name}'",
                          f"{did_you_mean(name, _METRICS)}use one of: {', '.join(_METRICS)}") from None
