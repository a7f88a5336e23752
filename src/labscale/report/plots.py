"""Charts for the HTML report, drawn with matplotlib (Agg) and inlined as SVG text (no file, no network).

Every chart returns an `<svg>` string whose ids are prefixed per chart, so many charts can share one page. Text
stays text (`svg.fonttype = none`), so the page is searchable and tests can read labels. Colours follow the
verdicts (report/verdicts.py); hollow markers are estimated figures, grey ones are dominated (off the Pareto
frontier).
"""

from __future__ import annotations

import io
import itertools
import re

VERDICT_COLORS = {"better": "#2e7d32", "within margin": "#1565c0", "worse": "#c62828",
                  "inconclusive": "#ef8f00", "reference": "#6a1b9a", None: "#757575"}
DOMINATED = "#b8bec8"
_counter = itertools.count()


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "labscale", "font.size": 9,
                         "axes.spines.top": False, "axes.spines.right": False})
    return plt


def to_svg(fig) -> str:
    plt = _plt()
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"\s*<metadata>.*?</metadata>", "", text, flags=re.S)  # RDF boilerplate naming outside URLs
    prefix = f"c{next(_counter)}-"
    text = re.sub(r'id="([^"]+)"', lambda m: f'id="{prefix}{m.group(1)}"', text)
    text = re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{prefix}{m.group(1)})", text)
    text = re.sub(r'xlink:href="#([^"]+)"', lambda m: f'xlink:href="#{prefix}{m.group(1)}"', text)
    return text


def pareto(points: list[dict], higher_is_better: bool = True) -> list[int]:
    """Indices of the points on the frontier of lower x and better y: no other point has x ≤ and y ≥ (≤ when lower
    is better) with one of them strict. Points without x or y are off it."""
    sign = 1 if higher_is_better else -1
    ok = [i for i, p in enumerate(points) if p.get("x") is not None and p.get("y") is not None]
    front = []
    for i in ok:
        xi, yi = points[i]["x"], sign * points[i]["y"]
        if not any(points[j]["x"] <= xi and sign * points[j]["y"] >= yi and
                   (points[j]["x"] < xi or sign * points[j]["y"] > yi) for j in ok if j != i):
            front.append(i)
    return sorted(front, key=lambda i: points[i]["x"])


def quality_scatter(points: list[dict], xlabel: str, ylabel: str, title: str, higher_is_better: bool = True) -> str:
    """Quality (y, with CI whiskers lo/hi) against a cost (x) for every model × setting: the Pareto frontier drawn,
    dominated points grey, estimated x hollow. points: {label, x, y, lo, hi, estimated, verdict}."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    shown = [p for p in points if p.get("x") is not None and p.get("y") is not None]
    front = set(pareto(shown, higher_is_better))
    for i, p in enumerate(shown):
        color = VERDICT_COLORS.get(p.get("verdict"), VERDICT_COLORS[None]) if i in front else DOMINATED
        lo, hi = p.get("lo"), p.get("hi")
        if lo is not None and hi is not None:
            ax.errorbar([p["x"]], [p["y"]], yerr=[[max(0.0, p["y"] - lo)], [max(0.0, hi - p["y"])]], fmt="none",
                        ecolor=color, elinewidth=1.2, capsize=3, zorder=2)
        ax.scatter([p["x"]], [p["y"]], s=46, zorder=3, linewidths=1.6, edgecolors=color,
                   facecolors="white" if p.get("estimated") else color, marker="o")
        ax.annotate(p["label"], (p["x"], p["y"]), textcoords="offset points", xytext=(6, 4), fontsize=7.5,
                    color="#333" if i in front else "#8a919c")
    if len(front) > 1:
        xs = [shown[i]["x"] for i in sorted(front, key=lambda i: shown[i]["x"])]
        ys = [shown[i]["y"] for i in sorted(front, key=lambda i: shown[i]["x"])]
        ax.step(xs, ys, where="post", color="#555", linewidth=0.9, linestyle="--", zorder=1, label="Pareto frontier")
    xs = [p["x"] for p in shown]
    if xs and min(xs) > 0 and max(xs) / min(xs) > 50:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", linestyle="", color=c, label=v) for v, c in VERDICT_COLORS.items()
               if v and any(p.get("verdict") == v for p in shown)]
    handles += [Line2D([], [], marker="o", linestyle="", markerfacecolor="white", markeredgecolor="#555",
                       color="#555", label="hollow: estimated x"),
                Line2D([], [], marker="o", linestyle="", color=DOMINATED, label="grey: dominated")]
    if len(front) > 1:
        handles.append(Line2D([], [], color="#555", linestyle="--", label="Pareto frontier"))
    ax.legend(handles=handles, fontsize=7, loc="best", frameon=False)
    if not shown:
        ax.text(0.5, 0.5, "no figures", transform=ax.transAxes, ha="center")
    return to_svg(fig)


def adaptation_chart(points: list[dict], title: str) -> str:
    """Adaptation cost ($) against quality gain over the base model (CI whiskers); labels give kWh and CO2eq.
    points: {label, usd, gain, lo, hi, kwh, co2eq_kg, estimated}."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for p in points:
        color = "#2e7d32" if (p.get("gain") or 0) > 0 else "#c62828"
        if p.get("lo") is not None:
            ax.errorbar([p["usd"]], [p["gain"]], yerr=[[max(0.0, p["gain"] - p["lo"])], [max(0.0, p["hi"] - p["gain"])]],
                        fmt="none", ecolor=color, capsize=3)
        ax.scatter([p["usd"]], [p["gain"]], s=50, edgecolors=color, linewidths=1.6,
                   facecolors="white" if p.get("estimated") else color, zorder=3)
        energy = f"{p['kwh']:.4f} kWh" if p.get("kwh") is not None else "kWh n/a"
        co2 = f"{1000 * p['co2eq_kg']:.2f} g CO2eq" if p.get("co2eq_kg") is not None else "CO2eq n/a"
        ax.annotate(f"{p['label']}\n{energy}, {co2}{' (est.)' if p.get('energy_estimated') else ''}",
                    (p["usd"], p["gain"]), textcoords="offset points", xytext=(6, 4), fontsize=7.5)
    ax.axhline(0, color="#999", linewidth=0.8)
    ax.set_xlabel("adaptation cost, US $ (training + teacher; hollow: estimated)")
    ax.set_ylabel("gain over the base model")
    ax.set_title(title, fontsize=10)
    return to_svg(fig)


def fairness_chart(groups: list[str], series: list[dict], title: str, ylabel: str) -> str:
    """Bars per group with CI whiskers, one bar per series (model · setting); the worst group's bar of each series
    is outlined in red and marked "worst". series: {label, values: {group: (v, lo, hi)}, worst: group}."""
    import numpy as np

    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.8, 0.9 * len(groups) * max(1, len(series)) + 1.5), 3.6))
    width = 0.8 / max(1, len(series))
    x = np.arange(len(groups))
    palette = ["#3b7ddd", "#ef8f00", "#2e7d32", "#6a1b9a", "#00838f", "#ad1457"]
    for k, s in enumerate(series):
        vals = [s["values"].get(g, (None, None, None)) for g in groups]
        heights = [v[0] if v[0] is not None else 0 for v in vals]
        err = [[max(0.0, v[0] - v[1]) if v[0] is not None and v[1] is not None else 0 for v in vals],
               [max(0.0, v[2] - v[0]) if v[0] is not None and v[2] is not None else 0 for v in vals]]
        pos = x + (k - (len(series) - 1) / 2) * width
        bars = ax.bar(pos, heights, width * 0.92, yerr=err, capsize=2, color=palette[k % len(palette)],
                      label=s["label"], error_kw={"elinewidth": 0.9})
        if s.get("worst") in groups:
            i = groups.index(s["worst"])
            bars[i].set_edgecolor("#c62828")
            bars[i].set_linewidth(2)
            ax.annotate("worst", (pos[i], heights[i]), textcoords="offset points", xytext=(0, 10), ha="center",
                        fontsize=7, color="#c62828")
    ax.set_xticks(x)
    ax.set_xticklabels(groups, rotation=20 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, frameon=False)
    return to_svg(fig)


def verdict_matrix(tasks: list[str], columns: list[str], cells: dict) -> str:
    """Tasks × (model · setting) coloured by verdict, the score written in each cell. cells[(task, column)] =
    (text, verdict)."""
    import numpy as np
    from matplotlib.colors import to_rgb

    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.25 * len(columns) + 2), max(1.6, 0.55 * len(tasks) + 1.2)))
    img = np.ones((len(tasks), len(columns), 3))
    for (t, c), (_, verdict) in cells.items():
        rgb = to_rgb(VERDICT_COLORS.get(verdict, VERDICT_COLORS[None]))
        img[tasks.index(t), columns.index(c)] = [1 - 0.45 * (1 - v) for v in rgb]  # lighter, text stays legible
    ax.imshow(img, aspect="auto")
    for (t, c), (text, verdict) in cells.items():
        ax.text(columns.index(c), tasks.index(t), f"{text}\n{verdict or 'n/a'}", ha="center", va="center",
                fontsize=7.5)
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels(columns, rotation=25, ha="right", fontsize=8)
    ax.set_yticks(range(len(tasks)))
    ax.set_yticklabels(tasks, fontsize=8)
    for side in ("top", "right", "left", "bottom"):
        ax.spines[side].set_visible(False)
    ax.set_title("Results matrix: main metric, coloured by verdict against the reference", fontsize=10)
    return to_svg(fig)
