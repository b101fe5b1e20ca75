"""`llama3gen submit DIR`: hand a generated repo's job to SLURM.

The job itself is defined in the generated repo (scripts/train.sbatch, submit.py), rendered from the
Plan; this module only checks the repo and runs one of them, from the repo root:

    sbatch scripts/train.sbatch <variant> [--key=value ...]        (--sbatch)
    python submit.py --variant <variant> [--key=value ...]         (default: submitit)
    sbatch scripts/sweep.sbatch [--key=value ...]                  (--sweep --sbatch)
    python submit.py --sweep [--key=value ...]                     (--sweep)
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import UserError
from .render import LOCK_NAME, read_lock_plan

SBATCH_SCRIPT = "scripts/train.sbatch"
SWEEP_SBATCH_SCRIPT = "scripts/sweep.sbatch"
SUBMITIT_SCRIPT = "submit.py"


def submit(repo_dir: Path, variant: str | None, dry_run: bool, use_sbatch: bool,
           overrides: Sequence[str] = (), sweep: bool = False) -> int:
    """Submit the repo's training job; return the exit status of sbatch or submit.py.

    `overrides` are train.py's `--key=value` arguments (e.g. `--max_iters=100`).
    """
    repo_dir = Path(repo_dir)
    job = _job_of(repo_dir)
    variant = variant or job["default_variant"]
    if variant not in job["variants"]:
        raise UserError(f"unknown variant {variant!r}", where=str(repo_dir),
                        fix=f"choose one of: {', '.join(job['variants'])}")
    for arg in overrides:
        if not (arg.startswith("--") and "=" in arg):
            raise UserError(f"unexpected argument {arg!r}",
                            fix="train.py overrides look like --key=value, e.g. --max_iters=100")

    sbatch_script = SWEEP_SBATCH_SCRIPT if sweep else SBATCH_SCRIPT
    script = sbatch_script if use_sbatch else SUBMITIT_SCRIPT
    if sweep and not (repo_dir / SWEEP_SBATCH_SCRIPT).is_file():
        raise UserError("this repo has no sweep", where=str(repo_dir),
                        fix="add a sweep: section to the spec and re-compile")
    if not (repo_dir / script).is_file():
        raise UserError(f"{script} is missing", where=str(repo_dir),
                        fix="re-compile the repo (llama3gen compile SPEC -o DIR)")
    if use_sbatch:
        command = ["sbatch", sbatch_script, *([] if sweep else [variant]), *overrides]
    else:
        # The interpreter running llama3gen: the environment the user installed things into.
        command = [sys.executable, SUBMITIT_SCRIPT,
                   *(["--sweep"] if sweep else ["--variant", variant]), *overrides]
        if dry_run:
            command.append("--dry-run")

    shown = " ".join(shlex.quote(part) for part in command)
    if use_sbatch and dry_run:
        print(f"would run, in {repo_dir}: {shown}")
        for line in (repo_dir / sbatch_script).read_text(encoding="utf-8").splitlines():
            if line.startswith("#SBATCH"):
                print(f"  {line}")
        return 0
    if not dry_run and shutil.which("sbatch") is None:
        raise UserError("sbatch is not on PATH: this machine cannot submit to SLURM",
                        fix="run on a SLURM login node, or use --dry-run to see what would be "
                            "submitted (python submit.py --local runs the job here)")

    if not dry_run:
        # sbatch opens logs/%x-%j.out before the script runs: without logs/ the job fails silently.
        (repo_dir / "logs").mkdir(exist_ok=True)
    print(f"running, in {repo_dir}: {shown}", flush=True)
    return subprocess.run(command, cwd=repo_dir).returncode


def _job_of(repo_dir: Path) -> dict:
    if not repo_dir.is_dir():
        raise UserError("no such directory", where=str(repo_dir),
                        fix="pass the directory `llama3gen compile` wrote")
    job = read_lock_plan(repo_dir).get("job")
    if not isinstance(job, dict) or not {"variants", "default_variant"} <= job.keys():
        raise UserError(f"{LOCK_NAME} has no job section (written by an older llama3gen?)",
                        where=str(repo_dir / LOCK_NAME),
                        fix="re-compile the repo with this llama3gen")
    return job
