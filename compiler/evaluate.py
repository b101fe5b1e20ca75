"""One evaluation of candidate shapes on the hardware: layout, memory and time, all vectorised.

evaluate(shapes, hardware, global_batch) decides for every candidate at once how it trains
(parallelism, micro-batch, accumulation, activation checkpointing), what that costs in memory per
device at the step's peak, and how fast it runs. The solver screens every candidate with this one
result and the pick is an index into it; layout.py only words the decision for the pick.

The rules (docs/DESIGN.md, "Layout"), for each shape:
1. A layout is a tensor-parallel degree t (1, 2, 4 or 8 ranks inside a node, dividing the heads,
   the KV heads and the SwiGLU width), a data-parallel layout over the world / t data ranks
   (DDP, hybrid shard or FSDP full shard; one data rank wraps nothing, "ddp"; tensor parallelism
   composes with FSDP or HSDP, not with DDP: templates/parallelize.py) and activation
   checkpointing of no block, of some or of every block (as the spec allows: `auto` tries all
   three; a checkpointed block recomputes its forward in backward).
2. In each layout the micro-batch per rank is the largest divisor of the per-rank batch (global
   batch / data ranks) that fits; gradient accumulation makes up the rest. Checkpointing some
   blocks trades recomputation against micro-batch: at every divisor, the fewest leading blocks
   that fit (memory.py's moments are each affine in that number from 1 to L − 1 blocks, so
   their values at those ends give the exact fewest), and of those, the fastest.
3. The fastest layout by steptime.py wins. On a tie (a measured MFU times every layout alike but
   for their FLOPs) no checkpointing, then the smaller t, then the larger micro-batch, then the
   least sharding.
Memory comes from memory.py for the Recipe train.py follows; time from steptime.py (at the kernel
efficiency a calibration run implies, when the spec names one: calibrated_view), or from the
spec's measured MFU.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np

from . import arch, hardware as catalog
from .hardware import Interconnect
from .memory import (MemoryBreakdown, ModelShape, Recipe, calibrated, calibrated_total,
                     checkpointed_blocks, memory_per_device, moment_bytes)
from .steptime import StepTime, step_time

NO_SPLIT, NO_FIT = "batch does not split over the ranks", "no layout fits in memory"
PARTIAL = "partial"  # the checkpointing choice between none (False) and every block (True)
LEVELS = {False: 0, PARTIAL: 1, True: 2}  # the checkpointing choices as levels, for ties
ROUNDING_GUARD = 1e-9  # relative: the fewest blocks that fit are never rounded down (_fewest_blocks)
TENSOR_PARALLEL_DEGREES = (1, 2, 4, 8)  # within a node: NVLink domains are 8 GPUs
# A calibration's kernel efficiency is bisected on log k over [MIN_EFFICIENCY, 1]: 60 halvings of
# that 14-wide interval leave 1e-17, float64's resolution.
MIN_EFFICIENCY, EFFICIENCY_BISECTIONS = 1e-6, 60


@dataclass(frozen=True)
class HardwareView:
    """What the planner needs of the spec's hardware, built once from the Spec (from_spec)."""

    device: str  # "cuda", or "cpu" for the CPU pseudo-device
    peak_flops: float  # per device, dense BF16 (the pseudo-device's fp32 assumption on CPU)
    memory_bytes: float  # per GPU as the device reports it; on CPU the host RAM of a node
    gpus_per_node: int
    nodes: int
    kernel_efficiency: float  # fraction of peak the compute reaches (hardware.kernel_efficiency)
    interconnect: Interconnect
    mfu: float | None = None  # measured (hardware.mfu or .calibration): replaces the step-time model
    mfu_source: str = ""  # why a calibration's MFU replaces the model (evaluate.calibrated_view)
    kernel_efficiency_source: str = ""  # the catalog's, or a calibration's (calibrated_view)
    activation_checkpointing: object = "auto"  # "auto", True or False (training.*)
    tensor_parallel: object = "auto"  # "auto" or a fixed degree (training.tensor_parallel)
    compiled: bool = False  # train.py compiles each block (training.compile): fewer activations
    memory_ratio: float = 1.0  # a calibration's measured/predicted peak (hardware.calibration)
    recipe: Recipe = Recipe()

    @classmethod
    def from_spec(cls, spec) -> "HardwareView":
        hw = spec.hardware
        gpu = hw.device()
        memory_bytes = gpu.memory_bytes
        if gpu.is_cpu and hw.host_memory_gb:
            memory_bytes = hw.host_memory_gb * 1e9
        link = catalog.interconnect(gpu)
        if hw.interconnect is not None:
            link = Interconnect(hw.interconnect.intra_node_GBps, hw.interconnect.inter_node_GBps,
                                "spec: hardware.interconnect")
        efficiency, source = catalog.kernel_efficiency(gpu, spec.training.compile)
        view = cls(device="cpu" if gpu.is_cpu else "cuda", peak_flops=gpu.peak_flops,
                   memory_bytes=memory_bytes, gpus_per_node=hw.gpus_per_node, nodes=hw.nodes,
                   kernel_efficiency=efficiency, kernel_efficiency_source=source,
                   interconnect=link, mfu=hw.mfu,
                   activation_checkpointing=spec.training.activation_checkpointing,
                   tensor_parallel=spec.training.tensor_parallel,
                   compiled=spec.training.compile,
                   memory_ratio=hw.measured_memory_ratio or 1.0)
        if hw.calibration is None:
            return view
        compile_gain = (catalog.kernel_efficiency(gpu, True)[0]
                        / catalog.kernel_efficiency(gpu, False)[0])
        return calibrated_view(view, hw.calibration_data, hw.calibration, compile_gain)

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes

    def memory(self, shapes, micro_batch, parallelism, tensor_parallel, activation_checkpointing,
               grad_accum=1, world_size=None) -> MemoryBreakdown:
        """memory.py's breakdown on this hardware, for train.py as the spec configures it."""
        predicted = memory_per_device(shapes, micro_batch, **self._memory_args(
            parallelism, tensor_parallel, activation_checkpointing, grad_accum, world_size))
        if self.memory_ratio == 1.0:
            return predicted
        return calibrated(predicted, self.memory_ratio, self.device)

    def peak_bytes(self, shapes, micro_batch, parallelism, tensor_parallel,
                   activation_checkpointing, grad_accum=1, world_size=None):
        """memory(...).total alone, for screening: the moments' maximum (calibrated_total is
        increasing, so the calibrated moments' maximum is the calibrated peak)."""
        return np.max(self.moment_bytes(shapes, micro_batch, parallelism, tensor_parallel,
                                        activation_checkpointing, grad_accum, world_size), axis=0)

    def moment_bytes(self, shapes, micro_batch, parallelism, tensor_parallel,
                     activation_checkpointing, grad_accum=1, world_size=None):
        """peak_bytes(...) before its maximum: each moment's total (memory.moment_bytes)."""
        moments = moment_bytes(shapes, micro_batch, **self._memory_args(
            parallelism, tensor_parallel, activation_checkpointing, grad_accum, world_size))
        if self.memory_ratio == 1.0:
            return moments
        return calibrated_total(moments, self.memory_ratio, self.device)

    def _memory_args(self, parallelism, tensor_parallel, activation_checkpointing, grad_accum,
                     world_size) -> dict:
        return dict(parallelism=parallelism,
                    world_size=self.world_size if world_size is None else world_size,
                    gpus_per_node=self.gpus_per_node,
                    activation_checkpointing=activation_checkpointing, grad_accum=grad_accum,
                    device=self.device, recipe=self.recipe, tensor_parallel=tensor_parallel,
                    compiled=self.compiled)

    @property
    def capacity(self) -> float:
        """Bytes one rank may use: a GPU's memory, or a share of the node's host RAM on CPU."""
        return self.memory_bytes / self.gpus_per_node if self.device == "cpu" else self.memory_bytes

    @property
    def tensor_parallel_degrees(self) -> tuple[int, ...]:
        """The tensor-parallel degrees to try, smallest first: those that divide a node."""
        if self.tensor_parallel != "auto":
            return (self.tensor_parallel,)
        return tuple(t for t in TENSOR_PARALLEL_DEGREES
                     if t == 1 or (self.gpus_per_node % t == 0 and self.world_size > 1))

    def parallelisms(self, tensor_parallel: int = 1) -> tuple[str, ...]:
        """The data-parallel layouts to try beside tensor parallelism t, least sharding first."""
        per_node = self.gpus_per_node // tensor_parallel
        if self.world_size == tensor_parallel:
            return ("ddp",)  # one data rank: no wrapper
        hybrid = ("hsdp",) if self.nodes > 1 and per_node > 1 else ()
        return ("ddp",) * (tensor_parallel == 1) + hybrid + ("fsdp",)

    def frugal(self, tensor_parallel: int = 1) -> str:
        """The layout that needs least memory: full shard, or nothing to shard in one data rank."""
        return "fsdp" if self.world_size > tensor_parallel else "ddp"

    def layouts(self):
        """(t, parallelism) pairs to try, in the tie-break order."""
        return [(t, p) for t in self.tensor_parallel_degrees for p in self.parallelisms(t)]

    @property
    def checkpointing_choices(self) -> tuple:
        """False (no block), PARTIAL (the fewest leading blocks that fit), True (every block)."""
        return {"auto": (False, PARTIAL, True), True: (True,),
                False: (False,)}[self.activation_checkpointing]



@dataclass(frozen=True)
class Evaluation:
    """One entry per candidate shape. Where `fits` is False the layout fields describe the most
    frugal layout tried (full shard, the largest tensor-parallel degree, micro-batch 1,
    checkpointing if allowed) and `problem` says why it does not fit."""

    fits: np.ndarray  # bool
    problem: np.ndarray  # "" where it fits, else NO_SPLIT or NO_FIT
    parallelism: np.ndarray  # "ddp", "hsdp" or "fsdp": over the world / tensor_parallel data ranks
    tensor_parallel: np.ndarray  # ranks of a node that split each block (1: none)
    per_rank_batch: np.ndarray  # sequences per data rank per optimizer step
    micro_batch: np.ndarray
    grad_accum: np.ndarray
    activation_checkpointing: np.ndarray  # bool: some block recomputes
    checkpointed_layers: np.ndarray  # how many blocks (the first) recompute: 0 to n_layers
    memory: MemoryBreakdown  # bytes per device at the step's peak, arrays
    hardware_flops_per_token: np.ndarray  # executed: + the recomputed forward
    step: StepTime  # seconds per optimizer step and their parts (steptime.py)
    tokens_per_second: np.ndarray  # whole job; 0 where nothing fits
    mfu: np.ndarray  # exact FLOPs per token × tokens/s / (world × peak): the plan's MFU
    options: dict  # {(parallelism, tensor_parallel, checkpointing): largest fitting micro-batch
    # (with PARTIAL: the fastest one's)}
    speeds: dict  # the same keys: tokens/s at that micro-batch, 0 where none fits
    partial_layers: dict  # {(parallelism, tensor_parallel): blocks PARTIAL checkpoints there}

    def __len__(self) -> int:
        return int(self.fits.size)


def hardware_flops_per_token(shapes: ModelShape, activation_checkpointing, forward_only=False):
    """FLOPs the hardware executes per trained token: arch's exact count (3 forwards' worth),
    plus, with activation checkpointing, one more forward of the checkpointed blocks (True: all;
    or how many: memory.checkpointed_blocks), not of lm_head. Tensor parallelism adds none: a
    tensor group splits the blocks and, by sequence, the output head (templates/parallelize.py).
    forward_only: the forward's share (a third of the exact count)."""
    s = shapes
    exact = arch.flops_per_token_exact(s.n_layers, s.d_model, s.n_heads, s.n_kv_heads,
                                       s.head_dim, s.ffn_hidden, s.vocab_size, s.seq_len)
    if forward_only:
        return exact / 3
    forward_of_blocks = (2 * s.n_layers * arch.layer_matmul_params(
        s.d_model, s.n_heads, s.n_kv_heads, s.head_dim, s.ffn_hidden)
        + 4 * s.n_layers * s.seq_len * s.n_heads * s.head_dim)
    recomputed = checkpointed_blocks(activation_checkpointing, s.n_layers) / s.n_layers
    return exact + recomputed * forward_of_blocks


def forward_share(flops_per_token_exact, hardware_flops_per_token):
    """An evaluated token's time over a trained token's: one forward, a third of the exact FLOPs,
    against the FLOPs a training step executes per token (recomputation included), at the same
    achieved rate (assumption: the forward's communication and efficiency are the step's)."""
    return np.asarray(flops_per_token_exact) / 3 / np.asarray(hardware_flops_per_token)


def divisors(n: int) -> np.ndarray:
    small = [i for i in range(1, math.isqrt(n) + 1) if n % i == 0]
    return np.array(sorted(set(small + [n // i for i in small])), dtype=np.int64)


def splits_blocks(shapes: ModelShape, tensor_parallel: int) -> np.ndarray:
    """Whether t divides the heads, the KV heads and the SwiGLU width (parallelize.py's check)."""
    t = tensor_parallel
    return ((np.asarray(shapes.n_heads) % t == 0) & (np.asarray(shapes.n_kv_heads) % t == 0)
            & (np.asarray(shapes.ffn_hidden) % t == 0))


def evaluate(shapes: ModelShape, hardware: HardwareView, global_batch) -> Evaluation:
    """Layout, memory and speed of every shape (module docstring); global_batch: sequences per
    optimizer step, one per shape (or one for all)."""
    count = np.broadcast(*[np.asarray(getattr(shapes, f.name)) for f in fields(shapes)]).size
    global_batch = np.broadcast_to(np.asarray(global_batch, dtype=np.int64), (count,))
    per_rank, usable, options, partial = _layout_options(shapes, hardware, global_batch)
    splits = np.logical_or.reduce(list(usable.values()))
    n_layers = np.broadcast_to(np.asarray(shapes.n_layers, dtype=np.int64), (count,))
    fastest = _fastest_layouts(shapes, hardware, per_rank, usable, options, partial, n_layers)
    parallelism, tensor_parallel = fastest.parallelism, fastest.tensor_parallel
    level, best_micro = fastest.level, fastest.micro_batch
    micro = np.where(best_micro > 0, best_micro, 1)
    fits = splits & (best_micro > 0)
    # Not splitting evenly is a batch problem: time it as the spec's checkpointing setting says.
    level[~splits] = 2 * (hardware.activation_checkpointing is True)
    blocks = _checkpointed_layers(level, partial, parallelism, tensor_parallel, n_layers)
    batch = np.choose(np.searchsorted(hardware.tensor_parallel_degrees, tensor_parallel),
                      [per_rank[t] for t in hardware.tensor_parallel_degrees])
    accum = batch // micro
    memory = _memory(shapes, hardware, parallelism, tensor_parallel, micro, blocks, accum)
    step, tokens_per_second = _chosen_times(fastest.timed, parallelism, tensor_parallel, level,
                                            count)
    exact = hardware_flops_per_token(shapes, False)
    tokens_per_second = np.where(fits, tokens_per_second, 0.0)
    problem = np.where(fits, "", np.where(splits, NO_FIT, NO_SPLIT))
    return Evaluation(fits=fits, problem=problem, parallelism=parallelism,
                      tensor_parallel=tensor_parallel, per_rank_batch=batch, micro_batch=micro,
                      grad_accum=accum, activation_checkpointing=blocks > 0,
                      checkpointed_layers=blocks, memory=memory,
                      hardware_flops_per_token=hardware_flops_per_token(shapes, blocks),
                      step=step, tokens_per_second=tokens_per_second,
                      mfu=exact * tokens_per_second / (hardware.world_size * hardware.peak_flops),
                      options=options, speeds=fastest.speeds, partial_layers=partial)


def _layout_options(shapes, hardware: HardwareView, global_batch):
    """Per tensor-parallel degree t: the sequences per data rank, whether the batch and the
    blocks split t ways, and the largest fitting micro-batch of every layout (and PARTIAL's
    blocks): ({t: per_rank}, {t: usable}, options, partial) as _largest_micro_batches gives."""
    per_rank, usable, options, partial = {}, {}, {}, {}
    for t in hardware.tensor_parallel_degrees:
        data_world = hardware.world_size // t
        per_rank[t] = np.maximum(global_batch // data_world, 1)
        usable[t] = ((global_batch % data_world == 0) & (global_batch >= data_world)
                     & splits_blocks(shapes, t))
        largest, blocks = _largest_micro_batches(shapes, hardware, t, per_rank[t], usable[t])
        options.update(largest)
        partial.update(blocks)
    return per_rank, usable, options, partial


class _Fastest(NamedTuple):
    """Each shape's fastest layout, and every layout's timing (keys: parallelism, t and
    checkpointing)."""

    timed: dict  # key -> time_layout's (StepTime, tokens/s) at its largest fitting micro-batch
    speeds: dict  # key -> tokens/s, 0 where it does not fit
    parallelism: np.ndarray  # the fastest's; where nothing fits, the frugal layout (the largest
    tensor_parallel: np.ndarray  # usable t, full shard)
    level: np.ndarray  # checkpointing: 0 none, 1 PARTIAL, 2 every block
    micro_batch: np.ndarray  # 0 where nothing fits


def _fastest_layouts(shapes, hardware: HardwareView, per_rank, usable, options, partial,
                     n_layers) -> _Fastest:
    """Every layout timed at its largest fitting micro-batch, and each shape's fastest (rule 3
    of the module docstring, ties included)."""
    count = n_layers.size
    frugal_t = np.full(count, hardware.tensor_parallel_degrees[0], dtype=np.int64)
    for t in hardware.tensor_parallel_degrees:
        frugal_t[usable[t]] = t
    parallelism = np.array([hardware.frugal(t) for t in frugal_t], dtype=object)
    tensor_parallel = frugal_t.copy()
    # checkpointing as a level (0 none, 1 PARTIAL, 2 every block)
    level = np.full(count, 2 * (hardware.activation_checkpointing is not False))
    timed, speeds = {}, {}
    best_speed, best_micro = np.zeros(count), np.zeros(count, dtype=np.int64)
    best_t = np.zeros(count, dtype=np.int64)
    for checkpointing in hardware.checkpointing_choices:
        for t, p in hardware.layouts():
            key = (p, t, checkpointing)
            m = options[key]
            if checkpointing == PARTIAL:
                blocks = partial[(p, t)]
            else:
                blocks = n_layers if checkpointing else 0 * n_layers
            # micro-batch 1 where none fits: the frugal layout a shape that fits nowhere reports
            timed[key] = time_layout(shapes, hardware, p, t, np.maximum(m, 1), per_rank[t],
                                     blocks)
            speeds[key] = speed = np.where(m > 0, timed[key][1], 0.0)
            code = LEVELS[checkpointing]
            better = (speed > best_speed) | ((speed == best_speed) & (t == best_t)
                                             & (code == level) & (m > best_micro))
            better &= m > 0
            parallelism[better], tensor_parallel[better], level[better] = p, t, code
            best_speed[better], best_micro[better] = speed[better], m[better]
            best_t[better] = t
    return _Fastest(timed, speeds, parallelism, tensor_parallel, level, best_micro)


def fits_somehow(shapes: ModelShape, hardware: HardwareView, global_batch) -> np.ndarray:
    """evaluate(...).fits without timing anything: whether each shape fits in some layout. The
    least memory a layout needs is the most frugal one's: full shard (or nothing to shard in one
    data rank), checkpointing where allowed, and micro-batch 1 or the whole per-rank batch (memory
    grows with the micro-batch but at the last divisor, where no accumulation is kept), for some
    tensor-parallel degree that splits the shape and the batch. For the planner's "how many nodes
    would hold it", asked once per node count."""
    count = np.broadcast(*[np.asarray(getattr(shapes, f.name)) for f in fields(shapes)]).size
    global_batch = np.broadcast_to(np.asarray(global_batch, dtype=np.int64), (count,))
    checkpointing = hardware.activation_checkpointing is not False
    fits = np.zeros(count, dtype=bool)
    for t in hardware.tensor_parallel_degrees:
        data_world = hardware.world_size // t
        per_rank = np.maximum(global_batch // data_world, 1)
        usable = ((global_batch % data_world == 0) & (global_batch >= data_world)
                  & splits_blocks(shapes, t))
        for micro in (np.ones_like(per_rank), per_rank):
            total = hardware.peak_bytes(shapes, micro, hardware.frugal(t), t, checkpointing,
                                        grad_accum=per_rank // micro)
            fits |= usable & (np.asarray(total) <= hardware.capacity)
    return fits


LARGEST_WORLD = 1 << 17  # "any number of GPUs", for fits_at_any_scale


def fits_at_any_scale(shapes: ModelShape, hardware: HardwareView) -> np.ndarray:
    """Whether some number of these nodes could hold each shape with the layouts train.py has:
    micro-batch 1, FSDP over LARGEST_WORLD GPUs (model states nearly gone), the largest tensor-
    parallel degree that splits it, checkpointing where allowed. Where not, the activations of
    one sequence alone exceed a GPU: only pipeline or context parallelism would help."""
    degrees = [t for t in TENSOR_PARALLEL_DEGREES
               if t == 1 or (hardware.gpus_per_node % t == 0 and hardware.world_size > 1)]
    fits = np.zeros(np.broadcast(*[np.asarray(getattr(shapes, f.name))
                                   for f in fields(shapes)]).size, dtype=bool)
    for t in degrees:
        total = hardware.peak_bytes(shapes, 1, "fsdp", t, hardware.activation_checkpointing
                                    is not False, world_size=LARGEST_WORLD)
        fits |= splits_blocks(shapes, t) & (np.asarray(total) <= hardware.capacity)
    return fits


def _checkpointed_layers(level, partial, parallelism, tensor_parallel, n_layers):
    """Blocks each shape's chosen layout checkpoints: none, PARTIAL's count there, or all."""
    blocks = np.where(level == 2, n_layers, 0)
    for (p, t), count in partial.items():
        index = (level == 1) & (parallelism == p) & (tensor_parallel == t)
        blocks[index] = count[index]
    return blocks


def _chosen_times(timed: dict, parallelism, tensor_parallel, level, count):
    """Each shape's chosen (or, where nothing fits, frugal) layout was timed: pick its entry."""
    tokens_per_second = np.zeros(count)
    parts = {name: np.zeros(count) for name in ("compute", "exposed_comm", "comm")}
    for (p, t, checkpointing), (step, speed) in timed.items():
        index = (parallelism == p) & (tensor_parallel == t) & (level == LEVELS[checkpointing])
        for name in parts:
            parts[name][index] = np.broadcast_to(getattr(step, name), (count,))[index]
        tokens_per_second[index] = np.broadcast_to(speed, (count,))[index]
    return StepTime(**parts), tokens_per_second


def time_layout(shapes, hardware: HardwareView, parallelism: str, tensor_parallel: int, micro,
                per_rank, ac):
    """(StepTime, tokens/s of the job) of the shapes in one layout (steptime.py), or at the
    spec's measured MFU when it gives one. per_rank: sequences per data rank and step; ac: True,
    False or the number of (leading) blocks checkpointed."""
    t = tensor_parallel
    flops = hardware_flops_per_token(shapes, ac)
    world = hardware.world_size
    step_tokens = per_rank * (world // t) * np.asarray(shapes.seq_len)
    if hardware.mfu is not None:  # measured: compute at that MFU, nothing more to expose
        speed = world * hardware.peak_flops * hardware.mfu / flops
        zero = np.zeros_like(speed)
        return StepTime(step_tokens / speed, zero, zero), speed
    s = shapes
    root = arch.embedding_params(s.d_model, s.vocab_size, s.tie_embeddings) + s.d_model
    local = s.n_params() - np.asarray(s.n_layers) * arch.layer_matmul_params(
        s.d_model, s.n_heads, s.n_kv_heads, s.head_dim, s.ffn_hidden) * (t - 1) / t
    timed = step_time(parallelism, n_params=local, root_params=root, n_layers=s.n_layers,
                      d_model=s.d_model,
                      forward_flops_per_token=hardware_flops_per_token(s, False, forward_only=True),
                      hardware_flops_per_token=flops,
                      tokens_per_micro_batch=np.asarray(micro) * np.asarray(s.seq_len),
                      grad_accum=per_rank // np.asarray(micro), world_size=world,
                      gpus_per_node=hardware.gpus_per_node, peak_flops=hardware.peak_flops,
                      kernel_efficiency=hardware.kernel_efficiency,
                      interconnect=hardware.interconnect, tensor_parallel=t,
                      activation_checkpointing=checkpointed_blocks(ac, s.n_layers) / s.n_layers,
                      reduce_scatter_every_micro_batch=(
                          hardware.recipe.fsdp_reduce_scatter_every_micro_batch),
                      regather=hardware.recipe.regathers(hardware.compiled))
    return timed, step_tokens / timed.total


def calibrated_view(view: HardwareView, doc: dict, file: str, compile_gain: float) -> HardwareView:
    """`view` calibrated by a run (hardware.calibration): the kernel efficiency at which
    steptime.py gives the step time the run measured, for the run's own shape, layout and ranks
    (on this interconnect, nodes of the spec's size), so that every other shape and layout gets
    its own FLOPs and communication on top. A run with torch.compile on and a plan with it off
    (or the reverse) scale by the catalog's compiled/eager ratio, compile_gain. Where that cannot
    be solved (_unsolvable), the measured MFU replaces the model, as a spec's hardware.mfu does."""
    from .calibrate import calibration_run
    run = calibration_run(doc)
    seconds = None if run is None else _run_step_seconds(view, run)
    why = _unsolvable(run, seconds)
    if why:
        return dataclasses.replace(view, mfu=doc["mfu"], mfu_source=why)
    low, high = math.log(MIN_EFFICIENCY), 0.0  # seconds(k) falls as k grows: bisect on log k
    for _ in range(EFFICIENCY_BISECTIONS):
        mid = (low + high) / 2
        low, high = (mid, high) if seconds(math.exp(mid)) > run.step_seconds else (low, mid)
    efficiency = math.exp((low + high) / 2)
    scale = compile_gain ** (int(view.compiled) - int(run.compiled))
    compiled = "" if scale == 1 else (f", × {scale:.4g} for torch.compile "
                                      f"{'on' if view.compiled else 'off'} here (the catalog's "
                                      "compiled/eager ratio)")
    m = doc["measured_on"]
    nodes, per_node = _run_nodes(view, run)
    spread = ("" if run.ranks_per_node else
              ": the file does not say how its ranks were spread, so nodes of the spec's size")
    source = (f"calibration {file}: {efficiency:.4g} of peak is the compute at which "
              f"compiler/steptime.py gives the {run.step_seconds:.4g} s per step run "
              f"{m.get('run')} measured ({m.get('how')}) on {nodes} node(s) × {per_node} "
              f"{m.get('gpu')}{spread}{compiled}")
    return dataclasses.replace(view, kernel_efficiency=min(1.0, efficiency * scale),
                               kernel_efficiency_source=source)


def _unsolvable(run, seconds) -> str:
    """Why no kernel efficiency in [MIN_EFFICIENCY, 1] gives the run's step time ("": one does)."""
    if run is None:
        return "the calibration file does not record the run's shape, layout and step time"
    if seconds is None and run.ranks_per_node:
        return (f"the run's nodes of {run.ranks_per_node} ranks do not hold whole tensor-parallel "
                f"groups of {run.tensor_parallel}")
    if seconds is None:
        return (f"the run's {run.world_size} ranks do not fill whole nodes of the spec's size "
                "(the file does not say how they were spread), or its nodes do not hold whole "
                "tensor-parallel groups")
    fastest = seconds(1.0)
    if fastest > run.step_seconds:
        return (f"compiler/steptime.py gives the run {fastest:.4g} s per step at the full "
                f"peak, more than the {run.step_seconds:.4g} s it measured: the model's exposed "
                "communication is too slow for this cluster (set hardware.interconnect)")
    if seconds(MIN_EFFICIENCY) < run.step_seconds:
        return (f"the run's {run.step_seconds:.4g} s per step is slower than compiler/steptime.py "
                f"gives at {MIN_EFFICIENCY:g} of peak")
    return ""


def _run_step_seconds(view: HardwareView, run):
    """The step-time model's seconds per step of the calibration run, as a function of the
    kernel efficiency (a fraction of the run's device's peak, which carries over to the spec's
    device as an MFU would); None where its ranks do not fill whole nodes, or its nodes do not
    hold whole tensor-parallel groups."""
    nodes, per_node = _run_nodes(view, run)
    if nodes * per_node != run.world_size or per_node % run.tensor_parallel:
        return None
    on_run = dataclasses.replace(view, gpus_per_node=per_node, nodes=nodes,
                                 mfu=None, compiled=run.compiled,
                                 peak_flops=run.peak_flops or view.peak_flops)

    def seconds(efficiency: float) -> float:
        step, _ = time_layout(run.shape, dataclasses.replace(on_run, kernel_efficiency=efficiency),
                              run.parallelism, run.tensor_parallel, run.micro_batch,
                              run.per_rank, run.checkpointing)
        return float(np.asarray(step.total).ravel()[0])
    return seconds


def _run_nodes(view: HardwareView, run) -> tuple[int, int]:
    """(nodes, ranks per node) of the calibration run: as it recorded them (train.py logs
    torchrun's LOCAL_WORLD_SIZE), else nodes of the spec's size (an older file); nodes is
    rounded down where its ranks do not fill them."""
    per_node = run.ranks_per_node or min(view.gpus_per_node, run.world_size)
    return run.world_size // per_node, per_node


def _take(shapes: ModelShape, index, extra_axis=False) -> ModelShape:
    """The shapes at `index` (array fields only), as a column when extra_axis."""
    def pick(value):
        value = np.asarray(value)
        if value.ndim == 0:
            return value
        value = value[index]
        return value[:, None] if extra_axis else value
    return ModelShape(**{f.name: pick(getattr(shapes, f.name)) for f in fields(shapes)
                         if f.name != "tie_embeddings"}, tie_embeddings=shapes.tie_embeddings)


def _largest_micro_batches(shapes, hardware, tensor_parallel, per_rank, usable):
    """({(parallelism, t, checkpointing): the largest divisor of each shape's per-rank batch that
    fits in memory, 0 where none does (or t cannot split it); for PARTIAL the fastest divisor's},
    {(parallelism, t): the blocks PARTIAL checkpoints at that divisor}). Every divisor of every
    usable shape is evaluated at once, a few memory-model calls per layout: memory is not
    monotone at the last divisor (no accumulation there), so no bisection."""
    t, count = tensor_parallel, per_rank.size
    choices = hardware.checkpointing_choices
    out = {(p, t, c): np.zeros(count, dtype=np.int64)
           for c in choices for p in hardware.parallelisms(t)}
    partial = {(p, t): np.zeros(count, dtype=np.int64)
               for p in hardware.parallelisms(t) if PARTIAL in choices}
    index = np.flatnonzero(usable)
    if index.size == 0:
        return out, partial
    micro = divisor_table(per_rank[index])  # 0 pads rows with fewer divisors
    safe = np.maximum(micro, 1)
    column = _take(shapes, index, extra_axis=True)
    accum = per_rank[index, None] // safe
    for p in hardware.parallelisms(t):
        totals = {}
        for c in (False, True):
            if c in choices or PARTIAL in choices:
                totals[c] = hardware.peak_bytes(column, safe, p, t, c, grad_accum=accum)
            if c in choices:
                fitting = (micro > 0) & (totals[c] <= hardware.capacity)
                out[(p, t, c)][index] = np.where(fitting, micro, 0).max(axis=1)
        if PARTIAL in choices:
            blocks = _fewest_blocks(column, hardware, p, t, safe, accum, totals[False])
            _, speed = time_layout(column, hardware, p, t, safe, per_rank[index, None], blocks)
            speed = np.where((micro > 0) & (blocks > 0), speed, 0.0)
            fastest = speed.argmax(axis=1)
            rows = np.arange(index.size)
            chosen = speed[rows, fastest] > 0
            out[(p, t, PARTIAL)][index] = np.where(chosen, micro[rows, fastest], 0)
            partial[(p, t)][index] = np.where(chosen, blocks[rows, fastest], 0)
    return out, partial


def _fewest_blocks(column, hardware, parallelism, t, micro, accum, total_none):
    """At each micro-batch, the fewest leading blocks to checkpoint for it to fit: 1 to L − 1,
    or 0 where it fits without or needs every block. From 1 to L − 1 blocks every moment of the
    step is affine in the count (memory.moment_bytes), so two evaluations, at 1 and L − 1 blocks,
    give each moment's line and the count where it falls to the capacity; the step fits where all
    of them have. ROUNDING_GUARD keeps float64's rounding of the ratio (~1e-15) from ever
    rounding it down (an exact tie then takes one block more)."""
    layers = np.asarray(column.n_layers, dtype=np.int64)
    below_all = np.maximum(layers - 1, 1) + 0 * micro
    one = np.ones_like(below_all)
    moments_one = hardware.moment_bytes(column, micro, parallelism, t, one, grad_accum=accum)
    moments_below = hardware.moment_bytes(column, micro, parallelism, t, below_all,
                                          grad_accum=accum)
    capacity = hardware.capacity
    need = (total_none > capacity) & (moments_below.max(axis=0) <= capacity) & (layers >= 2)
    # per moment: bytes saved per block, and the bytes over the capacity at one block
    saved_per_block = (moments_one - moments_below) / np.maximum(below_all - 1, 1)
    over = np.maximum(moments_one - capacity, 0.0)
    falls = saved_per_block > 0  # where over > 0 and need holds, the moment must fall
    blocks = 1 + np.ceil(np.where(falls, over / np.where(falls, saved_per_block, 1.0), 0.0)
                         * (1 + ROUNDING_GUARD))
    return np.where(need, np.minimum(blocks.max(axis=0), below_all), 0).astype(np.int64)


def divisor_table(values) -> np.ndarray:
    """(len(values), most divisors) int64: each row the divisors of its value, ascending, then 0."""
    unique, row = np.unique(values, return_inverse=True)
    lists = [divisors(int(v)) for v in unique]
    table = np.zeros((unique.size, max(d.size for d in lists)), dtype=np.int64)
    for i, d in enumerate(lists):
        table[i, :d.size] = d
    return table[row]


def _memory(shapes, hardware, parallelism, tensor_parallel, micro, ac, accum) -> MemoryBreakdown:
    """The memory breakdown of each shape's chosen layout (one memory-model call per layout)."""
    parts = []
    for p, t in sorted({(str(p), int(t)) for p, t in zip(parallelism, tensor_parallel)}):
        index = np.flatnonzero((parallelism == p) & (tensor_parallel == t))
        parts.append((index, hardware.memory(_take(shapes, index), micro[index], p, t, ac[index],
                                             grad_accum=accum[index])))
    values = {}
    for f in fields(MemoryBreakdown):
        column = np.empty(parallelism.size, dtype=object if f.name == "phase" else np.float64)
        for index, breakdown in parts:
            column[index] = np.broadcast_to(getattr(breakdown, f.name), index.shape)
        values[f.name] = column
    return MemoryBreakdown(**values)


def at(evaluation: Evaluation, i: int) -> dict:
    """Candidate i's entry as plain Python values (memory as memory.MemoryBreakdown.as_dict())."""
    memory = {f.name: getattr(evaluation.memory, f.name)[i] for f in fields(MemoryBreakdown)}
    memory = {k: (v if k == "phase" else float(v)) for k, v in memory.items()}
    memory["other"] = memory["working"] + memory["margin"] + memory["context"]
    return dict(fits=bool(evaluation.fits[i]), problem=str(evaluation.problem[i]),
                parallelism=str(evaluation.parallelism[i]),
                tensor_parallel=int(evaluation.tensor_parallel[i]),
                per_rank_batch=int(evaluation.per_rank_batch[i]),
                micro_batch=int(evaluation.micro_batch[i]), grad_accum=int(evaluation.grad_accum[i]),
                activation_checkpointing=bool(evaluation.activation_checkpointing[i]),
                checkpointed_layers=int(evaluation.checkpointed_layers[i]),
                memory=memory,
                hardware_flops_per_token=float(evaluation.hardware_flops_per_token[i]),
                tokens_per_second=float(evaluation.tokens_per_second[i]),
                mfu=float(evaluation.mfu[i]), step_seconds=float(evaluation.step.total[i]),
                compute_seconds=float(evaluation.step.compute[i]),
                exposed_comm_seconds=float(evaluation.step.exposed_comm[i]),
                comm_seconds=float(evaluation.step.comm[i]),
                options={k: int(v[i]) for k, v in evaluation.options.items()},
                partial_layers={k: int(v[i]) for k, v in evaluation.partial_layers.items()},
                speeds={k: float(v[i]) for k, v in evaluation.speeds.items()})
