"""Training survives crashes, preemption and corruption, and resumes exactly (issue #7).

Run A trains 40 steps (checkpoints every 10) without interruption. Every other run here is
interrupted or damaged in some real way and must end where A ended: SIGKILL at a random step,
SIGTERM (clean save, exit 75), a 2-rank FSDP2 run resumed on 1 process, a truncated or bit-flipped
newest checkpoint, a read-only or full checkpoint directory. Same seed, deterministic CPU
kernels: single-process resumes must give A's weights bit for bit.

Runs that must be interrupted mid-way are started through a small wrapper (written below) that
sleeps 50 ms after each optimizer step, so a signal lands during training and not after it; it
changes nothing else. The random step is drawn from a seed shown in the assertion messages.
"""

import os
import random
import shutil
import signal
import subprocess
import time

import pytest
import torch

from _repo_files import load_template_module
from _train_fixtures import (
    RELATIVE_TOLERANCE, assert_same_training, make_repo, prepare_data, read_metrics,
    relative_divergence, run_train, subprocess_env, train_command, train_losses,
)

checkpoint = load_template_module("checkpoint")

CONFIG = "config/tiny.py"
SLOW_WRAPPER = '''"""Run train.py with a pause after every optimizer step (tests only):
SLOW_STEP_S seconds, 0.05 by default, from step SLOW_FROM_STEP on (default 1)."""
import os, runpy, sys, time
import torch
_step = torch.optim.AdamW.step
PAUSE_S = float(os.environ.get("SLOW_STEP_S", "0.05"))
FROM_STEP = int(os.environ.get("SLOW_FROM_STEP", "1"))
_steps = [0]
def slow_step(self, *args, **kwargs):
    result = _step(self, *args, **kwargs)
    _steps[0] += 1
    if _steps[0] >= FROM_STEP:
        time.sleep(PAUSE_S)
    return result
torch.optim.AdamW.step = slow_step
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
runpy.run_path(sys.argv[0], run_name="__main__")
'''


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    path = make_repo(tmp_path_factory.mktemp("repo"))
    prepare_data(path)
    (path / "slow.py").write_text(SLOW_WRAPPER)
    return path


@pytest.fixture(scope="module")
def run_a(repo):
    """40 uninterrupted steps; checkpoints at 10, 20, 30, 40."""
    run_train(repo, CONFIG, "--out_dir=out/a")
    return repo / "out/a"


def final_state(out_dir):
    """Model weights and optimizer state of the step-40 checkpoint (torch format)."""
    path = out_dir / "checkpoints/step_00000040"
    checkpoint.verify(path)
    return torch.load(path / "model_optim.pt", weights_only=True)


def assert_bit_identical(a, b, what):
    assert sorted(a["model"]) == sorted(b["model"])
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), f"{what}: {name} differs"
    for fqn, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][fqn][key]), f"{what}: {fqn}.{key}"


def copy_run(src, dst, keep_up_to):
    """A copy of a run's out_dir with the checkpoints after step `keep_up_to` removed, as if it
    had crashed before writing them."""
    shutil.copytree(src, dst)
    for path in checkpoint.list_checkpoints(dst):
        if int(path.name.split("_")[1]) > keep_up_to:
            shutil.rmtree(path)
    return dst


def start_slow(repo, out_dir, pause_s=0.05, from_step=1):
    cmd = train_command(CONFIG, f"--out_dir={out_dir}", wrapper="slow.py")
    env = dict(subprocess_env(), SLOW_STEP_S=str(pause_s), SLOW_FROM_STEP=str(from_step))
    return subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def read_until_step(proc, step, seen):
    """Read proc's output until it logs `step step/`; return True if it did."""
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(f"step {step}/"):
            return True
    return False


# -----------------------------------------------------------------------------


def test_sigkill_at_random_step_then_resume_is_bit_identical(repo, run_a):
    seed = random.randrange(10**6)
    kill_step = random.Random(seed).randint(11, 35)  # after the first checkpoint (step 10)
    proc = start_slow(repo, "out/kill")
    seen = []
    assert read_until_step(proc, kill_step, seen), "".join(seen)
    proc.kill()  # SIGKILL: no handler, no cleanup
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"seed {seed}: exited {proc.returncode} instead"
    out = repo / "out/kill"
    # metrics.jsonl survived the kill: every line is whole JSON, the steps before the kill are there
    logged = [r["step"] for r in read_metrics(out) if "loss" in r]
    assert logged[:kill_step] == list(range(1, kill_step + 1)), f"seed {seed}"
    assert not (out / "checkpoints/step_00000040").exists()
    newest = checkpoint.list_checkpoints(out)[0]

    resumed = run_train(repo, CONFIG, "--out_dir=out/kill")
    # step_N directories appear by an atomic rename, so the newest one is whole even when the
    # kill landed during a save; the resume starts there.
    assert f"at step {int(newest.name.split('_')[1])}" in resumed.stdout, resumed.stdout
    assert_bit_identical(final_state(run_a), final_state(out), f"SIGKILL at step {kill_step} "
                         f"(seed {seed})")
    assert train_losses(out) == train_losses(run_a)


def test_sigterm_saves_exits_75_and_resumes_bit_identical(repo, run_a):
    seed = random.randrange(10**6)
    signal_step = random.Random(seed).randint(11, 35)
    proc = start_slow(repo, "out/term")
    seen = []
    assert read_until_step(proc, signal_step, seen), "".join(seen)
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    output = "".join(seen) + rest
    assert proc.returncode == 75, f"seed {seed}: exit {proc.returncode}\n{output}"
    assert "SIGTERM received" in output
    out = repo / "out/term"
    stopped = [r for r in read_metrics(out) if r.get("event") == "requeue"]
    assert len(stopped) == 1
    stop_step = stopped[0]["step"]
    # The checkpoint is at the step where it stopped, whole and verified: no work is lost.
    assert checkpoint.list_checkpoints(out)[0].name == f"step_{stop_step:08d}"
    checkpoint.verify(checkpoint.list_checkpoints(out)[0])
    assert signal_step <= stop_step < 40

    resumed = run_train(repo, CONFIG, "--out_dir=out/term")
    assert f"at step {stop_step}" in resumed.stdout
    assert_bit_identical(final_state(run_a), final_state(out), f"SIGTERM at step {signal_step} "
                         f"(seed {seed})")


def test_duplicate_signal_still_saves(repo):
    """SLURM and torchrun deliver the same signal twice within milliseconds (docs/CONTRACT.md):
    that is one request, and the save goes ahead."""
    proc = start_slow(repo, "out/dup")
    seen = []
    assert read_until_step(proc, 12, seen), "".join(seen)
    proc.send_signal(signal.SIGUSR1)
    time.sleep(0.005)
    proc.send_signal(signal.SIGUSR1)
    rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 75, "".join(seen) + rest
    assert "SIGUSR1 again (a duplicate delivery)" in rest
    checkpoint.verify(checkpoint.list_checkpoints(repo / "out/dup")[0])


def test_later_second_signal_exits_at_once(repo):
    """A second signal well after the first (here while a 30 s step is still running) exits at
    once without waiting for the step boundary; the checkpoints already written stay valid.
    Step 1's line is printed before its boundary check, so the first signal waits 2 s after it
    (sent at once, it raced the check and saved at step 1), and the step is far longer than the
    8 s that follow, so a loaded machine still signals inside step 2; the second signal ends it,
    so the length costs nothing. (Step 1 itself has no pause: the test need not wait it out.)"""
    proc = start_slow(repo, "out/term2", pause_s=30.0, from_step=2)
    seen = []
    assert read_until_step(proc, 1, seen), "".join(seen)
    # step 1's line comes before its boundary check: let that pass, step 2 is then in its pause
    time.sleep(2.0)
    proc.send_signal(signal.SIGTERM)
    time.sleep(6.0)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 1.5, "did not exit at once"
    assert proc.returncode == 128 + signal.SIGTERM, "".join(seen) + rest
    assert "second signal (SIGTERM): exiting now" in rest
    assert checkpoint.list_checkpoints(repo / "out/term2") == []


def test_fsdp_two_ranks_resume_on_one_process(repo, run_a):
    """A 2-rank FSDP2 run (sharded DCP checkpoints) that dies after step 20 is resumed by one
    process: DCP reshards, the data order is that of global steps 21-40 whatever the world size."""
    run_train(repo, CONFIG, "--out_dir=out/fsdp", "--parallelism=fsdp", nproc=2)
    out = copy_run(repo / "out/fsdp", repo / "out/fsdp_to_1", keep_up_to=20)
    assert checkpoint.verify(out / "checkpoints/step_00000020")["format"] == "dcp"
    resumed = run_train(repo, CONFIG, "--out_dir=out/fsdp_to_1")
    assert "saved by 2 ranks, resumed on 1" in resumed.stdout
    assert "at step 20" in resumed.stdout
    # A 2-rank run reduces in another order than one process: equal up to fp32 rounding, with
    # the bounds argued in _train_fixtures.RELATIVE_TOLERANCE (2.3e-3 in loss here). Checked once
    # with bugs injected into train.py: the resumed process draws the data of step - 10 (a lost
    # data position): steps 21-40 differ by 0.73 in loss; it restores the weights but starts
    # AdamW afresh (moments lost): by 0.14.
    assert_same_training(run_a, out, range(21, 41), checkpoint.load_model_weights,
                         start_step=20)
    # The 2-rank run's own sharded step-40 checkpoint reads back as full tensors too.
    ratios = relative_divergence(checkpoint.load_model_weights(run_a),
                                 checkpoint.load_model_weights(repo / "out/fsdp"),
                                 checkpoint.load_model_weights(run_a / "checkpoints/step_00000020"))
    assert max(ratios.values()) < RELATIVE_TOLERANCE, ratios


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "no_manifest"])
def test_damaged_newest_checkpoint_is_skipped(repo, run_a, damage):
    out = copy_run(run_a, repo / f"out/damaged_{damage}", keep_up_to=40)
    newest = out / "checkpoints/step_00000040"
    data = newest / "model_optim.pt"
    if damage == "truncate":  # as if the machine died mid-file
        with open(data, "r+b") as f:
            f.truncate(data.stat().st_size // 2)
        reason = "truncated"
    elif damage == "flip_byte":  # silent corruption: same size, one bit different
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        data.write_bytes(bytes(raw))
        reason = "corrupted"
    else:  # a directory from a save that never finished
        (newest / "manifest.json").unlink()
        reason = "did not finish"
    (out / "checkpoints/.tmp-step_00000050").mkdir()  # a save killed half-way
    resumed = run_train(repo, CONFIG, f"--out_dir={out}")
    assert "WARNING: skipping step_00000040" in resumed.stdout and reason in resumed.stdout
    assert "resumed from" in resumed.stdout and "at step 30" in resumed.stdout
    assert not (out / "checkpoints/.tmp-step_00000050").exists()
    # The previous checkpoint was good, so training redoes steps 31-40 and ends where A ended.
    assert_bit_identical(final_state(run_a), final_state(out), f"resume after {damage}")


# -----------------------------------------------------------------------------
# Failed saves: a read-only or full checkpoint directory


def can_unshare():
    """Whether this machine lets us make a private mount namespace (to mount a tmpfs or a
    read-only bind mount without touching the host)."""
    if not shutil.which("unshare"):
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


def run_with_broken_checkpoint_dir(repo, out, how):
    """Resume `out` (newest checkpoint: step 20) while its checkpoints/ cannot take another
    save; return train.py's output and exit status."""
    ckpt = f"{out}/checkpoints"
    train = " ".join(train_command(CONFIG, f"--out_dir={out}"))
    if can_unshare():
        used = sum(f.stat().st_size for f in (repo / ckpt).rglob("*") if f.is_file())
        prepare = {  # real failures: ENOSPC from a tmpfs with ~0.5 MB free, EROFS from a ro mount
            "full": f"cp -a {ckpt} {out}.saved && mount -t tmpfs -o size={used + 500_000} tmpfs "
                    f"{ckpt} && cp -a {out}.saved/. {ckpt}/",
            "read_only": f"mount --bind {ckpt} {ckpt} && mount -o remount,bind,ro {ckpt}",
        }[how]
        # The tmpfs vanishes with the namespace: copy what is left on it out for the checks.
        script = (f"set -e; {prepare}; set +e; {train}; echo TRAIN_EXIT=$?; "
                  f"rm -rf {out}.after; cp -a {ckpt} {out}.after")
        proc = subprocess.run(["unshare", "-rm", "bash", "-c", script], cwd=repo,
                              env=subprocess_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=240)
        status = int(proc.stdout.rsplit("TRAIN_EXIT=", 1)[1].split()[0])
        return proc.stdout, status, repo / f"{out}.after"
    # No mount namespace: a file-size limit makes the kernel fail the big write (EFBIG, not
    # ENOSPC), and a non-root user cannot write into a mode-555 directory.
    if how == "read_only":
        if os.geteuid() == 0:
            pytest.skip("no mount namespace and running as root: cannot make a read-only dir")
        os.chmod(repo / ckpt, 0o555)
        preexec = None
    else:
        import resource

        def preexec():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing
            resource.setrlimit(resource.RLIMIT_FSIZE, (500_000, 500_000))
    try:
        proc = subprocess.run(train_command(CONFIG, f"--out_dir={out}"), cwd=repo,
                              env=subprocess_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=240,
                              preexec_fn=preexec)
    finally:
        os.chmod(repo / ckpt, 0o755)
    return proc.stdout, proc.returncode, repo / ckpt


@pytest.mark.parametrize("how", ["full", "read_only"])
def test_failed_save_is_loud_and_keeps_previous_checkpoint(repo, run_a, how):
    out = copy_run(run_a, repo / f"out/{how}", keep_up_to=20)
    shutil.rmtree(out / "checkpoints/step_00000010")
    before = {p.name: p.read_bytes() for p in (out / "checkpoints/step_00000020").iterdir()}
    output, status, ckpt_after = run_with_broken_checkpoint_dir(repo, f"out/{how}", how)
    assert status == 1, output
    assert "at step 20" in output  # it resumed, trained 10 steps, then tried to save
    assert "ERROR: checkpoint save at step 30" in output and "failed" in output, output
    # The OS's reason where Python sees it; torch.save reports ENOSPC only as "unexpected pos",
    # so checkpoint.py adds the free space of the directory to every failure.
    assert "bytes free in" in output and "older checkpoints are untouched" in output
    if how == "read_only":
        assert "Read-only file system" in output or "Permission denied" in output, output
    # The previous checkpoint is byte-for-byte what it was, and still verifies.
    previous = ckpt_after / "step_00000020"
    assert {p.name: p.read_bytes() for p in previous.iterdir()} == before
    checkpoint.verify(previous)
    assert sorted(p.name for p in ckpt_after.iterdir()) == ["step_00000020"]  # nothing half-made


def test_nonfinite_steps_are_skipped_then_stop_the_run(repo):
    """A learning rate of 1e30 (inf itself is refused) turns the weights into inf/NaN after the
    first update; the following steps have a non-finite loss: skipped, then the run stops with a
    clear message."""
    proc = run_train(repo, CONFIG, "--out_dir=out/nan", "--learning_rate=1e30",
                     "--max_nonfinite_steps=3", check=False)
    assert proc.returncode == 1, proc.stdout
    assert "stopping at step 4: 3 steps in a row had a non-finite loss" in proc.stdout
    records = read_metrics(repo / "out/nan")
    assert [r["step"] for r in records if r.get("event") == "skipped"] == [2, 3, 4]
    assert [r["step"] for r in records if r.get("event") == "stopped_nonfinite"] == [4]
    assert checkpoint.list_checkpoints(repo / "out/nan") == []  # no broken state was saved
