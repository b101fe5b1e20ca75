"""`llama3gen fit` (issue #15 part 3): the law recovered from runs drawn from a known one, CIs that
cover the truth, Approach 2 on exact parabolas, the rollout check, and bad input through the CLI.

The sweep design throughout: 5 budgets from 1e17 to 1e19 FLOPs × 8 shapes spread ±1 decade in N
around each budget's optimum under the true law (Hoffmann et al. 2022), D = C/(6N).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _repo_files import REPO_ROOT

from llama3gen import fit, laws

TRUE = laws.CATALOG["hoffmann2022"]
BUDGETS = np.logspace(17, 19, 5)
KEYS = ("E", "A", "B", "alpha", "beta")
ENV = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")


def sweep_runs(seed=0, noise=0.0, law=TRUE, budgets=BUDGETS, shapes=8):
    rng = np.random.default_rng(seed)
    runs = []
    for c in budgets:
        for n in law.optimum_6nd(c).n_params * np.logspace(-1, 1, shapes):
            d = c / (6 * n)
            loss = law.loss(n, d) * (1 + noise * rng.standard_normal())
            runs.append(fit.Run(float(n), float(d), float(loss), 6 * n * d, f"sweep:{len(runs) + 2}"))
    return runs


def write_csv(path: Path, runs, header="params,tokens,loss") -> Path:
    # repr: 17 significant digits, so the CSV carries the float64 values exactly.
    path.write_text(header + "\n" + "".join(f"{float(r.params)!r},{float(r.tokens)!r},{float(r.loss)!r}\n"
                                         for r in runs))
    return path


def cli(*args, cwd=REPO_ROOT):
    return subprocess.run([sys.executable, "-m", "llama3gen.cli", "fit", *map(str, args)], cwd=cwd,
                          env=ENV, capture_output=True, text=True, timeout=120)


def law_params(law):
    return np.array([getattr(law, k) for k in KEYS])


# --------------------------------------------------------------------------- recovery

def test_noiseless_recovery_is_exact_and_rollout_error_vanishes(tmp_path):
    runs = sweep_runs()
    # Tolerance: on exact data the objective's minimum is zero at the truth and Gauss-Newton
    # converges to it; what is left is float64 rounding of the residuals (~1e-16) amplified by the
    # condition number of the Jacobian (computed here, ~1e3 for this design). 1e3 × that more.
    n, d, loss = (np.array([getattr(r, k) for r in runs]) for k in ("params", "tokens", "loss"))
    theta = np.array([math.log(TRUE.A), math.log(TRUE.B), math.log(TRUE.E), TRUE.alpha, TRUE.beta])
    r, p1, p2, p3 = fit._parts(theta, np.log(n), np.log(d), np.log(loss))
    cond = np.linalg.cond(fit._jacobian(p1, p2, p3, np.log(n), np.log(d)))
    tol = 1e3 * cond * np.finfo(float).eps
    assert tol < 1e-8  # the design is well enough conditioned for the bound to mean something

    proc = cli(write_csv(tmp_path / "runs.csv", runs), "--bootstrap", 0, "--target", 1e22, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    got = np.array([out["law"][k] for k in KEYS])
    np.testing.assert_allclose(got, law_params(TRUE), rtol=tol)
    assert out["target"]["n_params"] == pytest.approx(TRUE.optimum_6nd(1e22).n_params, rel=10 * tol)
    # The held-out budget's runs lie on the same law, so the rollout predicts them exactly.
    assert out["rollout"]["held_out_flops"] == pytest.approx(1e19, rel=1e-9)
    assert out["rollout"]["runs"] == 8
    assert out["rollout"]["max_rel_error"] < tol


def test_bootstrap_refits_agree_with_lbfgsb():
    """The batched Levenberg-Marquardt refits minimise the same objective as L-BFGS-B."""
    runs = sweep_runs(seed=1, noise=0.003)
    n, d, loss = (np.array([getattr(r, k) for r in runs]) for k in ("params", "tokens", "loss"))
    ln, ld, ll = np.log(n), np.log(d), np.log(loss)
    theta = fit.fit_law_params(n, d, loss)
    counts = np.random.default_rng(2).multinomial(len(n), np.full(len(n), 1 / len(n)), size=6)
    fast = fit.refit_weighted(theta, ln, ld, ll, counts.astype(float))
    for w, t in zip(counts, fast):
        slow = fit._polish_weighted(theta, ln, ld, ll, w)
        f_fast = fit._huber(fit._parts(t, ln, ld, ll)[0], w)
        f_slow = fit._huber(fit._parts(slow, ln, ld, ll)[0], w)
        # Both stop at a stationary point of an objective of size ~len(runs): their values agree
        # to the stopping rules' relative 1e-13 (LM) and L-BFGS-B's ftol, far inside 1e-8.
        assert f_fast <= f_slow * (1 + 1e-8)


SEEDS = 20
RESAMPLES = 200


@pytest.fixture(scope="module")
def coverage():
    """For each seed (noise 0.3%, the middle of the 0.2-0.5% issue #15 asks for): is the truth in
    the 95% CI, for N* at 1e22 FLOPs (three decades above the largest budget) and each
    parameter?"""
    target = 1e22
    true_n = TRUE.optimum_6nd(target).n_params
    hits = {k: 0 for k in KEYS + ("n_params",)}
    fitted = []
    for seed in range(SEEDS):
        res = fit.fit(sweep_runs(seed, noise=0.003), [], target_flops=target,
                      bootstrap=RESAMPLES, seed=seed)
        fitted.append(law_params(res.law))
        lo, hi = res.target["n_params_ci"]
        hits["n_params"] += lo <= true_n <= hi
        for k in KEYS:
            hits[k] += res.ci[k][0] <= getattr(TRUE, k) <= res.ci[k][1]
    return hits, np.array(fitted)


def test_ci_covers_the_truth_about_95_percent(coverage):
    # Measured on this design: N* covered in 19 of these 20 seeds (38 of 40 seeds at 200 and 400
    # resamples), each parameter in 20 of 20. If the CIs are right, hits ~ Binomial(20, 0.95): P(hits ≤ 15) = 0.003,
    # so 16 is the bound; a CI that covers only 60% of the time passes it with probability 0.05.
    hits, _ = coverage
    for key, count in hits.items():
        assert count >= 16, (key, hits)


def test_fitted_parameters_near_the_truth(coverage):
    # If the fit is unbiased, the mean over 20 seeds of each log-parameter misses the truth by a
    # normal error of standard deviation σ/√20 (σ the seed-to-seed spread, measured here: ~7% in
    # A and B, ~1.5% in E and the exponents). Three standard errors: a false alarm 0.3% of the
    # time per parameter. Measured: every mean within 1.6 standard errors.
    _, fitted = coverage
    logs = np.log(fitted)
    stderr = logs.std(axis=0, ddof=1) / math.sqrt(len(logs))
    assert np.all(np.abs(logs.mean(axis=0) - np.log(law_params(TRUE))) < 3 * stderr)
    assert np.all(stderr < 0.05)  # and the fits are tight: σ under 22% for every parameter


# --------------------------------------------------------------------------- approach 2

def test_approach2_on_exact_parabolas(tmp_path):
    """Loss exactly a parabola in log N per budget, vertex on N_opt = k·C^a: recovered exactly."""
    k, a, curvature = 0.1, 0.5, 0.05
    runs = []
    for c in (1e18, 1e19, 1e20):
        n_opt = k * c**a
        for n in n_opt * np.logspace(-1, 1, 5):
            runs.append(fit.Run(float(n), c / (6 * n), 3.0 - 0.1 * math.log10(c) +
                                curvature * math.log(n / n_opt) ** 2, 0.0, "x"))
    proc = cli(write_csv(tmp_path / "parabola.csv", runs), "--bootstrap", 0, "--target", 1e21,
               "--json")
    assert proc.returncode == 0, proc.stderr
    a2 = json.loads(proc.stdout)["approach2"]
    # Least squares on exact quadratic data (log N centred, spread ±2.3) is exact up to float64
    # rounding times a small condition number: 1e-9 relative leaves room of 1e5 or more.
    assert a2["n_opt"]["a"] == pytest.approx(a, rel=1e-9)
    assert a2["n_opt"]["k"] == pytest.approx(k, rel=1e-7)  # k = e^intercept: intercept error × 40
    # D_opt = C/(6·N_opt) = C^(1-a)/(6k)
    assert a2["tokens_opt"]["b"] == pytest.approx(1 - a, rel=1e-9)
    assert a2["tokens_opt"]["k"] == pytest.approx(1 / (6 * k), rel=1e-7)
    for m, c in zip(a2["budgets"], (1e18, 1e19, 1e20)):
        assert m["bracketed"] and m["n_opt"] == pytest.approx(k * c**a, rel=1e-9)
    assert a2["target"]["n_params"] == pytest.approx(k * 1e21**a, rel=1e-7)


def test_approach2_minima_that_shrink_as_compute_grows_are_not_a_power_law():
    """The same exact parabolas with N_opt = k·C^a at a = −0.5 (the optimum shrinking as compute
    grows): under C ∝ N·D both exponents lie in [0, 1], so approach 2 says it is unavailable
    rather than extrapolate a line no compute-optimal frontier can follow."""
    runs = []
    for c in (1e18, 1e19, 1e20):
        n_opt = 1e14 * c**-0.5
        for n in n_opt * np.logspace(-1, 1, 5):
            runs.append(fit.Run(float(n), c / (6 * n), 3.0 + 0.05 * math.log(n / n_opt) ** 2,
                                c, "x"))
    a2 = fit.approach2(runs, fit.group_budgets(runs))
    assert a2.unavailable and "C^-0.5" in a2.unavailable and "do not follow C" in a2.unavailable


def test_a_law_without_a_finite_optimum_is_refused():
    """Exponents and coefficients at the fit's bounds can put N* beyond float range (G =
    (αA/(βB))^(1/(α+β)) underflows for A = e^-30, B = e^80 and α + β = 0.02): such a law is
    not written; Hoffmann's has its optimum at every budget."""
    from llama3gen.laws import CATALOG, ScalingLaw
    lo, hi = fit.BOUNDS[0][0], fit.BOUNDS[1][1]
    degenerate = ScalingLaw("x", 1.0, math.exp(lo), math.exp(hi), 0.01, 0.01, "x")
    assert not fit._finite_optimum(degenerate, [1e18, 1e21])
    assert fit._finite_optimum(CATALOG["hoffmann2022"], [1e18, 1e21, 1e25])


# --------------------------------------------------------------------------- the CLI

@pytest.fixture(scope="module")
def noisy_csv(tmp_path_factory):
    return write_csv(tmp_path_factory.mktemp("fit") / "runs.csv", sweep_runs(3, noise=0.003))


def test_report_and_json(noisy_csv):
    proc = cli(noisy_csv, "--bootstrap", 100, "--target", 1e22)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for text in ("Approach 3", "Approach 2", "disagreement: approach 3 / approach 2",
                 "Rollout check: fitted without the largest budget",
                 "warning: the target 1e+22 FLOPs is 3.0 decades beyond"):
        assert text in out, out
    proc = cli(noisy_csv, "--bootstrap", 100, "--target", 1e22, "--json")
    doc = json.loads(proc.stdout)
    assert set(doc["law"]) == set(KEYS) and set(doc["ci"]) >= set(KEYS)
    for k in KEYS:
        lo, hi = doc["ci"][k]
        assert lo <= doc["law"][k] <= hi
    t = doc["target"]
    for key in ("n_params", "tokens", "loss"):
        assert t[key + "_ci"][0] <= t[key] <= t[key + "_ci"][1]
    assert t["flops"] == 1e22 and doc["runs"]["used"] == 40 and doc["runs"]["excluded"] == []
    assert len(doc["runs"]["farthest"]) == fit.FARTHEST_RUNS
    assert doc["rollout"]["max_rel_error"] < 0.05  # 0.3% noise; the law is the generating one
    assert doc["approach2"]["target"]["n_params_ratio_3_to_2"] == pytest.approx(1, abs=0.2)


def test_same_seed_same_answer(noisy_csv):
    one, two = (cli(noisy_csv, "--bootstrap", 50, "--seed", 7, "--json").stdout for _ in range(2))
    assert one == two
    assert cli(noisy_csv, "--bootstrap", 50, "--seed", 8, "--json").stdout != one


def test_spec_gives_the_target(noisy_csv):
    proc = cli(noisy_csv, "--bootstrap", 0, "--spec", REPO_ROOT / "specs" / "1.36e21.yaml", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["target"]["flops"] == 1.36e21


def test_excluded_runs_are_named(tmp_path):
    runs = sweep_runs(4, noise=0.003)
    runs[5].loss = runs[5].loss * 3  # diverged
    path = write_csv(tmp_path / "runs.csv", runs)
    text = path.read_text().splitlines()
    text[10] = text[10].rsplit(",", 1)[0] + ","      # no final loss
    text[11] = text[11].rsplit(",", 1)[0] + ",nan"   # NaN
    path.write_text("\n".join(text) + "\n")
    proc = cli(path, "--bootstrap", 0, "--exclude-worst", 1, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    excluded = {e["source"]: e["reason"] for e in doc["runs"]["excluded"]}
    assert excluded == {f"{path}:11": "no final loss (empty)", f"{path}:12": "loss is nan, not finite",
                        f"{path}:7": "--exclude-worst: among the highest losses"}
    assert doc["runs"]["used"] == 37
    report = cli(path, "--bootstrap", 0, "--exclude-worst", 1).stdout
    assert f"excluded {path}:7 " in report and f"excluded {path}:11 " in report


def test_law_file_written_atomically_and_foreign_files_kept(noisy_csv, tmp_path):
    law = tmp_path / "law.json"
    proc = cli(noisy_csv, "--bootstrap", 20, "-o", law)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(law.read_text())
    assert doc["format"] == fit.LAW_FORMAT and set(KEYS) <= set(doc)
    assert doc["citation"].startswith("fitted by llama3gen fit on 40 runs (budgets 1e+17, ")
    assert cli(noisy_csv, "--bootstrap", 20, "-o", law).returncode == 0  # ours: replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["law.json"]  # no temporary left
    foreign = tmp_path / "notes.json"
    foreign.write_text("{}")
    proc = cli(noisy_csv, "--bootstrap", 0, "-o", foreign)
    assert proc.returncode == 2 and "not written by llama3gen fit" in proc.stderr
    assert foreign.read_text() == "{}"
    proc = cli(noisy_csv, "--bootstrap", 0, "-o", tmp_path)
    assert proc.returncode == 2 and "is a directory" in proc.stderr, proc.stderr
    link = tmp_path / "link.json"
    link.symlink_to(law)
    proc = cli(noisy_csv, "--bootstrap", 0, "-o", link)
    assert proc.returncode == 2 and "symbolic link" in proc.stderr
    for path in (tmp_path / "no-such-dir" / "law.json", tmp_path / "no-such-dir" / "fit.svg"):
        proc = cli(noisy_csv, "--bootstrap", 0, "-o" if path.suffix == ".json" else "--svg", path)
        assert proc.returncode == 2 and "its directory does not exist" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and not path.parent.exists()


def _bad(tmp_path, text):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    return path


GOOD = "".join(f"{r.params!r},{r.tokens!r},{r.loss!r}\n" for r in sweep_runs())


@pytest.mark.parametrize("text, where, says", [
    ("params,loss\n1e8,3.0\n", ":1", "lacks column tokens"),
    ("params,tokens,loss\n" + GOOD + "1e8,lots,3.0\n", ":42", "tokens 'lots' is not a number"),
    ("params,tokens,loss\n1e8,2e9,abc\n", ":2", "loss 'abc' is not a number"),
    ("params,tokens,loss\n1e8,2e9,3.0\n0,2e9,3.0\n", ":3", "params '0' must be a positive"),
    ("params,tokens,loss\n1e8,2e9,-3\n", ":2", "loss '-3' is below 0.001 nats"),
    ("params,tokens,loss\n1e8,2e9,3.1\n1e9,2e8,3.0\n2e8,1e9,2.9\n", "", "fewer than the law's 5"),
    ("params,tokens,loss\n" + "".join(f"{n:g},{1e18 / (6 * n):g},3.{i}\n"
                                      for i, n in enumerate(np.logspace(7, 9, 8))),
     "", "all 8 runs are at one budget"),
    ("", ":1", "empty file"),
])
def test_bad_input_one_error_exit_2(tmp_path, text, where, says):
    path = _bad(tmp_path, text)
    proc = cli(path, "--bootstrap", 0)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    err = proc.stderr
    assert "Traceback" not in err and proc.stdout == ""
    head, fix = err.splitlines()  # the CLI's form: the error, then the fix
    assert head.startswith(f"error: {path}") and says in head, err
    if where is not None:
        assert head.startswith(f"error: {path}{where}"), err
    assert fix.startswith("  fix: "), err


def test_missing_file_and_directory(tmp_path):
    for source, says in ((tmp_path / "nope.csv", "file not found"), (tmp_path, "lock.json is missing")):
        proc = cli(source)
        assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr


def test_bad_options_exit_2(noisy_csv):
    for args in (("--target", "-1"), ("--target", "lots"), ("--bootstrap", "-3"),
                 ("--exclude-worst", "x"), ("--target", "1e22", "--spec", "specs/1.36e21.yaml")):
        proc = cli(noisy_csv, *args)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (args, proc.stderr)


# --------------------------------------------------------------------------- speed, imports

def test_solve_does_not_import_scipy():
    code = ("import sys; from llama3gen import cli; cli.main(['solve', 'specs/1.36e21.yaml']); "
            "assert 'scipy' not in sys.modules, 'solve imported scipy'")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_bench_fit_quick():
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "fit.py"), "--quick"],
                          cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "llama3gen fit: 40 runs, 50 bootstrap resamples:" in proc.stdout, proc.stdout


# --------------------------------------------------------------------------- a spec uses the law

def test_spec_plans_with_the_fitted_law(noisy_csv, tmp_path):
    """search.scaling_law: {file: LAW.json}, relative to the spec's directory, not the cwd."""
    specs = tmp_path / "specs"
    specs.mkdir()
    assert cli(noisy_csv, "--bootstrap", 20, "-o", specs / "law.json").returncode == 0
    fitted = json.loads((specs / "law.json").read_text())
    text = (REPO_ROOT / "specs" / "1.36e21.yaml").read_text()
    lines = [l for l in text.splitlines() if not l.strip().startswith("scaling_law:")]
    at = lines.index("search:") + 1
    spec = specs / "spec.yaml"
    spec.write_text("\n".join(lines[:at] + ["  scaling_law: {file: law.json}"] + lines[at:]) + "\n")
    proc = subprocess.run([sys.executable, "-m", "llama3gen.cli", "solve", str(spec), "--json"],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    law = json.loads(proc.stdout)["law"]
    assert [law[k] for k in KEYS] == [fitted[k] for k in KEYS]
    assert law["citation"] == fitted["citation"] + "; file law.json"
    assert law["citation"].startswith("fitted by llama3gen fit on 40 runs (budgets 1e+17, ")

    spec.write_text(spec.read_text().replace("{file: law.json}", "{file: missing.json}"))
    proc = subprocess.run([sys.executable, "-m", "llama3gen.cli", "solve", str(spec)],
                          cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "search.scaling_law.file: law file" in proc.stderr and "not found" in proc.stderr


def test_runs_that_read_their_data_more_than_once_are_named():
    """A run's epochs come from train.py's log; more than one pass is a warning naming the most
    repeated run (L(N, D) counts each token once), one pass or an unknown count is not."""
    import dataclasses
    runs = sweep_runs()
    runs[3] = dataclasses.replace(runs[3], epochs=2.5)
    runs[7] = dataclasses.replace(runs[7], epochs=1.25)
    runs[9] = dataclasses.replace(runs[9], epochs=1.0)
    warned = [w for w in fit.fit(runs, [], bootstrap=0).warnings if "more than once" in w]
    assert len(warned) == 1 and "2 run(s)" in warned[0], warned
    assert f"{runs[3].where}, 2.50 epochs" in warned[0] and "Muennighoff" in warned[0]
    once = [dataclasses.replace(r, epochs=min(r.epochs, 1.0)) for r in runs]
    assert not [w for w in fit.fit(once, [], bootstrap=0).warnings if "more than once" in w]


def test_what_the_runs_leave_undetermined_is_a_warning():
    """Losses with no N-dependence (L = 2 + 400/D^0.3 exactly): the fit makes A/N^α vanish, and
    says the runs cannot tell how the loss falls with N. A parameter at a bound of the search is
    named with its side. Exact runs from Hoffmann et al.'s law get neither."""
    import dataclasses
    runs = sweep_runs()
    assert not [w for w in fit.fit(runs, [], bootstrap=0).warnings if "determine" in w
                or "no dependence" in w]
    flat = [dataclasses.replace(r, loss=2.0 + 400 / r.tokens ** 0.3) for r in runs]
    warned = [w for w in fit.fit(flat, [], bootstrap=0).warnings if "no dependence" in w]
    assert len(warned) == 1 and "A/N^alpha" in warned[0] and "on N" in warned[0], warned
    n, d, loss = (np.array([getattr(r, k) for r in runs]) for k in ("params", "tokens", "loss"))
    theta = fit.fit_law_params(n, d, loss).copy()
    theta[3] = fit.BOUNDS[3][1]  # alpha at the upper end of its range
    at_bound = [w for w in fit.degenerate_fit_warnings(theta, n, d, loss) if "bound" in w]
    assert at_bound == [f"alpha = {fit.BOUNDS[3][1]:.4g} sits at the fit's upper bound: the runs "
                        "do not determine it, and N*, D* and the loss at the target inherit the "
                        "bound; runs over a wider range of N and D (more budgets, larger models) "
                        "would"]


def test_the_runs_farthest_from_the_law_are_named():
    """One run's loss raised 5% above exact runs of Hoffmann et al.'s law: the Huber fit keeps
    the law (the other runs are exact), so that run is the farthest, at 1/1.05 − 1 = −4.76%,
    first in the JSON and in the report."""
    import dataclasses
    runs = sweep_runs()
    runs[11] = dataclasses.replace(runs[11], loss=runs[11].loss * 1.05)
    res = fit.fit(runs, [], bootstrap=0)
    first = res.farthest()[0]
    assert first["run"] == runs[11].where and len(res.farthest()) == fit.FARTHEST_RUNS
    # the fit moves the law by less than the Huber threshold (1e-3) at the other runs
    assert first["rel_error"] == pytest.approx(1 / 1.05 - 1, abs=2e-3)
    assert res.to_json()["runs"]["farthest"][0] == first
    report = fit.report(res)
    assert f"{first['rel_error']:+.2%}  {runs[11].where}" in report
