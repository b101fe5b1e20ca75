"""Scaling laws: predicted loss L(N, D) = E + A/N^α + B/D^β, their closed-form optimum, and
DeepSeek's hyperparameter laws. Pure functions; numpy arrays in, numpy arrays out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


def load_law_file(path, label: str | None = None) -> ScalingLaw:
    """The law in a `llama3gen fit` file; ValueError (one line) when it cannot be used. `label`:
    the path as the spec wrote it, for the citation (the same whatever the working directory)."""
    from pathlib import Path

    from .jsonfile import read_json
    path = Path(path)
    doc = read_json(path, "law", "llama3gen fit RUNS.csv -o FILE")
    if not isinstance(doc, dict) or doc.get("format") != LAW_FORMAT:
        raise ValueError(f"{str(path)!r} is not a llama3gen law file (format {LAW_FORMAT}; "
                         "`llama3gen fit RUNS.csv -o FILE` writes one)")
    values = [doc.get(k) for k in ("E", "A", "B", "alpha", "beta")]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
               and v > 0 for v in values):
        raise ValueError(f"law file {str(path)!r}: E, A, B, alpha and beta must be positive "
                         f"numbers (got {values})")
    ranges = [tuple(doc[k]) if isinstance(doc.get(k), list) and len(doc[k]) == 2 else None
              for k in ("fit_params", "fit_tokens")]
    citation = f"{doc.get('citation') or 'fitted by llama3gen fit'}; file {label or path}"
    return ScalingLaw(str(doc.get("name") or "fitted"), *map(float, values), citation, *ranges)


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
