"""SLURM for real (issue #5): the generated scripts/train.sbatch and submit.py on a live cluster.

`bash .ci/slurm.sh start` (as root; CI runs it from .ci/run) starts slurmctld and two slurmd on this
host, nodes n1 and n2. Without a cluster answering `sinfo` the cluster tests are skipped with the
reason; in CI (CI=true) they fail. The golden, `bash -n`, quoting and `--local` tests need none.

Every cluster job trains the tiny spec's model for STEPS steps on real text (the Python standard
library's sources) in its own copy of one compiled repo, so their final losses can be compared:
a job requeued with `scontrol requeue` and a job that reaches its time limit must end at the same
step with the same loss as an uninterrupted job. All jobs are submitted when the module starts (the
cluster runs two at a time) and each test waits for its own; the `scontrol requeue`s are sent by
watcher threads as soon as those jobs pass step REQUEUE_AT_STEP.

SLURM checks time limits every 30 s and sends the warning at the first check within (warning +
30 s) of the limit, so a job with a 1-minute limit and a 10 s warning got its signal anywhere from
20 to 50 s after it started (measured). The spec now refuses a limit that leaves less than 60 s
beyond the warning (sbatch may signal that early), so the jobs here have 2 minutes and a 10 s
warning: the signal comes 80 to 110 s after the start.
The first attempt of each time-limited job therefore sleeps SLOW_STEP_S after every optimizer step
(a sitecustomize.py on PYTHONPATH wraps AdamW.step; train.py itself is untouched) so that it is
still training when the signal comes; requeued attempts run at full speed. Sleeping changes no
number.

Golden files: tests/golden/<spec>/{scripts/train.sbatch,submit.py}; after an intended change,
regenerate with LLAMA3GEN_UPDATE_GOLDEN=1 python -m pytest -q tests/test_slurm.py -k golden
and review the diff.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from _train_fixtures import prepare_data, read_metrics, subprocess_env, train_losses

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
GOLDEN = Path(__file__).resolve().parent / "golden"
GOLDEN_SPECS = ["1.36e21", "h100-4node"]
GOLDEN_FILES = ["scripts/train.sbatch", "submit.py"]

VARIANT = "optimal"
STEPS = 60
TRAIN_ARGS = [f"--max_iters={STEPS}", "--log_interval=10", "--ckpt_interval=10",
              "--eval_interval=30", "--eval_iters=2"]
REQUEUE_AT_STEP = 20
SLOW_STEP_S = 2.0  # first attempts: 60 steps ≥ 120 s (+ start-up), past the 110 s worst case above
JOB_DEADLINE_S = 420  # queueing behind the other jobs included
# Runs here use one world size (2), one data order and one seed, on one machine's kernels; a
# resumed run restores weights, optimizer and data position exactly and reduces in the same order,
# so it repeats the same operations: the final loss agrees bit for bit in principle, and 1e-5
# (20 ulps of a loss near 2) only allows for gloo's reduction order. Losses move by ~0.05 from
# one logged step to the next: 1e-5 cannot hide a skipped or repeated step.
LOSS_TOLERANCE = 1e-5

SITECUSTOMIZE = '''"""tests/test_slurm.py: make the first attempt of a SLURM job slow (train.py unchanged)."""
import os
import sys

if (sys.argv and sys.argv[0].endswith("train.py")
        and os.environ.get("SLURM_RESTART_COUNT", "0") == "0"):
    import time

    import torch

    _step = torch.optim.AdamW.step

    def _slow_step(self, *args, **kwargs):
        result = _step(self, *args, **kwargs)
        time.sleep(float(os.environ["SLOW_STEP_S"]))
        return result

    torch.optim.AdamW.step = _slow_step
'''


# -----------------------------------------------------------------------------
# Helpers


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "llama3gen.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def compile_spec(spec_text, out_dir, tmp_dir):
    spec = Path(tmp_dir) / f"{Path(out_dir).name}.yaml"
    spec.write_text(spec_text)
    result = cli("compile", spec, "-o", out_dir)
    assert result.returncode == 0, result.stderr
    return Path(out_dir)


def edit_spec(text, old, new):
    assert old in text, f"specs/tiny-cpu.yaml no longer contains {old!r}"
    return text.replace(old, new)


def config_values(repo):
    """config/<variant>.py without its comments: the values a run trains with."""
    lines = (repo / "config" / f"{VARIANT}.py").read_text().splitlines()
    return [line.split("  #")[0] for line in lines if line and not line.startswith("#")]


def cluster_problem():
    """None when a two-node cluster (n1, n2) answers, else why not."""
    if shutil.which("sinfo") is None:
        return "no SLURM client (sinfo) on PATH: start a cluster with `bash .ci/slurm.sh start`"
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True,
                             timeout=15)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 15 s"
    if out.returncode != 0:
        return f"no SLURM cluster answers sinfo: {out.stderr.strip()}"
    states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
    if not {"n1", "n2"} <= states.keys():
        return f"the cluster lacks nodes n1 and n2 (has {states}): use .ci/slurm.sh"
    return None


def require_cluster():
    problem = cluster_problem()
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI needs the live SLURM cluster: {problem}")
    pytest.skip(problem)


def job_info(job_id):
    """scontrol's key=value record of a job (kept MinJobAge = 600 s after it ends)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, f"scontrol show job {job_id}: {out.stderr}"
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                   "PREEMPTED", "BOOT_FAIL", "DEADLINE"}


class Run:
    """One job: its repo copy, its SLURM job id, where its logs go."""

    def __init__(self, repo, job_id, launcher):
        self.repo, self.job_id, self.launcher = repo, job_id, launcher
        self.out_dir = repo / "out" / VARIANT
        self.requeue_error = None  # set by a watcher thread that failed to requeue

    @property
    def log_files(self):
        if self.launcher == "sbatch":
            return sorted((self.repo / "logs").glob(f"*-{self.job_id}.out"))
        return sorted((self.repo / "logs" / "submitit" / str(self.job_id)).glob("*_log.*"))

    def log_tail(self, chars=8000):
        """The end of every log file, each its share of `chars`: one rank's long traceback must not
        hide why another rank failed."""
        files = self.log_files
        share = chars // max(len(files), 1)
        return "".join(f"==> {p.name}\n{p.read_text(errors='replace')[-share:]}\n" for p in files)

    def wait(self, deadline_s=JOB_DEADLINE_S):
        """Wait until SLURM reports the job ended; returns scontrol's record."""
        end = time.monotonic() + deadline_s
        while True:
            info = job_info(self.job_id)
            if info.get("JobState") in TERMINAL_STATES:
                return info
            if time.monotonic() > end:
                subprocess.run(["scancel", str(self.job_id)], timeout=30)
                pytest.fail(f"job {self.job_id} still {info.get('JobState')} after {deadline_s} s"
                            f"\n{self.log_tail()}")
            time.sleep(1)

    def assert_completed(self):
        info = self.wait()
        assert info["JobState"] == "COMPLETED", (
            f"job {self.job_id} ended {info['JobState']} (exit {info.get('ExitCode')})\n"
            f"{self.log_tail()}")
        return info

    def logged_step(self):
        path = self.out_dir / "metrics.jsonl"
        if not path.exists():
            return 0
        return max((r["step"] for r in read_metrics(self.out_dir) if "loss" in r), default=0)


def submit(repo, *, sbatch, env):
    """`llama3gen submit` (compiler/submit.py) in a child process; returns the job id."""
    code = ("import sys; from pathlib import Path; from llama3gen.submit import submit; "
            "sys.exit(submit(Path(sys.argv[1]), sys.argv[2], False, sys.argv[3] == 'sbatch', "
            "sys.argv[4:]))")
    launcher = "sbatch" if sbatch else "submitit"
    out = subprocess.run([sys.executable, "-c", code, str(repo), VARIANT, launcher, *TRAIN_ARGS],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"llama3gen submit ({launcher}) failed:\n{out.stdout}{out.stderr}"
    pattern = r"Submitted batch job (\d+)" if sbatch else r"submitted job (\d+) \(slurm\)"
    match = re.search(pattern, out.stdout)
    assert match, f"no job id in the output of llama3gen submit:\n{out.stdout}"
    return Run(repo, int(match.group(1)), launcher)


def requeue_when_past(run, step):
    """Watcher thread: `scontrol requeue` the job once it has logged `step` (while it trains)."""
    end = time.monotonic() + JOB_DEADLINE_S
    while time.monotonic() < end:
        if run.logged_step() >= step:
            out = subprocess.run(["scontrol", "requeue", str(run.job_id)], capture_output=True,
                                 text=True, timeout=30)
            if out.returncode != 0:
                run.requeue_error = f"scontrol requeue failed: {out.stderr}"
            return
        if job_info(run.job_id).get("JobState") in TERMINAL_STATES:
            run.requeue_error = f"job ended before reaching step {step}: nothing was requeued"
            return
        time.sleep(0.2)
    run.requeue_error = f"job never reached step {step}"


def assert_resumed_like(run, reference, info):
    """The run was interrupted, saved on the signal, resumed and ended exactly as `reference`."""
    assert int(info["Restarts"]) >= 1, f"job {run.job_id} was never requeued\n{run.log_tail()}"
    records = read_metrics(run.out_dir)
    saved_on_signal = [r["step"] for r in records if r.get("event") == "requeue"]
    assert saved_on_signal, ("train.py never checkpointed on the signal (no 'requeue' event in "
                             f"metrics.jsonl)\n{run.log_tail()}")
    resumed = [r for r in records if r.get("event") == "start" and r.get("resumed_from")]
    assert resumed, f"no attempt resumed from a checkpoint\n{run.log_tail()}"
    assert any(r["step"] == saved_on_signal[0] for r in resumed), (
        f"saved at step {saved_on_signal[0]} on the signal but resumed from "
        f"{[r['resumed_from'] for r in resumed]}")
    # SLURM requeued the same job id: the restart `llama3gen calibrate` times, stop to first step
    # and a requeue is not a failure
    from llama3gen.runlog import measured_failures, measured_restarts
    restarts = measured_restarts(records)
    assert restarts and restarts["count"] >= 1 and restarts["seconds"] > 0, records
    assert "0 after an interruption" in restarts["how"], restarts
    assert measured_failures(records)["interruptions"] == 0, records
    assert_finished_like(run, reference)


def assert_finished_like(run, reference):
    losses, expected = train_losses(run.out_dir), train_losses(reference.out_dir)
    assert max(losses) == max(expected) == STEPS
    assert (run.out_dir / "checkpoints" / f"step_{STEPS:08d}").is_dir()
    assert abs(losses[STEPS] - expected[STEPS]) <= LOSS_TOLERANCE, (
        f"final loss {losses[STEPS]} differs from the uninterrupted run's {expected[STEPS]}")


# -----------------------------------------------------------------------------
# The jobs, all submitted at once


@pytest.fixture(scope="module")
def base_repo(tmp_path_factory):
    """specs/tiny-cpu.yaml compiled, with prepared data: the template every job copies."""
    tmp = tmp_path_factory.mktemp("slurm")
    repo = compile_spec((SPECS / "tiny-cpu.yaml").read_text(), tmp / "tiny", tmp)
    prepare_data(repo, data_dir="data/shards")
    return repo


@pytest.fixture(scope="module")
def jobs(base_repo, tmp_path_factory):
    require_cluster()
    tmp = tmp_path_factory.mktemp("jobs")
    spec_text = (SPECS / "tiny-cpu.yaml").read_text()
    # The same training on 2 nodes × 1 rank, and with a 1-minute limit and a 10 s warning.
    two_node = compile_spec(edit_spec(edit_spec(spec_text, "gpus_per_node: 2", "gpus_per_node: 1"),
                                      "nodes: 1", "nodes: 2"), tmp / "two-node", tmp)
    short = compile_spec(edit_spec(spec_text, 'time_limit: "00:10:00"',
                                   'time_limit: "00:02:00"\n  signal_before_s: 10'),
                         tmp / "short", tmp)
    for repo in (two_node, short):
        assert config_values(repo) == config_values(base_repo), f"{repo.name} trains differently"
        shutil.copytree(base_repo / "data", repo / "data", dirs_exist_ok=True)

    def fresh(source, name):
        return Path(shutil.copytree(source, tmp / name))

    slow_dir = tmp / "slow"
    slow_dir.mkdir()
    (slow_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = subprocess_env()
    slow = dict(env, PYTHONPATH=str(slow_dir), SLOW_STEP_S=str(SLOW_STEP_S))

    runs = {}  # longest first: SLURM starts them in submission order
    runs["sbatch_time_limit"] = submit(fresh(short, "sbatch-limit"), sbatch=True, env=slow)
    runs["submitit_time_limit"] = submit(fresh(short, "submitit-limit"), sbatch=False, env=slow)
    runs["sbatch_requeue"] = submit(fresh(base_repo, "sbatch-requeue"), sbatch=True, env=env)
    runs["submitit_requeue"] = submit(fresh(base_repo, "submitit-requeue"), sbatch=False, env=env)
    runs["sbatch"] = submit(fresh(base_repo, "sbatch"), sbatch=True, env=env)
    runs["submitit"] = submit(fresh(base_repo, "submitit"), sbatch=False, env=env)
    runs["two_node"] = submit(fresh(two_node, "two-node-run"), sbatch=True, env=env)
    watchers = [threading.Thread(target=requeue_when_past, args=(runs[name], REQUEUE_AT_STEP),
                                 daemon=True) for name in ("sbatch_requeue", "submitit_requeue")]
    for watcher in watchers:
        watcher.start()
    yield runs
    for run in runs.values():  # leave nothing running on the cluster
        subprocess.run(["scancel", str(run.job_id)], capture_output=True, timeout=30)


# -----------------------------------------------------------------------------
# Cluster tests


def test_hostile_job_name_is_passed_literally(base_repo, tmp_path):
    """Values that bypass validation still reach sbatch quoted: no command runs, the name is kept."""
    require_cluster()
    name = "it's \"x\" $(touch PWNED-1); `touch PWNED-2` & a b|c"
    repo = render_with_job(base_repo, tmp_path / "hostile", name=name)
    (repo / "logs").mkdir()
    out = subprocess.run(["sbatch", "--parsable", "scripts/train.sbatch", "$(touch PWNED-3)"],
                         cwd=repo, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    run = Run(repo, int(out.stdout.strip().split(";")[0]), "sbatch")
    info = run.wait()
    assert info["JobState"] == "FAILED"  # unknown variant: exit 2 before anything else runs
    full = subprocess.run(["scontrol", "show", "job", str(run.job_id)], capture_output=True,
                          text=True, timeout=30).stdout
    assert f"JobName={name}\n" in full
    assert "unknown variant: $(touch PWNED-3)" in run.log_tail()
    assert not list(repo.glob("PWNED*"))


def test_hostile_partition_reaches_slurm_literally(base_repo, tmp_path):
    require_cluster()
    partition = "gpu; touch PWNED-4 $(touch PWNED-5)"
    repo = render_with_job(base_repo, tmp_path / "hostile", partition=partition)
    out = subprocess.run(["sbatch", "--test-only", "scripts/train.sbatch"], cwd=repo,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert partition in out.stderr, out.stderr  # SLURM saw (and refused) exactly this name
    assert not list(repo.glob("PWNED*"))


def test_sbatch_job_trains_two_ranks(jobs):
    run = jobs["sbatch"]
    run.assert_completed()
    log = run.log_files
    assert [p.name for p in log] == [f"tiny-cpu-{run.job_id}.out"], "log not at logs/%x-%j.out"
    text = log[0].read_text()
    assert "1 node(s) × 2 rank(s)" in text and "training finished" in text
    assert "2 rank(s) on cpu" in text, "train.py did not run with 2 ranks"
    losses = train_losses(run.out_dir)
    assert max(losses) == STEPS and losses[STEPS] < losses[10]
    assert (run.out_dir / "checkpoints" / f"step_{STEPS:08d}").is_dir()
    assert nodes_recorded(run) == (2, 2)


def nodes_recorded(run):
    """(world_size, ranks_per_node) of the job's first start record, which calibrate reads."""
    start = next(r for r in read_metrics(run.out_dir) if r.get("event") == "start")
    return start["world_size"], start["ranks_per_node"]


def test_submitit_job_trains_two_ranks(jobs):
    import submitit

    run, reference = jobs["submitit"], jobs["sbatch"]
    run.assert_completed()
    folder = run.repo / "logs" / "submitit" / "%j"
    results = submitit.SlurmJob(folder=folder, job_id=str(run.job_id), tasks=(0, 1)).results()
    assert results == ["rank 0: training finished", "rank 1: training finished"]
    names = {p.name for p in run.log_files}
    assert {f"{run.job_id}_0_log.out", f"{run.job_id}_1_log.out"} <= names
    assert nodes_recorded(run) == (2, 2)  # submit.py sets LOCAL_WORLD_SIZE as torchrun does
    # Same ranks, data and seed as the torchrun job: the same training.
    reference.wait()
    assert_finished_like(run, reference)


def test_two_node_job_rendezvous_and_trains(jobs):
    run, reference = jobs["two_node"], jobs["sbatch"]
    info = run.assert_completed()
    assert info["NodeList"] == "n[1-2]" and info["NumNodes"] == "2"
    text = run.log_tail(100_000)
    assert "2 node(s) × 1 rank(s), rendezvous n1:" in text
    assert nodes_recorded(run) == (2, 1)  # torchrun's LOCAL_WORLD_SIZE on each node
    reference.wait()
    assert_finished_like(run, reference)  # 2 × 1 ranks train exactly as 1 × 2


@pytest.mark.parametrize("name", ["sbatch_requeue", "submitit_requeue"])
def test_requeued_job_resumes_and_matches(jobs, name):
    run, reference = jobs[name], jobs["sbatch"]
    info = run.assert_completed()
    assert run.requeue_error is None, f"{run.requeue_error}\n{run.log_tail()}"
    reference.assert_completed()
    assert_resumed_like(run, reference, info)


@pytest.mark.parametrize("name", ["sbatch_time_limit", "submitit_time_limit"])
def test_job_at_time_limit_requeues_resumes_and_matches(jobs, name):
    run, reference = jobs[name], jobs["sbatch"]
    info = run.assert_completed()
    assert info["TimeLimit"] == "00:02:00"
    reference.assert_completed()
    assert_resumed_like(run, reference, info)


# -----------------------------------------------------------------------------
# Without a cluster: golden files, syntax, quoting, llama3gen submit's errors, --local


def rendered(spec_name):
    from llama3gen.planner import build_plan
    from llama3gen.render import render_files
    from llama3gen.spec import load_spec

    spec, text = load_spec(SPECS / f"{spec_name}.yaml")
    return render_files(build_plan(spec), text)


@pytest.mark.parametrize("spec_name", GOLDEN_SPECS)
def test_golden_job_files(spec_name):
    files = rendered(spec_name)
    for path in GOLDEN_FILES:
        golden = GOLDEN / spec_name / path
        actual = files[path].decode()
        if os.environ.get("LLAMA3GEN_UPDATE_GOLDEN") == "1":
            golden.parent.mkdir(parents=True, exist_ok=True)
            golden.write_text(actual)
        assert golden.exists(), f"no golden file {golden}: run with LLAMA3GEN_UPDATE_GOLDEN=1"
        assert actual == golden.read_text(), (
            f"{path} for specs/{spec_name}.yaml differs from {golden.relative_to(ROOT)}; if "
            "intended, regenerate with LLAMA3GEN_UPDATE_GOLDEN=1 and review the diff")


def test_h100_job_asks_for_what_the_spec_says():
    """The 4-node spec's numbers reach the sbatch lines and submit.py's parameters, once each."""
    files = rendered("h100-4node")
    sbatch = files["scripts/train.sbatch"].decode()
    directives = [line.split(None, 1)[1] for line in sbatch.splitlines()
                  if line.startswith("#SBATCH")]
    for flag in ["--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--cpus-per-task=12",
                 "--mem=1800G", "--partition=h100", "--account=llm-pretrain", "--qos=high",
                 "--time=2-00:00:00", "--signal=B:USR1@600", "--requeue"]:
        assert directives.count(flag) == 1, flag
    body = "\n".join(line for line in sbatch.splitlines() if not line.startswith("#"))
    assert not re.search(r"\b(4|8|12|1800)\b", body), "a Plan number is repeated in the script body"
    submit_py = files["submit.py"].decode()
    namespace = {}
    exec(compile(submit_py, "submit.py", "exec"), namespace)
    assert namespace["SLURM_PARAMETERS"] == {
        "name": "llama3-h100-4node", "nodes": 4, "tasks_per_node": 8, "cpus_per_task": 12,
        "gpus_per_node": 8, "mem_gb": 1800, "slurm_partition": "h100",
        "slurm_account": "llm-pretrain", "slurm_qos": "high", "slurm_signal_delay_s": 600,
        "slurm_additional_parameters": {"requeue": True}}
    assert namespace["time_limit_minutes"]("2-00:00:00") == 2880
    assert namespace["time_limit_minutes"]("00:00:01") == 1


@pytest.mark.parametrize("spec_name", ["tiny-cpu", *GOLDEN_SPECS])
def test_generated_scripts_pass_bash_n(spec_name, tmp_path):
    files = rendered(spec_name)
    scripts = [path for path in files if path.endswith((".sh", ".sbatch"))]
    assert "scripts/train.sbatch" in scripts
    for path in scripts:
        target = tmp_path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(files[path])
        check = subprocess.run(["bash", "-n", str(target)], capture_output=True, text=True)
        assert check.returncode == 0, f"{path}: {check.stderr}"


HOSTILE = ["gpu; rm -rf ~", "a b", "it's", 'say"hi"', "$(touch PWNED)", "`id`", "gpu\nrm x",
           "-p", "gpu&", "x|y", "gpu\n"]


@pytest.mark.parametrize("field", ["name", "cluster.partition", "cluster.account", "cluster.qos"])
def test_spec_refuses_hostile_names(field):
    import yaml

    from llama3gen.errors import UserError
    from llama3gen.spec import parse_spec_text

    base = yaml.safe_load((SPECS / "tiny-cpu.yaml").read_text())
    for value in HOSTILE:
        spec = dict(base, cluster=dict(base["cluster"]))
        if field == "name":
            spec["name"] = value
        else:
            spec["cluster"][field.split(".")[1]] = value
        with pytest.raises(UserError) as error:
            parse_spec_text(yaml.safe_dump(spec), "hostile.yaml")
        assert error.value.field == field, f"{field}={value!r}: {error.value.render()}"


def render_with_job(base_repo, out_dir, **job_fields):
    """The tiny repo, re-rendered with job fields that skip the Spec's validation."""
    from llama3gen.planner import build_plan
    from llama3gen.render import render_files
    from llama3gen.spec import load_spec

    spec, text = load_spec(SPECS / "tiny-cpu.yaml")
    plan = build_plan(spec)
    plan = plan.model_copy(update={"job": plan.job.model_copy(update=job_fields)})
    shutil.copytree(base_repo, out_dir)
    for path, data in render_files(plan, text).items():
        if path in GOLDEN_FILES:
            (out_dir / path).write_bytes(data)
    return out_dir


def test_hostile_values_are_quoted_in_both_job_files(base_repo, tmp_path):
    """Defence in depth: even unvalidated values stay data in bash and in Python."""
    hostile = {"name": "n'1 $(touch PWNED-a)", "partition": "p; touch PWNED-b",
               "account": 'a"`touch PWNED-c`', "qos": "q && touch PWNED-d",
               "variants": ["optimal", "v'; touch PWNED-e; '"]}
    repo = render_with_job(base_repo, tmp_path / "repo", **hostile)
    sbatch = (repo / "scripts" / "train.sbatch").read_text()
    check = subprocess.run(["bash", "-n", "scripts/train.sbatch"], cwd=repo, capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stderr
    directives = dict(line[len("#SBATCH "):].split("=", 1) for line in sbatch.splitlines()
                      if line.startswith("#SBATCH --") and "=" in line)
    for flag, field in [("--job-name", "name"), ("--partition", "partition"),
                        ("--account", "account"), ("--qos", "qos")]:
        assert shlex.split(directives[flag]) == [hostile[field]], flag
    # The variant check runs and refuses the injected-looking variant as a plain word.
    env = dict(subprocess_env(), SLURM_JOB_NODELIST="n1", SLURM_JOB_ID="1")
    probe = subprocess.run(["bash", "scripts/train.sbatch", "v'; touch PWNED-f; '"], cwd=repo,
                           env=env, capture_output=True, text=True, timeout=30)
    assert probe.returncode == 2 and "unknown variant" in probe.stderr
    # submit.py holds them as Python literals.
    dry = subprocess.run([sys.executable, "submit.py", "--dry-run"], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    for field in ("name", "partition", "account", "qos"):
        assert repr(hostile[field]) in dry.stdout
    assert not list(repo.glob("PWNED*"))


def test_llama3gen_submit_errors(base_repo, tmp_path, monkeypatch):
    from llama3gen.errors import UserError
    from llama3gen.submit import submit

    with pytest.raises(UserError, match="not a generated repo"):
        submit(tmp_path, None, dry_run=True, use_sbatch=True)
    with pytest.raises(UserError, match="unknown variant 'nope'"):
        submit(base_repo, "nope", dry_run=True, use_sbatch=True)
    with pytest.raises(UserError, match="unexpected argument 'max_iters=3'") as error:
        submit(base_repo, None, dry_run=True, use_sbatch=True, overrides=["max_iters=3"])
    assert "--key=value" in error.value.fix
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    with pytest.raises(UserError, match="sbatch is not on PATH"):
        submit(base_repo, None, dry_run=False, use_sbatch=True)
    assert not (base_repo / "logs").exists()


def test_llama3gen_submit_dry_run_shows_the_job(base_repo, capfd):
    from llama3gen.submit import submit

    assert submit(base_repo, None, dry_run=True, use_sbatch=True) == 0
    out = capfd.readouterr().out
    assert "sbatch scripts/train.sbatch optimal" in out
    assert "#SBATCH --ntasks-per-node=2" in out and "#SBATCH --time=00:10:00" in out
    assert submit(base_repo, "chinchilla", dry_run=True, use_sbatch=False) == 0
    out = capfd.readouterr().out
    assert "tasks_per_node = 2" in out and "each task runs: python train.py config/chinchilla.py" in out


def test_submit_py_local_trains_two_ranks(base_repo, tmp_path):
    """python submit.py --local: submitit's LocalExecutor runs the 2 ranks here and waits."""
    repo = Path(shutil.copytree(base_repo, tmp_path / "local"))
    out = subprocess.run([sys.executable, "submit.py", "--local", *TRAIN_ARGS], cwd=repo,
                         env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "rank 0: training finished" in out.stdout and "rank 1: training finished" in out.stdout
    losses = train_losses(repo / "out" / VARIANT)
    assert max(losses) == STEPS and losses[STEPS] < losses[10]
    job_id = re.search(r"submitted job (\d+) \(local\)", out.stdout).group(1)
    assert (repo / "logs" / "submitit" / job_id / f"{job_id}_0_log.out").exists()


def test_submit_py_master_port_stays_below_ephemeral_ports(base_repo, monkeypatch):
    """Rank 0's store port comes from the job id in 20000-29999, like scripts/train.sbatch's, not
    from submitit's 20000-60000: CI's job 21530268 got 49368 there, inside Linux's ephemeral
    ports, and its rank 0 died at start-up while rank 1 waited for the store until the time limit."""
    import importlib.util

    module_spec = importlib.util.spec_from_file_location("generated_submit", base_repo / "submit.py")
    generated = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(generated)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    lowest_ephemeral = 32768  # Linux's default net.ipv4.ip_local_port_range starts here
    for job_id in ("21530268", "9999", "10000", "123456789"):
        monkeypatch.setenv("SLURM_JOB_ID", job_id)
        port = generated.master_port()
        assert port == 20000 + int(job_id) % 10000 and 20000 <= port < lowest_ephemeral
    monkeypatch.setenv("MASTER_PORT", "12345")  # the user's choice wins
    assert generated.master_port() == 12345


def test_sbatch_benchmark_option_times_the_real_nodes(base_repo, tmp_path):
    """`sbatch scripts/train.sbatch optimal --benchmark`: train.py's --benchmark_iters run as a
    job (issue #18 part 1): one benchmark record, no checkpoint, and calibrate reads it."""
    require_cluster()
    repo = Path(shutil.copytree(base_repo, tmp_path / "bench"))
    (repo / "logs").mkdir(exist_ok=True)
    env = dict(subprocess_env(), BENCHMARK_ITERS="3")
    out = subprocess.run(["sbatch", "--parsable", "scripts/train.sbatch", VARIANT, "--benchmark"],
                         cwd=repo, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    run = Run(repo, int(out.stdout.strip().split(";")[0]), "sbatch")
    run.assert_completed()
    records = [r for r in read_metrics(run.out_dir) if r.get("event") == "benchmark"]
    assert len(records) == 1 and records[0]["steps"] == 3, records
    assert not (run.out_dir / "checkpoints").exists() or not any((run.out_dir / "checkpoints").iterdir())
    assert cli("calibrate", run.out_dir).returncode == 0
