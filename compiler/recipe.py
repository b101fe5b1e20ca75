"""The recipe: what the plan assumes the generated train.py and model.py do.

The memory model and the step time depend on choices inside the training code: how many tokens
the fused output head computes at once, whether DDP's gradients are views into its buckets,
whether FSDP2 reduce-scatters after every micro-batch. The compiler writes the recipe into
config/<variant>.py and the templates read it from there, so the coupling runs one way: a value
changed here changes the plan and the code that runs alike.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Recipe:
    # model.py's LinearCrossEntropy: one chunk's fp32 logits are loss_chunk_tokens × vocab × 4
    # bytes whatever the micro-batch (2 GiB at LLaMA-3's 128,256).
    loss_chunk_tokens: int = 4096
    # DDP(gradient_as_bucket_view=True): gradients live in the all-reduce buckets; False keeps a
    # second fp32 copy there (4 bytes per parameter).
    ddp_bucket_view: bool = True
    # FSDP2 reduce-scatters after every micro-batch (torchtitan's default), so gradients stay
    # sharded; False syncs only the last micro-batch: less communication, but every rank holds the
    # full unsharded fp32 gradient (4 bytes per parameter) until then.
    fsdp_reduce_scatter_every_micro_batch: bool = True
    # Tensor parallelism: the attention's and the MLP's gathered input is kept for backward as
    # the rank's 1/t of the sequence and gathered again there (Megatron-LM; parallelize.py's
    # GatherSequence), in the eager blocks that are not checkpointed: (t − 1)/t of 2·d bytes
    # per token and block fewer, for one more all-gather of each in backward. False keeps them
    # whole, as DTensor's PrepareModuleInput does.
    tensor_parallel_regather: bool = True

    def regathers(self, compiled: bool) -> bool:
        """Whether tensor-parallel blocks gather their inputs again in backward: eager ones only
        (a compiled block keeps what torch.compile's partitioner decides)."""
        return self.tensor_parallel_regather and not compiled

    def as_dict(self) -> dict:
        return asdict(self)


TRAIN_PY = Recipe()  # what the generated train.py does unless its config says otherwise
