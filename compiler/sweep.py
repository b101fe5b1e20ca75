"""The scaling-law sweep's ladder (issue #15): which budgets, and which shapes at each.

Pure functions over numpy arrays; the planner (planner.plan_sweep) turns the picks into full runs
with the solver's candidates and trainplan's batch, learning rate and schedule.

- Budgets: the spec's, or by default DEFAULT_BUDGETS log-spaced over DEFAULT_DECADES below the
  largest, which is as high as the cost cap allows: shapes × Σ budgets = max_fraction × target.
  Where that ladder would start below the floor, the budget at which the prior optimum is
  FLOOR_FACTOR × the smallest model the search space builds (with a large vocabulary the
  embeddings alone set that size), it starts at the floor instead, over fewer decades and then
  fewer budgets, down to MIN_BUDGETS at least MIN_STEP_DECADES apart; below that, no default
  ladder fits under the cap and the error says what would.
- Shapes: per budget, targets log-spaced from N*/SPREAD to SPREAD·N* around the prior law's
  optimum N*(C). Centred and wide, because an uncentred or narrow grid biases the per-budget
  minima the fit reads (Czech et al. 2026 put that bias at 6.5% of Llama 3's budget); a ladder
  whose prior minimum is not inside every budget's shapes is refused. Each target takes the
  valid shape of one family: within half a target step of it in log N, the aspect d_model /
  n_layers nearest the sweep's (sweep.aspect, by default the middle of search.aspect). L(N, D)
  sees N only, and shapes of one N differ in loss (Kaplan et al. 2020, Fig. 5: a few percent
  over aspect 20-200, far more for the shallowest models), so a sweep that mixes shapes adds
  scatter the law cannot fit. Where a coarse space leaves the family's shapes without the prior
  minimum inside them, the shapes nearest in N are taken if they have it (the planner says so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import UserError

DEFAULT_BUDGETS = 5  # DeepSeek LLM used 8 budgets, Llama 3 about 10 (§3.2.1); 5 span two decades
DEFAULT_DECADES = 2.0  # the ladder's span below its largest budget (issue #15)
# Shapes per budget span SPREAD² in N, centred on the prior optimum: the prior may be off by 2×
# and the minimum still has shapes on both sides (Hoffmann et al. 2022, Fig. 3, span ~1.5 decades).
SPREAD = 4.0
# Final validation loss over this many tokens. A token's loss has a spread about as large as the
# mean loss itself (assumption: exponential-like per-token losses), so the standard error of the
# mean over 2^20 tokens is about L/√(2^20) = 0.1% of L, below the 0.2-0.5% run-to-run noise the
# fit is built for (tests/test_fit.py); every run of a sweep draws the same validation windows
# (train.py: seed-fixed offsets), so most of what remains is common to all runs.
VAL_TOKENS = 1 << 20
BUDGET_CITATION = ("Czech et al. 2026: an uncentred or narrow isoFLOP grid biases the per-budget "
                   "minima (6.5% of Llama 3's budget)")
# A run's budget and the cap are compared with this relative slack (float rounding of log-spacing).
CAP_SLACK = 1e-9
# A budget's N targets reach down to N*/SPREAD; with N* at √SPREAD × the smallest model, half of
# that lower span is buildable, enough for shapes below the prior minimum.
FLOOR_FACTOR = math.sqrt(SPREAD)
MIN_BUDGETS = 3  # the rollout check fits all but the largest budget: two are left to fit on
# The sweep's aspect when search.aspect has no bounds: the geometric middle of Kaplan et al.
# 2020's (Fig. 5) flat band, where loss moves a few percent over aspect 20-200.
FALLBACK_ASPECT = 64.0
FALLBACK_WHY = "about √(20 × 200), the middle of Kaplan et al. 2020's flat band (Fig. 5)"
MIN_STEP_DECADES = 0.25  # consecutive default budgets at least 10^0.25 ≈ 1.8× apart


def budget_for_n_opt(law, n_params: float) -> float:
    """The budget C at which the law's compute-optimal N*(C) under C = 6·N·D equals n_params
    (N* grows with C for every law here: bisection in log C)."""
    lo, hi = 0.0, 40.0  # log10 FLOPs
    for _ in range(100):  # 40 decades halved 100 times: far below float resolution
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if law.optimum_6nd(10.0 ** mid).n_params < n_params else (lo, mid)
    return 10.0 ** hi


def _log_spaced_sum(count: int, decades: float) -> float:
    return float((10.0 ** np.linspace(0.0, decades, count)).sum())


def ladder_from(floor: float, cap: float, shapes: int) -> np.ndarray | None:
    """The widest default ladder that starts at `floor` and costs at most `cap` (shapes runs per
    budget): DEFAULT_BUDGETS over up to DEFAULT_DECADES, else fewer budgets; None when not even
    MIN_BUDGETS fit MIN_STEP_DECADES apart."""
    afford = cap / (shapes * floor)  # the largest Σ budgets / floor
    for count in range(DEFAULT_BUDGETS, MIN_BUDGETS - 1, -1):
        narrowest = MIN_STEP_DECADES * (count - 1)
        if _log_spaced_sum(count, narrowest) <= afford:
            span = _widest_span(count, narrowest, afford)
            return floor * 10.0 ** np.linspace(0.0, span, count)
    return None


def _widest_span(count: int, lo: float, afford: float) -> float:
    """The widest span in decades, up to DEFAULT_DECADES, of `count` log-spaced budgets whose sum
    is at most `afford` × the first (`lo` is affordable)."""
    hi = DEFAULT_DECADES
    if _log_spaced_sum(count, hi) <= afford:
        return hi
    for _ in range(100):  # bisection: the span whose ladder costs exactly the cap
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if _log_spaced_sum(count, mid) <= afford else (lo, mid)
    return lo


def floor_fraction(floor: float, shapes: int, target_flops: float) -> float:
    """The share of the target that the smallest default ladder from `floor` costs."""
    return shapes * floor * _log_spaced_sum(MIN_BUDGETS, MIN_STEP_DECADES * (MIN_BUDGETS - 1)) \
        / target_flops


def default_budgets(target_flops: float, shapes: int, max_fraction: float) -> np.ndarray:
    """DEFAULT_BUDGETS budgets log-spaced over DEFAULT_DECADES, scaled so the whole sweep
    (`shapes` runs per budget) costs max_fraction of the target."""
    ratios = 10.0 ** np.linspace(-DEFAULT_DECADES, 0.0, DEFAULT_BUDGETS)
    return ratios * (max_fraction * target_flops / (shapes * ratios.sum()))


@dataclass(frozen=True)
class Floor:
    """The budget below which the search space builds no shapes around the prior optimum."""

    flops: float
    why: str  # what sets it, for provenance and messages
    smaller: str  # how the spec would let the sweep build smaller models


def sweep_budgets(sweep, target_flops: float, floor: Floor) -> tuple[np.ndarray, str]:
    """The sweep's budgets, ascending, and where they come from. UserError (field sweep.budgets)
    when one exceeds the target or the sweep would cost more than max_fraction of it; (field
    sweep) when no default ladder above the floor fits the cap."""
    given = sweep.budget_values()
    cap = sweep.max_fraction * target_flops
    if given is None:
        return _default_ladder(sweep, target_flops, floor)
    budgets = np.asarray(given, dtype=np.float64)
    if budgets.max() >= target_flops:
        raise UserError(f"sweep budget {budgets.max():.4g} FLOPs is not below the target budget "
                        f"{target_flops:.4g}", field="sweep.budgets",
                        fix="sweep budgets are small runs below the target; leave sweep.budgets "
                            "out to derive them from the target")
    cost = sweep.shapes * budgets.sum()
    if cost > cap * (1 + CAP_SLACK):
        most = budgets.max() * cap / cost
        raise UserError(f"the sweep costs {cost:.4g} FLOPs ({sweep.shapes} shapes × Σ budgets "
                        f"{budgets.sum():.4g}), {cost / target_flops:.3g} of the target, more than "
                        f"sweep.max_fraction {sweep.max_fraction:g}", field="sweep.budgets",
                        fix=f"scale the budgets down (the largest to about {most:.3g}), use fewer "
                            "sweep.shapes, or raise sweep.max_fraction")
    return budgets, "spec: sweep.budgets"


def _default_ladder(sweep, target_flops: float, floor: Floor):
    budgets = default_budgets(target_flops, sweep.shapes, sweep.max_fraction)
    cap_text = (f"the largest as high as {sweep.shapes} shapes × Σ budgets = sweep.max_fraction "
                f"{sweep.max_fraction:g} × target {target_flops:.4g} allows")
    if budgets[0] >= floor.flops:
        return budgets, (f"default: {DEFAULT_BUDGETS} budgets log-spaced over "
                         f"{DEFAULT_DECADES:g} decades, {cap_text}")
    ladder = ladder_from(floor.flops, sweep.max_fraction * target_flops, sweep.shapes)
    if ladder is None:
        need = floor_fraction(floor.flops, sweep.shapes, target_flops)
        raise UserError(
            f"no default sweep ladder fits: it would start at {floor.flops:.3g} FLOPs, where "
            f"{floor.why}; {MIN_BUDGETS} budgets from there, "
            f"{sweep.shapes} shapes each, cost {need:.3g} of the target, more than "
            f"sweep.max_fraction {sweep.max_fraction:g}", field="sweep",
            fix=(f"raise sweep.max_fraction to {need:.2g} or more, " if need < 1 else "")
            + f"let the sweep build smaller models ({floor.smaller}), or list sweep.budgets")
    span = math.log10(ladder[-1] / ladder[0])
    return ladder, (f"default: {ladder.size} budgets log-spaced over {span:.3g} decades from "
                    f"{floor.flops:.4g} FLOPs, where {floor.why}; {cap_text}")


def target_params(n_opt, shapes: int) -> np.ndarray:
    """(budgets × shapes) N targets: log-spaced from N*/SPREAD to SPREAD·N* per budget."""
    offsets = np.exp(np.linspace(-1.0, 1.0, shapes) * math.log(SPREAD))
    return np.asarray(n_opt, dtype=np.float64)[:, None] * offsets[None, :]


def family_aspect(asked: float | None, lowest: float | None, highest: float | None
                  ) -> tuple[float, str]:
    """The sweep's aspect and where it comes from: the spec's, else the geometric middle of the
    search's aspect bounds (the one bound given; neither: FALLBACK_ASPECT)."""
    if asked is not None:
        return asked, "spec: sweep.aspect"
    if lowest and highest:
        return math.sqrt(lowest * highest), (f"√(search.aspect min {lowest:g} × max "
                                             f"{highest:g}), the middle of the search's band")
    if lowest or highest:
        return float(lowest or highest), "search.aspect's one bound"
    return FALLBACK_ASPECT, f"default {FALLBACK_ASPECT:g}: {FALLBACK_WHY}"


def nearest_shapes(n_params, targets) -> np.ndarray:
    """Indices into n_params of the shape nearest in log N to each target, each shape once (in
    order of N)."""
    logn = np.log(np.asarray(n_params, dtype=np.float64))
    nearest = np.abs(logn[:, None] - np.log(targets)[None, :]).argmin(axis=0)
    unique = np.unique(nearest)
    return unique[np.argsort(logn[unique], kind="stable")]


def family_shapes(n_params, aspects, targets, family: float) -> np.ndarray:
    """Indices into n_params of one shape per target, each shape once (in order of N): among the
    shapes within half a target step of the target in log N, the one whose aspect (d_model /
    n_layers) is nearest the family's in log; where none is that near, the nearest in log N."""
    logn = np.log(np.asarray(n_params, dtype=np.float64))
    logt = np.log(np.asarray(targets, dtype=np.float64))
    off_n = np.abs(logn[:, None] - logt[None, :])  # (shapes, targets)
    half_step = 0.5 * (logt[-1] - logt[0]) / max(logt.size - 1, 1)
    off_family = np.abs(np.log(np.asarray(aspects, dtype=np.float64)) - math.log(family))
    # Lexicographic keys: in the window the aspect decides and N breaks ties (1e-6 × at most a
    # half step: it orders only aspects within about 1e-6 of each other); outside the window N
    # alone, after every shape in it.
    near = off_n <= half_step * (1 + 1e-12)
    key = np.where(near, off_family[:, None] + 1e-6 * off_n, 1e6 + off_n)
    unique = np.unique(key.argmin(axis=0))
    return unique[np.argsort(logn[unique], kind="stable")]


def brackets(prior_loss) -> bool:
    """Whether the prior law's lowest loss among a budget's shapes (in order of N) lies strictly
    inside them: shapes on both sides of the minimum."""
    loss = np.asarray(prior_loss)
    return loss.size >= 3 and 0 < int(loss.argmin()) < loss.size - 1


def run_name(budget_flops: float, n_layers: int, d_model: int) -> str:
    """c3.16e17-l8-d512: the budget to three digits and the shape (file and job safe)."""
    mantissa, exponent = f"{budget_flops:.2e}".split("e")
    return f"c{mantissa}e{int(exponent)}-l{n_layers}-d{d_model}"


def eval_iters(val_tokens: int, batch_tokens: int) -> int:
    """Evaluation batches of batch_tokens that cover val_tokens."""
    return max(1, -(-val_tokens // batch_tokens))
