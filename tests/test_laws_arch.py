"""The math, pinned against published figures and independent computations.

Tolerances: pytest.approx without rel= uses its default, 1e-6 relative. Every such comparison
here is float64 arithmetic (numpy and Python, no torch kernels) of the same quantity computed two
ways, which agree to ~1e-15: 1e-6 is far above that and far below any real discrepancy (a wrong
term moves these numbers by percents). Bounds that are not about rounding say why beside them.
"""

import math

import numpy as np
import pytest

from llama3gen import arch, laws


def test_llama3_8b_parameter_count_is_metas():
    f = arch.ffn_hidden_llama3(4096, 1.3, 1024)
    assert f == 14336  # Meta's params.json for Llama-3-8B: intermediate size 14336
    n = arch.param_count(32, 4096, 32, 8, 128, f, 128256, tie_embeddings=False)
    assert n == 8_030_261_248  # the published count of Meta-Llama-3-8B


def test_llama32_1b_parameter_count_is_metas():
    # Llama-3.2-1B: 16 layers, d 2048, 32/8 heads of 64, FFN 8192, tied embeddings: 1,235,814,400.
    n = arch.param_count(16, 2048, 32, 8, 64, 8192, 128256, tie_embeddings=True)
    assert n == 1_235_814_400


def test_reference_shape_and_its_loss():
    # The reference's 18L × 2048 (16 heads, 8 KV, FFN 3.5×d = 7168): N = 1.545B and, under the
    # rounded Chinchilla fit at D = 101.909B, loss 2.3351.
    f = arch.ffn_hidden_ratio(2048, 3.5, 256)
    assert f == 7168
    n = arch.param_count(18, 2048, 16, 8, 128, f, 128256)
    assert round(n / 1e9, 3) == 1.545
    loss = laws.CATALOG["hoffmann2022"].loss(n, 101.909e9)
    assert loss == pytest.approx(2.3351, abs=5e-5)  # the published figure is rounded to 4 places


def test_vectorised_equals_scalar():
    L = np.array([2, 18, 32]); d = np.array([256, 2048, 4096]); h = d // 128
    f = arch.ffn_hidden_llama3(d, 1.3, 256)
    n = arch.param_count(L, d, h, 2, 128, f, 1000)
    for i in range(3):
        assert n[i] == arch.param_count(int(L[i]), int(d[i]), int(h[i]), 2, 128, int(f[i]), 1000)
    fl = arch.flops_per_token_exact(L, d, h, 2, 128, f, 1000, 512)
    assert fl[1] == arch.flops_per_token_exact(18, 2048, 16, 2, 128, int(f[1]), 1000, 512)


def test_exact_flops_by_hand():
    # One layer, d 8, 2 heads of 4, 1 KV head, FFN 16, vocab 10, T 6. Count matmuls by hand:
    # q 8·8, k 8·4, v 8·4, o 8·8, ffn 3·8·16 → 576 weights; lm_head 80; attention 2·(2·T·h·dh).
    per_token_forward = 2 * (576 + 80) + 2 * 2 * 6 * 2 * 4
    assert arch.flops_per_token_exact(1, 8, 2, 1, 4, 16, 10, 6) == 3 * per_token_forward


def _brute_force_optimum(law, flops):
    # Independent of the closed form: minimise L(N, C/(6N)) over log N by golden-section search.
    f = lambda logn: law.loss(math.exp(logn), flops / (6 * math.exp(logn)))
    a, b = math.log(1e3), math.log(1e15)
    g = (math.sqrt(5) - 1) / 2
    for _ in range(200):
        c, d = b - g * (b - a), a + g * (b - a)
        a, b = (a, d) if f(c) < f(d) else (c, b)
    n = math.exp((a + b) / 2)
    return n, flops / (6 * n)


@pytest.mark.parametrize("name", sorted(laws.CATALOG))
@pytest.mark.parametrize("flops", [1e18, 1.36e21, 1e24])
def test_closed_form_optimum_matches_numerical_minimum(name, flops):
    law = laws.CATALOG[name]
    opt = law.optimum_6nd(flops)
    n, d = _brute_force_optimum(law, flops)
    # Near its minimum the loss is flat to second order: a search on float64 values locates it
    # to about √eps64 = 1.5e-8 in log N, far inside 1e-4; a wrong exponent moves it by percents.
    assert opt.n_params == pytest.approx(n, rel=1e-4)
    assert opt.tokens == pytest.approx(d, rel=1e-4)
    assert 6 * opt.n_params * opt.tokens == pytest.approx(flops, rel=1e-12)


def test_besiroglu_optimum_is_about_20_tokens_per_parameter():
    # Besiroglu et al. 2024: their fit implies ~20 tokens per parameter at Chinchilla's scale.
    opt = laws.CATALOG["besiroglu2024"].optimum_6nd(5.76e23)
    assert 15 < opt.tokens_per_param < 30


def test_chinchilla_paper_70b_budget():
    # Hoffmann et al. 2022 (Table 3, Approach 3): at 5.76e23 FLOPs the fit predicts ~40B params.
    opt = laws.CATALOG["hoffmann2022"].optimum_6nd(5.76e23)
    assert 30e9 < opt.n_params < 50e9


def test_deepseek_hyperparameter_laws():
    # DeepSeek LLM, Eq. 1, evaluated by hand at C = 1e20.
    assert laws.deepseek_batch_tokens(1e20) == pytest.approx(0.2920 * 10 ** (20 * 0.3271))
    assert laws.deepseek_learning_rate(1e20) == pytest.approx(0.3118 * 10 ** (-20 * 0.125))
    # Their Figure 3 shows ~2M-token batches and lr ~1e-3 near 1e20-1e21 FLOPs.
    assert 1e6 < laws.deepseek_batch_tokens(1e20) < 4e6
    assert 5e-4 < laws.deepseek_learning_rate(1e20) < 2e-3


def test_tokens_per_param_rule():
    rule = laws.TokensPerParamRule(20, laws.CATALOG["besiroglu2024"])
    opt = rule.optimum_6nd(1.2e21)
    assert opt.tokens_per_param == pytest.approx(20)
    assert rule.objective(1e9, 20e9) == pytest.approx(0)
