"""A plan from a fitted law (issue #15 part 4): LAW.json from a real `llama3gen fit` of runs drawn
from a known law; the compiled repo's README and docs/law.md show the runs, the CIs and the pick
re-solved at the CI's ends, checked against an independent computation (numpy on the file's
bootstrap refits, and `solve` under each end's law); and sweep and law-file errors that name their
file and line.
"""

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from _repo_files import REPO_ROOT
from _train_fixtures import subprocess_env
from test_fit import sweep_runs, write_csv
from test_sweep import SWEEP_LINE, TINY_SWEEP

from llama3gen import laws
from llama3gen.planner import build_plan
from llama3gen.render import render_files
from llama3gen.spec import parse_spec_text

KEYS = ("E", "A", "B", "alpha", "beta")
TARGET = 1.36e21  # specs/1.36e21.yaml's budget
RESAMPLES = 200


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "llama3gen.cli", *map(str, args)], cwd=cwd,
                          env=subprocess_env(), capture_output=True, text=True, timeout=120)


def spec_naming(law_file: str) -> str:
    """specs/1.36e21.yaml with its law replaced by `search.scaling_law: {file: law_file}`."""
    text = (REPO_ROOT / "specs" / "1.36e21.yaml").read_text()
    out, n = re.subn(r"scaling_law: hoffmann2022.*", f"scaling_law: {{file: {law_file}}}", text)
    assert n == 1
    return out


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """40 runs of Hoffmann et al.'s law with 0.3% noise, fitted by the CLI; a spec naming the law,
    compiled. Returns (directory, fit's --json report, LAW.json, the repo)."""
    base = tmp_path_factory.mktemp("lawdocs")
    write_csv(base / "runs.csv", sweep_runs(seed=1, noise=0.003))
    proc = cli("fit", "runs.csv", "--bootstrap", RESAMPLES, "--target", TARGET, "--json",
               "-o", "law.json", cwd=base)
    assert proc.returncode == 0, proc.stderr
    (base / "spec.yaml").write_text(spec_naming("law.json"))
    proc2 = cli("compile", "spec.yaml", "-o", "repo", cwd=base)
    assert proc2.returncode == 0, proc2.stderr
    return base, json.loads(proc.stdout), json.loads((base / "law.json").read_text()), base / "repo"


def closed_form_n(samples, flops):
    """Hoffmann et al. 2022 Eq. 4 written out here, vectorised over rows E, A, B, alpha, beta:
    N* = G·(C/6)^(β/(α+β)), G = (αA/(βB))^(1/(α+β))."""
    _, a_, b_, alpha, beta = samples.T
    g = (alpha * a_ / (beta * b_)) ** (1 / (alpha + beta))
    return g * (flops / 6) ** (beta / (alpha + beta))


def test_law_file_carries_the_refits_and_runs(fitted):
    _, report, doc, _ = fitted
    samples = np.array(doc["bootstrap"]["samples"])
    assert samples.shape == (RESAMPLES, 5) and (samples > 0).all()
    assert doc["runs"] == 40 and doc["budget_runs"] == [8] * 5 and len(doc["budgets"]) == 5
    # The per-parameter CIs fit reports are the percentiles of exactly these refits (JSON keeps
    # float64 exactly; fit's percentile 50·(1 − 0.95) is 2.5 ± 2e-15, moving the interpolated value
    # by ~1e-17 of the spread: rel 1e-12 is loose).
    for k, key in enumerate(KEYS):
        assert doc["ci"][key] == pytest.approx(np.percentile(samples[:, k], [2.5, 97.5]),
                                               rel=1e-12), key
    read = laws.read_law_file(fitted[0] / "law.json", "law.json")
    assert read.resamples == RESAMPLES and read.seed == 0 and read.samples.shape == (RESAMPLES, 5)
    assert [getattr(read.law, k) for k in KEYS] == [report["law"][k] for k in KEYS]


def test_plan_ci_and_ends_against_an_independent_computation(fitted):
    base, report, doc, repo = fitted
    lock = json.loads((repo / "llama3gen.lock.json").read_text())
    fit = lock["plan"]["law"]["fit"]
    assert fit["runs"] == 40 and fit["file"] == "law.json" and fit["resamples"] == RESAMPLES
    samples = np.array(doc["bootstrap"]["samples"])
    n_opt = closed_form_n(samples, TARGET)
    # The lock keeps 10 significant digits (render.LOCK_FLOAT_DIGITS); the two closed forms
    # (numpy's vectorised pow here, Python's per law in laws.py) agree to a few ulps, 1e-15,
    # amplified at most ~10× by the percentile's interpolation: 1e-9 covers the lock's rounding.
    assert fit["ci"]["n_params"] == pytest.approx(np.percentile(n_opt, [2.5, 97.5]), rel=1e-9)
    # ... and what `llama3gen fit --target` reported for the same target and refits.
    assert fit["ci"]["n_params"] == pytest.approx(report["target"]["n_params_ci"], rel=1e-9)
    assert fit["ci"]["tokens"] == pytest.approx(report["target"]["tokens_ci"], rel=1e-9)
    assert fit["ci"]["loss"] == pytest.approx(report["target"]["loss_ci"], rel=1e-9)

    low, mid, high = fit["ends"]
    assert [r["end"] for r in fit["ends"]] == ["low", "fit", "high"]
    order = np.argsort(n_opt, kind="stable")
    end_laws = {}
    for row, pct in ((low, 2.5), (high, 97.5)):
        # Nearest rank among 200 sorted N*: index round(p/100 · 199).
        law = end_laws[row["end"]] = samples[order[round(pct / 100 * (RESAMPLES - 1))]]
        assert [row[k] for k in KEYS] == pytest.approx(list(law), rel=1e-9)
        assert row["n_params"] == pytest.approx(closed_form_n(law[None], TARGET)[0], rel=1e-9)
        assert row["tokens"] == pytest.approx(TARGET / (6 * row["n_params"]), rel=1e-9)
    assert low["n_params"] < mid["n_params"] < high["n_params"]
    assert low["tokens"] > mid["tokens"] > high["tokens"]  # D* = C/(6N*)

    # The pick at each end, against `solve` of a spec naming a law file that holds that end's
    # resample alone (full float64 from LAW.json, so `solve` ranks under the very same law). The
    # lock keeps 10 digits of D and the loss: rel 1e-9.
    chosen = lock["plan"]["variants"][0]["choice"]
    assert mid["pick"]["n_params"] == chosen["n_params"]
    for row in (low, high):
        name = f"{row['end']}.json"
        (base / name).write_text(json.dumps({"format": laws.LAW_FORMAT,
                                             **dict(zip(KEYS, end_laws[row["end"]]))}))
        (base / f"{row['end']}.yaml").write_text(spec_naming(name))
        proc = cli("solve", f"{row['end']}.yaml", "--json", cwd=base)
        assert proc.returncode == 0, proc.stderr
        got = json.loads(proc.stdout)["variants"][0]["choice"]
        assert row["pick"]["n_params"] == got["n_params"]
        assert row["pick"]["n_layers"] == got["shape"]["n_layers"]
        assert row["pick"]["d_model"] == got["shape"]["d_model"]
        assert row["pick"]["tokens"] == pytest.approx(got["tokens"], rel=1e-9)
        assert row["pick"]["loss"] == pytest.approx(got["loss"], rel=1e-9)
    assert low["pick"]["n_params"] < mid["pick"]["n_params"] < high["pick"]["n_params"]


def test_readme_and_docs_show_the_cis_and_the_sensitivity(fitted):
    _, _, _, repo = fitted
    lock = json.loads((repo / "llama3gen.lock.json").read_text())
    fit = lock["plan"]["law"]["fit"]
    assert "docs/law.md" in lock["files"]
    page = (repo / "docs" / "law.md").read_text()
    readme = (repo / "README.md").read_text()
    assert "[docs/law.md](docs/law.md)" in readme and "40 runs at 5 budgets" in readme
    for key in KEYS:
        lo, hi = fit["ci"][key]
        assert f"| {key} | " in page and f"{lo:.4g} – {hi:.4g}" in page, key
    assert "| 1.00e+17 | 8 |" in page and "| 1.00e+19 | 8 |" in page
    for row in fit["ends"]:
        pick = row["pick"]
        cells = f"{pick['n_layers']}L × {pick['d_model']} | "
        assert f"| {row['end']} | {row['E']:.4g} | " in page and cells in page, row["end"]
        assert cells in readme and f"{pick['loss']:.4f} |" in readme
    assert "97.5th pct. of N*" in readme and "2.1 decades below" in page
    # docs/law.svg: one curve, minimum and pick per law, labelled with the table's numbers
    assert "docs/law.svg" in lock["files"] and "](law.svg)" in page
    svg = (repo / "docs" / "law.svg").read_text()
    for row in fit["ends"]:
        assert f"{row['end']}: N* " in svg and f"pick {row['pick']['n_layers']}L × " in svg


def test_solve_reports_the_fitted_law_and_the_picks_at_its_ends(fitted):
    base, _, _, repo = fitted
    proc = cli("solve", "spec.yaml", cwd=base)
    assert proc.returncode == 0, proc.stderr
    fit = json.loads((repo / "llama3gen.lock.json").read_text())["plan"]["law"]["fit"]
    out = proc.stdout
    block = out[out.index("FITTED LAW (law.json: 40 runs at 5 budgets"):]
    lo, hi = fit["ci"]["loss"]
    assert f"loss {lo:.4f} – {hi:.4f}" in block and "2.1 decades beyond" in block
    for row in fit["ends"]:  # the same picks the lock holds, one line each
        pick = row["pick"]
        assert f"pick {pick['n_layers']}L × {pick['d_model']} " in block, row["end"]
        assert f"loss {pick['loss']:.4f})" in block
    assert "97.5th pct. of N*" in block and "2.5th pct. of N*" in block


def test_catalog_law_plans_have_no_fit_and_no_law_page():
    plan = build_plan(parse_spec_text((REPO_ROOT / "specs" / "1.36e21.yaml").read_text()))
    assert "fit" not in plan.model_dump(mode="json")["law"]
    files = render_files(plan, "")
    assert "docs/law.md" not in files and "docs/law.svg" not in files
    assert b"docs/law.md" not in files["README.md"]


@pytest.mark.parametrize("bootstrap, ci", [({"resamples": 0, "seed": 0, "samples": []}, False),
                                           ({"resamples": RESAMPLES, "seed": 0}, True)])
def test_law_file_without_refits_still_plans(fitted, tmp_path, bootstrap, ci):
    """--bootstrap 0, and a file from before LAW.json carried the refits (budget_runs neither)."""
    doc = dict(fitted[2], bootstrap=bootstrap, ci=fitted[2]["ci"] if ci else {})
    del doc["budget_runs"]
    (tmp_path / "law.json").write_text(json.dumps(doc))
    plan = build_plan(parse_spec_text(spec_naming("law.json"), spec_dir=tmp_path))
    assert plan.law.fit.ends == [] and plan.law.fit.runs == 40
    assert set(plan.law.fit.ci) == (set(KEYS) if ci else set())
    files = render_files(plan, "")
    page = files["docs/law.md"].decode()
    assert "docs/law.svg" not in files and "law.svg" not in page
    assert "carries no bootstrap refits" in page and "no intervals" in page
    lo, hi = fitted[2]["ci"]["E"]
    assert (f"{lo:.4g} – {hi:.4g}" in page) == ci


def test_what_fit_warned_travels_with_the_law_into_the_plan(tmp_path):
    """Runs with no dependence on N (L = 2 + 400/D^0.3 exactly): fit warns that the law cannot
    say how the loss falls with N. LAW.json carries that warning, but not those about fit's own
    report (the --target 2 decades out, approach 2's parabolas), and a plan from the file repeats
    it in `solve`, the README's warnings and docs/law.md. A file without warnings adds none."""
    import dataclasses
    flat = [dataclasses.replace(r, loss=2.0 + 400 / r.tokens ** 0.3) for r in sweep_runs()]
    write_csv(tmp_path / "runs.csv", flat)
    proc = cli("fit", "runs.csv", "--bootstrap", 0, "--target", TARGET, "-o", "law.json",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    said = [line.removeprefix("warning: ") for line in proc.stdout.splitlines()
            if line.startswith("warning: ")]
    carried = json.loads((tmp_path / "law.json").read_text())["warnings"]
    assert [w for w in carried if "no dependence on N" in w] == carried and len(carried) == 1
    assert any("decades beyond" in w for w in said) and any("parabola" in w for w in said)
    assert set(carried) < set(said)

    (tmp_path / "spec.yaml").write_text(spec_naming("law.json"))
    repeated = f"the law in law.json: llama3gen fit warned that {carried[0]}"
    plan = build_plan(parse_spec_text(spec_naming("law.json"), spec_dir=tmp_path))
    assert plan.law.fit.warnings == carried and repeated in plan.warnings
    files = render_files(plan, "")
    assert f"> - {repeated}." in files["README.md"].decode()
    assert f"- {carried[0]}\n" in files["docs/law.md"].decode()
    solve = cli("solve", "spec.yaml", cwd=tmp_path)
    assert solve.returncode == 0 and repeated in solve.stdout, solve.stderr

    doc = json.loads((tmp_path / "law.json").read_text())
    (tmp_path / "law.json").write_text(json.dumps(dict(doc, warnings=[])))
    quiet = build_plan(parse_spec_text(spec_naming("law.json"), spec_dir=tmp_path))
    assert not [w for w in quiet.warnings if "fit warned" in w]
    assert "What `llama3gen fit` warned" not in render_files(quiet, "")["docs/law.md"].decode()


# --------------------------------------------------------------------------- errors: file:line

def first_line(proc) -> str:
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    head, fix = proc.stderr.splitlines()  # the CLI's form: the error, then the fix
    assert fix.startswith("  fix: ")
    return head


@pytest.mark.parametrize("line, at, field, says", [
    ("sweep: {budgets: [1.0e11, 7.0e13]}", "16:18", "sweep.budgets", "not below the target"),
    ("sweep: {budgets: [1.0e12, 3.0e12], shapes: 4}", "16:18", "sweep.budgets",
     "more than sweep.max_fraction"),
    ("sweep: {budgets: [2.0e10, 2.001e10, 6.0e10]}", "16:18", "sweep.budgets", "three digits"),
    ("sweep:\n  shapes: 4\n  budgets: [1.0e6, 3.0e6]", "17:3", "sweep", "too few to bracket"),
])
def test_sweep_planning_errors_name_the_spec_line(tmp_path, line, at, field, says):
    (tmp_path / "s.yaml").write_text(TINY_SWEEP + line + "\n")
    head = first_line(cli("solve", "s.yaml", cwd=tmp_path))
    assert head.startswith(f"error: s.yaml:{at}: {field}: ") and says in head, head


@pytest.mark.parametrize("text, where, says", [
    ("name: x\nbudget: {flops: 1e23}\nvariants: [{name: a}, {name: b, params: {max: 1000}}]\n",
     "s.yaml:3:23: variants[b]", "no shape satisfies the constraints of variant 'b'"),
    ("name: x\nbudget:\n  gpu_hours: 1.0e-300\n", "s.yaml:3:3: budget", "too little to train"),
    # search.aspect is left to its default: no line to name, the file alone
    ("name: x\nbudget: {flops: 1e23}\nsearch: {layers: {min: 8, max: 16}, hidden: [16384]}\n",
     "s.yaml: search.aspect.max", "every d_model/n_layers is above search.aspect.max"),
])
def test_other_planning_errors_name_the_field_line(tmp_path, text, where, says):
    """What the sweep's errors use (cli._plan_for, spec.field_where) serves every planner error
    that names a spec field: a variant by name, the budget; a field left to its default: the file."""
    (tmp_path / "s.yaml").write_text(text)
    head = first_line(cli("solve", "s.yaml", cwd=tmp_path))
    assert head.startswith(f"error: {where}: ") and says in head, head


@pytest.mark.parametrize("text, at, says", [
    ('{\n  "format": "llama3gen-law/1",\n  oops\n}', "law.json:3:3", "is not JSON"),
    ('{"format": "llama3gen-law/2"}', "law.json:1", "is not a llama3gen law file"),
    ('{\n "format": "llama3gen-law/1",\n "E": 1.7, "A": 400,\n "B": -1,\n "alpha": 0.3,\n'
     ' "beta": 0.3\n}', "law.json:4", "B is -1"),
    ('{\n "format": "llama3gen-law/1", "E": 1.7, "A": 400, "B": 400, "alpha": 0.3,'
     ' "beta": 0.3,\n "ci": {"E": [1, 2]},\n "bootstrap": {"samples": [[1, 2, 3]]}\n}',
     "law.json:4", "bootstrap.samples"),
    # values fit cannot produce, on which the closed-form optimum overflowed (a traceback before)
    ('{\n "format": "llama3gen-law/1",\n "E": 1.7, "A": 400, "B": 400, "alpha": 0.3,\n'
     ' "beta": 1e-300\n}', "law.json:4", "beta 1e-300 lies outside [0.001, 5]"),
    ('{\n "format": "llama3gen-law/1",\n "E": 1.7,\n "A": 1e300, "B": 400, "alpha": 0.3,'
     ' "beta": 0.3\n}', "law.json:4", "overflows float64"),
    ('{\n "format": "llama3gen-law/1", "E": 1.7, "A": 400, "B": 400, "alpha": 0.3, "beta": 0.3,'
     '\n "warnings": "alpha at its bound"\n}', "law.json:3", "warnings must be a list of strings"),
])
def test_law_file_errors_name_the_file_and_line(tmp_path, text, at, says):
    (tmp_path / "law.json").write_text(text)
    (tmp_path / "s.yaml").write_text(TINY_SWEEP.replace("search:\n", "search:\n  scaling_law: "
                                                        "{file: law.json}\n"))
    head = first_line(cli("solve", "s.yaml", cwd=tmp_path))
    assert head.startswith("error: s.yaml:11:23: search.scaling_law.file: "), head
    # The law file's path as the spec's directory and its name make it: here, law.json.
    assert re.search(rf" {re.escape(at)}[: ]", head) and says in head, head


def test_fit_of_a_repo_with_a_broken_run_config_names_its_line(tmp_path):
    (tmp_path / "s.yaml").write_text(TINY_SWEEP + SWEEP_LINE)
    assert cli("compile", "s.yaml", "-o", "repo", cwd=tmp_path).returncode == 0
    lock = json.loads((tmp_path / "repo" / "llama3gen.lock.json").read_text())
    config = tmp_path / "repo" / "config" / "sweep" / f"{lock['plan']['sweep']['runs'][0]['name']}.py"
    lines = config.read_text().splitlines()
    config.write_text("\n".join(lines + ["max_iters = = 3"]) + "\n")
    head = first_line(cli("fit", "repo", "--bootstrap", 0, cwd=tmp_path))
    assert head.startswith(f"error: {config.relative_to(tmp_path)}:{len(lines) + 1}: "), head
