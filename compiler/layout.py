"""The training layout of one shape, in words: why evaluate.py chose it, or why nothing fits.

evaluate.py decides for every candidate at once (its module docstring has the rules); this module
turns one candidate's entry into a Layout with a sentence per choice, and where nothing fits, into
the problem and the nearest fix (more GPUs, shorter sequences, checkpointing, host RAM).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from .evaluate import NO_SPLIT, PARTIAL, Evaluation, HardwareView, at, evaluate
from .memory import GIB, ModelShape

MAX_GPUS_SEARCHED = 1 << 17  # the "more GPUs" fix searches world sizes up to this
MIN_SEQ_LEN_SUGGESTED = 128  # the "shorter sequences" fix halves seq_len down to this


@dataclass(frozen=True)
class Layout:
    """A training layout and why. When fits is False, the other fields describe the most frugal
    layout tried (full shard, checkpointing if allowed, micro-batch 1), `problem` says why it does
    not fit and `fix` the nearest change that would."""

    fits: bool
    parallelism: str  # "ddp", "hsdp" or "fsdp" (docs/CONTRACT.md), over the data ranks
    world_size: int
    micro_batch_size: int
    grad_accum: int
    activation_checkpointing: bool  # some block recomputes its forward in backward
    memory: dict  # memory.MemoryBreakdown.as_dict(), bytes per device
    tokens_per_second: float  # whole job
    hardware_flops_per_token: float  # exact FLOPs per token (+ the recomputed forward with AC)
    mfu: float = 0.0  # predicted (steptime.py), or the spec's measured one
    step_seconds: float = 0.0  # per optimizer step: compute + exposed communication
    compute_seconds: float = 0.0
    exposed_comm_seconds: float = 0.0
    tensor_parallel: int = 1  # ranks of a node splitting each block
    checkpointed_layers: int = 0  # how many blocks (the first) recompute: 0 to n_layers
    reasons: tuple = ()  # one sentence per choice
    problem: str = ""
    fix: str = ""
    min_gpus: int | None = None  # fewest GPUs that would fit, when more GPUs is the fix
    max_seq_len: int | None = None  # longest sequence that would fit, when that is the fix
    options: dict = field(default_factory=dict)  # largest fitting micro-batch per option_name
    speeds: dict = field(default_factory=dict)  # predicted tokens/s per option_name (0: no fit)


def plan_layout(shape: ModelShape, hardware: HardwareView, global_batch: int) -> Layout:
    """The layout of one shape (scalar fields) for a global batch of global_batch sequences."""
    return from_evaluation(evaluate(shape, hardware, global_batch), 0, shape, hardware)


def from_evaluation(evaluation: Evaluation, i: int, shape: ModelShape,
                    hardware: HardwareView) -> Layout:
    """Candidate i of an evaluation (shape: its fields as scalars), with the reasons or the fix."""
    e = at(evaluation, i)
    n_layers = int(np.ravel(shape.n_layers)[0])

    def name(key):  # Layout.options' name of an evaluate.py layout key
        p, t, ac = key
        return option_name(p, t, ac, e["partial_layers"].get((p, t), 0), n_layers)

    lay = Layout(fits=e["fits"], parallelism=e["parallelism"], world_size=hardware.world_size,
                 micro_batch_size=e["micro_batch"], grad_accum=e["grad_accum"],
                 activation_checkpointing=e["activation_checkpointing"], memory=e["memory"],
                 tokens_per_second=e["tokens_per_second"],
                 hardware_flops_per_token=e["hardware_flops_per_token"],
                 mfu=e["mfu"], step_seconds=e["step_seconds"],
                 compute_seconds=e["compute_seconds"],
                 exposed_comm_seconds=e["exposed_comm_seconds"],
                 tensor_parallel=e["tensor_parallel"],
                 checkpointed_layers=e["checkpointed_layers"],
                 options={name(k): m for k, m in e["options"].items()},
                 speeds={name(k): v for k, v in e["speeds"].items()})
    global_batch = e["per_rank_batch"] * hardware.world_size // lay.tensor_parallel
    if e["problem"] == NO_SPLIT:
        return dataclasses.replace(
            lay, problem=f"the global batch of {global_batch} sequences does not split evenly "
                         f"over {hardware.world_size} ranks",
            fix=f"a global batch that is a multiple of {hardware.world_size} sequences")
    if not lay.fits:
        problem, fix, min_gpus, max_seq = _no_fit(shape, hardware, lay)
        return dataclasses.replace(lay, reasons=(f"does not fit: {problem}", f"fix: {fix}"),
                                   problem=problem, fix=fix, min_gpus=min_gpus,
                                   max_seq_len=max_seq)
    return dataclasses.replace(lay, reasons=_reasons(lay, hardware, e["per_rank_batch"],
                                                     n_layers))


def option_name(parallelism: str, tensor_parallel: int, checkpointing, blocks: int = 0,
                n_layers: int = 0) -> str:
    """"fsdp", "fsdp+tp4", "fsdp+tp4+ac" (every block checkpointed), "fsdp+ac24/80" (24 of 80
    blocks; "+ac-partial" where partial checkpointing has no fitting option), "tp8" (one data
    rank): a layout as Layout.options names it."""
    tp = f"tp{tensor_parallel}" if tensor_parallel > 1 else ""
    data = "" if tp and parallelism == "ddp" else parallelism  # TP composes with DDP only alone
    ac = ""
    if checkpointing == PARTIAL:
        ac = f"ac{blocks}/{n_layers}" if blocks else "ac-partial"
    elif checkpointing:
        ac = "ac"
    return "+".join(part for part in (data, tp, ac) if part)


def _gib(x):
    return f"{x / GIB:.1f} GiB"


def _unit(hardware: HardwareView) -> str:
    return "device" if hardware.device == "cpu" else "GPU"


def _reasons(lay: Layout, hardware: HardwareView, per_rank: int,
             n_layers: int) -> tuple[str, ...]:
    unit, t = _unit(hardware), lay.tensor_parallel
    data_ranks = hardware.world_size // t
    micro, mem = lay.micro_batch_size, lay.memory
    reasons = [_parallelism_reason(lay, hardware)]
    if len(hardware.tensor_parallel_degrees) > 1 or t > 1:
        reasons.append(_tensor_parallel_reason(lay, hardware, n_layers))
    reasons.append(
        f"micro-batch {micro} per rank: the largest divisor of the per-rank batch "
        f"{per_rank} (= {per_rank * data_ranks} / {data_ranks} "
        f"{'data ' if t > 1 else ''}ranks) that fits "
        f"({_gib(mem['total'])} of {_gib(hardware.capacity)} per {unit}); "
        f"gradient accumulation {lay.grad_accum}")
    setting = hardware.activation_checkpointing
    if 0 < lay.checkpointed_layers < n_layers:
        reasons.append(_partial_checkpointing_reason(lay, n_layers))
    elif lay.activation_checkpointing and setting is True:
        reasons.append("activation checkpointing: on, as the spec asks; recomputing each block "
                       "in backward costs one extra forward (~33% more block compute)")
    elif lay.activation_checkpointing and _fastest_without_checkpointing(lay):
        fastest, speed = _fastest_without_checkpointing(lay)
        reasons.append("activation checkpointing: on, though it costs one extra forward of the "
                       f"blocks: without it the fastest layout ({fastest}) is predicted at "
                       f"{speed:,.0f} tokens/s, {speed / lay.tokens_per_second:.0%} of this one")
    elif lay.activation_checkpointing:
        reasons.append("activation checkpointing: on, because without it not even micro-batch "
                       "1 fits; recomputing each block in backward costs one extra forward "
                       f"(~33% more block compute), included in the "
                       f"{lay.tokens_per_second:,.0f} tokens/s")
    elif setting is False:
        reasons.append("activation checkpointing: off, as the spec asks")
    else:
        reasons.append("activation checkpointing: off, not needed to fit (it would cost ~33% "
                       "more block compute)")
    return tuple(reasons)


def _fastest_without_checkpointing(lay: Layout):
    """(name, tokens/s) of the fastest layout that fits without checkpointing, or None."""
    fitting = [(v, k) for k, v in lay.speeds.items() if v > 0 and "+ac" not in f"+{k}"]
    return max(fitting)[::-1] if fitting else None


def _partial_checkpointing_reason(lay: Layout, n_layers: int) -> str:
    """Why the first k blocks: the fewest that fit this micro-batch, against none and all."""
    k = lay.checkpointed_layers
    every = max((v for name, v in lay.speeds.items() if name.endswith("+ac") or name == "ac"),
                default=0.0)
    none = _fastest_without_checkpointing(lay)
    compared = [f"every block: {every / lay.tokens_per_second:.0%} of this speed" if every
                else "every block: no layout fits",
                f"no checkpointing: {none[0]} at {none[1] / lay.tokens_per_second:.0%}" if none
                else "no checkpointing: no layout fits"]
    return (f"activation checkpointing: the first {k} of {n_layers} blocks, the fewest with "
            f"which micro-batch {lay.micro_batch_size} fits (train.py's checkpointed_layers); "
            f"recomputing them costs ~{k / n_layers * 33:.0f}% more block compute, included "
            f"in the {lay.tokens_per_second:,.0f} tokens/s ({'; '.join(compared)})")


def _parallelism_reason(lay: Layout, hardware: HardwareView):
    par, t, micro = lay.parallelism, lay.tensor_parallel, lay.micro_batch_size
    gpus_per_node, nodes = hardware.gpus_per_node, hardware.nodes
    data_ranks = hardware.world_size // t
    if hardware.world_size == 1:
        return "one process: no data-parallel wrapper (parallelism is ignored by train.py)"
    if data_ranks == 1:
        return (f"one data rank (the {t} GPUs are one tensor group): no data-parallel wrapper "
                "(parallelism is ignored by train.py)")
    if par == "ddp":
        return (f"DDP: the replicated model states ({_gib(4 * lay.memory['parameters'])} with "
                f"gradients and AdamW) leave room for micro-batch {micro}, as much as sharding "
                "would allow, so FSDP would only add all-gathers")
    if par == "hsdp":
        return (f"HSDP (hybrid shard): sharded over the {gpus_per_node // t} data ranks of a node "
                f"and replicated across {nodes} nodes reaches micro-batch {micro}, as full "
                "sharding would, and keeps the all-gathers inside the node")
    over = f"{data_ranks} data ranks" if t > 1 else f"{data_ranks} GPUs"
    return f"FSDP full shard over {over}: less sharding fits a smaller micro-batch or none"


def _tensor_parallel_reason(lay: Layout, hardware: HardwareView, n_layers: int):
    """Why this tensor-parallel degree: the predicted speeds of the best layouts tried."""
    partial = 0 < lay.checkpointed_layers < n_layers
    mine = option_name(lay.parallelism, lay.tensor_parallel,
                       PARTIAL if partial else lay.activation_checkpointing,
                       lay.checkpointed_layers, n_layers)
    others = sorted(((v, k) for k, v in lay.speeds.items() if v > 0 and k != mine), reverse=True)
    named = ", ".join(f"{k} {v / lay.tokens_per_second:.0%}" for v, k in others[:3])
    what = (f"tensor parallel {lay.tensor_parallel}: each block's heads and SwiGLU width split "
            f"over {lay.tensor_parallel} GPUs of a node (parallelize.py)"
            if lay.tensor_parallel > 1 else "no tensor parallelism")
    if hardware.tensor_parallel != "auto":
        return what + ", as the spec asks (training.tensor_parallel)"
    measured = hardware.mfu is not None
    timed_by = "at the measured MFU" if measured else "by compiler/steptime.py"
    caveat = ("; a measured MFU times layouts by their FLOPs alone, a tie goes to the simpler"
              if measured else "")
    return (f"{what}: the fastest layout that fits {timed_by} ({mine}, "
            f"{lay.tokens_per_second:,.0f} tokens/s{caveat})" + (f"; the next, each at its own "
                                                         f"micro-batch: {named}" if named else ""))


def _frugal_total(shape, hardware, ac, tensor_parallel, world_size=None, grad_accum=1,
                  seq_len=None):
    """Bytes per device of micro-batch 1 in the most frugal layout (vectorised over world_size)."""
    if seq_len is not None:
        shape = dataclasses.replace(shape, seq_len=seq_len)
    frugal = hardware.frugal(tensor_parallel) if world_size is None else "fsdp"
    return hardware.peak_bytes(shape, 1, frugal, tensor_parallel, ac, grad_accum=grad_accum,
                               world_size=world_size)


def _no_fit(shape, hardware: HardwareView, lay: Layout):
    """Nothing fits: why the most frugal layout fails, and the nearest fix.
    Returns (problem, fix, min_gpus, max_seq_len)."""
    world, unit, capacity = hardware.world_size, _unit(hardware), hardware.capacity
    ac, mem, accum, t = lay.activation_checkpointing, lay.memory, lay.grad_accum, lay.tensor_parallel
    how = f"micro-batch 1{' with activation checkpointing' if ac else ''}"
    where = f"FSDP full shard over {world} {unit}s" if world > 1 else f"one {unit}"
    if t > 1:
        where = (f"tensor parallel {t}" + (f" × FSDP full shard over {world // t} data ranks"
                                           if world > t else f" over {world} {unit}s"))
    states = mem["parameters"] + mem["gradients"] + mem["optimizer"]
    scaled = (f", the prediction × {hardware.memory_ratio:.3g} as the calibration run measured "
              "(hardware.calibration)" if hardware.memory_ratio != 1.0 else "")
    problem = (f"even {how} and {where} needs {_gib(mem['total'])} per {unit}, more than its "
               f"{_gib(capacity)} (model states {_gib(states)}, activations "
               f"{_gib(mem['activations'])}, logits {_gib(mem['logits'])}{scaled}); a smaller "
               "micro-batch is impossible")
    if not ac and _frugal_total(shape, hardware, True, t, grad_accum=accum) <= capacity:
        return problem, "turn on activation checkpointing (training.activation_checkpointing: auto)", \
            None, None
    fix, min_gpus, max_seq = "", None, None
    if unit == "GPU":
        # More GPUs: the model states shrink with the shard degree, activations do not. Each
        # world size gets its own accumulation (global batch / world at micro-batch 1).
        worlds = np.arange(world + 1, MAX_GPUS_SEARCHED + 1)
        worlds = worlds[worlds % t == 0]
        per_world_accum = np.maximum(1, accum * world // worlds)
        ok = _frugal_total(shape, hardware, ac, t, worlds, per_world_accum) <= capacity
        if ok.any():
            min_gpus = int(worlds[ok][0])
            fix = (f"more GPUs: at least {min_gpus} (= {math.ceil(min_gpus / hardware.gpus_per_node)}"
                   f" nodes of {hardware.gpus_per_node}) with FSDP full shard")
    seq = shape.seq_len // 2
    while seq >= MIN_SEQ_LEN_SUGGESTED:
        if _frugal_total(shape, hardware, ac, t, grad_accum=accum, seq_len=seq) <= capacity:
            max_seq = int(seq)
            fix += ("; or " if fix else "") + (f"shorter sequences: seq_len {max_seq} fits on the "
                                               f"current {world} {unit}(s)")
            break
        seq //= 2
    if not fix and unit == "device":
        fix = (f"more host RAM: at least {_gib(mem['total'] * hardware.gpus_per_node)} for "
               f"{hardware.gpus_per_node} process(es); or a smaller model (another variant)")
    if not fix:
        fix = ("a smaller model (another variant, or a lower params.max): no number of GPUs "
               f"or sequence length down to {MIN_SEQ_LEN_SUGGESTED} holds this one; it would "
               "need pipeline or context parallelism, which llama3gen does not generate")
    return problem, fix, min_gpus, max_seq
