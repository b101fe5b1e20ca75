"""The step-time model (compiler/steptime.py) against published training throughput.

Reads bench/published_throughput.json (each row: a published measurement, its configuration and
its source) and predicts tokens/s per GPU for that exact layout: the row's GPUs, sharding,
micro-batch, global batch and activation checkpointing, the catalog's interconnect, and the
kernel efficiency llama3gen assumes for that GPU (eager, or compiled where the row used
torch.compile). Prints predicted against published with the error of each, and the mean
absolute error over the rows the model covers.

Which rows calibrate and which test: the H100 kernel efficiency comes from our own one-GPU H200
measurement (bench/README.md), so every H100 row is a test of it; the A100 one comes from the
fms-fsdp A100 rows (Llama-2 7B), so those two are calibration and the MPT A100 rows are tests.
MPT's GELU MLP (2 matmuls of d × 4d) is represented by a SwiGLU of the same FLOPs (3 matmuls of
d × 8d/3); its learned position embeddings and biases are left out (under 1% of the FLOPs).
torchtitan's rows use selective activation checkpointing, which the model does not have: they
are predicted with full recomputation, an upper bound on its cost, and listed apart.

    python bench/steptime.py            # the table
    python bench/steptime.py --check 15 # also exit 1 if a test row is off by more than 15%
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from compiler import hardware  # noqa: E402
from compiler.evaluate import HardwareView, hardware_flops_per_token, time_layout  # noqa: E402
from compiler.memory import ModelShape  # noqa: E402

ROWS = Path(__file__).resolve().parent / "published_throughput.json"
CALIBRATION = {"fms-fsdp_llama2-7b_128xa100-80gb_hsdp_compile",
               "fms-fsdp_llama2-7b_128xa100-80gb_hsdp_nocompile"}
SHARDING = {"full_shard": "fsdp", "hybrid_shard": "hsdp", "ddp": "ddp"}


def shape_of(row) -> ModelShape:
    ffn = row["ffn_hidden"] * 2 // 3 if row["mlp"] == "gelu" else row["ffn_hidden"]
    return ModelShape(row["n_layers"], row["d_model"], row["n_heads"], row["n_kv_heads"],
                      row["d_model"] // row["n_heads"], ffn, row["vocab_size"], row["seq_len"])


def predict(row) -> tuple[float, float, str]:
    """(tokens/s per GPU, MFU, parallelism) the step-time model predicts for the row's layout."""
    gpu = hardware.lookup(row["gpu"])
    shape = shape_of(row)
    gpus, per_node = row["gpus"], row.get("gpus_per_node") or 8
    efficiency, _ = hardware.kernel_efficiency(gpu, bool(row["torch_compile"]))
    view = HardwareView(device="cuda", peak_flops=gpu.peak_flops, memory_bytes=gpu.memory_bytes,
                        gpus_per_node=per_node, nodes=gpus // per_node,
                        kernel_efficiency=efficiency, interconnect=hardware.interconnect(gpu))
    parallelism = SHARDING[row["sharding"]]
    _, speed = time_layout(shape, view, parallelism, 1, row["micro_batch_sequences"],
                           row["global_batch_sequences"] // gpus,
                           bool(row["activation_checkpointing"]))
    per_gpu = float(speed) / gpus
    mfu = float(hardware_flops_per_token(shape, False)) * per_gpu / gpu.peak_flops
    return per_gpu, mfu, parallelism


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", type=float, default=None,
                        help="exit 1 if a test row's error exceeds this many percent")
    opts = parser.parse_args(argv)
    rows = json.loads(ROWS.read_text())
    print(f"{'row':<48} {'published':>10} {'predicted':>10} {'error':>7} {'MFU pub/pred':>13}  role")
    errors, worst = [], 0.0
    for row in rows:
        per_gpu, mfu, _ = predict(row)
        error = per_gpu / row["tokens_per_second_per_gpu"] - 1
        selective = row.get("activation_checkpointing_mode") == "selective"
        role = ("calibration" if row["name"] in CALIBRATION else
                "apart: selective AC" if selective else "test")
        if role == "test":
            errors.append(abs(error))
            worst = max(worst, abs(error))
        published_mfu = f"{row['mfu']:.1%}" if row["mfu"] else "-"
        print(f"{row['name']:<48} {row['tokens_per_second_per_gpu']:>10,.0f} {per_gpu:>10,.0f} "
              f"{error:>+7.1%} {published_mfu:>6}/{mfu:.1%}  {role}")
    print(f"test rows: {len(errors)}, mean |error| {np.mean(errors):.1%}, worst {worst:.1%}")
    if opts.check is not None and worst * 100 > opts.check:
        print(f"FAIL: a test row is off by more than {opts.check:g}%")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
