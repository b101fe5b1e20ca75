"""Goodput: the share of the wall clock that trains, once failures and checkpoints are counted.

Pure arithmetic (docs/DESIGN.md, "Goodput"): `schedule` over arrays of candidates (a variant's
max_days bounds their expected wall clock), `plan_goodput` for the pick through the same
function. A job of W devices fails, on average, every M = 1 / (W · failures per device-hour)
hours. Every checkpoint stops training for its
write time δ; every failure costs a restart R and the work since the last checkpoint. Checkpointing
every τ seconds of training minimises the sum at τ ≈ √(2·δ·M) (Young 1974; Daly 2006).

The work W a checkpoint protects is training and evaluation: W = T + E, with T the pure training
time (timing.days) and E the evaluations train.py runs between steps (timing.eval_days), spread
evenly over the steps; τ is W's share between two checkpoints. Per failure the work lost is, on
average, half a segment (τ of work + δ of writing): failures are uniform in time. The failures
themselves happen during the whole wall clock, lost work and restarts included, so

    wall = (W + saves·δ) / (1 − (R + (τ + δ)/2) / M),    goodput = T / wall,

with saves the checkpoints train.py writes (every ckpt_interval steps and at the end). With
failures not modelled, wall = W.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import UserError

# Llama 3 paper (Grattafiori et al. 2024, §3.3.4): 419 unexpected interruptions in a 54-day
# snapshot of pre-training on 16,384 H100s (78% hardware: GPUs, HBM, hosts, network).
LLAMA3_INTERRUPTIONS, LLAMA3_DAYS, LLAMA3_GPUS = 419, 54, 16384
DEFAULT_FAILURES_PER_GPU_HOUR = LLAMA3_INTERRUPTIONS / (LLAMA3_DAYS * 24 * LLAMA3_GPUS)
FAILURES_SOURCE = (f"Llama 3 paper §3.3.4: {LLAMA3_INTERRUPTIONS} unexpected interruptions in "
                   f"{LLAMA3_DAYS} days on {LLAMA3_GPUS:,} GPUs = {LLAMA3_INTERRUPTIONS} / "
                   f"({LLAMA3_DAYS}·24·{LLAMA3_GPUS}) per GPU-hour")

# Llama 3 paper §3.3.1: Tectonic sustains 2 TB/s for the 16,384-GPU cluster. Its per-GPU share,
# scaled to the job, is the default: storage is assumed to grow with the cluster.
LLAMA3_STORAGE_GBPS = 2000.0
DEFAULT_WRITE_GBPS_PER_GPU = LLAMA3_STORAGE_GBPS / LLAMA3_GPUS

DEFAULT_RESTART_S = 600  # assumption: requeue, process start, NCCL init, checkpoint load

# What checkpoint.py writes: the model's fp32 weights and AdamW's two fp32 moments (exp_avg,
# exp_avg_sq); gradients are not saved, RNG and train state are a few kilobytes.
CHECKPOINT_BYTES_PER_PARAM = 12


@dataclass(frozen=True)
class Goodput:
    failures_per_gpu_hour: float  # per device
    write_GBps: float  # the job's aggregate storage bandwidth
    restart_seconds: float
    checkpoint_bytes: float  # the whole checkpoint
    checkpoint_bytes_per_rank: float  # what the busiest writer writes
    write_seconds: float  # δ
    mtbf_seconds: float | None  # M; None: failures not modelled (rate 0)
    young_daly_seconds: float | None  # √(2·δ·M)
    young_daly_steps: int | None  # that many steps, within [1, max_iters]
    interval_steps: int  # the plan's ckpt_interval (the spec's training.ckpt_interval wins)
    interval_seconds: float  # τ = interval_steps × work per step
    eval_seconds: float  # E, the run's evaluations
    saves: int  # checkpoints in the whole run, the final one included
    expected_failures: float
    goodput: float
    wall_clock_seconds: float

    def timing_fields(self) -> dict:
        """The goodput fields of the Plan's Timing (compiler/plan.py)."""
        return dict(
            failures_per_gpu_hour=self.failures_per_gpu_hour, job_mtbf_s=self.mtbf_seconds,
            checkpoint_bytes=self.checkpoint_bytes, checkpoint_write_GBps=self.write_GBps,
            checkpoint_write_s=self.write_seconds, young_daly_interval_s=self.young_daly_seconds,
            young_daly_interval_steps=self.young_daly_steps,
            checkpoint_interval_s=self.interval_seconds, checkpoint_saves=self.saves,
            eval_days=self.eval_seconds / 86400,
            restart_s=self.restart_seconds, expected_failures=self.expected_failures,
            goodput=self.goodput, wall_clock_days=self.wall_clock_seconds / 86400)


# A measured failure count updates the default as a Gamma prior worth this many failures
# (assumption): its weight is PRIOR_FAILURES / DEFAULT_FAILURES_PER_GPU_HOUR device-hours, about
# 50,700, so a short calibration run barely moves the rate and weeks on a few hundred GPUs do.
PRIOR_FAILURES = 1.0


def failure_rate(spec_rate: float | None,
                 measured: tuple[int, float, str] | None = None) -> tuple[float, str]:
    """Failures per device-hour, and where the number comes from. measured: (interruptions,
    device-hours, where) seen by a calibration run, which update the default by Gamma–Poisson
    conjugacy: the posterior mean (PRIOR_FAILURES + n) / (PRIOR_FAILURES / default + hours).
    The spec's own rate wins."""
    if spec_rate is not None:
        return spec_rate, "spec: cluster.failures_per_gpu_hour"
    if measured is not None:
        count, hours, where = measured
        prior_hours = PRIOR_FAILURES / DEFAULT_FAILURES_PER_GPU_HOUR
        rate = (PRIOR_FAILURES + count) / (prior_hours + hours)
        return rate, (f"{where}: {count} unexpected interruption(s) in {hours:.4g} device-hours, "
                      f"updating the default ({FAILURES_SOURCE}) taken as a prior worth "
                      f"{PRIOR_FAILURES:g} failure in {prior_hours:,.0f} device-hours "
                      f"(assumption): ({PRIOR_FAILURES:g} + {count}) / ({prior_hours:,.0f} + "
                      f"{hours:.4g}), the Gamma–Poisson posterior mean")
    return DEFAULT_FAILURES_PER_GPU_HOUR, f"default: {FAILURES_SOURCE}"


def write_bandwidth(spec_GBps: float | None, world_size: int,
                    measured: tuple[float, str] | None = None) -> tuple[float, str]:
    """Aggregate checkpoint write bandwidth of the job, GB/s, and where it comes from. measured:
    (GB/s per device, where) from a calibration run's saves; the spec's own value wins."""
    if spec_GBps is not None:
        return spec_GBps, "spec: cluster.checkpoint_write_GBps (aggregate, per job)"
    if measured is not None:
        per_device, where = measured
        return (per_device * world_size,
                f"{where}: {per_device:.3g} GB/s per device, × {world_size} devices (storage "
                "assumed to grow with the job, as the default assumes)")
    return (DEFAULT_WRITE_GBPS_PER_GPU * world_size,
            f"default (assumption): Llama 3's storage share per GPU, {LLAMA3_STORAGE_GBPS:g} GB/s "
            f"sustained over {LLAMA3_GPUS:,} GPUs (§3.3.1) = {DEFAULT_WRITE_GBPS_PER_GPU:.3g} GB/s, "
            f"× {world_size} devices")


def restart_time(spec_seconds: float | None,
                 measured: tuple[float, str] | None = None) -> tuple[float, str]:
    """Seconds one restart costs, and where the number comes from. measured: (seconds, where)
    from a calibration run's SLURM requeues; the spec's own value wins."""
    if spec_seconds is not None:
        return spec_seconds, "spec: cluster.restart_s"
    if measured is not None:
        return measured
    return DEFAULT_RESTART_S, (f"default (assumption): {DEFAULT_RESTART_S} s to requeue, start and "
                               "load a checkpoint")


def plan_goodput(*, n_params: int, sharded: bool, world_size: int, train_seconds: float,
                 max_iters: int, eval_seconds: float, write_GBps: float,
                 failures_per_gpu_hour: float, restart_seconds: float, ckpt_interval: int | None,
                 default_interval: int) -> Goodput:
    """The checkpoint interval and goodput of one pick (schedule() for one candidate).

    write_GBps is the job's aggregate storage bandwidth. Sharded (DCP), every rank writes its
    1/world share at once, but they share that bandwidth: the write takes the whole checkpoint's
    bytes over it either way (unsharded, rank 0 writes everything, assumed to reach it too).
    ckpt_interval: the spec's, which wins; default_interval: the rule when failures are off."""
    s = schedule(n_params, train_seconds, max_iters, eval_seconds=eval_seconds,
                 world_size=world_size, write_GBps=write_GBps,
                 failures_per_gpu_hour=failures_per_gpu_hour, restart_seconds=restart_seconds,
                 ckpt_interval=ckpt_interval, default_interval=default_interval)
    write_s, wall = float(s.write_seconds), float(s.wall_seconds)
    mtbf_s = None if s.mtbf_seconds is None else float(s.mtbf_seconds)
    if not math.isfinite(wall):
        raise never_finishes(mtbf_s, restart_seconds, float(s.interval_seconds), write_s)
    total = float(CHECKPOINT_BYTES_PER_PARAM) * n_params
    return Goodput(
        failures_per_gpu_hour=failures_per_gpu_hour, write_GBps=write_GBps,
        restart_seconds=float(restart_seconds), checkpoint_bytes=total,
        checkpoint_bytes_per_rank=total / world_size if sharded else total, write_seconds=write_s,
        mtbf_seconds=mtbf_s,
        young_daly_seconds=None if mtbf_s is None else float(s.young_daly_seconds),
        young_daly_steps=None if mtbf_s is None else int(s.young_daly_steps),
        interval_steps=int(s.interval_steps), interval_seconds=float(s.interval_seconds),
        eval_seconds=float(eval_seconds), saves=int(s.saves),
        expected_failures=0.0 if mtbf_s is None else wall / mtbf_s,
        goodput=train_seconds / wall if wall > 0 else 1.0, wall_clock_seconds=wall)


@dataclass(frozen=True)
class Schedule:
    """Checkpoints and the expected wall clock of candidates (arrays broadcast over them)."""

    write_seconds: np.ndarray  # δ
    mtbf_seconds: float | None  # M for the job; None: failures not modelled
    young_daly_seconds: np.ndarray | None  # √(2·δ·M)
    young_daly_steps: np.ndarray | None  # that many steps, within [1, max_iters]
    interval_steps: np.ndarray
    interval_seconds: np.ndarray
    saves: np.ndarray  # checkpoints in the whole run, the final one included
    wall_seconds: np.ndarray  # expected wall clock; inf where the job would never finish


def schedule(n_params, train_seconds, max_iters, *, eval_seconds=0.0, world_size: int,
             write_GBps: float, failures_per_gpu_hour: float, restart_seconds: float,
             ckpt_interval: int | None, default_interval) -> Schedule:
    """The checkpoint interval, saves and expected wall clock (module docstring) of every
    candidate: n_params, train_seconds, max_iters, eval_seconds and default_interval may be
    arrays."""
    n_params = np.asarray(n_params, np.float64)
    work_s = np.asarray(train_seconds, np.float64) + np.asarray(eval_seconds, np.float64)
    max_iters = np.asarray(max_iters, np.int64)
    write_s = float(CHECKPOINT_BYTES_PER_PARAM) * n_params / (write_GBps * 1e9)
    step_s = work_s / max_iters  # work per step: evaluations spread over the steps
    mtbf_s = yd_s = yd_steps = None
    if failures_per_gpu_hour > 0:
        mtbf_s = 3600 / (failures_per_gpu_hour * world_size)
        yd_s = np.sqrt(2 * write_s * mtbf_s)
        # clamp before the int cast: τ / step can exceed any int64 on tiny steps
        with np.errstate(divide="ignore", over="ignore"):
            steps = np.where(step_s > 0, yd_s / step_s, np.inf)
        yd_steps = np.clip(np.round(np.minimum(steps, 1e18)), 1, max_iters).astype(np.int64)
        interval = yd_steps if ckpt_interval is None else np.full_like(max_iters, ckpt_interval)
    else:
        interval = np.broadcast_to(np.asarray(ckpt_interval or default_interval, np.int64),
                                   max_iters.shape)
    interval_s = interval * step_s
    saves = -(-max_iters // interval)  # train.py also saves at the last step
    if mtbf_s is None:
        wall = work_s
    else:
        left = 1 - (restart_seconds + (interval_s + write_s) / 2) / mtbf_s
        wall = np.where(left > 0, (work_s + saves * write_s) / np.where(left > 0, left, 1),
                        np.inf)
    return Schedule(write_s, mtbf_s, yd_s, yd_steps, interval, interval_s, saves, wall)


def never_finishes(mtbf_seconds, restart_seconds, interval_seconds, write_seconds) -> UserError:
    return UserError(
        f"the job is expected to fail every {mtbf_seconds:,.0f} s, sooner than it restarts "
        f"({restart_seconds:g} s) and redoes the work since its last checkpoint (half of "
        f"{interval_seconds:.4g} s between checkpoints, {write_seconds:.3g} s each to write): "
        "it would never finish", field="cluster.failures_per_gpu_hour", fix=NEVER_FINISHES_FIX)


NEVER_FINISHES_FIX = ("use fewer devices, faster storage (cluster.checkpoint_write_GBps), a shorter "
                      "cluster.restart_s, or the cluster's own failures_per_gpu_hour (0: no "
                      "failures)")
