"""The plot of issue 13: p99 added latency against WAN loss, one line per subject, as SVG.

Drawn by hand from the ``"wan"`` rows of a results JSON of ``run.py``, so that it needs
nothing beyond Python: a grid of panels, one row per load and one column per round-trip
time, each with a line per subject on a logarithmic scale of milliseconds, and issue 13's
target where it has one. Usage::

    python3 contrib/bench/wan_plot.py build/bench/results.json contrib/bench/wan-p99.svg
"""

from __future__ import annotations

import json
import math
import sys
from html import escape
from pathlib import Path
from typing import Any

SUBJECTS = {  # subject: its colour, matplotlib's tab10 as in the bench's latency.png
    "kernel": "#7f7f7f",
    "original": "#d62728",
    "ours": "#1f77b4",
    "ours+conns": "#2ca02c",
}
LOADS = {"paced200": "200 B at 1,000/s", "rtp50": "200 B at 50/s each way"}
RTTS_MS = (20, 80)  # the columns; at 0 ms there is no RTT to measure against
TARGETS_MS = {("paced200", 20): 40, ("rtp50", 20): 30}  # issue 13: 2x and 1.5x the RTT
PANEL_W, PANEL_H = 300, 210  # the plotting area of one panel, in SVG units (pixels)
LEFT, TOP, GAP_X, GAP_Y = 60, 50, 50, 70  # margins: axis labels left, titles above
LEGEND_W = 170  # right of the panels
FLOOR_MS = 0.1  # the lowest decade shown: the kernel path adds about that much


def rows_by_panel(results: dict[str, Any]) -> dict[tuple[str, float], dict[str, list]]:
    """{(load, rtt): {subject: [(loss %, +p99 ms), ...]}} from the results' WAN rows."""
    panels: dict[tuple[str, float], dict[str, list]] = {}
    for row in results["wan"]:
        if row["rtt_ms"] in RTTS_MS and row["added_p99_ms"] is not None:
            lines = panels.setdefault((row["load"], row["rtt_ms"]), {})
            lines.setdefault(row["subject"], []).append((row["wan_loss_pct"], row["added_p99_ms"]))
    return panels


def svg(results: dict[str, Any]) -> str:
    """The whole figure, as the text of an SVG document."""
    panels = rows_by_panel(results)
    values = [ms for lines in panels.values() for pts in lines.values() for _, ms in pts]
    top = 10 ** math.ceil(math.log10(max(values, default=1000)))
    losses = sorted({loss for lines in panels.values() for p in lines.values() for loss, _ in p})
    width = LEFT + len(RTTS_MS) * (PANEL_W + GAP_X) + LEGEND_W
    height = TOP + len(LOADS) * (PANEL_H + GAP_Y)
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{LEFT}" y="20" font-size="14">p99 latency added to the path (ms, one way, '
        "over RTT/2) against loss on the WAN link (each way)</text>",
    ]
    for row, (load, what) in enumerate(LOADS.items()):
        for column, rtt in enumerate(RTTS_MS):
            x0 = LEFT + column * (PANEL_W + GAP_X)
            y0 = TOP + row * (PANEL_H + GAP_Y)
            title = f"{what}, {rtt} ms RTT"
            out += panel(x0, y0, title, panels.get((load, rtt), {}), losses, top)
            if target := TARGETS_MS.get((load, rtt)):
                y = y0 + scale_y(target, top)
                out.append(
                    f'<line x1="{x0}" x2="{x0 + PANEL_W}" y1="{y:.1f}" y2="{y:.1f}" '
                    'stroke="black" stroke-dasharray="2,3"/>'
                )
                out.append(f'<text x="{x0 + 4}" y="{y - 4:.1f}">target {target} ms</text>')
    legend_x = LEFT + len(RTTS_MS) * (PANEL_W + GAP_X)
    connections = {row["subject"]: row.get("connections", 1) for row in results["wan"]}
    for i, (subject, colour) in enumerate(SUBJECTS.items()):
        label = subject + (
            f", N = {connections[subject]}" if connections.get(subject, 1) > 1 else ""
        )
        y = TOP + 20 + 20 * i
        out.append(
            f'<line x1="{legend_x}" x2="{legend_x + 24}" y1="{y}" y2="{y}" '
            f'stroke="{colour}" stroke-width="2"/>'
        )
        out.append(f'<text x="{legend_x + 30}" y="{y + 4}">{escape(label)}</text>')
    machine = results.get("machine", {})
    note = f"repository {machine.get('repository', '?')}, {machine.get('nproc', '?')} CPUs"
    out.append(f'<text x="{legend_x}" y="{TOP + 110}" font-size="10">{escape(note)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def scale_y(ms: float, top: float) -> float:
    """The height of ``ms`` below a panel's top edge, on the log scale from FLOOR_MS to top."""
    span = math.log10(top) - math.log10(FLOOR_MS)
    share = (math.log10(max(ms, FLOOR_MS)) - math.log10(FLOOR_MS)) / span
    return PANEL_H * (1 - share)


def panel(
    x0: float, y0: float, title: str, lines: dict[str, list], losses: list[float], top: float
) -> list[str]:
    """One panel: frame, decades, loss ticks (evenly spaced: 0, 0.5, 1 and 3 % apart), lines."""

    def x_of(loss: float) -> float:
        return x0 + PANEL_W * (losses.index(loss) + 0.5) / len(losses)

    out = [
        f'<text x="{x0}" y="{y0 - 8}" font-weight="bold">{escape(title)}</text>',
        f'<rect x="{x0}" y="{y0}" width="{PANEL_W}" height="{PANEL_H}" fill="none" '
        'stroke="black"/>',
    ]
    decade = FLOOR_MS
    while decade <= top * 1.001:
        y = y0 + scale_y(decade, top)
        out.append(f'<line x1="{x0}" x2="{x0 + PANEL_W}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end">{decade:g}</text>')
        decade *= 10
    for loss in losses:
        x = x_of(loss)
        out.append(
            f'<text x="{x:.1f}" y="{y0 + PANEL_H + 16}" text-anchor="middle">{loss:g}%</text>'
        )
    for subject, colour in SUBJECTS.items():
        points = sorted(lines.get(subject, []))
        if not points:
            continue
        coords = " ".join(f"{x_of(loss):.1f},{y0 + scale_y(ms, top):.1f}" for loss, ms in points)
        out.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for pair in coords.split():
            x, y = pair.split(",")
            out.append(f'<circle cx="{x}" cy="{y}" r="3" fill="{colour}"/>')
    return out


def main(argv: list[str]) -> None:
    if len(argv) != 3:
        sys.exit(f"usage: {argv[0]} RESULTS.json OUT.svg")
    results = json.loads(Path(argv[1]).read_text())
    Path(argv[2]).write_text(svg(results))


if __name__ == "__main__":
    main(sys.argv)
