"""The scaling-law sweep's ladder (issue #15): which budgets, and which shapes at each.

Pure functions over numpy arrays; the planner (planner.plan_sweep) turns the picks into full runs
with the solver's candidates and trainplan's batch, learning rate and schedule.

- Budgets: the spec's, or by default DEFAULT_BUDGETS log-spaced over DEFAULT_DECADES below the
  largest, which is as high as the cost cap allows: shapes × Σ budgets = max_fraction × target.
- Shapes: per budget, targets log-spaced from N*/SPREAD to SPREAD·N* around the prior law's
  optimum N*(C), each mapped to the nearest valid shape. Centred and wide, because an uncentred or
  narrow grid biases the per-budget minima the fit reads (Czech et al. 2026 put that bias at 6.5%
  of Llama 3's budget); a ladder whose prior minimum is not inside every budget's shapes is refused.
"""

from __future__ import annotations

import math

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


def default_budgets(target_flops: float, shapes: int, max_fraction: float) -> np.ndarray:
    """DEFAULT_BUDGETS budgets log-spaced over DEFAULT_DECADES, scaled so the whole sweep
    (`shapes` runs per budget) costs max_fraction of the target."""
    ratios = 10.0 ** np.linspace(-DEFAULT_DECADES, 0.0, DEFAULT_BUDGETS)
    return ratios * (max_fraction * target_flops / (shapes * ratios.sum()))


def sweep_budgets(sweep, target_flops: float) -> tuple[np.ndarray, str]:
    """The sweep's budgets, ascending, and where they come from. UserError (field sweep.budgets)
    when one exceeds the target or the sweep would cost more than max_fraction of it."""
    given = sweep.budget_values()
    cap = sweep.max_fraction * target_flops
    if given is None:
        budgets = default_budgets(target_flops, sweep.shapes, sweep.max_fraction)
        return budgets, (f"default: {DEFAULT_BUDGETS} budgets log-spaced over {DEFAULT_DECADES:g} "
                         f"decades, the largest as high as {sweep.shapes} shapes × Σ budgets = "
                         f"sweep.max_fraction {sweep.max_fraction:g} × target {target_flops:.4g} "
                         "allows")
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


def target_params(n_opt, shapes: int) -> np.ndarray:
    """(budgets × shapes) N targets: log-spaced from N*/SPREAD to SPREAD·N* per budget."""
    offsets = np.exp(np.linspace(-1.0, 1.0, shapes) * math.log(SPREAD))
    return np.asarray(n_opt, dtype=np.float64)[:, None] * offsets[None, :]


def nearest_shapes(n_params, targets) -> np.ndarray:
    """Indices into n_params of the shape nearest in log N to each target, each shape once (in
    order of N)."""
    logn = np.log(np.asarray(n_params, dtype=np.float64))
    nearest = np.abs(logn[:, None] - np.log(targets)[None, :]).argmin(axis=0)
    unique = np.unique(nearest)
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
