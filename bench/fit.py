"""How long does `llama3gen fit` take on a large sweep?

    python bench/fit.py            # 250 runs, 1,000 bootstrap resamples (issue #15's target)
    python bench/fit.py --quick    # smoke run: 40 runs, 50 resamples

Writes a CSV of runs drawn from Hoffmann et al.'s law (10 budgets from 1e17 to 1e20 FLOPs × 25
shapes spread ±1 decade in N around each budget's optimum, 0.3% multiplicative noise), then times
`llama3gen fit runs.csv --bootstrap B --target 1e22 --json` as a subprocess (interpreter start and
imports included: what a user waits for). Target: ≤ 10 s. Also prints how far the fit landed from
the true law, and the true N* beside the fitted one and its 95% CI.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
TARGET_S = 10.0
TARGET_FLOPS = 1e22


def true_law():
    from llama3gen import laws
    return laws.CATALOG["hoffmann2022"]


def write_sweep(path: Path, budgets, shapes: int, noise: float, seed: int) -> None:
    law = true_law()
    rng = np.random.default_rng(seed)
    lines = ["params,tokens,loss"]
    for c in budgets:
        n_opt = law.optimum_6nd(c).n_params
        for n in n_opt * np.logspace(-1, 1, shapes):
            d = c / (6 * n)
            lines.append(f"{n:.8g},{d:.8g},{law.loss(n, d) * (1 + noise * rng.standard_normal()):.8g}")
    path.write_text("\n".join(lines) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="40 runs, 50 resamples (no target)")
    args = ap.parse_args()
    budgets = np.logspace(17, 18, 5) if args.quick else np.logspace(17, 20, 10)
    shapes, resamples = (8, 50) if args.quick else (25, 1000)
    with tempfile.TemporaryDirectory() as tmp:
        csv = Path(tmp) / "runs.csv"
        write_sweep(csv, budgets, shapes, noise=0.003, seed=0)
        cmd = [sys.executable, "-m", "llama3gen.cli", "fit", str(csv), "--bootstrap",
               str(resamples), "--target", f"{TARGET_FLOPS:g}", "--json"]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO_ROOT,
                              env=dict(os.environ))
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout, proc.stderr)
        return 1
    out = json.loads(proc.stdout)
    runs = len(budgets) * shapes
    verdict = "PASS" if wall <= TARGET_S else "FAIL"
    print(f"llama3gen fit: {runs} runs, {resamples} bootstrap resamples: {wall:.2f} s "
          f"(target ≤ {TARGET_S:g} s: {verdict}{'; --quick, not the target size' if args.quick else ''})")
    law = true_law()
    for key in ("E", "A", "B", "alpha", "beta"):
        lo, hi = out["ci"][key]
        print(f"  {key:<6} true {getattr(law, key):<8g} fitted {out['law'][key]:<10.5g} "
              f"95% CI [{lo:.5g}, {hi:.5g}]")
    t = out["target"]
    print(f"  N* at {TARGET_FLOPS:g} FLOPs: true {law.optimum_6nd(TARGET_FLOPS).n_params:.4g}, "
          f"fitted {t['n_params']:.4g}, 95% CI [{t['n_params_ci'][0]:.4g}, {t['n_params_ci'][1]:.4g}]")
    r = out["rollout"]
    print(f"  rollout: mean relative error {r['mean_rel_error']:.3%}, max {r['max_rel_error']:.3%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
