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
one node and replicates across nodes. We count the gradient at its full size at the peak, which
is exact once gradient accumulation has run one micro-batch (and an upper bound without it, since
zero_grad(set_to_none=True) frees gradients between steps).

Working copies (`working`), which exist only part of the step:
- FSDP2 with MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) all-gathers a bf16 copy of
  the unit it computes and prefetches the next one; in backward it also holds that unit's unsharded
  bf16 gradient and the fp32 copy it reduce-scatters. We assume torchtitan's wrapping (which
  templates' train.py should follow): one FSDP unit per block, one for the embedding, one for the
  final norm + lm_head, the latter kept gathered from its forward to its backward
  (reshard_after_forward=False), because it is used again at once.
- DDP trains fp32 weights under torch.autocast(bf16): autocast caches a bf16 copy of each matmul
  weight, and backward keeps it alive (the matmul saved it), so 2 bytes per matmul parameter live
  from forward to backward. We assume DDP(gradient_as_bucket_view=True): otherwise DDP's buckets
  add another 4 bytes per parameter.
- AdamW (foreach, PyTorch's default on GPU) allocates one temporary the size of its state shard
  (sqrt of the second moment) during step(): 4 bytes per local parameter.

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
With r = c = 2 and h·dh = d this is (12 + 4·kv/h)·d + 8·f (the DESIGN.md rule of thumb) plus
8·d (the fp32 copies the unfused RMSNorm keeps) plus 4·h + 8 (fp32 log-sum-exp and 1/rms).
With activation checkpointing of every block, a layer keeps only its input (r·d, Korthikanti's
2·s·b·h), and backward recomputes one block at a time: one layer's full activations are live again.

Logits and loss (per token, V = vocabulary): model.forward returns the logits in the compute dtype
and the training loop holds them through backward (c·V); cross-entropy upcasts them to fp32 and
saves the fp32 log-softmax (4·V); its backward holds the incoming fp32 gradient (4·V, from nll_loss)
and the outgoing one (4·V) at once. Peak: (c + 12)·V bytes per token, 14·V in bf16; 1.8 MB per
token at V = 128256. DESIGN.md's "~6·V" (bf16 logits + one fp32 copy) is what a fused or compiled
cross-entropy reaches; eager PyTorch peaks higher, and we count eager so that torch.compile can
only make the prediction pessimistic, never optimistic.

The peak is the largest of four moments of the step (loss backward, output-head backward, a block's
backward, optimizer step); each moment's components are reported, so they add up to the total.
On top: ALLOCATOR_MARGIN for the caching allocator's fragmentation and a fixed per-process overhead
(CUDA context, cuBLAS workspace, NCCL buffers; or, on CPU, the Python process with torch loaded).
Tolerance: tests/test_memory.py checks the tracked total against PyTorch's MemTracker/
FSDPMemTracker within 3% on tiny CPU models; torch.compile and fused kernels change the saved
tensors, so on GPU expect the prediction to be an upper bound by up to ~20-30%.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from . import arch

GIB = 1 << 30

# ZeRO's 16 bytes per parameter, split as FSDP2 keeps them (all fp32 and sharded).
MASTER_WEIGHT_BYTES = 4
GRADIENT_BYTES = 4
ADAMW_STATE_BYTES = 8  # exp_avg and exp_avg_sq
ADAMW_TEMP_BYTES = 4  # foreach AdamW's sqrt(exp_avg_sq) temporary, during step()
FP32 = 4
INDEX_BYTES = 8  # int64 token ids: the embedding saves its input, the loss its targets

# Logits and loss peak, per token and vocabulary entry, beyond the compute-dtype logits the loop
# holds: fp32 log-softmax saved + fp32 gradient in + fp32 gradient out (see the module docstring).
LOSS_FP32_COPIES = 3

ALLOCATOR_MARGIN = 0.10  # PyTorch's caching allocator: 5-15% fragmentation in practice
CUDA_CONTEXT_BYTES = int(1.5 * GIB)  # CUDA context (~0.5 GiB), cuBLAS workspace, NCCL buffers
CPU_PROCESS_BYTES = 1 * GIB  # Python with torch imported, on the host

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
                                self.head_dim, self.ffn_hidden, self.vocab_size, self.tie_embeddings)


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per device at the predicted peak; every field has the broadcast shape of the inputs.

    parameters, gradients, optimizer: the (sharded) fp32 model states, 16 bytes per local parameter.
    activations: tensors saved for backward (all layers, the output head's inputs, token ids).
    logits: the logits and cross-entropy tensors live at that moment.
    working: transient copies of weights and gradients (FSDP all-gathers, autocast's bf16 weights,
             unsharded gradients before reduce-scatter, AdamW's temporary).
    margin: allocator fragmentation, ALLOCATOR_MARGIN of the above.
    context: fixed per-process overhead (CUDA context and libraries).
    phase: which moment of the step is the peak ("loss backward", "output head backward",
           "block backward" or "optimizer step").
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
    return arch.layer_matmul_params(d_model, n_heads, n_kv_heads, head_dim, ffn_hidden) + 2 * d_model


def head_params(d_model, vocab_size):
    """Parameters of the output unit: final RMSNorm and lm_head (the embedding's size, if tied)."""
    return vocab_size * d_model + d_model


def norm_bytes_per_token(d_model, residual_bytes):
    """One unfused fp32 RMSNorm: fp32 input, normalised value in the residual dtype, fp32 1/rms."""
    return (FP32 + residual_bytes) * d_model + FP32


def layer_activation_bytes_per_token(d_model, n_heads, n_kv_heads, head_dim, ffn_hidden,
                                     compute_bytes=2, residual_bytes=2):
    """Bytes one block saves for backward per token, without recomputation (module docstring).

    Korthikanti et al. 2022's s·b·h·(34 + 5·a·s/h), adapted to LLaMA-3: RMSNorm, GQA, RoPE, SwiGLU,
    flash/SDPA attention, no dropout.
    """
    c = compute_bytes
    q_width, kv_width = n_heads * head_dim, n_kv_heads * head_dim
    norms = 2 * norm_bytes_per_token(d_model, residual_bytes)
    attention = c * (d_model + q_width + 2 * kv_width + q_width) + FP32 * n_heads
    mlp = c * (d_model + 4 * ffn_hidden)
    return norms + attention + mlp


def rope_bytes_per_position(head_dim, compute_bytes=2):
    """Per layer and sequence position: the cos/sin tables cast to the compute dtype, for q and k.

    The tables are fp32 buffers; the cast makes new tensors (zero in fp32) that the multiplications
    save. They do not grow with the micro-batch.
    """
    return np.where(np.asarray(compute_bytes) == FP32, 0, 4 * head_dim * compute_bytes)


def design_rule_bytes_per_token(d_model, n_heads, n_kv_heads, ffn_hidden):
    """DESIGN.md's rule of thumb for one bf16 layer: (12 + 4·kv/h)·d + 8·f bytes per token."""
    return (12 + 4 * n_kv_heads / n_heads) * d_model + 8 * ffn_hidden


def checkpoint_bytes_per_token(d_model, residual_bytes=2):
    """A checkpointed block keeps only its input (Korthikanti's 2·s·b·h in 16 bits)."""
    return residual_bytes * d_model


def head_activation_bytes_per_token(d_model, compute_bytes=2, residual_bytes=2):
    """Outside the blocks: the final RMSNorm, lm_head's input, the embedding's and loss's token ids."""
    return norm_bytes_per_token(d_model, residual_bytes) + compute_bytes * d_model + 2 * INDEX_BYTES


def loss_bytes_per_token(vocab_size, compute_bytes=2):
    """Logits and cross-entropy at their peak (loss backward): c·V held logits + 3 fp32 copies."""
    return (compute_bytes + LOSS_FP32_COPIES * FP32) * vocab_size


def _dtype_bytes(compute_dtype: str) -> int:
    if compute_dtype not in DTYPE_BYTES:
        raise ValueError(f"compute_dtype must be one of {sorted(DTYPE_BYTES)}, got {compute_dtype!r}")
    return DTYPE_BYTES[compute_dtype]


def default_dtype(device: str) -> str:
    """bf16 on GPUs; fp32 on the CPU pseudo-device (what the generated train.py uses there)."""
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    return "float32" if device == "cpu" else "bfloat16"


def memory_per_device(shape: ModelShape, micro_batch, *, parallelism: str, world_size=1,
                      gpus_per_node=1, activation_checkpointing=False, device: str = "cuda",
                      compute_dtype: str | None = None) -> MemoryBreakdown:
    """Predicted peak bytes on one device for one training step (see the module docstring).

    shape fields, micro_batch, world_size, gpus_per_node and activation_checkpointing may be numpy
    arrays that broadcast together; parallelism, device and compute_dtype are single strings.
    """
    compute_dtype = compute_dtype or default_dtype(device)
    c = _dtype_bytes(compute_dtype)
    sharded = parallelism in ("fsdp", "hsdp")
    shard = shard_degree(parallelism, world_size, gpus_per_node)
    # FSDP2 casts the weights to the compute dtype, so the residual stream is in it too; DDP under
    # autocast (and fp32 training) keeps fp32 weights and an fp32 residual stream.
    r = c if sharded else FP32
    ac = np.asarray(activation_checkpointing, dtype=bool)

    s = shape
    d, h, kv, dh, f, V = s.d_model, s.n_heads, s.n_kv_heads, s.head_dim, s.ffn_hidden, s.vocab_size
    L = np.asarray(s.n_layers, dtype=np.float64)
    seq = np.asarray(s.seq_len, dtype=np.float64)
    tokens = np.asarray(micro_batch, dtype=np.float64) * seq

    params, grads, optim = model_state_bytes(s.n_params(), shard)
    block = np.asarray(block_params(d, h, kv, dh, f), dtype=np.float64)
    head = np.asarray(head_params(d, V), dtype=np.float64)
    block_matmuls = np.asarray(arch.layer_matmul_params(d, h, kv, dh, f), dtype=np.float64)

    full_layer = (layer_activation_bytes_per_token(d, h, kv, dh, f, c, r) * tokens
                  + rope_bytes_per_position(dh, c) * seq)
    kept_layer = np.where(ac, checkpoint_bytes_per_token(d, r) * tokens, full_layer)
    layers_saved = L * kept_layer
    head_saved = head_activation_bytes_per_token(d, c, r) * tokens
    # Backward of a block holds gradients of its activations: the SwiGLU hidden pair and the
    # residual stream (and, when checkpointed, the block's recomputed activations).
    block_workspace = c * (2 * f + 2 * d) * tokens + np.where(ac, full_layer, 0.0)

    if sharded:
        unit_grad = (c + FP32)  # unsharded grad in the compute dtype + its fp32 reduce-scatter copy
        working_loss = 2 * head  # output unit stays gathered from its forward to its backward
        working_head = 2 * head + 2 * block + unit_grad * head  # + next block prefetched
        working_block = 2 * 2 * block + unit_grad * block  # current and prefetched block
    else:
        # autocast's bf16 copies of the matmul weights, saved by forward (none in fp32). With
        # checkpointing only lm_head's copy outlives its forward (and the block being recomputed).
        cast = 0 if c == FP32 else c
        cached = cast * np.where(ac, V * d, L * block_matmuls + V * d)
        working_loss = cached
        working_head = cached + (cast + FP32) * head  # lm_head's grad in bf16, then fp32
        working_block = cached + np.where(ac, cast * block_matmuls, 0.0) + (cast + FP32) * block

    zero = np.zeros_like(tokens)
    # (activations, logits, working) at each moment; the step's peak is the largest sum.
    phases = {
        "loss backward": (layers_saved + head_saved, loss_bytes_per_token(V, c) * tokens,
                          working_loss),
        "output head backward": (layers_saved + head_saved, 2 * c * V * tokens, working_head),
        "block backward": (layers_saved + block_workspace, zero, working_block),
        "optimizer step": (zero, zero, ADAMW_TEMP_BYTES * np.asarray(s.n_params(), np.float64) / shard),
    }
    names = list(phases)
    sums = np.stack(np.broadcast_arrays(*[sum(np.broadcast_arrays(*p)) for p in phases.values()]))
    peak = np.argmax(sums, axis=0)

    def pick(i):
        return np.choose(peak, np.broadcast_arrays(*[p[i] for p in phases.values()]))

    activations, logits, working = pick(0), pick(1), pick(2)
    tracked = params + grads + optim + activations + logits + working
    margin = ALLOCATOR_MARGIN * tracked
    context = np.full_like(tracked, CPU_PROCESS_BYTES if device == "cpu" else CUDA_CONTEXT_BYTES)
    total = tracked + margin + context
    return MemoryBreakdown(
        parameters=_out(params, total), gradients=_out(grads, total), optimizer=_out(optim, total),
        activations=_out(activations, total), logits=_out(logits, total),
        working=_out(working, total), margin=_out(margin, total), context=_out(context, total),
        total=_out(total, total), phase=_out(np.asarray(names, dtype=object)[peak], total))


def tracked_bytes(m: MemoryBreakdown):
    """What PyTorch's memory trackers see: the total without the margin and the fixed overhead."""
    return m.total - m.margin - m.context


def _out(value, like):
    """Broadcast to the result's shape; a 0-d result becomes a Python scalar."""
    value = np.broadcast_to(value, np.shape(like))
    return value.item() if value.ndim == 0 else np.array(value)
