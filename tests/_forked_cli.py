"""Run `llama3gen` commands in child processes without paying interpreter start-up each time.

`python -m llama3gen.cli` costs about half a second before it reads a byte (Python, pydantic, numpy,
jinja2), which is most of the time of a bad-input test. `run_cli_forked` forks this process, which
has llama3gen imported already, and runs `llama3gen.cli.main(args)` in the child: a separate
process with its own working directory, stdout, stderr and exit status, killed if it outlives a
timeout. A test that also needs the import path itself checked uses a real `python -m` run.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path


@dataclass
class CliResult:
    returncode: int | None  # None when the child was killed for outliving the timeout
    stdout: str
    stderr: str
    timed_out: bool


def start_cli_forked(args, cwd: Path, stdout_fd: int, stderr_fd: int) -> int:
    """Fork a child that runs `llama3gen <args>` in cwd with the given output files; its pid."""
    # Import in the parent what the commands import lazily, so each child starts with it loaded.
    from llama3gen import cli, planner, render, report, spec, writer  # noqa: F401

    pid = os.fork()
    if pid:
        return pid
    code = 1  # the child: never returns into the test runner
    try:
        os.chdir(cwd)
        os.dup2(stdout_fd, 1)
        os.dup2(stderr_fd, 2)
        sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), write_through=True)
        sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), write_through=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            code = cli.main([str(a) for a in args])
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:  # what `python -m` would do with an escaping exception
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code if isinstance(code, int) else 1)


def run_cli_forked(args, cwd: Path, timeout: float = 60.0) -> CliResult:
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = start_cli_forked(args, cwd, out.fileno(), err.fileno())
        deadline = time.monotonic() + timeout
        timed_out = False
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                _, status = os.waitpid(pid, 0)
                timed_out = True
                break
            time.sleep(0.005)
        out.seek(0)
        err.seek(0)
        returncode = None if timed_out else os.waitstatus_to_exitcode(status)
        return CliResult(returncode, out.read().decode("utf-8", "replace"),
                         err.read().decode("utf-8", "replace"), timed_out)
