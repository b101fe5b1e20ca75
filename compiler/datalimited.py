"""Data-constrained scaling: what repeated tokens and excess parameters are worth.

Muennighoff et al. 2023, "Scaling Data-Constrained Language Models" (NeurIPS 2023), Sec. 3: a run
of D tokens over U unique ones repeats them R_D = D/U − 1 times, and repeated tokens are worth
less than fresh ones, decaying exponentially:

    D' = U_D + U_D·R_D*·(1 − e^(−R_D/R_D*)),   U_D = min(U, D)

Parameters beyond what is compute-optimal for the unique data decay likewise:

    N' = U_N + U_N·R_N*·(1 − e^(−R_N/R_N*)),   U_N = min(N, N_opt(U_D)),   R_N = N/U_N − 1

with N_opt(D) the law's compute-optimal parameters for D tokens. The loss is the law's at (N', D').
With no repetition and no excess parameters D' = D and N' = N exactly. D' never exceeds
U_D·(1 + R_D*): past a few times R_D* repetitions more epochs buy (almost) nothing.

The definitions (U_D = min(U, D) included) are those of the authors' own code, and R_D* and R_N*
their fit with the digits they publish (15.4 and 5.3 rounded), both in their repository
(github.com/huggingface/datablations, README, "Parametric Fit"), which also gives the worked
numbers tests/test_datalimited.py checks. They were fitted on the
authors' own runs together with their own E, A, B, α, β; applying them to another law (the plan's)
assumes the decay of repeated data does not depend on the fit of the rest, which the paper does
not test. Pure functions; numpy arrays in, numpy arrays out.
"""

from __future__ import annotations

import numpy as np

from .laws import ScalingLaw

R_D_STAR = 15.387756  # repetitions of data at which they are worth 1 − 1/e of fresh tokens
R_N_STAR = 5.309743  # excess parameters decay faster than repeated data (R_N* < R_D*)
CITATION = ("Muennighoff et al. 2023, Scaling Data-Constrained Language Models (NeurIPS), Sec. 3; "
            f"R_D* = {R_D_STAR}, R_N* = {R_N_STAR} as fitted by the authors "
            "(github.com/huggingface/datablations, README, Parametric Fit)")
FORMULA = ("L(N', D') with D' = U + U·R_D*·(1 − e^(−R_D/R_D*)), R_D = D/U − 1, and "
           "N' = U_N + U_N·R_N*·(1 − e^(−R_N/R_N*)), U_N = min(N, N_opt(U)), R_N = N/U_N − 1; "
           "a mixture sums D' over its sources, each source's share of D against its own U")


def _decayed(base, repetitions, r_star):
    """base + base·R*·(1 − e^(−R/R*)): expm1 keeps it exact (= base) at R = 0."""
    return base - base * r_star * np.expm1(-repetitions / r_star)


def _portions(unique_tokens):
    """[(share of the tokens, unique tokens)]: a number is one source holding all of them; a
    mixture (spec data.sources) is a list of pairs, each source repeated on its own."""
    if isinstance(unique_tokens, (list, tuple)):
        return unique_tokens
    return [(1.0, unique_tokens)]


def effective_tokens(tokens, unique_tokens, r_d_star: float = R_D_STAR):
    """D': what D tokens drawn from `unique_tokens` are worth as fresh data (a mixture: the sum
    over its sources of what each one's share of D is worth)."""
    d = np.asarray(tokens, dtype=np.float64)
    worth = 0.0
    for share, unique in _portions(unique_tokens):
        d_s = share * d
        u_d = np.minimum(np.asarray(unique, dtype=np.float64), d_s)
        worth = worth + _decayed(u_d, d_s / u_d - 1.0, r_d_star)
    return worth


def unique_tokens_read(tokens, unique_tokens):
    """U_D: the distinct tokens D tokens read (per source at most its unique tokens)."""
    d = np.asarray(tokens, dtype=np.float64)
    return sum(np.minimum(np.asarray(unique, dtype=np.float64), share * d)
               for share, unique in _portions(unique_tokens))


def effective_params(law: ScalingLaw, n_params, tokens, unique_tokens,
                     r_n_star: float = R_N_STAR):
    """N': what N parameters are worth when the unique data would make fewer compute-optimal."""
    n = np.asarray(n_params, dtype=np.float64)
    u_n = np.minimum(n, law.optimal_params(unique_tokens_read(tokens, unique_tokens)))
    return _decayed(u_n, n / u_n - 1.0, r_n_star)


def loss(law: ScalingLaw, n_params, tokens, unique_tokens, r_d_star: float = R_D_STAR,
         r_n_star: float = R_N_STAR):
    """The law's loss at the effective parameters and tokens."""
    return law.loss(effective_params(law, n_params, tokens, unique_tokens, r_n_star),
                    effective_tokens(tokens, unique_tokens, r_d_star))
