"""Formatting shared by every report section: numbers, CIs, sizes and markdown tables."""

from __future__ import annotations


def fmt(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:.1f}" if abs(x) >= 10 else f"{x:.3f}"


def fmt_ci(value, low, high) -> str:
    return f"{fmt(value)} [{fmt(low)}, {fmt(high)}]" if value is not None else "n/a"


def fmt_bytes(n: int | None) -> str:
    return "n/a" if not n else f"{n / 2**20:,.0f} MiB"


def fmt_rate(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    esc = lambda s: str(s).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    out = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return out + [""]
