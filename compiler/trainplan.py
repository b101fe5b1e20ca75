"""How to train a chosen shape: batch, learning rate, schedule, layout on the hardware, time, cost.

Pure functions from (spec, choice) to Plan pieces. Every value carries its provenance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import goodput as G
from . import sweep as S
from . import calibrate, laws
from . import plan as P
from .errors import UserError
from .evaluate import HardwareView, forward_share
from .layout import Layout
from .memory import GIB
from .spec import Spec

LOG_INTERVAL = 10
# More optimizer steps than a run can take: a trillion, 30 years at a millisecond each (and within
# int64, which the step counters and goodput.schedule use).
MAX_ITERS = 10**12


def deepseek_compute(choice: P.Choice) -> float:
    """DeepSeek's C = M·D, M = non-embedding training FLOPs per token (attention included)."""
    s = choice.shape
    return float(non_embedding_compute(choice.flops_per_token_exact, s.vocab_size, s.d_model,
                                       choice.tokens))


def non_embedding_compute(flops_per_token_exact, vocab_size, d_model, tokens):
    """C = M·D with M the exact FLOPs per token less lm_head's 6·V·d (vectorised)."""
    return (flops_per_token_exact - 6 * vocab_size * d_model) * tokens


def batch_sequences(spec: Spec, compute, seq_len: int, world_size: int):
    """(sequences per optimizer step, per-rank granule), vectorised over compute: DeepSeek's B_opt
    at C = compute (or the spec's global_batch_tokens), rounded to a multiple of the world size.

    The per-rank share is rounded to a multiple of a power of two (≤ 1/8 of it) so that
    micro-batches can divide it: 131 sequences per rank would allow only micro-batch 1 or 131."""
    given = spec.training.global_batch_tokens
    tokens = (np.full(np.shape(compute), float(given)) if given is not None
              else laws.deepseek_batch_tokens(np.asarray(compute, dtype=np.float64)))
    per_rank = tokens / seq_len / world_size
    granule = np.where(per_rank >= 8, 2.0 ** np.floor(np.log2(np.maximum(per_rank, 8) / 8)), 1.0)
    per_rank_seqs = np.maximum(1, granule * np.round(per_rank / granule)).astype(np.int64)
    return per_rank_seqs * world_size, granule.astype(np.int64)


def candidate_batches(spec: Spec, c, world_size: int | None = None) -> np.ndarray:
    """Sequences per optimizer step for every solver candidate, as plan_training chooses them
    (on world_size ranks, the spec's by default)."""
    m = spec.model
    compute = non_embedding_compute(c.fpt_exact, m.vocab_size, c.d_model, c.tokens)
    seqs, _ = batch_sequences(spec, compute, m.seq_len, world_size or spec.hardware.world_size)
    return seqs


def global_batch(spec: Spec, choice: P.Choice, world_size: int) -> tuple[int, str]:
    """Sequences per optimizer step for the pick, and why (batch_sequences)."""
    seq_len = choice.shape.seq_len
    c = deepseek_compute(choice)
    seqs, granule = (int(x) for x in batch_sequences(spec, c, seq_len, world_size))
    if spec.training.global_batch_tokens is not None:
        why = f"spec: training.global_batch_tokens {spec.training.global_batch_tokens}"
    else:
        why = (f"B_opt = 0.2920·C^0.3271 = {laws.deepseek_batch_tokens(c):,.0f} tokens at C = M·D = "
               f"{c:.3g} ({laws.DEEPSEEK_CITATION})")
    per_rank_seqs = seqs // world_size
    rounded = (f", rounded to a multiple of {granule} so micro-batches divide it" if granule > 1
               else ", rounded to whole sequences")
    return seqs, why + (f"; {seqs} sequences of {seq_len} ({per_rank_seqs} per rank × {world_size} "
                        f"ranks{rounded})")


def learning_rate(spec: Spec, choice: P.Choice) -> tuple[float, str]:
    if spec.training.learning_rate is not None:
        return spec.training.learning_rate, "spec: training.learning_rate"
    c = deepseek_compute(choice)
    lr = laws.deepseek_learning_rate(c)
    return lr, f"η_opt = 0.3118·C^-0.1250 at C = M·D = {c:.3g} ({laws.DEEPSEEK_CITATION})"


def _four_digits(x: float) -> float:
    """Learning rates to four significant digits: the law is a fit, not a measurement."""
    return float(f"{x:.4g}")


def _check_host_memory(spec: Spec, lay: Layout) -> None:
    """On the cpu pseudo-device the plan's memory is host RAM: SLURM's --mem (cluster.mem_per_node_gb,
    GiB as SLURM reads it) below it would kill the job."""
    hw, limit = spec.hardware, spec.cluster.mem_per_node_gb
    if not hw.device().is_cpu or limit is None:
        return
    need = lay.memory["total"] * hw.gpus_per_node
    if need > limit * GIB:
        raise UserError(
            f"the plan needs {need / GIB:.1f} GiB of host RAM per node ({hw.gpus_per_node} "
            f"process(es) × {lay.memory['total'] / GIB:.1f} GiB on the cpu pseudo-device), more than "
            f"cluster.mem_per_node_gb {limit} (SLURM's --mem) allows", field="cluster.mem_per_node_gb",
            fix=f"set cluster.mem_per_node_gb to at least {math.ceil(need / GIB)}, or leave it out")


def default_interval(max_iters):
    """A tenth of the run, 1 to 1000 steps: the evaluation interval the spec does not set, and
    the checkpoint interval when failures are not modelled."""
    return np.clip(np.asarray(max_iters) // 10, 1, 1000)


def eval_interval(spec: Spec, max_iters):
    """Steps between train.py's evaluations: the spec's, else default_interval."""
    return spec.training.eval_interval or default_interval(max_iters)


def evaluation_share(spec: Spec, flops_per_token_exact, hardware_flops_per_token):
    """An evaluated token's time over a trained token's (vectorised): evaluate.forward_share,
    scaled by what the spec's calibration run measured over it for its own shape, if it timed
    evaluations."""
    share = forward_share(flops_per_token_exact, hardware_flops_per_token)
    return share * (spec.hardware.measured_evaluation_ratio or 1.0)


def evaluation_count(max_iters, eval_interval):
    """How often train.py evaluates: at every eval_interval-th step and the last (vectorised)."""
    return -(-np.asarray(max_iters) // eval_interval)


def evaluation_seconds(train_seconds, max_iters, eval_interval, eval_iters, eval_share):
    """Seconds train.py evaluates in a run of max_iters steps taking train_seconds:
    evaluation_count times eval_iters global batches, each eval_share of a step (vectorised)."""
    return (evaluation_count(max_iters, eval_interval) * eval_iters * eval_share
            * np.asarray(train_seconds) / max_iters)


def goodput_settings(spec: Spec) -> dict:
    """The cluster's failure, storage and restart settings, as goodput.schedule takes them."""
    return dict(world_size=spec.hardware.world_size,
                write_GBps=_write_bandwidth(spec)[0],
                failures_per_gpu_hour=_failure_rate(spec)[0],
                restart_seconds=_restart_seconds(spec)[0],
                ckpt_interval=spec.training.ckpt_interval)


def _write_bandwidth(spec: Spec) -> tuple[float, str]:
    """The job's checkpoint write bandwidth (GB/s) and its source: the spec's, else what the
    calibration run's saves measured, else the default."""
    doc = spec.hardware.calibration_data
    return G.write_bandwidth(spec.cluster.checkpoint_write_GBps, spec.hardware.world_size,
                             calibrate.save_bandwidth(doc, spec.hardware.calibration) if doc
                             else None)


def _failure_rate(spec: Spec) -> tuple[float, str]:
    """Failures per device-hour and their source: the spec's, else the default updated by the
    calibration run's interruptions, else the default."""
    doc = spec.hardware.calibration_data
    return G.failure_rate(spec.cluster.failures_per_gpu_hour,
                          calibrate.failures_seen(doc, spec.hardware.calibration) if doc
                          else None)


def _restart_seconds(spec: Spec) -> tuple[float, str]:
    """Seconds a restart costs and their source: the spec's, else the calibration run's SLURM
    requeues, else the default."""
    doc = spec.hardware.calibration_data
    return G.restart_time(spec.cluster.restart_s,
                          calibrate.restart_seconds(doc, spec.hardware.calibration) if doc
                          else None)


def wall_clock_seconds(spec: Spec, n_params, train_seconds, max_iters, eval_share
                       ) -> np.ndarray:
    """Every candidate's expected wall clock, evaluations, checkpoints and failures included: the
    pick's goodput (below) for each of them. What a variant's max_days bounds."""
    max_iters = np.minimum(max_iters, MAX_ITERS)  # beyond it a pick is refused (_steps)
    evals = evaluation_seconds(train_seconds, max_iters, eval_interval(spec, max_iters),
                               spec.training.eval_iters, eval_share)
    return G.schedule(n_params, train_seconds, max_iters, eval_seconds=evals,
                      **goodput_settings(spec),
                      default_interval=default_interval(max_iters)).wall_seconds


def _goodput(spec: Spec, choice: P.Choice, lay: Layout, max_iters: int, train_seconds: float,
             eval_seconds: float) -> tuple[G.Goodput, dict[str, str]]:
    """The checkpoint interval (Young–Daly) and the goodput of the pick, with provenance."""
    tr, world = spec.training, spec.hardware.world_size
    settings = goodput_settings(spec)
    rate, GBps = settings["failures_per_gpu_hour"], settings["write_GBps"]
    restart = settings["restart_seconds"]
    rate_why = _failure_rate(spec)[1]
    GBps_why = _write_bandwidth(spec)[1]
    sharded = world > 1 and lay.parallelism in ("fsdp", "hsdp")  # as train.py decides
    g = G.plan_goodput(n_params=choice.n_params, sharded=sharded, train_seconds=train_seconds,
                       max_iters=max_iters, eval_seconds=eval_seconds, **settings,
                       default_interval=int(default_interval(max_iters)))
    how = (f"DCP: each of {world} ranks writes its {g.checkpoint_bytes_per_rank:.3g} bytes at "
           "once, sharing the bandwidth" if sharded else "rank 0 writes it all")
    why = {
        "failures_per_gpu_hour": rate_why + ("; 0: failures not modelled" if rate == 0 else ""),
        "checkpoint_write_s": (
            f"{g.checkpoint_bytes:.4g} bytes ({G.CHECKPOINT_BYTES_PER_PARAM} per parameter: "
            f"checkpoint.py's fp32 weights + AdamW's two fp32 moments) / {GBps:.3g} GB/s "
            f"({GBps_why}); {how}"),
        "restart_s": _restart_seconds(spec)[1],
    }
    step = (train_seconds + eval_seconds) / max_iters
    if g.mtbf_seconds is not None:
        why["job_mtbf_s"] = f"3600 / ({world} devices × {rate:.4g} failures per device-hour)"
        why["young_daly_interval"] = (
            f"√(2 · write {g.write_seconds:.3g} s · MTBF {g.mtbf_seconds:.4g} s) = "
            f"{g.young_daly_seconds:.4g} s = {g.young_daly_steps} steps of {step:.3g} s of work "
            f"(evaluations spread over the steps), within [1, max_iters] (Young 1974; Daly 2006)")
    if tr.ckpt_interval is not None:
        why["ckpt_interval"] = "spec: training.ckpt_interval"
    elif g.mtbf_seconds is not None:
        why["ckpt_interval"] = "the Young–Daly interval"
    else:
        why["ckpt_interval"] = "max_iters // 10, at most 1000 (no failures modelled)"
    why["goodput"] = _goodput_why(g, train_seconds, eval_seconds, restart)
    return g, why


def _goodput_why(g: G.Goodput, train_seconds: float, eval_seconds: float, restart: float) -> str:
    """The goodput's arithmetic, in the plan's numbers."""
    ratio = f"training {train_seconds:.4g} s / wall {g.wall_clock_seconds:.4g} s"
    if g.mtbf_seconds is None:
        return f"{ratio}; no failures modelled: wall = training + evaluation {eval_seconds:.4g} s"
    return (f"{ratio}; wall = (training + evaluation {eval_seconds:.4g} s + {g.saves} saves × "
            f"{g.write_seconds:.3g} s) / (1 − (restart {restart:.4g} s + half of interval "
            f"{g.interval_seconds:.4g} s + write) / MTBF {g.mtbf_seconds:.4g} s); "
            f"{g.expected_failures:.3g} expected failures (compiler/goodput.py)")


def plan_training(spec: Spec, choice: P.Choice, lay: Layout, hardware: HardwareView,
                  val_tokens: int | None = None
                  ) -> tuple[P.Training, P.Memory, P.Timing, list[str], dict[str, str]]:
    """The plan of a pick whose layout (evaluate.py's, for the batch global_batch() gives) is
    `lay`, on `hardware` (its capacity per device, its kernel efficiency or measured MFU).
    val_tokens: a sweep run's, which it evaluates once, at its end."""
    tr, world = spec.training, spec.hardware.world_size
    steps, provenance = _steps(spec, choice)
    assert (lay.micro_batch_size * lay.grad_accum * (world // lay.tensor_parallel)
            == steps.batch_seqs or not lay.fits)
    if not lay.fits:
        raise UserError(f"{lay.problem}", field="hardware",
                        fix=lay.fix or "use more or larger GPUs, or a shorter model.seq_len")
    _check_host_memory(spec, lay)
    provenance["layout"] = "compiler/layout.py: " + "; ".join(lay.reasons)

    tokens_trained = steps.max_iters * steps.batch_tokens
    seconds = tokens_trained / lay.tokens_per_second
    evals = _evaluations(spec, choice, lay, steps, seconds, val_tokens, provenance)
    good, why = _goodput(spec, choice, lay, steps.max_iters, seconds, evals.seconds)
    provenance.update(why)
    is_cpu = spec.hardware.device().is_cpu
    training = P.Training(
        parallelism=lay.parallelism, tensor_parallel=lay.tensor_parallel, world_size=world,
        global_batch_size=steps.batch_seqs, global_batch_tokens=steps.batch_tokens,
        micro_batch_size=lay.micro_batch_size, grad_accum=lay.grad_accum,
        max_iters=steps.max_iters, tokens_trained=float(tokens_trained),
        learning_rate=steps.lr, min_lr=_four_digits(steps.lr * tr.min_lr_ratio),
        lr_schedule=tr.schedule, warmup_iters=steps.warmup, decay_frac=tr.decay_frac,
        weight_decay=tr.weight_decay, beta1=tr.beta1, beta2=tr.beta2, grad_clip=tr.grad_clip,
        activation_checkpointing=lay.activation_checkpointing,
        checkpointed_layers=lay.checkpointed_layers, compile=tr.compile,
        dtype="float32" if is_cpu else "bfloat16", device="cpu" if is_cpu else "cuda",
        eval_interval=evals.interval, eval_iters=evals.iters,
        log_interval=min(LOG_INTERVAL, steps.max_iters),
        ckpt_interval=good.interval_steps, keep_last_ckpts=tr.keep_last_ckpts, seed=tr.seed,
        init_std=0.02)
    provenance["init_std"] = "0.02, as GPT-2, nanoGPT and torchtitan's LLaMA (assumption)"
    memory = _memory(spec, lay, hardware.capacity, provenance)
    timing = _timing(spec, choice.shape, lay, training, seconds, good, hardware, provenance)
    return training, memory, timing, list(lay.reasons), provenance


@dataclass(frozen=True)
class _Evaluations:
    interval: int  # steps between evaluations (and one at the last)
    iters: int  # global batches per evaluation
    seconds: float  # all of them, over the run


def _evaluations(spec: Spec, choice: P.Choice, lay: Layout, steps: "_Steps", train_seconds: float,
                 val_tokens: int | None, provenance: dict[str, str]) -> _Evaluations:
    """When train.py evaluates, on how many batches, and how long that takes over the run."""
    tr, max_iters = spec.training, steps.max_iters
    if val_tokens is None:
        interval, iters = int(eval_interval(spec, max_iters)), tr.eval_iters
        provenance["eval_interval"] = ("spec: training.eval_interval" if tr.eval_interval else
                                       "max_iters // 10, 1 to 1000 steps")
    else:
        interval, iters = max_iters, S.eval_iters(val_tokens, steps.batch_tokens)
        provenance["eval_interval"] = "max_iters: the fit reads the final validation loss only"
        provenance["eval_iters"] = (
            f"ceil(val_tokens {val_tokens:,} / {steps.batch_tokens:,} tokens per batch) "
            "(compiler/sweep.py VAL_TOKENS says why)")
    share = float(evaluation_share(spec, choice.flops_per_token_exact,
                                   lay.hardware_flops_per_token))
    seconds = float(evaluation_seconds(train_seconds, max_iters, interval, iters, share))
    provenance["eval_days"] = (
        f"{evaluation_count(max_iters, interval)} evaluation(s) (every {interval} steps and at "
        f"the last) × {iters} global batches, forward only: each batch {share:.3g} of a training "
        f"step's {train_seconds / max_iters:.3g} s, {_share_source(spec, choice, lay)}")
    return _Evaluations(interval, iters, seconds)


def _share_source(spec: Spec, choice: P.Choice, lay: Layout) -> str:
    """Where an evaluated batch's share of a step comes from (evaluation_share)."""
    flops = (f"a forward's {choice.flops_per_token_exact / 3:,.0f} FLOPs per token against the "
             f"step's {lay.hardware_flops_per_token:,.0f}")
    ratio = spec.hardware.measured_evaluation_ratio
    if ratio is None:
        return flops + " at the same rate (assumption)"
    run = spec.hardware.calibration_data["measured_on"].get("run")
    return (f"{flops}, × {ratio:.4g}: what run {run} measured over that for its own shape and "
            f"layout (calibration {spec.hardware.calibration})")


@dataclass(frozen=True)
class _Steps:
    batch_seqs: int
    batch_tokens: int
    lr: float
    max_iters: int
    warmup: int


def _steps(spec: Spec, choice: P.Choice) -> tuple[_Steps, dict[str, str]]:
    """Batch, learning rate and step counts of the pick, with where each comes from."""
    tr = spec.training
    provenance: dict[str, str] = {}
    batch_seqs, provenance["global_batch_size"] = global_batch(spec, choice, spec.hardware.world_size)
    lr, provenance["learning_rate"] = learning_rate(spec, choice)
    batch_tokens = batch_seqs * choice.shape.seq_len
    max_iters = max(1, math.ceil(choice.tokens / batch_tokens))
    if max_iters > MAX_ITERS:
        raise UserError(
            f"the pick would train {max_iters:.3g} optimizer steps of {batch_tokens:,} tokens, more "
            f"than the {MAX_ITERS:.0e} any run can take", field="budget",
            fix="give a smaller budget, allow larger models (search.layers, search.hidden) or a "
                "larger batch (training.global_batch_tokens)")
    provenance["max_iters"] = (f"ceil(D / global batch tokens) = ceil({choice.tokens:.6g} / "
                               f"{batch_tokens}); trains {max_iters * batch_tokens:.6g} tokens ≥ D")
    warmup = min(tr.max_warmup_iters, max(1, round(tr.warmup_frac * max_iters)))
    provenance["warmup_iters"] = (f"{tr.warmup_frac:g} of max_iters, at most {tr.max_warmup_iters} "
                                  "(training.warmup_frac, training.max_warmup_iters)")
    provenance["min_lr"] = f"learning_rate × training.min_lr_ratio {tr.min_lr_ratio:g}"
    return _Steps(batch_seqs, batch_tokens, _four_digits(lr), max_iters, warmup), provenance


def _memory(spec: Spec, lay: Layout, capacity: float, provenance: dict[str, str]) -> P.Memory:
    hw, mem = spec.hardware, lay.memory
    if hw.measured_memory_ratio:
        peak = hw.calibration_data["peak_memory"]
        provenance["memory"] = (
            f"compiler/memory.py × {hw.measured_memory_ratio:.4g}: the peak run "
            f"{hw.calibration_data['measured_on'].get('run')} measured ({peak.get('how')}) over "
            f"what memory.py predicts for that run's own shape and layout (calibration "
            f"{hw.calibration}); applied here as an assumption that the model errs alike")
    return P.Memory(parameters=mem["parameters"], gradients=mem["gradients"],
                    optimizer=mem["optimizer"], activations=mem["activations"],
                    logits=mem["logits"], other=mem["other"], total=mem["total"],
                    calibration=mem["calibration"] if hw.measured_memory_ratio else None,
                    capacity=capacity, fits=lay.fits)


BILLED = "GPU-hours and cost = GPUs × the expected wall clock (goodput's), what a reservation bills"


def _timing(spec: Spec, shape: P.Shape, lay: Layout, training: P.Training, seconds: float,
            good: G.Goodput, hardware: HardwareView, provenance: dict[str, str]) -> P.Timing:
    hw, gpu, world = spec.hardware, spec.hardware.device(), spec.hardware.world_size
    gpu_hours = good.wall_clock_seconds / 3600 * world  # what a reservation bills
    measured = hardware.mfu is not None  # hardware.mfu, or a calibration the model cannot take
    if hw.calibration is not None:
        source = calibrate.mfu_source(hw.calibration_data, hw.calibration, shape, training,
                                      None if measured else hardware.kernel_efficiency)
        if measured:
            source += f"; it replaces compiler/steptime.py because {hardware.mfu_source}"
    elif measured:
        source = "spec: hardware.mfu (measured)"
    else:
        source = "predicted: compiler/steptime.py (compute + exposed communication)"
    recompute = ""
    if lay.activation_checkpointing:
        which = ("the blocks" if lay.checkpointed_layers == shape.n_layers
                 else f"the first {lay.checkpointed_layers} of {shape.n_layers} blocks")
        recompute = f", + one forward of {which} for activation recomputation"

    if measured:
        provenance["timing"] = (
            f"tokens/s = {world} GPUs × {gpu.bf16_tflops:g} TFLOP/s × MFU {hardware.mfu:g} "
            f"(measured: {hw.calibration or 'spec'}) / {lay.hardware_flops_per_token:,.0f} "
            f"hardware FLOPs per token (exact convention{recompute}); days = tokens trained / "
            f"tokens/s; {BILLED}")
    else:
        tensor = f" × tensor parallel {lay.tensor_parallel}" if lay.tensor_parallel > 1 else ""
        calibrated = f", calibrated by {hw.calibration}" if hw.calibration else ""
        provenance["timing"] = (
            f"tokens/s = global batch tokens / step time; step = compute {lay.compute_seconds:.3g} s "
            f"({lay.hardware_flops_per_token:,.0f} hardware FLOPs per token{recompute}, at "
            f"{hardware.kernel_efficiency:.1%} of {gpu.bf16_tflops:g} TFLOP/s{calibrated}) + "
            f"exposed communication {lay.exposed_comm_seconds:.3g} s (compiler/steptime.py, "
            f"{lay.parallelism}{tensor}); predicted MFU {lay.mfu:.1%}; days = tokens trained / "
            f"tokens/s; {BILLED}")
    return P.Timing(tokens_per_second=lay.tokens_per_second, mfu=lay.mfu, mfu_source=source,
                    step_seconds=lay.step_seconds, compute_seconds=lay.compute_seconds,
                    exposed_comm_seconds=lay.exposed_comm_seconds,
                    hardware_flops=lay.hardware_flops_per_token * training.tokens_trained,
                    days=seconds / 86400, gpu_hours=gpu_hours,
                    cost_usd=None if hw.usd_per_gpu_hour is None else gpu_hours * hw.usd_per_gpu_hour,
                    **good.timing_fields())
