"""The solver on the reference budget and on constrained and infeasible specs.

Tolerances: pytest.approx without rel= uses its default, 1e-6 relative. Every such comparison
here is float64 arithmetic (numpy and Python, no torch kernels) of the same quantity computed two
ways, which agree to ~1e-15: 1e-6 is far above that and far below any real discrepancy (a wrong
term moves these numbers by percents). Bounds that are not about rounding say why beside them.
"""

import re
from pathlib import Path

import pytest

from llama3gen import arch, laws
from llama3gen.errors import UserError
from llama3gen.planner import build_plan
from llama3gen.spec import load_spec, parse_spec_text

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def reference_plan():
    spec, _ = load_spec(REPO / "specs" / "1.36e21.yaml")
    return build_plan(spec)


def variant(plan, name):
    return next(v for v in plan.variants if v.name == name)


def test_reference_pick_is_within_0p1_percent_of_closed_form(reference_plan):
    opt = laws.CATALOG["hoffmann2022"].optimum_6nd(1.36e21)
    pick = variant(reference_plan, "optimal").choice
    assert pick.loss <= opt.loss * 1.001
    assert pick.loss >= opt.loss - 1e-12  # the closed form is the minimum: nothing beats it
    assert pick.loss < 2.3351  # better than the reference's "optimal" 18L × 2048


def test_tokens_spend_the_budget_exactly(reference_plan):
    for v in reference_plan.variants:
        c = v.choice
        assert c.flops_6n == pytest.approx(1.36e21, rel=1e-12)  # 6N convention in this spec
        assert 6 * c.n_params * c.tokens == pytest.approx(1.36e21, rel=1e-12)


def test_pick_counts_agree_with_arch(reference_plan):
    for v in reference_plan.variants:
        s = v.choice.shape
        assert s.d_model == s.n_heads * s.head_dim and s.n_heads % s.n_kv_heads == 0
        assert s.ffn_hidden == arch.ffn_hidden_ratio(s.d_model, 3.5, 256)
        assert v.choice.n_params == arch.param_count(s.n_layers, s.d_model, s.n_heads, s.n_kv_heads,
                                                     s.head_dim, s.ffn_hidden, s.vocab_size)


def test_chinchilla_variant_in_band(reference_plan):
    c = variant(reference_plan, "chinchilla").choice
    assert 15 <= c.tokens_per_param <= 25


def test_both_variants_take_about_the_same_time(reference_plan):
    # Same FLOPs budget → about the same GPU time (the reference claimed 15 vs 10 days).
    days = [v.timing.days for v in reference_plan.variants]
    assert max(days) / min(days) < 1.15


def test_top_k_ranked_and_pick_marked(reference_plan):
    v = variant(reference_plan, "optimal")
    losses = [r.loss for r in v.top if r.rank <= 10]
    assert losses == sorted(losses)
    assert sum(r.selected for r in v.top) == 1


def test_sensitivity_covers_every_catalog_law(reference_plan):
    assert {s.law for s in reference_plan.sensitivity} == set(laws.CATALOG)


BASE = """
name: t
budget: {flops: 1e21}
search: {layers: {min: 4, max: 48}, hidden: {min: 512, max: 6144, step: 128}}
"""


def test_params_and_days_constraints_respected():
    # a day limit just under what the unconstrained pick takes must move the pick
    unconstrained = build_plan(parse_spec_text(BASE)).variants[0].timing.days
    limit = round(0.99 * unconstrained, 3)
    spec = parse_spec_text(BASE + f"""
variants:
  - name: small
    params: {{max: 1.0e9}}
  - name: quick
    max_days: {limit}
""")
    plan = build_plan(spec)
    assert variant(plan, "small").choice.n_params <= 1e9
    assert variant(plan, "quick").timing.days <= limit
    assert variant(plan, "quick").stats.removed_by["max_days"] > 0
    assert variant(plan, "small").stats.removed_by["params.max"] > 0


def test_impossible_deadline_names_the_fastest_option():
    spec = parse_spec_text(BASE + "variants:\n  - name: quick\n    max_days: 3\n")
    with pytest.raises(UserError) as info:
        build_plan(spec)
    fix = info.value.fix
    assert "the fastest shape needs" in fix and "add GPUs" in fix
    suggested = float(re.search(r"max_days: ([\d.e+]+) or more", fix)[1])
    assert build_plan(parse_spec_text(BASE + f"variants:\n  - name: quick\n    max_days: {suggested}\n"))


def test_gpu_too_small_is_planned_or_explained():
    # 8B-class shapes on one 40 GB GPU: the memory constraint removes what cannot fit even with
    # activation checkpointing and micro-batch 1, and the pick fits.
    spec = parse_spec_text("name: t\nbudget: {flops: 5e22}\nhardware: {gpu: a100-40gb, gpus_per_node: 1}\n"
                           "search: {layers: {min: 16, max: 48}, hidden: {min: 2048, max: 8192, step: 1024}}\n"
                           "variants: [{name: o}]\n")
    plan = build_plan(spec)
    v = plan.variants[0]
    assert v.memory.fits and v.memory.total <= v.memory.capacity
    assert v.stats.removed_by["memory"] > 0


def test_budget_too_small_says_what_would_work():
    # The spec's own search space (BASE) holds no shape this far from the optimum: the error names
    # the bound and a value that works.
    variants = "variants:\n  - name: c\n    tokens_per_param: {{min: {}, max: 60000}}\n"
    with pytest.raises(UserError) as info:
        build_plan(parse_spec_text(BASE + variants.format(50000)))
    suggested = re.search(r"tokens_per_param.min: ([\d.e+]+) or less", info.value.fix)[1]
    assert 15 < float(suggested) < 50000
    c = build_plan(parse_spec_text(BASE + variants.format(suggested))).variants[0].choice
    assert c.tokens_per_param >= float(suggested)
    # With the search space left to the compiler it covers the variant's band.
    spec = parse_spec_text("name: t\nbudget: {flops: 1e21}\n" + variants.format(50000))
    assert 50000 <= build_plan(spec).variants[0].choice.tokens_per_param <= 60000


def test_narrow_space_is_an_error():
    fixed_heads = "model: {head_dim: 128, kv_heads: 8}\n"
    spec = parse_spec_text("name: t\nbudget: {flops: 1e21}\nsearch: {hidden: [100, 200]}\n" + fixed_heads)
    with pytest.raises(UserError) as info:
        build_plan(spec)
    assert "no valid shape" in info.value.message
    assert "multiples of 1024" in info.value.fix
    # head_dim and kv_heads left free: the fix names widths that work
    spec = parse_spec_text("name: t\nbudget: {flops: 1e21}\nsearch: {hidden: [100, 200]}\n")
    with pytest.raises(UserError) as info:
        build_plan(spec)
    widths = re.search(r"use widths such as (\d+) or (\d+)", info.value.fix).groups()
    spec = parse_spec_text(f"name: t\nbudget: {{flops: 1e21}}\nsearch: {{hidden: [{widths[0]}]}}\n"
                           "variants: [{name: o}]\n")
    assert build_plan(spec).variants[0].choice.shape.d_model == int(widths[0])


def test_gpu_hours_budget_counts_hardware_flops():
    spec = parse_spec_text("name: t\nbudget: {gpu_hours: 1000}\nhardware: {gpu: h100-sxm, mfu: 0.4}\n")
    plan = build_plan(spec)
    assert plan.budget.convention == "exact"
    assert plan.budget.flops == pytest.approx(1000 * 3600 * 989e12 * 0.4)
    for v in plan.variants:
        # The budget is wall clock: the pick trains for the goodput's share of it, its FLOPs
        # the same share of the budget's (the plan's goodput is for whole steps: one step apart,
        # 1/max_iters relative).
        assert v.choice.flops_exact == pytest.approx(plan.budget.flops * v.timing.goodput,
                                                     rel=1 / v.training.max_iters)
        assert v.timing.gpu_hours == pytest.approx(1000, rel=1 / v.training.max_iters)


def test_tokens_per_param_law():
    spec = parse_spec_text("name: t\nbudget: {flops: 1e21}\n"
                           "search: {scaling_law: {tokens_per_param: 20}}\nvariants: [{name: r}]\n")
    plan = build_plan(spec)
    # the rule's exact D = 20·N lies between grid shapes; neighbouring widths differ by up to 1/8
    # in N (solver.default_widths), so the nearest is within ~10%
    assert plan.variants[0].choice.tokens_per_param == pytest.approx(20, rel=0.1)


def test_time_is_hardware_flops_over_job_throughput(reference_plan):
    hw = reference_plan.hardware
    job_flops_per_s = hw.world_size * hw.peak_tflops * 1e12 * hw.mfu
    for v in reference_plan.variants:
        c, t = v.choice, v.training
        assert not t.activation_checkpointing  # so hardware FLOPs are the exact model FLOPs
        assert v.timing.hardware_flops == pytest.approx(c.flops_per_token_exact * t.tokens_trained)
        assert v.timing.days * 86400 == pytest.approx(v.timing.hardware_flops / job_flops_per_s)
        assert v.timing.gpu_hours == pytest.approx(v.timing.wall_clock_days * 24 * hw.world_size)
        assert v.timing.cost_usd == pytest.approx(v.timing.gpu_hours * 2.0)


def test_activation_checkpointing_costs_one_more_forward():
    spec = parse_spec_text("name: t\nbudget: {flops: 1e21}\ntraining: {activation_checkpointing: true}\n"
                           "variants: [{name: o}]\n")
    v = build_plan(spec).variants[0]
    s, c = v.choice.shape, v.choice
    block_forward = 2 * arch.layer_matmul_params(s.d_model, s.n_heads, s.n_kv_heads, s.head_dim,
                                                 s.ffn_hidden) + 4 * s.seq_len * s.n_heads * s.head_dim
    expected = c.flops_per_token_exact + s.n_layers * block_forward
    assert v.training.activation_checkpointing
    assert v.timing.hardware_flops == pytest.approx(expected * v.training.tokens_trained, rel=1e-9)


def test_gpu_too_small_for_any_shape_names_the_nearest_fix():
    spec = parse_spec_text("name: t\nbudget: {flops: 1e23}\nhardware: {gpu: a100-40gb, gpus_per_node: 1}\n"
                           "search: {layers: [32], hidden: [4096]}\nvariants: [{name: o}]\n")
    with pytest.raises(UserError) as info:
        build_plan(spec)
    assert "no shape fits in memory" in info.value.message
    assert "GPU" in info.value.fix


@pytest.mark.parametrize("ac", ["auto", "true"])
def test_days_budget_is_spent_not_exceeded(ac):
    # A time budget buys tokens at the layout's real throughput: with activation checkpointing the
    # recomputed forward costs tokens, not extra days.
    spec = parse_spec_text(f"name: t\nbudget: {{days: 14}}\nhardware: {{gpu: h100-sxm, nodes: 4}}\n"
                           f"training: {{activation_checkpointing: {ac}}}\nvariants: [{{name: o}}]\n")
    v = build_plan(spec).variants[0]
    # auto recomputes only when no micro-batch fits without it; this 10B pick fits micro 4 as is
    assert v.training.activation_checkpointing is {"true": True, "auto": False}[ac]
    # ceil(D / batch) steps: at most one step (of the wall clock) over; the budget is the
    # expected wall clock (tests/test_goodput.py), the fixed point within 1e-6 of it
    one_step = v.timing.wall_clock_days / v.training.max_iters
    assert 14 * (1 - 1e-6) <= v.timing.wall_clock_days <= 14 * (1 + 1e-6) + one_step
    assert v.timing.days < v.timing.wall_clock_days


def test_extrapolation_is_flagged_only_outside_the_fit(reference_plan):
    assert reference_plan.warnings == []  # 1.9B / 3.0B parameters on 75-117B tokens: in range
    spec, _ = load_spec(REPO / "specs" / "tiny-cpu.yaml")
    tiny = build_plan(spec)
    assert any("optimal: N = " in w and "extrapolation" in w for w in tiny.warnings)
    assert any("optimal: D = " in w for w in tiny.warnings)
