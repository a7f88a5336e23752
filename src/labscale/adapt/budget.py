"""Money and carbon for one adaptation: hardware prices, the pre-training estimate, and the cap during training.

Cost = measured wall hours of the training process (model loading, probe, training, validation, saving; every
resumed segment counted) × the hardware's price per hour × the number of training processes (devices).

Default prices (US $ per device-hour, approximate on-demand list prices as of 2025-06; override with
`--price-per-hour`):

    cpu   $0.10  a small cloud VM (2 vCPU, e.g. the compute-optimised "large" sizes at about $0.09/h)
    t4    $0.35  one NVIDIA T4 16 GB (Google Cloud's on-demand GPU price; AWS g4dn.xlarge is about $0.53/h)
    a100  $1.50  one NVIDIA A100 40 GB (GPU clouds list $1.10–1.80/h; hyperscalers charge more)

Estimate (the probe). Before training, a few real micro-batches are timed forward + backward (no optimizer step);
their tokens/s, the recipe's remaining steps × tokens per step and the validation passes (forward only, counted at
3× the training speed) give the expected wall time, hence $; CO2eq extrapolates the energy CodeCarbon measured
during the probe. Over a cap → refuse before training, with the estimate.

During training, after every step: spent so far + the next step + a final validation must stay under the cap,
else training stops there (evaluating and checkpointing once more if no checkpoint exists yet), and the best
checkpoint becomes the adapter.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from labscale.errors import ConfigError, LabscaleError

PRICES_AS_OF = "2025-06"
EVAL_SPEEDUP = 3.0  # a forward pass costs about a third of forward + backward


@dataclass(frozen=True)
class Hardware:
    name: str
    description: str
    usd_per_hour: float


HARDWARE: dict[str, Hardware] = {
    "cpu": Hardware("cpu", "CPU (a small cloud VM, 2 vCPU)", 0.10),
    "t4": Hardware("t4", "NVIDIA T4 16 GB", 0.35),
    "a100": Hardware("a100", "NVIDIA A100 40 GB", 1.50),
}


def detect_hardware() -> str:
    """cpu without CUDA; else t4 or a100 by the GPU's name, falling back to its memory (≤ 24 GB: t4 class)."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    name = torch.cuda.get_device_name(0).upper()
    if "T4" in name:
        return "t4"
    if "A100" in name:
        return "a100"
    return "t4" if torch.cuda.get_device_properties(0).total_memory <= 24 * 2**30 else "a100"


def hardware_class(name: str) -> Hardware:
    if name == "auto":
        name = detect_hardware()
    if name not in HARDWARE:
        raise ConfigError(f"unknown hardware class '{name}'", f"use auto or one of: {', '.join(HARDWARE)}")
    return HARDWARE[name]


class BudgetExceeded(LabscaleError):
    """The estimated cost (or CO2eq) of an adaptation is over its cap."""


@dataclass
class Estimate:
    tokens_per_s: float  # probe: training tokens per second per process
    steps: int  # optimizer steps still to run
    seconds: float  # expected total wall time, time already spent included
    usd: float
    kg_co2: float | None

    def timing(self) -> str:
        return f"~{self.seconds / 60:.1f} min ({self.steps} steps at {self.tokens_per_s:,.0f} tokens/s)"

    def line(self) -> str:
        co2 = f", ~{self.kg_co2 * 1000:.1f} g CO2eq" if self.kg_co2 is not None else ""
        return f"{self.timing()}, ~${self.usd:.4f}{co2}"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Budget:
    cap_usd: float
    cap_kg: float | None
    usd_per_hour: float
    devices: int = 1

    def usd(self, seconds: float) -> float:
        return seconds / 3600 * self.usd_per_hour * self.devices

    def estimate(self, tokens_per_s: float, steps: int, tokens_per_step: float, evals: int, eval_tokens: float,
                 spent_s: float, kg_per_s: float | None, spent_kg: float = 0.0) -> Estimate:
        """Expected totals (per process: tokens are already divided among processes)."""
        rate = max(tokens_per_s, 1e-9)
        ahead = steps * tokens_per_step / rate + evals * eval_tokens / (EVAL_SPEEDUP * rate)
        total = spent_s + ahead
        kg = None if kg_per_s is None else spent_kg + kg_per_s * ahead
        return Estimate(tokens_per_s, steps, total, self.usd(total), kg)

    def check(self, est: Estimate) -> None:
        hint = "raise the cap (--budget / --co2-cap), lower --max-steps, or pick a cheaper recipe or hardware"
        if est.usd > self.cap_usd:
            devices = f" × {self.devices} devices" if self.devices > 1 else ""
            raise BudgetExceeded(f"estimated cost ${est.usd:.4f} exceeds the budget ${self.cap_usd:g} "
                                 f"({est.timing()} at ${self.usd_per_hour:g}/h{devices})", hint)
        if self.cap_kg is not None and est.kg_co2 is not None and est.kg_co2 > self.cap_kg:
            raise BudgetExceeded(f"estimated emissions {est.kg_co2:.6f} kg CO2eq exceed the cap {self.cap_kg:g} kg "
                                 f"({est.timing()})", hint)
