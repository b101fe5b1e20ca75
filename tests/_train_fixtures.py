"""A runnable training repo and real data for the training tests (issues #3 and #7).

make_repo() is the one place that builds the repo under test. Until the compiler renders
config/<variant>.py it copies the plain templates and writes a small config by hand with every
key of docs/CONTRACT.md; later it becomes `llama3gen compile specs/tiny-cpu.yaml -o <dir>`.

The data is a real corpus nobody here wrote: the Python standard library's own .py sources (the
first files in sorted order, about 2 MB), tokenized as raw bytes by the repo's data/prepare.py.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from _repo_files import TEMPLATES_DIR, load_arch

REPO_FILES = ["train.py", "model.py", "dataset.py", "parallelize.py", "metrics.py", "configurator.py",
              "checkpoint.py", "export_hf.py", "data/prepare.py"]
CORPUS_BYTES = 2_000_000
VOCAB = 257  # raw bytes (0-255) plus the end-of-document id 256

# Every key of docs/CONTRACT.md, for a model that trains in seconds on one CPU core.
TINY_CONFIG = {
    "n_layer": 2, "n_embd": 64, "n_head": 4, "n_kv_head": 2, "head_dim": 16, "ffn_hidden": 192,
    "vocab_size": VOCAB, "block_size": 32, "rope_theta": 10000.0, "norm_eps": 1e-5,
    "tie_embeddings": False, "init_std": 0.02,
    "data_dir": "data/stdlib", "out_dir": "out",
    "global_batch_size": 8, "micro_batch_size": 4,
    "learning_rate": 3e-3, "min_lr": 3e-4, "lr_schedule": "cosine", "warmup_iters": 5,
    "decay_frac": 0.2, "max_iters": 40,
    "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95, "grad_clip": 1.0,
    "eval_interval": 20, "eval_iters": 2, "log_interval": 1,
    "ckpt_interval": 10, "keep_last_ckpts": 10,
    "device": "cpu", "dtype": "float32", "parallelism": "fsdp",
    "activation_checkpointing": False, "compile": False, "seed": 1337,
    "loss_chunk_tokens": 4096, "ddp_bucket_view": True, "fsdp_reduce_scatter_every_micro_batch": True,
    "tensor_parallel_regather": True,
    "flops_per_token": 0, "peak_flops": 1e11, "planned_mfu": 0.3, "init_from_hf": "",
}


def _tiny_flops_per_token():
    arch = load_arch()
    c = TINY_CONFIG
    return int(arch.flops_per_token_exact(c["n_layer"], c["n_embd"], c["n_head"], c["n_kv_head"],
                                          c["head_dim"], c["ffn_hidden"], c["vocab_size"],
                                          c["block_size"]))


def write_config(repo, name="tiny", **overrides):
    """config/<name>.py with every key, one assignment per line (as the compiler renders it)."""
    values = dict(TINY_CONFIG, flops_per_token=_tiny_flops_per_token())
    unknown = set(overrides) - set(values)
    assert not unknown, f"not contract keys: {unknown}"
    values.update(overrides)
    lines = [f"{k} = {v!r}  # tests/_train_fixtures.py" for k, v in values.items()]
    path = Path(repo) / "config" / f"{name}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return f"config/{name}.py"


def make_repo(dest):
    """A generated training repo in `dest` with config/tiny.py; returns its path."""
    dest = Path(dest)
    for name in REPO_FILES:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(TEMPLATES_DIR / name, dest / name)
    write_config(dest)
    return dest


# Packages left out of a corpus with_packages: site-packages (not the standard library), and the
# test suite, IDLE, tkinter, turtledemo and lib2to3 (tests, GUI and tooling).
LEFT_OUT_PACKAGES = {"site-packages", "test", "idlelib", "tkinter", "turtledemo", "lib2to3"}


def stdlib_corpus_files(max_bytes=CORPUS_BYTES, with_packages=False):
    """The standard library's top-level .py files in sorted order, then (with_packages) those one
    package level down, up to max_bytes."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(stdlib.glob("*.py"))
    if with_packages:
        paths += sorted(p for p in stdlib.glob("*/*.py") if p.parent.name not in LEFT_OUT_PACKAGES)
    files, total = [], 0
    for path in paths:
        if total >= max_bytes:
            break
        files.append(str(path))
        total += path.stat().st_size
    assert total >= max_bytes // 2, f"too little stdlib source in {stdlib}"
    return files


_prepared = {}


def prepare_data(repo, data_dir="data/stdlib"):
    """Run the repo's data/prepare.py on the stdlib corpus (once per process, then copied)."""
    target = Path(repo) / data_dir
    if "stdlib" not in _prepared:
        first = Path(repo) / ".prepared-stdlib"
        subprocess.run([sys.executable, "data/prepare.py", "--input", *stdlib_corpus_files(),
                        "--out_dir", str(first), "--val_fraction", "0.1",
                        "--chunk_tokens", "16384"], cwd=repo, check=True, capture_output=True)
        _prepared["stdlib"] = first
    if target != _prepared["stdlib"]:
        shutil.copytree(_prepared["stdlib"], target, dirs_exist_ok=True)
    return target


def subprocess_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)  # never inherit a torchrun environment
    return env


def train_command(config, *overrides, nproc=1, wrapper=None):
    """The command line: python train.py ... or torchrun --nproc_per_node=N train.py ..."""
    entry = ["train.py", config, *overrides]
    if nproc > 1:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}", *entry]
    return [sys.executable, *([wrapper] if wrapper else []), *entry]


def run_train(repo, config, *overrides, nproc=1, timeout=240, check=True):
    """Run train.py to completion; returns the CompletedProcess (stdout and stderr merged)."""
    proc = subprocess.run(train_command(config, *overrides, nproc=nproc), cwd=repo,
                          env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py exited {proc.returncode}:\n{proc.stdout[-6000:]}")
    return proc


def read_metrics(out_dir):
    with open(Path(out_dir) / "metrics.jsonl") as f:
        return [json.loads(line) for line in f]


def train_losses(out_dir):
    """{step: training loss}; a step logged twice (re-run after a resume) keeps its last value."""
    return {r["step"]: r["loss"] for r in read_metrics(out_dir) if "loss" in r}


def val_losses(out_dir):
    return {r["step"]: r["val_loss"] for r in read_metrics(out_dir) if "val_loss" in r}


# -----------------------------------------------------------------------------
# Two runs that must agree up to the order of floating-point reductions (issue #13)
#
# 2 ranks against 1 process, a sharded checkpoint resumed on one process, another CPU's kernels:
# the same steps on the same data, summed in another order. Every sum is then exact to fp32
# rounding (relative 6e-8 per operation) whatever the kernels; they change only which roundings.
# Training carries such a seed difference forward and grows it at a rate set by the training
# dynamics (learning rate, model, data), not by the kernels, and AdamW adds one more effect: in a
# coordinate whose gradient is near zero, rounding can flip the sign of m/√v and move that weight
# by up to lr in a step (AdamW divides each update by the gradient's own scale). Both stay a
# small part of a tensor's movement over these 40-step runs. A real bug (another data order, a
# gradient not averaged over the ranks, a skipped micro-batch) changes every coordinate's update
# from the first step it touches: the runs then differ by a sizeable fraction of how far each
# tensor moved, and the loss by about what one batch differs from the next.
# So the bounds are relative to what the reference run did itself, 1% of it: per tensor, mean
# |Δw| < 1% of its mean movement; per step, |Δloss| < 1% of the median step-to-step loss change.
# Seen on one AMD EPYC (AVX2) while this was written, for scale only: rounding reached 6e-5 of a
# tensor's movement (6e-6 with ATEN_CPU_CAPABILITY=default), and the loss 8e-6 against a bound
# of 1.8e-3; each injected bug (test_train.py::test_two_ranks_match_single_process lists them)
# moved every tensor by 15% or more of its movement and the loss by 0.2 or more.
RELATIVE_TOLERANCE = 0.01


def relative_divergence(ref_weights, other_weights, start_weights):
    """{tensor name: mean |ref − other| / mean |ref − start|}: how far two runs ended apart,
    as a fraction of how far `ref` moved from `start`."""
    assert sorted(ref_weights) == sorted(other_weights)
    ratios = {}
    for name, ref in ref_weights.items():
        assert other_weights[name].shape == ref.shape, name
        moved = (ref - start_weights[name]).abs().mean().item()
        assert moved > 0, f"{name} did not move: the comparison would be between untrained runs"
        ratios[name] = (ref - other_weights[name]).abs().mean().item() / moved
    return ratios


def assert_same_training(ref_dir, other_dir, steps, load_weights, start_step):
    """`other_dir` trained `steps` as `ref_dir` did, up to reduction order: its training and
    validation losses and its final weights agree within RELATIVE_TOLERANCE of what `ref_dir`'s
    run did itself (its median step-to-step loss change; each tensor's movement since
    `start_step`, whose checkpoint `ref_dir` keeps)."""
    ref, other = train_losses(ref_dir), train_losses(other_dir)
    changes = sorted(abs(ref[s] - ref[s - 1]) for s in steps if s - 1 in ref)
    loss_tolerance = RELATIVE_TOLERANCE * changes[len(changes) // 2]
    worst = max(abs(ref[s] - other[s]) for s in steps)
    assert worst < loss_tolerance, f"loss curves differ by {worst:.3g} (bound {loss_tolerance:.3g})"
    ref_val, other_val = val_losses(ref_dir), val_losses(other_dir)
    for s in set(ref_val) & set(steps):
        assert abs(ref_val[s] - other_val[s]) < loss_tolerance, f"val loss at step {s}"
    ratios = relative_divergence(load_weights(ref_dir), load_weights(other_dir),
                                 load_weights(Path(ref_dir) / f"checkpoints/step_{start_step:08d}"))
    name = max(ratios, key=ratios.get)
    assert ratios[name] < RELATIVE_TOLERANCE, (
        f"{name}: the runs ended {ratios[name]:.3g} of its movement apart")
