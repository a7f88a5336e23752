"""Energy and CO2eq of a training run, measured by CodeCarbon's offline tracker (no network).

CodeCarbon samples CPU, RAM and GPU power (RAPL / NVML where readable, else its TDP-based estimates) and converts
energy to CO2eq with the chosen country's grid carbon intensity (its bundled energy-mix table). One process trains:
`tracking_mode="process"` (this process's share of the machine). Under `accelerate launch`, only the main process
measures, in `machine` mode, which covers every process on its node (other nodes are not counted).
"""

from __future__ import annotations

import importlib.util
import json
import logging
from functools import lru_cache
from pathlib import Path

from labscale.errors import ConfigError


@lru_cache(maxsize=1)
def _countries() -> dict[str, dict]:
    spec = importlib.util.find_spec("codecarbon")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(spec.submodule_search_locations[0]) / "data" / "private_infra" / "global_energy_mix.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def check_country(code: str) -> str:
    """The 3-letter ISO code, upper-cased; a one-line error when CodeCarbon has no carbon intensity for it."""
    c = code.strip().upper()
    known = _countries()
    if known and c not in known:
        raise ConfigError(f"unknown country code '{code}' for the carbon intensity",
                          "use a 3-letter ISO 3166 code such as USA, FRA, DEU, GBR, IND")
    return c


def carbon_intensity(code: str) -> float | None:
    """Grid carbon intensity in g CO2eq per kWh (CodeCarbon's table), for the card."""
    entry = _countries().get(code.upper())
    return float(entry["carbon_intensity"]) if entry and "carbon_intensity" in entry else None


class CarbonMeter:
    """Start/stop around work; `emissions_kg()` while running, `stop()` → (kWh, kg CO2eq). Disabled: zeros."""

    def __init__(self, country: str, enabled: bool = True, machine: bool = False):
        self.country = country
        self.enabled = enabled
        self.machine = machine
        self._tracker = None
        self.kwh = 0.0
        self.kg = 0.0

    def start(self) -> "CarbonMeter":
        if not self.enabled:
            return self
        from codecarbon import OfflineEmissionsTracker

        logging.getLogger("codecarbon").setLevel(logging.ERROR)  # after import: codecarbon sets its own level

        self._tracker = OfflineEmissionsTracker(
            country_iso_code=self.country, output_methods=[], log_level="error", measure_power_secs=5,
            tracking_mode="machine" if self.machine else "process", allow_multiple_runs=True,
            project_name="labscale-finetune",
        )
        self._tracker.start()
        return self

    def emissions_kg(self) -> float:
        """CO2eq so far (kg); measures now if the last sample is stale."""
        if self._tracker is None:
            return self.kg
        return float(self._tracker.flush() or 0.0)

    def stop(self) -> tuple[float, float]:
        if self._tracker is not None:
            kg = self._tracker.stop()
            data = getattr(self._tracker, "final_emissions_data", None)
            self.kwh = float(getattr(data, "energy_consumed", 0.0) or 0.0)
            self.kg = float(kg or 0.0)
            self._tracker = None
        return self.kwh, self.kg
