"""The program page's charts, drawn on the server with matplotlib (the SVG backend, no
JavaScript): each function returns an `<svg>` document as text, its words kept as text
(readable, searchable, sharp when printed). Colours match the summary page."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

STAGE_COLOURS = {"sent": "#9aa0a6", "accepted": "#8ab4f8", "kit_dispatched": "#0b57d0",
                 "registered": "#f29900", "at_lab": "#a142f4", "results_available": "#1a7f37",
                 "cancelled": "#5f6368", "failed": "#b3261e"}


def _pyplot():
    import matplotlib  # a Figure drawn straight to SVG: no pyplot, no GUI backend, no display needed

    matplotlib.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "labsync", "font.size": 10,
                                "font.family": "sans-serif", "axes.spines.top": False,
                                "axes.spines.right": False})
    from matplotlib.figure import Figure

    return Figure


def _svg(fig) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    start = text.find("<svg")
    return text[start:] if start >= 0 else text


def stage_bars(stages: Mapping[str, int], labels: Mapping[str, str], title: str) -> str:
    """Horizontal bars: how many are at each stage now."""
    Figure = _pyplot()
    names = list(stages)
    fig = Figure(figsize=(7, 0.38 * len(names) + 0.8))
    ax = fig.add_subplot()
    values = [stages[n] for n in names]
    bars = ax.barh([labels.get(n, n) for n in names], values, color=[STAGE_COLOURS.get(n, "#0b57d0") for n in names])
    ax.invert_yaxis()
    ax.bar_label(bars, labels=[str(v) for v in values], padding=3)
    ax.set_title(title, loc="left")
    ax.set_xlabel("order items")
    ax.margins(x=0.12)
    return _svg(fig)


def funnel(weeks: Sequence[Mapping[str, Any]], stages: Sequence[str], labels: Mapping[str, str]) -> str:
    """Per week of sending, how many items reached each stage (grouped bars)."""
    Figure = _pyplot()
    fig = Figure(figsize=(7.5, 3.2))
    ax = fig.add_subplot()
    n = max(len(weeks), 1)
    width = 0.8 / len(stages)
    for k, s in enumerate(stages):
        ax.bar([i + k * width for i in range(len(weeks))], [w[s] for w in weeks], width,
               label=labels.get(s, s), color=STAGE_COLOURS.get(s))
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(weeks))], [w["week"] for w in weeks],
                  rotation=30 if n > 6 else 0, ha="right" if n > 6 else "center")
    ax.set_xlabel("week of sending (Monday, UTC)")
    ax.set_ylabel("order items that reached the stage")
    ax.set_title("Funnel per week of sending", loc="left")
    ax.legend(fontsize=8, ncols=3, frameon=False, loc="upper left", bbox_to_anchor=(0, -0.25))
    return _svg(fig)


def timing_bars(timing: Mapping[str, Mapping[str, Any]], labels: Mapping[str, str]) -> str:
    """Median and 90th percentile days per stage."""
    Figure = _pyplot()
    names = [k for k in timing if k != "sent_to_results"]
    fig = Figure(figsize=(7, 0.5 * len(names) + 0.9))
    ax = fig.add_subplot()
    med = [timing[k]["median_days"] or 0 for k in names]
    p90 = [timing[k]["p90_days"] or 0 for k in names]
    ys = list(range(len(names)))
    b1 = ax.barh([y - 0.2 for y in ys], med, 0.4, label="median", color="#0b57d0")
    b2 = ax.barh([y + 0.2 for y in ys], p90, 0.4, label="90th percentile", color="#8ab4f8")
    ax.bar_label(b1, labels=[f"{v:g} d" for v in med], padding=3, fontsize=8)
    ax.bar_label(b2, labels=[f"{v:g} d" for v in p90], padding=3, fontsize=8)
    ax.set_yticks(ys, [labels.get(k, k) for k in names])
    ax.invert_yaxis()
    ax.set_xlabel("days")
    ax.set_title("Time per stage", loc="left")
    ax.legend(frameon=False, fontsize=8, loc="lower right")
    ax.margins(x=0.15)
    return _svg(fig)
