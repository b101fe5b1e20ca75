"""The solver: every valid LLaMA-3 shape, its tokens for the budget, its loss, the picks.

Pure functions over numpy arrays. D is exactly budget / FLOPs-per-token (no token grid), the loss
comes from the spec's scaling law, and each variant's constraints remove candidates before ranking.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from . import arch, datalimited, goodput, laws
from .errors import UserError
from .memory import ModelShape
from .spec import MAX_CANDIDATES, MAX_D_MODEL, MAX_LAYERS, Spec, Variant

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
              f"{hw.effective_mfu:g}; hardware FLOPs, so counted with the exact convention; the "
              "budget is wall clock: each candidate trains for what checkpoint writes and "
              "failures leave of it (compiler/goodput.py)")
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
    n_kv_heads: np.ndarray
    head_dim: np.ndarray
    ffn_hidden: np.ndarray
    n_params: np.ndarray
    fpt_6n: np.ndarray
    fpt_exact: np.ndarray
    tokens: np.ndarray  # D: what the budget buys
    loss: np.ndarray
    objective: np.ndarray  # what ranking minimises: the loss, or a rule's distance
    seconds: np.ndarray  # predicted wall-clock time to train tokens_trained on the spec's hardware
    enumerated: int
    tokens_trained: np.ndarray | None = None  # whole optimizer steps: ceil(D / batch) × batch
    # seconds with checkpoint writes, lost work and restarts (trainplan.wall_clock_seconds)
    wall_seconds: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.n_layers.size)

    def shapes(self, model) -> ModelShape:
        """The candidates as model shapes (arrays), with the spec's vocabulary and sequence."""
        return ModelShape(self.n_layers, self.d_model, self.n_heads, self.n_kv_heads,
                          self.head_dim, self.ffn_hidden, model.vocab_size, model.seq_len,
                          model.tie_embeddings)

    def days_to_finish(self) -> np.ndarray:
        """Expected wall-clock days: with checkpoints and failures where known."""
        return (self.seconds if self.wall_seconds is None else self.wall_seconds) / SECONDS_PER_DAY

    def take(self, idx: np.ndarray) -> "Candidates":
        """The candidates at idx (indices or a boolean mask), every array alike."""
        return dataclasses.replace(self, **{
            f.name: getattr(self, f.name)[idx] for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), np.ndarray)})


def ffn_hidden(spec: Spec, d_model):
    ffn = spec.model.ffn
    if hasattr(ffn, "llama3_multiplier"):
        return arch.ffn_hidden_llama3(d_model, ffn.llama3_multiplier, ffn.multiple_of)
    return arch.ffn_hidden_ratio(d_model, ffn.ratio, ffn.multiple_of)


# The default search space, for what the spec leaves out (docs/DESIGN.md). Head widths as the
# Llama 3 family uses them (1B: d_model 2048, head_dim 64; 3B and up: 128), narrower only for the
# tiny widths small budgets need; at most 8 KV heads and at most 8 query heads per KV head
# (Llama 3: 8 KV heads, groups of 3 to 16).
HEAD_DIMS = ((128, 2048, None), (64, None, None), (32, None, 512), (16, None, 256), (8, None, 64))
# (head_dim, d_model must be above, d_model must be below), in order of preference
MAX_KV_HEADS = 8
MAX_GQA_GROUP = 8  # query heads per KV head, unless there are MAX_KV_HEADS of them
# N from a tenth of the smallest to ten times the largest the law's optimum and the variants'
# bounds point at: room for the near-optimal band, the ranking and memory-bound picks.
SEARCH_WINDOW = 10.0


def default_widths() -> np.ndarray:
    """d_model from 8 to MAX_D_MODEL: steps of 8 up to 64, 16 up to 256, then 8 per octave (d/8),
    so that neighbouring widths differ by at most 1/8 in N where embeddings dominate it."""
    widths, d = [], 8
    while d <= MAX_D_MODEL:
        widths.append(d)
        d += 8 if d < 64 else max(16, 1 << (d.bit_length() - 4))
    return np.asarray(widths, dtype=np.int64)


def _kv_heads(heads):
    """The most KV heads (at most MAX_KV_HEADS) that divide the query heads; 0 where the groups
    would exceed MAX_GQA_GROUP query heads (a prime number of heads above 8, for one)."""
    kv = np.zeros_like(heads)
    for k in range(MAX_KV_HEADS, 0, -1):
        kv = np.where((kv == 0) & (heads % k == 0), k, kv)
    return np.where((heads <= MAX_GQA_GROUP * kv) | (kv == MAX_KV_HEADS), kv, 0)


def head_layout(spec: Spec, d_model):
    """(head_dim, kv_heads) for each width: the spec's where it sets them, else the default rule
    above; 0 where the width admits none (d_model not a multiple, heads not divisible by kv)."""
    m, given = spec.model, spec.model.model_fields_set
    d = np.asarray(d_model, dtype=np.int64)
    head_dim, kv = np.zeros_like(d), np.zeros_like(d)
    for hd, above, below in (((m.head_dim, None, None),) if "head_dim" in given else HEAD_DIMS):
        ok = (head_dim == 0) & (d % hd == 0) & (d >= hd)
        ok &= (d > above) if above else True
        ok &= (d < below) if below else True
        heads = np.maximum(d // hd, 1)
        k = (np.where(heads % m.kv_heads == 0, m.kv_heads, 0) if "kv_heads" in given
             else _kv_heads(heads))
        ok &= k > 0
        head_dim, kv = np.where(ok, hd, head_dim), np.where(ok, k, kv)
    return head_dim, kv


def params_window(spec: Spec, budget: BudgetFlops) -> tuple[float, float]:
    """The N range the default search space covers: the law's closed-form optimum and every N a
    variant's bounds imply (D/N = r means N = sqrt(C / 6r) under C = 6ND), widened by
    SEARCH_WINDOW."""
    c = budget.flops
    ns = [spec.search.law().optimum_6nd(c).n_params]
    for v in spec.variants:
        for ratio in (v.tokens_per_param.min, v.tokens_per_param.max) if v.tokens_per_param else ():
            if ratio:
                ns.append((c / (6.0 * ratio)) ** 0.5)
        ns += [n for n in ((v.params.min, v.params.max) if v.params else ()) if n]
    return max(1.0, min(ns) / SEARCH_WINDOW), max(ns) * SEARCH_WINDOW


def _depth_range(spec: Spec, d):
    """Fewest and most layers the aspect bounds allow at width d (within 1..MAX_LAYERS)."""
    a, d = spec.search.aspect, np.asarray(d, dtype=np.float64)
    with np.errstate(divide="ignore", over="ignore"):  # aspect.min may be 0, aspect.max tiny
        lo = np.ones_like(d) if a.max is None else np.ceil(d / a.max)
        hi = np.full_like(d, MAX_LAYERS) if not a.min else np.floor(d / a.min)
    return (np.clip(lo, 1, MAX_LAYERS + 1).astype(np.int64),
            np.clip(hi, 0, MAX_LAYERS).astype(np.int64))


def search_axes(spec: Spec, budget: BudgetFlops):
    """(layers, widths, N window or None): the spec's axes, and for what it leaves out axes derived
    from the budget: widths that some depth brings into the N window, depths from the fewest to
    the most that bring some width into it (within the aspect bounds)."""
    s, given = spec.search, spec.search.model_fields_set
    if {"layers", "hidden"} <= given:
        return (np.asarray(s.layer_values(), dtype=np.int64),
                np.asarray(s.hidden_values(), dtype=np.int64), None)
    window = params_window(spec, budget)
    d = np.asarray(s.hidden_values(), dtype=np.int64) if "hidden" in given else default_widths()
    lo, hi = _depths_in_window(spec, d, window)
    if not (lo <= hi).any():  # the budget is below the smallest model: the smallest widths
        lo, hi = _depths_in_window(spec, d, (0.0, 0.0))
        hi = np.where(np.cumsum(lo <= hi) <= 8, hi, 0)
    keep = lo <= hi
    if "hidden" not in given:
        d, lo, hi, keep = d[keep], lo[keep], hi[keep], keep[keep]
    if "layers" in given:
        return np.asarray(s.layer_values(), dtype=np.int64), d, window
    first, last = (int(lo[keep].min()), int(hi[keep].max())) if keep.any() else (1, 1)
    if (last - first + 1) * d.size > MAX_CANDIDATES:
        raise UserError(f"search space too large: {d.size:,} search.hidden values × "
                        f"{last - first + 1:,} depths the budget calls for, more than the "
                        f"{MAX_CANDIDATES:,} shapes llama3gen enumerates", field="search.layers",
                        fix=f"give search.layers (e.g. {{min: {first}, max: {last}, step: "
                            f"{-(-(last - first + 1) * d.size // MAX_CANDIDATES)}}}) or fewer "
                            "search.hidden values")
    return np.arange(first, last + 1, dtype=np.int64), d, window


def _depths_in_window(spec: Spec, d, window):
    """Per width, the fewest and most layers within the aspect bounds (and the spec's layers) whose
    N lies in the window (N is linear in the depth); lo > hi where none does. A window of (0, 0)
    asks only for the aspect bounds."""
    m = spec.model
    hd, kv = head_layout(spec, d)
    lo, hi = _depth_range(spec, d)
    if "layers" in spec.search.model_fields_set:
        layers = spec.search.layer_values()
        lo, hi = np.maximum(lo, min(layers)), np.minimum(hi, max(layers))
    hd1, kv1, f = np.maximum(hd, 1), np.maximum(kv, 1), ffn_hidden(spec, d)
    fixed, one = (np.asarray(arch.param_count(L, d, d // hd1, kv1, hd1, f, m.vocab_size,
                                              m.tie_embeddings), dtype=np.float64) for L in (0, 1))
    if window[1] > 0:
        with np.errstate(over="ignore"):
            lo = np.maximum(lo, np.ceil((window[0] - fixed) / (one - fixed)))
            hi = np.minimum(hi, np.floor((window[1] - fixed) / (one - fixed)))
    lo = np.where((hd > 0) & (f > 0), lo, MAX_LAYERS + 1)
    return (np.clip(lo, 0, MAX_LAYERS + 1).astype(np.int64),
            np.clip(hi, 0, MAX_LAYERS).astype(np.int64))


def enumerate_candidates(spec: Spec, budget: BudgetFlops) -> Candidates:
    m, s = spec.model, spec.search
    layers, hidden, window = search_axes(spec, budget)
    L, d = (a.ravel() for a in np.meshgrid(layers, hidden, indexing="ij"))
    enumerated = int(L.size)

    head_dim, kv = head_layout(spec, d)
    aspect = d / L
    valid = head_dim > 0
    if s.aspect.min is not None:
        valid &= aspect >= s.aspect.min
    if s.aspect.max is not None:
        valid &= aspect <= s.aspect.max
    L, d, head_dim, kv = L[valid], d[valid], head_dim[valid], kv[valid]
    f = ffn_hidden(spec, d)
    heads = d // head_dim
    n = arch.param_count(L, d, heads, kv, head_dim, f, m.vocab_size, m.tie_embeddings)
    keep = f > 0
    in_window = True if window is None else (n >= window[0]) & (n <= window[1])
    if (keep & in_window).any():
        keep &= in_window
    elif "aspect" in s.model_fields_set and no_valid_shape(spec, budget).field.startswith(
            "search.aspect"):  # the spec's aspect bounds exclude every shape the budget calls for
        keep &= False
    # else the budget is below the smallest model: keep those
    L, d, heads, kv, head_dim, f, n = (a[keep] for a in (L, d, heads, kv, head_dim, f, n))

    fpt_6n = arch.flops_per_token_6n(n)
    fpt_exact = arch.flops_per_token_exact(L, d, heads, kv, head_dim, f, m.vocab_size, m.seq_len)
    fpt_budget = fpt_6n if budget.convention == "6N" else fpt_exact
    tokens = budget.flops / fpt_budget.astype(np.float64)

    loss, objective = score(spec, n, tokens)
    hw = spec.hardware
    job_flops_per_s = hw.world_size * hw.device().peak_flops * hw.effective_mfu
    seconds = fpt_exact * tokens / job_flops_per_s
    return Candidates(L, d, heads, kv, head_dim, f, n, fpt_6n, fpt_exact, tokens, np.asarray(loss),
                      np.asarray(objective), seconds, enumerated)


def score(spec: Spec, n_params, tokens):
    """(predicted loss, ranking objective): the law's loss, or a rule's distance and a loss beside it."""
    law = spec.search.law()
    if isinstance(law, laws.TokensPerParamRule):
        return np.asarray(law.loss_law.loss(n_params, tokens)), np.asarray(law.objective(n_params, tokens))
    loss = np.asarray(law.loss(n_params, tokens))
    return loss, loss


def with_unique_tokens(spec: Spec, c: Candidates) -> Candidates:
    """Candidates ranked by the data-constrained law (compiler/datalimited.py): each one's loss
    at the tokens and parameters its data.unique_tokens make effective (repeated tokens and
    excess parameters are worth less). A loss law only: a tokens-per-parameter rule is a rule."""
    loss = np.asarray(datalimited.loss(spec.search.law(), c.n_params, c.tokens,
                                       spec.data.portions()))
    return dataclasses.replace(c, loss=loss, objective=loss)


def with_throughput(c: Candidates, tokens_per_second: np.ndarray) -> Candidates:
    """Candidates of a FLOPs budget timed by a throughput model that knows the layout
    (activation checkpointing where memory needs it costs one more forward of the blocks); 0
    tokens/s: does not fit, never finishes. Their tokens stay (a time budget's follow the speed:
    compiler/timebudget.py)."""
    fits = tokens_per_second > 0
    seconds = np.where(fits, c.tokens / np.where(fits, tokens_per_second, 1.0), np.inf)
    return dataclasses.replace(c, seconds=seconds)


def with_tokens(spec: Spec, c: Candidates, tokens: np.ndarray,
                tokens_per_second: np.ndarray) -> Candidates:
    """Candidates that train `tokens` at tokens_per_second (a time budget's: timebudget.py)."""
    loss, objective = score(spec, c.n_params, tokens)
    rescored = dataclasses.replace(c, tokens=tokens, loss=loss, objective=objective)
    return with_throughput(rescored, tokens_per_second)


def with_batches(c: Candidates, batch_tokens: np.ndarray) -> Candidates:
    """Candidates trained in whole optimizer steps of batch_tokens: ceil(D / batch) steps train
    tokens_trained ≥ D, and take that much longer. Constraints are checked on what is trained."""
    steps = np.maximum(1, np.ceil(c.tokens / batch_tokens))
    trained = steps * batch_tokens
    return dataclasses.replace(c, tokens_trained=trained, seconds=c.seconds * (trained / c.tokens))


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


# The plan trains whole optimizer steps, so a little more than D; more than this much more is a
# batch too large for the budget (at 1e8 FLOPs one step of the tiny spec's batch was 18× it).
MAX_OVERSHOOT = 0.01


def constraint_masks(variant: Variant, c: Candidates) -> dict[str, np.ndarray]:
    """One boolean mask per constraint the variant sets (True = allowed), checked on the plan that
    is generated: D ≤ tokens trained, so a lower bound on D/N holds for both, and an upper bound
    and max_days are checked on the tokens trained; max_days on the expected wall clock where
    the candidates have one (failures and checkpoints included), else on the training time."""
    masks: dict[str, np.ndarray] = {}
    trained = c.tokens if c.tokens_trained is None else c.tokens_trained
    if variant.tokens_per_param is not None:
        b = variant.tokens_per_param
        if b.min is not None:
            masks["tokens_per_param.min"] = c.tokens / c.n_params >= b.min
        if b.max is not None:
            masks["tokens_per_param.max"] = trained / c.n_params <= b.max
    if variant.params is not None:
        if variant.params.min is not None:
            masks["params.min"] = c.n_params >= variant.params.min
        if variant.params.max is not None:
            masks["params.max"] = c.n_params <= variant.params.max
    if variant.max_days is not None:
        masks["max_days"] = c.days_to_finish() <= variant.max_days
    within_budget = trained <= c.tokens * (1 + MAX_OVERSHOOT)
    if not within_budget.all():  # reported only where it bites
        masks["budget"] = within_budget
    return masks


def solve_variant(spec: Spec, variant: Variant, c: Candidates,
                  extra_masks: dict[str, np.ndarray] | None = None, memory_fix=None) -> VariantResult:
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
        raise infeasible(spec, variant, c, masks, memory_fix)
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


def _sig(x: float, up: bool) -> str:
    """x to three significant digits, rounded the way that keeps a suggested bound working."""
    if not np.isfinite(x) or x <= 0:
        return f"{x:.3g}"
    scale = 10.0 ** (np.floor(np.log10(x)) - 2)
    return f"{(np.ceil(x / scale) if up else np.floor(x / scale)) * scale:.3g}"


def infeasible(spec: Spec, variant: Variant, c: Candidates, masks: dict[str, np.ndarray],
               memory_fix=None) -> UserError:
    """Explain why no shape is left: for each constraint whose relaxation alone would leave shapes,
    the value of its bound that would. memory_fix(indices) explains the memory constraint for the
    shapes that satisfy every other one."""
    if len(c) == 0:
        return no_valid_shape(spec, budget_flops(spec))
    hints = []
    for name in masks:
        others = np.ones(len(c), dtype=bool)
        for other, mask in masks.items():
            if other != name:
                others &= mask
        if others.any():
            hints.append(_relax(name, np.flatnonzero(others), c, spec, memory_fix))
    if not hints:
        hints.append("no single constraint's relaxation leaves a shape; relax several of "
                     + ", ".join(_label(n) for n in masks))
    return UserError(f"no shape satisfies the constraints of variant {variant.name!r} "
                     f"({len(c):,} valid shapes)", field=f"variants[{variant.name}]",
                     fix="; or ".join(hints))


def _label(name: str) -> str:
    return {"memory": "the GPU memory (hardware)", "budget": "the batch size"}.get(name, name)


def _relax(name: str, idx: np.ndarray, c: Candidates, spec: Spec, memory_fix) -> str:
    """What would let the shapes idx (which pass every other constraint) through `name`."""
    trained = c.tokens if c.tokens_trained is None else c.tokens_trained
    if name == "tokens_per_param.min":
        return f"tokens_per_param.min: {_sig((c.tokens[idx] / c.n_params[idx]).max(), False)} or less"
    if name == "tokens_per_param.max":
        return f"tokens_per_param.max: {_sig((trained[idx] / c.n_params[idx]).min(), True)} or more"
    if name == "params.min":
        return f"params.min: {_sig(c.n_params[idx].max(), False)} or less"
    if name == "params.max":
        return f"params.max: {_sig(c.n_params[idx].min(), True)} or more"
    if name == "max_days":
        fastest = c.days_to_finish()[idx].min()
        if not np.isfinite(fastest):
            return ("no shape would finish: the job fails more often than it restarts and redoes "
                    f"the work since its last checkpoint; {goodput.NEVER_FINISHES_FIX}")
        return (f"max_days: {_sig(fastest, True)} or more (the fastest shape needs {fastest:.3g} "
                "days on this hardware, evaluations, checkpoints and expected failures "
                "included), or add GPUs, or evaluate less (training.eval_iters, "
                "training.eval_interval)")
    if name == "budget":
        return _batch_hint(spec, c.tokens[idx].max())
    if name == "memory" and memory_fix is not None:
        return memory_fix(idx)
    return f"relax {_label(name)}"


def _batch_hint(spec: Spec, tokens: float) -> str:
    """One optimizer step must not overshoot the tokens the budget buys by more than MAX_OVERSHOOT."""
    m, hw = spec.model, spec.hardware
    smallest = m.seq_len * hw.world_size  # one sequence per rank
    most = int(tokens * MAX_OVERSHOOT)
    if most >= smallest:
        given = spec.training.global_batch_tokens
        now = f" (now {given:,})" if given is not None else ""
        return (f"training.global_batch_tokens: {most:,} or less{now}: whole optimizer steps must "
                f"not train more than {MAX_OVERSHOOT:.0%} beyond the {tokens:.4g} tokens the budget "
                "buys")
    # tokens grow in proportion to the budget for a given shape
    needed = budget_flops(spec).flops * smallest / MAX_OVERSHOOT / tokens
    return (f"the budget buys at most {tokens:.4g} tokens, and even one sequence per rank "
            f"({hw.world_size} ranks × seq_len {m.seq_len}) per step overshoots it by more than "
            f"{MAX_OVERSHOOT:.0%}: raise the budget to at least {_sig(needed, True)} FLOPs, or use "
            "fewer GPUs or a shorter model.seq_len")


def no_valid_shape(spec: Spec, budget: BudgetFlops) -> UserError:
    """The search space holds no valid shape: name the bound that excludes them, and a value that
    would work."""
    s, m = spec.search, spec.model
    # the axes before the N window: what the spec allows at all
    d = np.asarray(s.hidden_values() if "hidden" in s.model_fields_set else default_widths())
    layers = np.asarray(s.layer_values() if "layers" in s.model_fields_set
                        else np.arange(1, MAX_LAYERS + 1))
    hd, kv = head_layout(spec, d)
    given = spec.model.model_fields_set
    if {"head_dim", "kv_heads"} <= given:
        rule = f"d_model a multiple of head_dim × kv_heads = {m.head_dim * m.kv_heads}"
    elif "head_dim" in given:
        rule = f"d_model a multiple of head_dim {m.head_dim} (in groups of at most 8 per KV head)"
    else:
        rule = ("d_model = heads × head_dim with head_dim 8 to 128 (64 or 128 from d_model 512 up) "
                + (f"and heads divisible by kv_heads {m.kv_heads}" if "kv_heads" in given else
                   "and heads in at most 8 groups of at most 8"))
    if "hidden" in s.model_fields_set and not (hd > 0).any():
        all_d = np.arange(8, MAX_D_MODEL + 1, 8)
        ok = all_d[head_layout(spec, all_d)[0] > 0]
        near = ok[np.argsort(np.abs(ok - np.median(d)))[:2]] if ok.size else ok
        return UserError(f"no valid shape in the search space: no search.hidden value has {rule}",
                         field="search.hidden",
                         fix=(f"widen search.hidden to include multiples of "
                              f"{m.head_dim * m.kv_heads}" if {"head_dim", "kv_heads"} <= given
                              else "use widths such as " + " or ".join(map(str, sorted(near)))
                              if near.size else "set model.head_dim and model.kv_heads smaller"))
    L, D = (a.ravel() for a in np.meshgrid(layers, d[hd > 0], indexing="ij"))
    if "hidden" not in s.model_fields_set:  # suggest from the shapes the budget points at
        lo, hi = params_window(spec, budget)
        dh, k = head_layout(spec, D)
        n = arch.param_count(L, D, D // dh, k, dh, ffn_hidden(spec, D), m.vocab_size,
                             m.tie_embeddings)
        near = (n >= lo) & (n <= hi)
        L, D = (L[near], D[near]) if near.any() else (L, D)
    aspect = D / L
    if aspect.size and s.aspect.min is not None and aspect.max() < s.aspect.min:
        return UserError(f"no valid shape in the search space: every d_model/n_layers is below "
                         f"search.aspect.min {s.aspect.min:g}", field="search.aspect.min",
                         fix=f"search.aspect.min: {_sig(aspect.max(), False)} or less, or wider "
                             "search.hidden / fewer search.layers")
    if aspect.size and s.aspect.max is not None and aspect.min() > s.aspect.max:
        return UserError(f"no valid shape in the search space: every d_model/n_layers is above "
                         f"search.aspect.max {s.aspect.max:g}", field="search.aspect.max",
                         fix=f"search.aspect.max: {_sig(aspect.min(), True)} or more, or more "
                             "search.layers / narrower search.hidden")
    return UserError(f"no valid shape in the search space: {rule}, heads divisible by kv_heads, "
                     "a positive FFN size and d_model/n_layers within search.aspect",
                     field="search", fix="widen search.hidden and search.layers, relax "
                     "search.aspect, or check model.ffn (its FFN size rounds to 0 here)")


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
