"""A plan from a fitted law (search.scaling_law: {file: LAW.json}): where the law came from, its
bootstrap CIs at the plan's budget, and the pick re-solved at the CI's ends (docs/FIT.md).

The CI's ends of a five-parameter law: the bootstrap resamples whose closed-form N* at the plan's
budget are the 2.5th and 97.5th percentiles of N* (nearest rank), each a whole refitted law. The
planner is re-run under each, so the table shows the shape it would pick, not only N*. A law made
of every parameter's own percentile would be none any resample produced: A and alpha (B and beta)
are strongly correlated, and such a law's N* can lie far outside N*'s own CI.
"""

from __future__ import annotations

import math

from . import plan as P
from .errors import UserError
from .laws import LAW_KEYS, ScalingLaw

METHOD = ("percentile bootstrap: the runs resampled with replacement and the law refitted "
          "(llama3gen fit); N*, D*, L* here are the percentiles of the resampled laws' "
          "closed-form optima at this budget (C = 6ND, Hoffmann et al. 2022 Eq. 4). low and high: "
          "the resampled laws whose N* is at the CI's ends (nearest rank), the planner re-run "
          "under each; under C = 6ND they are also D*'s high and low ends")


def law_fit(spec, flops: float, variant: P.Variant) -> P.LawFit | None:
    """The fitted law's provenance and sensitivity; None for a catalog, custom or rule law.
    `variant` is the plan's first variant, whose pick the `fit` row shows."""
    scaling_law = spec.search.scaling_law
    fitted = getattr(scaling_law, "_fitted", None)
    if fitted is None:
        return None
    ci = {k: list(v) for k, v in fitted.ci.items()}
    ends = []
    if fitted.samples is not None:
        ci.update({k: list(v) for k, v in fitted.optimum_ci(flops).items()})
        low, high = fitted.ends(flops)
        lo_pct, hi_pct = fitted.percentiles()
        chosen = next(c for c in variant.top if c.selected)
        ends = [_end(spec, "low", lo_pct, low, flops),
                _row("fit", None, fitted.law, flops, chosen, None),
                _end(spec, "high", hi_pct, high, flops)]
    return P.LawFit(
        file=fitted.label, runs=fitted.runs, budgets=list(fitted.budgets),
        budget_runs=list(fitted.budget_runs) if fitted.budget_runs else None,
        decades_beyond_fit=math.log10(flops / max(fitted.budgets)) if fitted.budgets else None,
        fit_params=list(fitted.law.fit_params) if fitted.law.fit_params else None,
        fit_tokens=list(fitted.law.fit_tokens) if fitted.law.fit_tokens else None,
        resamples=fitted.resamples, seed=fitted.seed, ci_level=fitted.ci_level, ci=ci, ends=ends,
        method=METHOD, warnings=list(fitted.warnings))


def fit_warnings(fit: P.LawFit | None) -> list[str]:
    """The plan's warnings from its fitted law: what fit said when it wrote the file, repeated
    where the user reads the plan (a degenerate law looks as sure as any other in a table)."""
    if fit is None:
        return []
    return [f"the law in {fit.file}: llama3gen fit warned that {w}" for w in fit.warnings]


def _row(end: str, percentile, law: ScalingLaw, flops: float, pick, problem) -> P.LawEnd:
    opt = law.optimum_6nd(flops)
    return P.LawEnd(end=end, percentile=percentile, **{k: getattr(law, k) for k in LAW_KEYS},
                    n_params=opt.n_params, tokens=opt.tokens, loss=opt.loss, pick=pick,
                    problem=problem)


def _end(spec, end: str, percentile: float, law: ScalingLaw, flops: float) -> P.LawEnd:
    """The plan's first variant re-solved under `law` (the whole planner, without the sweep)."""
    from .planner import build_plan
    file_law = spec.search.scaling_law.model_copy()
    file_law._law, file_law._fitted = law, None  # no bootstrap below: no recursion
    resolved = spec.model_copy(update={
        "search": spec.search.model_copy(update={"scaling_law": file_law}), "sweep": None})
    try:
        variant = build_plan(resolved).variants[0]
    except UserError as exc:  # e.g. no shape satisfies a variant's constraints under this law
        return _row(end, percentile, law, flops, None, exc.message)
    return _row(end, percentile, law, flops, next(c for c in variant.top if c.selected), None)


def law_svg(plan: P.Plan) -> str:
    """docs/law.svg: along the plan's budget (C = 6ND), the loss under the fitted law and under
    the resampled laws at N*'s CI ends, each law's minimum N* and the planner's pick under it."""
    from . import figure
    from .units import si
    fit, flops = plan.law.fit, plan.budget.flops
    n_lo = min(r.n_params for r in fit.ends) / 3
    n_hi = max(r.n_params for r in fit.ends) * 3
    groups = []
    for r in fit.ends:
        law = ScalingLaw(r.end, r.E, r.A, r.B, r.alpha, r.beta, "")
        pick = (f"; pick {r.pick.n_layers}L × {r.pick.d_model}, N {si(r.pick.n_params)}"
                if r.pick else "; no pick")
        groups.append({"label": f"{r.end}: N* {si(r.n_params)}, L* {r.loss:.4f}{pick}",
                       "dots": [(r.pick.n_params, r.pick.loss)] if r.pick else [],
                       "curve": figure._isoflop_curve(law, flops, n_lo, n_hi),
                       "minimum": (r.n_params, r.loss)})
    return figure.sweep_svg(
        f"{plan.name}: the pick under the fitted law and at N*'s {fit.ci_level:.0%} CI ends",
        f"lines: each law's loss along C = 6ND at {flops:.3g} FLOPs; crosses: its minimum; "
        "dots: the planner's pick under it", groups)
