"""Peak memory per device for one training step of a LLaMA-3 shape.

Pure functions that work elementwise on numpy arrays (and on Python numbers), so the solver can
check a million candidate shapes in one call. Everything is in bytes, per device (GPU, or the host
for the `cpu` pseudo-device).

What is counted, and why
------------------------
Model states (ZeRO, Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models", Sec. 3.1): mixed-precision AdamW keeps 16 bytes per parameter: an fp32 master
weight (4), an fp32 gradient (4) and two fp32 Adam moments (8). DDP replicates them on every rank;
FSDP2 full shard divides them by the world size; hybrid shard (HSDP) divides them by the GPUs of
one node and replicates across nodes.

Gradients, as the generated train.py handles them (each moment of the step counts what exists then):
- zero_grad(set_to_none=True) frees them between steps, so the first micro-batch's loss backward
  has none; later micro-batches find the earlier ones' accumulated;
- DDP (world > 1) with gradient_as_bucket_view=True (Recipe.ddp_bucket_view, train.py's
  default): gradients are views into the buckets, no second copy; without it the buckets hold a
  second fp32 gradient, 4·N;
- FSDP2 reduce-scatters after every micro-batch (Recipe.fsdp_reduce_scatter_every_micro_batch,
  train.py's default), so gradients stay sharded; syncing only the last micro-batch
  (set_requires_gradient_sync(False) before) leaves every rank with the full fp32 gradient
  (4·N, unsharded) until then.

Working copies (`working`), which exist only part of the step:
- FSDP2 with MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) all-gathers a bf16 copy of
  the unit it computes and prefetches the next one; in backward it also holds that unit's unsharded
  bf16 gradient and the fp32 copy it reduce-scatters. train.py shards each block and then the root
  (embedding, final norm, lm_head), which FSDP2 keeps gathered from its forward to the end of
  backward; lm_head's bf16 gradient waits there for the root's reduce-scatter.
- DDP and one process train fp32 weights under torch.autocast(bf16): autocast caches a bf16 copy
  of each matmul weight, and backward keeps it alive (the matmul saved it), so 2 bytes per matmul
  parameter live from forward to backward (lm_head's only inside the fused loss's forward).
- train.py's fused AdamW (CUDA and CPU) updates in place and needs no temporary.

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
Models", Sec. 4.1): a GPT layer saves s·b·h·(34 + 5·a·s/h) bytes without recomputation and 2·s·b·h
with full recomputation (s sequence, b micro-batch, h hidden, a heads, 16-bit activations). We adapt
the per-tensor count to the LLaMA-3 block of templates/model.py, per token, in the compute dtype
(c = 2 bytes for bf16) unless stated:
- no dropout: Korthikanti's three dropout masks (attention scores, attention output, MLP output)
  are gone;
- flash / SDPA attention: no T×T scores or softmax (their 5·a·s/h term); the kernel saves q, k, v
  and its output plus an fp32 log-sum-exp per head (4·h bytes). With GQA, k and v have kv_heads
  heads (SDPA's enable_gqa and flash-attn do not expand them);
- RoPE saves no activation, only the cos/sin tables cast to the compute dtype: 4·T·head_dim·c
  bytes per layer and sequence position (zero in fp32), whatever the micro-batch;
- SwiGLU instead of GELU: gate output (SiLU input), SiLU output, up output and their product (the
  down-projection input): 4·f values instead of GELU's 2·4h; plus the shared input of gate/up;
- RMSNorm as templates/model.py writes it (HF/Meta style, unfused, upcast to fp32): it saves the
  fp32 input (4·d), the normalised value in the residual dtype r (r·d) and 1/rms (4). The
  following matmul saves its own input (c·d) as LayerNorm's does in Korthikanti.
  r is the compute dtype under FSDP2 (bf16 weights make a bf16 residual stream) and fp32 under DDP
  with autocast (the fp32 embedding makes the residual stream fp32) and on CPU.
Per layer and token, that is
    2·((4 + r)·d + 4)                     two RMSNorms
  + c·(d + h·dh + 2·kv·dh + h·dh) + 4·h   q/k/v input, q, k, v, attention output (o_proj input), lse
  + c·(d + 4·f)                           MLP input, gate, SiLU(gate), up, product (down input)
With r = c = 2 and h·dh = d this is (12 + 4·kv/h)·d + 8·f (the rule of thumb in docs/DESIGN.md) plus
8·d (the fp32 copies the unfused RMSNorm keeps) plus 4·h + 8 (fp32 log-sum-exp and 1/rms).
With activation checkpointing of every block, a layer keeps only its input (r·d, Korthikanti's
2·s·b·h), and backward recomputes one block at a time: one layer's full activations are live again.
Checkpointing only the first k blocks (train.py's checkpointed_layers; Megatron-LM's
--recompute-method block --recompute-num-layers k) keeps k inputs and L − k full layers: backward
meets the un-checkpointed blocks first, while every earlier layer's tensors are still held, so the
checkpointed ones are best the earliest. Every moment is then affine in k for 1 ≤ k < L, which
evaluate.py uses to find the fewest blocks that fit.

Output head and loss (V = vocabulary, n tokens per micro-batch): templates/model.py fuses lm_head
and cross-entropy (LinearCrossEntropy): its forward walks the tokens in chunks of
Recipe.loss_chunk_tokens (k = min(n, loss_chunk_tokens)), computing each chunk's fp32 logits, loss and
gradients (softmax - one-hot) at once, so no logits are saved. At its last chunk it holds the fp32
logits/softmax (4·V·k), their compute-dtype cast (c·V·k, none in fp32), the gradient of its
input (c·d·n) and an fp32 accumulator for lm_head's gradient (4·V·d; each chunk's c·V·d matmul
result, when c is not fp32, comes after its fp32 logits are freed). Backward scales the two
gradients in place. Eager PyTorch instead keeps
the logits and peaks at (c + 12)·V bytes per token in the loss's backward (logits, the fp32
log-softmax and two fp32 gradients), 1.8 MB a token at V = 128256; the fused head holds
(4 + c)·V per token of one chunk only: 3 GiB at V = 128256 whatever the micro-batch, close to
the "~6·V" bytes per token of docs/DESIGN.md's rule of thumb. Under tensor parallelism t the
head works on the rank's n/t tokens only (split by sequence, templates/parallelize.py), with the
whole lm_head: its inputs, their gradient and its chunks are those of n/t tokens.

The peak is the largest of eight moments of the step (the fused loss's forward, the output head's
backward, the start and the end of the last block's backward, the end of the last checkpointed
block's backward when only some are, the first block's backward, the end of backward, the
optimizer step); the components of the peak moment are reported, so they add up
to the total.
On top: ALLOCATOR_MARGIN for the caching allocator's fragmentation and a fixed per-process overhead
(CUDA context, cuBLAS workspace, NCCL buffers; or, on CPU, the Python process with torch loaded).
Tolerance: tests/test_memory.py compares the total without margin and overhead (tracked_bytes)
with PyTorch's MemTracker / FSDPMemTracker on real CPU steps of templates/model.py: within -3% /
+10% on tiny models (3 layers, d 128, where the transient gradient and workspace terms, bounded
from above here, weigh most) and within 3% at realistic proportions (4 layers, d 1024, vocabulary
32000, FSDP2 over 8 ranks, under FakeTensorMode; measured within 1% on 2026-11-28); TP 2 with
sequence parallelism inside FSDP2 over 4 ranks within the same tiny bounds.
With training.compile the blocks save what torch.compile's partitioner keeps instead
(compiled_layer_activation_bytes_per_token, about 26-30% less than eager; tests/test_memory.py
reads it off the partitioner's backward graph on CPU). Fused GPU kernels beyond that are not
modelled; there the prediction errs high.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np

from . import arch
from .recipe import TRAIN_PY, Recipe

GIB = 1 << 30

# ZeRO's 16 bytes per parameter, split as FSDP2 keeps them (all fp32 and sharded).
MASTER_WEIGHT_BYTES = 4
GRADIENT_BYTES = 4
ADAMW_STATE_BYTES = 8  # exp_avg and exp_avg_sq

FP32 = 4
INDEX_BYTES = 8  # int64 token ids: the embedding saves its input, the loss its targets

ALLOCATOR_MARGIN = 0.10  # PyTorch's caching allocator: 5-15% fragmentation in practice
CUDA_CONTEXT_BYTES = int(1.5 * GIB)  # CUDA context (~0.5 GiB), cuBLAS workspace, NCCL buffers
CPU_PROCESS_BYTES = 1 * GIB  # Python with torch imported, on the host: a bound (a tiny run measured
# 0.41 GB of resident set in all; tests/test_calibrate.py checks the prediction stays above it)

PARALLELISMS = ("ddp", "fsdp", "hsdp")
DEVICES = ("cuda", "cpu")
DTYPE_BYTES = {"bfloat16": 2, "float32": 4}


@dataclass(frozen=True)
class ModelShape:
    """The shape the memory depends on. Fields may be numpy arrays (one entry per candidate)."""

    n_layers: object
    d_model: object
    n_heads: object
    n_kv_heads: object
    head_dim: object
    ffn_hidden: object
    vocab_size: object
    seq_len: object
    tie_embeddings: bool = False

    def n_params(self):
        return arch.param_count(self.n_layers, self.d_model, self.n_heads, self.n_kv_heads,
                                self.head_dim, self.ffn_hidden, self.vocab_size,
                                self.tie_embeddings)


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per device at the predicted peak; every field has the broadcast shape of the inputs.

    parameters, gradients, optimizer: the (sharded) fp32 model states, 16 bytes per local parameter.
    activations: tensors saved for backward (all layers, the output head's inputs, token ids).
    logits: the fused output head and loss's own tensors live at that moment (one chunk's logits,
            the gradient of its input).
    working: transient copies of weights and gradients (FSDP all-gathers, autocast's bf16 weights,
             unsharded gradients before reduce-scatter, lm_head's gradient accumulator).
    margin: allocator fragmentation, ALLOCATOR_MARGIN of the above.
    context: fixed per-process overhead (CUDA context and libraries).
    calibration: what a calibration's measured/predicted peak adds to the total (negative where
                 the run measured less; 0 without one; see calibrated()).
    phase: which moment of the step is the peak ("loss forward", "output head backward",
           "last block backward", "end of last block backward", "end of last checkpointed
           block backward", "first block backward", "end of backward", "optimizer step").
    """

    parameters: np.ndarray
    gradients: np.ndarray
    optimizer: np.ndarray
    activations: np.ndarray
    logits: np.ndarray
    working: np.ndarray
    margin: np.ndarray
    context: np.ndarray
    total: np.ndarray
    phase: np.ndarray
    calibration: object = 0.0  # bytes a measured/predicted ratio adds (calibrated)

    def as_dict(self) -> dict:
        """Plain numbers (or lists) keyed by component; `other` = working + margin + context."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.tolist() if isinstance(value, np.ndarray) else value
        out["other"] = (np.asarray(self.working) + self.margin + self.context).tolist()
        return out


def shard_degree(parallelism: str, world_size, gpus_per_node):
    """Ranks that share one copy of the model states: 1 (DDP), the world (FSDP), a node (HSDP)."""
    world_size = np.asarray(world_size)
    if parallelism == "ddp":
        return np.ones_like(world_size)
    if parallelism == "fsdp":
        return world_size
    if parallelism == "hsdp":
        return np.minimum(gpus_per_node, world_size)
    raise ValueError(f"parallelism must be one of {PARALLELISMS}, got {parallelism!r}")


def model_state_bytes(n_params, shard):
    """(master weights, gradients, AdamW moments) per device: 4, 4 and 8 bytes per local parameter.

    Together ZeRO's 16·N bytes (Rajbhandari et al. 2020), divided by the shard degree.
    """
    local = np.asarray(n_params, dtype=np.float64) / shard
    return MASTER_WEIGHT_BYTES * local, GRADIENT_BYTES * local, ADAMW_STATE_BYTES * local


def block_params(d_model, n_heads, n_kv_heads, head_dim, ffn_hidden):
    """Parameters of one transformer block (one FSDP unit): matmuls and two RMSNorm weights."""
    matmuls = arch.layer_matmul_params(d_model, n_heads, n_kv_heads, head_dim, ffn_hidden)
    return matmuls + 2 * d_model


def head_params(d_model, vocab_size):
    """Parameters of the output unit: final RMSNorm and lm_head (the embedding's size, if tied)."""
    return vocab_size * d_model + d_model


def norm_bytes_per_token(d_model, residual_bytes):
    """One unfused fp32 RMSNorm: fp32 input, normalised value in the residual dtype, fp32 1/rms."""
    return (FP32 + residual_bytes) * d_model + FP32


def layer_activation_bytes_per_token(d_model, n_heads, n_kv_heads, head_dim, ffn_hidden,
                                     compute_bytes=2, residual_bytes=2, tensor_parallel=1,
                                     regather=False):
    """Bytes one block saves for backward per token, without recomputation (module docstring).

    Korthikanti et al. 2022's s·b·h·(34 + 5·a·s/h), adapted to LLaMA-3: RMSNorm, GQA, RoPE, SwiGLU,
    flash/SDPA attention, no dropout. Under tensor and sequence parallelism t (Korthikanti's Sec.
    4.2.2, as templates/parallelize.py does it) a rank keeps 1/t of the heads' and the SwiGLU's
    tensors and normalises 1/t of the tokens; the column-parallel matmuls save their gathered
    input, the whole sequence, or with regather (Megatron-LM's way; Recipe.tensor_parallel_
    regather) the rank's 1/t of it, gathered again in backward. Under autocast (an fp32 residual
    stream, bf16 matmuls) model.py casts each norm's output once (matmul_input), so q, k and v
    (gate and up) share one bf16 copy of their input, as under TP's GatherSequence.
    """
    c, t = compute_bytes, tensor_parallel
    q_width, kv_width = n_heads * head_dim, n_kv_heads * head_dim
    norms = 2 * norm_bytes_per_token(d_model, residual_bytes) / t
    gathered_input = np.where(regather, c * d_model / t, c * d_model)
    attention = gathered_input + (c * (q_width + 2 * kv_width + q_width) + FP32 * n_heads) / t
    mlp = gathered_input + c * 4 * ffn_hidden / t
    return norms + attention + mlp


def compiled_layer_activation_bytes_per_token(d_model, n_heads, n_kv_heads, head_dim, ffn_hidden,
                                              compute_bytes=2, residual_bytes=2,
                                              tensor_parallel=1):
    """Bytes one block saves for backward per token when train.py compiles it (torch.compile's
    min-cut partitioner recomputes the cheap elementwise work instead of saving it; tests/
    test_memory.py counts what the partitioner saves for model.py's Block).

    Saved: the block's input (residual dtype), both norms' outputs (the matmuls' inputs) and
    1/rms, q, k, v, the attention output twice (SDPA's, and o_proj's contiguous input) and the
    log-sum-exp, o_proj's output (to rebuild the residual for the second norm), gate and up and
    their SwiGLU product (SiLU recomputed). Not saved, unlike eager: the norms' fp32 inputs and
    normalised values, SiLU's output. Under tensor and sequence parallelism the same split as
    eager: the norms' outputs gathered whole, the rest 1/t (measured on one rank of TP 2 in the
    same test).
    """
    c, r, t = compute_bytes, residual_bytes, tensor_parallel
    q_width, kv_width = n_heads * head_dim, n_kv_heads * head_dim
    residual = (r * d_model + c * d_model + 2 * FP32) / t  # input, o_proj's output, two 1/rms
    norm_outputs = 2 * c * d_model
    heads = (c * (3 * q_width + 2 * kv_width) + FP32 * n_heads) / t
    return residual + norm_outputs + heads + 3 * c * ffn_hidden / t


def copy_bytes(to_bytes, from_bytes=FP32):
    """Bytes per element that a dtype conversion (`.to()`) allocates: none when the dtype is
    already the target (PyTorch then returns the tensor itself)."""
    return np.where(np.asarray(to_bytes) == from_bytes, 0, to_bytes)


def rope_bytes_per_position(head_dim, compute_bytes=2):
    """Per layer and sequence position: the cos/sin tables cast to the compute dtype, for q and k.

    The tables are fp32 buffers; the cast makes new tensors (zero in fp32) that the multiplications
    save. They do not grow with the micro-batch.
    """
    return 4 * head_dim * copy_bytes(compute_bytes)


def design_rule_bytes_per_token(d_model, n_heads, n_kv_heads, ffn_hidden):
    """docs/DESIGN.md's rule of thumb for one bf16 layer: (12 + 4·kv/h)·d + 8·f bytes per token."""
    return (12 + 4 * n_kv_heads / n_heads) * d_model + 8 * ffn_hidden


def checkpoint_bytes_per_token(d_model, residual_bytes=2):
    """A checkpointed block keeps only its input (Korthikanti's 2·s·b·h in 16 bits)."""
    return residual_bytes * d_model


def head_activation_bytes_per_token(d_model, residual_bytes=2, tensor_parallel=1):
    """Outside the blocks, saved for backward: the final RMSNorm's tensors (on 1/t of the tokens
    under sequence parallelism) and the token ids (the embedding's input, the targets). The fused
    loss saves no activation of its own; it keeps the gradient of its input instead (see
    memory_per_device)."""
    return norm_bytes_per_token(d_model, residual_bytes) / tensor_parallel + 2 * INDEX_BYTES


def loss_chunk_bytes(vocab_size, tokens, compute_bytes=2, chunk_tokens=TRAIN_PY.loss_chunk_tokens):
    """The fused head's logits at its peak: one chunk's fp32 logits and their compute-dtype cast."""
    chunk = np.minimum(tokens, chunk_tokens)
    return chunk * vocab_size * (FP32 + copy_bytes(compute_bytes))


def _dtype_bytes(compute_dtype: str) -> int:
    if compute_dtype not in DTYPE_BYTES:
        raise ValueError(f"compute_dtype must be one of {sorted(DTYPE_BYTES)}, "
                         f"got {compute_dtype!r}")
    return DTYPE_BYTES[compute_dtype]


def default_dtype(device: str) -> str:
    """bf16 on GPUs; fp32 on the CPU pseudo-device (what the generated train.py uses there)."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    return "float32" if device == "cpu" else "bfloat16"


@dataclass(frozen=True)
class Moment:
    """What is live at one moment of the step besides the weights and AdamW moments, in bytes
    per device (arrays broadcast over the candidates)."""

    gradients: object
    activations: object
    logits: object
    working: object

    def total(self):
        return self.gradients + self.activations + self.logits + self.working


def memory_per_device(shape: ModelShape, micro_batch, *, parallelism: str, world_size=1,
                      gpus_per_node=1, activation_checkpointing=False, grad_accum=1,
                      device: str = "cuda", compute_dtype: str | None = None,
                      recipe: Recipe = TRAIN_PY, tensor_parallel=1,
                      compiled=False) -> MemoryBreakdown:
    """Predicted peak bytes on one device for one training step (see the module docstring).

    shape fields, micro_batch, world_size, gpus_per_node, activation_checkpointing and grad_accum
    may be numpy arrays that broadcast together; parallelism, device and compute_dtype are strings.
    activation_checkpointing: True (every block), False (none), or integers: the number of leading
    blocks that recompute (checkpointed_blocks).
    With world_size 1 the generated train.py wraps nothing (one process, autocast): pass "ddp".
    tensor_parallel t: consecutive ranks (inside a node) that split each block's matmuls
    (templates/parallelize.py); data parallelism runs over world_size / t ranks, "ddp" only
    where that is 1 (no data-parallel wrapper then). compiled: train.py compiles each block
    (training.compile), which saves fewer activations (compiled_layer_activation_bytes_per_token).
    recipe: what train.py and model.py do (compiler/recipe.py); the generated defaults unless
    given.
    """
    moments, params, optim = _step_moments(
        shape, micro_batch, parallelism, world_size, gpus_per_node, activation_checkpointing,
        grad_accum, device, compute_dtype, recipe, tensor_parallel, compiled)
    return _at_peak(moments, params, optim, device)


def moment_bytes(shape: ModelShape, micro_batch, *, parallelism: str, world_size=1,
                 gpus_per_node=1, activation_checkpointing=False, grad_accum=1,
                 device: str = "cuda", compute_dtype: str | None = None,
                 recipe: Recipe = TRAIN_PY, tensor_parallel=1, compiled=False) -> np.ndarray:
    """The total each of the eight moments would be, were it the peak, stacked on a leading axis:
    their maximum is memory_per_device(...).total, summed in the same order, without picking every
    component at the peak (what the layout search screens with). Each is affine in the
    checkpointed blocks k for 1 ≤ k < L."""
    moments, params, optim = _step_moments(
        shape, micro_batch, parallelism, world_size, gpus_per_node, activation_checkpointing,
        grad_accum, device, compute_dtype, recipe, tensor_parallel, compiled)
    tracked = np.stack(np.broadcast_arrays(
        *[params + m.gradients + optim + m.activations + m.logits + m.working
          for m in moments.values()]))
    context = CPU_PROCESS_BYTES if device == "cpu" else CUDA_CONTEXT_BYTES
    return tracked + ALLOCATOR_MARGIN * tracked + context


def _step_moments(shape, micro_batch, parallelism, world_size, gpus_per_node,
                  activation_checkpointing, grad_accum, device, compute_dtype, recipe,
                  tensor_parallel, compiled):
    """(the eight moments, master weights, AdamW moments) of memory_per_device's step."""
    c = _dtype_bytes(compute_dtype or default_dtype(device))
    t = np.asarray(tensor_parallel)
    data_world = np.asarray(world_size) // t
    sharded = parallelism in ("fsdp", "hsdp")
    shard = shard_degree(parallelism, data_world, np.maximum(gpus_per_node // t, 1))
    units = _units(shape, t)
    # A rank of a tensor group holds 1/t of every block's matmuls, all else whole.
    n_params = np.asarray(shape.n_params(), dtype=np.float64) - (
        np.asarray(shape.n_layers) * units.block_matmuls * (t - 1))
    params, grads, optim = model_state_bytes(n_params, shard)
    gradients = _gradient_moments(parallelism, grads, n_params, shard, units, grad_accum,
                                  data_world, recipe)
    moments = _moments(shape, units, gradients, micro_batch, c, sharded,
                       checkpointed_blocks(activation_checkpointing, shape.n_layers),
                       np.asarray(grad_accum) > 1, recipe, t, compiled)
    return moments, params, optim


def checkpointed_blocks(activation_checkpointing, n_layers) -> np.ndarray:
    """How many blocks recompute their forward in backward, as floats: True means every block,
    False none, an integer the first k (at most n_layers)."""
    ac = np.asarray(activation_checkpointing)
    layers = np.asarray(n_layers, dtype=np.float64)
    if ac.dtype == bool:
        return np.where(ac, layers, 0.0)
    return np.minimum(ac.astype(np.float64), layers)


@dataclass(frozen=True)
class _Units:
    """Parameters of the units FSDP2 gathers one at a time, on one rank of a tensor group (as
    floats, broadcast over shapes)."""

    block: np.ndarray  # one transformer block, its share of the matmuls and the whole norms
    block_matmuls: np.ndarray  # its share of the matmul weights only (what autocast copies)
    head: np.ndarray  # lm_head
    root: np.ndarray  # embedding, final norm and lm_head (the embedding's matrix once if tied)


def _units(s: ModelShape, tensor_parallel=1) -> _Units:
    d, h, kv, dh, f, V = s.d_model, s.n_heads, s.n_kv_heads, s.head_dim, s.ffn_hidden, s.vocab_size
    as_float = lambda x: np.asarray(x, dtype=np.float64)
    matmuls = as_float(arch.layer_matmul_params(d, h, kv, dh, f)) / tensor_parallel
    return _Units(block=matmuls + 2 * as_float(d), block_matmuls=matmuls,
                  head=as_float(V * d),
                  root=as_float(arch.embedding_params(d, V, s.tie_embeddings) + d))


def _gradient_moments(parallelism, grads, n_params, shard, units, grad_accum, world_size, recipe):
    """Gradients live at each moment, beyond those the moment itself produces:
    {"accumulated": during the loss and the output head (none on the first micro-batch:
    zero_grad(set_to_none=True) freed them; the earlier micro-batches' otherwise), "late": once
    backward has produced them all, "step": at optimizer.step() (the reduced gradient)}."""
    accumulating = np.asarray(grad_accum) > 1
    if parallelism != "ddp" and not recipe.fsdp_reduce_scatter_every_micro_batch:
        # No reduce-scatter between micro-batches: every rank accumulates the full fp32 gradient,
        # reduced into its shard only after the last micro-batch.
        accumulated = np.where(accumulating, GRADIENT_BYTES * n_params, 0.0)
        late = np.where(accumulating, GRADIENT_BYTES * n_params, grads)
    else:
        accumulated, late = np.where(accumulating, grads, 0.0), grads
    step = grads
    if parallelism == "ddp":  # DDP's gradient buckets: a second fp32 gradient (no bucket view)
        second_copy = not recipe.ddp_bucket_view
        buckets = np.where((np.asarray(world_size) > 1) & second_copy, GRADIENT_BYTES * n_params, 0.0)
        accumulated, late, step = accumulated + buckets, late + buckets, grads + buckets
    return {"accumulated": accumulated, "late": late, "step": step, "shard": shard}


def _working_copies(sharded, c, k, accumulating, n_layers, u: _Units):
    """Transient copies of weights and gradients at each moment (module docstring); k blocks
    (the first) checkpointed."""
    cast = copy_bytes(c)  # autocast's bf16 copy of an fp32 tensor
    if sharded:
        # The root unit (embedding, final norm, lm_head) stays gathered from its forward to the end
        # of backward; the last block is gathered again (prefetched) as backward starts; in a
        # block's backward the next one is prefetched; a unit's unsharded grads come in the compute
        # dtype and are copied to fp32 for the reduce-scatter.
        gathered = c * u.root + c * u.block
        # A block's backward starts with the next block prefetched; it ends with its own
        # unsharded gradients, in bf16 and copied to fp32 for the reduce-scatter.
        block_start = gathered + c * u.head + c * u.block
        # lm_head's gradient: an fp32 accumulator, then the bf16 gradient handed to FSDP (its
        # copy to fp32 comes at the root's reduce-scatter, at the end of backward).
        return {"loss": gathered + FP32 * u.head, "head": gathered + (FP32 + cast) * u.head,
                "block_start": block_start, "block_end": block_start + (c + FP32) * u.block,
                "root": c * u.root + (c + FP32) * u.root}
    # autocast's bf16 copies of the block weights, saved by forward (none in fp32, none kept
    # with checkpointing but the block being recomputed). lm_head's copy lives only inside the
    # fused loss's forward, beside the fp32 gradient accumulator (and a bf16 matmul result per
    # chunk); in fp32 the accumulator is the gradient backward returns.
    cached = cast * (n_layers - k) * u.block_matmuls
    # A block's backward ends with its weight gradients: in bf16 under autocast, then fp32;
    # the fp32 one becomes .grad (counted in gradients) unless it is added to an earlier one.
    # The last block, when checkpointed too, makes its copy again as it recomputes.
    block_start = cached + np.where(k >= n_layers, cast * u.block_matmuls, 0.0)
    return {"loss": cached + (cast + FP32) * u.head, "head": cached + FP32 * u.head,
            "block_start": block_start,
            "block_end": block_start + cast * u.block + np.where(accumulating, FP32 * u.block, 0.0),
            "root": FP32 * u.root}  # the embedding's fp32 gradient


class _Saved(NamedTuple):
    """What one block keeps for backward and what its backward adds, in bytes per rank of a
    micro-batch (per candidate)."""

    full_layer: np.ndarray  # a block that is not checkpointed
    recomputed_layer: np.ndarray  # a checkpointed block's, once its forward is recomputed
    checkpointed_layer: np.ndarray  # a checkpointed block's input
    gradients: np.ndarray  # of its SwiGLU hidden pair and residual, during its backward
    regather: np.ndarray  # bool: TP eager blocks keep the gathered input as 1/t and gather again


def _saved_per_block(s: ModelShape, tokens, c, r, t, compiled, recipe) -> _Saved:
    d, h, kv, dh, f = s.d_model, s.n_heads, s.n_kv_heads, s.head_dim, s.ffn_hidden
    rope = rope_bytes_per_position(dh, c) * np.asarray(s.seq_len, dtype=np.float64)
    # TP's gathered inputs kept as 1/t (GatherSequence): eager blocks that are not checkpointed;
    # a recomputed block's forward keeps them whole.
    regather = recipe.regathers(compiled) & (np.asarray(t) > 1)
    if compiled:
        full_layer = recomputed_layer = (
            compiled_layer_activation_bytes_per_token(d, h, kv, dh, f, c, r, t) * tokens + rope)
    else:
        full_layer = (layer_activation_bytes_per_token(d, h, kv, dh, f, c, r, t, regather)
                      * tokens + rope)
        recomputed_layer = layer_activation_bytes_per_token(d, h, kv, dh, f, c, r, t) * tokens + rope
    # Backward of a block: the other layers' saved tensors, this layer's full activations (its own,
    # or recomputed when checkpointed) and the gradients of its SwiGLU hidden pair and residual.
    # (under sequence parallelism: the hidden pair's 1/t, the gathered input's gradient whole
    # before its reduce-scatter, the residual's 1/t; with regather, the input gathered again)
    return _Saved(full_layer=full_layer, recomputed_layer=recomputed_layer,
                  # Under sequence parallelism the residual stream, the final norm and a block's
                  # input are split t ways; the token ids are not.
                  checkpointed_layer=checkpoint_bytes_per_token(d, r) / t * tokens,
                  gradients=c * (2 * f / t + d + d / t) * tokens, regather=regather)


def _block_gradients(u: _Units, g: dict, sharded, k, accumulating) -> dict:
    """Gradients present in the blocks' backward, beyond earlier micro-batches': {"last start",
    "last end", "first start", "last checkpointed end"}."""
    # lm_head's (DDP; FSDP keeps the root's unsharded until the end of backward, under working)
    # and, at the end of the last block's backward, the block's.
    accumulated, late, shard = g["accumulated"], g["late"], g["shard"]
    new_head = 0.0 if sharded else GRADIENT_BYTES * u.head
    # As the first block's backward starts, every gradient but its own and the embedding's (and,
    # under FSDP, the root unit's) is there; as the last checkpointed one (k − 1) ends, every
    # gradient but those of the k − 1 below it and the root's.
    root = u.root if sharded else u.root - u.head
    return {
        "last start": np.where(accumulating, late, accumulated + new_head),
        "last end": np.where(accumulating, late,
                             accumulated + new_head + GRADIENT_BYTES * u.block / shard),
        "first start": np.where(accumulating, late,
                                late - GRADIENT_BYTES * (u.block + root) / shard),
        "last checkpointed end": np.where(accumulating, late,
                                          late - GRADIENT_BYTES * ((k - 1) * u.block + root)
                                          / shard)}


def _moments(s: ModelShape, u: _Units, g: dict, micro_batch, c, sharded, k, accumulating, recipe,
             t=1, compiled=False):
    """{name: Moment} for the eight moments of the step whose largest total is the peak; the
    first k blocks checkpointed."""
    # FSDP2 casts the weights to the compute dtype, so the residual stream is in it too; DDP under
    # autocast (and fp32 training) keeps fp32 weights and an fp32 residual stream.
    r = c if sharded else FP32
    d, V = s.d_model, s.vocab_size
    L = np.asarray(s.n_layers, dtype=np.float64)
    tokens = np.asarray(micro_batch, dtype=np.float64) * np.asarray(s.seq_len, dtype=np.float64)
    b = _saved_per_block(s, tokens, c, r, t, compiled, recipe)
    every = k >= L
    layers_saved = k * b.checkpointed_layer + (L - k) * b.full_layer
    # What the layers below the last one keep: it is checkpointed only when all are.
    below_last = np.minimum(k, L - 1)
    others = below_last * b.checkpointed_layer + (L - 1 - below_last) * b.full_layer
    head_saved = head_activation_bytes_per_token(d, r, t) * tokens
    # The fused head + loss (templates/model.py's LinearCrossEntropy): in its forward, its input
    # (the final norm's output, residual dtype; plus autocast's copy) and the gradient of that input
    # (compute dtype) are live besides one chunk's logits; in its backward, only that gradient.
    head_tokens = tokens / t  # the rank's slice of the sequence
    loss_inputs = (r + copy_bytes(c, r)) * d * head_tokens
    grad_head_input = c * d * head_tokens
    loss_logits = loss_chunk_bytes(V, head_tokens, c, recipe.loss_chunk_tokens)
    recomputed_first = b.recomputed_layer + b.gradients
    block_first = np.where(every, recomputed_first,
                           b.full_layer + b.gradients + b.regather * c * d * tokens)
    working = _working_copies(sharded, c, k, accumulating, L, u)
    grads = _block_gradients(u, g, sharded, k, accumulating)
    # Autograd frees a block's saved tensors as its backward consumes them; tensors recomputed
    # under activation checkpointing were measured to stay until the block's backward ends
    # (otherwise only the residual's gradient is left).
    block_end = np.where(every, recomputed_first, c * d / t * tokens)
    zero = np.zeros_like(tokens)
    # With only the first k blocks checkpointed, block k − 1 ends its backward with its
    # recomputed tensors still live, over the k − 1 inputs below it, the gradients of the blocks
    # above, and the working copies of a checkpointed block (measured: tests/test_memory.py).
    partly = (k >= 1) & ~every
    working_ck = _working_copies(sharded, c, L, accumulating, L, u)["block_end"]
    last_checkpointed = Moment(
        np.where(partly, grads["last checkpointed end"], 0.0),
        np.where(partly, (k - 1) * b.checkpointed_layer + recomputed_first, 0.0),
        zero, np.where(partly, working_ck, 0.0))
    return {
        "loss forward": Moment(g["accumulated"], layers_saved + head_saved + loss_inputs,
                               loss_logits + grad_head_input, working["loss"]),
        # backward hands the input's gradient back in the input's dtype: under autocast, an fp32
        # copy of the bf16 one
        "output head backward": Moment(g["accumulated"],
                                       layers_saved + head_saved + grad_head_input,
                                       copy_bytes(r, c) * d * head_tokens, working["head"]),
        "last block backward": Moment(grads["last start"], others + block_first, zero,
                                      working["block_start"]),
        "end of last block backward": Moment(grads["last end"], others + block_end,
                                             zero, working["block_end"]),
        "end of last checkpointed block backward": last_checkpointed,
        "first block backward": Moment(grads["first start"], block_first, zero,
                                       working["block_start"]),
        "end of backward": Moment(g["late"], zero, zero, working["root"]),
        # train.py's fused AdamW (CUDA and CPU) updates in place, without temporaries
        "optimizer step": Moment(g["step"], zero, zero, zero),
    }


def _at_peak(moments: dict, params, optim, device) -> MemoryBreakdown:
    """The breakdown at the moment with the largest total (per candidate)."""
    names = list(moments)
    totals = np.stack(np.broadcast_arrays(*[m.total() for m in moments.values()]))
    peak = np.argmax(totals, axis=0)

    def pick(part):
        return np.choose(peak, np.broadcast_arrays(*[getattr(m, part) for m in moments.values()]))

    grads, activations, logits, working = (pick(p) for p in ("gradients", "activations",
                                                               "logits", "working"))
    tracked = params + grads + optim + activations + logits + working
    margin = ALLOCATOR_MARGIN * tracked
    context = np.full_like(tracked, CPU_PROCESS_BYTES if device == "cpu" else CUDA_CONTEXT_BYTES)
    total = tracked + margin + context
    return MemoryBreakdown(
        parameters=_out(params, total), gradients=_out(grads, total), optimizer=_out(optim, total),
        activations=_out(activations, total), logits=_out(logits, total),
        working=_out(working, total), margin=_out(margin, total), context=_out(context, total),
        total=_out(total, total), phase=_out(np.asarray(names, dtype=object)[peak], total))


def calibrated(m: MemoryBreakdown, ratio: float, device: str) -> MemoryBreakdown:
    """The breakdown with the predicted total scaled by a run's measured/predicted peak
    (compiler/calibrate.py), the difference booked as `calibration` so the parts still add up.
    On CUDA the context is left out of the scaling: the measurement (the caching allocator's
    reserved bytes) does not see it."""
    total = calibrated_total(np.asarray(m.total), ratio, device)
    return dataclasses.replace(m, total=_out(total, total),
                               calibration=_out(total - np.asarray(m.total), total))


def calibrated_total(total, ratio: float, device: str):
    """A predicted total scaled by a measured/predicted ratio, the CUDA context left out."""
    kept = CUDA_CONTEXT_BYTES if device == "cuda" else 0.0
    return kept + (total - kept) * ratio


def tracked_bytes(m: MemoryBreakdown):
    """What PyTorch's memory trackers see: the total without the margin and the fixed overhead."""
    return m.total - m.margin - m.context


def _out(value, like):
    """Broadcast to the result's shape; a 0-d result becomes a Python scalar."""
    value = np.broadcast_to(value, np.shape(like))
    return value.item() if value.ndim == 0 else np.array(value)
