"""Goodput (issue #18, item 4): the Young–Daly checkpoint interval, the expected goodput and the
wall clock, by hand and through the planner; failure rate 0 keeps the old interval rule."""

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest

from llama3gen import goodput as G
from llama3gen.planner import build_plan
from llama3gen.render import render_files
from llama3gen.report import variant_block
from llama3gen.spec import parse_spec_text

ROOT = Path(__file__).resolve().parent.parent

# Float64 arithmetic of a dozen operations, in another order than goodput.py's: 1e-12 relative
# is a thousand times the rounding error and far below any modelling difference.
EXACT = 1e-12

TINY = """name: tiny
budget: {flops: 5.0e12}
hardware: {gpu: cpu, gpus_per_node: 2, nodes: 1, cpus_per_gpu: 1}
model: {vocab_size: 257, seq_len: 128, head_dim: 32, kv_heads: 2,
        ffn: {llama3_multiplier: 1.3, multiple_of: 32}}
search: {layers: {min: 2, max: 8}, hidden: {min: 64, max: 256, step: 32}, aspect: {min: 8, max: 128}}
training: {compile: false}
variants: [{name: optimal}]
"""


def gpu_spec(flops, nodes, cluster=""):
    return (f"name: job\nbudget: {{flops: {flops}}}\n"
            f"hardware: {{gpu: h100-sxm, gpus_per_node: 8, nodes: {nodes}}}\n"
            f"variants: [{{name: optimal}}]\n" + (f"cluster: {{{cluster}}}\n" if cluster else ""))


def plan_of(text):
    return build_plan(parse_spec_text(text, "test.yaml"))


def test_young_daly_and_goodput_by_hand():
    # 1e9 parameters on 8 ranks, 2 GB/s, 1e-4 failures per GPU-hour, 10,000 steps of 100 s.
    g = G.plan_goodput(n_params=10**9, sharded=True, world_size=8, train_seconds=1e6,
                       max_iters=10_000, eval_seconds=0.0, write_GBps=2.0,
                       failures_per_gpu_hour=1e-4, restart_seconds=600, ckpt_interval=None,
                       default_interval=1000)
    assert g.checkpoint_bytes == 12e9  # fp32 weights + AdamW's exp_avg and exp_avg_sq
    assert g.checkpoint_bytes_per_rank == 1.5e9
    assert g.write_seconds == pytest.approx(6.0, rel=EXACT)  # 12 GB / 2 GB/s
    assert g.mtbf_seconds == pytest.approx(4.5e6, rel=EXACT)  # 3600 s / (8 · 1e-4)
    assert g.young_daly_seconds == pytest.approx(math.sqrt(2 * 6 * 4.5e6), rel=EXACT)  # 7348.5 s
    assert g.young_daly_steps == g.interval_steps == 73  # 7348.5 s / 100 s per step, rounded
    assert g.interval_seconds == pytest.approx(7300, rel=EXACT)
    assert g.saves == 137  # ceil(10,000 / 73): the last step saves too
    wall = (1e6 + 137 * 6) / (1 - (600 + (7300 + 6) / 2) / 4.5e6)
    assert g.wall_clock_seconds == pytest.approx(wall, rel=EXACT)
    assert g.goodput == pytest.approx(1e6 / wall, rel=EXACT)
    assert g.goodput == pytest.approx(0.998234, abs=5e-7)  # 1e6 / 1,001,768.8, six digits by hand
    assert g.expected_failures == pytest.approx(wall / 4.5e6, rel=EXACT)


def test_evaluations_are_work_a_checkpoint_protects_by_hand():
    # The job above, evaluating 5e4 s in all: 1.05e6 s of work, 105 s per step.
    g = G.plan_goodput(n_params=10**9, sharded=True, world_size=8, train_seconds=1e6,
                       max_iters=10_000, eval_seconds=5e4, write_GBps=2.0,
                       failures_per_gpu_hour=1e-4, restart_seconds=600, ckpt_interval=None,
                       default_interval=1000)
    assert g.young_daly_steps == g.interval_steps == 70  # 7348.5 s / 105 s per step, rounded
    assert g.interval_seconds == pytest.approx(7350, rel=EXACT)
    assert g.saves == 143  # ceil(10,000 / 70)
    wall = (1.05e6 + 143 * 6) / (1 - (600 + (7350 + 6) / 2) / 4.5e6)
    assert g.wall_clock_seconds == pytest.approx(wall, rel=EXACT)
    assert g.goodput == pytest.approx(1e6 / wall, rel=EXACT)  # evaluation is not training
    assert g.eval_seconds == 5e4 and g.timing_fields()["eval_days"] == pytest.approx(5e4 / 86400)
    off = G.plan_goodput(n_params=10**9, sharded=True, world_size=8, train_seconds=1e6,
                         max_iters=10_000, eval_seconds=5e4, write_GBps=2.0,
                         failures_per_gpu_hour=0.0, restart_seconds=600, ckpt_interval=None,
                         default_interval=1000)
    assert off.wall_clock_seconds == 1.05e6 and off.goodput == pytest.approx(1e6 / 1.05e6)


def test_the_interval_stays_within_the_run():
    common = dict(n_params=10**9, sharded=False, world_size=1, write_GBps=2.0, restart_seconds=0,
                  failures_per_gpu_hour=1e-4, default_interval=1000, eval_seconds=0.0)
    short = G.plan_goodput(train_seconds=100.0, max_iters=10, ckpt_interval=None, **common)
    assert short.interval_steps == 10 and short.saves == 1  # √(2·6·3.6e7) s ≫ the 100 s run
    slow = G.plan_goodput(train_seconds=1e6, max_iters=10, ckpt_interval=None, **common)
    assert slow.interval_steps == 1  # one step (1e5 s) outlasts the Young–Daly interval (2e4 s)
    given = G.plan_goodput(train_seconds=1e6, max_iters=10, ckpt_interval=4, **common)
    assert given.interval_steps == 4 and given.saves == 3 and given.young_daly_steps == 1


def test_the_default_rate_is_llama3s():
    assert G.DEFAULT_FAILURES_PER_GPU_HOUR == 419 / (54 * 24 * 16384)
    plan = plan_of(TINY)
    tm = plan.variants[0].timing
    assert tm.failures_per_gpu_hour == 419 / (54 * 24 * 16384)
    assert tm.job_mtbf_s == pytest.approx(3600 / (2 * 419 / (54 * 24 * 16384)), rel=EXACT)
    prov = plan.variants[0].provenance
    for key in ("failures_per_gpu_hour", "checkpoint_write_s", "restart_s", "job_mtbf_s",
                "young_daly_interval", "ckpt_interval", "goodput"):
        assert prov[key], key
    assert "419" in prov["failures_per_gpu_hour"] and "assumption" in prov["restart_s"]


def test_measured_interruptions_update_the_default_rate_by_hand():
    """The default is a prior worth one failure in 1/r0 device-hours (r0: Llama 3's rate). Three
    failures seen in 3/r0 hours: (1 + 3) / (1/r0 + 3/r0) = r0 — the evidence agrees with the
    prior; nine in 3/r0 hours: 10 / (4/r0) = 2.5 r0; none in 1/r0 hours: 1 / (2/r0) = r0 / 2. A
    spec's own rate wins over any of them."""
    r0 = 419 / (54 * 24 * 16384)
    cases = [(3, 3 / r0, r0), (9, 3 / r0, 2.5 * r0), (0, 1 / r0, r0 / 2), (0, 0.0, r0)]
    for count, hours, expected in cases:
        rate, source = G.failure_rate(None, (count, hours, "calibration c.json: run r"))
        # a few float operations on these numbers: well within 1e-12 relative
        assert rate == pytest.approx(expected, rel=1e-12), (count, hours)
        assert source.startswith("calibration c.json: run r") and "Gamma–Poisson" in source
    assert G.failure_rate(1e-3, (9, 3 / r0, "calibration"))[0] == 1e-3


def test_failure_rate_zero_keeps_the_old_interval():
    for text in (TINY, gpu_spec(1.36e21, 1)):  # max_iters // 10, and the 1000-step cap
        off = plan_of(text + "cluster: {failures_per_gpu_hour: 0}\n")
        on = plan_of(text)
        t, tm = off.variants[0].training, off.variants[0].timing
        assert t.ckpt_interval == max(1, min(1000, t.max_iters // 10))
        # the wall clock is training and evaluation, nothing else
        assert tm.wall_clock_days == pytest.approx(tm.days + tm.eval_days, rel=EXACT)
        assert tm.goodput == pytest.approx(tm.days / (tm.days + tm.eval_days), rel=EXACT)
        assert tm.expected_failures == 0
        assert tm.job_mtbf_s is None and tm.young_daly_interval_s is None
        # only the checkpoint interval and the goodput fields differ
        assert off.variants[0].training.model_copy(update={"ckpt_interval": 0}) == \
            on.variants[0].training.model_copy(update={"ckpt_interval": 0})
        assert tm.days == on.variants[0].timing.days
    assert max(1, min(1000, t.max_iters // 10)) == 1000  # the GPU spec reached the cap


def evaluation_seconds_by_hand(v, evaluations, batches):
    """evaluations × batches global batches, each one forward: a third of the exact FLOPs per
    token, against the step's executed FLOPs per token (recomputation included)."""
    t, tm = v.training, v.timing
    executed_per_token = tm.hardware_flops / t.tokens_trained
    share = v.choice.flops_per_token_exact / 3 / executed_per_token
    return evaluations * batches * share * tm.step_seconds


@pytest.mark.parametrize("text, recompute", [(TINY, False), (
    gpu_spec(1.36e21, 1) + "training: {activation_checkpointing: true}\n", True)])
def test_evaluation_time_by_hand(text, recompute):
    """train.py evaluates every eval_interval steps and at the last, eval_iters global batches
    each, forward only. Against the step: a third of its FLOPs, or less where the step also
    recomputes the forward. (A dozen float operations in another order: EXACT.)"""
    v = plan_of(text).variants[0]
    t, tm = v.training, v.timing
    assert t.activation_checkpointing is recompute
    assert t.eval_interval == max(1, min(1000, t.max_iters // 10))
    evaluations = math.ceil(t.max_iters / t.eval_interval)
    expected = evaluation_seconds_by_hand(v, evaluations, t.eval_iters)
    assert tm.eval_days * 86400 == pytest.approx(expected, rel=EXACT)
    share = tm.eval_days * 86400 / (evaluations * t.eval_iters * tm.step_seconds)
    if recompute:  # the step adds a forward of the blocks, not of lm_head: 1/4 < share < 1/3
        assert 1 / 4 < share < 1 / 3
    else:
        assert share == pytest.approx(1 / 3, rel=EXACT)
    assert f"{evaluations} evaluation(s)" in v.provenance["eval_days"]
    assert tm.wall_clock_days > tm.days + tm.eval_days  # the failures' and saves' share on top


def test_a_large_job_checkpoints_more_often_and_loses_more():
    small = plan_of(gpu_spec(1.36e21, 1)).variants[0].timing
    large = plan_of(gpu_spec(1e24, 128)).variants[0].timing
    assert large.young_daly_interval_s < small.young_daly_interval_s
    assert large.checkpoint_interval_s < small.checkpoint_interval_s
    assert large.goodput < small.goodput < 1
    assert large.expected_failures > small.expected_failures
    assert large.wall_clock_days > large.days


def test_the_generated_config_has_the_plans_interval(tmp_path):
    text = gpu_spec(1.36e21, 1)
    for spec_text in (text, text + "training: {ckpt_interval: 7}\n"):
        plan = build_plan(parse_spec_text(spec_text, "test.yaml"))
        files = render_files(plan, spec_text)
        v = plan.variants[0]
        config = ast.parse(files[f"config/{v.name}.py"].decode())
        values = {n.targets[0].id: ast.literal_eval(n.value) for n in config.body
                  if isinstance(n, ast.Assign)}
        assert values["ckpt_interval"] == v.training.ckpt_interval
        assert f"{v.timing.goodput:.2%}" in files["README.md"].decode()
    assert v.training.ckpt_interval == 7 and v.provenance["ckpt_interval"] == "spec: training.ckpt_interval"
    assert v.timing.young_daly_interval_steps != 7  # the spec won over the rule


def cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "llama3gen.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def test_solve_reports_goodput_and_a_hopeless_job_is_a_clear_error(tmp_path):
    (tmp_path / "ok.yaml").write_text(gpu_spec(1.36e21, 1, "checkpoint_write_GBps: 2.5, restart_s: 300"))
    r = cli("solve", "ok.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Young–Daly" in r.stdout and "goodput" in r.stdout and "at 2.5 GB/s" in r.stdout
    assert "300 s restart each" in r.stdout
    # one failure per GPU-hour on 8 GPUs: every 450 s, shorter than a 600 s restart
    (tmp_path / "bad.yaml").write_text(gpu_spec(1.36e21, 1, "failures_per_gpu_hour: 1"))
    r = cli("compile", "bad.yaml", "-o", "out", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()  # the error, and the UserError's fix
    # the line and column of the value (cli._plan_for: spec.field_where)
    at = next(i for i, l in enumerate((tmp_path / "bad.yaml").read_text().splitlines(), 1)
              if "failures_per_gpu_hour: 1" in l)
    assert len(lines) == 2 and lines[0].startswith(f"error: bad.yaml:{at}:") and "Traceback" not in r.stderr
    assert ": cluster.failures_per_gpu_hour: " in lines[0] and "never finish" in r.stderr
    assert not (tmp_path / "out").exists()


def test_an_interval_longer_than_the_run_is_reported_as_such(tmp_path):
    """The tiny CPU run trains for minutes; its job fails every ~3 years, so √(2·δ·M) is ~20
    minutes, longer than the run: the plan checkpoints once, at the end, and says so."""
    r = cli("solve", ROOT / "specs" / "tiny-cpu.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stdout.splitlines() if l.lstrip().startswith("Young–Daly")]
    assert lines and all("> the whole run" in l and "one checkpoint at the end" in l for l in lines)
    r = cli("solve", ROOT / "specs" / "1.36e21.yaml", cwd=tmp_path)
    lines = [l for l in r.stdout.splitlines() if l.lstrip().startswith("Young–Daly")]
    assert lines and not any("whole run" in l for l in lines)


def test_max_days_bounds_the_expected_wall_clock():
    """One failure per 100 GPU-hours on 8 A100s: the reference pick trains 13.6 days but takes
    about 14.3 with checkpoints, lost work and restarts. A max_days between the two removes it:
    the constraint is on the expected wall clock the plan reports, not on the training alone."""
    base = (ROOT / "specs" / "1.36e21.yaml").read_text().replace(
        "  partition: gpu\n", "  partition: gpu\n  failures_per_gpu_hour: 0.01\n")
    free = build_plan(parse_spec_text(base)).variants[0]
    assert free.timing.wall_clock_days > free.timing.days * 1.02  # failures cost a few percent
    limit = (free.timing.days + free.timing.wall_clock_days) / 2
    bound = build_plan(parse_spec_text(base.replace(
        "  - name: optimal\n", f"  - name: optimal\n    max_days: {limit!r}\n"))).variants[0]
    assert bound.choice.n_params < free.choice.n_params
    assert bound.timing.wall_clock_days <= limit < free.timing.wall_clock_days
    assert bound.stats.removed_by["max_days"] > 0


def test_max_days_on_a_job_that_never_finishes_says_so(tmp_path):
    # one failure per GPU-hour on 8 GPUs: every 450 s, shorter than a 600 s restart
    text = (ROOT / "specs" / "1.36e21.yaml").read_text().replace(
        "  partition: gpu\n", "  partition: gpu\n  failures_per_gpu_hour: 1\n").replace(
        "  - name: optimal\n", "  - name: optimal\n    max_days: 30\n")
    (tmp_path / "s.yaml").write_text(text)
    r = cli("solve", "s.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "no shape would finish" in r.stderr and "failures_per_gpu_hour" in r.stderr
    assert "inf" not in r.stderr


def within_a_step(timing, max_iters, budget_s):
    """The expected wall clock is the budget's, to 1e-6, or at most one step of it more."""
    wall_s = timing.wall_clock_days * 86400
    return -1e-6 * budget_s <= wall_s - budget_s <= wall_s / max_iters + 1e-6 * budget_s


def time_budget_spec(budget, failures):
    return (f"name: job\nbudget: {{{budget}}}\n"
            "hardware: {gpu: h100-sxm, gpus_per_node: 8, nodes: 64, usd_per_gpu_hour: 2.0}\n"
            f"cluster: {{failures_per_gpu_hour: {failures}}}\nvariants: [{{name: optimal}}]\n")


@pytest.mark.parametrize("budget", ["days: 14", "gpu_hours: 172032"])
def test_a_time_budget_is_the_expected_wall_clock(budget):
    """days and gpu_hours are wall clock: on 512 H100s at one failure per 10,000 GPU-hours the
    job fails every ~20 h, so the pick trains for less than the budget and its expected wall
    clock, saves and failures included, is the budget (172,032 GPU-hours = 14 days × 512). What
    the plan bills (GPU-hours, cost) is that wall clock. Bounds: the plan trains whole steps, so
    it may run past the budget by one step of its wall clock (the step, its share of the
    evaluations, at the goodput's rate); the fixed point (timebudget._full_tokens) settles far
    below that (1e-6)."""
    v = plan_of(time_budget_spec(budget, 1e-4)).variants[0]
    t, world, wall_s = v.timing, 512, 14 * 86400
    assert 0.9 < t.goodput < 0.99  # failures cost this job a few percent
    assert t.days * 86400 < wall_s * 0.99
    assert within_a_step(t, v.training.max_iters, wall_s)
    assert t.gpu_hours == pytest.approx(t.wall_clock_days * 24 * world, rel=EXACT)
    assert t.cost_usd == pytest.approx(t.gpu_hours * 2.0, rel=EXACT)


def test_a_time_budget_without_failures_trains_and_evaluates_for_all_of_it():
    """Failure rate 0 (failures not modelled): the whole budget trains and evaluates, nothing
    else. Whole steps: at most one step over (its evaluation share is a few hundredths of it)."""
    v = plan_of(time_budget_spec("days: 14", 0)).variants[0]
    t = v.timing
    assert t.wall_clock_days == pytest.approx(t.days + t.eval_days, rel=EXACT)
    assert t.goodput == pytest.approx(t.days / (t.days + t.eval_days), rel=EXACT)
    assert 0 <= (t.days + t.eval_days) * 86400 - 14 * 86400 <= t.step_seconds


def test_a_time_budget_is_never_overrun_where_the_batch_changes_the_speed():
    """100,000 GPU-hours on 512 H100s, failures off: the 17.6B pick's speed at the FLOPs-derived
    batch (5,120 sequences, 10 per rank) buys tokens whose batch is 11 per rank, where micro-
    batches can only be 1 or 11 and the speed falls 17%. The plan used to train those tokens at
    the slower speed: 120,864 GPU-hours, 21% over the budget. It now keeps the batch whose
    speed it was evaluated at and trains the most tokens that keep that batch: under the budget
    by less than one rounding step of the batch (B ∝ C^0.327, so a tenth more batch is
    1.1^(1/0.327) = 1.34× the compute: at worst 25% under; here 2%), and consistent
    (plan_training asserts that the layout divides the plan's batch)."""
    v = plan_of(time_budget_spec("gpu_hours: 100000", 0)).variants[0]
    assert v.timing.gpu_hours <= 100000 + v.timing.step_seconds * 512 / 3600
    assert v.timing.gpu_hours > 100000 * 0.7
    assert v.training.global_batch_size % 512 == 0


def test_a_time_budget_shorter_than_one_step_and_its_checkpoint_is_refused(tmp_path):
    """days: 1e-6 (0.0864 s) on the default 8 A100s: one step and the final checkpoint of any
    shape take longer, so no plan can keep to it. One error naming the budget, exit 2."""
    (tmp_path / "s.yaml").write_text("name: edge\nbudget:\n  days: 1.0e-06\nvariants:\n- name: optimal\n")
    r = cli("solve", "s.yaml", cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "s.yaml:3:9: budget.days: 0.0864 s of wall clock is less than the shortest plan" in r.stderr, r.stderr
    assert "fix: give a budget of at least" in r.stderr


def test_a_tiny_time_budget_that_a_checkpoint_nearly_fills_still_plans():
    """0.001 GPU-hours on 32 H100s (0.1125 s of wall clock) at one failure per 100 GPU-hours: a
    checkpoint write takes a quarter of it, so T ← T · budget / wall(T) shrinks its error by only
    about 4× a round (it used to stop after three and refuse a budget that fits); it now runs to
    1e-9 and plans within the budget (the bound as above: one step, 1e-6)."""
    text = ("name: t\nbudget: {gpu_hours: 0.001}\nhardware: {gpu: h100-sxm, nodes: 4}\n"
            "cluster: {failures_per_gpu_hour: 0.01}\nvariants: [{name: o}]\n")
    v = plan_of(text).variants[0]
    t, wall_s = v.timing, 0.001 * 3600 / 32
    assert t.checkpoint_write_s > 0.2 * wall_s
    assert within_a_step(t, v.training.max_iters, wall_s)


def test_the_generated_readme_states_a_time_budget_as_wall_clock():
    text = time_budget_spec("days: 14", 1e-4)
    readme = render_files(plan_of(text), text)["README.md"].decode()
    assert "for a budget of\n14 days of wall clock (nominally " in readme
    # D is what the wall clock trains, not C / FLOPs per token: the nominal C gives another D
    plan = plan_of(text)
    v = plan.variants[0]
    assert "Tokens: as many as the budget's wall clock trains" in readme
    assert "D = C / FLOPs per token" not in readme
    assert v.provenance["tokens"].startswith("the tokens whose expected wall clock at ")
    assert abs(plan.budget.flops / v.choice.flops_per_token_exact / v.choice.tokens - 1) > 1e-3
    report = variant_block(plan, v)
    assert "(what the budget's wall clock trains at this plan's speed" in report
    assert "N-D GRID SEARCH for 14 days of wall clock, nominally C = " in report
    comparison = render_files(plan, text)["docs/comparison.md"].decode()
    assert "Budget: **14 days of wall clock**, nominally " in comparison
    assert "every variant fills the same wall clock" in comparison
    assert "D = C / FLOPs per token" not in comparison
    assert "for a time budget C is its nominal FLOPs" in plan.closed_form.note


def test_a_flops_budget_states_d_as_c_over_flops_per_token():
    """The provenance's division is the number shown: C / FLOPs per token in the spec's
    convention (float64 division of exact integers and C: relative rounding ~1e-16)."""
    text = "name: f\nbudget: {flops: 1.0e21}\nvariants: [{name: o}]\n"
    plan = plan_of(text)
    c = plan.variants[0].choice
    assert plan.variants[0].provenance["tokens"] == (
        f"D = C / FLOPs per token (6N) = {1e21:.6g} / {c.flops_per_token_6n:,}")
    assert c.tokens == pytest.approx(1e21 / c.flops_per_token_6n, rel=1e-12)
    assert "(= C / FLOPs per token, exactly)" in variant_block(plan, plan.variants[0])


def test_the_most_tokens_that_keep_a_batch_reach_its_rounding_step():
    """timebudget._most_tokens_keeping: for every candidate, the tokens it returns keep the batch
    they were asked to keep, and a hundred-millionth more would not (the bisection runs to
    float64's resolution in log tokens: 60 halvings of an interval under 75 wide)."""
    import numpy as np

    from llama3gen import solver, timebudget

    spec = parse_spec_text(time_budget_spec("gpu_hours: 100000", 0))
    cands = solver.enumerate_candidates(spec, solver.budget_flops(spec))
    batches = timebudget._batches(spec, cands, cands.tokens)
    above = cands.tokens * 4  # B ∝ C^0.327: 4× the tokens is 1.57× the batch, past a step
    assert np.all(timebudget._batches(spec, cands, above) > batches)
    most = timebudget._most_tokens_keeping(spec, cands, batches, above)
    assert np.array_equal(timebudget._batches(spec, cands, most), batches)
    assert np.all(timebudget._batches(spec, cands, most * (1 + 1e-8)) > batches)
