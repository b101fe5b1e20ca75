"""The isoFLOP picture as a deterministic SVG: predicted loss against N along the budget's line.

Hand-written SVG (no plotting library, no fonts embedded, fixed number formatting) so the file is
byte-identical across machines and diffs cleanly in git.
"""

from __future__ import annotations

import math
from html import escape

from .plan import Plan
from .units import si

WIDTH, HEIGHT = 720, 420
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 80, 50
PALETTE = ("#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def _fmt(x: float) -> str:
    return f"{x:.1f}"


def isoflop_svg(plan: Plan) -> str:
    points = [(p.n_params, p.loss) for p in plan.frontier]
    picks = [(v.name, v.choice.n_params, v.choice.loss) for v in plan.variants]
    opt = (plan.closed_form.n_params, plan.closed_form.loss)
    xs = [math.log10(n) for n, _ in points] + [math.log10(n) for _, n, _ in picks] + [math.log10(opt[0])]
    ys = [l for _, l in points] + [l for _, _, l in picks] + [opt[1]]
    x0, x1 = math.floor(min(xs) * 4) / 4, math.ceil(max(xs) * 4) / 4
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.08 or 0.01
    y0, y1 = y0 - pad, y1 + pad
    if x1 == x0:
        x0, x1 = x0 - 0.25, x1 + 0.25

    def px(logn: float) -> float:
        return LEFT + (logn - x0) / (x1 - x0) * (WIDTH - LEFT - RIGHT)

    def py(loss: float) -> float:
        return TOP + (y1 - loss) / (y1 - y0) * (HEIGHT - TOP - BOTTOM)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">',
           f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
           f'<text x="{WIDTH // 2}" y="20" text-anchor="middle" font-size="14">'
           f'{escape(plan.name)}: predicted loss along the {plan.budget.flops:.3g} FLOPs '
           f'({escape(plan.budget.convention)}) isoFLOP line, law {escape(plan.law.name)}</text>']
    # Axes and ticks: decades and quarter-decades of N, five loss ticks.
    base_y = HEIGHT - BOTTOM
    out.append(f'<line x1="{LEFT}" y1="{base_y}" x2="{WIDTH - RIGHT}" y2="{base_y}" stroke="black"/>')
    out.append(f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{base_y}" stroke="black"/>')
    # Ticks at 1, 2 and 5 × 10^k inside the axis.
    for k in range(math.floor(x0), math.ceil(x1) + 1):
        for m in (1, 2, 5):
            t = k + math.log10(m)
            if x0 <= t <= x1:
                out.append(f'<line x1="{_fmt(px(t))}" y1="{base_y}" x2="{_fmt(px(t))}" y2="{base_y + 5}" stroke="black"/>')
                out.append(f'<text x="{_fmt(px(t))}" y="{base_y + 18}" text-anchor="middle">{si(m * 10.0 ** k, 0)}</text>')
    for k in range(5):
        v = y0 + (y1 - y0) * k / 4
        out.append(f'<line x1="{LEFT - 5}" y1="{_fmt(py(v))}" x2="{LEFT}" y2="{_fmt(py(v))}" stroke="black"/>')
        out.append(f'<text x="{LEFT - 8}" y="{_fmt(py(v) + 4)}" text-anchor="end">{v:.4f}</text>')
    out.append(f'<text x="{(LEFT + WIDTH - RIGHT) // 2}" y="{HEIGHT - 12}" text-anchor="middle">'
               'N, parameters (log scale)</text>')
    out.append(f'<text x="16" y="{(TOP + base_y) // 2}" text-anchor="middle" '
               f'transform="rotate(-90 16 {(TOP + base_y) // 2})">predicted loss</text>')
    # Every candidate's best loss per N bin, as grey dots joined by a line.
    if points:
        path = " ".join(f"{_fmt(px(math.log10(n)))},{_fmt(py(l))}" for n, l in points)
        out.append(f'<polyline points="{path}" fill="none" stroke="#bbbbbb"/>')
        for n, l in points:
            out.append(f'<circle cx="{_fmt(px(math.log10(n)))}" cy="{_fmt(py(l))}" r="2" fill="#888888"/>')
    # The closed-form optimum and the picks.
    ox, oy = px(math.log10(opt[0])), py(opt[1])
    out.append(f'<path d="M{_fmt(ox - 6)},{_fmt(oy)} L{_fmt(ox + 6)},{_fmt(oy)} M{_fmt(ox)},{_fmt(oy - 6)} '
               f'L{_fmt(ox)},{_fmt(oy + 6)}" stroke="black" stroke-width="2"/>')
    legend = [("closed-form optimum (C = 6ND)", "black")]
    for k, (name, n, l) in enumerate(picks):
        colour = PALETTE[k % len(PALETTE)]
        out.append(f'<circle cx="{_fmt(px(math.log10(n)))}" cy="{_fmt(py(l))}" r="6" fill="none" '
                   f'stroke="{colour}" stroke-width="2"/>')
        legend.append((f"{name}: N {si(n)}, loss {l:.4f}", colour))
    # The legend sits between the title and the plot, one row per entry, so it never hides a point.
    for k, (label, colour) in enumerate(legend):
        y = 38 + 14 * k
        out.append(f'<rect x="{LEFT}" y="{y - 9}" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{LEFT + 15}" y="{y}">{escape(label)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
