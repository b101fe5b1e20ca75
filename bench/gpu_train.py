"""Train one variant of a generated repo for a few steps on one device and measure it (bench/gpu.sh).

    python bench/gpu_train.py --repo DIR --variant optimal [--steps 10] [--out results.jsonl]
    python bench/gpu_train.py --table results.jsonl        # the table of every measured variant

The model, its optimizer and its gradient clipping are the generated repo's own (model.py,
train.py's make_optimizer, parallelize.py's grad_norm_and_clip), configured by the repo's
config/<variant>.py. It is wrapped as train.py wraps it for FSDP2 (activation checkpointing if the plan says so, then
torch.compile block by block, then fully_shard per block and on the root, bf16 parameters with
fp32 reduction), here on a process group of one rank. Tokens are synthetic (uniform random ids):
throughput does not depend on them. One micro-batch per optimizer step.

Measured after --warmup steps (compilation happens there): tokens/s over --steps steps, MFU
(exact training FLOPs per token, the config's flops_per_token, against the GPU's datasheet dense
bf16 peak and against a measured bf16 matmul), peak memory (allocated and reserved by PyTorch's
caching allocator). Beside them, the plan's predictions from llama3gen.lock.json: its MFU and what
that MFU means in tokens/s on this device, and the peak memory compiler/memory.py predicts for
this run (world size 1, this micro-batch), plus the plan's own per-device figure for its layout.
Then --steps forwards in eval mode without gradients, as train.py evaluates: their time against
a step's, beside the share the plan assumes (a forward's FLOPs at the step's rate).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

# Dense bf16 peak by device name (vendor datasheets; the same figures as compiler/hardware.py).
DATASHEET_BF16_TFLOPS = (("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("A100", 312.0),
                         ("B200", 2250.0), ("L40S", 362.0))
GIB = 1 << 30
MFU_TARGET = 0.45  # issue #9: the 1.36e21 picks on an H200 with compile


def datasheet_peak(device_name: str) -> float | None:
    for key, tflops in DATASHEET_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops * 1e12
    return None


def matmul_peak(torch, dev, dtype, n: int, repeats: int = 10) -> float:
    """Mean FLOP/s of n×n×n matrix products, after warm-up (CUDA events on GPU)."""
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    sync(torch, dev)
    t0 = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    sync(torch, dev)
    return 2 * n**3 * repeats / (time.perf_counter() - t0)


def sync(torch, dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_memory_model():
    """compiler/memory.py, if llama3gen is importable (it needs only numpy)."""
    try:
        from llama3gen import memory
        return memory
    except ImportError:
        return None


def measure(opts) -> dict:
    repo = Path(opts.repo).resolve()
    sys.path.insert(0, str(repo))  # the generated repo's files import each other by bare name
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    import train  # the generated train.py: its defaults and optimizer
    from configurator import load_config
    from parallelize import grad_norm_and_clip  # train.py's clipping, every layout
    from model import Llama, ModelArgs, flash_attn_func

    config_file = repo / "config" / f"{opts.variant}.py"
    cfg = train.Config(load_config(train.DEFAULTS, [str(config_file)]))
    lock = json.loads((repo / "llama3gen.lock.json").read_text())["plan"]
    plan_variant = next(v for v in lock["variants"] if v["name"] == opts.variant)

    use_cuda = opts.device == "cuda" or (opts.device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", 0) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                world_size=1, device_id=dev)
    else:
        torch.set_num_threads(opts.threads)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                                world_size=1)
    bf16 = use_cuda and cfg.dtype == "bfloat16"
    compile_blocks = {"on": True, "off": False, "plan": cfg.compile}[opts.compile]
    micro = opts.micro_batch or cfg.micro_batch_size
    seq = cfg.block_size
    ac = cfg.activation_checkpointing

    # The model, wrapped as train.py's build_model does for FSDP2.
    args = ModelArgs(**{k: cfg[k] for k in ModelArgs.__dataclass_fields__})
    torch.manual_seed(cfg.seed)
    t_build = time.perf_counter()
    with torch.device(dev):
        model = Llama(args)
    layers = model.model.layers
    if ac:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
        for i, block in enumerate(layers):
            layers[i] = checkpoint_wrapper(block)
    if compile_blocks:
        for block in layers:
            block.compile()
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mp_policy": mp} if mp else {}
    for block in layers:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    optimizer = train.make_optimizer(model, cfg)
    sync(torch, dev)
    build_s = time.perf_counter() - t_build

    gen = torch.Generator(device=dev).manual_seed(0)

    def step():
        x = torch.randint(0, cfg.vocab_size, (micro, seq), device=dev, generator=gen)
        y = torch.randint(0, cfg.vocab_size, (micro, seq), device=dev, generator=gen)
        _, loss = model(x, y)
        loss.backward()
        grad_norm_and_clip(model, cfg.grad_clip)  # .item(): one host sync per step, as train.py
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    first_loss = step().item()
    sync(torch, dev)
    first_step_s = time.perf_counter() - t0
    for _ in range(opts.warmup - 1):
        step()
    sync(torch, dev)
    if use_cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for _ in range(opts.steps):
        loss = step()
    sync(torch, dev)
    elapsed = time.perf_counter() - t0
    last_loss = loss.item()

    tokens_per_s = opts.steps * micro * seq / elapsed
    memory_peaks = ({"peak_allocated_gib": torch.cuda.max_memory_allocated(dev) / GIB,
                     "peak_reserved_gib": torch.cuda.max_memory_reserved(dev) / GIB,
                     "capacity_gib": torch.cuda.get_device_properties(dev).total_memory / GIB}
                    if use_cuda else {})
    forward_s = time_evaluation(torch, model, dev, gen, cfg, micro, opts.steps)
    device_name = torch.cuda.get_device_name(dev) if use_cuda else "cpu"
    mm_dtype = torch.bfloat16 if use_cuda else torch.float32
    measured_peak = matmul_peak(torch, dev, mm_dtype, opts.matmul)
    sheet_peak = datasheet_peak(device_name) if use_cuda else None
    achieved = cfg.flops_per_token * tokens_per_s

    # The plan's predictions.
    hw = lock["hardware"]
    timing, training = plan_variant["timing"], plan_variant["training"]
    peak_here = sheet_peak or measured_peak
    result = {
        "variant": opts.variant, "device": device_name, "torch": torch.__version__,
        "attention": "flash-attn" if (flash_attn_func is not None and bf16) else "sdpa",
        "compile": compile_blocks, "activation_checkpointing": ac, "wrap": "fsdp2 world 1",
        "dtype": "bf16 params, fp32 reduce" if bf16 else "fp32",
        "n_layers": cfg.n_layer, "d_model": cfg.n_embd, "n_params": model.num_params(),
        "micro_batch": micro, "seq_len": seq, "steps": opts.steps, "warmup": opts.warmup,
        "build_s": build_s, "first_step_s": first_step_s, "step_s": elapsed / opts.steps,
        "first_loss": first_loss, "last_loss": last_loss,
        # an evaluated micro-batch (train.py's evaluate: eval mode, no grad) against a step
        "eval_forward_s": forward_s, "eval_share": forward_s / (elapsed / opts.steps),
        "plan_eval_share": plan_variant["choice"]["flops_per_token_exact"] / 3
        / (timing["hardware_flops"] / training["tokens_trained"]),
        "tokens_per_s": tokens_per_s, "flops_per_token": cfg.flops_per_token,
        "achieved_tflops": achieved / 1e12,
        "datasheet_tflops": sheet_peak / 1e12 if sheet_peak else None,
        "measured_mm_tflops": measured_peak / 1e12,
        "mfu": achieved / sheet_peak if sheet_peak else None,
        "mfu_vs_measured_mm": achieved / measured_peak,
        "plan_gpu": hw["gpu"], "plan_mfu": timing["mfu"],
        "plan_tokens_per_s_per_gpu": timing["tokens_per_second"] / hw["world_size"],
        "plan_mfu_tokens_per_s_here": timing["mfu"] * peak_here / cfg.flops_per_token,
        "plan_micro_batch": training["micro_batch_size"],
        "plan_memory_gib": plan_variant["memory"]["total"] / GIB,
        "plan_memory_layout": f"{training['parallelism']} × {training['world_size']}",
    }
    result.update(memory_peaks)
    memory = load_memory_model()
    if memory is not None:
        shape = memory.ModelShape(cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.n_kv_head, cfg.head_dim,
                                  cfg.ffn_hidden, cfg.vocab_size, seq, cfg.tie_embeddings)
        m = memory.memory_per_device(shape, micro, parallelism="fsdp", world_size=1,
                                     activation_checkpointing=ac, grad_accum=1,
                                     device="cuda" if use_cuda else "cpu",
                                     compute_dtype="bfloat16" if bf16 else "float32")
        result["predicted_total_gib"] = m.total / GIB
        result["predicted_tracked_gib"] = memory.tracked_bytes(m) / GIB
    dist.destroy_process_group()
    return result


def time_evaluation(torch, model, dev, gen, cfg, micro, repeats) -> float:
    """Seconds of one forward of a micro-batch as train.py's evaluate runs it (eval mode, no
    gradient, the loss read back), after one untimed forward (compilation in eval mode)."""
    model.eval()
    with torch.no_grad():
        for i in range(repeats + 1):
            if i == 1:
                sync(torch, dev)
                t0 = time.perf_counter()
            x = torch.randint(0, cfg.vocab_size, (micro, cfg.block_size), device=dev, generator=gen)
            y = torch.randint(0, cfg.vocab_size, (micro, cfg.block_size), device=dev, generator=gen)
            model(x, y)[1].item()
    sync(torch, dev)
    model.train()
    return (time.perf_counter() - t0) / repeats


def fmt(value, spec, missing="n/a"):
    return missing if value is None else format(value, spec)


def print_table(rows: list[dict]) -> None:
    if not rows:
        print("no results")
        return
    r0 = rows[0]
    print(f"device: {r0['device']}; torch {r0['torch']}; attention {r0['attention']}; "
          f"{r0['wrap']}; {r0['dtype']}; compile {'on' if r0['compile'] else 'off'}; synthetic "
          f"tokens; peak for MFU: datasheet {fmt(r0['datasheet_tflops'], '.0f')} TFLOP/s, "
          f"measured matmul {r0['measured_mm_tflops']:.3g} TFLOP/s")
    print()
    header = ("| variant | shape | N | micro × seq | AC | tokens/s | MFU | MFU vs mm | plan MFU "
              "| plan tok/s here | plan tok/s/GPU | peak alloc / reserved GiB | predicted GiB "
              "(this run) | plan GiB/device |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        mem = (f"{r['peak_allocated_gib']:.1f} / {r['peak_reserved_gib']:.1f}"
               if "peak_allocated_gib" in r else "n/a")
        predicted = (f"{r['predicted_tracked_gib']:.1f} tracked, {r['predicted_total_gib']:.1f} total"
                     if "predicted_total_gib" in r else "n/a")
        print(f"| {r['variant']} | {r['n_layers']}L × {r['d_model']} | {r['n_params'] / 1e9:.3g}B "
              f"| {r['micro_batch']} × {r['seq_len']} | {'on' if r['activation_checkpointing'] else 'off'} "
              f"| {r['tokens_per_s']:,.0f} | {fmt(r['mfu'], '.1%')} | {r['mfu_vs_measured_mm']:.1%} "
              f"| {r['plan_mfu']:.0%} | {r['plan_mfu_tokens_per_s_here']:,.0f} "
              f"| {r['plan_tokens_per_s_per_gpu']:,.0f} on {r['plan_gpu']} | {mem} | {predicted} "
              f"| {r['plan_memory_gib']:.1f} ({r['plan_memory_layout']}, micro {r['plan_micro_batch']}) |")
    print()
    for r in rows:
        if r["mfu"] is not None:
            print(f"{r['variant']}: MFU {r['mfu']:.1%}, target ≥ {MFU_TARGET:.0%} "
                  f"(compile {'on' if r['compile'] else 'off'}): "
                  f"{'PASS' if r['mfu'] >= MFU_TARGET else 'FAIL'}")
    for r in rows:
        print(f"{r['variant']}: build {r['build_s']:.1f} s, first step (compile) {r['first_step_s']:.1f} s, "
              f"then {r['step_s'] * 1e3:.0f} ms/step over {r['steps']} steps; loss "
              f"{r['first_loss']:.3f} → {r['last_loss']:.3f}")
    for r in rows:
        if "eval_share" in r:  # results from before the evaluation timing have none
            print(f"{r['variant']}: an evaluated micro-batch {r['eval_forward_s'] * 1e3:.0f} ms, "
                  f"{r['eval_share']:.3f} of a step; the plan assumes {r['plan_eval_share']:.3f} "
                  "(a forward's FLOPs at the step's rate)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", help="a generated repo (llama3gen compile ... -o DIR)")
    p.add_argument("--variant", help="config/<variant>.py to train")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    p.add_argument("--micro-batch", type=int, default=0, help="sequences per step (default: plan's)")
    p.add_argument("--compile", default="on", choices=("on", "off", "plan"),
                   help="torch.compile the blocks: on (default), off, or as the config says")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    p.add_argument("--matmul", type=int, default=8192, help="size of the peak-measuring matmul")
    p.add_argument("--out", help="append the result as one JSON line to this file")
    p.add_argument("--table", help="print the table of a results file and exit")
    opts = p.parse_args(argv)
    if opts.table:
        rows = [json.loads(line) for line in Path(opts.table).read_text().splitlines() if line.strip()]
        print_table(rows)
        return 0
    if not (opts.repo and opts.variant):
        p.error("--repo and --variant are required (or --table FILE)")
    result = measure(opts)
    line = json.dumps(result, sort_keys=True)
    print(line, flush=True)
    if opts.out:
        with open(opts.out, "a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
