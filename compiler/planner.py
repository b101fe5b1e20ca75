"""Spec → Plan: run the solver for every variant and plan each pick on the hardware."""

from __future__ import annotations

import dataclasses

import numpy as np

from . import __version__, arch, datalimited, lawfit, laws, layout, solver, timebudget
from . import sweep as S
from . import plan as P
from .errors import UserError
from .evaluate import Evaluation, HardwareView, evaluate, fits_at_any_scale, fits_somehow
from .spec import Spec
from .trainplan import candidate_batches, evaluation_share, plan_training, wall_clock_seconds


def _shape(spec: Spec, c: solver.Candidates, i: int) -> P.Shape:
    m = spec.model
    return P.Shape(n_layers=int(c.n_layers[i]), d_model=int(c.d_model[i]), n_heads=int(c.n_heads[i]),
                   n_kv_heads=int(c.n_kv_heads[i]), head_dim=int(c.head_dim[i]),
                   ffn_hidden=int(c.ffn_hidden[i]),
                   vocab_size=m.vocab_size, seq_len=m.seq_len, rope_theta=m.rope_theta,
                   norm_eps=m.norm_eps, tie_embeddings=m.tie_embeddings)


def _choice(spec: Spec, c: solver.Candidates, i: int) -> P.Choice:
    shape = _shape(spec, c, i)
    n, tokens = int(c.n_params[i]), float(c.tokens[i])
    return P.Choice(
        shape=shape, n_params=n,
        n_params_embedding=arch.embedding_params(shape.d_model, shape.vocab_size, shape.tie_embeddings),
        tokens=tokens, tokens_per_param=tokens / n, loss=float(c.loss[i]),
        objective=float(c.objective[i]), flops_per_token_6n=int(c.fpt_6n[i]),
        flops_per_token_exact=int(c.fpt_exact[i]), flops_6n=6.0 * n * tokens,
        flops_exact=float(c.fpt_exact[i]) * tokens)


def _top(c: solver.Candidates, result: solver.VariantResult) -> list[P.Candidate]:
    rows = [(rank, int(i)) for rank, i in enumerate(result.top, start=1)]
    if result.pick not in result.top:
        rows.append((result.pick_rank, result.pick))
    return [P.Candidate(rank=rank, n_layers=int(c.n_layers[i]), d_model=int(c.d_model[i]),
                        n_heads=int(c.n_heads[i]), ffn_hidden=int(c.ffn_hidden[i]),
                        n_params=int(c.n_params[i]), tokens=float(c.tokens[i]),
                        tokens_per_param=float(c.tokens[i] / c.n_params[i]), loss=float(c.loss[i]),
                        days=float(c.seconds[i] / solver.SECONDS_PER_DAY),
                        selected=(i == result.pick))
            for rank, i in rows]


def _law(spec: Spec) -> P.Law:
    law = spec.search.law()
    if isinstance(law, laws.TokensPerParamRule):
        return P.Law(name=law.name, citation=f"rule: D = {law.tokens_per_param:g}·N; loss shown by "
                     f"{law.loss_law.name} ({law.loss_law.citation})",
                     formula=f"minimise |ln(D / ({law.tokens_per_param:g}·N))|",
                     E=None, A=None, B=None, alpha=None, beta=None)
    return P.Law(name=law.name, formula=law.formula(), citation=law.citation, E=law.E, A=law.A,
                 B=law.B, alpha=law.alpha, beta=law.beta)


def _constraints(v) -> dict[str, float]:
    out: dict[str, float] = {}
    for key in ("tokens_per_param", "params"):
        bounds = getattr(v, key)
        if bounds is not None:
            for side in ("min", "max"):
                if getattr(bounds, side) is not None:
                    out[f"{key}.{side}"] = float(getattr(bounds, side))
    if v.max_days is not None:
        out["max_days"] = float(v.max_days)
    return out


MAX_NODES = 100_000  # the spec's own limit on hardware.nodes


def fits_on_nodes(spec: Spec, hardware: HardwareView, cands: solver.Candidates, nodes: int):
    """Which of cands fit in memory on `nodes` nodes (each with its batch on that many ranks)."""
    on_nodes = dataclasses.replace(hardware, nodes=nodes)
    batch = candidate_batches(spec, cands, on_nodes.world_size)
    return fits_somehow(cands.shapes(spec.model), on_nodes, batch)


def fewest_nodes(spec: Spec, hardware: HardwareView, cands: solver.Candidates) -> int | None:
    """The fewest hardware.nodes on which some of cands fits in memory, as the solver's own
    evaluation would find (evaluate.fits_somehow; None: not even on MAX_NODES). Doubling, then
    bisection."""
    def fits(nodes):
        return bool(fits_on_nodes(spec, hardware, cands, nodes).any())
    lo, hi = hardware.nodes, hardware.nodes + 1
    while not fits(hi):
        if hi >= MAX_NODES:
            return None
        lo, hi = hi, min(MAX_NODES, 2 * hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def _nodes_fix(spec: Spec, hardware: HardwareView, cands: solver.Candidates) -> str:
    """The fewest nodes that would hold some of cands (none fits now), and the smallest they hold."""
    nodes = fewest_nodes(spec, hardware, cands)
    if nodes is None:
        return f"not even {MAX_NODES:,} nodes would hold one: use larger GPUs"
    fit = cands.take(fits_on_nodes(spec, hardware, cands, nodes))
    i = int(fit.n_params.argmin())
    return (f"hardware.nodes: {nodes} or more would hold {fit.n_layers[i]}L × {fit.d_model[i]} "
            f"(N {fit.n_params[i]:.3g})")


def _memory_fix(spec: Spec, hardware: HardwareView, cands: solver.Candidates):
    """For solve_variant: explains the memory constraint for the shapes at idx, which satisfy the
    variant's other constraints."""
    hw = spec.hardware
    where = f"{hw.nodes} node(s) of {hw.gpus_per_node} {hw.device().name}"
    return lambda idx: (f"the shapes that satisfy the other constraints do not fit in memory on "
                        f"{where}: " + _nodes_fix(spec, hardware, cands.take(idx)))


def _layout(spec: Spec, hardware: HardwareView, cands: solver.Candidates, evaluation: Evaluation,
            i: int) -> layout.Layout:
    return layout.from_evaluation(evaluation, i, cands.take([i]).shapes(spec.model), hardware)


def _nothing_fits(spec: Spec, hardware: HardwareView, cands: solver.Candidates,
                  evaluation: Evaluation) -> UserError:
    """No shape fits the hardware's memory: say why for the smallest, and the nearest fix."""
    i = int(cands.n_params.argmin())
    s, lay = _shape(spec, cands, i), _layout(spec, hardware, cands, evaluation, i)
    fix = lay.fix or "use more or larger GPUs, or a shorter model.seq_len"
    if hardware.device != "cpu":
        fix = _nodes_fix(spec, hardware, cands) + "; or " + fix
    return UserError(f"no shape fits in memory; even the smallest ({s.n_layers}L × {s.d_model}, "
                     f"N {int(cands.n_params[i]):,}): {lay.problem}", field="hardware", fix=fix)


# Muennighoff et al. 2023 ("Scaling Data-Constrained Language Models"): up to about 4 epochs
# repeated tokens are worth nearly as much as fresh ones; the returns vanish around 16.
MANY_EPOCHS = 4


def data_epochs(spec: Spec, tokens: float) -> dict:
    """The Variant's epochs: tokens trained over data.unique_tokens, or per source its share of
    the tokens (weight / sum of weights; train.py's mixture rule holds every source within one
    sequence of it) over its unique tokens, the most repeated source as the overall figure."""
    if spec.data is None:
        return {"epochs": None}
    if spec.data.sources is None:
        return {"epochs": tokens / spec.data.unique_tokens}
    shares = spec.data.shares()
    per_source = {s.name: tokens * shares[s.name] / s.unique_tokens for s in spec.data.sources}
    return {"epochs": max(per_source.values()), "source_epochs": per_source}


def epoch_warnings(variants: list[P.Variant]) -> list[str]:
    """Runs that read their data more than once (the scaling laws assume each token once)."""
    out = []
    for v in variants:
        over = ({f"data.sources {name}": e for name, e in v.source_epochs.items()}
                if v.source_epochs else {"data.unique_tokens": v.epochs})
        consequence = ("so shapes are ranked by their data-constrained law (the loss at the "
                       "effective D' and N')" if v.data_limited is not None
                       else "so the predicted loss is optimistic")
        for what, epochs in over.items():
            if epochs is None or epochs <= 1:
                continue
            if epochs > MANY_EPOCHS:
                out.append(f"{v.name}: {epochs:.3g} epochs over {what}: LOUD WARNING: past "
                           f"about {MANY_EPOCHS} epochs repeated tokens are worth markedly less "
                           "than fresh ones and the returns vanish near 16 (Muennighoff et al. "
                           f"2023), {consequence}; find more data or a smaller budget")
            else:
                out.append(f"{v.name}: {epochs:.3g} epochs over {what}: the laws assume each "
                           "token once; up to about 4 epochs repeated data is worth nearly as "
                           "much (Muennighoff et al. 2023)")
    return out


def repeats_data(spec: Spec, cands: solver.Candidates, i: int) -> bool:
    """Whether candidate i's D exceeds the spec's unique tokens, under a loss law (a
    tokens-per-parameter rule has no loss to discount)."""
    return (spec.data is not None and isinstance(spec.search.law(), laws.ScalingLaw)
            and any(unique < share * cands.tokens[i] for share, unique in spec.data.portions()))


def _data_limited_pick(spec: Spec, cands: solver.Candidates, limited: solver.Candidates,
                       i: int) -> P.DataLimitedPick:
    """Candidate i: its losses as the two rankings saw them (cands: the law's, limited: the
    data-constrained law's), its effective N' and D'."""
    law, unique = spec.search.law(), spec.data.portions()
    n, d = float(cands.n_params[i]), float(cands.tokens[i])
    return P.DataLimitedPick(n_layers=int(cands.n_layers[i]), d_model=int(cands.d_model[i]),
                             n_params=int(cands.n_params[i]), tokens=d,
                             epochs=max(float(cands.tokens_trained[i]) * share / u
                                        for share, u in unique),
                             effective_tokens=float(datalimited.effective_tokens(d, unique)),
                             effective_params=float(datalimited.effective_params(law, n, d, unique)),
                             loss=float(limited.loss[i]), loss_unique=float(cands.loss[i]))


def data_limited(spec: Spec, cands: solver.Candidates, limited: solver.Candidates, pick: int,
                 unconstrained: int) -> P.DataLimited:
    """The data-constrained pick against the one the law alone made (same candidates)."""
    unique = spec.data.total_unique_tokens
    return P.DataLimited(
        unique_tokens=unique, unique_params=float(spec.search.law().optimal_params(unique)),
        r_d_star=datalimited.R_D_STAR, r_n_star=datalimited.R_N_STAR,
        formula=datalimited.FORMULA, citation=datalimited.CITATION,
        pick=_data_limited_pick(spec, cands, limited, pick),
        unconstrained=_data_limited_pick(spec, cands, limited, unconstrained))


def measured_mfu_warnings(hardware: HardwareView, variants: list[P.Variant]) -> list[str]:
    """Tensor-parallel picks timed at a measured MFU, which times every layout alike: their
    all-reduces on the critical path, which compiler/steptime.py would charge, are free there."""
    if hardware.mfu is None:
        return []
    given = "the calibration's MFU" if hardware.mfu_source else "hardware.mfu"
    return [f"{v.name}: tensor parallel {v.training.tensor_parallel} trains at {given} "
            f"{hardware.mfu:.3g}, which times every layout alike: its activations' all-reduces "
            "are not charged; measure this layout (train.py --benchmark_iters) and give the run "
            "as hardware.calibration to plan it with them"
            for v in variants if v.training.tensor_parallel > 1]


def _law_label(law: laws.ScalingLaw) -> str:
    """The law as a sentence names it: a catalog law by name, a law file's as "the fitted law"."""
    return "the fitted law" if law.name == "fitted" else law.name


def extrapolation_warnings(spec: Spec, variants: list[P.Variant]) -> list[str]:
    """Picks outside the ranges the law was fitted on: their losses are extrapolations."""
    law = spec.search.law()
    fit = law.loss_law if isinstance(law, laws.TokensPerParamRule) else law
    out = []
    for v in variants:
        n, d = v.choice.n_params, v.choice.tokens
        for what, value, bounds in (("N", n, fit.fit_params), ("D", d, fit.fit_tokens)):
            if bounds is not None and not bounds[0] <= value <= bounds[1]:
                out.append(f"{v.name}: {what} = {value:.3g} lies outside the {bounds[0]:.2g}–"
                           f"{bounds[1]:.2g} range {_law_label(fit)} was fitted on, so its "
                           "predicted loss is an extrapolation (the ranking of shapes is still "
                           "the law's)")
    return out


def _sweep_budget_runs(spec: Spec, hardware: HardwareView, budget: solver.BudgetFlops,
                       n_opt: float, val_tokens: int, floor: S.Floor,
                       family: tuple[float, str]) -> list[P.SweepRun]:
    """The runs of one sweep budget: the usable shapes _sweep_picks takes near the targets around
    n_opt, each planned as a full run (trainplan: batch and learning rate at its own budget)."""
    sw = spec.sweep
    cands = solver.enumerate_candidates(spec, budget)
    where = f"sweep budget {budget.flops:.4g} FLOPs"
    if len(cands) == 0:
        raise solver.no_valid_shape(spec, budget)
    shapes = cands.shapes(spec.model)
    evaluation = evaluate(shapes, hardware, candidate_batches(spec, cands))
    cands = solver.with_throughput(cands, evaluation.tokens_per_second)
    cands = solver.with_batches(cands, candidate_batches(spec, cands) * spec.model.seq_len)
    usable = evaluation.fits & (cands.tokens_trained <= cands.tokens * (1 + solver.MAX_OVERSHOOT))
    ok = np.flatnonzero(usable)
    targets = S.target_params([n_opt], sw.shapes)[0]
    picks, rule = _sweep_picks(cands, ok, targets, family)
    if not S.brackets(cands.loss[picks]):
        raise UserError(
            f"{where}: the search space has {picks.size} distinct shape(s) that fit and train "
            f"whole steps near N* = {n_opt:.3g} (N from {targets[0]:.3g} to {targets[-1]:.3g}), "
            "too few to bracket the prior law's minimum with shapes on both sides",
            field="sweep", fix=f"raise the smallest sweep budget (sweep.budgets) to about "
            f"{floor.flops:.2g} FLOPs or more (there {floor.why}), widen search.hidden and "
            "search.layers, or lower training.global_batch_tokens")
    runs = []
    for i in picks:
        choice = _choice(spec, cands, int(i))
        lay = _layout(spec, hardware, cands, evaluation, int(i))
        training, _, timing, _, provenance = plan_training(spec, choice, lay, hardware,
                                                           val_tokens=val_tokens)
        training = training.model_copy(update={"lr_schedule": "cosine"})
        fpt = choice.flops_per_token_6n if budget.convention == "6N" else choice.flops_per_token_exact
        provenance.update({
            "tokens": f"D = C / FLOPs per token ({budget.convention}) = {budget.flops:.6g} / {fpt:,}",
            "loss": f"prior law {spec.search.law().name}",
            "lr_schedule": "cosine to the run's own max_iters (Hoffmann et al. 2022: a schedule "
                           "longer than the run biases its loss)",
            "shape": f"targets N*/{S.SPREAD:g}..{S.SPREAD:g}·N*, N* = {n_opt:.4g} (prior law at "
                     f"C; {S.BUDGET_CITATION}); {rule}",
        })
        s = choice.shape
        runs.append(P.SweepRun(
            name=S.run_name(budget.flops, s.n_layers, s.d_model),
            description=f"sweep run at C = {budget.flops:.3g} FLOPs ({budget.convention})",
            budget_flops=budget.flops, prior_n_opt=n_opt, choice=choice, training=training,
            timing=timing, provenance=provenance))
    return runs


def _sweep_picks(cands, ok: np.ndarray, targets: np.ndarray, family: tuple[float, str]
                 ) -> tuple[np.ndarray, str]:
    """Indices of one budget's sweep shapes among the usable `ok`, and the rule that chose them:
    the family's (compiler/sweep.py family_shapes), or where its shapes do not bracket the prior
    minimum and the nearest in N do, those."""
    if ok.size == 0:
        return ok, "no usable shape"
    aspect, source = family
    picks = ok[S.family_shapes(cands.n_params[ok], cands.d_model[ok] / cands.n_layers[ok],
                               targets, aspect)]
    rule = f"near each, the valid shape of aspect nearest {aspect:.3g} ({source})"
    if S.brackets(cands.loss[picks]):
        return picks, rule
    nearest = ok[S.nearest_shapes(cands.n_params[ok], targets)]
    if not S.brackets(cands.loss[nearest]):
        return picks, rule
    return nearest, (f"the valid shape nearest each in N: the shapes of aspect nearest "
                     f"{aspect:.3g} ({source}) did not have the prior minimum inside them")


def _sweep_floor(spec: Spec, law, budget: solver.BudgetFlops) -> S.Floor:
    """The budget at which the prior law's N* is S.FLOOR_FACTOR × the smallest model the search
    space builds: below it a sweep budget's shapes cannot surround its optimum."""
    # At 1 FLOP derived axes fall back to the smallest widths; given axes are budget-independent.
    smallest = solver.enumerate_candidates(spec, solver.BudgetFlops(1.0, budget.convention, "sweep"))
    if len(smallest) == 0:
        raise solver.no_valid_shape(spec, budget)
    i = int(np.argmin(smallest.n_params))
    n_min, d = float(smallest.n_params[i]), int(smallest.d_model[i])
    m = spec.model
    embedded = float(arch.embedding_params(d, m.vocab_size, m.tie_embeddings)) / n_min
    flops = S.budget_for_n_opt(law, S.FLOOR_FACTOR * n_min)
    layers = f"{int(smallest.n_layers[i])} layer{'' if smallest.n_layers[i] == 1 else 's'}"
    why = (f"the prior law's N* is {S.FLOOR_FACTOR:g}× the smallest model the search space "
           f"builds ({n_min:.3g} parameters: {layers} × d_model {d}, "
           f"{embedded:.0%} of them in the {m.vocab_size:,}-token embedding"
           f"{'' if m.tie_embeddings else 's'})")
    smaller = (f"lower the search.layers and search.hidden minimums; d_model moves in steps of "
               f"head_dim × kv_heads = {m.head_dim * m.kv_heads}, and the embeddings weigh "
               f"{m.vocab_size:,} × d_model each")
    return S.Floor(flops, why, smaller)


def _refuse_repeated_data(spec: Spec, runs: list[P.SweepRun]) -> None:
    """A sweep run may not read its data more than once: the fit's L(N, D) counts each token
    once, and repeated tokens are worth less (Muennighoff et al. 2023), so such a run's loss would
    sit above the law and bias the fit."""
    if spec.data is None:  # nothing to check against
        return
    epochs = [data_epochs(spec, r.training.tokens_trained)["epochs"] for r in runs]
    over = [(e, r) for e, r in zip(epochs, runs) if e > 1]
    if over:
        e, r = max(over, key=lambda er: er[0])  # the most repeated
        raise UserError(
            f"{len(over)} sweep run(s) would read the training data more than once ({r.name}: "
            f"{int(r.training.tokens_trained):,} tokens, {e:.2f} epochs of the spec's data); "
            "the fit's L(N, D) counts each token once (Muennighoff et al. 2023: repeated tokens "
            "are worth less)", field="sweep.budgets",
            fix="lower the sweep budgets (or raise search.hidden's minimum, so that the smallest "
                "shapes train fewer tokens), or give more unique data")


def plan_sweep(spec: Spec, hardware: HardwareView, budget: solver.BudgetFlops) -> P.Sweep:
    """The spec's sweep: its ladder of budgets (compiler/sweep.py), every run planned in full."""
    sw = spec.sweep
    law = spec.search.law()
    floor = _sweep_floor(spec, law, budget)
    budgets, source = S.sweep_budgets(sw, budget.flops, floor)
    n_opt = [law.optimum_6nd(float(c)).n_params for c in budgets]  # a rule's is scalar
    val_tokens = sw.val_tokens or S.VAL_TOKENS
    family = S.family_aspect(sw.aspect, spec.search.aspect.min, spec.search.aspect.max)
    runs = []
    for c, n in zip(budgets, n_opt):
        runs += _sweep_budget_runs(spec, hardware, solver.BudgetFlops(
            float(c), budget.convention, "sweep"), float(n), val_tokens, floor, family)
    _refuse_repeated_data(spec, runs)
    names = [r.name for r in runs]
    if len(set(names)) != len(names):
        raise UserError("two sweep budgets agree to three digits, so their runs share names",
                        field="sweep.budgets", fix="space the sweep budgets further apart")
    exact = budget.convention != "6N"
    flops = sum((r.choice.flops_per_token_exact if exact else r.choice.flops_per_token_6n)
                * r.training.tokens_trained for r in runs)
    return P.Sweep(
        budgets=[float(c) for c in budgets], shapes=sw.shapes, aspect=family[0],
        max_fraction=sw.max_fraction,
        val_tokens=val_tokens, flops=flops, fraction_of_target=flops / budget.flops,
        days=sum(r.timing.days + r.timing.eval_days for r in runs),
        max_parallel=sw.max_parallel or len(runs),
        provenance={
            "budgets": source,
            "shapes": f"{sw.shapes} per budget asked (sweep.shapes), spread from N*/{S.SPREAD:g} "
                      f"to {S.SPREAD:g}·N* around the prior law's optimum ({law.name}); "
                      f"{S.BUDGET_CITATION}",
            "aspect": family[1],
            "val_tokens": ("spec: sweep.val_tokens" if sw.val_tokens else
                           f"default {S.VAL_TOKENS:,}: standard error about 0.1% of the loss "
                           "(compiler/sweep.py)"),
            "flops": "Σ FLOPs per token × tokens trained (whole steps) over the runs",
            "max_parallel": "spec: sweep.max_parallel" if sw.max_parallel else "every run at once",
        },
        runs=runs)


def _calibration(spec: Spec) -> P.Calibration | None:
    if spec.hardware.calibration is None:
        return None
    from .calibrate import plan_record  # only with a calibration: solve starts fast
    return plan_record(spec.hardware.calibration_data, spec.hardware.calibration)


@dataclasses.dataclass  # not frozen: data_constrained() caches its result
class _Search:
    """Every candidate shape of the search space with its tokens, batch and wall clock, and its
    one evaluation on the hardware (memory, fits, layout, speed)."""

    budget: solver.BudgetFlops
    hardware: HardwareView
    cands: solver.Candidates
    evaluation: Evaluation
    beyond: int  # shapes that fit no layout at any scale: they need pipeline or context parallelism
    unique_cands: solver.Candidates | None = None  # re-scored as data-constrained, on first need

    def data_constrained(self, spec: Spec) -> solver.Candidates:
        """The candidates under the data-constrained law (issue #16), computed once."""
        if self.unique_cands is None:
            self.unique_cands = solver.with_unique_tokens(spec, self.cands)
        return self.unique_cands


def _search(spec: Spec) -> _Search:
    budget = solver.budget_flops(spec)
    cands = solver.enumerate_candidates(spec, budget)
    if len(cands) == 0:
        raise solver.no_valid_shape(spec, budget)
    # One evaluation of every candidate with the layout and batch it will get: memory (whether it
    # fits is the memory constraint) and speed (checkpointing where memory needs it).
    hardware = HardwareView.from_spec(spec)
    shapes = cands.shapes(spec.model)
    if budget.job_seconds is None:
        evaluation = evaluate(shapes, hardware, candidate_batches(spec, cands))
        cands = solver.with_throughput(cands, evaluation.tokens_per_second)
    else:  # a time budget's tokens follow the speed, the batch the tokens, the speed the batch
        cands, evaluation = timebudget.spend(spec, budget, cands, shapes, hardware)
    batch_tokens = candidate_batches(spec, cands) * spec.model.seq_len
    cands = solver.with_batches(cands, batch_tokens)
    share = evaluation_share(spec, cands.fpt_exact, evaluation.hardware_flops_per_token)
    cands = dataclasses.replace(cands, wall_seconds=wall_clock_seconds(
        spec, cands.n_params, cands.seconds, np.rint(cands.tokens_trained / batch_tokens), share))
    if not evaluation.fits.any():
        raise _nothing_fits(spec, hardware, cands, evaluation)
    beyond = int((~evaluation.fits & ~fits_at_any_scale(shapes, hardware)).sum())
    return _Search(budget, hardware, cands, evaluation, beyond)


def _solve(spec: Spec, v, search: _Search):
    """The variant's pick, re-ranked under the data-constrained law when the pick would repeat
    data (issue #16). Returns (result, the candidates it ranked, the data-limited record or None)."""
    cands, fits = search.cands, search.evaluation.fits
    masks, memory_fix = {"memory": fits}, _memory_fix(spec, search.hardware, cands)
    result = solver.solve_variant(spec, v, cands, masks, memory_fix)
    if not repeats_data(spec, cands, result.pick):
        return result, cands, None
    limited_cands = search.data_constrained(spec)
    unconstrained = result.pick
    result = solver.solve_variant(spec, v, limited_cands, masks, memory_fix)
    limited = data_limited(spec, cands, limited_cands, result.pick, unconstrained)
    return result, limited_cands, limited


def _variant(spec: Spec, v, search: _Search, law_info: P.Law, result: solver.VariantResult,
             ranked: solver.Candidates, limited: P.DataLimited | None) -> P.Variant:
    budget, hardware = search.budget, search.hardware
    choice = _choice(spec, ranked, result.pick)
    lay = _layout(spec, hardware, search.cands, search.evaluation, result.pick)
    training, memory, timing, reasons, provenance = plan_training(spec, choice, lay, hardware)
    if budget.job_seconds is not None:
        timebudget.check_pick(spec, budget, timing, training.max_iters)
    provenance.update({
        "tokens": _tokens_source(budget, choice, timing),
        "loss": law_info.formula if limited is None else
                f"{law_info.formula}, at {datalimited.FORMULA} ({datalimited.CITATION})",
        "n_params": "compiler/arch.py param_count (embeddings included)",
    })
    return P.Variant(
        name=v.name, description=v.description or "", constraints=_constraints(v), choice=choice,
        top=_top(ranked, result),
        stats=P.SearchStats(enumerated=search.cands.enumerated, valid_shapes=len(search.cands),
                            feasible=result.feasible, near_optimal=result.near_optimal,
                            removed_by=result.removed_by,
                            need_pipeline_or_context_parallel=search.beyond),
        tie_break=result.tie_break, training=training, memory=memory, timing=timing,
        layout_reasons=reasons, provenance=provenance,
        **data_epochs(spec, training.tokens_trained), data_limited=limited)


def _tokens_source(budget: solver.BudgetFlops, choice: P.Choice, timing: P.Timing) -> str:
    """Where the pick's D comes from: the FLOPs budget, or a time budget's wall clock."""
    if budget.job_seconds is None:
        fpt = choice.flops_per_token_6n if budget.convention == "6N" else choice.flops_per_token_exact
        return f"D = C / FLOPs per token ({budget.convention}) = {budget.flops:.6g} / {fpt:,}"
    return (f"the tokens whose expected wall clock at {timing.tokens_per_second:,.0f} tokens/s, "
            f"evaluations, checkpoint writes, lost work and restarts included, is the budget's "
            f"{budget.job_seconds / 86400:.4g} days (compiler/timebudget.py)")


def _closed_form(spec: Spec, budget: solver.BudgetFlops) -> P.Optimum:
    opt = spec.search.law().optimum_6nd(budget.flops)
    note = ("closed-form minimum of the law subject to C = 6·N·D (Hoffmann et al. 2022, Eq. 4): "
            "the limit the discrete search approaches")
    if budget.job_seconds is not None:
        note += ("; for a time budget C is its nominal FLOPs, while each candidate trains what its "
                 "own predicted speed fits in the wall clock, so the pick need not approach this")
    elif budget.convention != "6N":
        note += "; the budget counts exact FLOPs here, so this is an approximation"
    return P.Optimum(n_params=opt.n_params, tokens=opt.tokens,
                     tokens_per_param=opt.tokens_per_param, loss=opt.loss, note=note)


def _sensitivity(budget: solver.BudgetFlops) -> list[P.Sensitivity]:
    """The closed-form optimum under every catalog law: how much the pick rests on the law."""
    rows = []
    for other in laws.CATALOG.values():
        o = other.optimum_6nd(budget.flops)
        rows.append(P.Sensitivity(law=other.name, n_params=o.n_params, tokens=o.tokens,
                                  tokens_per_param=o.tokens_per_param, loss=o.loss))
    return rows


def _hardware(spec: Spec, hardware: HardwareView) -> P.Hardware:
    hw, gpu = spec.hardware, spec.hardware.device()
    return P.Hardware(gpu=gpu.name, peak_tflops=gpu.bf16_tflops, memory_gb=gpu.memory_gb,
                      gpus_per_node=hw.gpus_per_node, nodes=hw.nodes,
                      world_size=hw.world_size, mfu=hardware.mfu,
                      kernel_efficiency=hardware.kernel_efficiency,
                      kernel_efficiency_source=hardware.kernel_efficiency_source,
                      intra_node_GBps=hardware.interconnect.intra_node_GBps,
                      inter_node_GBps=hardware.interconnect.inter_node_GBps,
                      interconnect_source=hardware.interconnect.source,
                      usd_per_gpu_hour=hw.usd_per_gpu_hour, source=gpu.source)


def _job(spec: Spec) -> P.Job:
    hw, cluster = spec.hardware, spec.cluster
    return P.Job(
        name=spec.name, partition=cluster.partition, account=cluster.account, qos=cluster.qos,
        time_limit=cluster.time_limit, nodes=hw.nodes,
        gpus_per_node=0 if hw.device().is_cpu else hw.gpus_per_node,
        tasks_per_node=hw.gpus_per_node, cpus_per_task=hw.cpus_per_gpu,
        mem_per_node_gb=cluster.mem_per_node_gb, signal_before_s=cluster.signal_before_s,
        requeue=True, variants=[v.name for v in spec.variants], default_variant=spec.variants[0].name)


def build_plan(spec: Spec) -> P.Plan:
    search = _search(spec)
    law_info = _law(spec)
    variants = []
    for v in spec.variants:
        result, ranked, limited = _solve(spec, v, search)
        variants.append(_variant(spec, v, search, law_info, result, ranked, limited))
    # A fitted law: its runs, CIs, and the pick re-solved at the CI's ends (compiler/lawfit.py).
    budget = search.budget
    law_info = law_info.model_copy(update={"fit": lawfit.law_fit(spec, budget.flops, variants[0])})
    front = [P.FrontierPoint(n_params=n, loss=l)  # the law the picks were ranked by
             for n, l in solver.frontier(
        search.cands if search.unique_cands is None else search.unique_cands)]
    return P.Plan(
        llama3gen_version=__version__, name=spec.name,
        spec=spec.model_dump(mode="json"), law=law_info,
        budget=P.Budget(flops=budget.flops, convention=budget.convention, source=budget.source),
        hardware=_hardware(spec, search.hardware), closed_form=_closed_form(spec, budget),
        sensitivity=_sensitivity(budget), frontier=front, variants=variants, job=_job(spec),
        recipe=P.Recipe(**search.hardware.recipe.as_dict()),
        warnings=(extrapolation_warnings(spec, variants) + epoch_warnings(variants)
                  + lawfit.fit_warnings(law_info.fit)
                  + measured_mfu_warnings(search.hardware, variants)),
        sweep=None if spec.sweep is None else plan_sweep(spec, search.hardware, budget),
        calibration=_calibration(spec))
