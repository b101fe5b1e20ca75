"""Spec validation: defaults, and a clear positioned error for each kind of bad input."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llama3gen.errors import UserError
from llama3gen.spec import json_schema, load_spec, parse_spec_text

REPO = Path(__file__).resolve().parent.parent


def test_four_line_spec_works():
    spec = parse_spec_text("name: small\nbudget:\n  flops: 1e20\n")
    assert spec.search.scaling_law == "besiroglu2024"  # the default law
    assert [v.name for v in spec.variants] == ["optimal", "chinchilla"]
    assert spec.hardware.device().name == "A100-80GB"
    assert spec.model.vocab_size == 128256 and spec.model.rope_theta == 500000


def test_reference_spec_loads():
    spec, text = load_spec(REPO / "specs" / "1.36e21.yaml")
    assert spec.budget.flops == 1.36e21
    assert spec.search.scaling_law == "hoffmann2022"
    assert "1.36e21" in text


def error_of(text: str) -> UserError:
    with pytest.raises(UserError) as info:
        parse_spec_text(textwrap.dedent(text), "spec.yaml")
    return info.value


BASE = "name: x\nbudget:\n  flops: 1e20\n"


@pytest.mark.parametrize("text, where, field, words", [
    # unknown key, at its own line and column
    (BASE + "hardwar:\n  gpu: h100-sxm\n", "spec.yaml:4:1", "hardwar", "unknown key"),
    # wrong type
    (BASE + "hardware:\n  nodes: many\n", "spec.yaml:5:10", "hardware.nodes", "integer"),
    # negative budget
    ("name: x\nbudget:\n  flops: -5\n", "spec.yaml:3:10", "budget.flops", "greater than 0"),
    # non-numeric budget
    ("name: x\nbudget:\n  flops: lots\n", "spec.yaml:3:10", "budget.flops", "number"),
    # kv heads that cannot divide any head count
    (BASE + "model:\n  kv_heads: 0\n", "spec.yaml:5:13", "model.kv_heads", "greater than or equal to 1"),
    # empty range
    (BASE + "search:\n  layers: {min: 10, max: 4}\n", "spec.yaml:5:11", "search.layers", "empty range"),
    # unknown GPU and law
    (BASE + "hardware:\n  gpu: tpu-v9\n", "spec.yaml:5:8", "hardware.gpu", "unknown GPU"),
    (BASE + "search:\n  scaling_law: kaplan2021\n", "spec.yaml:5:16", "search.scaling_law", "unknown scaling law"),
    # two budgets
    ("name: x\nbudget:\n  flops: 1e20\n  days: 3\n", "spec.yaml:3:3", "budget", "exactly one"),
    # names that would reach shell scripts
    ("name: 'a; rm -rf /'\nbudget:\n  flops: 1e20\n", "spec.yaml:1:7", "name", "pattern"),
    (BASE + "cluster:\n  partition: 'gpu $(reboot)'\n", "spec.yaml:5:14", "cluster.partition", "pattern"),
    # NaN and inf
    ("name: x\nbudget:\n  flops: .nan\n", "spec.yaml:3:10", "budget.flops", "finite"),
    ("name: x\nbudget:\n  flops: .inf\n", "spec.yaml:3:10", "budget.flops", "finite number (got inf)"),
])
def test_bad_spec_errors_name_position_field_and_fix(text, where, field, words):
    err = error_of(text)
    assert err.where == where, err.render()
    assert err.field == field, err.render()
    assert words.lower() in err.render().lower()
    assert err.fix


def test_yaml_syntax_error_has_position():
    err = error_of("name: x\nbudget: [1, 2\n")
    assert err.where.startswith("spec.yaml:")
    assert "invalid YAML" in err.message


def test_yaml_aliases_refused():
    err = error_of("name: x\nbudget: &b\n  flops: 1e20\nother: *b\n")
    assert "aliases" in err.message


def test_not_a_mapping():
    assert "mapping" in error_of("- 1\n- 2\n").message


def test_schema_is_valid_json_schema_and_shipped():
    schema = json_schema()
    assert schema["title"] == "llama3gen spec"
    assert "budget" in schema["properties"]
    shipped = json.loads((REPO / "specs" / "llama3gen.schema.json").read_text())
    assert shipped == schema, "specs/llama3gen.schema.json is stale: run `llama3gen schema > specs/llama3gen.schema.json`"


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "llama3gen.cli", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=60)


@pytest.mark.parametrize("text, needle", [
    (BASE + "hardwar: {}\n", "spec.yaml:4:1: hardwar: unknown key"),
    ("name: x\nbudget:\n  flops: -1\n", "spec.yaml:3:10: budget.flops:"),
    (BASE + "model:\n  kv_heads: 3\nsearch:\n  hidden: [1024, 2048]\n", "no valid shape"),
    (BASE + "search:\n  layers: []\n", "search.layers"),
])
def test_cli_exit_2_without_traceback(tmp_path, text, needle):
    (tmp_path / "spec.yaml").write_text(text)
    result = run_cli("solve", "spec.yaml", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert needle in result.stderr
    assert "fix:" in result.stderr


def test_cli_missing_file():
    result = run_cli("solve", "/nonexistent/spec.yaml")
    assert result.returncode == 2 and "spec file not found" in result.stderr


def test_import_does_not_import_torch():
    code = ("import sys, llama3gen, llama3gen.cli, llama3gen.planner, llama3gen.render; "
            "import llama3gen.spec; print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
