"""Scaling laws: predicted loss L(N, D) = E + A/N^α + B/D^β, their closed-form optimum, and
DeepSeek's hyperparameter laws. Pure functions; numpy arrays in, numpy arrays out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class ScalingLaw:
    """A parametric loss fit L(N, D) = E + A/N^α + B/D^β (N parameters, D tokens)."""

    name: str
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    citation: str
    # The (N, D) ranges the fit was made on, when published; outside them L is an extrapolation.
    fit_params: tuple[float, float] | None = None
    fit_tokens: tuple[float, float] | None = None

    def loss(self, n_params, tokens):
        n = np.asarray(n_params, dtype=np.float64)
        d = np.asarray(tokens, dtype=np.float64)
        out = self.E + self.A / n**self.alpha + self.B / d**self.beta
        return out if out.ndim else float(out)

    def formula(self) -> str:
        return (f"L(N, D) = {self.E:g} + {self.A:g}/N^{self.alpha:g} + {self.B:g}/D^{self.beta:g}")

    def optimal_params(self, tokens):
        """The N whose compute-optimal D (under C = 6·N·D) is `tokens`: inverting optimum_6nd,
        N = G·(G·D)^(β/α)."""
        a, b = self.alpha, self.beta
        g = (a * self.A / (b * self.B)) ** (1.0 / (a + b))
        return g * (np.asarray(tokens, dtype=np.float64) * g) ** (b / a)

    def optimum_6nd(self, flops: float) -> "Optimum":
        """The exact minimiser of L subject to C = 6·N·D (Hoffmann et al. 2022, Eq. 4):
        N* = G·(C/6)^(β/(α+β)), D* = (C/6)/N*, G = (αA/(βB))^(1/(α+β))."""
        a, b = self.alpha, self.beta
        g = (a * self.A / (b * self.B)) ** (1.0 / (a + b))
        n_opt = g * (flops / 6.0) ** (b / (a + b))
        d_opt = flops / (6.0 * n_opt)
        return Optimum(n_params=n_opt, tokens=d_opt, loss=self.loss(n_opt, d_opt))


@dataclass(frozen=True)
class Optimum:
    n_params: float
    tokens: float
    loss: float

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.n_params


# Hoffmann et al. 2022 (Sec. 3): over 400 models from 70M to over 16B parameters, trained on 5B
# to 500B tokens. Besiroglu et al. 2024 refit the same runs, so the same ranges apply.
CHINCHILLA_PARAMS = (7e7, 1.6e10)
CHINCHILLA_TOKENS = (5e9, 5e11)

CATALOG: dict[str, ScalingLaw] = {
    law.name: law
    for law in (
        ScalingLaw("hoffmann2022", 1.69, 406.4, 410.7, 0.34, 0.28,
                   "Hoffmann et al. 2022, Training Compute-Optimal LLMs (Chinchilla), Approach 3, "
                   "rounded as published", CHINCHILLA_PARAMS, CHINCHILLA_TOKENS),
        ScalingLaw("hoffmann2022-unrounded", 1.6934, 406.40, 410.72, 0.33917, 0.28491,
                   "Hoffmann et al. 2022, Approach 3, unrounded values from the paper's fit as "
                   "reported by Besiroglu et al. 2024", CHINCHILLA_PARAMS, CHINCHILLA_TOKENS),
        ScalingLaw("besiroglu2024", 1.8172, 482.01, 2085.43, 0.3478, 0.3658,
                   "Besiroglu et al. 2024, Chinchilla Scaling: A replication attempt (Epoch AI)",
                   CHINCHILLA_PARAMS, CHINCHILLA_TOKENS),
    )
}

DEFAULT_LAW = "besiroglu2024"

# A law fitted by `llama3gen fit -o LAW.json` (compiler/fit.py), named in a spec by
# search.scaling_law: {file: LAW.json}.
LAW_FORMAT = "llama3gen-law/1"


LAW_KEYS = ("E", "A", "B", "alpha", "beta")
# The exponents `llama3gen fit` searches (fit.BOUNDS); a law file's outside them was edited.
EXPONENT_RANGE = (1e-3, 5.0)
# A law file's closed-form optimum must stay a float64 for every budget a spec allows (up to
# 1e32 FLOPs): N* = G·(C/6)^(β/(α+β)) ≤ G·1e32, so |ln G| + ln 1e32 below ln(max float) ≈ 709.
MAX_LOG_G = 700.0 - math.log(1e32)


@dataclass(frozen=True)
class LawFile:
    """A `llama3gen fit -o` file: the law, the runs it was fitted on and its bootstrap refits.

    `samples` (resamples × 5: E, A, B, alpha, beta) are the refits themselves, so that CIs of
    anything derived from the law (N*, D*, L* at any budget) keep the parameters' correlations;
    None in a file written before fit kept them."""

    law: ScalingLaw
    label: str
    runs: int | None
    budgets: tuple[float, ...]
    budget_runs: tuple[int, ...] | None
    ci_level: float
    ci: dict  # "E", ... → (low, high), as fit reported them
    resamples: int | None
    seed: int | None
    samples: np.ndarray | None = field(default=None, compare=False)  # == on arrays is no bool
    warnings: tuple[str, ...] = ()  # what fit said the runs leave in doubt (a plan repeats them)

    def sample_laws(self) -> list[ScalingLaw]:
        return [ScalingLaw(f"{self.law.name}-resample-{i}", *map(float, row), self.law.citation,
                           self.law.fit_params, self.law.fit_tokens)
                for i, row in enumerate(self.samples)]

    def percentiles(self) -> tuple[float, float]:
        """The CI's ends as percentiles, e.g. (2.5, 97.5)."""
        return round(50 * (1 - self.ci_level), 9), round(50 * (1 + self.ci_level), 9)

    def optimum_ci(self, flops: float) -> dict[str, tuple[float, float]]:
        """Percentile-bootstrap CIs of N*, D*, L* at `flops` (C = 6ND): the closed-form optimum of
        every resample's law, the percentiles of those (what `llama3gen fit --target` reports)."""
        opts = [law.optimum_6nd(flops) for law in self.sample_laws()]
        return {key: tuple(float(v) for v in np.percentile([getattr(o, key) for o in opts],
                                                           self.percentiles()))
                for key in ("n_params", "tokens", "loss")}

    def ends(self, flops: float) -> tuple[ScalingLaw, ScalingLaw]:
        """The resamples whose N*(flops) are the CI's low and high ends (nearest rank). Whole
        resampled laws rather than laws made of each parameter's own percentile: A and alpha
        (B and beta) are strongly correlated, and a law of per-parameter ends is no fit any
        resample produced. Under C = 6ND, D* = C/(6N*): the same laws are D*'s high and low ends."""
        laws = self.sample_laws()
        n_opt = np.array([law.optimum_6nd(flops).n_params for law in laws])
        order = np.argsort(n_opt, kind="stable")
        ranks = [round(p / 100 * (len(laws) - 1)) for p in self.percentiles()]
        return laws[order[ranks[0]]], laws[order[ranks[1]]]


def _key_line(text: str, key: str) -> int | None:
    """The line (1-based) of a top-level key of the JSON object `text`, for error messages."""
    from json.decoder import scanstring
    depth, i = 0, 0
    while i < len(text):
        ch = text[i]
        if ch == '"':
            value, end = scanstring(text, i + 1)
            if depth == 1 and value == key and text[end:].lstrip().startswith(":"):
                return text.count("\n", 0, i) + 1
            i = end
            continue
        depth += (ch in "{[") - (ch in "}]")
        i += 1
    return None


def _unusable(E, A, B, alpha, beta) -> tuple[str, str] | None:
    """(the key to blame, why) when a law's closed-form optimum cannot be computed in float64."""
    lo, hi = EXPONENT_RANGE
    for key, value in (("alpha", alpha), ("beta", beta)):
        if not lo <= value <= hi:
            return key, (f"{key} {value:g} lies outside [{lo:g}, {hi:g}], the range llama3gen fit "
                         "searches")
    log_g = (math.log(alpha * A) - math.log(beta * B)) / (alpha + beta)
    if abs(log_g) > MAX_LOG_G:
        return "A", ("its compute-optimal N*, (αA/(βB))^(1/(α+β))·(C/6)^(β/(α+β)), overflows "
                     f"float64 (ln (αA/(βB))^(1/(α+β)) = {log_g:.4g})")
    return None


def _positive(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def read_law_file(path, label: str | None = None) -> LawFile:
    """A `llama3gen fit` file; ValueError (one line, naming file:line) when it cannot be used.
    `label`: the path as the spec wrote it, for the citation (the same whatever the cwd)."""
    from pathlib import Path

    from .jsonfile import read_json
    path = Path(path)
    doc = read_json(path, "law", "llama3gen fit RUNS.csv -o FILE")
    text = path.read_text(encoding="utf-8")
    if not isinstance(doc, dict) or doc.get("format") != LAW_FORMAT:
        line = _key_line(text, "format") if isinstance(doc, dict) else None
        raise ValueError(f"{path}{f':{line}' if line else ''} is not a llama3gen law file (format "
                         f"{LAW_FORMAT}; `llama3gen fit RUNS.csv -o FILE` writes one)")

    def bad(key: str, what: str) -> ValueError:
        line = _key_line(text, key)
        return ValueError(f"law file {path}{f':{line}' if line else ''}: {what}")

    citation = f"{doc.get('citation') or 'fitted by llama3gen fit'}; file {label or path}"
    return _law_file(doc, bad, _fitted_law(doc, bad, citation), str(label or path))


def _fitted_law(doc: dict, bad, citation: str) -> ScalingLaw:
    """The law and the (N, D) ranges it was fitted on."""
    import json
    values = [doc.get(k) for k in LAW_KEYS]
    for key, value in zip(LAW_KEYS, values):
        if not _positive(value):
            raise bad(key, f"E, A, B, alpha and beta must be positive numbers ({key} is "
                           f"{json.dumps(value)})")
    ranges = []
    for key in ("fit_params", "fit_tokens"):
        value = doc.get(key)
        if value is not None and not (isinstance(value, list) and len(value) == 2
                                      and all(map(_positive, value)) and value[0] <= value[1]):
            raise bad(key, f"{key} must be [low, high], two positive numbers")
        ranges.append(tuple(map(float, value)) if value else None)
    problem = _unusable(*map(float, values))
    if problem:
        raise bad(*problem)
    return ScalingLaw(str(doc.get("name") or "fitted"), *map(float, values), citation, *ranges)


def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _law_file(doc: dict, bad, law: ScalingLaw, label: str) -> LawFile:
    """What else fit wrote: the runs, the CIs, the bootstrap refits (each optional: older files)."""
    runs, budgets, budget_runs = doc.get("runs"), doc.get("budgets", []), doc.get("budget_runs")
    if runs is not None and not _count(runs):
        raise bad("runs", "runs must be the number of runs fitted (a positive integer)")
    if not (isinstance(budgets, list) and all(map(_positive, budgets))):
        raise bad("budgets", "budgets must be a list of positive FLOP counts")
    if budget_runs is not None and not (isinstance(budget_runs, list) and all(map(_count, budget_runs))
                                        and len(budget_runs) == len(budgets)):
        raise bad("budget_runs", "budget_runs must give a positive run count per budget")
    level = doc.get("ci_level", 0.95)
    if not (_positive(level) and level < 1):
        raise bad("ci_level", "ci_level must lie between 0 and 1")
    ci = doc.get("ci") or {}
    if not (isinstance(ci, dict) and all(k in LAW_KEYS and isinstance(v, list) and len(v) == 2
                                         and all(map(_positive, v)) for k, v in ci.items())):
        raise bad("ci", "ci must map E, A, B, alpha, beta to [low, high]")
    boot = doc.get("bootstrap") or {}
    samples = (boot.get("samples") or None) if isinstance(boot, dict) else None  # []: no bootstrap
    if not isinstance(boot, dict) or (samples is not None and not (
            isinstance(samples, list) and all(isinstance(s, list) and len(s) == 5
                                              and all(map(_positive, s)) for s in samples))):
        raise bad("bootstrap", "bootstrap.samples must be a list of resampled laws "
                               "[E, A, B, alpha, beta], each five positive numbers")
    for k, row in enumerate(samples or ()):
        problem = _unusable(*map(float, row))
        if problem:
            raise bad("bootstrap", f"bootstrap.samples[{k}]: {problem[1]}")
    resamples, seed = boot.get("resamples"), boot.get("seed")
    warnings = doc.get("warnings", [])
    if not (isinstance(warnings, list) and all(isinstance(w, str) for w in warnings)):
        raise bad("warnings", "warnings must be a list of strings (what llama3gen fit warned)")
    return LawFile(
        law=law, label=label, runs=runs, budgets=tuple(map(float, budgets)),
        budget_runs=tuple(budget_runs) if budget_runs else None, ci_level=float(level),
        ci={k: tuple(map(float, v)) for k, v in ci.items()},
        resamples=resamples if _count(resamples) else None,
        seed=seed if isinstance(seed, int) and not isinstance(seed, bool) else None,
        samples=np.array(samples, dtype=np.float64) if samples else None,
        warnings=tuple(warnings))


def load_law_file(path, label: str | None = None) -> ScalingLaw:
    """The law in a `llama3gen fit` file (read_law_file)."""
    return read_law_file(path, label).law


@dataclass(frozen=True)
class TokensPerParamRule:
    """Not a loss fit but a rule: train on a fixed number of tokens per parameter.

    Candidates are ranked by how far their D/N lies from the rule, |ln(D/(r·N))|; the loss printed
    beside them comes from `loss_law`, named so it is never mistaken for the rule's own.
    """

    tokens_per_param: float
    loss_law: ScalingLaw

    @property
    def name(self) -> str:
        return f"tokens-per-param-{self.tokens_per_param:g}"

    def objective(self, n_params, tokens):
        ratio = np.asarray(tokens, dtype=np.float64) / np.asarray(n_params, dtype=np.float64)
        return np.abs(np.log(ratio / self.tokens_per_param))

    def optimum_6nd(self, flops: float) -> Optimum:
        n_opt = math.sqrt(flops / (6.0 * self.tokens_per_param))
        d_opt = flops / (6.0 * n_opt)
        return Optimum(n_params=n_opt, tokens=d_opt, loss=self.loss_law.loss(n_opt, d_opt))


# DeepSeek LLM (DeepSeek-AI 2024, Eq. 1): fitted on C = M·D, M the non-embedding training FLOPs
# per token (attention included), B in tokens.
DEEPSEEK_CITATION = "DeepSeek-AI 2024, DeepSeek LLM, Eq. 1 (C = M·D, M non-embedding FLOPs/token)"


def deepseek_batch_tokens(flops: float) -> float:
    """B_opt = 0.2920 · C^0.3271 tokens."""
    return 0.2920 * flops**0.3271


def deepseek_learning_rate(flops: float) -> float:
    """η_opt = 0.3118 · C^-0.1250."""
    return 0.3118 * flops**-0.1250
