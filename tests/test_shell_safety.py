"""No spec can put a command into a generated script.

Two halves. Names and cluster strings that reach shell scripts are validated against conservative
patterns, so spaces, quotes, `$()`, `;`, newlines and non-ASCII letters are refused outright. What
the patterns do allow (dots, dashes, underscores, leading digits) and the free-text descriptions
are compiled into a repo whose scripts must pass `bash -n` and `shellcheck`, and whose sbatch
script, run with a fake `srun`, `scontrol` and `torchrun` on PATH, starts exactly the intended
command and nothing else.
"""

from __future__ import annotations

import ast
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llama3gen.errors import UserError
from llama3gen.spec import parse_spec_text

# A canary: every injection attempt below tries to create a file with this name.
CANARY = "pwned"

SPEC_NAME = "0.-_x..y--z__"
VARIANTS = ["a.b-c_d", "9..--__", "x"]
HOSTILE_DESCRIPTIONS = [
    f"$(touch {CANARY}); `touch {CANARY}`; rm -rf ~ # ${{PATH}} $HOME",
    f"it's \"quoted\" \\ and 'single' ''' \"\"\" \\ %x %% {{{{ x }}}} {{% raw %}} ; touch {CANARY}",
    "# -*- coding: latin-1 -*-  naïve 数据 🦙 <script>alert(1)</script> | > /dev/null &",
]

HOSTILE_VALID_SPEC = {
    "name": SPEC_NAME,
    "budget": {"flops": 5.0e12},
    "hardware": {"gpu": {"name": "G.p-u_9", "bf16_tflops": 100, "memory_gb": 16},
                 "gpus_per_node": 2, "cpus_per_gpu": 1},
    "model": {"vocab_size": 257, "seq_len": 64, "head_dim": 32, "kv_heads": 2,
              "ffn": {"llama3_multiplier": 1.3, "multiple_of": 32}},
    "search": {"layers": {"min": 2, "max": 6}, "hidden": {"min": 64, "max": 256, "step": 32},
               "aspect": {"min": 8, "max": 128},
               "scaling_law": {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28,
                               "name": "law.-_1"}},
    "variants": [{"name": n, "description": d} for n, d in zip(VARIANTS, HOSTILE_DESCRIPTIONS)],
    "cluster": {"partition": "p.-_0", "account": "A-._z", "qos": "0--..__",
                "time_limit": "1-00:00:00", "mem_per_node_gb": 8},
    "training": {"compile": False},
}


def spec_with(path: str, value) -> dict:
    """HOSTILE_VALID_SPEC with the field at dotted `path` (list indices as numbers) set to value."""
    spec = yaml.safe_load(yaml.safe_dump(HOSTILE_VALID_SPEC))  # a deep copy
    *parents, last = path.split(".")
    node = spec
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    node[int(last) if last.isdigit() else last] = value
    return spec


# --- validation refuses what a shell would interpret ------------------------------------------

FIELDS = ["name", "variants.0.name", "cluster.partition", "cluster.account", "cluster.qos",
          "hardware.gpu.name", "search.scaling_law.name"]
BAD_NAMES = ["a b", "a'b", 'a"b', "$(id)", "a$(id)", "`id`", "a`id`", "a;id", "a&&id", "a|id",
             "a>x", "a<x", "a*", "a?", "a[0]", "{a,b}", "~a", "a\\b", "a$b", "a\nb", "a\rb", "a\tb",
             "a\x00b", "a\x1b[31m", "-a", ".a", "..", "a/b", "/a", "", " a", "a ", "ä", "llаma",
             "a\u200bb", "a\u202eb", "ａ", "a" * 65, "a#b", "a=b", "a,b", "a:b", "a@b", "a%b", "a!b"]


@pytest.mark.parametrize("field", FIELDS)
def test_names_a_shell_would_interpret_are_refused(field):
    for bad in BAD_NAMES:
        text = yaml.safe_dump(spec_with(field, bad), allow_unicode=True)
        with pytest.raises(UserError) as info:
            parse_spec_text(text, "spec.yaml")
        assert info.value.field == field, (bad, info.value.render())
        assert "pattern" in info.value.render(), (bad, info.value.render())


@pytest.mark.parametrize("bad", ["48:00:00; id", "$(id)", "48:00:00\n", " 48:00:00", "48:00",
                                 "٤٨:٠٠:٠٠", "４８:００:００", "1-00:00:00 --wrap=id", "-1:00:00"])
def test_time_limit_is_digits_and_colons_only(bad):
    with pytest.raises(UserError) as info:
        parse_spec_text(yaml.safe_dump(spec_with("cluster.time_limit", bad)), "spec.yaml")
    assert info.value.field == "cluster.time_limit"


@pytest.mark.parametrize("bad", ["one\ntwo", "one\rtwo", "a\x1b[2Jb", "a\x7fb", "a\x85b", "a\u2028b",
                                 "a\u2029b", "a\u202eb", "a\x0cb"])
def test_descriptions_are_one_printable_line(bad):
    with pytest.raises(UserError) as info:
        parse_spec_text(yaml.safe_dump(spec_with("variants.0.description", bad)), "spec.yaml")
    assert info.value.field == "variants.0.description"
    assert "one line" in info.value.message


# --- what validation allows compiles into safe scripts ----------------------------------------

@pytest.fixture(scope="module")
def hostile_repo(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("hostile")
    spec = work / "spec.yaml"
    spec.write_text(yaml.safe_dump(HOSTILE_VALID_SPEC, allow_unicode=True), encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "llama3gen.cli", "compile", str(spec), "-o",
                             str(work / "repo")], capture_output=True, text=True, cwd=work, timeout=120)
    assert result.returncode == 0, result.stderr
    return work / "repo"


def scripts_of(repo: Path) -> list[Path]:
    found = sorted(p for p in repo.rglob("*") if p.suffix in (".sh", ".sbatch"))
    assert found, "the generated repo has no shell scripts"
    return found


def sbatch_of(repo: Path) -> Path:
    path = repo / "scripts" / "train.sbatch"
    if not path.exists():
        pytest.skip("this checkout generates no scripts/train.sbatch (templates/scripts/train.sbatch.j2)")
    return path


def assert_no_canary(root: Path):
    hits = [p for p in root.rglob(CANARY)]
    assert not hits, f"an injected command ran: {hits}"


def test_hostile_strings_reach_the_repo(hostile_repo):
    # Otherwise the rest of this file would prove nothing.
    config = (hostile_repo / "config" / "a.b-c_d.py").read_text(encoding="utf-8")
    assert f"$(touch {CANARY})" in config
    assert "0.-_x..y--z__" in sbatch_of(hostile_repo).read_text()


def test_scripts_parse_with_bash_n(hostile_repo):
    for script in scripts_of(hostile_repo):
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script.name}: {result.stderr}"


def test_scripts_pass_shellcheck(hostile_repo):
    if shutil.which("shellcheck") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("shellcheck is missing in CI (.ci/run installs the Debian package)")
        pytest.skip("shellcheck is not installed (Debian: apt-get install shellcheck)")
    for script in scripts_of(hostile_repo):
        # SC2317 (info) flags the body of a function invoked only by `trap` as unreachable: a
        # false positive in shellcheck 0.9. Every other finding, info level included (SC2086,
        # unquoted expansions, is info), fails the test.
        result = subprocess.run(["shellcheck", "--shell=bash", "--exclude=SC2317", str(script)],
                                capture_output=True, text=True)
        assert result.returncode == 0, f"{script.name}:\n{result.stdout}{result.stderr}"


def test_generated_python_parses_and_runs_nothing(hostile_repo, tmp_path):
    for path in hostile_repo.rglob("*.py"):
        ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    # The configs are executed by configurator.py; executing them must only assign names.
    for config in (hostile_repo / "config").glob("*.py"):
        result = subprocess.run([sys.executable, "-I", str(config)], capture_output=True, text=True,
                                cwd=tmp_path, timeout=30)
        assert result.returncode == 0, result.stderr
    assert_no_canary(tmp_path)
    assert_no_canary(hostile_repo)


def test_sbatch_directives_are_single_words(hostile_repo):
    lines = [l for l in sbatch_of(hostile_repo).read_text().splitlines()
             if l.startswith("#SBATCH")]
    assert any(l.startswith("#SBATCH --partition=") for l in lines)
    for line in lines:
        words = shlex.split(line[len("#SBATCH"):])
        assert len(words) == 1 and words[0].startswith("--"), line


FAKE_SRUN = """#!/bin/bash
# Fake srun: log our arguments, then run the command after srun's own options, like srun would.
printf '%s\\0' "$@" > "$FAKE_LOG/srun.args"
while [[ $# -gt 0 && $1 == --* ]]; do shift; done
exec "$@"
"""
FAKE_TORCHRUN = """#!/bin/bash
printf '%s\\0' "$@" > "$FAKE_LOG/torchrun.args"
"""
FAKE_SCONTROL = """#!/bin/bash
printf '%s\\0' "$@" >> "$FAKE_LOG/scontrol.args"
if [[ $1 == show && $2 == hostnames ]]; then echo node-a; echo node-b; fi
"""


@pytest.fixture
def fake_cluster(tmp_path):
    """PATH with fake srun/scontrol/torchrun that log their argv; SLURM's environment."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir()
    log.mkdir()
    for name, body in (("srun", FAKE_SRUN), ("torchrun", FAKE_TORCHRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    home = tmp_path / "home"
    home.mkdir()
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(home), "FAKE_LOG": str(log),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_NTASKS_PER_NODE": "2", "SLURM_CPUS_ON_NODE": "4", "LC_ALL": "C.UTF-8"}
    return env, log


def read_args(path: Path) -> list[str] | None:
    if not path.exists():
        return None
    return path.read_bytes().decode("utf-8").split("\0")[:-1]


@pytest.mark.parametrize("variant", [None, *VARIANTS])
def test_sbatch_runs_exactly_the_training_command(hostile_repo, fake_cluster, tmp_path, variant):
    env, log = fake_cluster
    sbatch_of(hostile_repo)
    argv = ["bash", "scripts/train.sbatch"] + ([variant] if variant else [])
    result = subprocess.run(argv, cwd=hostile_repo, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    chosen = variant or VARIANTS[0]
    torchrun = read_args(log / "torchrun.args")
    assert torchrun is not None, "torchrun was not started"
    assert torchrun[-2:] == ["train.py", f"config/{chosen}.py"], torchrun
    assert "--rdzv-endpoint=node-a:24242" in torchrun
    assert (hostile_repo / "config" / f"{chosen}.py").is_file()
    assert read_args(log / "scontrol.args") == ["show", "hostnames", "node-[a-b]"]
    assert_no_canary(tmp_path)
    assert_no_canary(hostile_repo)


@pytest.mark.parametrize("script", ["train.sbatch", "torchrun.sh"])
@pytest.mark.parametrize("variant", [f"$(touch {CANARY})", f"`touch {CANARY}`", f"x; touch {CANARY}",
                                     f"x\ntouch {CANARY}", "../../../etc/passwd", "a.b-c_d/../x", "*",
                                     "-h", "a.b-c_d "])
def test_scripts_refuse_variants_that_were_not_generated(hostile_repo, fake_cluster, tmp_path, script,
                                                          variant):
    env, log = fake_cluster
    if script == "train.sbatch":
        sbatch_of(hostile_repo)
    result = subprocess.run(["bash", f"scripts/{script}", variant], cwd=hostile_repo, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "unknown variant" in result.stderr
    assert read_args(log / "torchrun.args") is None and read_args(log / "srun.args") is None
    assert_no_canary(tmp_path)
    assert_no_canary(hostile_repo)


def test_torchrun_script_runs_exactly_the_training_command(hostile_repo, fake_cluster, tmp_path):
    env, log = fake_cluster
    result = subprocess.run(["bash", "scripts/torchrun.sh", "9..--__"], cwd=hostile_repo, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    torchrun = read_args(log / "torchrun.args")
    assert torchrun[-2:] == ["train.py", "config/9..--__.py"], torchrun
    assert "--nproc_per_node=2" in torchrun
    assert_no_canary(tmp_path)
