"""How to train a shape on the spec's hardware: parallelism, micro-batch, accumulation, recompute.

plan_layout() decides for one shape and explains each choice; min_memory(), fits() and
tokens_per_second() are the same rules vectorised over candidate shapes, for the solver.

The rules, in order:
1. No activation checkpointing unless it is needed to fit (or the spec asks for it): it recomputes
   every block's forward in backward, one extra forward on top of forward + backward (3 forward
   units become 4: about 33% more compute on the blocks), so tokens/s drops accordingly.
2. The micro-batch per rank is the largest divisor of the per-rank batch (global batch / world
   size) that fits; gradient accumulation makes up the rest.
3. Parallelism: the least sharding that trains the same micro-batch as the most. DDP (everything
   replicated) when full sharding would not buy a larger micro-batch, since sharding only adds
   all-gathers; else hybrid shard (FSDP within a node, replicated across nodes: all-gathers stay
   on the node's NVLink) when it reaches that micro-batch; else FSDP full shard over all GPUs.
   One process (world size 1) wraps nothing.
Memory comes from compiler/memory.py; time from the exact hardware FLOPs per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from . import arch
from . import memory as memory_module
from .memory import GIB, ModelShape, memory_per_device

MAX_GPUS_SEARCHED = 1 << 17  # the "more GPUs" fix searches world sizes up to this
MIN_SEQ_LEN_SUGGESTED = 128  # the "shorter sequences" fix halves seq_len down to this


@dataclass(frozen=True)
class Layout:
    """A training layout and why. When fits is False, the other fields describe the most frugal
    layout tried (full shard, checkpointing if allowed, micro-batch 1), `problem` says why it does
    not fit and `fix` the nearest change that would."""

    fits: bool
    parallelism: str  # "ddp", "hsdp" or "fsdp" (docs/CONTRACT.md)
    world_size: int
    micro_batch_size: int
    grad_accum: int
    activation_checkpointing: bool
    memory: dict  # memory.MemoryBreakdown.as_dict(), bytes per device
    tokens_per_second: float  # whole job
    hardware_flops_per_token: float  # exact FLOPs per token (+ the recomputed forward with AC)
    reasons: tuple = ()  # one sentence per choice
    problem: str = ""
    fix: str = ""
    min_gpus: int | None = None  # fewest GPUs that would fit, when more GPUs is the fix
    max_seq_len: int | None = None  # longest sequence that would fit, when that is the fix
    options: dict = field(default_factory=dict)  # largest fitting micro-batch per (parallelism, AC)


def hardware_flops_per_token(flops_per_token_exact, n_layers, d_model, n_heads, n_kv_heads,
                             head_dim, ffn_hidden, vocab_size, seq_len, activation_checkpointing):
    """FLOPs the hardware executes per trained token: arch's exact count (3 forwards' worth), plus,
    with activation checkpointing, one more forward of the blocks (not of lm_head)."""
    forward_of_blocks = (2 * n_layers * arch.layer_matmul_params(d_model, n_heads, n_kv_heads,
                                                                 head_dim, ffn_hidden)
                         + 4 * n_layers * seq_len * n_heads * head_dim)
    return flops_per_token_exact + np.where(activation_checkpointing, forward_of_blocks, 0)


def _sharded_option(world_size):
    """What the frugal layout uses: FSDP full shard, or nothing to shard with one process."""
    return "fsdp" if world_size > 1 else "ddp"


def min_memory(n_layers, d_model, n_heads, n_kv_heads, head_dim, ffn_hidden, vocab_size, seq_len, *,
               world_size, gpus_per_node=1, tie_embeddings=False, allow_checkpointing=True,
               grad_accum=2, device="cuda"):
    """Bytes per device of the most frugal layout: full shard, micro-batch 1, checkpointing if
    allowed. Vectorised over the shape arguments (numpy arrays).

    grad_accum > 1 (the default) counts what accumulation costs: the gradients of earlier
    micro-batches are live during later ones (sharded under FSDP, which the generated train.py
    reduce-scatters after every micro-batch); pass the real value when the batch is known.
    """
    shape = ModelShape(n_layers, d_model, n_heads, n_kv_heads, head_dim, ffn_hidden, vocab_size,
                       seq_len, tie_embeddings)
    return memory_per_device(shape, 1, parallelism=_sharded_option(world_size),
                             world_size=world_size, gpus_per_node=gpus_per_node,
                             activation_checkpointing=allow_checkpointing, grad_accum=grad_accum,
                             device=device).total


def fits(n_layers, d_model, n_heads, n_kv_heads, head_dim, ffn_hidden, vocab_size, seq_len, *,
         memory_bytes, world_size, gpus_per_node=1, tie_embeddings=False, allow_checkpointing=True,
         grad_accum=2, device="cuda"):
    """True where some layout trains the shape within memory_bytes per device (vectorised)."""
    return min_memory(n_layers, d_model, n_heads, n_kv_heads, head_dim, ffn_hidden, vocab_size,
                      seq_len, world_size=world_size, gpus_per_node=gpus_per_node,
                      tie_embeddings=tie_embeddings, allow_checkpointing=allow_checkpointing,
                      grad_accum=grad_accum, device=device) <= memory_bytes


def tokens_per_second(n_layers, d_model, n_heads, n_kv_heads, head_dim, ffn_hidden, vocab_size,
                      seq_len, *, memory_bytes, world_size, gpus_per_node, peak_flops, mfu,
                      tie_embeddings=False, allow_checkpointing=True, grad_accum=2, device="cuda",
                      force_checkpointing=False):
    """Predicted tokens/s of the whole job for each candidate (vectorised), 0 where nothing fits.

    Checkpointing is assumed exactly where micro-batch 1 does not fit without it, as plan_layout
    decides (everywhere with force_checkpointing); use it to break ties between near-optimal shapes.
    """
    args = (n_layers, d_model, n_heads, n_kv_heads, head_dim, ffn_hidden, vocab_size, seq_len)
    common = dict(memory_bytes=memory_bytes, world_size=world_size, gpus_per_node=gpus_per_node,
                  tie_embeddings=tie_embeddings, grad_accum=grad_accum, device=device)
    without = fits(*args, allow_checkpointing=False, **common)
    with_ac = fits(*args, allow_checkpointing=allow_checkpointing, **common)
    exact = arch.flops_per_token_exact(*args)
    hw = hardware_flops_per_token(exact, *args, activation_checkpointing=~without | force_checkpointing)
    return np.where(with_ac, world_size * peak_flops * mfu / hw, 0.0)


def device_capacity(memory_bytes, gpus_per_node, device="cuda"):
    """Bytes one rank may use: a GPU's memory, or on the CPU pseudo-device the host RAM divided
    among the node's processes."""
    return memory_bytes / gpus_per_node if device == "cpu" else memory_bytes


def spec_memory_bytes(spec):
    """(device, memory per GPU or host RAM) for a Spec: host_memory_gb overrides the catalog's
    figure for the cpu pseudo-device."""
    hw = spec.hardware
    gpu = hw.device()
    if gpu.is_cpu:
        return "cpu", (hw.host_memory_gb * 1e9 if hw.host_memory_gb else gpu.memory_bytes)
    return "cuda", gpu.memory_bytes


def memory_masks(spec, cands, throughput=None) -> dict:
    """The solver's memory constraint for a Spec and solver.Candidates: {"memory": bool array}.
    Pass candidate_throughput()'s result when you have it: it is 0 exactly where nothing fits."""
    if throughput is not None:
        return {"memory": np.asarray(throughput) > 0}
    hw, m = spec.hardware, spec.model
    device, memory_bytes = spec_memory_bytes(spec)
    allow = spec.training.activation_checkpointing is not False
    ok = fits(cands.n_layers, cands.d_model, cands.n_heads, cands.n_kv_heads, cands.head_dim,
              cands.ffn_hidden, m.vocab_size, m.seq_len,
              memory_bytes=device_capacity(memory_bytes, hw.gpus_per_node, device),
              world_size=hw.world_size, gpus_per_node=hw.gpus_per_node,
              tie_embeddings=m.tie_embeddings, allow_checkpointing=allow, device=device)
    return {"memory": np.asarray(ok, dtype=bool)}


def candidate_throughput(spec, cands) -> np.ndarray:
    """tokens/s of the whole job for every solver candidate, 0 where nothing fits (vectorised)."""
    hw, m = spec.hardware, spec.model
    device, memory_bytes = spec_memory_bytes(spec)
    gpu = hw.device()
    return tokens_per_second(
        cands.n_layers, cands.d_model, cands.n_heads, cands.n_kv_heads, cands.head_dim, cands.ffn_hidden,
        m.vocab_size, m.seq_len, memory_bytes=device_capacity(memory_bytes, hw.gpus_per_node, device),
        world_size=hw.world_size, gpus_per_node=hw.gpus_per_node, peak_flops=gpu.peak_flops,
        mfu=hw.effective_mfu, tie_embeddings=m.tie_embeddings,
        allow_checkpointing=spec.training.activation_checkpointing is not False, device=device,
        force_checkpointing=spec.training.activation_checkpointing is True)


def _divisors(n):
    small = [i for i in range(1, math.isqrt(n) + 1) if n % i == 0]
    return np.array(sorted(set(small + [n // i for i in small])), dtype=np.int64)


def _gib(x):
    return f"{x / GIB:.1f} GiB"


def plan_layout(*, n_layers, d_model, n_heads, n_kv_heads, head_dim, ffn_hidden, vocab_size,
                seq_len, tie_embeddings=False, gpu_memory_bytes, gpus_per_node, nodes, peak_flops,
                mfu, global_batch_size, flops_per_token=None, activation_checkpointing="auto",
                device="cuda") -> Layout:
    """Choose parallelism, micro-batch, accumulation and checkpointing for one shape (module doc).

    activation_checkpointing: "auto" (only when needed to fit), True (always) or False (never).
    device: "cuda", or "cpu" for the CPU pseudo-device: gpu_memory_bytes is then the host RAM,
    shared by the node's gpus_per_node processes.
    """
    shape = ModelShape(n_layers, d_model, n_heads, n_kv_heads, head_dim, ffn_hidden, vocab_size,
                       seq_len, tie_embeddings)
    world = gpus_per_node * nodes
    capacity = device_capacity(gpu_memory_bytes, gpus_per_node, device)
    if flops_per_token is None:
        flops_per_token = arch.flops_per_token_exact(n_layers, d_model, n_heads, n_kv_heads,
                                                     head_dim, ffn_hidden, vocab_size, seq_len)
    unit = "GPU" if device == "cuda" else "device"

    def memory(parallelism, micro, ac, world_size=world, seq=None):
        s = shape if seq is None else ModelShape(n_layers, d_model, n_heads, n_kv_heads, head_dim,
                                                 ffn_hidden, vocab_size, seq, tie_embeddings)
        return memory_per_device(s, micro, parallelism=parallelism, world_size=world_size,
                                 gpus_per_node=gpus_per_node, activation_checkpointing=ac,
                                 grad_accum=np.maximum(1, per_rank // np.maximum(micro, 1)),
                                 device=device)

    def throughput(ac):
        hw = float(hardware_flops_per_token(flops_per_token, n_layers, d_model, n_heads,
                                            n_kv_heads, head_dim, ffn_hidden, vocab_size,
                                            seq_len, ac))
        return world * peak_flops * mfu / hw, hw

    per_rank = global_batch_size // world
    if global_batch_size % world or per_rank < 1:
        frugal = _sharded_option(world)
        mem = memory(frugal, 1, activation_checkpointing is not False)
        tps, hw = throughput(activation_checkpointing is True)
        per_rank = max(per_rank, 1)
        return Layout(
            fits=False, parallelism=frugal, world_size=world, micro_batch_size=1,
            grad_accum=per_rank, activation_checkpointing=activation_checkpointing is True,
            memory=mem.as_dict(), tokens_per_second=tps, hardware_flops_per_token=hw,
            problem=f"the global batch of {global_batch_size} sequences does not split evenly "
                    f"over {world} ranks",
            fix=f"a global batch that is a multiple of {world} sequences")

    if world == 1:
        parallelisms = ["ddp"]
    else:
        parallelisms = ["ddp"] + (["hsdp"] if nodes > 1 and gpus_per_node > 1 else []) + ["fsdp"]
    ac_choices = {"auto": [False, True], True: [True], False: [False]}[activation_checkpointing]
    micro_batches = _divisors(per_rank)

    options = {}
    for ac in ac_choices:
        for par in parallelisms:
            ok = memory(par, micro_batches, ac).total <= capacity
            options[(par, ac)] = int(micro_batches[ok].max()) if ok.any() else 0
        best = max(options[(par, ac)] for par in parallelisms)
        if best == 0:
            continue
        par = next(p for p in parallelisms if options[(p, ac)] == best)
        micro = best
        mem = memory(par, micro, ac)
        tps, hw = throughput(ac)
        reasons = [_parallelism_reason(par, world, gpus_per_node, nodes, micro, mem.parameters)]
        reasons.append(
            f"micro-batch {micro} per rank: the largest divisor of the per-rank batch "
            f"{per_rank} (= {global_batch_size} / {world} ranks) that fits "
            f"({_gib(mem.total)} of {_gib(capacity)} per {unit}); "
            f"gradient accumulation {per_rank // micro}")
        if ac and activation_checkpointing is True:
            reasons.append("activation checkpointing: on, as the spec asks; recomputing each block "
                           "in backward costs one extra forward (~33% more block compute)")
        elif ac:
            reasons.append("activation checkpointing: on, because without it not even micro-batch "
                           "1 fits; recomputing each block in backward costs one extra forward "
                           f"(~33% more block compute), included in the {tps:,.0f} tokens/s")
        elif activation_checkpointing is False:
            reasons.append("activation checkpointing: off, as the spec asks")
        else:
            reasons.append("activation checkpointing: off, not needed to fit (it would cost ~33% "
                           "more block compute)")
        return Layout(fits=True, parallelism=par, world_size=world, micro_batch_size=micro,
                      grad_accum=per_rank // micro, activation_checkpointing=ac,
                      memory=mem.as_dict(), tokens_per_second=tps, hardware_flops_per_token=hw,
                      reasons=tuple(reasons), options=_named(options))

    return _no_fit(shape, world, gpus_per_node, nodes, per_rank, global_batch_size,
                   capacity, activation_checkpointing, memory, throughput, options, unit)


def _named(options):
    return {f"{par}{'+ac' if ac else ''}": micro for (par, ac), micro in options.items()}


def _parallelism_reason(par, world, gpus_per_node, nodes, micro, parameters):
    if world == 1:
        return "one process: no data-parallel wrapper (parallelism is ignored by train.py)"
    if par == "ddp":
        return (f"DDP: the replicated model states ({_gib(4 * parameters)} with gradients and "
                f"AdamW) leave room for micro-batch {micro}, as much as sharding would allow, so "
                "FSDP would only add all-gathers")
    if par == "hsdp":
        return (f"HSDP (hybrid shard): sharded over the {gpus_per_node} GPUs of a node and "
                f"replicated across {nodes} nodes reaches micro-batch {micro}, as full sharding "
                "would, and keeps the all-gathers inside the node")
    return (f"FSDP full shard over {world} GPUs: less sharding fits a smaller micro-batch or "
            "none")


def _no_fit(shape, world, gpus_per_node, nodes, per_rank, global_batch, capacity, ac_setting,
            memory, throughput, options, unit):
    """Nothing fits: describe the most frugal layout, why it fails and the nearest fix."""
    frugal = _sharded_option(world)
    ac = ac_setting is not False
    mem = memory(frugal, 1, ac)
    tps, hw = throughput(ac)
    how = f"micro-batch 1{' with activation checkpointing' if ac else ''}"
    where = f"FSDP full shard over {world} GPUs" if world > 1 else f"one {unit}"
    states = mem.parameters + mem.gradients + mem.optimizer
    problem = (f"even {how} and {where} needs {_gib(mem.total)} per {unit}, more than its "
               f"{_gib(capacity)} (model states {_gib(states)}, activations "
               f"{_gib(mem.activations)}, logits {_gib(mem.logits)}); a smaller micro-batch is "
               "impossible")
    fix, min_gpus, max_seq = "", None, None
    if not ac and memory(frugal, 1, True).total <= capacity:
        fix = "turn on activation checkpointing (training.activation_checkpointing: auto)"
    else:
        # More GPUs: the model states shrink with the shard degree, activations do not. Each
        # world size gets its own accumulation (global batch / world at micro-batch 1).
        worlds = np.arange(world + 1, MAX_GPUS_SEARCHED + 1)
        accum = np.maximum(1, global_batch // worlds)
        device = "cpu" if unit == "device" else "cuda"

        def fewest_gpus(**kw):
            total = memory_per_device(shape, 1, parallelism="fsdp", world_size=worlds,
                                      gpus_per_node=gpus_per_node, activation_checkpointing=ac,
                                      device=device, **kw).total
            ok = total <= capacity
            return int(worlds[ok][0]) if ok.any() else None

        min_gpus = fewest_gpus(grad_accum=accum) if unit == "GPU" else None
        if min_gpus is not None:
            fix = (f"more GPUs: at least {min_gpus} (= {math.ceil(min_gpus / gpus_per_node)} "
                   f"nodes of {gpus_per_node}) with FSDP full shard")
            synced = fewest_gpus(grad_accum=2, unsharded_accumulation=False)
            if memory_module.FSDP_UNSHARDED_ACCUMULATION and synced and synced < min_gpus:
                fix += (f" ({synced} if train.py reduce-scattered gradients after every "
                        "micro-batch instead of accumulating full fp32 gradients on every rank)")
        seq = shape.seq_len // 2
        while seq >= MIN_SEQ_LEN_SUGGESTED:
            if memory(frugal, 1, ac, seq=seq).total <= capacity:
                max_seq = int(seq)
                break
            seq //= 2
        if max_seq is not None:
            fix += ("; or " if fix else "") + (f"shorter sequences: seq_len {max_seq} fits on the "
                                               f"current {world} {unit}(s)")
        if not fix and unit == "device":
            fix = (f"more host RAM: at least {_gib(mem.total * gpus_per_node)} for "
                   f"{gpus_per_node} process(es); or a smaller model (another variant)")
        if not fix:
            fix = ("a smaller model (another variant, or a lower params.max): no number of GPUs "
                   "or sequence length down to "
                   f"{MIN_SEQ_LEN_SUGGESTED} holds this one")
    return Layout(fits=False, parallelism=frugal, world_size=world, micro_batch_size=1,
                  grad_accum=per_rank, activation_checkpointing=ac, memory=mem.as_dict(),
                  tokens_per_second=tps, hardware_flops_per_token=hw,
                  reasons=(f"does not fit: {problem}", f"fix: {fix}"), problem=problem, fix=fix,
                  min_gpus=min_gpus, max_seq_len=max_seq, options=_named(options))
