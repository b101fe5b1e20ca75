"""A time budget's tokens (budget.days, budget.gpu_hours): what each candidate trains in that
wall clock, at a batch and speed that agree.

Three things depend on one another. A candidate's tokens are its training time × its speed; its
batch is DeepSeek's B_opt at C = M·D (trainplan.batch_sequences), so it follows the tokens; and
its speed follows the batch, because micro-batches must divide each rank's share (11 sequences
per rank allow micro-batches of 1 or 11 only). The training time is what the wall clock leaves
after evaluations, checkpoint writes, lost work and restarts (compiler/goodput.py):
T ← T · budget / wall(T) from T = budget settles within a few rounds, because goodput hardly
depends on T (the Young–Daly interval does not, and evaluations are nearly a fixed share of T).

A plan is consistent when the batch its tokens give is the batch its speed was evaluated at, and
within budget when its expected wall clock is at most the budget. `spend` evaluates every
candidate at a batch, spends the budget at that speed and evaluates again at the batch those
tokens give. Most candidates settle in one round; next to a rounding step of the batch some
alternate between two batches, a slow one whose tokens make the batch the fast one, and a fast
one whose tokens make it the slow one. For each candidate `spend` keeps, of the batches it
evaluated, the one that trains the most tokens consistently within budget: all the budget at
that speed where those tokens keep the batch, else the most tokens that keep it (under the
budget, never over).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import solver
from .errors import UserError
from .evaluate import Evaluation, HardwareView, evaluate
from .memory import ModelShape
from .spec import Spec
from .trainplan import candidate_batches, evaluation_share, wall_clock_seconds

ROUNDS = 4  # evaluations at new batches; two suffice where a candidate alternates
# T ← T · budget / wall(T) shrinks its error by (checkpoint and restart time) / budget a round:
# three rounds for days-long budgets, more where a checkpoint is a large part of the budget.
WALL_CLOCK_ROUNDS = 100
WALL_CLOCK_TOLERANCE = 1e-9
BISECTIONS = 60  # halvings of a log-token interval under 75 wide: to 1e-16, float64's resolution


def spend(spec: Spec, budget: solver.BudgetFlops, cands: solver.Candidates, shapes: ModelShape,
          hardware: HardwareView) -> tuple[solver.Candidates, Evaluation]:
    """Every candidate's tokens for the time budget, and the evaluation at the batch they give."""
    batches = candidate_batches(spec, cands)
    best_tokens, best_batches = np.zeros(len(cands)), batches
    fallback = cands.tokens
    for _ in range(ROUNDS):
        evaluation = evaluate(shapes, hardware, batches)
        tps = evaluation.tokens_per_second
        share = evaluation_share(spec, cands.fpt_exact, evaluation.hardware_flops_per_token)
        full = _full_tokens(spec, budget, cands, tps, share)
        full_batches = _batches(spec, cands, full)
        tokens = np.where(full_batches == batches, full,
                          np.where(full_batches > batches,
                                   _most_tokens_keeping(spec, cands, batches, full), 0.0))
        tokens = np.where(tps > 0, tokens, 0.0)
        better = tokens > best_tokens
        best_tokens = np.where(better, tokens, best_tokens)
        best_batches = np.where(better, batches, best_batches)
        fallback = np.where(tps > 0, full, fallback)
        if np.array_equal(full_batches, batches):
            break
        batches = full_batches
    # A candidate no round evaluated consistently (none fitted, or ROUNDS ran out) keeps its last
    # full-budget tokens at its last batch: it does not fit, or its plan overruns by a batch step.
    unsettled = best_tokens == 0
    best_tokens = np.where(unsettled, fallback, best_tokens)
    best_batches = np.where(unsettled, batches, best_batches)
    evaluation = evaluate(shapes, hardware, best_batches)
    _refuse_if_too_short(spec, budget, cands, evaluation, best_batches)
    return solver.with_tokens(spec, cands, best_tokens, evaluation.tokens_per_second), evaluation


def _refuse_if_too_short(spec: Spec, budget: solver.BudgetFlops, cands: solver.Candidates,
                         evaluation: Evaluation, batches: np.ndarray) -> None:
    """A budget shorter than one step and its checkpoint of every shape that fits: no plan keeps
    to it (a fixed point T ← T · budget / wall(T) that shrinks T to nothing)."""
    fits = evaluation.tokens_per_second > 0
    if not fits.any():
        return  # the memory error says why
    step_s = batches[fits] * spec.model.seq_len / evaluation.tokens_per_second[fits]
    share = evaluation_share(spec, cands.fpt_exact[fits],
                             evaluation.hardware_flops_per_token[fits])
    shortest = wall_clock_seconds(spec, cands.n_params[fits], step_s, np.ones(len(step_s)),
                                  share).min()
    if shortest > budget.job_seconds:
        raise _too_short(spec, budget, shortest)


def _field(spec: Spec) -> str:
    return "budget.days" if spec.budget.days is not None else "budget.gpu_hours"


def _too_short(spec: Spec, budget: solver.BudgetFlops, shortest_s: float) -> UserError:
    return UserError(
        f"{budget.job_seconds:.4g} s of wall clock is less than the shortest plan takes: one step "
        f"and the evaluation and checkpoint at its end, {shortest_s:.4g} s at the least",
        field=_field(spec),
        fix=f"give a budget of at least {shortest_s:.4g} s of wall clock, faster storage "
        "(cluster.checkpoint_write_GBps), or fewer evaluation batches (training.eval_iters)")


def _batches(spec: Spec, cands: solver.Candidates, tokens: np.ndarray) -> np.ndarray:
    return candidate_batches(spec, dataclasses.replace(cands, tokens=tokens))


def _full_tokens(spec: Spec, budget: solver.BudgetFlops, cands: solver.Candidates,
                 tokens_per_second: np.ndarray, eval_share: np.ndarray) -> np.ndarray:
    """Tokens whose training at tokens_per_second, evaluations, checkpoints and failures
    included, takes the budget's wall clock (module docstring)."""
    train = np.full(len(cands), budget.job_seconds)
    for _ in range(WALL_CLOCK_ROUNDS):
        tokens = train * tokens_per_second
        steps = np.maximum(1, np.ceil(tokens / (_batches(spec, cands, tokens) * spec.model.seq_len)))
        wall = wall_clock_seconds(spec, cands.n_params, train, steps, eval_share)
        finishes = np.isfinite(wall) & (wall > 0)  # else the pick's goodput says why it cannot
        ratio = np.where(finishes, budget.job_seconds / np.where(finishes, wall, 1), 1.0)
        train = train * ratio
        if np.all(np.abs(ratio - 1) < WALL_CLOCK_TOLERANCE):
            break
    return train * tokens_per_second


def _most_tokens_keeping(spec: Spec, cands: solver.Candidates, batches: np.ndarray,
                         above: np.ndarray) -> np.ndarray:
    """The most tokens below `above` whose batch is still `batches`: bisection in log tokens
    from one token, whose batch is the smallest there is (the batch grows with the tokens)."""
    lo, hi = np.zeros(len(cands)), np.log(np.maximum(above, 1.0))
    for _ in range(BISECTIONS):
        mid = (lo + hi) / 2
        keeps = _batches(spec, cands, np.exp(mid)) <= batches
        lo, hi = np.where(keeps, mid, lo), np.where(keeps, hi, mid)
    return np.exp(lo)


def one_step_of_wall_clock(timing, max_iters: int) -> float:
    """The expected wall clock's share of one step: what one more whole step adds at most (its
    training, its share of the evaluations, at the goodput's rate of lost work)."""
    return timing.wall_clock_days * 86400 / max_iters


def check_pick(spec: Spec, budget: solver.BudgetFlops, timing, max_iters: int) -> None:
    """The pick's expected wall clock is the budget's, or at most one step more (whole steps).
    spend() refused the budgets no plan can keep to; what is left to catch is a batch and speed
    that did not settle in ROUNDS (never seen: no fitting one among 273,280 candidates of 128 specs)."""
    wall_s = timing.wall_clock_days * 86400
    if wall_s <= budget.job_seconds * (1 + 1e-6) + one_step_of_wall_clock(timing, max_iters):
        return
    raise UserError(
        f"the pick's plan takes {timing.wall_clock_days * 86400:.4g} s of wall clock, more than the "
        f"{budget.job_seconds:.4g} s the budget gives: its batch and speed did not settle "
        "(compiler/timebudget.py)", field=_field(spec),
        fix="give training.global_batch_tokens: a fixed batch does not move with the tokens")
