"""Per-run cost and latency figures for the charts and the export, each marked measured or estimated.

- $ per 1,000 examples. API models: the run's cost (tokens the API reported × the recorded price) / examples ×
  1000 — *estimated* when some usage was estimated (the API reported none). Local models: an hourly hardware price
  (adapt/budget.py's classes: the run's device — CPU → `cpu`, an accelerator → `t4`) × the run's compute time —
  always an *estimate*: the machine is not billed per request. None when an API model has no price.
- Latency per example (ms): the mean time a request waited for its batch (generation), else compute time per
  example (log-likelihood scoring); measured.
- Adaptation cost (fine-tuning and any teacher calls recorded in the card): $, kWh, CO2eq; energy is *estimated*
  when it was CodeCarbon's CPU estimate (a CPU machine, where CodeCarbon falls back to TDP-based figures).
"""

from __future__ import annotations

from dataclasses import dataclass

from labscale.report.runs import StoredRun


@dataclass
class RunCost:
    usd_per_1000: float | None
    estimated: bool
    source: str


def local_hardware(run: StoredRun):
    from labscale.adapt.budget import HARDWARE

    device = str(run.model_info.get("device") or "cpu").lower()
    return HARDWARE["cpu"] if device.startswith("cpu") or device in ("", "none") else HARDWARE["t4"]


def run_cost(run: StoredRun) -> RunCost:
    e = run.efficiency
    n = e.get("examples") or run.row["n_examples"] or 0
    if not run.complete or not n:
        return RunCost(None, False, "pending")
    if run.is_remote or run.price is not None:
        cost = e.get("cost_usd")
        if cost is None:
            return RunCost(None, False, "API without a price")
        estimated = bool(e.get("usage_estimated"))
        return RunCost(cost / n * 1000, estimated,
                       "API usage × price" + (" (some usage estimated)" if estimated else ""))
    hw = local_hardware(run)
    compute = e.get("compute_s") or 0.0
    return RunCost(compute / 3600 * hw.usd_per_hour / n * 1000, True,
                   f"estimate: compute time × ${hw.usd_per_hour:g}/h ({hw.description})")


def latency_ms(run: StoredRun) -> float | None:
    e = run.efficiency
    if not run.complete:
        return None
    if e.get("mean_latency_s") is not None:
        return 1000 * e["mean_latency_s"]
    n = e.get("examples") or 0
    return 1000 * e["compute_s"] / n if n and e.get("compute_s") is not None else None


def adaptation_cost(card: dict) -> dict:
    """$ (training + teacher), kWh, kg CO2eq of an adaptation's card summary, with what is estimated."""
    usd = (card.get("cost_usd") or 0.0) + (card.get("teacher_cost_usd") or 0.0)
    return {"usd": usd, "kwh": card.get("energy_kwh"), "co2eq_kg": card.get("co2eq_kg"),
            "usd_estimated": True,  # an hourly hardware price × wall time
            "energy_estimated": (card.get("hardware") or "cpu") == "cpu"}
