"""Property-based tests (hypothesis): whatever the spec, the compiler ends in a Plan or a UserError;
whatever a run's metrics.jsonl or a lock file holds, `llama3gen calibrate`, `fit` and `submit` end
in a result or a UserError.

Specs are generated as YAML: mostly plausible values with, field by field, a chance of junk (NaN,
inf, huge, negative, zero, strings where numbers go, wrong types, hostile strings); plus raw text
and valid specs with random characters mutated. Every case must end in success (a Plan whose
numbers are finite and whose configs are Python literals) or a UserError with a message; any
other exception is a bug. A few generated specs also go through the CLI (exit 0 or 2 only).
"""

from __future__ import annotations

import ast
import json
import math
import os
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from _forked_cli import run_cli_forked
from llama3gen import hardware, laws
from llama3gen.errors import UserError
from llama3gen.planner import build_plan
from llama3gen.render import render_files
from llama3gen.spec import MAX_CANDIDATES, MAX_D_MODEL, MAX_LAYERS, parse_spec_text

TINY_TEXT = (Path(__file__).resolve().parent / "bad_specs" / "ok_tiny.yaml").read_text()
# Locally every run draws new examples, to find what the last ones missed; CI (CI=true) draws the
# same ones every time, so a submission is judged on its code, not on a new draw.
PROFILE = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
               database=None, derandomize=os.environ.get("CI") == "true")

# --- strategies --------------------------------------------------------------------------------

JUNK_SCALARS = st.one_of(
    st.sampled_from([0, -1, -0.0, 1e308, 1e-320, 2**63, 2**70, -(2**63), float("nan"), float("inf"),
                     float("-inf"), "", "lots", "1e20", "0x10", "1_000", True, False, None, "~",
                     "$(touch pwned)", "a; id", "\u202e", "ä", "\n", [], {}, [1, 2], {"a": 1}]),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)


def log_uniform(lo: float, hi: float) -> st.SearchStrategy:
    return st.floats(math.log10(lo), math.log10(hi)).map(lambda e: float(f"{10 ** e:.4g}"))


def spec_strategy(junk: bool) -> st.SearchStrategy:
    """Specs of plausible values; with `junk`, any field may instead hold JUNK_SCALARS (about
    one draw in ten) and names, GPUs, laws and enums may be unknown or hostile."""

    def v(good: st.SearchStrategy) -> st.SearchStrategy:
        if not junk:
            return good
        return st.integers(0, 9).flatmap(lambda k: JUNK_SCALARS if k == 0 else good)

    def either(good, bad):
        return st.one_of(good, bad) if junk else good

    names = either(st.from_regex(r"[a-z0-9][a-z0-9._-]{0,20}", fullmatch=True), st.text(max_size=8))
    cluster_names = either(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,20}", fullmatch=True),
                           st.text(max_size=8))

    budgets = st.one_of(
        st.fixed_dictionaries({"flops": v(log_uniform(1e9, 1e24))}),
        st.fixed_dictionaries({"gpu_hours": v(log_uniform(1e-4, 1e5))}),
        st.fixed_dictionaries({"days": v(log_uniform(1e-5, 30))}),
        *([st.fixed_dictionaries({"flops": log_uniform(1e9, 1e26), "days": log_uniform(1e-4, 100)}),
           st.just({})] if junk else []))

    custom_gpu = st.fixed_dictionaries({"name": cluster_names, "bf16_tflops": v(log_uniform(0.1, 5000)),
                                        "memory_gb": v(log_uniform(0.5, 500))})
    gpus = either(st.one_of(st.sampled_from(sorted(hardware.CATALOG)), custom_gpu), st.just("tpu-v9"))

    hardware_spec = st.fixed_dictionaries({}, optional={
        "gpu": gpus,
        "gpus_per_node": v(st.integers(1, 16)),
        "nodes": v(st.integers(1, 64)),
        "mfu": v(st.floats(0.05, 0.9)),
        "usd_per_gpu_hour": v(st.floats(0, 10)),
        "cpus_per_gpu": v(st.integers(1, 32)),
    })

    ffns = st.one_of(
        st.fixed_dictionaries({"llama3_multiplier": v(st.floats(0.5, 4)),
                               "multiple_of": v(st.sampled_from([1, 8, 32, 256, 1024]))}),
        st.fixed_dictionaries({"ratio": v(st.floats(0.5, 8)),
                               "multiple_of": v(st.sampled_from([1, 8, 32, 256]))}))

    model_spec = st.fixed_dictionaries({}, optional={
        "vocab_size": v(st.integers(2, 200_000)),
        "seq_len": v(st.sampled_from([8, 64, 512, 2048, 8192])),
        "head_dim": v(st.sampled_from([8, 16, 32, 64, 128])),
        "kv_heads": v(st.sampled_from([1, 2, 4, 8])),
        "ffn": ffns,
        "rope_theta": v(log_uniform(100, 1e7)),
        "norm_eps": v(log_uniform(1e-8, 1e-2)),
        "tie_embeddings": v(st.booleans()),
    })

    def axis(lo: int, hi: int, unit: int, max_count: int) -> st.SearchStrategy:
        """An IntRange or a choice list of multiples of `unit`, at most max_count values, so
        planning stays in milliseconds (the size limit has its own test below)."""
        @st.composite
        def int_range(draw):
            start = draw(st.integers(lo, hi)) * unit
            step = draw(st.integers(1, 8)) * unit
            return {"min": start, "max": start + step * draw(st.integers(0, max_count - 1)), "step": step}
        choices = st.lists(st.integers(lo, hi).map(lambda k: k * unit), min_size=1, max_size=max_count)
        return st.one_of(int_range(), choices)

    laws_ = st.one_of(
        either(st.sampled_from(sorted(laws.CATALOG)), st.just("kaplan2020x")),
        st.fixed_dictionaries({"E": v(st.floats(0, 3)), "A": v(log_uniform(1, 1e4)),
                               "B": v(log_uniform(1, 1e5)), "alpha": v(st.floats(0.05, 1)),
                               "beta": v(st.floats(0.05, 1))}),
        st.fixed_dictionaries({"tokens_per_param": v(st.floats(0.1, 1000))}))

    bounds = st.fixed_dictionaries({}, optional={"min": v(log_uniform(1e-3, 1e12)),
                                                 "max": v(log_uniform(1e-3, 1e12))})
    if not junk:  # min ≤ max: still often infeasible for the budget, but not empty by itself
        bounds = bounds.map(lambda b: dict(zip(b, sorted(b.values()))) if len(b) == 2 else b)

    search_spec = st.fixed_dictionaries({}, optional={
        "layers": v(axis(1, 48, 1, 24)),
        "hidden": v(axis(1, 64, 64, 32)),
        "aspect": bounds,
        "scaling_law": laws_,
        "flops": either(st.sampled_from(["6N", "exact"]), st.just("4N")),
        "top_k": v(st.integers(1, 20)),
        "near_optimal": v(st.floats(0, 0.1)),
    })

    variants = st.lists(
        st.fixed_dictionaries({"name": names}, optional={
            "tokens_per_param": bounds, "params": bounds, "max_days": v(log_uniform(1e-6, 1e4)),
            "description": st.text(max_size=40) if junk else st.from_regex(r"[ -~]{0,40}", fullmatch=True),
        }),
        min_size=1 if not junk else 0, max_size=3, unique_by=None if junk else (lambda d: d["name"]))

    training_spec = st.fixed_dictionaries({}, optional={
        "global_batch_tokens": v(st.integers(1, 1 << 24)),
        "learning_rate": v(log_uniform(1e-6, 1)),
        "schedule": either(st.sampled_from(["cosine", "wsd"]), st.just("linear")),
        "warmup_frac": v(st.floats(0, 0.5)),
        "max_warmup_iters": v(st.integers(0, 10_000)),
        "activation_checkpointing": either(st.sampled_from(["auto", True, False]), st.just("sometimes")),
        "eval_interval": v(st.integers(1, 10_000)),
        "ckpt_interval": v(st.integers(1, 10_000)),
        "seed": v(st.integers(0, 2**31 - 1)),
    })

    cluster_spec = st.fixed_dictionaries({}, optional={
        "partition": cluster_names,
        "time_limit": either(st.from_regex(r"([0-9]{1,3}-)?[0-9]{1,3}:[0-9]{2}:[0-9]{2}", fullmatch=True),
                             st.text(max_size=10)),
        "signal_before_s": v(st.integers(10, 3600)),
    })

    required = {"name": names, "budget": v(budgets)}
    optional = {"hardware": hardware_spec, "model": model_spec, "search": search_spec,
                "cluster": cluster_spec, "training": training_spec}
    if junk:
        optional.update(variants=variants, typo_key=st.just(1))
    else:  # the default variants include a tokens-per-parameter band most random budgets miss
        required["variants"] = variants
    return st.fixed_dictionaries(required, optional=optional)


specs = st.one_of(spec_strategy(junk=False), spec_strategy(junk=True))


def edges(*values):
    return st.sampled_from(values)


# Valid specs at the edges of what the schema allows: where int64 counts overflow, floats
# underflow to zero and closed forms divide by it (each edge here once crashed the planner).
extreme_specs = st.fixed_dictionaries({
    "name": st.just("edge"),
    "budget": st.one_of(st.fixed_dictionaries({"flops": edges(1e-300, 1e6, 1e20, 1e32)}),
                        st.fixed_dictionaries({"gpu_hours": edges(1e-300, 1e-6, 1e9)}),
                        st.fixed_dictionaries({"days": edges(1e-300, 1e-6, 3650)})),
    "variants": st.just([{"name": "optimal"}]),
}, optional={
    "hardware": st.fixed_dictionaries({}, optional={
        "gpu": st.one_of(edges("cpu", "b200"), st.fixed_dictionaries({
            "name": st.just("g"), "bf16_tflops": edges(1e-3, 1e6), "memory_gb": edges(1e-300, 1e5),
            "default_mfu": edges(0.01, 1.0)})),
        "gpus_per_node": edges(1, 1024), "nodes": edges(1, 100_000), "mfu": edges(0.01, 1.0),
        "usd_per_gpu_hour": edges(0, 1e6), "cpus_per_gpu": edges(1, 1024),
        "host_memory_gb": edges(1e-300, 1e6)}),
    "model": st.fixed_dictionaries({}, optional={
        "vocab_size": edges(2, 10_000_000), "seq_len": edges(8, 1_048_576), "head_dim": edges(8, 1024),
        "kv_heads": edges(1, 1024), "rope_theta": edges(1e-300, 1e12), "norm_eps": edges(1e-300, 0.999999),
        "ffn": st.one_of(
            st.fixed_dictionaries({"llama3_multiplier": edges(1e-300, 64), "multiple_of": edges(1, 65536)}),
            st.fixed_dictionaries({"ratio": edges(1e-300, 64), "multiple_of": edges(1, 65536)}))}),
    "search": st.fixed_dictionaries({}, optional={
        "layers": edges([1], [1024], {"min": 1, "max": 1024, "step": 64}),
        "hidden": edges([8], [131072], [1024, 8192], {"min": 8, "max": 131072, "step": 8192}),
        "aspect": edges({}, {"min": 0, "max": 1e-300}, {"min": 1e300}),
        "scaling_law": st.one_of(
            edges("hoffmann2022", "besiroglu2024"),
            st.fixed_dictionaries({"E": edges(0, 100), "A": edges(1e-6, 1e6), "B": edges(1e-6, 1e6),
                                   "alpha": edges(0.05, 5), "beta": edges(0.05, 5)}),
            st.fixed_dictionaries({"tokens_per_param": edges(1e-3, 1e6)})),
        "flops": edges("6N", "exact"), "top_k": edges(1, 1000)}),
    "training": st.fixed_dictionaries({}, optional={
        "global_batch_tokens": edges(1, 1 << 40), "learning_rate": edges(1e-300, 1),
        "warmup_frac": edges(0, 0.999999), "max_warmup_iters": edges(0, 1_000_000),
        "decay_frac": edges(1e-300, 1), "eval_interval": edges(1, 10_000_000),
        "ckpt_interval": edges(1, 10_000_000), "keep_last_ckpts": edges(1, 1000)}),
})


# --- the properties ----------------------------------------------------------------------------

def finite_numbers(value, path="plan"):
    if isinstance(value, float):
        assert math.isfinite(value), f"{path} = {value}"
    elif isinstance(value, dict):
        for k, v in value.items():
            finite_numbers(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            finite_numbers(v, f"{path}[{i}]")


def assert_sane_plan(plan, text: str, render: bool = True):
    finite_numbers(plan.model_dump(mode="python"))
    for v in plan.variants:
        c, t = v.choice, v.training
        assert c.n_params > 0 and c.tokens > 0 and c.shape.n_layers >= 1
        assert t.max_iters >= 1 and t.micro_batch_size >= 1 and t.grad_accum >= 1
        # docs/CONTRACT.md: accumulation = global / (data ranks · micro); the ranks of a
        # tensor-parallel group share their sequences, so world / t data ranks
        data_ranks = t.world_size // t.tensor_parallel
        assert t.global_batch_size == t.micro_batch_size * t.grad_accum * data_ranks, t
        assert 0 <= t.warmup_iters <= t.max_iters
        # a time budget is the expected wall clock: never overrun by more than the last whole
        # step's share of it (compiler/timebudget.py), 1e-6 for its fixed point
        budget, tm = plan.spec["budget"], v.timing
        wall_s = (budget["days"] * 86400 if budget.get("days") is not None else
                  budget["gpu_hours"] * 3600 / t.world_size if budget.get("gpu_hours") is not None
                  else math.inf)
        one_step = tm.wall_clock_days * 86400 / t.max_iters
        assert tm.wall_clock_days * 86400 <= wall_s * (1 + 1e-6) + one_step, (budget, tm)
    if render:
        files = render_files(plan, text)
        for rel, data in files.items():
            if rel.startswith("config/"):
                for node in ast.parse(data.decode("utf-8")).body:
                    assert isinstance(node, ast.Assign), (rel, ast.dump(node))
                    ast.literal_eval(node.value)


def outcome(text: str, render: bool = True) -> str:
    """'plan' or 'user error'; anything else raised propagates and fails the test."""
    try:
        spec = parse_spec_text(text, "gen.yaml")
        plan = build_plan(spec)
    except UserError as exc:
        assert exc.message and exc.render().startswith("error: ")
        assert exc.where or exc.field, exc.render()  # it says where
        event("user error")  # `pytest --hypothesis-show-statistics` shows the mix
        return "user error"
    assert_sane_plan(plan, text, render)
    event("plan")
    return "plan"


@settings(max_examples=250, **PROFILE)
@given(specs)
def test_generated_specs_plan_or_fail_cleanly(spec):
    text = yaml.safe_dump(spec, allow_unicode=True, sort_keys=False)
    outcome(text)


@settings(max_examples=200, **PROFILE)
@given(extreme_specs)
def test_specs_at_the_schema_edges_plan_or_fail_cleanly(spec):
    outcome(yaml.safe_dump(spec, sort_keys=False))


@settings(max_examples=120, **PROFILE)
@given(st.data())
def test_mutated_valid_spec_plans_or_fails_cleanly(data):
    # Random edits of a valid spec: YAML syntax errors, retyped values, broken indentation.
    text = TINY_TEXT
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(text)))
        edit = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        chunk = data.draw(st.one_of(st.sampled_from(list(":-{}[],&*!|>'\"#%@` \t\n?0.9e")),
                                    st.text(min_size=1, max_size=3)))
        if edit == "insert":
            text = text[:i] + chunk + text[i:]
        elif edit == "delete":
            text = text[:i] + text[i + len(chunk):]
        else:
            text = text[:i] + chunk + text[i + len(chunk):]
    outcome(text)


@settings(max_examples=150, **PROFILE)
@given(st.text(max_size=300))
def test_arbitrary_text_is_a_spec_or_a_user_error(text):
    outcome(text, render=False)


@settings(max_examples=200, **PROFILE)
@given(layers=st.tuples(st.integers(1, MAX_LAYERS), st.integers(1, MAX_LAYERS), st.integers(1, 64)),
       hidden=st.tuples(st.integers(1, MAX_D_MODEL), st.integers(1, MAX_D_MODEL), st.integers(1, 4096)))
def test_search_space_refused_by_its_size_before_enumeration(layers, hidden):
    # Validation alone (no enumeration) decides, and the refusal quotes the size.
    (l_lo, l_hi), l_step = sorted(layers[:2]), layers[2]
    (h_lo, h_hi), h_step = sorted(hidden[:2]), hidden[2]
    size = len(range(l_lo, l_hi + 1, l_step)) * len(range(h_lo, h_hi + 1, h_step))
    text = yaml.safe_dump({"name": "x", "budget": {"flops": 1e20},
                           "search": {"layers": {"min": l_lo, "max": l_hi, "step": l_step},
                                      "hidden": {"min": h_lo, "max": h_hi, "step": h_step}}})
    if size > MAX_CANDIDATES:
        with pytest.raises(UserError) as info:
            parse_spec_text(text)
        assert f"{size:,} shapes" in info.value.message
    else:
        search = parse_spec_text(text).search
        assert search.layers.count() * search.hidden.count() == size


@settings(max_examples=15, **PROFILE)
@given(specs)
def test_generated_specs_through_the_cli(tmp_path_factory, spec):
    work = tmp_path_factory.mktemp("cli")
    path = work / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    result = run_cli_forked(["compile", path, "-o", work / "out"], cwd=work, timeout=60)
    assert not result.timed_out
    assert result.returncode in (0, 2), result.stderr
    assert "Traceback" not in result.stderr
    if result.returncode == 2:
        assert result.stderr.startswith("error: ") and str(path) in result.stderr
        assert not (work / "out").exists()
    else:
        assert run_cli_forked(["check", work / "out"], cwd=work).returncode == 0


# --- metrics.jsonl: whatever a run, a crash or a hand left there, calibrate reads it or says why


def record_strategy(good_start: dict) -> st.SearchStrategy:
    """metrics.jsonl records: train.py's kinds (its real start record among them), each field
    plausible (speeds near the tiny plan's 60k tokens/s) or, one draw in eight, junk."""
    def v(good):
        return st.integers(0, 7).flatmap(lambda k: JUNK_SCALARS if k == 0 else good)
    times = st.floats(1.7e9, 1.8e9)
    config = st.fixed_dictionaries({}, optional={k: v(st.just(good_start["config"][k]))
                                                 for k in good_start["config"]})
    start = st.fixed_dictionaries(
        {"event": st.just("start")},
        optional={"step": v(st.integers(0, 50)), "world_size": v(st.integers(1, 4)),
                  "ranks_per_node": v(st.integers(1, 4)),
                  "resumed_from": v(st.sampled_from(["", "x"])), "grad_accum": v(st.integers(1, 4)),
                  "config": v(config), "time": v(st.text(max_size=5)), "unix_time": v(times)})
    timed = st.fixed_dictionaries(
        {"event": st.sampled_from(["first_step", "requeue"])},
        optional={"step": v(st.integers(0, 50)), "unix_time": v(times),
                  "slurm_job_id": v(st.sampled_from(["7", "8", None]))})
    logged = st.fixed_dictionaries(
        {"step": v(st.integers(0, 2000))},
        optional={"loss": v(st.floats(0, 10)), "tokens_per_s": v(st.floats(5e3, 1e5)),
                  "step_time_s": v(st.floats(1e-3, 10)), "unix_time": v(times),
                  "val_loss": v(st.floats(0, 10)), "eval_time_s": v(st.floats(1e-4, 100)),
                  "max_rss": v(st.floats(1e6, 1e10)), "mfu": v(st.floats(0, 1))})
    other = st.fixed_dictionaries(
        {"event": v(st.sampled_from(["checkpoint", "benchmark", "stopped_nonfinite", "skipped"]))},
        optional={"step": v(st.integers(0, 50)), "seconds": v(st.floats(0, 100)),
                  "bytes": v(st.integers(0, 10**9)), "world_size": v(st.integers(1, 4)),
                  "tokens_per_s": v(st.floats(1, 1e6)), "step_time_s": v(st.floats(1e-3, 10)),
                  "steps": v(st.integers(1, 20)), "shape": v(st.just({})),
                  "layout": v(st.just({"parallelism": "none"}))})
    return st.one_of(st.just(good_start), start, timed, logged, logged, other)


@pytest.fixture(scope="module")
def calibration_repo(tmp_path_factory):
    """The tiny spec's repo, its plan's real start record (no training: records are drawn), and
    the spec with `hardware.calibration` that a drawn run's calibration goes through."""
    from llama3gen.cli import main
    work = tmp_path_factory.mktemp("calibrate")
    tiny = (Path(__file__).resolve().parents[1] / "specs" / "tiny-cpu.yaml").read_text()
    assert main(["compile", str(Path(__file__).resolve().parents[1] / "specs" / "tiny-cpu.yaml"),
                 "-o", str(work / "repo")]) == 0
    config = {}
    exec((work / "repo" / "config" / "optimal.py").read_text(), {}, config)
    start = {"event": "start", "step": 0, "world_size": 2, "ranks_per_node": 2, "resumed_from": "",
             "device": "cpu", "grad_accum": 1, "time": "2026-01-01T00:00:00Z",
             "config": {k: v for k, v in config.items() if not k.startswith("_")}}
    assert "\n  nodes: 1\n" in tiny
    spec = tiny.replace("\n  nodes: 1\n", "\n  nodes: 1\n  calibration: calibration.json\n")
    return work, start, spec


@settings(max_examples=300, **PROFILE)
@given(data=st.data())
def test_any_metrics_file_calibrates_or_fails_cleanly(calibration_repo, data):
    """calibrate, its report and its figure, on records drawn around train.py's: a UserError, or a
    calibration that a spec takes and plans and renders with."""
    from llama3gen import calibrate
    from llama3gen.figure import calibration_figure
    work, start, spec = calibration_repo
    records = data.draw(st.lists(record_strategy(start), max_size=25))
    if data.draw(st.booleans()):  # as train.py begins every file
        records.insert(0, start)
    run_dir = work / "repo" / "out" / "drawn"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    try:
        doc, _, _ = calibrate.calibrate(run_dir)
    except UserError as exc:
        assert exc.message and exc.where, exc.render()
        event("user error")
        return
    event("calibration")
    assert calibrate.report(doc)
    calibration_figure(calibrate.plan_record(doc, "c.json"))
    calibrate.write_calibration(work / "calibration.json", doc)
    try:  # a plan, or a refusal that says why (a drawn peak memory can leave nothing that fits)
        plan = build_plan(parse_spec_text(spec, str(work / "calibrated.yaml"), work))
    except UserError as exc:
        assert exc.message and (exc.where or exc.field), exc.render()
        event("plan refused")
        return
    event("planned")
    render_files(plan, spec)


@pytest.fixture(scope="module")
def sweep_repo_configs(tmp_path_factory):
    """A compiled sweep repo (test_sweep's spec; nothing trained) and its runs' configs."""
    from llama3gen.cli import main
    from test_sweep import SWEEP_LINE, SWEEP_SEARCH
    work = tmp_path_factory.mktemp("fit")
    (work / "sweep.yaml").write_text(SWEEP_SEARCH + SWEEP_LINE)
    assert main(["compile", str(work / "sweep.yaml"), "-o", str(work / "repo")]) == 0
    configs = {}
    for path in sorted((work / "repo" / "config" / "sweep").glob("*.py")):
        exec(path.read_text(), {}, configs.setdefault(path.stem, {}))
    return work / "repo", configs


@settings(max_examples=40, **PROFILE)
@given(data=st.data())
def test_any_sweep_records_fit_or_fail_cleanly(sweep_repo_configs, data):
    """`llama3gen fit REPO` on sweep runs whose start records override settings with junk and
    whose final losses are drawn (flat, noisy, tiny): a fit, or a UserError, nothing else."""
    from llama3gen import fit
    repo, configs = sweep_repo_configs

    def maybe_junk(good):
        return st.integers(0, 9).flatmap(lambda k: JUNK_SCALARS if k == 0 else good)
    overrides = st.dictionaries(st.sampled_from(fit.CONFIG_KEYS), JUNK_SCALARS, max_size=2)
    for config in configs.values():
        records = [{"event": "start", "config": {**config, **data.draw(overrides)}},
                   {"step": data.draw(maybe_junk(st.just(config["max_iters"]))),
                    "val_loss": data.draw(maybe_junk(st.floats(1.0, 4.0))),
                    "epoch": data.draw(maybe_junk(st.floats(0, 3)))}]
        out = repo / config["out_dir"]
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    try:
        runs, excluded = fit.select_runs(*fit.read_repo(str(repo)), 0, str(repo))
        result = fit.fit(runs, excluded, target_flops=fit.repo_target(str(repo)), bootstrap=5,
                         sources=str(repo))
    except UserError as exc:
        assert exc.message and exc.where, exc.render()
        event("user error")
        return
    event("fit")
    assert fit.report(result) and fit.fit_svg(result)
    json.dumps(result.to_json())


def _plan_paths(value, prefix=()):
    """Where a lock's plan holds values: every key path, the first 3 items of a list."""
    yield prefix
    items = value.items() if isinstance(value, dict) else enumerate(value[:3]) \
        if isinstance(value, list) else ()
    for key, item in items:
        yield from _plan_paths(item, (*prefix, key))


@settings(max_examples=150, **PROFILE)
@given(data=st.data())
def test_a_hand_edited_lock_is_read_or_refused_cleanly(calibration_repo, sweep_repo_configs,
                                                        data):
    """calibrate, fit and submit --dry-run read the lock's plan: with junk anywhere in it, they
    work or say which field is wrong, nothing else."""
    from llama3gen import calibrate, fit, submit
    work, start, _ = calibration_repo
    run_dir = work / "repo" / "out" / "edited-lock"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [start] + [
        {"step": 10 * i, "loss": 3.0, "tokens_per_s": 50000.0, "step_time_s": 0.08}
        for i in range(1, 6)]))
    repo = data.draw(st.sampled_from([work / "repo", sweep_repo_configs[0]]))
    path = repo / "llama3gen.lock.json"
    original = path.read_text()
    lock = json.loads(original)
    for _ in range(data.draw(st.integers(1, 3))):  # paths drawn from the plan as edited so far
        where = data.draw(st.sampled_from([p for p in _plan_paths(lock["plan"]) if p]))
        parent = lock["plan"]
        for key in where[:-1]:
            parent = parent[key]
        parent[where[-1]] = data.draw(JUNK_SCALARS)
    path.write_text(json.dumps(lock))
    try:
        if repo == work / "repo":
            calibrate.calibrate(run_dir)
            submit.submit(repo, None, dry_run=True, use_sbatch=True)
        else:
            fit.select_runs(*fit.read_repo(str(repo)), 0, str(repo))
            fit.repo_target(str(repo))
        event("read")
    except UserError as exc:
        assert exc.message and exc.where, exc.render()
        event("refused")
    finally:
        path.write_text(original)
