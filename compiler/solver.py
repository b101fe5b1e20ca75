"""The solver: every valid LLaMA-3 shape, its tokens for the budget, its loss, the picks.

Pure functions over numpy arrays. D is exactly budget / FLOPs-per-token (no token grid), the loss
comes from the spec's scaling law, and each variant's constraints remove candidates before ranking.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from . import arch, laws
from .errors import UserError
from .spec import Spec, Variant

SECONDS_PER_DAY = 86400.0


@dataclass(frozen=True)
class BudgetFlops:
    flops: float
    convention: str  # what `flops` counts: "6N" or "exact"
    source: str
    job_seconds: float | None = None  # wall-clock seconds, when the budget is time (GPU-hours, days)


def budget_flops(spec: Spec) -> BudgetFlops:
    """The budget in FLOPs, and which convention it counts in.

    A FLOPs budget counts in the spec's convention. A time budget (GPU-hours or days) is what the
    hardware can execute, so it counts hardware FLOPs: the `exact` convention, whatever the spec's.
    """
    hw = spec.hardware
    gpu = hw.device()
    if spec.budget.flops is not None:
        return _at_least_min(BudgetFlops(spec.budget.flops, spec.search.flops, "spec: budget.flops"))
    if spec.budget.gpu_hours is not None:
        gpu_hours, how = spec.budget.gpu_hours, f"budget.gpu_hours {spec.budget.gpu_hours:g}"
    else:
        gpu_hours = spec.budget.days * 24 * hw.world_size
        how = f"budget.days {spec.budget.days:g} × 24 h × {hw.world_size} GPUs"
    flops = gpu_hours * 3600 * gpu.peak_flops * hw.effective_mfu
    source = (f"{how} × 3600 s × {gpu.bf16_tflops:g} TFLOP/s ({gpu.name} peak) × MFU "
              f"{hw.effective_mfu:g}; hardware FLOPs, so counted with the exact convention")
    return _at_least_min(BudgetFlops(flops, "exact", source,
                                     job_seconds=gpu_hours * 3600 / hw.world_size))


# Below this not one token of the smallest model is trained; it also keeps D and C = M·D clear of
# float underflow (flops: 1e-320 made D zero and the learning-rate law divide by it).
MIN_BUDGET_FLOPS = 1e6


def _at_least_min(budget: BudgetFlops) -> BudgetFlops:
    if not budget.flops >= MIN_BUDGET_FLOPS:
        raise UserError(f"the budget comes to {budget.flops:.3g} FLOPs, too little to train anything "
                        f"(minimum {MIN_BUDGET_FLOPS:.0e})", field="budget",
                        fix="check the budget's units: flops are total FLOPs, e.g. 1.36e21")
    return budget


@dataclass(frozen=True)
class Candidates:
    """Every valid shape and its evaluation, as parallel arrays."""

    n_layers: np.ndarray
    d_model: np.ndarray
    n_heads: np.ndarray
    ffn_hidden: np.ndarray
    n_params: np.ndarray
    fpt_6n: np.ndarray
    fpt_exact: np.ndarray
    tokens: np.ndarray
    loss: np.ndarray
    objective: np.ndarray  # what ranking minimises: the loss, or a rule's distance
    seconds: np.ndarray  # predicted wall-clock training time on the spec's hardware
    enumerated: int

    def __len__(self) -> int:
        return int(self.n_layers.size)


def ffn_hidden(spec: Spec, d_model):
    ffn = spec.model.ffn
    if hasattr(ffn, "llama3_multiplier"):
        return arch.ffn_hidden_llama3(d_model, ffn.llama3_multiplier, ffn.multiple_of)
    return arch.ffn_hidden_ratio(d_model, ffn.ratio, ffn.multiple_of)


def enumerate_candidates(spec: Spec, budget: BudgetFlops) -> Candidates:
    m, s = spec.model, spec.search
    layers = np.asarray(s.layer_values(), dtype=np.int64)
    hidden = np.asarray(s.hidden_values(), dtype=np.int64)
    L, d = (a.ravel() for a in np.meshgrid(layers, hidden, indexing="ij"))
    enumerated = int(L.size)

    heads = d // m.head_dim
    aspect = d / L
    valid = (d % m.head_dim == 0) & (heads % m.kv_heads == 0) & (heads > 0)
    if s.aspect.min is not None:
        valid &= aspect >= s.aspect.min
    if s.aspect.max is not None:
        valid &= aspect <= s.aspect.max
    L, d, heads = L[valid], d[valid], heads[valid]
    f = ffn_hidden(spec, d)
    valid_ffn = f > 0
    L, d, heads, f = L[valid_ffn], d[valid_ffn], heads[valid_ffn], f[valid_ffn]

    n = arch.param_count(L, d, heads, m.kv_heads, m.head_dim, f, m.vocab_size, m.tie_embeddings)
    fpt_6n = arch.flops_per_token_6n(n)
    fpt_exact = arch.flops_per_token_exact(L, d, heads, m.kv_heads, m.head_dim, f, m.vocab_size,
                                           m.seq_len)
    fpt_budget = fpt_6n if budget.convention == "6N" else fpt_exact
    tokens = budget.flops / fpt_budget.astype(np.float64)

    loss, objective = score(spec, n, tokens)
    hw = spec.hardware
    job_flops_per_s = hw.world_size * hw.device().peak_flops * hw.effective_mfu
    seconds = fpt_exact * tokens / job_flops_per_s
    return Candidates(L, d, heads, f, n, fpt_6n, fpt_exact, tokens, np.asarray(loss),
                      np.asarray(objective), seconds, enumerated)


def score(spec: Spec, n_params, tokens):
    """(predicted loss, ranking objective): the law's loss, or a rule's distance and a loss beside it."""
    law = spec.search.law()
    if isinstance(law, laws.TokensPerParamRule):
        return np.asarray(law.loss_law.loss(n_params, tokens)), np.asarray(law.objective(n_params, tokens))
    loss = np.asarray(law.loss(n_params, tokens))
    return loss, loss


def with_throughput(spec: Spec, budget: BudgetFlops, c: Candidates,
                    tokens_per_second: np.ndarray) -> Candidates:
    """Candidates timed by a throughput model that knows the layout (activation checkpointing
    where memory needs it costs one more forward of the blocks). A time budget buys
    job seconds × tokens/s tokens, so recomputation costs tokens; a FLOPs budget's tokens stay."""
    fits = tokens_per_second > 0
    tps = np.where(fits, tokens_per_second, 1.0)
    tokens, loss, objective = c.tokens, c.loss, c.objective
    if budget.job_seconds is not None:
        tokens = np.where(fits, budget.job_seconds * tps, c.tokens)
        loss, objective = score(spec, c.n_params, tokens)
    seconds = np.where(fits, tokens / tps, np.inf)
    return dataclasses.replace(c, tokens=tokens, loss=loss, objective=objective, seconds=seconds)


@dataclass(frozen=True)
class VariantResult:
    variant: Variant
    top: np.ndarray  # indices into the candidates, the best top_k feasible ones in rank order
    pick: int  # index into the candidates
    pick_rank: int  # 1-based rank of the pick among the feasible (ties share a rank)
    feasible: int
    near_optimal: int
    removed_by: dict[str, int]
    tie_break: str


TIE_BREAK = ("among shapes within {band:.2%} of the best predicted loss, the one with the shortest "
             "predicted training time (fewest hardware FLOPs for the same tokens: fewer layers, "
             "larger matmuls), then fewer layers")


def constraint_masks(variant: Variant, c: Candidates) -> dict[str, np.ndarray]:
    """One boolean mask per constraint the variant sets (True = allowed)."""
    masks: dict[str, np.ndarray] = {}
    tpp = c.tokens / c.n_params
    if variant.tokens_per_param is not None:
        b = variant.tokens_per_param
        if b.min is not None:
            masks["tokens_per_param.min"] = tpp >= b.min
        if b.max is not None:
            masks["tokens_per_param.max"] = tpp <= b.max
    if variant.params is not None:
        if variant.params.min is not None:
            masks["params.min"] = c.n_params >= variant.params.min
        if variant.params.max is not None:
            masks["params.max"] = c.n_params <= variant.params.max
    if variant.max_days is not None:
        masks["max_days"] = c.seconds <= variant.max_days * SECONDS_PER_DAY
    return masks


def solve_variant(spec: Spec, variant: Variant, c: Candidates,
                  extra_masks: dict[str, np.ndarray] | None = None) -> VariantResult:
    """Rank the feasible candidates and pick one. Only the top-k and the near-optimal band are
    sorted: a million candidates need one pass, not a full sort."""
    masks = constraint_masks(variant, c)
    masks.update(extra_masks or {})
    keep = np.ones(len(c), dtype=bool)
    for mask in masks.values():
        keep &= mask
    removed_by = {name: int((~mask).sum()) for name, mask in sorted(masks.items())}
    idx = np.flatnonzero(keep)
    if idx.size == 0:
        raise infeasible(spec, variant, c, masks)
    objective = c.objective[idx]

    def ranked(sub):  # by objective, then time, then fewer layers, then narrower
        order = np.lexsort((c.d_model[sub], c.n_layers[sub], c.seconds[sub], c.objective[sub]))
        return sub[order]

    k = min(spec.search.top_k, idx.size)
    top = ranked(idx[np.argpartition(objective, k - 1)[:k]] if k < idx.size else idx)

    band = spec.search.near_optimal
    best = objective.min()
    rule = isinstance(spec.search.law(), laws.TokensPerParamRule)
    scale = 1.0 if rule else abs(float(c.loss[top[0]]))
    in_band = idx[objective <= best + band * scale]
    # Within the band: fastest, then fewer layers, then narrower.
    pick = int(in_band[np.lexsort((c.d_model[in_band], c.n_layers[in_band], c.seconds[in_band]))[0]])
    pick_rank = int((objective < c.objective[pick]).sum()) + 1
    return VariantResult(variant, top, pick, pick_rank, int(idx.size), int(in_band.size),
                         removed_by, TIE_BREAK.format(band=band))


def infeasible(spec: Spec, variant: Variant, c: Candidates, masks: dict[str, np.ndarray]) -> UserError:
    """Explain why no shape is left, and what would work."""
    where = f"variants[{variant.name}]"
    if len(c) == 0:
        return UserError(
            "no valid shape in the search space: d_model must be a multiple of head_dim "
            f"({spec.model.head_dim}) with heads divisible by kv_heads ({spec.model.kv_heads}), "
            f"and d_model/n_layers within search.aspect", field="search",
            fix=f"widen search.hidden to include multiples of "
                f"{spec.model.head_dim * spec.model.kv_heads}, or relax search.aspect")
    hints = []
    tpp = c.tokens / c.n_params
    for name, mask in masks.items():
        if not mask.any():
            if name.startswith("tokens_per_param"):
                hints.append(f"{name}: candidates span {tpp.min():.3g}–{tpp.max():.3g} tokens per "
                             "parameter for this budget; widen the band, change search.layers/hidden "
                             "or the budget")
            elif name.startswith("params"):
                hints.append(f"{name}: candidates span {c.n_params.min():.3g}–{c.n_params.max():.3g} "
                             "parameters")
            elif name == "max_days":
                fastest = c.seconds.min() / SECONDS_PER_DAY
                hints.append(f"max_days: the fastest shape needs {fastest:.3g} days on this hardware; "
                             "raise max_days, add GPUs or lower the budget")
            else:
                hints.append(f"{name}: no shape passes it")
    if not hints:
        hints.append("each constraint alone leaves shapes, but together none: relax one of "
                     + ", ".join(masks))
    return UserError(f"no shape satisfies the constraints of variant {variant.name!r} "
                     f"({len(c):,} valid shapes)", field=where, fix="; ".join(hints))


def frontier(c: Candidates, bins: int = 96) -> list[tuple[float, float]]:
    """The lowest loss per logarithmic N bin: the isoFLOP curve the candidates trace."""
    if len(c) == 0:
        return []
    logn = np.log10(c.n_params.astype(np.float64))
    lo, hi = logn.min(), logn.max()
    idx = np.zeros_like(logn, dtype=np.int64) if hi == lo else \
        np.minimum(((logn - lo) / (hi - lo) * bins).astype(np.int64), bins - 1)
    order = np.lexsort((c.loss, idx))
    first = np.ones(order.size, dtype=bool)
    first[1:] = idx[order][1:] != idx[order][:-1]
    chosen = order[first]
    return [(float(c.n_params[i]), float(c.loss[i])) for i in chosen]
