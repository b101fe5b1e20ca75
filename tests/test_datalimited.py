"""Data-limited plans: the data-constrained law of Muennighoff et al. 2023 (issue #16 part 3).

The formulas are pinned against the authors' own published numbers: their repository's README
(github.com/huggingface/datablations, "Parametric Fit") gives their fitted law, the losses of the
two models of the paper's Figure 1 (right) and the allocation its grid search finds. The planner
is pinned against an independent transcription of the authors' scaling_law function.
"""

import math

import numpy as np
import pytest

from compiler import datalimited, laws
from compiler.planner import build_plan
from compiler.report import solve_report
from compiler.spec import parse_spec_text

# The authors' fit, as their README lists it: a, b, e are log A, log B, log E.
AUTHORS_FIT = dict(a=6.255414, b=7.3049974, e=0.6254804, alpha=0.3526596, beta=0.3526596,
                   rd_star=15.387756, rn_star=5.309743)
AUTHORS_LAW = laws.ScalingLaw("muennighoff2023", math.exp(AUTHORS_FIT["e"]),
                              math.exp(AUTHORS_FIT["a"]), math.exp(AUTHORS_FIT["b"]),
                              AUTHORS_FIT["alpha"], AUTHORS_FIT["beta"], "datablations README")


def authors_scaling_law(law, n, d, u, rd_star=AUTHORS_FIT["rd_star"],
                        rn_star=AUTHORS_FIT["rn_star"]):
    """The README's scaling_law(N, D, U), transcribed in plain Python (U = min(U, D) as its
    callers pass it), for any law: an oracle independent of compiler/datalimited.py."""
    u = min(u, d)
    g = ((law.alpha * law.A) / (law.beta * law.B)) ** (1 / (law.alpha + law.beta))
    rd = max(d / u - 1, 0)
    un = min(n, (u * g) ** (law.beta / law.alpha) * g)
    rn = max(n / un - 1, 0)
    return (law.E + law.A / (un + un * rn_star * (1 - math.exp(-rn / rn_star))) ** law.alpha
            + law.B / (u + u * rd_star * (1 - math.exp(-rd / rd_star))) ** law.beta)


# float64 evaluations of the same formula in another order: some twenty roundings of 2**-53 and an
# exp and two powers of a few ulps each; 1e-13 relative covers hundreds of ulps, while a wrong
# constant or definition (R* rounded to 15.4, U_N without the min) moves the loss by 1e-5 or more.
SAME_FORMULA = 1e-13


def test_the_constants_are_the_authors_fit():
    assert datalimited.R_D_STAR == AUTHORS_FIT["rd_star"] and round(datalimited.R_D_STAR, 1) == 15.4
    assert datalimited.R_N_STAR == AUTHORS_FIT["rn_star"] and round(datalimited.R_N_STAR, 1) == 5.3
    assert "huggingface/datablations" in datalimited.CITATION


def test_losses_of_the_papers_figure_1_models_as_the_authors_print_them():
    # README: print(scaling_law(6.34e9, 242e9, 25e9)) # 2.2256440889984477 # <- This one is better
    #         print(scaling_law(8.67e9, 178e9, 25e9)) # 2.2269634075087867
    better = datalimited.loss(AUTHORS_LAW, 6.34e9, 242e9, 25e9)
    chinchilla = datalimited.loss(AUTHORS_LAW, 8.67e9, 178e9, 25e9)
    assert better == pytest.approx(2.2256440889984477, rel=SAME_FORMULA)
    assert chinchilla == pytest.approx(2.2269634075087867, rel=SAME_FORMULA)
    assert better < chinchilla  # fewer parameters, more epochs: the paper's point
    # while the law alone, every token counted as fresh, prefers the larger model
    assert AUTHORS_LAW.loss(8.67e9, 178e9) < AUTHORS_LAW.loss(6.34e9, 242e9)


def test_grid_search_finds_the_authors_optimal_allocation():
    """README's optimal_allocation(8.67e9, 178e9, 25e9): D·i and N/i (and the reverse) for 500
    values of i in [1.0001, 3], compute 6ND fixed. It prints "227B tokens, 9.1 epochs, 6.8B
    parameters"; here the same grid, vectorised, through compiler/datalimited.py."""
    i = np.linspace(1.0001, 3, 500)
    n = np.concatenate([8.67e9 / i, 8.67e9 * i])
    d = np.concatenate([178e9 * i, 178e9 / i])
    loss = datalimited.loss(AUTHORS_LAW, n, d, np.minimum(25e9, d))
    best = int(np.argmin(loss))
    assert f"{d[best] / 1e9:.0f}B tokens, {d[best] / 25e9:.1f} epochs, {n[best] / 1e9:.1f}B" \
        == "227B tokens, 9.1 epochs, 6.8B"


def test_without_repetition_or_excess_parameters_it_is_the_law_exactly():
    law = laws.CATALOG["besiroglu2024"]
    opt = law.optimum_6nd(1e21)
    assert law.optimal_params(opt.tokens) == pytest.approx(opt.n_params, rel=1e-12)
    n = np.array([0.5, 0.9, 1.0]) * law.optimal_params(opt.tokens)  # not beyond the optimum
    d = np.full(3, opt.tokens)
    for unique in (opt.tokens, 10 * opt.tokens):  # every token once
        assert np.array_equal(datalimited.effective_tokens(d, unique), d)
        assert np.array_equal(datalimited.effective_params(law, n, d, unique), n)
        assert np.array_equal(datalimited.loss(law, n, d, unique), law.loss(n, d))


def test_repeated_tokens_are_worth_less_and_their_returns_vanish():
    """What the formula makes of the paper's qualitative findings (abstract: "up to 4 epochs of
    repeated data yields negligible changes to loss compared to having unique data. However,
    with more repetition, the value of adding compute eventually decays to zero"), computed by
    hand from D' = U + U·R*·(1 − e^(−R/R*)): the last token is worth e^(−R_D/R_D*) of a fresh one."""
    u, r = 1e9, datalimited.R_D_STAR
    epochs = np.array([1, 2, 4, 16, 40, 1000], dtype=np.float64)
    worth = datalimited.effective_tokens(epochs * u, u) / (epochs * u)
    hand = (1 + r * (1 - np.exp(-(epochs - 1) / r))) / epochs
    assert worth == pytest.approx(hand, rel=SAME_FORMULA)
    assert worth[2] > 0.93  # 4 epochs: 93% of their tokens' worth (3.73 of 4)
    assert worth[4] < 0.38  # 40 epochs: 38% (15.2 of 40), the 40th worth e^(−39/15.4) = 8%
    # the data is never worth more than (1 + R_D*) fresh passes over it, 16.4 epochs, and 100
    # epochs come within 0.15% of that: 1 − R_D*·e^(−99/R_D*)/(1 + R_D*) = 0.9985
    assert datalimited.effective_tokens(1000 * u, u) <= (1 + r) * u
    assert datalimited.effective_tokens(100 * u, u) > 0.998 * (1 + r) * u
    assert np.all(np.diff(datalimited.effective_tokens(epochs * u, u)) > 0)


# -----------------------------------------------------------------------------
# The plan

BASE = "name: dl\nbudget: {flops: 1e21}\n"


@pytest.fixture(scope="module")
def unconstrained():
    return build_plan(parse_spec_text(BASE))


@pytest.fixture(scope="module")
def tenth(unconstrained):
    """unique_tokens a tenth of the unconstrained optimal pick's D."""
    unique = int(unconstrained.variants[0].choice.tokens / 10)
    return build_plan(parse_spec_text(BASE + f"data: {{unique_tokens: {unique}}}\n"))


def test_a_tenth_of_the_data_moves_the_pick_to_a_smaller_model_trained_longer(unconstrained,
                                                                             tenth):
    free, v = unconstrained.variants[0], tenth.variants[0]
    dl = v.data_limited
    assert dl is not None and v.epochs is not None
    # the law's own pick, as the plan without data made it, read ten times
    assert (dl.unconstrained.n_layers, dl.unconstrained.d_model) == (
        free.choice.shape.n_layers, free.choice.shape.d_model)
    assert dl.unconstrained.epochs == pytest.approx(free.training.tokens_trained / dl.unique_tokens)
    assert 9.9 < dl.unconstrained.epochs < 10.1  # D rounded to whole steps, U to a whole token
    # the data-constrained pick differs: fewer parameters, more tokens and epochs (Figure 1)
    assert (v.choice.shape.n_layers, v.choice.shape.d_model) != (
        free.choice.shape.n_layers, free.choice.shape.d_model)
    assert v.choice.n_params < free.choice.n_params and v.choice.tokens > free.choice.tokens
    assert v.epochs == pytest.approx(v.training.tokens_trained / dl.unique_tokens)
    assert v.epochs > dl.unconstrained.epochs
    assert dl.pick.loss < dl.unconstrained.loss  # better under the law it was ranked by
    assert dl.pick.loss_unique > dl.unconstrained.loss_unique  # worse if every token were fresh


def test_the_plans_losses_are_the_authors_formula_on_the_plans_law(tenth):
    law = laws.CATALOG[laws.DEFAULT_LAW]
    for v in tenth.variants:
        dl, u = v.data_limited, v.data_limited.unique_tokens
        for pick in (dl.pick, dl.unconstrained):
            assert pick.loss == pytest.approx(
                authors_scaling_law(law, pick.n_params, pick.tokens, u), rel=SAME_FORMULA)
            assert pick.loss_unique == pytest.approx(law.loss(pick.n_params, pick.tokens),
                                                     rel=SAME_FORMULA)
        assert v.choice.loss == dl.pick.loss and v.choice.tokens == dl.pick.tokens
        assert all(r.loss >= v.top[0].loss for r in v.top)
        assert v.top[0].loss == pytest.approx(
            authors_scaling_law(law, v.top[0].n_params, v.top[0].tokens, u), rel=SAME_FORMULA)


def test_the_report_shows_both_picks_and_cites_the_law(tenth):
    text = solve_report(tenth)
    block = text.split("DATA-LIMITED (")[1].split("TOP CANDIDATES")[0]
    assert "data-constrained" in block and "law alone" in block
    assert "R_D* = 15.387756, R_N* = 5.309743" in block and "Muennighoff et al. 2023" in block
    assert "lower loss than the law's own pick" in block
    assert "data-constrained, see DATA-LIMITED" in text
    assert any("LOUD WARNING" in w and "data-constrained law" in w for w in tenth.warnings)


def test_the_generated_docs_show_the_law_and_the_law_s_own_pick(tenth):
    from compiler.render import render_files
    files = render_files(tenth, "name: dl\n")
    doc = files["docs/comparison.md"].decode()
    own = tenth.variants[0].data_limited.unconstrained
    assert f"| the law's own pick, with repetition discounted | {own.n_layers}L × {own.d_model}" in doc
    assert "ranked by the\ndata-constrained law" in doc and "Muennighoff et al. 2023" in doc
    assert "with repetition discounted (Muennighoff et al. 2023)" in files["docs/isoflop.svg"].decode()
    assert '"data_limited"' in files["llama3gen.lock.json"].decode()


def test_enough_data_plans_as_without_data(unconstrained):
    """U at least every pick's D: the picks, tables and frontier of the plan without data, and no
    data_limited in the lock (plans without it serialise as before)."""
    most = max(v.choice.tokens for v in unconstrained.variants)
    plenty = build_plan(parse_spec_text(BASE + f"data: {{unique_tokens: {math.ceil(most)}}}\n"))
    for v, w in zip(unconstrained.variants, plenty.variants):
        assert w.data_limited is None
        assert v.model_copy(update={"epochs": w.epochs}) == w
    assert plenty.frontier == unconstrained.frontier
    assert "data_limited" not in plenty.model_dump(mode="json")["variants"][0]
    assert "data_limited" in build_plan(parse_spec_text(
        BASE + f"data: {{unique_tokens: {int(most / 10)}}}\n")).model_dump(mode="json")["variants"][0]


def test_a_tokens_per_param_rule_is_not_re_ranked():
    spec = BASE + "search: {scaling_law: {tokens_per_param: 20}}\ndata: {unique_tokens: 1000000}\n"
    plan = build_plan(parse_spec_text(spec))
    assert all(v.data_limited is None and v.epochs > 1000 for v in plan.variants)


def test_a_mixture_repeats_each_source_on_its_own():
    """data.sources: each source's share of D is discounted against its own unique tokens and
    the worth summed. Sources in proportion to their sizes repeat alike: the same D' as one
    source of their total; a mixture that leans on its smaller source is worth less."""
    from compiler import datalimited
    d = 4e11
    alike = datalimited.effective_tokens(d, [(0.75, 3e10), (0.25, 1e10)])
    assert alike == pytest.approx(datalimited.effective_tokens(d, 4e10), rel=1e-12)
    leaning = datalimited.effective_tokens(d, [(0.25, 3e10), (0.75, 1e10)])
    assert leaning < alike
    assert datalimited.unique_tokens_read(d, [(0.75, 3e10), (0.25, 1e10)]) == 4e10


def test_a_mixture_spec_gets_a_data_constrained_pick():
    from compiler.planner import build_plan
    from compiler.spec import parse_spec_text
    spec = parse_spec_text("name: mix\nbudget: {flops: 1.36e21}\ndata:\n  sources:\n"
                           "    - {name: web, unique_tokens: 5000000000, weight: 0.7}\n"
                           "    - {name: code, unique_tokens: 3000000000, weight: 0.3}\n")
    v = build_plan(spec).variants[0]
    assert v.data_limited is not None and v.data_limited.unique_tokens == 8_000_000_000
    pick = v.data_limited.pick
    assert pick.epochs == pytest.approx(max(v.source_epochs.values()), rel=1e-9)
    assert (pick.n_params, pick.tokens) != (v.data_limited.unconstrained.n_params,
                                            v.data_limited.unconstrained.tokens)
