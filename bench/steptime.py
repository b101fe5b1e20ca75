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

Then each group of rows (one codebase on one GPU type, one compile and checkpointing setting)
is calibrated on its smallest run, as a spec's hardware.calibration would be (evaluate.
calibrated_view), and the others predicted from it, beside the uncalibrated error.

    python bench/steptime.py            # the tables
    python bench/steptime.py --check 15 # also exit 1 if a test row is off by more than 15%
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from compiler import hardware  # noqa: E402
from compiler.evaluate import (HardwareView, calibrated_view,  # noqa: E402
                               hardware_flops_per_token, time_layout)
from compiler.memory import ModelShape  # noqa: E402

ROWS = Path(__file__).resolve().parent / "published_throughput.json"
CALIBRATION = {"fms-fsdp_llama2-7b_128xa100-80gb_hsdp_compile",
               "fms-fsdp_llama2-7b_128xa100-80gb_hsdp_nocompile"}
SHARDING = {"full_shard": "fsdp", "hybrid_shard": "hsdp", "ddp": "ddp"}


def shape_of(row) -> ModelShape:
    ffn = row["ffn_hidden"] * 2 // 3 if row["mlp"] == "gelu" else row["ffn_hidden"]
    return ModelShape(row["n_layers"], row["d_model"], row["n_heads"], row["n_kv_heads"],
                      row["d_model"] // row["n_heads"], ffn, row["vocab_size"], row["seq_len"])


def view_of(row) -> HardwareView:
    """The row's GPUs as the planner sees them, at the kernel efficiency llama3gen assumes."""
    gpu = hardware.lookup(row["gpu"])
    per_node = row.get("gpus_per_node") or 8
    efficiency, _ = hardware.kernel_efficiency(gpu, bool(row["torch_compile"]))
    return HardwareView(device="cuda", peak_flops=gpu.peak_flops, memory_bytes=gpu.memory_bytes,
                        gpus_per_node=per_node, nodes=row["gpus"] // per_node,
                        kernel_efficiency=efficiency, interconnect=hardware.interconnect(gpu))


def predict(row, view=None) -> tuple[float, float, str]:
    """(tokens/s per GPU, MFU, parallelism) the step-time model predicts for the row's layout, on
    `view` (default: view_of(row))."""
    view = view or view_of(row)
    shape, gpus = shape_of(row), row["gpus"]
    parallelism = SHARDING[row["sharding"]]
    _, speed = time_layout(shape, view, parallelism, 1, row["micro_batch_sequences"],
                           row["global_batch_sequences"] // gpus,
                           bool(row["activation_checkpointing"]))
    per_gpu = float(speed) / gpus
    mfu = float(hardware_flops_per_token(shape, False)) * per_gpu / view.peak_flops
    return per_gpu, mfu, parallelism


def as_calibration(row) -> dict:
    """The row as `llama3gen calibrate` would record it had it measured the run itself: the step
    time of its published tokens/s, its shape and layout (what evaluate.calibrated_view reads)."""
    s, gpus = shape_of(row), row["gpus"]
    tokens_per_second = row["tokens_per_second_per_gpu"] * gpus
    step = row["global_batch_sequences"] * row["seq_len"] / tokens_per_second
    flops = float(hardware_flops_per_token(s, False))
    peak = hardware.lookup(row["gpu"]).peak_flops
    return {"mfu": flops * row["tokens_per_second_per_gpu"] / peak, "step_time_s": step,
            "tokens_per_second": tokens_per_second,
            "measured_on": {
                "run": row["name"], "how": "published", "gpu": row["gpu"], "world_size": gpus,
                "peak_flops": peak,
                "shape": {"n_layer": s.n_layers, "n_embd": s.d_model, "n_head": s.n_heads,
                          "n_kv_head": s.n_kv_heads, "head_dim": s.head_dim,
                          "ffn_hidden": s.ffn_hidden, "vocab_size": s.vocab_size,
                          "tie_embeddings": False, "block_size": s.seq_len},
                "layout": {"parallelism": SHARDING[row["sharding"]],
                           "micro_batch_size": row["micro_batch_sequences"],
                           "grad_accum": row["global_batch_sequences"] // gpus
                           // row["micro_batch_sequences"],
                           "activation_checkpointing": bool(row["activation_checkpointing"]),
                           "compile": bool(row["torch_compile"]), "tensor_parallel": 1}}}


def calibrated_rows(rows) -> list[tuple[dict, dict, float, float]]:
    """(row, the row it was calibrated on, predicted tokens/s per GPU calibrated, uncalibrated)
    for every row of a group (one codebase on one GPU type, one compile and checkpointing
    setting) but its first, the smallest model on the fewest GPUs: what `hardware: {calibration}`
    does with a benchmark of a small run when planning a larger one or more nodes."""
    groups = {}
    for row in rows:
        key = (row["name"].split("_")[0].split("-")[0], row["gpu"], row["torch_compile"],
               row.get("activation_checkpointing_mode"))
        groups.setdefault(key, []).append(row)
    out = []
    for group in groups.values():
        base, *others = sorted(group, key=lambda r: (r["num_params"] or 0, r["gpus"]))
        for row in others:
            view = calibrated_view(view_of(row), as_calibration(base), base["name"], 1.0)
            out.append((row, base, predict(row, view)[0], predict(row)[0]))
    return out


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
    print("\ncalibrated on the group's smallest run (evaluate.calibrated_view, as a spec's "
          "hardware.calibration)")
    print(f"{'row':<48} {'published':>10} {'calibrated':>10} {'error':>7} {'uncal.':>7}  "
          "calibrated on")
    both = []
    for row, base, calibrated, plain in calibrated_rows(rows):
        published = row["tokens_per_second_per_gpu"]
        both.append((abs(calibrated / published - 1), abs(plain / published - 1)))
        print(f"{row['name']:<48} {published:>10,.0f} {calibrated:>10,.0f} "
              f"{calibrated / published - 1:>+7.1%} {plain / published - 1:>+7.1%}  {base['name']}")
    calibrated_error, plain_error = np.mean(both, axis=0)
    print(f"predicted rows: {len(both)}, mean |error| calibrated {calibrated_error:.1%}, "
          f"uncalibrated {plain_error:.1%}")
    if opts.check is not None and worst * 100 > opts.check:
        print(f"FAIL: a test row is off by more than {opts.check:g}%")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
