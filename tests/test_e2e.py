"""End to end as a user runs it: compile specs/tiny-cpu.yaml, prepare real text, train with the
generated config (one process and torchrun), resume, export to Hugging Face."""

import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from _train_fixtures import read_metrics, run_train, stdlib_corpus_files, subprocess_env, val_losses

REPO = Path(__file__).resolve().parent.parent
STEPS = 120  # of the plan's ~1,300: enough to learn well below the unigram entropy in ~20 s


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "tiny"
    subprocess.run([sys.executable, "-m", "llama3gen.cli", "compile", str(REPO / "specs" / "tiny-cpu.yaml"),
                    "-o", str(out)], check=True, capture_output=True, timeout=120)
    # The README's step 2, on a corpus nobody here wrote: the standard library's own sources.
    subprocess.run([sys.executable, "data/prepare.py", "--input", *stdlib_corpus_files(1_000_000),
                    "--tokenizer", "bytes", "--vocab_size", "257", "--out_dir", "data/shards",
                    "--val_fraction", "0.05"], cwd=out, check=True, capture_output=True, timeout=300)
    return out


def unigram_entropy(path: Path) -> float:
    tokens = np.fromfile(path, dtype=np.uint32)
    counts = Counter(tokens.tolist())
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


def test_generated_config_trains_below_unigram_entropy_and_resumes(repo):
    first = run_train(repo, "config/optimal.py", f"--max_iters={STEPS}", f"--eval_interval={STEPS}",
                      f"--ckpt_interval={STEPS // 2}", timeout=600)
    out = repo / "out" / "optimal"
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1].endswith(f"{STEPS:08d}")
    val = val_losses(out)[STEPS]
    entropy = unigram_entropy(repo / "data" / "shards" / "val.bin")
    assert val < entropy - 0.5, f"val loss {val:.3f} vs unigram entropy {entropy:.3f}"
    assert "MFU" in first.stdout  # logged against the plan's peak

    # Asking for more steps resumes from the saved step rather than starting over.
    second = run_train(repo, "config/optimal.py", f"--max_iters={STEPS + 20}",
                       f"--eval_interval={STEPS}", timeout=600)
    assert f"step {STEPS}" in second.stdout and "resum" in second.stdout.lower()
    steps = [r["step"] for r in read_metrics(out) if "loss" in r]
    assert steps[-1] == STEPS + 20 and min(s for s in steps if s > STEPS) > STEPS


def test_torchrun_two_ranks_with_the_planned_layout(repo):
    # The plan's layout for this spec (two processes) is what torchrun runs; 10 steps suffice.
    cfg = (repo / "config" / "chinchilla.py").read_text()
    assert "parallelism = " in cfg
    proc = run_train(repo, "config/chinchilla.py", "--max_iters=10", "--eval_interval=10",
                     "--out_dir=out/two-ranks", nproc=2, timeout=600)
    assert "step 10/10" in proc.stdout, proc.stdout[-3000:]
    # torchrun's LOCAL_WORLD_SIZE: how `llama3gen calibrate` learns the run's nodes
    start = next(r for r in read_metrics(repo / "out" / "two-ranks") if r.get("event") == "start")
    assert start["world_size"] == 2 and start["ranks_per_node"] == 2


def test_export_of_the_trained_checkpoint_loads_in_transformers(repo):
    transformers = pytest.importorskip("transformers")
    import torch
    hf = repo / "hf"
    subprocess.run([sys.executable, "export_hf.py", "--ckpt", "out/optimal", "--out", str(hf)],
                   cwd=repo, check=True, capture_output=True, env=subprocess_env(), timeout=300)
    model = transformers.LlamaForCausalLM.from_pretrained(hf, local_files_only=True)
    lock = __import__("json").loads((repo / "llama3gen.lock.json").read_text())
    n_plan = next(v for v in lock["plan"]["variants"] if v["name"] == "optimal")["choice"]["n_params"]
    assert sum(p.numel() for p in model.parameters()) == n_plan
    with torch.no_grad():
        out = model(torch.randint(0, 257, (1, 16))).logits
    assert out.shape == (1, 16, 257) and torch.isfinite(out).all()


def test_a_plan_with_tensor_parallelism_is_what_torchrun_runs(repo, tmp_path):
    """training.tensor_parallel: 2 in the spec: the plan carries it into the config, whose
    2 processes then form one tensor group (no data-parallel wrapper)."""
    spec = (REPO / "specs" / "tiny-cpu.yaml").read_text() + "  tensor_parallel: 2\n"
    assert spec.rstrip().splitlines()[-2].startswith("  ")  # appended inside training:
    (tmp_path / "tp.yaml").write_text(spec)
    out = tmp_path / "tp"
    subprocess.run([sys.executable, "-m", "llama3gen.cli", "compile", str(tmp_path / "tp.yaml"),
                    "-o", str(out)], check=True, capture_output=True, timeout=120)
    assert "tensor_parallel = 2" in (out / "config" / "optimal.py").read_text()
    proc = run_train(out, "config/optimal.py", "--max_iters=10", "--eval_interval=10",
                     f"--data_dir={repo / 'data' / 'shards'}", nproc=2, timeout=600)
    assert "tensor parallel 2" in proc.stdout and "step 10/10" in proc.stdout, proc.stdout[-3000:]
