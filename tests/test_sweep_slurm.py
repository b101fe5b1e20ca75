"""The sweep on the live SLURM cluster (issue #15): scripts/sweep.sbatch as a job array and
submit.py --sweep through submitit's map_array; resubmitting skips finished runs. Skipped without
a cluster (failed in CI), as tests/test_slurm.py."""

import json
import re
import shutil
import subprocess
import sys
import time

import pytest

from _train_fixtures import prepare_data, subprocess_env
from test_slurm import require_cluster
from test_sweep import TINY_SWEEP, cli

# Two budgets × 3 shapes (the fewest a sweep allows); the jobs train each run for a few steps.
SWEEP = TINY_SWEEP.replace('"00:10:00"', '"00:05:00"') + \
    "sweep: {budgets: [3.0e10, 1.0e11], shapes: 3, val_tokens: 2048}\n"
SHORT = ["--max_iters=12", "--log_interval=4", "--eval_iters=2"]
DEADLINE_S = 300


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    require_cluster()
    base = tmp_path_factory.mktemp("sweep-slurm")
    (base / "s.yaml").write_text(SWEEP)
    proc = cli("compile", base / "s.yaml", "-o", base / "repo")
    assert proc.returncode == 0, proc.stderr
    prepare_data(base / "repo", "data/shards")
    (base / "repo" / "logs").mkdir()
    return base / "repo"


def sweep_py(repo, *args):
    return subprocess.run([sys.executable, "sweep.py", *args], cwd=repo, capture_output=True,
                          text=True, env=subprocess_env())


def starts(repo, name):
    path = repo / "out" / "sweep" / name / "metrics.jsonl"
    if not path.exists():
        return 0
    return sum(json.loads(line).get("event") == "start" for line in path.read_text().splitlines())


def sbatch_wait(repo, *args):
    out = subprocess.run(["sbatch", "--wait", *args], cwd=repo, capture_output=True, text=True,
                         env=subprocess_env(), timeout=DEADLINE_S)
    assert out.returncode == 0, out.stdout + out.stderr + logs(repo)
    return out.stdout


def logs(repo):
    return "".join(p.read_text(errors="replace")[-2000:] for p in sorted((repo / "logs").rglob("*.out")))


def test_sbatch_array_trains_two_runs_and_resubmission_skips_them(repo):
    names = sweep_py(repo, "pending").stdout.split()
    sbatch_wait(repo, "--array=0-1%2", "scripts/sweep.sbatch", *SHORT)
    for name in names[:2]:
        assert sweep_py(repo, "finished", name).returncode == 0, logs(repo)
        assert starts(repo, name) == 1
    assert sweep_py(repo, "finished", names[2]).returncode == 1
    sbatch_wait(repo, "--array=0-1", "scripts/sweep.sbatch", *SHORT)  # again: nothing to train
    assert [starts(repo, n) for n in names[:2]] == [1, 1]
    assert logs(repo).count("has finished already: nothing to do") == 2


def test_submitit_map_array_trains_the_pending_runs_and_skips_finished(repo):
    names = sweep_py(repo, "pending").stdout.split()
    out = subprocess.run([sys.executable, "submit.py", "--sweep", *SHORT], cwd=repo,
                         capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert out.returncode == 0 and re.search(r"submitted job array \d+ \(slurm\)", out.stdout), \
        out.stdout + out.stderr
    assert f"{len(names)} of " in out.stdout
    end = time.monotonic() + DEADLINE_S
    while sweep_py(repo, "pending").stdout.split():
        assert time.monotonic() < end, sweep_py(repo, "list").stdout + logs(repo)
        time.sleep(2)
    assert all(starts(repo, n) == 1 for n in names)
    again = subprocess.run([sys.executable, "submit.py", "--sweep"], cwd=repo,
                           capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert again.returncode == 0 and "0 of " in again.stdout and "submitted" not in again.stdout
    every = [line.split()[0] for line in sweep_py(repo, "list").stdout.splitlines()[1:-1]]
    assert [starts(repo, n) for n in every] == [1] * len(every)  # each trained once, none again


def test_requeued_array_task_resumes(repo, tmp_path):
    """`scontrol requeue` of a running array task: train.py saves, the task runs again and
    resumes from that checkpoint (its first attempt slowed as in tests/test_slurm.py)."""
    from test_slurm import SITECUSTOMIZE

    copy = tmp_path / "rq"
    shutil.copytree(repo, copy, ignore=shutil.ignore_patterns("out", "logs"))
    (copy / "logs").mkdir()
    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(subprocess_env(), PYTHONPATH=str(tmp_path / "slow"), SLOW_STEP_S="0.3")
    name = sweep_py(copy, "name", "0").stdout.strip()
    args = ["--max_iters=60", "--ckpt_interval=5", "--log_interval=5", "--eval_iters=2"]
    out = subprocess.run(["sbatch", "--array=0", "scripts/sweep.sbatch", *args], cwd=copy,
                         capture_output=True, text=True, env=env, timeout=60)
    job = re.search(r"Submitted batch job (\d+)", out.stdout)
    assert job, out.stdout + out.stderr
    task = f"{job.group(1)}_0"
    metrics = copy / "out" / "sweep" / name / "metrics.jsonl"
    end = time.monotonic() + DEADLINE_S

    def logged_step():
        if not metrics.exists():
            return 0
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        return max((r["step"] for r in rows if "loss" in r), default=0)
    while logged_step() < 15:
        assert time.monotonic() < end, logs(copy)
        time.sleep(0.5)
    requeue = subprocess.run(["scontrol", "requeue", task], capture_output=True, text=True)
    assert requeue.returncode == 0, requeue.stderr
    while sweep_py(copy, "finished", name).returncode != 0:
        assert time.monotonic() < end, logs(copy)
        time.sleep(2)
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    begun = [r for r in rows if r.get("event") == "start"]
    assert len(begun) == 2 and begun[0]["step"] == 0, begun
    assert begun[1]["resumed_from"] and 15 <= begun[1]["step"] < 60, begun[1]
