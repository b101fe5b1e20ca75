"""The bad-spec corpus (tests/bad_specs/) through `llama3gen solve` and `compile`.

Every case ends in exit 0, or exit 2 with a one-paragraph message that names the spec file (with
line:column where the YAML has one), the field and what was wrong; never a traceback, never a
hang, and a failed compile leaves nothing behind: no output tree, no temporary directory.
tests/bad_specs/INDEX says what each case must produce.

Each case runs in a forked child process (tests/_forked_cli.py: same CLI entry point, no 0.5 s
interpreter start-up per case); a sample of the corpus also goes through `python -m llama3gen.cli`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from _forked_cli import run_cli_forked

CORPUS = Path(__file__).resolve().parent / "bad_specs"
REPO = CORPUS.parent.parent
TIMEOUT_S = 60


@dataclass(frozen=True)
class Case:
    file: str
    exit: int
    where: str | None  # "line:column" the message must name after the file, or None
    field: str | None
    message: str | None

    @property
    def path(self) -> Path:
        return CORPUS / self.file


def load_index() -> list[Case]:
    cases = []
    for line in (CORPUS / "INDEX").read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        file, code, where, field, message = line.split(None, 4)
        none = lambda s: None if s == "-" else s  # noqa: E731
        cases.append(Case(file, int(code), none(where), none(field), none(message.strip())))
    return cases


CASES = load_index()
IDS = [c.file.removesuffix(".yaml") for c in CASES]


def test_index_and_corpus_agree():
    listed = [c.file for c in CASES]
    on_disk = sorted(p.name for p in CORPUS.iterdir() if p.name != "INDEX")
    assert len(listed) == len(set(listed)), "a case is listed twice"
    assert sorted(listed) == on_disk
    assert {c.exit for c in CASES} == {0, 2}
    assert sum(c.exit == 2 for c in CASES) >= 60
    for c in CASES:
        assert (c.message is None) == (c.exit == 0), c.file


def assert_user_error(case: Case, result, spec_path: Path):
    """Exit 2, and the message a user can act on."""
    text = result.stdout + result.stderr
    assert not result.timed_out, f"{case.file}: still running after {TIMEOUT_S} s"
    assert "Traceback" not in text, text
    assert "internal error" not in text, text
    assert result.returncode == 2, f"{case.file}: exit {result.returncode}\n{text}"
    err = result.stderr
    assert err.startswith("error: "), err
    assert len(err.strip().splitlines()) <= 3, f"not one short paragraph:\n{err}"
    assert str(spec_path) in err, f"message does not name the spec file:\n{err}"
    if case.where:
        assert f"{spec_path}:{case.where}: " in err, f"expected position {case.where}:\n{err}"
    if case.field:
        assert f": {case.field}: " in err, f"expected field {case.field}:\n{err}"
    assert case.message in err, f"expected {case.message!r}:\n{err}"
    assert "\n  fix: " in err, f"no fix offered:\n{err}"


def assert_success(case: Case, result):
    text = result.stdout + result.stderr
    assert not result.timed_out, f"{case.file}: still running after {TIMEOUT_S} s"
    assert "Traceback" not in text, text
    assert result.returncode == 0, f"{case.file}: exit {result.returncode}\n{text}"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_solve(case, tmp_path):
    result = run_cli_forked(["solve", case.path], cwd=tmp_path, timeout=TIMEOUT_S)
    if case.exit == 2:
        assert_user_error(case, result, case.path)
    else:
        assert_success(case, result)
        assert "optimal" in result.stdout or "variant" in result.stdout
    assert list(tmp_path.iterdir()) == [], "solve wrote files"


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_compile(case, tmp_path):
    out = tmp_path / "out"
    result = run_cli_forked(["compile", case.path, "-o", out], cwd=tmp_path, timeout=TIMEOUT_S)
    if case.exit == 2:
        assert_user_error(case, result, case.path)
        # No output tree, no staging directory: the working directory is as it was.
        assert list(tmp_path.iterdir()) == []
        return
    assert_success(case, result)
    assert [p.name for p in tmp_path.iterdir()] == ["out"], "compile left something beside its output"
    check = run_cli_forked(["check", out], cwd=tmp_path, timeout=TIMEOUT_S)
    assert check.returncode == 0, check.stdout + check.stderr


# One case of each kind, end to end through the interpreter and the module entry point.
SAMPLE = ["yaml_int_too_many_digits", "yaml_duplicate_key", "bomb_billion_laughs", "flops_nan",
          "search_space_over_limit", "variant_params_unreachable", "name_command_substitution",
          "raw_latin1", "ok_hostile_but_valid_names"]


@pytest.mark.parametrize("name", SAMPLE)
def test_sample_through_python_m(name, tmp_path):
    case = next(c for c in CASES if c.file == f"{name}.yaml")
    for argv in (["solve", case.path], ["compile", case.path, "-o", tmp_path / "out"]):
        result = subprocess.run([sys.executable, "-m", "llama3gen.cli", *map(str, argv)],
                                capture_output=True, text=True, cwd=tmp_path, timeout=TIMEOUT_S)
        result.timed_out = False
        if case.exit == 2:
            assert_user_error(case, result, case.path)
        else:
            assert_success(case, result)
    if case.exit == 2:
        assert list(tmp_path.iterdir()) == []


def test_debug_shows_the_traceback_of_a_user_error(tmp_path):
    result = run_cli_forked(["--debug", "solve", CORPUS / "flops_nan.yaml"], cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" in result.stderr and "UserError" in result.stderr


# --- spec files that are not files a user wrote ---------------------------------------------

def test_spec_over_a_megabyte_refused_before_parsing(tmp_path):
    spec = tmp_path / "big.yaml"
    spec.write_text("name: x\nbudget:\n  flops: 1e20\n" + "# padding\n" * 120_000)
    result = run_cli_forked(["solve", spec], cwd=tmp_path, timeout=TIMEOUT_S)
    assert result.returncode == 2 and "larger than 1024 KiB" in result.stderr, result.stderr
    assert str(spec) in result.stderr


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="no /dev/zero")
def test_endless_spec_file_is_refused_not_read_forever(tmp_path):
    result = run_cli_forked(["compile", "/dev/zero", "-o", tmp_path / "out"], cwd=tmp_path, timeout=30)
    assert not result.timed_out
    assert result.returncode == 2 and "larger than" in result.stderr, result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("what", ["directory", "missing", "unreadable"])
def test_spec_path_that_is_not_a_readable_file(what, tmp_path):
    if what == "directory":
        spec = tmp_path / "specdir"
        spec.mkdir()
    elif what == "missing":
        spec = tmp_path / "nope.yaml"
    else:
        if os.geteuid() == 0:
            pytest.skip("root reads files whatever their mode")
        spec = tmp_path / "secret.yaml"
        shutil.copy(CORPUS / "ok_tiny.yaml", spec)
        spec.chmod(0)
    result = run_cli_forked(["compile", spec, "-o", tmp_path / "out"], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: {spec}: ") and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
