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


def _ranges(xs, ys, pad_fraction):
    """Axis ranges: log10 N to the quarter decade around xs, losses padded by pad_fraction."""
    x0, x1 = math.floor(min(xs) * 4) / 4, math.ceil(max(xs) * 4) / 4
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * pad_fraction or 0.01
    if x1 == x0:
        x0, x1 = x0 - 0.25, x1 + 0.25
    return x0, x1, y0 - pad, y1 + pad


def _svg_open(width: int, height: int, desc: str | None = None) -> list[str]:
    """The root element, the description a command recognises its own file by, a white page."""
    return [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
            *([f"<desc>{escape(desc)}</desc>"] if desc else []),
            f'<rect width="{width}" height="{height}" fill="white"/>']


def _legend(entries: list[tuple[str, str]], x: float, first_y: float) -> list[str]:
    """One row per (label, colour), a swatch then the label; rows 14 px apart."""
    out = []
    for k, (label, colour) in enumerate(entries):
        y = first_y + 14 * k
        out.append(f'<rect x="{x}" y="{y - 9}" width="10" height="10" fill="{colour}"/>')
        out.append(f'<text x="{x + 15}" y="{y}">{escape(label)}</text>')
    return out


def _value_ticks(py, v0: float, v1: float, left: float, label) -> list[str]:
    """Five ticks on a vertical axis at `left`, from v0 to v1, labelled label(value)."""
    out = []
    for k in range(5):
        v = v0 + (v1 - v0) * k / 4
        out.append(f'<line x1="{left - 5}" y1="{_fmt(py(v))}" x2="{left}" y2="{_fmt(py(v))}" '
                   'stroke="black"/>')
        out.append(f'<text x="{left - 8}" y="{_fmt(py(v) + 4)}" text-anchor="end">'
                   f'{escape(label(v))}</text>')
    return out


def _n_ticks(px_log, x0: float, x1: float, base_y: float) -> list[str]:
    """Ticks at 1, 2 and 5 × 10^k parameters inside [x0, x1] (log10 N); px_log maps log10 N."""
    out = []
    for k in range(math.floor(x0), math.ceil(x1) + 1):
        for m in (1, 2, 5):
            t = k + math.log10(m)
            if x0 <= t <= x1:
                out.append(f'<line x1="{_fmt(px_log(t))}" y1="{base_y}" x2="{_fmt(px_log(t))}" '
                           f'y2="{base_y + 5}" stroke="black"/>')
                out.append(f'<text x="{_fmt(px_log(t))}" y="{base_y + 18}" '
                           f'text-anchor="middle">{si(m * 10.0 ** k, 0)}</text>')
    return out


def _n_axis_titles(height: int, top: float, base_y: float, y_title: str) -> list[str]:
    """'N, parameters (log scale)' under the plot, y_title turned along its left edge."""
    return [f'<text x="{(LEFT + WIDTH - RIGHT) // 2}" y="{height - 12}" text-anchor="middle">'
            'N, parameters (log scale)</text>',
            f'<text x="16" y="{(top + base_y) // 2}" text-anchor="middle" '
            f'transform="rotate(-90 16 {(top + base_y) // 2})">{y_title}</text>']


def isoflop_svg(plan: Plan) -> str:
    points = [(p.n_params, p.loss) for p in plan.frontier]
    picks = [(v.name, v.choice.n_params, v.choice.loss) for v in plan.variants]
    opt = (plan.closed_form.n_params, plan.closed_form.loss)
    xs = [math.log10(n) for n, _ in points] + [math.log10(n) for _, n, _ in picks] + [math.log10(opt[0])]
    ys = [l for _, l in points] + [l for _, _, l in picks] + [opt[1]]
    x0, x1, y0, y1 = _ranges(xs, ys, pad_fraction=0.08)

    def px(logn: float) -> float:
        return LEFT + (logn - x0) / (x1 - x0) * (WIDTH - LEFT - RIGHT)

    def py(loss: float) -> float:
        return TOP + (y1 - loss) / (y1 - y0) * (HEIGHT - TOP - BOTTOM)

    out = [*_svg_open(WIDTH, HEIGHT),
           f'<text x="{WIDTH // 2}" y="20" text-anchor="middle" font-size="14">'
           f'{escape(plan.name)}: predicted loss along the {plan.budget.flops:.3g} FLOPs '
           f'({escape(plan.budget.convention)}) isoFLOP line, law {escape(plan.law.name)}'
           + (' with repetition discounted (Muennighoff et al. 2023)'
              if any(v.data_limited for v in plan.variants) else '') + '</text>']
    # Axes and ticks: 1, 2 and 5 × 10^k parameters, five loss ticks.
    base_y = HEIGHT - BOTTOM
    out.append(f'<line x1="{LEFT}" y1="{base_y}" x2="{WIDTH - RIGHT}" y2="{base_y}" stroke="black"/>')
    out.append(f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{base_y}" stroke="black"/>')
    out += _n_ticks(px, x0, x1, base_y)
    out += _value_ticks(py, y0, y1, LEFT, lambda v: f"{v:.4f}")
    out += _n_axis_titles(HEIGHT, TOP, base_y, "predicted loss")
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
    out += _legend(legend, LEFT, 38)
    out.append("</svg>")
    return "\n".join(out) + "\n"


# --- planned against achieved (llama3gen calibrate --svg) -----------------------------------

PANEL_WIDTH, PANEL_HEIGHT = 420, 330
CALIBRATION_DESC = "written by llama3gen calibrate"  # how calibrate knows a file it may replace


def _panel(x_left: float, title: str, series: list[tuple[float, float]], planned: float,
           planned_label: str, y_label: str, y_format) -> list[str]:
    """One plot: `series` (step, value) as a line, `planned` as a dashed horizontal line."""
    left, right, top, bottom = x_left + 70, x_left + PANEL_WIDTH - 15, 84, PANEL_HEIGHT - 45
    steps = [s for s, _ in series] or [0.0]
    values = [v for _, v in series] + [planned]
    s0, s1 = min(steps), max(steps)
    if s1 == s0:
        s0, s1 = s0 - 1, s1 + 1
    v0, v1 = min(values), max(values)
    pad = (v1 - v0) * 0.08 or abs(v1) * 0.08 or 1.0
    if math.isfinite(v1 + pad - (v0 - pad)):  # values near the float limit (a hand-edited file)
        v0, v1 = v0 - pad, v1 + pad

    def px(step: float) -> float:
        return left + (step - s0) / (s1 - s0) * (right - left)

    def py(value: float) -> float:
        return top + (v1 - value) / (v1 - v0) * (bottom - top)

    out = [f'<text x="{_fmt((left + right) / 2)}" y="{top - 46}" text-anchor="middle" '
           f'font-size="13">{escape(title)}</text>',
           f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="black"/>',
           f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="black"/>']
    out += _value_ticks(py, v0, v1, left, y_format)
    for k in range(5):
        s = s0 + (s1 - s0) * k / 4
        out.append(f'<line x1="{_fmt(px(s))}" y1="{bottom}" x2="{_fmt(px(s))}" y2="{bottom + 5}" '
                   'stroke="black"/>')
        out.append(f'<text x="{_fmt(px(s))}" y="{bottom + 18}" text-anchor="middle">'
                   f'{s:.0f}</text>')
    out.append(f'<text x="{_fmt((left + right) / 2)}" y="{PANEL_HEIGHT - 8}" '
               'text-anchor="middle">optimizer step</text>')
    mid = (top + bottom) / 2
    out.append(f'<text x="{_fmt(x_left + 14)}" y="{_fmt(mid)}" text-anchor="middle" '
               f'transform="rotate(-90 {_fmt(x_left + 14)} {_fmt(mid)})">{escape(y_label)}</text>')
    out.append(f'<line x1="{left}" y1="{_fmt(py(planned))}" x2="{right}" y2="{_fmt(py(planned))}" '
               f'stroke="{PALETTE[0]}" stroke-dasharray="6 4" stroke-width="1.5"/>')
    if len(series) > 1:
        path = " ".join(f"{_fmt(px(s))},{_fmt(py(v))}" for s, v in series)
        out.append(f'<polyline points="{path}" fill="none" stroke="{PALETTE[1]}" stroke-width="1.5"/>')
    for s, v in series:
        out.append(f'<circle cx="{_fmt(px(s))}" cy="{_fmt(py(v))}" r="2" fill="{PALETTE[1]}"/>')
    for k, (label, colour) in enumerate(((planned_label, PALETTE[0]), ("measured", PALETTE[1]))):
        y = top - 26 + 13 * k  # legend rows between the panel's title and its plot
        out.append(f'<rect x="{left + 4}" y="{y - 5}" width="10" height="3" fill="{colour}"/>')
        out.append(f'<text x="{left + 18}" y="{y}" font-size="11">{escape(label)}</text>')
    return out


def calibration_svg(run: str, variant_name: str, losses: list[tuple[float, float]],
                    planned_loss: float, speeds: list[tuple[float, float]],
                    planned_speed: float, benchmark_speed: float | None = None,
                    desc: str = CALIBRATION_DESC) -> str:
    """The training loss of a run beside the plan's predicted final loss, and its tokens/s beside
    the plan's: two panels, deterministic (no dates, fixed number formatting)."""
    width = 2 * PANEL_WIDTH
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{PANEL_HEIGHT}" '
           f'viewBox="0 0 {width} {PANEL_HEIGHT}" font-family="sans-serif" font-size="12">',
           f'<desc>{escape(desc)}</desc>',
           f'<rect width="{width}" height="{PANEL_HEIGHT}" fill="white"/>',
           f'<text x="{width // 2}" y="18" text-anchor="middle" font-size="14">'
           f'{escape(run)}: planned ({escape(variant_name)}) against achieved</text>']
    out += _panel(0, "training loss", losses, planned_loss,
                  f"predicted final loss {planned_loss:.4f}", "loss", lambda v: f"{v:.3f}")
    label = f"planned {planned_speed:,.0f} tokens/s"
    if benchmark_speed is not None:
        label += f"; benchmark {benchmark_speed:,.0f}"
    out += _panel(PANEL_WIDTH, "throughput", speeds, planned_speed, label, "tokens/s",
                  lambda v: si(v, 3))
    out.append("</svg>")
    return "\n".join(out) + "\n"


def has_calibration_curves(c) -> bool:
    return bool(c.curve_loss) and c.planned_loss is not None


def calibration_figure(c, desc: str = CALIBRATION_DESC) -> str:
    """calibration_svg of a plan.Calibration (calibrate --svg, and docs/calibration.svg)."""
    benchmark = c.measured.tokens_per_second if c.how.startswith("benchmark") else None
    return calibration_svg(c.run, c.variant, c.curve_loss, c.planned_loss,
                           c.curve_tokens_per_second, c.planned.tokens_per_second, benchmark, desc)


# --- the sweep: loss against N per budget (docs/sweep.svg, llama3gen fit --svg) ----------------

def sweep_svg(title: str, caption: str, groups: list[dict], target: dict | None = None,
              desc: str | None = None) -> str:
    """Loss against N (log scale), one colour per budget: each group's `curve` [(N, loss)] as a
    line, its `dots` [(N, loss)] as points, its `minimum` (N, loss) as a cross, and `label`. The
    target, when given ({label, n, loss, n_ci, loss_ci}), as a black cross with its CI bars."""
    points = [p for g in groups for p in g["curve"] + g["dots"]]
    points += [g["minimum"] for g in groups if g.get("minimum")]
    if target is not None:
        points += [(target["n"], target["loss"])]
        points += [(n, target["loss"]) for n in target.get("n_ci") or ()]
        points += [(target["n"], l) for l in target.get("loss_ci") or ()]
    points = [(n, l) for n, l in points if n > 0 and math.isfinite(n) and math.isfinite(l)]
    xs, ys = [math.log10(n) for n, _ in points], [l for _, l in points]
    x0, x1, y0, y1 = _ranges(xs, ys, pad_fraction=0.06)
    legend_rows = len(groups) + (target is not None)
    top, height = 44 + 14 * legend_rows, HEIGHT + 14 * legend_rows  # the legend above the plot
    base_y = height - BOTTOM

    def px_log(logn: float) -> float:
        return LEFT + (logn - x0) / (x1 - x0) * (WIDTH - LEFT - RIGHT)

    def px(n: float) -> float:
        return px_log(math.log10(n))

    def py(loss: float) -> float:
        return top + (y1 - loss) / (y1 - y0) * (base_y - top)

    out = [*_svg_open(WIDTH, height, desc),
           f'<text x="{WIDTH // 2}" y="18" text-anchor="middle" font-size="14">{escape(title)}</text>',
           f'<text x="{WIDTH // 2}" y="33" text-anchor="middle" font-size="11">{escape(caption)}</text>',
           f'<line x1="{LEFT}" y1="{base_y}" x2="{WIDTH - RIGHT}" y2="{base_y}" stroke="black"/>',
           f'<line x1="{LEFT}" y1="{top}" x2="{LEFT}" y2="{base_y}" stroke="black"/>']
    out += _n_ticks(px_log, x0, x1, base_y)
    out += _value_ticks(py, y0, y1, LEFT, lambda v: f"{v:.3f}")
    out += _n_axis_titles(height, top, base_y, "loss")

    def cross(n, loss, colour, size=5):
        x, y = px(n), py(loss)
        return (f'<path d="M{_fmt(x - size)},{_fmt(y - size)} L{_fmt(x + size)},{_fmt(y + size)} '
                f'M{_fmt(x - size)},{_fmt(y + size)} L{_fmt(x + size)},{_fmt(y - size)}" '
                f'stroke="{colour}" stroke-width="2"/>')

    legend = []
    for k, g in enumerate(groups):
        colour = PALETTE[k % len(PALETTE)]
        curve = [(n, l) for n, l in g["curve"] if y0 <= l <= y1]
        if len(curve) > 1:
            path = " ".join(f"{_fmt(px(n))},{_fmt(py(l))}" for n, l in curve)
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        for n, l in g["dots"]:
            out.append(f'<circle cx="{_fmt(px(n))}" cy="{_fmt(py(l))}" r="3.5" fill="{colour}"/>')
        if g.get("minimum"):
            out.append(cross(*g["minimum"], colour))
        legend.append((g["label"], colour))
    if target is not None:
        n, loss = target["n"], target["loss"]
        if target.get("n_ci"):
            lo, hi = target["n_ci"]
            out.append(f'<line x1="{_fmt(px(lo))}" y1="{_fmt(py(loss))}" x2="{_fmt(px(hi))}" '
                       f'y2="{_fmt(py(loss))}" stroke="black"/>')
        if target.get("loss_ci"):
            lo, hi = target["loss_ci"]
            out.append(f'<line x1="{_fmt(px(n))}" y1="{_fmt(py(lo))}" x2="{_fmt(px(n))}" '
                       f'y2="{_fmt(py(hi))}" stroke="black"/>')
        out.append(cross(n, loss, "black", 7))
        legend.append((target["label"], "black"))
    out += _legend(legend, LEFT, 52)
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _isoflop_curve(law, flops: float, n_lo: float, n_hi: float, points: int = 48):
    """(N, L(N, C/6N)) along a budget's line, log-spaced from n_lo to n_hi."""
    step = (math.log(n_hi) - math.log(n_lo)) / (points - 1)
    ns = [math.exp(math.log(n_lo) + k * step) for k in range(points)]
    return [(n, float(law.loss(n, flops / (6.0 * n)))) for n in ns]


def sweep_ladder_svg(plan: Plan) -> str:
    """docs/sweep.svg: the sweep's shapes on the prior law's isoFLOP curves (C = 6ND), each
    budget's prior minimum, and the target's closed-form optimum."""
    from .laws import ScalingLaw
    law = None
    if plan.law.E is not None:
        law = ScalingLaw(plan.law.name, plan.law.E, plan.law.A, plan.law.B, plan.law.alpha,
                         plan.law.beta, plan.law.citation)
    groups = []
    for c in plan.sweep.budgets:
        runs = [r for r in plan.sweep.runs if r.budget_flops == c]
        ns = [r.choice.n_params for r in runs]
        dots = [(r.choice.n_params, r.choice.loss) for r in runs]
        curve, minimum = [], None
        if law is not None:
            curve = _isoflop_curve(law, c, min(ns) / 1.5, max(ns) * 1.5)
            opt = law.optimum_6nd(c)
            minimum = (opt.n_params, opt.loss)
        groups.append({"label": f"C {c:.3g}: {len(runs)} runs", "curve": curve, "dots": dots,
                       "minimum": minimum})
    return sweep_svg(f"{plan.name}: the sweep's shapes on {plan.law.name}'s isoFLOP curves",
                     "dots: the runs (prior loss); crosses: each budget's prior minimum (C = 6ND)",
                     groups)
