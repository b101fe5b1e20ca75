"""Tokenizing a corpus larger than a node on the live SLURM cluster (issue #16 part 6): the
generated scripts/prepare.sh submits scripts/prepare.sbatch as a 2-task job array (one shard of
the input files each, on the task's CPUs) and a merge job that waits for both (afterok); the
merged out_dir must be byte for byte what one data/prepare.py process writes. A failed task
leaves the merge's dependency unsatisfiable, and the merge is cancelled. Skipped without a
cluster (failed in CI), as tests/test_slurm.py."""

import re
import subprocess
import sys
import time

import pytest

from _train_fixtures import stdlib_corpus_files, subprocess_env
from test_prepare_scale import outputs
from test_slurm import SPECS, TERMINAL_STATES, compile_spec, job_info, require_cluster

DEADLINE_S = 180  # queueing behind other tests' jobs included; the jobs take seconds
ARGS = ["--val_fraction", "0.05", "--chunk_tokens", "4096", "--block_size", "64"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    require_cluster()
    tmp = tmp_path_factory.mktemp("prepare-slurm")
    return compile_spec((SPECS / "tiny-cpu.yaml").read_text(), tmp / "repo", tmp)


def submit(repo, *args):
    """scripts/prepare.sh; returns (array job id, merge job id)."""
    out = subprocess.run(["bash", "scripts/prepare.sh", "--shards", "2", "--parallel", "2", *args],
                         cwd=repo, capture_output=True, text=True, env=subprocess_env(), timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    array = re.search(r"job array (\d+) tokenizes 2 shards, 2 at a time", out.stdout)
    merge = re.search(r"job (\d+) merges them when all have succeeded", out.stdout)
    assert array and merge, out.stdout
    return array[1], merge[1]


def wait(job_id, repo):
    end = time.monotonic() + DEADLINE_S
    while (info := job_info(job_id)).get("JobState") not in TERMINAL_STATES:
        if time.monotonic() > end:
            subprocess.run(["scancel", job_id], timeout=30)
            pytest.fail(f"job {job_id} still {info.get('JobState')} after {DEADLINE_S} s"
                        f"\n{logs(repo)}")
        time.sleep(1)
    return info


def logs(repo):
    return "".join(f"==> {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                   for p in sorted((repo / "logs").glob("*.out")))


def test_a_job_array_and_its_merge_write_what_one_process_writes(repo):
    corpus = stdlib_corpus_files(600_000)
    one = subprocess.run([sys.executable, "data/prepare.py", "--input", *corpus, "--out_dir",
                          "data/one", *ARGS], cwd=repo, capture_output=True, text=True,
                         env=subprocess_env(), timeout=120)
    assert one.returncode == 0, one.stderr
    array, merge = submit(repo, "--input", *corpus, "--out_dir", "data/shards", *ARGS)
    info = wait(merge, repo)
    assert info["JobState"] == "COMPLETED", f"merge ended {info['JobState']}\n{logs(repo)}"
    for task in (0, 1):  # afterok: the merge started once both tasks had ended, successfully
        task_info = job_info(f"{array}_{task}")
        assert task_info["JobState"] == "COMPLETED", logs(repo)
        assert task_info["EndTime"] <= info["StartTime"]  # ISO times, to the second
    assert sorted(p.name for p in (repo / "data/shards").iterdir()) == \
        sorted(p.name for p in (repo / "data/one").iterdir())
    assert outputs(repo / "data/shards") == outputs(repo / "data/one")
    cpus = re.search(r"#SBATCH --cpus-per-task=(\d+)", (repo / "scripts/prepare.sbatch").read_text())
    text = logs(repo)
    for task in (0, 1):  # each task tokenized its shard with --workers = its CPUs
        assert f"prepare: shard {task}/2 on " in text and f", {cpus[1]} CPUs" in text, text
        assert f"shard {task}/2: " in text and f"-> data/shards/shard-{task}-of-2" in text, text
    assert "merged 2 shards" in text


def test_a_failed_task_cancels_the_merge(repo):
    array, merge = submit(repo, "--input", "no/such/corpus", "--out_dir", "data/failed", *ARGS)
    info = wait(merge, repo)
    assert info["JobState"] == "CANCELLED", f"merge ended {info['JobState']}\n{logs(repo)}"
    assert "--input no/such/corpus: no such file or directory" in logs(repo)
    assert not (repo / "data/failed").exists()
