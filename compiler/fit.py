"""Fit a scaling law L(N, D) = E + A/N^α + B/D^β on the user's own runs (`llama3gen fit`).

Pure functions: runs in, a `FitResult` out; the CLI prints it. Methods and citations: docs/FIT.md.

- Approach 3 (Hoffmann et al. 2022; as Besiroglu et al. 2024 refitted it): minimise
  Σ Huber_δ(LSE(a − α·log N, b − β·log D, e) − log L) with A = e^a, B = e^b, E = e^e, δ = 1e-3,
  by L-BFGS-B with analytic gradients. Starts: for each (α, β) on a grid, E, A and B are solved
  by least squares (the variable-projection idea: the law is linear in them), and the best few
  grid points are polished.
- Approach 2: per budget a parabola in log N, its vertex N_opt(C); then N_opt = k·C^a and
  D_opt = k'·C^b by least squares in log-log.
- Bootstrap: resample the runs with replacement, refit from the full-data optimum, take the
  2.5 and 97.5 percentiles of every parameter and of N*, D*, L* at the target.
- Rollout: fit without the largest budget and predict its runs.

numpy and scipy are imported inside the functions, so `solve` and `compile` never load scipy.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError
from .jsonfile import whole_number, write_own_file
from .laws import EXPONENT_RANGE, LAW_FORMAT, LAW_KEYS, ScalingLaw

HUBER_DELTA = 1e-3
N_LAW_PARAMS = 5  # E, A, B, alpha, beta
CI_LEVEL = 0.95
FARTHEST_RUNS = 3  # named in the report and the JSON: the runs farthest from the law
# Runs whose FLOPs agree within this factor belong to one budget (a sweep's token counts are
# rounded to whole steps, so runs of one budget differ by a fraction of a percent, not 10%).
SAME_BUDGET = 1.1
# Beyond this many decades past the largest fitted budget the report warns.
FAR_DECADES = 2.0
# Approach 3's start grid over (alpha, beta); every point gets E, A, B by least squares.
EXPONENT_GRID = (0.05, 1.5, 30)
POLISHED_STARTS = 8


@dataclass
class Run:
    params: float
    tokens: float
    loss: float
    flops: float
    where: str  # "file:line"
    epochs: float = float("nan")  # passes over the training data (train.py's log); NaN: unknown

    def describe(self) -> str:
        return (f"{self.where} (N {self.params:.4g}, D {self.tokens:.4g}, "
                f"loss {self.loss:.4g})")


@dataclass
class Excluded:
    run: Run
    reason: str

    def to_json(self) -> dict:
        r = self.run
        return {"source": r.where, "reason": self.reason, "params": r.params,
                "tokens": r.tokens, "loss": r.loss if math.isfinite(r.loss) else None}


# --------------------------------------------------------------------------- input

REQUIRED = ("params", "tokens", "loss")
CSV_FIX = "give a CSV with the header params,tokens,loss (optional flops), one run per line"


def _number(text: str, where: str, column: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{column} {text!r} is not a number", where=where,
                        fix=f"write {column} as a positive number, e.g. 1.2e8") from None
    if not (math.isfinite(value) and value > 0):
        raise UserError(f"{column} {text!r} must be a positive finite number", where=where,
                        fix=f"write {column} as a positive number, e.g. 1.2e8, or remove the line")
    return value


def read_source(path: str) -> tuple[list[Run], list[Excluded]]:
    """A generated repo's sweep runs (a directory), or a CSV's runs."""
    return read_repo(path) if Path(path).is_dir() else read_csv(path)


def read_csv(path: str) -> tuple[list[Run], list[Excluded]]:
    """Runs from a CSV with columns params,tokens,loss and optionally flops (else C = 6ND).

    A missing or non-finite loss (a run that did not finish, or diverged) is excluded, not an
    error: the report names it. Any other bad value is an error naming file and line."""
    p = Path(path)
    if p.is_dir():
        raise UserError("is a directory, not a CSV", where=path,
                        fix=CSV_FIX + "; or pass a generated repo to `llama3gen fit`")
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError("file not found", where=path, fix=CSV_FIX) from None
    except UnicodeDecodeError:
        raise UserError("not UTF-8 text", where=path, fix=CSV_FIX) from None
    except OSError as exc:
        raise UserError(f"cannot read: {exc.strerror}", where=path, fix=CSV_FIX) from None
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if header is None:
        raise UserError("empty file", where=f"{path}:1", fix=CSV_FIX)
    names = [h.strip().lower() for h in header]
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        raise UserError(f"the header lacks column {', '.join(missing)} (has: {', '.join(names)})",
                        where=f"{path}:1", fix=CSV_FIX)
    col = {c: names.index(c) for c in REQUIRED + ("flops",) if c in names}
    runs, excluded = [], []
    for fields in reader:
        where = f"{path}:{reader.line_num}"
        if not any(f.strip() for f in fields):
            continue  # blank line
        if len(fields) < len(names):
            raise UserError(f"{len(fields)} fields, the header has {len(names)}", where=where,
                            fix=CSV_FIX)
        n = _number(fields[col["params"]].strip(), where, "params")
        d = _number(fields[col["tokens"]].strip(), where, "tokens")
        c = _number(fields[col["flops"]].strip(), where, "flops") if "flops" in col else 6 * n * d
        loss_text = fields[col["loss"]].strip()
        try:
            loss = float(loss_text) if loss_text else float("nan")
        except ValueError:
            raise UserError(f"loss {loss_text!r} is not a number", where=where,
                            fix="write the run's final validation loss, or leave it empty if "
                                "the run did not finish") from None
        run = Run(n, d, loss, c, where)
        if not math.isfinite(loss):
            excluded.append(Excluded(run, "no final loss (empty)" if not loss_text
                                     else f"loss is {loss_text}, not finite"))
            continue
        if loss < MIN_LOSS:
            raise UserError(f"loss {loss_text!r} is below {MIN_LOSS} nats", where=where,
                            fix="write the run's final validation loss in nats (a loss this "
                                "small means the validation data leaked into training)")
        runs.append(run)
    return runs, excluded


REPO_FIX = ("pass a repo compiled from a spec with a sweep: section (llama3gen compile), after "
            "scripts/sweep.sh or scripts/sweep.sbatch trained its runs")


def read_repo(path: str) -> tuple[list[Run], list[Excluded]]:
    """The sweep runs of a generated repo: each run's settings from its metrics.jsonl `start`
    record (what train.py ran, overrides included), else its config/sweep/<run>.py; its final
    loss is the validation loss at step max_iters. Unfinished runs are excluded, by name."""
    from .render import read_lock_plan
    repo = Path(path)
    plan = read_lock_plan(repo)
    sweep = plan.get("sweep")
    if not isinstance(sweep, dict) or not sweep.get("runs"):
        raise UserError("this repo was compiled without a sweep (its lock file lists no sweep "
                        "runs)", where=path, fix=REPO_FIX)
    convention = (plan.get("budget") or {}).get("convention", "6N")
    runs, excluded = [], []
    for entry in sweep["runs"]:
        config_path = f"config/sweep/{entry['name']}.py"
        where = str(repo / config_path)
        config = _read_config(repo / config_path, where)
        problem = _config_problem(config)
        if problem:
            raise UserError(f"the sweep run's config {problem}", where=where,
                            fix="re-compile the repo (llama3gen compile SPEC -o DIR)")
        metrics = f"{config['out_dir']}/metrics.jsonl"
        started = _metrics(repo / metrics)
        starts = [r for r in started if r.get("event") == "start" and isinstance(r.get("config"), dict)]
        ran = {**config, **starts[-1]["config"]} if starts else config
        problem = _config_problem(ran)
        if problem:  # an edited record: the run cannot be placed, the others still fit
            excluded.append(Excluded(_repo_run(config, convention, [], where),
                                     f"its start record's config {problem} ({metrics})"))
            continue
        run = _repo_run(ran, convention, started, where)
        if math.isfinite(run.loss) and run.loss >= MIN_LOSS:
            runs.append(run)
        else:
            reason = ("not started" if not started else
                      f"not finished: no validation loss at step {ran['max_iters']}"
                      if math.isnan(run.loss) else f"its final validation loss is {run.loss}")
            excluded.append(Excluded(run, f"{reason} ({metrics})"))
    return runs, excluded


CONFIG_KEYS = ("n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "ffn_hidden", "vocab_size",
               "block_size", "tie_embeddings", "max_iters", "global_batch_size", "out_dir")
COUNT_KEYS = CONFIG_KEYS[:8] + ("max_iters", "global_batch_size")


# Below this a validation loss (nats per token) says the validation data leaked into training,
# or the number is wrong; near zero, the fit's relative errors (1 / L) overflow.
MIN_LOSS = 1e-3


def _config_problem(config: dict) -> str | None:
    """What makes a sweep run's settings unusable (N, D and C come from them), or None."""
    for key in COUNT_KEYS:
        value = config.get(key)
        if not whole_number(value):
            return f"gives {key} {value!r}, not a whole number from 1 to 2**31 - 1"
    if not isinstance(config.get("tie_embeddings"), bool):
        return f"gives tie_embeddings {config.get('tie_embeddings')!r}, not True or False"
    out_dir = config.get("out_dir")
    if not isinstance(out_dir, str) or not out_dir or Path(out_dir).is_absolute() \
            or ".." in Path(out_dir).parts:
        return f"gives out_dir {out_dir!r}, not a directory inside the repo"
    return None


def _read_config(path: Path, where: str) -> dict:
    """The literal assignments of a generated config file (it holds nothing else)."""
    import ast
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except SyntaxError as exc:
        raise UserError(f"cannot read the sweep run's config: {exc.msg}",
                        where=f"{where}:{exc.lineno}" if exc.lineno else where,
                        fix="re-compile the repo (llama3gen compile SPEC -o DIR)") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the sweep run's config: {exc}", where=where,
                        fix="re-compile the repo (llama3gen compile SPEC -o DIR)") from None
    config = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name):
            try:
                config[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    missing = [k for k in CONFIG_KEYS if k not in config]
    if missing:
        raise UserError(f"the sweep run's config lacks {', '.join(missing)}", where=where,
                        fix="re-compile the repo (llama3gen compile SPEC -o DIR)")
    return config


def _metrics(path: Path) -> list[dict]:
    """metrics.jsonl's records; [] when there is none. A line cut short by a kill is skipped."""
    import json
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    records = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _repo_run(config: dict, convention: str, records: list[dict], where: str) -> Run:
    """N from the shape (compiler/arch.py), D = max_iters × batch × block_size, C in the plan's
    convention, and the validation loss at max_iters (NaN when there is none)."""
    from . import arch
    c = config
    n = int(arch.param_count(c["n_layer"], c["n_embd"], c["n_head"], c["n_kv_head"],
                             c["head_dim"], c["ffn_hidden"], c["vocab_size"], c["tie_embeddings"]))
    d = float(c["max_iters"] * c["global_batch_size"] * c["block_size"])
    fpt = 6 * n if convention == "6N" else int(arch.flops_per_token_exact(
        c["n_layer"], c["n_embd"], c["n_head"], c["n_kv_head"], c["head_dim"], c["ffn_hidden"],
        c["vocab_size"], c["block_size"]))
    losses = [v for step, v in logged_values(records, "val_loss") if step == c["max_iters"]]
    epochs = [v for _, v in logged_values(records, "epoch")]
    return Run(n, d, float(losses[-1]) if losses else float("nan"), fpt * d, where,
               float(max(epochs)) if epochs else float("nan"))


def logged_values(records: list[dict], key: str) -> list[tuple]:
    """(step, value) of every train.py record (not an event) whose `key` is a number."""
    return [(r.get("step"), r[key]) for r in records if "event" not in r
            and isinstance(r.get(key), (int, float)) and not isinstance(r[key], bool)]


def repo_target(path: str) -> float | None:
    """The target budget a generated repo was compiled for (its lock's plan.budget.flops)."""
    from .render import read_lock_plan
    budget = read_lock_plan(Path(path)).get("budget")
    flops = budget.get("flops") if isinstance(budget, dict) else None
    return float(flops) if isinstance(flops, (int, float)) and flops > 0 else None


def group_budgets(runs: list[Run]) -> list[list[int]]:
    """Indices of runs per budget, smallest budget first (runs within SAME_BUDGET × of the
    group's smallest)."""
    order = sorted(range(len(runs)), key=lambda i: runs[i].flops)
    groups: list[list[int]] = []
    for i in order:
        if groups and runs[i].flops <= SAME_BUDGET * runs[groups[-1][0]].flops:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def select_runs(runs: list[Run], excluded: list[Excluded], exclude_worst: int,
                sources: str) -> tuple[list[Run], list[Excluded]]:
    """Drop the `exclude_worst` highest-loss runs, then check there is enough left to fit."""
    excluded = list(excluded)
    if exclude_worst:
        worst = sorted(range(len(runs)), key=lambda i: runs[i].loss, reverse=True)[:exclude_worst]
        for i in worst:
            excluded.append(Excluded(runs[i], "--exclude-worst: among the highest losses"))
        dropped = set(worst)
        runs = [r for i, r in enumerate(runs) if i not in dropped]
    if len(runs) < N_LAW_PARAMS:
        raise UserError(f"{len(runs)} usable runs, fewer than the law's {N_LAW_PARAMS} parameters "
                        f"(E, A, B, alpha, beta)" + (f"; {len(excluded)} excluded" if excluded
                                                     else ""),
                        where=sources, fix="add runs (a sweep of several budgets × several shapes "
                                           "each), or exclude fewer")
    groups = group_budgets(runs)
    if len(groups) < 2:
        raise UserError(f"all {len(runs)} runs are at one budget ({runs[0].flops:.3g} FLOPs); "
                        "the law's exponents cannot be separated", where=sources,
                        fix="add runs at other budgets (e.g. 3-5 budgets over two decades)")
    return runs, excluded


# --------------------------------------------------------------------------- approach 3

def _parts(theta, logn, logd, logl):
    """Residuals r = LSE(a − α·log N, b − β·log D, e) − log L and the softmax weights of the
    three terms (the derivatives of the LSE). theta is (..., 5); the results (..., n)."""
    import numpy as np
    a, b, e, alpha, beta = (theta[..., k, None] for k in range(N_LAW_PARAMS))
    t1 = a - alpha * logn
    t2 = b - beta * logd
    m = np.maximum(np.maximum(t1, t2), e)
    w1, w2, w3 = np.exp(t1 - m), np.exp(t2 - m), np.exp(e - m)
    s = w1 + w2 + w3
    return m + np.log(s) - logl, w1 / s, w2 / s, w3 / s


def _huber(r, weights=1.0):
    """Σ weights·Huber_δ(r) / δ², over the last axis. Divided by δ² so a residual of δ costs ½:
    L-BFGS-B's tolerances are relative to 1."""
    import numpy as np
    d = HUBER_DELTA
    ar = np.abs(r)
    return (weights * np.where(ar <= d, 0.5 * r * r, d * (ar - 0.5 * d))).sum(-1) / (d * d)


def _jacobian(p1, p2, p3, logn, logd):
    """∂r/∂(a, b, e, α, β), shape (..., n, 5)."""
    import numpy as np
    return np.stack([p1, p2, p3, -p1 * logn, -p2 * logd], axis=-1)


def _objective(theta, logn, logd, logl):
    """The Huber objective and its analytic gradient, for L-BFGS-B."""
    import numpy as np
    r, p1, p2, p3 = _parts(theta, logn, logd, logl)
    psi = np.clip(r, -HUBER_DELTA, HUBER_DELTA) / HUBER_DELTA**2
    return float(_huber(r)), psi @ _jacobian(p1, p2, p3, logn, logd)


# a, b, e (logs of A, B, E) and the exponents: wide enough for any published law.
THETA_KEYS = ("A", "B", "E", "alpha", "beta")  # theta = (log A, log B, log E, α, β)
BOUNDS = ((-30.0, 80.0), (-30.0, 80.0), (-15.0, 5.0), EXPONENT_RANGE, EXPONENT_RANGE)


def _polish(theta0, logn, logd, logl):
    from scipy.optimize import minimize
    res = minimize(_objective, theta0, args=(logn, logd, logl), jac=True, method="L-BFGS-B",
                   bounds=BOUNDS, options={"maxiter": 2000, "ftol": 1e-13, "gtol": 1e-9})
    return res.x, float(res.fun)


def _starts(n, d, loss, k: int):
    """The k best (α, β) grid points, E, A, B solved by least squares on the relative error
    (E + A·N^-α + B·D^-β − L)/L for each; negative solutions are clipped to tiny positives."""
    import numpy as np
    grid = np.linspace(*EXPONENT_GRID)
    x = n[None, :] ** -grid[:, None]                    # (G, n)
    y = d[None, :] ** -grid[:, None]
    w = 1.0 / loss
    ga, gb = np.meshgrid(np.arange(len(grid)), np.arange(len(grid)), indexing="ij")
    ga, gb = ga.ravel(), gb.ravel()
    cols = np.stack([np.broadcast_to(w, (len(ga), len(w))), x[ga] * w, y[gb] * w], axis=2)
    scale = np.linalg.norm(cols, axis=1, keepdims=True)   # (G, 1, 3): conditions the solve
    coef = np.einsum("gjn,n->gj", np.linalg.pinv(cols / scale), loss * w) / scale[:, 0, :]
    floor = np.array([1e-4, 1e-8, 1e-8]) * loss.min()
    coef = np.maximum(coef, floor)
    thetas = np.stack([np.log(coef[:, 1]), np.log(coef[:, 2]), np.log(coef[:, 0]),
                       grid[ga], grid[gb]], axis=1)
    thetas = np.clip(thetas, [b[0] for b in BOUNDS], [b[1] for b in BOUNDS])
    scores = _huber(_parts(thetas, np.log(n), np.log(d), np.log(loss))[0])
    return thetas[np.argsort(scores)[:k]]


def fit_law_params(n, d, loss):
    """(a, b, e, α, β) minimising the Huber objective: the best grid points are polished at once
    by `refit_weighted`, then the best of them by L-BFGS-B (which confirms the minimum)."""
    import numpy as np
    logn, logd, logl = np.log(n), np.log(d), np.log(loss)
    starts = _starts(n, d, loss, POLISHED_STARTS)
    polished = refit_weighted(starts, logn, logd, logl, np.ones((len(starts), len(n))))
    best = polished[np.argmin(_huber(_parts(polished, logn, logd, logl)[0]))]
    return _polish(best, logn, logd, logl)[0]


def refit_weighted(theta0, logn, logd, logl, weights, max_iter=100):
    """Minimise Σ w_i·Huber_δ(r_i) for every row of `weights` (B, n) at once, from theta0 (one
    start (5,) for all rows, or one per row (B, 5)).

    The bootstrap's refits: a resample is a row of counts. Levenberg-Marquardt on the Huber
    objective (its Gauss-Newton matrix Jᵀ·diag(w·ψ(r)/r)·J, the IRLS weights), vectorised over
    the resamples: one L-BFGS-B call per resample costs ~50 ms of Python, this ~1 ms. A row that
    has not converged (gradient not small) is refitted by L-BFGS-B. Returns (B, 5)."""
    import numpy as np
    nb = weights.shape[0]
    lo, hi = np.array([b[0] for b in BOUNDS]), np.array([b[1] for b in BOUNDS])
    theta = np.array(np.broadcast_to(theta0, (nb, N_LAW_PARAMS)), dtype=float)
    r, p1, p2, p3 = _parts(theta, logn, logd, logl)
    f = _huber(r, weights)
    lam = np.full(nb, 1e-4)
    active = np.ones(nb, dtype=bool)
    eye = np.eye(N_LAW_PARAMS)
    for _ in range(max_iter):
        if not active.any():
            break
        ia = np.flatnonzero(active)
        J = _jacobian(p1[ia], p2[ia], p3[ia], logn, logd)
        ra, wa = r[ia], weights[ia]
        irls = wa * np.minimum(1.0, HUBER_DELTA / np.maximum(np.abs(ra), 1e-300))
        H = np.einsum("bni,bn,bnj->bij", J, irls, J)
        g = np.einsum("bni,bn->bi", J, wa * np.clip(ra, -HUBER_DELTA, HUBER_DELTA))
        damp = lam[ia, None, None] * (H * eye + 1e-12 * np.trace(H, axis1=1, axis2=2)[:, None, None] * eye)
        step = -np.linalg.solve(H + damp, g[..., None])[..., 0]
        trial = np.clip(theta[ia] + step, lo, hi)
        rt, q1, q2, q3 = _parts(trial, logn, logd, logl)
        ft = _huber(rt, wa)
        better = ft <= f[ia]
        ib = ia[better]
        gain = (f[ib] - ft[better]) / np.maximum(f[ib], 1e-300)
        theta[ib], f[ib], r[ib] = trial[better], ft[better], rt[better]
        p1[ib], p2[ib], p3[ib] = q1[better], q2[better], q3[better]
        lam[ib] = np.maximum(lam[ib] / 3, 1e-12)
        lam[ia[~better]] *= 4
        # Done: an accepted step that gained < 1e-13 relative, or no step helps any more.
        active[ib[gain < 1e-13]] = False
        active[ia[~better][lam[ia[~better]] > 1e10]] = False
    # Check stationarity; a row whose gradient is not small is refitted the slow, sure way.
    psi = np.clip(r, -HUBER_DELTA, HUBER_DELTA) / HUBER_DELTA**2
    grad = np.einsum("bni,bn->bi", _jacobian(p1, p2, p3, logn, logd), weights * psi)
    bad = np.flatnonzero(np.abs(grad).max(axis=1) > 1e-3 * np.maximum(f, 1.0))
    for k in bad:
        theta[k] = _polish_weighted(theta[k], logn, logd, logl, weights[k])
    return theta


def _polish_weighted(theta0, logn, logd, logl, w):
    import numpy as np
    keep = w > 0
    reps = w[keep].astype(int)
    return _polish(theta0, np.repeat(logn[keep], reps), np.repeat(logd[keep], reps),
                   np.repeat(logl[keep], reps))[0]


NEGLIGIBLE_TERM = 1e-3  # below this share of every run's loss, a term is not seen in the runs


def degenerate_fit_warnings(theta, n, d, loss) -> list[str]:
    """What the runs leave undetermined: a parameter at a bound of BOUNDS, or a term A/N^α or
    B/D^β too small in every run for the runs to show how the loss depends on N or on D."""
    import numpy as np
    law = law_from(theta)
    out = []
    for term, what, values in (("A/N^alpha", "N", law.A / np.asarray(n) ** law.alpha),
                               ("B/D^beta", "D", law.B / np.asarray(d) ** law.beta)):
        if np.max(values / np.asarray(loss)) < NEGLIGIBLE_TERM:
            out.append(f"the fitted {term} is below {NEGLIGIBLE_TERM:.1%} of every run's loss: "
                       f"the runs show no dependence on {what}, so the law cannot say how the "
                       f"loss falls with {what}; run a wider range of {what}")
    for key, value, (lo, hi) in zip(THETA_KEYS, theta, BOUNDS):
        slack = 1e-6 * (hi - lo)
        side = "lower" if value - lo <= slack else "upper" if hi - value <= slack else None
        if side is None:
            continue
        out.append(f"{key} = {getattr(law, key):.4g} sits at the fit's {side} "
                   "bound: the runs do not determine it, and N*, D* and the loss at the target "
                   "inherit the bound; runs over a wider range of N and D (more budgets, larger "
                   "models) would")
    return out


def law_from(theta, name="fitted", citation="llama3gen fit") -> ScalingLaw:
    a, b, e, alpha, beta = (float(v) for v in theta)
    return ScalingLaw(name, math.exp(e), math.exp(a), math.exp(b), alpha, beta, citation)


# --------------------------------------------------------------------------- approach 2

MAX_LOG_DECADES_OUT = 20  # a parabola's vertex this many decades of N from its runs: no minimum


@dataclass
class BudgetMinimum:
    flops: float
    runs: int
    n_opt: float | None = None
    tokens_opt: float | None = None
    loss_opt: float | None = None
    bracketed: bool | None = None
    skipped: str | None = None


@dataclass
class Approach2:
    budgets: list[BudgetMinimum]
    k_n: float | None = None
    a_n: float | None = None
    k_d: float | None = None
    b_d: float | None = None
    unavailable: str | None = None

    def at(self, flops: float) -> tuple[float, float]:
        return self.k_n * flops**self.a_n, self.k_d * flops**self.b_d


def approach2(runs: list[Run], groups: list[list[int]]) -> Approach2:
    """Per budget with ≥ 3 distinct N: loss = p(log N), p a parabola; its vertex is N_opt(C).
    D_opt = C / M(N_opt), M = C/D the FLOPs per token, linear in log N over the budget's runs
    (exactly 6N when C = 6ND). Then log N_opt and log D_opt are fitted linearly in log C."""
    import numpy as np
    minima = []
    for g in groups:
        n = np.array([runs[i].params for i in g])
        c = float(np.exp(np.mean([math.log(runs[i].flops) for i in g])))
        entry = BudgetMinimum(flops=c, runs=len(g))
        minima.append(entry)
        if len(np.unique(n)) < 3:
            entry.skipped = "fewer than 3 distinct model sizes"
            continue
        x = np.log(n)
        xm = x.mean()
        p2, p1, p0 = np.polyfit(x - xm, [runs[i].loss for i in g], 2)
        if p2 <= 0:
            entry.skipped = "the loss is not convex in log N here (no minimum)"
            continue
        xv = -p1 / (2 * p2)
        if not abs(xv) < MAX_LOG_DECADES_OUT * math.log(10):
            entry.skipped = "the parabola is nearly flat: its minimum is out of all range"
            continue
        m_fit = np.polyfit(x, [math.log(runs[i].flops / runs[i].tokens) for i in g], 1)
        entry.n_opt = float(math.exp(xv + xm))
        entry.tokens_opt = c / float(math.exp(np.polyval(m_fit, xv + xm)))
        entry.loss_opt = float(p0 - p1 * p1 / (4 * p2))
        entry.bracketed = bool(x.min() <= xv + xm <= x.max())
    ok = [m for m in minima if m.n_opt is not None]
    result = Approach2(minima)
    if len(ok) < 2:
        result.unavailable = f"{len(ok)} budget(s) with a minimum; it needs 2"
        return result
    logc = np.log([m.flops for m in ok])
    a, logk = np.polyfit(logc, np.log([m.n_opt for m in ok]), 1)
    b, logk2 = np.polyfit(logc, np.log([m.tokens_opt for m in ok]), 1)
    if not (0 <= a <= 1 and 0 <= b <= 1):  # under C ∝ N·D, a + b = 1: neither can leave [0, 1]
        result.unavailable = (f"the budgets' minima give N_opt ∝ C^{a:.3g} and D_opt ∝ "
                              f"C^{b:.3g}; with C ∝ N·D both lie in [0, 1]: the minima do not "
                              "follow C")
        return result
    result.k_n, result.a_n, result.k_d, result.b_d = (float(math.exp(logk)), float(a),
                                                      float(math.exp(logk2)), float(b))
    return result


# --------------------------------------------------------------------------- the whole fit

@dataclass
class FitResult:
    law: ScalingLaw
    ci: dict[str, tuple[float, float]]
    runs: list[Run]
    excluded: list[Excluded]
    budgets: list[float]
    approach2: Approach2
    bootstrap: int
    seed: int
    target: dict | None = None
    rollout: dict = field(default_factory=dict)
    # What the runs leave in doubt about the law itself: LAW.json carries these, and a plan made
    # from it repeats them. report_warnings concern only this report (approach 2's parabolas,
    # the --target), not the law a plan uses.
    warnings: list[str] = field(default_factory=list)
    report_warnings: list[str] = field(default_factory=list)
    # The bootstrap refits, (resamples × 5) E, A, B, alpha, beta: LAW.json carries them so a plan
    # at any budget gets CIs of N*, D*, L* that keep the parameters' correlations.
    samples: list[list[float]] = field(default_factory=list)

    def farthest(self, count: int = FARTHEST_RUNS) -> list[dict]:
        """The runs farthest from the fitted law (relative error of its loss), farthest first:
        where --exclude-worst or a look at a run's log may be due."""
        law = [float(self.law.loss(r.params, r.tokens)) for r in self.runs]
        err = [pred / r.loss - 1 for pred, r in zip(law, self.runs)]
        order = sorted(range(len(err)), key=lambda i: -abs(err[i]))[:count]
        return [{"run": self.runs[i].where, "loss": self.runs[i].loss, "law": law[i],
                 "rel_error": err[i]} for i in order]

    def citation(self) -> str:
        budgets = ", ".join(f"{c:.2g}" for c in self.budgets)
        return f"fitted by llama3gen fit on {len(self.runs)} runs (budgets {budgets} FLOPs)"

    def law_json(self) -> dict:
        law = self.law
        n = [r.params for r in self.runs]
        d = [r.tokens for r in self.runs]
        return {"format": LAW_FORMAT, "name": "fitted", "E": law.E, "A": law.A, "B": law.B,
                "alpha": law.alpha, "beta": law.beta, "citation": self.citation(),
                "ci": {k: list(v) for k, v in self.ci.items()}, "ci_level": CI_LEVEL,
                "fit_params": [min(n), max(n)], "fit_tokens": [min(d), max(d)],
                "budgets": self.budgets, "runs": len(self.runs),
                "budget_runs": [len(g) for g in group_budgets(self.runs)],
                "bootstrap": {"resamples": self.bootstrap, "seed": self.seed,
                              "samples": self.samples},
                "warnings": self.warnings}

    def to_json(self) -> dict:
        law = self.law
        a2 = self.approach2
        a2_json = {"budgets": [vars(m) for m in a2.budgets], "unavailable": a2.unavailable,
                   "n_opt": None if a2.unavailable else {"k": a2.k_n, "a": a2.a_n},
                   "tokens_opt": None if a2.unavailable else {"k": a2.k_d, "b": a2.b_d}}
        if self.target and not a2.unavailable:
            n2, d2 = a2.at(self.target["flops"])
            a2_json["target"] = {"n_params": n2, "tokens": d2,
                                 "n_params_ratio_3_to_2": self.target["n_params"] / n2,
                                 "tokens_ratio_3_to_2": self.target["tokens"] / d2}
        return {"law": {"E": law.E, "A": law.A, "B": law.B, "alpha": law.alpha,
                        "beta": law.beta},
                "ci": {k: list(v) for k, v in self.ci.items()}, "ci_level": CI_LEVEL,
                "citation": self.citation(),
                "bootstrap": {"resamples": self.bootstrap, "seed": self.seed},
                "target": self.target, "approach2": a2_json, "rollout": self.rollout,
                "budgets": self.budgets,
                "runs": {"used": len(self.runs), "excluded": [e.to_json() for e in self.excluded],
                         "farthest": self.farthest()},
                "warnings": self.warnings + self.report_warnings}



def _interval(samples) -> tuple[float, float]:
    import numpy as np
    lo, hi = np.percentile(samples, [50 * (1 - CI_LEVEL), 50 * (1 + CI_LEVEL)])
    return float(lo), float(hi)


def rollout(runs: list[Run], groups: list[list[int]]) -> dict:
    """Fit without the largest budget; the relative error of the law on that budget's runs."""
    import numpy as np
    held = set(groups[-1])
    train = [r for i, r in enumerate(runs) if i not in held]
    test = [runs[i] for i in groups[-1]]
    if len(groups) < 3 or len(train) < N_LAW_PARAMS:
        return {"unavailable": "needs 3 budgets and 5 runs below the largest budget"}
    arr = lambda rs, k: np.array([getattr(r, k) for r in rs])  # noqa: E731
    law = law_from(fit_law_params(arr(train, "params"), arr(train, "tokens"), arr(train, "loss")))
    pred = law.loss(arr(test, "params"), arr(test, "tokens"))
    err = np.abs(pred - arr(test, "loss")) / arr(test, "loss")
    return {"held_out_flops": float(np.exp(np.mean(np.log(arr(test, "flops"))))),
            "runs": len(test), "mean_rel_error": float(err.mean()),
            "max_rel_error": float(err.max())}


def fit(runs: list[Run], excluded: list[Excluded], *, target_flops: float | None = None,
        bootstrap: int = 1000, seed: int = 0, sources: str = "the runs") -> FitResult:
    """Approach 3 with bootstrap CIs, approach 2, the rollout check. `runs` already selected."""
    import numpy as np
    n = np.array([r.params for r in runs])
    d = np.array([r.tokens for r in runs])
    loss = np.array([r.loss for r in runs])
    groups = group_budgets(runs)
    budgets = [float(np.exp(np.mean([math.log(runs[i].flops) for i in g]))) for g in groups]
    theta = fit_law_params(n, d, loss)
    law = law_from(theta)
    checked = budgets + ([target_flops] if target_flops is not None else [])
    if not _finite_optimum(law, checked):
        raise UserError(
            f"the fitted law (E {law.E:.4g}, A {law.A:.4g}, B {law.B:.4g}, alpha {law.alpha:.3g}, "
            f"beta {law.beta:.3g}) puts the compute-optimal N or D out of all range at the "
            "budgets" + (" or the target" if target_flops is not None else "")
            + ": these runs do not determine it", where=sources, fix=UNDETERMINED_FIX)

    # A resample draws len(runs) runs with replacement: a row of multinomial counts.
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(len(runs), np.full(len(runs), 1.0 / len(runs)), size=bootstrap)
    samples = refit_weighted(theta, np.log(n), np.log(d), np.log(loss), counts.astype(float))
    laws_b = [law_from(t) for t in samples]
    # A resample that leaves out the runs that pin the law down can fit one without an optimum
    kept = [i for i, lb in enumerate(laws_b) if _finite_optimum(lb, checked)]
    if bootstrap and not kept:
        raise UserError("no bootstrap refit of the law has a finite compute-optimal N and D: "
                        "these runs do not determine it", where=sources, fix=UNDETERMINED_FIX)
    samples, laws_b = samples[kept], [laws_b[i] for i in kept]
    ci = {}
    if bootstrap:
        for key in ("E", "A", "B", "alpha", "beta"):
            ci[key] = _interval([getattr(lb, key) for lb in laws_b])

    result = FitResult(law, ci, runs, excluded, budgets, approach2(runs, groups), bootstrap, seed,
                       samples=[[getattr(lb, k) for k in LAW_KEYS] for lb in laws_b])
    if len(kept) < bootstrap:
        result.warnings.append(
            f"{bootstrap - len(kept)} of {bootstrap} bootstrap refits put the optimum out of all "
            f"range; the CIs are over the other {len(kept)}")
    if target_flops is not None:
        opt = law.optimum_6nd(target_flops)
        t = {"flops": target_flops, "n_params": opt.n_params, "tokens": opt.tokens,
             "loss": opt.loss, "decades_beyond_fit": math.log10(target_flops / max(budgets))}
        if bootstrap:
            opts = [lb.optimum_6nd(target_flops) for lb in laws_b]
            t["n_params_ci"] = _interval([o.n_params for o in opts])
            t["tokens_ci"] = _interval([o.tokens for o in opts])
            t["loss_ci"] = _interval([o.loss for o in opts])
        result.target = t
        if round(t["decades_beyond_fit"], 1) > FAR_DECADES:
            result.report_warnings.append(
                f"the target {target_flops:.3g} FLOPs is {t['decades_beyond_fit']:.1f} decades "
                f"beyond the largest fitted budget ({max(budgets):.3g}); the law and its CIs are "
                "an extrapolation there")
    result.warnings += degenerate_fit_warnings(theta, n, d, loss)
    repeated = sorted((r for r in runs if r.epochs > 1), key=lambda r: -r.epochs)
    if repeated:
        result.warnings.append(
            f"{len(repeated)} run(s) read their training data more than once (most: "
            f"{repeated[0].where}, {repeated[0].epochs:.2f} epochs); L(N, D) counts each token "
            "once and repeated tokens are worth less (Muennighoff et al. 2023), so their losses "
            "sit above the law: give the sweep more data or lower its budgets")
    for m in result.approach2.budgets:
        if m.bracketed is False:
            result.report_warnings.append(
                f"budget {m.flops:.3g}: the parabola's minimum lies outside the model sizes run; "
                "its N_opt is an extrapolation")
    result.rollout = rollout(runs, groups)
    return result


UNDETERMINED_FIX = ("check that each budget's losses fall and rise again across its model sizes "
                    "(docs/FIT.md); add shapes per budget, or leave out diverged runs "
                    "(--exclude-worst K)")


def _finite_optimum(law: ScalingLaw, budgets: list[float]) -> bool:
    """Whether the law's compute-optimal N, D and loss are finite and positive at each budget
    (exponents near their bounds put them beyond float range)."""
    import numpy as np
    try:
        with np.errstate(all="ignore"):
            optima = [law.optimum_6nd(c) for c in budgets]
    except (OverflowError, ZeroDivisionError):
        return False
    return all(0 < o.n_params < math.inf and 0 < o.tokens < math.inf and math.isfinite(o.loss)
               for o in optima)


# --------------------------------------------------------------------------- report

def _ci(v) -> str:
    return f"[{v[0]:.4g}, {v[1]:.4g}]" if v else ""


def report(res: FitResult) -> str:
    law = res.law
    lines = [f"llama3gen fit: {len(res.runs)} runs at {len(res.budgets)} budgets "
             f"({', '.join(f'{c:.3g}' for c in res.budgets)} FLOPs)"]
    for e in res.excluded:
        lines.append(f"  excluded {e.run.describe()}: {e.reason}")
    lines += ["", f"Approach 3 (Huber δ={HUBER_DELTA:g} on log loss, L-BFGS-B; "
              f"{CI_LEVEL:.0%} CIs from {res.bootstrap} bootstrap resamples, seed {res.seed})",
              f"  {law.formula()}"]
    for key in ("E", "A", "B", "alpha", "beta"):
        lines.append(f"  {key:<6} {getattr(law, key):>12.5g}  {_ci(res.ci.get(key))}")
    lines.append("  farthest from the law (the law's loss against the run's):")
    lines += [f"    {f['rel_error']:+.2%}  {f['run']} (loss {f['loss']:.4g}, law {f['law']:.4g})"
              for f in res.farthest()]
    a2 = res.approach2
    lines += ["", "Approach 2 (a parabola in log N per budget)"]
    for m in a2.budgets:
        if m.skipped:
            lines.append(f"  C {m.flops:.3g}: {m.runs} runs; skipped: {m.skipped}")
        else:
            mark = "" if m.bracketed else "  (minimum outside the sizes run)"
            lines.append(f"  C {m.flops:.3g}: {m.runs} runs; N_opt {m.n_opt:.4g}, D_opt "
                         f"{m.tokens_opt:.4g}, loss {m.loss_opt:.4f}{mark}")
    if a2.unavailable:
        lines.append(f"  unavailable: {a2.unavailable}")
    else:
        lines.append(f"  N_opt = {a2.k_n:.4g}·C^{a2.a_n:.4f}   D_opt = {a2.k_d:.4g}·C^{a2.b_d:.4f}")
        ab = law.beta / (law.alpha + law.beta)
        lines.append(f"  (Approach 3 implies N_opt ∝ C^{ab:.4f}, D_opt ∝ C^{1 - ab:.4f})")
    t = res.target
    if t:
        lines += ["", f"At the target {t['flops']:.4g} FLOPs (C = 6ND; "
                  f"{t['decades_beyond_fit']:+.1f} decades from the largest budget)",
                  f"  {'':<10} {'approach 3':>12} {'95% CI':>24} {'approach 2':>12}"]
        n2, d2 = a2.at(t["flops"]) if not a2.unavailable else (None, None)
        for label, key, v2 in (("N*", "n_params", n2), ("D*", "tokens", d2),
                               ("loss", "loss", None)):
            lines.append(f"  {label:<10} {t[key]:>12.4g} {_ci(t.get(key + '_ci')):>24} "
                         f"{'' if v2 is None else format(v2, '.4g'):>12}")
        if n2:
            lines.append(f"  disagreement: approach 3 / approach 2 = {t['n_params'] / n2:.3f} "
                         f"in N*, {t['tokens'] / d2:.3f} in D*")
    r = res.rollout
    lines.append("")
    if "unavailable" in r:
        lines.append(f"Rollout check: unavailable ({r['unavailable']})")
    else:
        lines.append(f"Rollout check: fitted without the largest budget ({r['held_out_flops']:.3g}), "
                     f"its {r['runs']} runs predicted with mean relative error "
                     f"{r['mean_rel_error']:.2%}, max {r['max_rel_error']:.2%}")
    for w in res.warnings + res.report_warnings:
        lines.append(f"warning: {w}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- LAW.json

def write_law(path: Path, result: FitResult) -> None:
    """Write the law as JSON, never half-written; an existing file only if `llama3gen fit` wrote
    it."""
    import json

    def ours(text):
        try:
            return json.loads(text).get("format") == LAW_FORMAT
        except (ValueError, AttributeError):
            return False
    write_own_file(path, json.dumps(result.law_json(), indent=2, sort_keys=True) + "\n", ours,
                   "llama3gen fit")


SVG_DESC = "written by llama3gen fit"  # how fit knows an SVG it may replace


def write_svg(path: Path, result: FitResult) -> None:
    write_own_file(path, fit_svg(result), lambda text: f"<desc>{SVG_DESC}</desc>" in text,
                   "llama3gen fit")


def fit_svg(res: FitResult) -> str:
    """`fit --svg`: the runs' losses against N per budget, the fitted law's isoFLOP curve at each
    budget (C = 6ND) and its minimum, and the extrapolated optimum at the target with its CI."""
    import math as m

    from . import figure
    groups = []
    for idx in group_budgets(res.runs):
        runs = [res.runs[i] for i in idx]
        c = m.exp(sum(m.log(r.flops) for r in runs) / len(runs))  # the group's geometric mean
        ns = [r.params for r in runs]
        opt = res.law.optimum_6nd(c)
        groups.append({"label": f"C {c:.3g}: {len(runs)} runs", "dots": [(r.params, r.loss) for r in runs],
                       "curve": figure._isoflop_curve(res.law, c, min(ns) / 1.5, max(ns) * 1.5),
                       "minimum": (opt.n_params, opt.loss)})
    target = None
    if res.target:
        t = res.target
        target = {"label": f"target {t['flops']:.3g}: N* {t['n_params']:.3g} "
                           f"[{t['n_params_ci'][0]:.3g}, {t['n_params_ci'][1]:.3g}], loss "
                           f"{t['loss']:.4g} ({CI_LEVEL:.0%} CI)",
                  "n": t["n_params"], "loss": t["loss"], "n_ci": t.get("n_params_ci"),
                  "loss_ci": t.get("loss_ci")}
    law = res.law
    return figure.sweep_svg(
        f"llama3gen fit: {len(res.runs)} runs, L = {law.E:.4g} + {law.A:.4g}/N^{law.alpha:.3g} + "
        f"{law.B:.4g}/D^{law.beta:.3g}",
        "dots: measured final losses; lines: the fitted law along each budget (C = 6ND); "
        "crosses: its minima", groups, target, desc=SVG_DESC)
