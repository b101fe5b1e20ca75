"""Hostile use of `llama3gen compile` and `check` (issue 14, items 3, 4, 6, 7, 8, 12, 13, 21).

Every test compiles real repos into real folders with the CLI in a child process
(tests/_forked_cli.py), edits or breaks them as a user would, and re-compiles. Kills and
interrupts at a chosen point are real signals sent by the child to itself from inside os.replace
or the writer's file writes, installed in the child only (see `at_call`).
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _forked_cli import run_cli_forked, start_cli_forked

from llama3gen import writer
from llama3gen.render import LOCK_NAME
from llama3gen.writer import JOURNAL_NAME, LOCK_SUFFIX, STAGING_SUFFIX, lock_path

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "specs" / "tiny-cpu.yaml"
ONLY_OPTIMAL = "variants:\n  - {name: optimal}\n"


def cli(args, cwd):
    return run_cli_forked([str(a) for a in args], cwd=cwd)


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def leftovers(root: Path) -> list[str]:
    """What a compile may leave only while it runs: staged files, journals, lock files."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.name.endswith((STAGING_SUFFIX, LOCK_SUFFIX, ".llama3gen-tmp"))
                  or p.name == JOURNAL_NAME)


def one_error_line(result) -> str:
    """A user error: exit 2, `error: ...` plus at most a `fix:` line, never a traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and all(l.startswith("  fix: ") for l in lines[1:]), lines
    assert len(lines) <= 2, lines
    return result.stderr


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    d = tmp_path_factory.mktemp("specs")
    (d / "v1.yaml").write_text(TINY.read_text())
    (d / "v2.yaml").write_text(TINY.read_text().replace("flops: 5.0e12", "flops: 8.0e12"))
    (d / "optimal.yaml").write_text(TINY.read_text() + ONLY_OPTIMAL)
    return d


@pytest.fixture(scope="module")
def compiled(specs, tmp_path_factory):
    """A pristine repo of v1, copied by each test that changes it."""
    work = tmp_path_factory.mktemp("compiled")
    assert cli(["compile", specs / "v1.yaml", "-o", "repo"], work).returncode == 0
    return work / "repo"


@pytest.fixture
def repo(compiled, tmp_path):
    shutil.copytree(compiled, tmp_path / "repo", symlinks=True)
    return tmp_path / "repo"


def check(repo: Path, spec: Path) -> bool:
    return cli(["check", repo, "--spec", spec], repo.parent).returncode == 0


# --- 3: obsolete files the user edited ------------------------------------------------------

def test_obsolete_edited_file_is_refused_without_force_and_named(repo, specs):
    chinchilla = repo / "config" / "chinchilla.py"
    chinchilla.write_text(chinchilla.read_text() + "# my tuning\n")
    before = snapshot(repo)
    result = cli(["compile", specs / "optimal.yaml", "-o", repo], repo.parent)
    err = one_error_line(result)
    assert "config/chinchilla.py" in err and "--force" in err
    assert snapshot(repo) == before
    r = cli(["check", repo, "--spec", specs / "optimal.yaml"], repo.parent)
    assert r.returncode == 1 and "no longer generated, edited by hand: config/chinchilla.py" in r.stdout
    result = cli(["compile", specs / "optimal.yaml", "-o", repo, "--force"], repo.parent)
    assert result.returncode == 0, result.stderr
    assert not chinchilla.exists() and check(repo, specs / "optimal.yaml")


def test_obsolete_unedited_file_is_removed(repo, specs):
    (repo / "notes.txt").write_text("mine\n")
    result = cli(["compile", specs / "optimal.yaml", "-o", repo], repo.parent)
    assert result.returncode == 0 and "removed 1 no longer generated" in result.stdout, result.stderr
    assert not (repo / "config" / "chinchilla.py").exists()
    assert (repo / "notes.txt").read_text() == "mine\n"
    assert check(repo, specs / "optimal.yaml") and not leftovers(repo.parent)


def test_obsolete_file_the_user_deleted_is_not_counted(repo, specs):
    (repo / "config" / "chinchilla.py").unlink()
    result = cli(["compile", specs / "optimal.yaml", "-o", repo], repo.parent)
    assert result.returncode == 0 and "removed" not in result.stdout, result.stdout


# --- 4: deletions never go through links ----------------------------------------------------

def test_obsolete_file_behind_a_symlinked_directory_is_not_deleted(repo, specs, tmp_path):
    outside = tmp_path / "outside"
    shutil.move(repo / "config", outside)
    (repo / "config").symlink_to(outside)
    before = snapshot(outside)
    for force in ([], ["--force"]):
        result = cli(["compile", specs / "optimal.yaml", "-o", repo, *force], repo.parent)
        assert "symbolic link" in one_error_line(result)
        assert snapshot(outside) == before


def test_obsolete_file_that_is_a_symlink_is_not_followed(repo, specs, tmp_path):
    (tmp_path / "precious.py").write_text("do not touch\n")
    (repo / "config" / "chinchilla.py").unlink()
    (repo / "config" / "chinchilla.py").symlink_to(tmp_path / "precious.py")
    result = cli(["compile", specs / "optimal.yaml", "-o", repo, "--force"], repo.parent)
    assert "symbolic link" in one_error_line(result)
    assert (tmp_path / "precious.py").read_text() == "do not touch\n"


def test_lock_naming_paths_outside_the_repo_deletes_nothing(repo, specs, tmp_path):
    (tmp_path / "victim.txt").write_text("x\n")
    lock = json.loads((repo / LOCK_NAME).read_text())
    lock["files"]["../victim.txt"] = "0" * 64
    (repo / LOCK_NAME).write_text(json.dumps(lock))
    for cmd in (["compile", specs / "optimal.yaml", "-o", repo, "--force"], ["check", repo]):
        one_error_line(cli(cmd, repo.parent))
    assert (tmp_path / "victim.txt").read_text() == "x\n"


# --- 6: --force never writes into a directory llama3gen did not generate --------------------

def test_force_on_a_foreign_directory_is_refused(specs, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my project\n")
    (mine / "train.py").write_text("print('mine')\n")
    before = snapshot(mine)
    for force in ([], ["--force"]):
        err = one_error_line(cli(["compile", specs / "v1.yaml", "-o", mine, *force], tmp_path))
        assert "not empty" in err and "did not generate" in err
        assert "pass --force" not in err  # --force would not help: do not suggest it
        assert snapshot(mine) == before and not leftovers(tmp_path)


def test_force_never_overwrites_a_file_the_lock_does_not_list(repo, specs):
    # A user's own config/extra.py where a new variant "extra" would be generated.
    (repo / "config" / "extra.py").write_text("# mine\n")
    spec = repo.parent / "extra.yaml"
    spec.write_text(TINY.read_text() + "variants:\n  - {name: optimal}\n  - {name: extra}\n")
    before = snapshot(repo)
    for force in ([], ["--force"]):
        err = one_error_line(cli(["compile", spec, "-o", repo, *force], repo.parent))
        assert "config/extra.py" in err and "did not generate" in err
        assert snapshot(repo) == before


# --- 7: one compile at a time ---------------------------------------------------------------

def test_second_compile_waits_for_the_lock_then_finishes(repo, specs, tmp_path):
    # Another process holds the lock (a separate one: a forked child would share our lock).
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'w'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",  # until killed
         str(lock_path(repo))], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        err_path = tmp_path / "err"
        with open(tmp_path / "out", "wb") as out, open(err_path, "wb") as err:
            pid = start_cli_forked(["compile", specs / "v2.yaml", "-o", repo], tmp_path,
                                   out.fileno(), err.fileno())
        deadline = time.monotonic() + 30
        while b"waiting" not in err_path.read_bytes() and time.monotonic() < deadline:
            assert os.waitpid(pid, os.WNOHANG)[0] == 0, err_path.read_text()
            time.sleep(0.01)
        time.sleep(0.2)
        assert os.waitpid(pid, os.WNOHANG)[0] == 0  # still waiting, and has written nothing
        assert "waiting for another llama3gen process" in err_path.read_text()
        assert "5.0e12" in json.loads((repo / LOCK_NAME).read_text())["spec_text"]
        assert not list(repo.rglob(f"*{STAGING_SUFFIX}"))
    finally:  # a signal, not EOF: the forked compile holds a copy of the holder's stdin pipe
        holder.kill()
        holder.wait(timeout=30)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, err_path.read_text()
    assert check(repo, specs / "v2.yaml") and not leftovers(tmp_path)


def test_two_concurrent_compiles_leave_one_whole_repo(specs, tmp_path):
    for round_ in range(3):
        work = tmp_path / f"round{round_}"
        work.mkdir()
        files = [open(work / name, "w+b") for name in ("o1", "e1", "o2", "e2")]
        pids = [start_cli_forked(["compile", specs / f"v{i}.yaml", "-o", "repo"], work,
                                 files[2 * i - 2].fileno(), files[2 * i - 1].fileno()) for i in (1, 2)]
        codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
        errors = [(work / f"e{i}").read_text() for i in (1, 2)]
        assert codes == [0, 0], errors
        assert not any("Traceback" in e or "internal error" in e for e in errors), errors
        whole = [check(work / "repo", specs / f"v{i}.yaml") for i in (1, 2)]
        assert whole.count(True) == 1, (whole, errors)
        assert not leftovers(work), leftovers(work)


# --- 8: interrupted updates are finished or undone, and said truthfully -----------------------

def at_call(monkeypatch, name: str, n: int, signum: int):
    """In forked children only: the n-th call of os.<name> (os.replace: a rename into place;
    os.fsync: a staged file written) is followed by the child sending itself `signum`."""
    parent, original, calls = os.getpid(), getattr(os, name), []

    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        if os.getpid() != parent:
            calls.append(args)
            if len(calls) == n:
                os.kill(os.getpid(), signum)
        return result
    monkeypatch.setattr(os, name, wrapped)


def run_with(monkeypatch, args, cwd, name, n, signum):
    at_call(monkeypatch, name, n, signum)
    try:
        return cli(args, cwd)
    finally:
        monkeypatch.undo()


# os.replace calls in an update: the staging journal, the committed journal, then each file.
@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_sigkill_at_a_rename_then_check_and_compile_see_the_truth(repo, specs, monkeypatch, n):
    v1, v2 = specs / "v1.yaml", specs / "v2.yaml"
    (repo / "notes.txt").write_text("mine\n")
    result = run_with(monkeypatch, ["compile", v2, "-o", repo], repo.parent, "replace", n,
                      signal.SIGKILL)
    assert result.returncode == -signal.SIGKILL
    assert (repo / JOURNAL_NAME).exists()
    committed = n >= 2
    r = cli(["check", repo, "--spec", v1], repo.parent)  # finishes or undoes the update first
    assert "edited by hand" not in r.stdout, r.stdout
    assert r.returncode == (1 if committed else 0), r.stdout
    assert ("finished" if committed else "had not replaced") in r.stderr, r.stderr
    assert check(repo, v2) == committed
    assert not leftovers(repo.parent), leftovers(repo.parent)
    # The original spec re-compiles without --force either way.
    result = cli(["compile", v1, "-o", repo], repo.parent)
    assert result.returncode == 0, result.stderr
    assert check(repo, v1) and (repo / "notes.txt").read_text() == "mine\n"


@pytest.mark.parametrize("n", [2, 4])
def test_sigkill_while_staging_then_compile_rolls_back_first(repo, specs, monkeypatch, n):
    # os.fsync: 1 the staging journal, 2 its directory (the journal is in place), then one per
    # staged file.
    before = snapshot(repo)
    result = run_with(monkeypatch, ["compile", specs / "v2.yaml", "-o", repo], repo.parent,
                      "fsync", n, signal.SIGKILL)
    assert result.returncode == -signal.SIGKILL
    assert (repo / JOURNAL_NAME).exists() and (any(repo.rglob(f"*{STAGING_SUFFIX}")) or n == 2)
    result = cli(["compile", specs / "v1.yaml", "-o", repo], repo.parent)
    assert result.returncode == 0 and "had not replaced" in result.stderr, result.stderr
    assert snapshot(repo) == before and not leftovers(repo.parent)


def test_sigint_during_the_renames_completes_and_says_so(repo, specs, monkeypatch):
    result = run_with(monkeypatch, ["compile", specs / "v2.yaml", "-o", repo], repo.parent,
                      "replace", 4, signal.SIGINT)
    assert result.returncode == 130, result.stderr
    assert "nothing was written" not in result.stderr
    assert "interrupted; the update was complete: updated" in result.stderr, result.stderr
    assert check(repo, specs / "v2.yaml") and not leftovers(repo.parent)


def test_sigint_while_staging_writes_nothing_and_says_so(repo, specs, monkeypatch):
    before = snapshot(repo)
    result = run_with(monkeypatch, ["compile", specs / "v2.yaml", "-o", repo], repo.parent,
                      "fsync", 4, signal.SIGINT)
    assert result.returncode == 130 and "interrupted; nothing was written" in result.stderr, result.stderr
    assert snapshot(repo) == before and not leftovers(repo.parent)


def test_sigkill_filling_an_empty_directory_is_rolled_back(specs, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_with(monkeypatch, ["compile", specs / "v1.yaml", "-o", "."], empty, "fsync", 5,
                      signal.SIGKILL)
    assert result.returncode == -signal.SIGKILL
    result = cli(["compile", specs / "v1.yaml", "-o", "."], empty)  # not "not empty": rolled back first
    assert result.returncode == 0, result.stderr
    assert check(empty, specs / "v1.yaml") and not leftovers(tmp_path)


# --- 12: user errors, not internal ones -----------------------------------------------------

@pytest.mark.parametrize("text", ["[]", "null", "3", '"x"', '{"files": []}', '{"files": {"a": 1}}',
                                  '{"files": {}, "spec_text": 5}', "{not json"])
def test_lock_that_is_not_a_lock_object(repo, specs, text):
    (repo / LOCK_NAME).write_text(text)
    for cmd in (["compile", specs / "v1.yaml", "-o", repo], ["compile", specs / "v1.yaml", "-o", repo, "--force"],
                ["check", repo]):
        err = one_error_line(cli(cmd, repo.parent))
        assert LOCK_NAME in err and "git checkout" in err


def test_the_fix_printed_for_an_unusable_lock_works(repo, specs):
    (repo / "notes.txt").write_text("mine\n")
    (repo / LOCK_NAME).write_text("[]")
    err = one_error_line(cli(["compile", specs / "v1.yaml", "-o", repo, "--force"], repo.parent))
    assert "--force" not in err  # it would not work: --force needs the lock
    # "restore it (git checkout ...)": from git, as the fix says
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(repo)]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    fresh = cli(["compile", specs / "v1.yaml", "-o", repo.parent / "fresh"], repo.parent)
    assert fresh.returncode == 0  # "or compile into a new directory with -o": works
    shutil.copy(repo.parent / "fresh" / LOCK_NAME, repo / LOCK_NAME)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    (repo / LOCK_NAME).write_text("[]")
    subprocess.run([*git, "checkout", "--", LOCK_NAME], check=True)
    assert cli(["compile", specs / "v2.yaml", "-o", repo], repo.parent).returncode == 0
    assert check(repo, specs / "v2.yaml") and (repo / "notes.txt").read_text() == "mine\n"


@pytest.mark.parametrize("kind", ["dir-for-file", "file-for-dir", "fifo-for-file"])
def test_something_in_the_way_of_a_generated_path(repo, specs, kind):
    if kind == "dir-for-file":
        (repo / "train.py").unlink()
        (repo / "train.py").mkdir()
        (repo / "train.py" / "mine.txt").write_text("mine\n")
    elif kind == "file-for-dir":
        shutil.rmtree(repo / "config")
        (repo / "config").write_text("mine\n")
    else:
        (repo / "train.py").unlink()
        os.mkfifo(repo / "train.py")  # reading it would hang
    before = snapshot(repo)
    for force in ([], ["--force"]):
        err = one_error_line(cli(["compile", specs / "v2.yaml", "-o", repo, *force], repo.parent))
        assert ("train.py" if kind != "file-for-dir" else "config") in err and "in the way" in err
        assert snapshot(repo) == before and not leftovers(repo.parent)
    r = cli(["check", repo], repo.parent)
    assert r.returncode == 1 and "in the way: " in r.stdout and "Traceback" not in r.stderr, r.stderr


def test_compile_dot_from_inside_a_new_empty_directory(specs, tmp_path):
    here = tmp_path / "here"
    here.mkdir()
    result = cli(["compile", specs / "v1.yaml", "-o", "."], here)
    assert result.returncode == 0, result.stderr
    assert (here / "train.py").exists() and check(here, specs / "v1.yaml")
    assert cli(["check", "."], here).returncode == 0
    assert cli(["compile", specs / "v2.yaml", "-o", "."], here).returncode == 0
    assert check(here, specs / "v2.yaml") and not leftovers(tmp_path)


# --- 13: Markdown tables and printed commands -----------------------------------------------

def _cells(row: str) -> int:
    """Cells of a Markdown table row: pipes not escaped with a backslash."""
    return row.replace("\\|", "").count("|") - 1


def test_pipe_in_a_description_keeps_the_variants_table(tmp_path):
    spec = tmp_path / "pipe.yaml"
    spec.write_text(TINY.read_text() + "variants:\n  - {name: optimal, description: 'a | b || c'}\n"
                    "  - {name: small, description: 'x|y', params: {max: 2.0e5}}\n")
    assert cli(["compile", spec, "-o", "repo"], tmp_path).returncode == 0
    text = (tmp_path / "repo" / "docs" / "comparison.md").read_text()
    table = text.split("## Side by side\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert len(table) > 10 and {_cells(row) for row in table} == {3}, table
    assert "a \\| b \\|\\| c" in text


def test_submit_dry_run_prints_a_command_that_runs_as_given(compiled):
    overrides = ["--out_dir=my runs/it's here", "--wandb_run_name=$(touch pwned)"]
    r = subprocess.run([sys.executable, "submit.py", "--dry-run", *overrides], cwd=compiled,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    line = next(l for l in r.stdout.splitlines() if l.startswith("each task runs: "))
    command = shlex.split(line.removeprefix("each task runs: "))
    assert command == ["python", "train.py", "config/optimal.py", *overrides]


# --- 21: generated docs carry no project history --------------------------------------------

def test_comparison_doc_has_the_reasoning_but_not_the_history(compiled):
    text = (compiled / "docs" / "comparison.md").read_text()
    for history in ("grid-search", "report", "replaces", "27.7", "15 and 10 days"):
        assert history not in text, history
    for reasoning in ("How the numbers are computed", "D = C / FLOPs per token", "T²·d",
                      "Tokens divided by parameters", "GPUs × peak × MFU"):
        assert reasoning in text, reasoning
    history = (REPO / "docs" / "HISTORY.md").read_text()
    assert "grid-search" in history and "27.7" in history and "D/(20N)" in history
