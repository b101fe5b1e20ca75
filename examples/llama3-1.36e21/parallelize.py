"""How train.py spreads the model over the ranks: tensor parallelism, DDP or FSDP2, their meshes.

As torchtitan's parallelize.py: train.py builds the plain model and calls parallelize(); nothing
else in the training loop depends on the layout.

- Tensor parallelism (tensor_parallel = t > 1; Megatron-LM, Shoeybi et al. 2019, through
  PyTorch's DTensor `parallelize_module`): inside each block q/k/v and gate/up are split by
  output columns and o/down by input rows, so each of the t ranks of a tensor group holds 1/t of
  the block's heads and of its SwiGLU width. With sequence parallelism (Korthikanti et al. 2022,
  Sec. 4.2.2) the residual stream between the matmuls is split by sequence position: each rank
  keeps and normalises 1/t of the tokens, an all-gather brings the whole sequence to the
  attention and the MLP (GatherSequence; backward gathers it again rather than keep it), and
  o/down reduce-scatter their partial sums back into the rank's tokens; that moves as many
  bytes as the plain two all-reduces per block, and the norms' activations shrink t-fold. The
  two ends stay split by sequence too: each rank embeds only its own tokens, and the fused
  output head + loss (model.py's sequence_parallel_cross_entropy) scores them against the
  whole vocabulary, so every softmax lies on one rank and the head's work is split t ways, not
  repeated. Their weights are replicated in the group; each rank's gradient of them is its
  tokens' share, summed over the group (grad_norm_and_clip). Tensor groups are consecutive
  ranks, i.e. inside a node.
- Data parallelism over the world / t groups: DDP (replicated), FSDP2 full shard, or HSDP
  (shard inside a node, replicate across nodes), composed with TP on a 2-D mesh (data × tensor).
"""

import math
import os

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle,
                                               PrepareModuleInputOutput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)


def tensor_parallel_plan(regather=True):
    """The block's modules and how each is split (names as in model.py); the residual stream
    enters and leaves a block split by sequence (Shard(1)), whole (Replicate) inside: the
    attention and the MLP gather their input's sequence (GatherSequence)."""
    return {"input_layernorm": SequenceParallel(),
            "self_attn": GatherSequence(regather),  # of (x, cos, sin), x
            "self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
            "post_attention_layernorm": SequenceParallel(),
            "mlp": GatherSequence(regather),
            "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1))}


class GatherSequence(ParallelStyle):
    """Before the module runs, all-gather its first input's sequence (Shard(1) to Replicate).

    With regather (Megatron-LM's sequence parallelism, Korthikanti et al. 2022, Sec. 4.2.2),
    the column-parallel matmuls that read the whole sequence keep only the rank's slice of it
    for backward and gather it again there: 1/t of the input's bytes saved instead of all of
    it, for one more all-gather in backward. Without it (PyTorch's PrepareModuleInput does
    this) autograd keeps the gathered input itself. The choice is the recipe's
    tensor_parallel_regather (llama3gen's compiler/recipe.py), for blocks that are neither
    checkpointed (their forward is recomputed anyway) nor compiled (torch.compile's partitioner
    decides what it saves, and does not take saved-tensor hooks)."""

    def __init__(self, regather):
        super().__init__()
        self.regather = regather

    def _apply(self, module, device_mesh):
        saving = []  # the hooks of the forward in progress

        def gather(module, args):
            part, *rest = args
            device = part.device.type
            if torch.is_autocast_enabled(device):  # gather what the matmuls read, cast once
                part = part.to(torch.get_autocast_dtype(device))
            whole = part.redistribute(device_mesh, [Replicate()])
            if self.regather and torch.is_grad_enabled():
                saving.append(torch.autograd.graph.saved_tensors_hooks(
                    *_regather_hooks(part, whole)))
                saving[-1].__enter__()
            return (whole, *rest)

        def done(module, args, output):
            if saving:
                saving.pop().__exit__(None, None, None)

        module.register_forward_pre_hook(gather)
        module.register_forward_hook(done, always_call=True)
        return module


def _regather_hooks(part, whole):
    """(pack, unpack) for saved_tensors_hooks: a saved tensor that is `whole` or a view of it
    (the matmuls save a flattened view) is kept as `part` plus the view's geometry and rebuilt
    in backward by one all-gather, shared by the module's matmuls; any other is kept as is.
    `whole` lives as long as the module's forward, so its storage identifies it there."""
    with torch.no_grad():
        storage = whole.to_local().untyped_storage().data_ptr()
    kept, regathered = part.detach(), []

    def pack(tensor):
        if not isinstance(tensor, DTensor):
            return tensor
        with torch.no_grad():
            local = tensor.to_local()
        if local.untyped_storage().data_ptr() != storage:
            return tensor
        return local.size(), local.stride(), local.storage_offset()

    def unpack(packed):
        if not isinstance(packed, tuple):
            return packed
        with torch.no_grad():
            if not regathered:
                regathered.append(kept.redistribute(kept.device_mesh, [Replicate()]).to_local())
            view = regathered[0].as_strided(*packed)
            return DTensor.from_local(view, kept.device_mesh, [Replicate()], run_check=False)

    return pack, unpack


def backbone_plan():
    """Around the blocks: the embedding looks up only the rank's slice of the sequence (its input
    sliced, no communication) and hands the blocks a plain local tensor; the final norm works on
    the rank's tokens and leaves them a DTensor split by sequence, which tells model.py to score
    them with sequence_parallel_cross_entropy."""
    return {"embed_tokens": PrepareModuleInputOutput(
                input_layouts=Replicate(), desired_input_layouts=Shard(1),
                output_layouts=Shard(1), desired_output_layouts=Shard(1)),
            "norm": SequenceParallel()}


def apply_tensor_parallel(model, tp_mesh, regather=True):
    """Split every block (inside the activation-checkpointing wrapper, if any) and the backbone's
    ends over the tensor group; the embedding and lm_head weights become replicated DTensors, so
    that autograd marks their per-rank gradients as partial sums. regather: GatherSequence's, for
    the blocks not checkpointed (pass False when the blocks are compiled)."""
    for block in model.model.layers:
        inner = getattr(block, "_checkpoint_wrapped_module", block)
        parallelize_module(inner, tp_mesh, tensor_parallel_plan(regather and inner is block))
    parallelize_module(model.model, tp_mesh, backbone_plan())
    distribute_module(model.model.embed_tokens, tp_mesh)  # replicates its weight
    if model.args.tie_embeddings:  # distribute_module made a new Parameter: tie it again
        model.lm_head.weight = model.model.embed_tokens.weight
    else:
        distribute_module(model.lm_head, tp_mesh)


def check_tensor_parallel(cfg, world):
    """Why tensor_parallel cannot split this model over these ranks, or None."""
    t = cfg.tensor_parallel
    if world % t:
        return f"tensor_parallel={t} does not divide the world size {world}"
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if t > 1 and per_node % t:
        return f"tensor_parallel={t} does not divide the {per_node} ranks of a node"
    for key in ("n_head", "n_kv_head", "ffn_hidden", "block_size"):  # block_size: sequence parallel
        if cfg[key] % t:
            return f"tensor_parallel={t} does not divide {key}={cfg[key]}"
    if t > 1 and world > t and cfg.parallelism == "ddp":
        return (f"tensor_parallel={t} over {world} ranks composes with parallelism='fsdp' or "
                "'hsdp', not 'ddp'")
    return None


def parallelize(model, cfg, dev, world):
    """Apply TP, then DDP or FSDP2, as cfg says. Returns (model, sharded, fsdp): sharded when the
    parameters are DTensors (FSDP2 or TP), which checkpoint.py then saves with DCP; fsdp when
    FSDP2 wraps it (its MixedPrecisionPolicy then does bf16, not autocast)."""
    t = cfg.tensor_parallel
    data_parallel = world // t
    mesh = None
    if t > 1 or (data_parallel > 1 and cfg.parallelism in ("fsdp", "hsdp")):
        mesh = _mesh(dev, data_parallel, t, cfg.parallelism)
    if t > 1:
        apply_tensor_parallel(model, mesh["tp"],
                              regather=cfg.tensor_parallel_regather and not cfg.compile)
    sharded = t > 1
    if data_parallel > 1 and cfg.parallelism == "ddp":  # t == 1 (check_tensor_parallel)
        from torch.nn.parallel import DistributedDataParallel as DDP
        # gradient_as_bucket_view: gradients live in DDP's buckets, not in a second fp32 copy.
        model = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None,
                    gradient_as_bucket_view=cfg.ddp_bucket_view)
    elif data_parallel > 1:
        _fully_shard(model, cfg, dev, mesh)
        return model, True, True
    return model, sharded, False


def _mesh(dev, data_parallel, t, parallelism):
    """The device mesh: (data,), (data, tp), or for HSDP (replicate, shard[, tp])."""
    from torch.distributed.device_mesh import init_device_mesh
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", data_parallel * t)) // t
    if parallelism == "hsdp" and data_parallel > per_node:
        shape, names = (data_parallel // per_node, per_node), ("replicate", "shard")
    else:
        shape, names = (data_parallel,), ("dp",)
    return init_device_mesh(dev.type, shape + (t,), mesh_dim_names=names + ("tp",))


def _fully_shard(model, cfg, dev, mesh):
    """FSDP2 over the data-parallel dimensions of the mesh, block by block, then the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    names = [n for n in mesh.mesh_dim_names if n != "tp"]
    data_mesh = mesh[tuple(names)] if len(names) > 1 else mesh[names[0]]
    kwargs = {"mesh": data_mesh}
    if dev.type == "cuda" and cfg.dtype == "bfloat16":  # bf16 compute, fp32 gradient reduction
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                   reduce_dtype=torch.float32)
    for block in model.model.layers:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)


def grad_norm_and_clip(model, max_norm):
    """The gradient norm over all ranks, then clipping to max_norm when > 0; every layout.

    Gradients are plain tensors (one process; DDP, where every rank holds the same averaged
    gradient), FSDP2 shards, TP shards or both. Each rank sums the squares of its local pieces,
    grouped by the mesh dimensions a gradient is split along; each group's sum is reduced once
    over those dimensions, never over one it is replicated on (that would count it twice)."""
    sums = {}  # (mesh, the dimensions a gradient is split along) -> local sum of squares
    for p in model.parameters():
        if p.grad is None:
            continue
        g = p.grad
        if isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements):
            # a replicated weight applied to sequence-split tokens (the norms, the embedding
            # and lm_head): each rank holds its tokens' part of the gradient; sum them now, so
            # the norm, the clipping and AdamW see the whole gradient
            g = p.grad = g.redistribute(g.device_mesh, [Replicate() if pl.is_partial() else pl
                                                        for pl in g.placements])
        if isinstance(g, DTensor):  # Shard, or FSDP's _StridedShard under TP: split
            key = (g.device_mesh, tuple(dim for dim, pl in enumerate(g.placements)
                                        if not pl.is_replicate()))
            g = g.to_local()
        else:
            key = (None, ())
        square = g.float().pow(2).sum()
        sums[key] = sums[key] + square if key in sums else square
    total = 0.0
    for (mesh, dims), square in sums.items():
        for dim in dims:
            torch.distributed.all_reduce(square, group=mesh.get_group(dim))
        total += square.item()
    norm = math.sqrt(total)
    if max_norm > 0 and norm > max_norm:
        coef = max_norm / (norm + 1e-6)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(coef)
    return norm
