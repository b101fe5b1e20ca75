"""How to train a chosen shape: batch, learning rate, schedule, layout on the hardware, time, cost.

Pure functions from (spec, choice) to Plan pieces. Every value carries its provenance.
"""

from __future__ import annotations

import math

from . import laws, layout
from . import plan as P
from .errors import UserError
from .spec import Spec

LOG_INTERVAL = 10


def deepseek_compute(choice: P.Choice) -> float:
    """DeepSeek's C = M·D, M = non-embedding training FLOPs per token (attention included)."""
    s = choice.shape
    lm_head_flops = 6 * s.vocab_size * s.d_model
    return (choice.flops_per_token_exact - lm_head_flops) * choice.tokens


def global_batch(spec: Spec, choice: P.Choice, world_size: int) -> tuple[int, str]:
    """Sequences per optimizer step: DeepSeek's B_opt, rounded to a multiple of the world size."""
    seq_len = choice.shape.seq_len
    if spec.training.global_batch_tokens is not None:
        tokens = spec.training.global_batch_tokens
        why = f"spec: training.global_batch_tokens {tokens}"
    else:
        c = deepseek_compute(choice)
        tokens = laws.deepseek_batch_tokens(c)
        why = (f"B_opt = 0.2920·C^0.3271 = {tokens:,.0f} tokens at C = M·D = {c:.3g} "
               f"({laws.DEEPSEEK_CITATION})")
    per_rank = tokens / seq_len / world_size
    # Round the per-rank share to a multiple of a power of two (≤ 1/8 of it) so that micro-batches
    # can divide it: 131 sequences per rank would allow only micro-batch 1 or 131.
    granule = 1 << max(0, int(math.log2(max(per_rank, 1) / 8))) if per_rank >= 8 else 1
    per_rank_seqs = max(1, granule * round(per_rank / granule))
    seqs = per_rank_seqs * world_size
    return seqs, why + (f"; {seqs} sequences of {seq_len} ({per_rank_seqs} per rank × {world_size} "
                        f"ranks, rounded to a multiple of {granule} so micro-batches divide it)")


def learning_rate(spec: Spec, choice: P.Choice) -> tuple[float, str]:
    if spec.training.learning_rate is not None:
        return spec.training.learning_rate, "spec: training.learning_rate"
    c = deepseek_compute(choice)
    lr = laws.deepseek_learning_rate(c)
    return lr, f"η_opt = 0.3118·C^-0.1250 at C = M·D = {c:.3g} ({laws.DEEPSEEK_CITATION})"


def _four_digits(x: float) -> float:
    """Learning rates to four significant digits: the law is a fit, not a measurement."""
    return float(f"{x:.4g}")


def plan_training(spec: Spec, choice: P.Choice) -> tuple[P.Training, P.Memory, P.Timing, list[str], dict[str, str]]:
    hw, tr = spec.hardware, spec.training
    gpu = hw.device()
    world = hw.world_size
    shape = choice.shape
    provenance: dict[str, str] = {}

    batch_seqs, provenance["global_batch_size"] = global_batch(spec, choice, world)
    lr, provenance["learning_rate"] = learning_rate(spec, choice)
    lr = _four_digits(lr)
    batch_tokens = batch_seqs * shape.seq_len
    max_iters = max(1, math.ceil(choice.tokens / batch_tokens))
    provenance["max_iters"] = (f"ceil(D / global batch tokens) = ceil({choice.tokens:.6g} / "
                               f"{batch_tokens}); trains {max_iters * batch_tokens:.6g} tokens ≥ D")
    warmup = min(tr.max_warmup_iters, max(1, round(tr.warmup_frac * max_iters)))
    provenance["warmup_iters"] = (f"{tr.warmup_frac:g} of max_iters, at most {tr.max_warmup_iters} "
                                  "(training.warmup_frac, training.max_warmup_iters)")
    provenance["min_lr"] = f"learning_rate × training.min_lr_ratio {tr.min_lr_ratio:g}"

    device, memory_bytes = layout.spec_memory_bytes(spec)
    lay = layout.plan_layout(
        n_layers=shape.n_layers, d_model=shape.d_model, n_heads=shape.n_heads,
        n_kv_heads=shape.n_kv_heads, head_dim=shape.head_dim, ffn_hidden=shape.ffn_hidden,
        vocab_size=shape.vocab_size, seq_len=shape.seq_len, tie_embeddings=shape.tie_embeddings,
        gpu_memory_bytes=memory_bytes, gpus_per_node=hw.gpus_per_node, nodes=hw.nodes,
        peak_flops=gpu.peak_flops, mfu=hw.effective_mfu, global_batch_size=batch_seqs,
        flops_per_token=choice.flops_per_token_exact,
        activation_checkpointing=tr.activation_checkpointing, device=device)
    if not lay.fits:
        raise UserError(f"{lay.problem}", field="hardware",
                        fix=lay.fix or "use more or larger GPUs, or a shorter model.seq_len")
    provenance["layout"] = "compiler/layout.py: " + "; ".join(lay.reasons)

    eval_interval = tr.eval_interval or max(1, min(1000, max_iters // 10))
    ckpt_interval = tr.ckpt_interval or max(1, min(1000, max_iters // 10))
    is_cpu = device == "cpu"
    training = P.Training(
        parallelism=lay.parallelism, world_size=world, global_batch_size=batch_seqs,
        global_batch_tokens=batch_tokens, micro_batch_size=lay.micro_batch_size,
        grad_accum=lay.grad_accum, max_iters=max_iters, tokens_trained=float(max_iters * batch_tokens),
        learning_rate=lr, min_lr=_four_digits(lr * tr.min_lr_ratio), lr_schedule=tr.schedule, warmup_iters=warmup,
        decay_frac=tr.decay_frac, weight_decay=tr.weight_decay, beta1=tr.beta1, beta2=tr.beta2,
        grad_clip=tr.grad_clip, activation_checkpointing=lay.activation_checkpointing,
        compile=tr.compile, dtype="float32" if is_cpu else "bfloat16",
        device="cpu" if is_cpu else "cuda", eval_interval=eval_interval, eval_iters=tr.eval_iters,
        log_interval=min(LOG_INTERVAL, max_iters), ckpt_interval=ckpt_interval,
        keep_last_ckpts=tr.keep_last_ckpts, seed=tr.seed, init_std=0.02)
    provenance["init_std"] = "0.02, as GPT-2, nanoGPT and torchtitan's LLaMA (assumption)"

    mem = lay.memory
    memory = P.Memory(parameters=mem["parameters"], gradients=mem["gradients"],
                      optimizer=mem["optimizer"], activations=mem["activations"],
                      logits=mem["logits"], other=mem["other"], total=mem["total"],
                      capacity=layout.device_capacity(memory_bytes, hw.gpus_per_node, device),
                      fits=lay.fits)

    hardware_flops = lay.hardware_flops_per_token * training.tokens_trained
    seconds = training.tokens_trained / lay.tokens_per_second
    gpu_hours = seconds / 3600 * world
    timing = P.Timing(tokens_per_second=lay.tokens_per_second, hardware_flops=hardware_flops,
                      days=seconds / 86400, gpu_hours=gpu_hours,
                      cost_usd=None if hw.usd_per_gpu_hour is None else gpu_hours * hw.usd_per_gpu_hour)
    provenance["timing"] = (
        f"tokens/s = {world} GPUs × {gpu.bf16_tflops:g} TFLOP/s × MFU {hw.effective_mfu:g} / "
        f"{lay.hardware_flops_per_token:,.0f} hardware FLOPs per token (exact convention"
        + (", + one forward of the blocks for activation recomputation" if lay.activation_checkpointing else "")
        + "); days = tokens trained / tokens/s")
    return training, memory, timing, list(lay.reasons), provenance
