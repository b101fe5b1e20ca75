"""Issue 14, item 11: spec values that were accepted but wrong, and CLI paths that were ignored.

Each case is a spec file written to tmp_path and run through the real CLI, as a user would meet it:
exit 2 with one short paragraph naming file:line:column, the field, what is wrong and a fix; no
traceback. Most cases fork the already-imported CLI (tests/_forked_cli.py); a sample goes through
the installed `llama3gen` script itself.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _forked_cli import run_cli_forked

TINY = (Path(__file__).resolve().parent / "bad_specs" / "ok_tiny.yaml").read_text()
MARK = "@@"  # written before the bad value in a case's YAML: where the error must point


def write_spec(tmp_path: Path, text: str, name: str = "spec.yaml") -> tuple[Path, str | None]:
    """Write `text` without its MARK; return the path and the marked value's "line:column"."""
    at = None
    if MARK in text:
        i = text.index(MARK)
        text = text.replace(MARK, "", 1)
        at = f"{text.count(chr(10), 0, i) + 1}:{i - text.rfind(chr(10), 0, i)}"
    spec = tmp_path / name
    spec.write_text(text)
    return spec, at


def tiny_with(section: str, lines: str) -> str:
    """ok_tiny.yaml with one line added to (or starting) a top-level section, or replacing the
    line of the same key there."""
    key = lines.split(":")[0] + ":"
    own = re.search(f"^{re.escape(key)}.*$", TINY, re.M)
    if own:
        return TINY.replace(own[0], lines, 1)
    if f"\n{section}:\n" in TINY:
        return TINY.replace(f"\n{section}:\n", f"\n{section}:\n{lines}\n", 1)
    return TINY + f"{section}:\n{lines}\n"


def assert_one_paragraph(result, spec: Path, at: str | None, field: str, words: str):
    text = result.stdout + result.stderr
    assert not result.timed_out and "Traceback" not in text and "internal error" not in text, text
    assert result.returncode == 2, f"exit {result.returncode}\n{text}"
    err = result.stderr
    assert err.startswith("error: ") and len(err.strip().splitlines()) <= 3, err
    where = f"{spec}:{at}" if at else str(spec)
    assert f"{where}: {field}: " in err, f"expected {where}: {field}:\n{err}"
    assert words in err, f"expected {words!r}:\n{err}"
    assert "\n  fix: " in err, err


def solve(spec: Path, cwd: Path, *extra):
    return run_cli_forked(["solve", spec, *extra], cwd=cwd)


# --- YAML booleans in number fields ---------------------------------------------------------

# (section, line with MARK before the boolean, field). YAML 1.1 reads yes/no/on/off/true/false.
BOOLEANS = [
    ("hardware", "  gpus_per_node: @@yes", "hardware.gpus_per_node"),
    ("hardware", "  cpus_per_gpu: @@on", "hardware.cpus_per_gpu"),
    ("hardware", "  nodes: @@True", "hardware.nodes"),
    ("hardware", "  host_memory_gb: @@no", "hardware.host_memory_gb"),
    ("hardware", "  usd_per_gpu_hour: @@off", "hardware.usd_per_gpu_hour"),
    ("model", "  rope_theta: @@true", "model.rope_theta"),
    ("model", "  norm_eps: @@FALSE", "model.norm_eps"),
    ("search", "  top_k: @@yes", "search.top_k"),
    ("search", "  near_optimal: @@no", "search.near_optimal"),
    ("search", "  layers: [2, 4, @@on]", "search.layers.2"),
    ("training", "  max_warmup_iters: @@no", "training.max_warmup_iters"),
    ("training", "  keep_last_ckpts: @@yes", "training.keep_last_ckpts"),
    ("training", "  global_batch_tokens: @@true", "training.global_batch_tokens"),
    ("training", "  learning_rate: @@on", "training.learning_rate"),
    ("training", "  ckpt_interval: @@Yes", "training.ckpt_interval"),
    ("cluster", "  mem_per_node_gb: @@yes", "cluster.mem_per_node_gb"),
    ("variants", "  - {name: v, max_days: @@yes}", "variants.0.max_days"),
    ("variants", "  - {name: v, tokens_per_param: {min: @@on}}", "variants.0.tokens_per_param.min"),
]


@pytest.mark.parametrize("section, line, field", BOOLEANS, ids=[b[2] for b in BOOLEANS])
def test_yaml_boolean_in_a_number_field_is_refused(tmp_path, section, line, field):
    spec, at = write_spec(tmp_path, tiny_with(section, line))
    assert_one_paragraph(solve(spec, tmp_path), spec, at, field, "YAML boolean is not a number")


@pytest.mark.parametrize("text, field", [
    # nested: the custom GPU's numbers, the FFN rule, a search range's step, the budget itself
    ("name: x\nbudget:\n  days: @@yes\n", "budget.days"),
    (TINY.replace("gpu: cpu", "gpu: {name: g1, bf16_tflops: @@on, memory_gb: 80}"),
     "hardware.gpu.bf16_tflops"),
    (TINY.replace("multiple_of: 32", "multiple_of: @@yes"), "model.ffn.multiple_of"),
    (TINY.replace("step: 32", "step: @@true"), "search.hidden.step"),
])
def test_yaml_boolean_in_a_nested_number_field_is_refused(tmp_path, text, field):
    spec, at = write_spec(tmp_path, text)
    assert_one_paragraph(solve(spec, tmp_path), spec, at, field, "YAML boolean is not a number")


def test_booleans_still_fill_boolean_fields(tmp_path):
    text = tiny_with("model", "  tie_embeddings: yes").replace(
        "compile: false", "compile: no\n  activation_checkpointing: off")
    spec, _ = write_spec(tmp_path, text)
    result = solve(spec, tmp_path, "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["spec"]["model"]["tie_embeddings"] is True
    assert plan["spec"]["training"]["compile"] is False
    assert plan["spec"]["training"]["activation_checkpointing"] is False


# --- SLURM time limit and checkpoint signal --------------------------------------------------

@pytest.mark.parametrize("limit, extra, words", [
    ("0:00:00", "", "as no limit"),
    ("000:00:00", "", "as no limit"),
    ("0-0:00:00", "", "as no limit"),
    ("00:02:00", "", "signal_before_s = 120 s"),  # the default signal, plus SLURM's minute
    ("00:00:30", "", "signal_before_s = 120 s"),
    ("00:59:00", "  signal_before_s: 3600\n", "signal_before_s = 3600 s"),
    ("00:11:00", "  signal_before_s: 600\n", "signal_before_s = 600 s"),  # 660 s: just not enough
    ("00:10:60", "", "go up to 59"),
    ("2-24:00:00", "", "go up to 59, hours to 23"),
])
def test_time_limit_that_slurm_would_never_or_always_signal_is_refused(tmp_path, limit, extra, words):
    spec, at = write_spec(tmp_path, TINY + f'cluster:\n{extra}  time_limit: @@"{limit}"\n')
    assert_one_paragraph(solve(spec, tmp_path), spec, at, "cluster.time_limit", words)


@pytest.mark.parametrize("limit, signal", [("00:02:00", 120), ("00:30:00", 3600), ("00:05:00", 600)])
def test_time_limit_fix_names_values_that_work(tmp_path, limit, signal):
    """The fix says how long a limit, or how short a signal, would be accepted: both are."""
    text = TINY + f'cluster:\n  time_limit: "{limit}"\n  signal_before_s: {signal}\n'
    spec, _ = write_spec(tmp_path, text)
    err = solve(spec, tmp_path).stderr
    longer = re.search(r"time_limit longer than (\d\d):(\d\d):(\d\d)", err)
    assert longer, err
    h, m, s = map(int, longer.groups())
    seconds = h * 3600 + m * 60 + s + 1
    ok_limit = f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    variants = [text.replace(limit, ok_limit)]
    shorter = re.search(r"signal_before_s at most (\d+)", err)
    if shorter:
        variants.append(text.replace(f"signal_before_s: {signal}", f"signal_before_s: {shorter[1]}"))
    for i, fixed in enumerate(variants):
        spec, _ = write_spec(tmp_path, fixed, f"fixed{i}.yaml")
        result = solve(spec, tmp_path)
        assert result.returncode == 0, f"the fix did not work:\n{fixed}\n{result.stderr}"


def test_time_limit_just_past_the_signal_compiles_into_the_sbatch_script(tmp_path):
    spec, _ = write_spec(tmp_path, TINY + 'cluster:\n  time_limit: "00:11:01"\n  signal_before_s: 600\n')
    result = run_cli_forked(["compile", spec, "-o", tmp_path / "out"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    sbatch = (tmp_path / "out" / "scripts" / "train.sbatch").read_text()
    assert "--time=00:11:01" in sbatch and "--signal=B:USR1@600" in sbatch


# --- the CPU pseudo-device's name is reserved -------------------------------------------------

@pytest.mark.parametrize("name", ["cpu", "CPU", "Cpu", "cPU"])
def test_custom_gpu_named_cpu_is_refused(tmp_path, name):
    text = TINY.replace("gpu: cpu", f"gpu: {{name: @@{name}, bf16_tflops: 50, memory_gb: 24}}")
    spec, at = write_spec(tmp_path, text)
    assert_one_paragraph(solve(spec, tmp_path), spec, at, "hardware.gpu.name", "reserved for the CPU")


@pytest.mark.parametrize("gpu, on_cpu", [
    ("cpu", True), ("CPU", True),  # the catalog's pseudo-device, by its catalog name
    ("{name: cpu2, bf16_tflops: 50, memory_gb: 24}", False),
    ("{name: my-cpu, bf16_tflops: 50, memory_gb: 24}", False),
])
def test_only_the_catalog_entry_is_the_cpu_pseudo_device(tmp_path, gpu, on_cpu):
    spec, _ = write_spec(tmp_path, TINY.replace("gpu: cpu", f"gpu: {gpu}"))
    result = solve(spec, tmp_path, "--json")
    assert result.returncode == 0, result.stderr
    job = json.loads(result.stdout)["job"]
    assert (job["gpus_per_node"] == 0) == on_cpu, job


# --- errors under upper-case keys (the custom law's E, A and B) ------------------------------

LAW = "search:\n  scaling_law:\n    E: {E}\n    A: {A}\n    B: {B}\n    alpha: 0.34\n    beta: 0.28\n"
GOOD = {"E": "1.7", "A": "406.4", "B": "410.7"}


@pytest.mark.parametrize("key, value, words", [
    ("E", "-0.5", "greater than or equal to 0"),
    ("E", "101", "less than or equal to 100"),
    ("E", ".nan", "finite"),
    ("A", "-5", "greater than or equal to 0.000001"),
    ("A", "lots", "valid number"),
    ("B", "0", "greater than or equal to 0.000001"),
    ("B", "2.0e6", "less than or equal to 1000000"),
    ("B", "no", "YAML boolean"),
])
def test_custom_law_error_names_the_upper_case_key(tmp_path, key, value, words):
    law = LAW.format(**{**GOOD, key: MARK + value})
    spec, at = write_spec(tmp_path, "name: x\nbudget:\n  flops: 1e20\n" + law)
    result = solve(spec, tmp_path)
    assert_one_paragraph(result, spec, at, f"search.scaling_law.{key}", words)
    assert "tokens_per_param" not in result.stderr
    assert "more problem" not in result.stderr, "the other union members are not more problems"


@pytest.mark.parametrize("text, field, words", [
    # an upper-case key that is not a field: named, at the key itself
    ("name: x\nbudget:\n  flops: 1e20\nhardware:\n  @@GPU: h100-sxm\n", "hardware.GPU", "unknown key"),
    ("name: x\nbudget:\n  flops: 1e20\n" + LAW.format(**GOOD) + "    @@C: 1\n",
     "search.scaling_law.C", "unknown key"),
    # a missing upper-case key of a law written otherwise complete
    ("name: x\nbudget:\n  flops: 1e20\nsearch:\n  scaling_law: @@{E: 1.7, A: 406.4, alpha: 0.34, beta: 0.28}\n",
     "search.scaling_law.B", "required key is missing"),
])
def test_upper_case_keys_in_other_errors(tmp_path, text, field, words):
    spec, at = write_spec(tmp_path, text)
    assert_one_paragraph(solve(spec, tmp_path), spec, at, field, words)


# --- empty and odd paths on the command line -------------------------------------------------

def test_empty_output_option_is_an_error_naming_it(tmp_path):
    spec, _ = write_spec(tmp_path, TINY)
    for flag in ("-o", "--output"):
        result = run_cli_forked(["compile", spec, flag, ""], cwd=tmp_path)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert "-o/--output" in result.stderr and "empty" in result.stderr, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"], "compile wrote something"


@pytest.mark.parametrize("argv", [["solve", ""], ["compile", "", "-o", "out"], ["solve", "", "--json"]])
def test_empty_spec_path_is_named(tmp_path, argv):
    result = run_cli_forked(argv, cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error: the spec path is empty ('')"), result.stderr
    assert "\n  fix: " in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("path, shown", [(" ", "' '"), ("a\nb.yaml", r"'a\nb.yaml'"), (".", "."),
                                         ("specs/", "specs/")])
def test_odd_spec_paths_are_named_readably(tmp_path, path, shown):
    (tmp_path / "specs").mkdir()
    result = run_cli_forked(["solve", path], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: {shown}: "), result.stderr
    assert len(result.stderr.strip().splitlines()) == 2, result.stderr  # message, fix


@pytest.mark.parametrize("top", ["0", "-3", "two"])
def test_solve_top_must_be_a_positive_count(tmp_path, top):
    spec, _ = write_spec(tmp_path, TINY)
    result = run_cli_forked(["solve", spec, "--top", top], cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "argument --top" in result.stderr


# --- a sample through the installed `llama3gen` script ---------------------------------------

def llama3gen(*args, cwd):
    exe = shutil.which("llama3gen")
    cmd = [exe] if exe else [sys.executable, "-m", "llama3gen.cli"]
    return subprocess.run([*cmd, *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=60)


def test_sample_through_the_llama3gen_script(tmp_path):
    cases = [
        (tiny_with("hardware", "  nodes: @@true"), "hardware.nodes", "YAML boolean"),
        (tiny_with("training", "  seed: @@no"), "training.seed", "YAML boolean"),
        (TINY + 'cluster:\n  time_limit: @@"00:00:00"\n', "cluster.time_limit", "as no limit"),
        (TINY + 'cluster:\n  signal_before_s: 600\n  time_limit: @@"00:10:00"\n',
         "cluster.time_limit", "signal_before_s = 600 s"),
        (TINY.replace("gpu: cpu", "gpu: {name: @@cpu, bf16_tflops: 50, memory_gb: 24}"),
         "hardware.gpu.name", "reserved"),
        ("name: x\nbudget:\n  flops: 1e20\n" + LAW.format(**{**GOOD, "A": "@@0"}),
         "search.scaling_law.A", "greater than or equal"),
    ]
    for i, (text, field, words) in enumerate(cases):
        spec, at = write_spec(tmp_path, text, f"case{i}.yaml")
        for argv in (["solve", spec], ["compile", spec, "-o", tmp_path / "out"]):
            result = llama3gen(*argv, cwd=tmp_path)
            result.timed_out = False
            assert_one_paragraph(result, spec, at, field, words)
    assert not (tmp_path / "out").exists()
    result = llama3gen("compile", tmp_path / "case0.yaml", "-o", "", cwd=tmp_path)
    assert result.returncode == 2 and "-o/--output" in result.stderr
    result = llama3gen("solve", "", cwd=tmp_path)
    assert result.returncode == 2 and "the spec path is empty" in result.stderr
