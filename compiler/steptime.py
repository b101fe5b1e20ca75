"""The time of one optimizer step: compute, plus the communication that does not hide behind it.

Vectorised over candidates. Per rank and optimizer step of `accum` micro-batches:

compute   hardware FLOPs of the rank's tokens at the GPU's kernel efficiency (the fraction of the
          dense peak its matmuls and attention reach when nothing waits on the network;
          hardware.KERNEL_EFFICIENCY says where each figure comes from). Backward is 2/3 of the
          exact FLOPs, plus the recomputed forward under activation checkpointing.
collectives, ring algorithm (NCCL's for large messages): over n ranks at per-GPU bandwidth B,
          all-gather and reduce-scatter of S bytes take S·(n−1)/n / B and all-reduce twice that
          (Thakur et al. 2005; the JAX scaling book's "All-gather / reduce-scatter cost"). B is the
          tier the group crosses: NVLink/PCIe when it lies inside a node, the node's fabric per
          GPU when it spans nodes, times COLLECTIVE_EFFICIENCY.
DDP       one all-reduce of the fp32 gradients (4·N bytes) per step (train.py skips it on all but
          the last micro-batch); its buckets overlap with that micro-batch's backward: exposed is
          what exceeds it.
FSDP2     per micro-batch, all-gathers of the bf16 weights (2·N) for forward and again for
          backward (reshard after forward), and a reduce-scatter of fp32 gradients (4·N); once
          per step when the recipe syncs only the last micro-batch. Block i+1's all-gather is
          prefetched behind block i (Ultra-Scale Playbook, "ZeRO-3 overlap"): forward's gathers
          hide behind forward compute, backward's gathers and reduce-scatters behind backward;
          what exceeds the compute is exposed, and so is the first unit, which nothing precedes
          (the root unit: embedding and lm_head, large at a 128k vocabulary).
HSDP      the same within a node (n = GPUs per node), plus an all-reduce across the nodes of each
          rank's gradient shard (4·N / GPUs per node) per micro-batch, behind backward as well.
TP        tensor parallelism over t consecutive ranks of a node (Megatron-LM, Shoeybi et al. 2019,
          Sec. 3): each rank computes 1/t of every block (its heads, its share of the SwiGLU
          width) and, with the residual stream split by sequence (Korthikanti et al. 2022), the
          embedding and the output head and loss for its own 1/t of the tokens; their replicated
          weights' gradients are summed over the group once per step (V·d fp32 values over the
          data shards, not modelled: a few ms on NVLink). A block costs two all-reduces of its
          activations (tokens · d in the compute dtype) in forward (after o_proj and down_proj)
          and two in backward (the gradients of the attention's and the MLP's inputs), two more
          in each block whose forward activation checkpointing recomputes, and in the others,
          with the recipe's tensor_parallel_regather (Megatron-LM's memory saving), one more: the
          two inputs gathered again in backward. They sit on the critical path: each one's result
          is the next matmul's input (no asynchronous TP in train.py). Data parallelism then runs
          over world / t ranks holding 1/t of the blocks' weights each; its groups stride over
          the tensor groups, so they leave the node as soon as the data ranks do.
Not modelled: the optimizer step (memory-bound, about 16 bytes per local parameter read and
written), data loading, stragglers and failures. A spec's hardware.mfu, measured on the user's
own cluster, replaces the whole model (compute at that MFU, nothing exposed); a calibration sets
kernel_efficiency instead (evaluate.calibrated_view), so those and the unmodelled parts of a
measured step are folded into the compute.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BF16, FP32 = 2, 4
# nccl-tests' bus bandwidth on large messages reaches about 80% of the link rate on NVLink and
# InfiniBand (assumption, as the Ultra-Scale Playbook's measured all-reduce figures suggest).
COLLECTIVE_EFFICIENCY = 0.8


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step on one rank, arrays over the candidates."""

    compute: np.ndarray
    exposed_comm: np.ndarray  # communication on the critical path
    comm: np.ndarray  # all communication, hidden or not

    @property
    def total(self) -> np.ndarray:
        return self.compute + self.exposed_comm


def ring_seconds(kind: str, size_bytes, ranks, bandwidth_bytes_per_s):
    """A ring collective's time: all_gather / reduce_scatter S·(n−1)/n / B, all_reduce twice it."""
    ranks = np.asarray(ranks, dtype=np.float64)
    factor = {"all_gather": 1.0, "reduce_scatter": 1.0, "all_reduce": 2.0}[kind]
    return factor * np.asarray(size_bytes) * (ranks - 1) / ranks / bandwidth_bytes_per_s


def group_bandwidth(ranks, gpus_per_node, interconnect):
    """Bytes/s per GPU of a collective whose group spans `ranks` consecutive ranks: inside a node
    over its NVLink/PCIe, else bound by the fabric."""
    intra = interconnect.intra_node_GBps * 1e9 * COLLECTIVE_EFFICIENCY
    inter = interconnect.inter_node_GBps * 1e9 * COLLECTIVE_EFFICIENCY
    return np.where(np.asarray(ranks) <= gpus_per_node, intra, inter)


def step_time(parallelism, *, n_params, root_params, n_layers, d_model, forward_flops_per_token,
              hardware_flops_per_token, tokens_per_micro_batch, grad_accum, world_size,
              gpus_per_node, peak_flops, kernel_efficiency, interconnect, tensor_parallel=1,
              activation_checkpointing=False, reduce_scatter_every_micro_batch=True,
              regather=False) -> StepTime:
    """Step time of the candidates under one parallelism ("ddp", "fsdp" or "hsdp"; one data rank:
    no data-parallel communication) and tensor-parallel degree t.

    n_params: parameters one rank of a tensor group holds (its 1/t of the blocks' matmuls);
    root_params: the FSDP root unit (embedding, final norm, lm_head); the FLOPs per token are
    those the whole tensor group executes, forward's and forward + backward's (with the
    recomputation under checkpointing), split evenly over its t ranks. activation_checkpointing:
    the fraction of the blocks that recompute their forward (True: all); regather: the other
    blocks gather their sequence-split inputs again in backward
    (Recipe.tensor_parallel_regather)."""
    t = np.asarray(tensor_parallel, dtype=np.float64)
    flops_per_s = peak_flops * kernel_efficiency
    compute_mb = hardware_flops_per_token * tokens_per_micro_batch / t / flops_per_s
    forward_mb = forward_flops_per_token * tokens_per_micro_batch / t / flops_per_s
    backward_mb = compute_mb - forward_mb
    accum = np.asarray(grad_accum, dtype=np.float64)
    tp = _tensor_parallel_seconds(tokens_per_micro_batch, d_model, n_layers, t,
                                  activation_checkpointing, regather, gpus_per_node, interconnect)
    compute = accum * compute_mb
    data_world = world_size // np.asarray(tensor_parallel)
    if np.all(data_world == 1):
        return StepTime(compute, accum * tp, accum * tp)
    n = np.asarray(n_params, dtype=np.float64)
    if parallelism == "ddp":
        bandwidth = group_bandwidth(world_size, gpus_per_node, interconnect)
        all_reduce = ring_seconds("all_reduce", FP32 * n, data_world, bandwidth)
        exposed = np.maximum(0.0, all_reduce - backward_mb)
        return StepTime(compute, exposed + accum * tp, all_reduce + accum * tp)
    shard = data_world if parallelism == "fsdp" else np.minimum(gpus_per_node // t, data_world)
    bandwidth = group_bandwidth(shard * t, gpus_per_node, interconnect)
    gather = ring_seconds("all_gather", BF16 * n, shard, bandwidth)
    scatter = ring_seconds("reduce_scatter", FP32 * n, shard, bandwidth)
    if parallelism == "hsdp":  # the shards' all-reduce across nodes
        across = group_bandwidth(world_size, gpus_per_node, interconnect)
        scatter = scatter + np.where(data_world > shard, ring_seconds(
            "all_reduce", FP32 * n / shard, data_world // shard, across), 0.0)
    syncs = accum if reduce_scatter_every_micro_batch else np.ones_like(accum)
    first_unit = gather * np.maximum(np.asarray(root_params) / n, 1.0 / np.asarray(n_layers))
    exposed_mb = (np.maximum(0.0, gather - forward_mb) + first_unit
                  + np.maximum(0.0, gather + scatter * syncs / accum - backward_mb))
    return StepTime(compute, accum * (exposed_mb + tp),
                    accum * (2 * gather + tp) + syncs * scatter)


def _tensor_parallel_seconds(tokens_per_micro_batch, d_model, n_layers, t, checkpointing,
                             regather, gpus_per_node, interconnect):
    """One micro-batch's TP all-reduces, all on the critical path (module docstring): 4 per
    block, 6 with the recomputed forward (checkpointing: the fraction of blocks that recompute),
    5 where the block gathers its two inputs again in backward (regather, the other blocks),
    of tokens · d activations in bf16 over t ranks (an all-gather pair costs one all-reduce)."""
    checkpointing = np.asarray(checkpointing, dtype=np.float64)
    per_block = 4 + 2 * checkpointing + np.where(regather, 1 - checkpointing, 0.0)
    size = BF16 * np.asarray(tokens_per_micro_batch, dtype=np.float64) * np.asarray(d_model)
    bandwidth = group_bandwidth(t, gpus_per_node, interconnect)
    one = np.where(t > 1, ring_seconds("all_reduce", size, t, bandwidth), 0.0)
    return np.asarray(n_layers) * per_block * one
