"""`llama3gen calibrate RUN_DIR`: what a run measured against what its plan predicted, and the
calibration file through which the next plan uses the measurement.

RUN_DIR is a run's out_dir (train.py's metrics.jsonl, docs/CONTRACT.md "metrics.jsonl") inside a
generated repo; the repo's llama3gen.lock.json holds the plan. The measurement is the run's
`--benchmark_iters` record when it has one, else the median of its logged steps after the first
WARMUP_RECORDS (compilation and warm-up). A spec names the file as `hardware: {calibration: FILE}`:
the plan's step-time model then computes at the kernel efficiency with which it gives the step
time the run measured, for the run's own shape, layout and ranks (evaluate.calibrated_view), so the
same run re-planned runs at the measured speed, and another shape, layout or cluster size gets
its own FLOPs and communication on top. Every variant's timing.mfu_source cites the file and the
run, and says when the measurement came from another shape or layout. Where the model cannot
reproduce the run (a file without its layout; communication the model times slower than the
whole measured step), the measured MFU replaces the model, as a spec's hardware.mfu does.

The run's checkpoint saves, its restarts and its unexpected interruptions (processes that died
with no record of why and were resumed) set the next plan's write bandwidth, restart time and
failure rate (compiler/goodput.py), where the spec sets none; its timed evaluations, the share
of a step an evaluated batch takes (trainplan.evaluation_share). compiler/runlog.py reads those
from the records.

Only the standard library and the compiler's own modules: no torch.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from types import SimpleNamespace

from . import __version__, arch, memory
from .hardware import MIN_MFU
from .errors import UserError
from .jsonfile import read_json, whole_number, write_own_file
from .runlog import (EVALUATION_RATIO, checkpoint_saves, finite_number, is_positive,
                     measured_evaluations, measured_failures, measured_goodput, measured_restarts,
                     split_processes, start_config, text_or_none, usable_evaluation_ratio,
                     whole_or_none)

COMMAND = "llama3gen calibrate"  # in the refusals of write_own_file

KIND = "llama3gen calibration"
FORMAT = 1
METRICS = "metrics.jsonl"
LOCK_NAME = "llama3gen.lock.json"
WARMUP_RECORDS = 3  # logged records left out without a benchmark record (compile, warm-up)
CURVE_POINTS = 200  # per curve in a calibration file: a point per ~2 pixels of a figure panel
SHAPE_KEYS = ("n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "ffn_hidden", "vocab_size",
              "tie_embeddings", "block_size")


def _error(message: str, where: str, fix: str) -> UserError:
    return UserError(message, where=where, fix=fix)


# --- reading the run --------------------------------------------------------------------------


def find_repo(run_dir: Path) -> Path:
    """The generated repo holding run_dir: the nearest directory upwards with a lock file."""
    for d in (run_dir, *run_dir.parents):
        if (d / LOCK_NAME).is_file():
            return d
    raise _error(f"not inside a generated repo: no {LOCK_NAME} in it or any directory above",
                 str(run_dir), "pass a run's out_dir inside the repo `llama3gen compile` wrote, "
                 "e.g. REPO/out/<variant>")


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl's records. A last line cut short by a crash is left out; any other line
    that is not a JSON object is an error naming it."""
    path = run_dir / METRICS
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise _error(f"no {METRICS} here", str(run_dir),
                     "pass the out_dir of a run of train.py (it writes out_dir/metrics.jsonl); "
                     "e.g. run `python train.py config/<variant>.py --benchmark_iters=20` first") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _error(f"cannot read {METRICS}: {exc}", str(path), "check the file") from None
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            if number == len(lines):
                break
            raise _error(f"line {number} is not a JSON object", str(path),
                         "metrics.jsonl holds one JSON object per line, as train.py writes it")
        records.append(record)
    return records


def _train_state_config(run_dir: Path) -> dict:
    """The config saved in the run's newest checkpoint (train_state.json), or {}."""
    for state in sorted((run_dir / "checkpoints").glob("step_*/train_state.json"), reverse=True):
        try:
            config = json.loads(state.read_text(encoding="utf-8")).get("config")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(config, dict):
            return config
    return {}


def measure(run_dir: Path, records: list[dict]) -> dict:
    """What the run measured: the last benchmark record, else the median of one process's logged
    steps after its first WARMUP_RECORDS: the last process that logged more than those (a
    process resumed a moment ago logs little but its own warm-up), else the one that logged most."""
    segments = split_processes(records)
    benchmarks = [r for r in records if r.get("event") == "benchmark"
                  and is_positive(r.get("tokens_per_s")) and is_positive(r.get("step_time_s"))]
    if benchmarks:
        bench = benchmarks[-1]
        start = next((seg[0] for seg in segments
                      if bench in seg and seg[0].get("event") == "start"), {})
        return _benchmarked(run_dir, bench, start)
    logged = [([r for r in seg if "event" not in r and is_positive(r.get("tokens_per_s"))],
               seg[0] if seg[0].get("event") == "start" else {}) for seg in segments]
    settled = [(steps, start) for steps, start in logged if len(steps) > WARMUP_RECORDS]
    steps, start = (settled[-1] if settled
                    else max(reversed(logged), key=lambda pair: len(pair[0]), default=([], {})))
    if steps:
        return _logged(run_dir, steps, start)
    raise _error(f"{METRICS} has no logged training steps (no record with tokens_per_s)",
                 str(run_dir / METRICS), "train for at least one log_interval, or run "
                 "train.py with --benchmark_iters=N")


def _benchmarked(run_dir: Path, bench: dict, start: dict) -> dict:
    """measure() of a --benchmark_iters record (and the start record of its process)."""
    config = start_config(start) or _train_state_config(run_dir)
    return {"tokens_per_second": bench["tokens_per_s"], "step_time_s": bench["step_time_s"],
            "mfu": _measured(bench.get("mfu")),
            "peak_memory_bytes": _peak([bench]),
            "peak_memory_allocated_bytes": _measured(bench.get("max_memory_allocated")),
            "how": f"benchmark record: {whole_or_none(bench.get('steps'))} timed steps",
            "world_size": whole_or_none(bench.get("world_size")),
            "ranks_per_node": _ranks_per_node(bench), "device": _device(bench),
            "gpu": text_or_none(bench.get("gpu")),
            "shape": _usable_shape(bench.get("shape")) or _shape(config),
            "layout": _usable_layout(bench.get("layout")) or _layout(config, start),
            "date": text_or_none(bench.get("time")) or text_or_none(start.get("time")),
            "config": config}


def _logged(run_dir: Path, logged: list[dict], start: dict) -> dict:
    """measure() of one process's logged steps: the median after the warm-up records."""
    kept = logged[min(WARMUP_RECORDS, len(logged) - 1):]
    config = start_config(start) or _train_state_config(run_dir)
    tokens_per_step = (whole_or_none(config.get("global_batch_size")) or 0) * (
        whole_or_none(config.get("block_size")) or 0)

    def median(key):  # of the records' values, where every one is a number > 0
        values = [r.get(key) for r in kept]
        return statistics.median(values) if values and all(map(is_positive, values)) else None
    tokens_per_second = median("tokens_per_s")
    step_time = median("step_time_s") or _measured(tokens_per_step / tokens_per_second
                                                    if tokens_per_step else None)
    allocated = [_measured(r.get("max_memory_allocated")) for r in logged]
    steps = [r.get("step") for r in kept]
    return {"tokens_per_second": tokens_per_second, "step_time_s": step_time,
            "mfu": median("mfu"),
            "peak_memory_bytes": _peak(logged),
            "peak_memory_allocated_bytes": max([p for p in allocated if p is not None],
                                               default=None),
            "how": (f"median of {len(kept)} logged records (steps {steps[0]}-{steps[-1]}; the "
                    f"first {len(logged) - len(kept)} left out as warm-up)"),
            "world_size": whole_or_none(start.get("world_size")),
            "ranks_per_node": _ranks_per_node(start), "device": _device(start),
            "gpu": text_or_none(start.get("gpu")), "shape": _shape(config),
            "layout": _layout(config, start), "date": text_or_none(start.get("time")),
            "config": config}


def _device(record: dict) -> str | None:
    return record.get("device") if record.get("device") in ("cuda", "cpu") else None


def _ranks_per_node(record: dict) -> int | None:
    """A record's ranks per node where it holds a count that fills whole nodes (older train.py
    versions record none)."""
    world, per_node = record.get("world_size"), record.get("ranks_per_node")
    return per_node if whole_number(world) and whole_number(per_node) and world % per_node == 0 else None


def restart_seconds(doc: dict, file: str) -> tuple[float, str] | None:
    """(seconds, where) of the calibration run's measured restarts, for goodput; None: none."""
    restarts = doc.get("restarts")
    if not restarts:
        return None
    return restarts["seconds"], (f"calibration {file}: run {doc['measured_on'].get('run')}'s "
                                 f"restarts ({restarts['how']})")


def failures_seen(doc: dict, file: str) -> tuple[int, float, str] | None:
    """(interruptions, device-hours, where) of the calibration run, for goodput's failure rate;
    None where the file records no timed training (an older file)."""
    failures = doc.get("failures")
    if not failures:
        return None
    return (failures["interruptions"], failures["device_hours"],
            f"calibration {file}: run {doc['measured_on'].get('run')}")


def save_bandwidth(doc: dict, file: str) -> tuple[float, str] | None:
    """(GB/s per device, where) of the calibration run's checkpoint saves, for goodput's write
    time; None where the file records none."""
    saves = doc.get("checkpoint")
    if not saves:
        return None
    return saves["GBps_per_device"], (f"calibration {file}: run {doc['measured_on'].get('run')}'s "
                                      f"checkpoint saves ({saves['how']})")


def _measured(value) -> float | None:
    """A measured size, speed or time: a number > 0, else None (not recorded, or edited)."""
    return float(value) if is_positive(value) else None


def _peak(records: list[dict]) -> float | None:
    """The largest peak the records measured: CUDA's reserved bytes, else (CPU) the peak RSS."""
    for key in ("max_memory_reserved", "max_rss"):
        values = [_measured(r.get(key)) for r in records]
        if any(v is not None for v in values):
            return max(v for v in values if v is not None)
    return None


def peak_memory_ratio(doc: dict, plan, layout_memory) -> tuple[float | None, float | None]:
    """(measured / predicted peak, predicted) for the run's own shape and layout: what the memory
    model misses on this machine. On CUDA the predicted total less the CUDA context, which
    max_memory_reserved does not see; on CPU the RSS includes the process, as the total does."""
    m = doc["measured_on"]
    if (doc.get("peak_memory_bytes") is None or not m.get("shape") or not m.get("layout")
            or m.get("device") is None):  # which peak (RSS or CUDA's) is not known
        return None, None
    predicted = layout_memory(m["shape"], m["layout"], m["world_size"], m["device"],
                              m.get("ranks_per_node"))
    if m["device"] == "cuda":
        predicted -= memory.CUDA_CONTEXT_BYTES
    return doc["peak_memory_bytes"] / predicted, predicted


def run_layout_memory(plan):
    """memory.py's total for a run's shape and layout (calibration's own fields), on its nodes
    (ranks_per_node; not recorded: the plan's): a function for peak_memory_ratio."""
    def total(shape, layout, world, device, ranks_per_node):
        model = memory.ModelShape(shape["n_layer"], shape["n_embd"], shape["n_head"],
                                  shape["n_kv_head"], shape["head_dim"], shape["ffn_hidden"],
                                  shape["vocab_size"], shape["block_size"],
                                  bool(shape.get("tie_embeddings")))
        parallelism = layout["parallelism"] if layout["parallelism"] != "none" else "ddp"
        return float(memory.memory_per_device(
            model, layout["micro_batch_size"], parallelism=parallelism, world_size=world or 1,
            gpus_per_node=ranks_per_node or min(plan.hardware.gpus_per_node, world or 1),
            activation_checkpointing=checkpointed_blocks(layout, shape["n_layer"]),
            grad_accum=layout.get("grad_accum") or 1, device=device,
            compute_dtype=layout.get("dtype"),
            tensor_parallel=layout.get("tensor_parallel") or 1,
            compiled=bool(layout.get("compile"))).total)
    return total


def checkpointed_blocks(layout: dict, n_layer: int) -> int:
    """How many blocks a layout record checkpoints, as train.py reads its config: with
    activation_checkpointing the first checkpointed_layers (0, or a record from before that
    setting: all), else none."""
    if not layout.get("activation_checkpointing"):
        return 0
    return int(layout.get("checkpointed_layers") or n_layer)


def calibration_run(doc: dict) -> SimpleNamespace | None:
    """The calibration run as the step-time model takes it (evaluate.calibrated_view), or
    None where the file lacks its shape, layout or step time: shape (memory.ModelShape of one),
    world_size, ranks_per_node (None: not recorded), parallelism, tensor_parallel, micro_batch,
    per_rank (sequences per data rank and step), checkpointing (False, True or the number of
    leading blocks), compiled, step_seconds, peak_flops (the run's device's; None: not
    recorded)."""
    import numpy as np  # here: `calibrate` itself stays free of numpy
    m = doc["measured_on"]
    shape, layout, step = m.get("shape"), m.get("layout"), finite_number(doc.get("step_time_s"))
    if not shape or not layout or not step or not layout.get("micro_batch_size"):
        return None
    n_layer = shape["n_layer"]
    blocks = checkpointed_blocks(layout, n_layer)
    micro = layout["micro_batch_size"]
    return SimpleNamespace(
        shape=memory.ModelShape(*(np.array([shape[k]]) for k in SHAPE_KEYS[:7]),
                                np.array([shape["block_size"]]), bool(shape.get("tie_embeddings"))),
        world_size=m.get("world_size") or 1, ranks_per_node=m.get("ranks_per_node"),
        parallelism="ddp" if layout["parallelism"] == "none" else layout["parallelism"],
        tensor_parallel=layout.get("tensor_parallel") or 1, micro_batch=micro,
        per_rank=micro * (layout.get("grad_accum") or 1),
        checkpointing=blocks == n_layer if blocks in (0, n_layer) else blocks,
        compiled=bool(layout.get("compile")), step_seconds=step,
        peak_flops=finite_number(m.get("peak_flops")))


def _usable_shape(shape) -> dict | None:
    """A run's shape record where the step-time and memory models can take it, else None."""
    return shape if shape is not None and _run_problem(shape, None) is None else None


def _usable_layout(layout) -> dict | None:
    """A run's layout record where the step-time and memory models can take it, else None."""
    return layout if layout is not None and _run_problem(None, layout) is None else None


def _shape(config: dict) -> dict | None:
    return _usable_shape({k: config.get(k) for k in SHAPE_KEYS})


def _layout(config: dict, start: dict) -> dict | None:
    if not config:
        return None
    world = whole_or_none(start.get("world_size")) or 1
    return _usable_layout({
        "parallelism": config.get("parallelism") if world > 1 else "none",
        "global_batch_size": config.get("global_batch_size"),
        "micro_batch_size": config.get("micro_batch_size"), "grad_accum": start.get("grad_accum"),
        "activation_checkpointing": config.get("activation_checkpointing"),
        "checkpointed_layers": config.get("checkpointed_layers", 0),
        "compile": config.get("compile"),
        # as train.py's benchmark record says it: CPU always trains in float32
        "dtype": "float32" if _device(start) == "cpu" else config.get("dtype"),
        "tensor_parallel": config.get("tensor_parallel", 1)})


# --- the plan it is compared with -------------------------------------------------------------


def _plan_shape(variant) -> dict:
    s = variant.choice.shape
    return {"n_layer": s.n_layers, "n_embd": s.d_model, "n_head": s.n_heads,
            "n_kv_head": s.n_kv_heads, "head_dim": s.head_dim, "ffn_hidden": s.ffn_hidden,
            "vocab_size": s.vocab_size, "tie_embeddings": s.tie_embeddings, "block_size": s.seq_len}


def _plan_layout(variant) -> dict:
    t = variant.training
    return {"parallelism": t.parallelism if t.world_size > 1 else "none",
            "global_batch_size": t.global_batch_size, "micro_batch_size": t.micro_batch_size,
            "grad_accum": t.grad_accum, "activation_checkpointing": t.activation_checkpointing,
            "checkpointed_layers": t.checkpointed_layers,
            "compile": t.compile, "dtype": t.dtype, "tensor_parallel": t.tensor_parallel}


def pick_variant(plan, measured: dict, repo: Path, run_dir: Path, name: str | None):
    """The plan's variant the run trained: --variant, else the one of the run's shape, else the
    one whose out_dir (out/<variant>) the run wrote."""
    by_name = {v.name: v for v in plan.variants}
    if name is not None:
        if name not in by_name:
            raise _error(f"--variant {name!r} is not a variant of plan {plan.name}", str(repo),
                         f"one of: {', '.join(by_name)}")
        return by_name[name]
    same_shape = [v for v in plan.variants if measured["shape"] == _plan_shape(v)]
    if len(same_shape) == 1:
        return same_shape[0]
    out_dir = (measured["config"] or {}).get("out_dir")
    for v in same_shape or plan.variants:
        if out_dir == f"out/{v.name}" or run_dir.resolve() == (repo / "out" / v.name).resolve():
            return v
    if len(plan.variants) == 1:
        return plan.variants[0]
    raise _error("cannot tell which variant this run trained (its shape and out_dir match none, "
                 "or several)", str(run_dir), f"pass --variant, one of: {', '.join(by_name)}")


def shape_text(shape: dict | None) -> str:
    if not shape:
        return "an unrecorded shape"
    return (f"{shape['n_layer']}L × d {shape['n_embd']} ({shape['n_head']}/{shape['n_kv_head']} "
            f"heads × {shape['head_dim']}, FFN {shape['ffn_hidden']}, V {shape['vocab_size']}, "
            f"T {shape['block_size']})")


def layout_text(world, layout: dict | None) -> str:
    if not layout:
        return f"{world} rank(s)"
    ac = ""
    if layout.get("activation_checkpointing"):
        blocks = layout.get("checkpointed_layers")
        ac = ", activation checkpointing" + (f" of {blocks} blocks" if blocks else "")
    compiled = ", compiled" if layout.get("compile") else ""
    return (f"{world} rank(s) {layout.get('parallelism')}, micro-batch "
            f"{layout.get('micro_batch_size')} × accum {layout.get('grad_accum')}{ac}{compiled}")


# --- calibrate ---------------------------------------------------------------------------------


def _namespace(value):
    if isinstance(value, dict):
        return SimpleNamespace(**{k: _namespace(v) for k, v in value.items()})
    return [_namespace(v) for v in value] if isinstance(value, list) else value


def _read_plan(repo: Path):
    """The lock's plan, read for the fields used here only (attribute access, as on a Plan), so
    that a repo compiled by another llama3gen version with other plan fields still reads."""
    from .render import read_lock_plan
    plan = _namespace(read_lock_plan(repo))
    try:
        for v in plan.variants:
            v.name, v.choice.shape.n_layers, v.choice.loss, v.memory.total, v.training.world_size
            v.timing.tokens_per_second, v.timing.mfu, v.timing.step_seconds, v.timing.mfu_source
        plan.name, plan.hardware.peak_tflops, plan.hardware.gpu
    except (AttributeError, TypeError) as exc:
        raise _error(f"{LOCK_NAME} holds no plan this llama3gen can read ({exc})",
                     str(repo / LOCK_NAME), "re-compile the repo with this llama3gen") from None
    return plan


def calibrate(run_dir: Path, variant_name: str | None = None) -> tuple[dict, object, object]:
    """(calibration document, plan, variant) for the run in run_dir."""
    if not run_dir.is_dir():
        raise _error("not a directory", str(run_dir), "pass a run's out_dir, e.g. REPO/out/<variant>")
    run_dir = run_dir.resolve()
    repo = find_repo(run_dir)
    records = read_metrics(run_dir)
    plan = _read_plan(repo)
    measured = measure(run_dir, records)
    variant = pick_variant(plan, measured, repo, run_dir, variant_name)
    measured["mfu"] = _run_mfu(measured, plan, run_dir)
    doc = _document(measured, plan, variant, f"{plan.name}:{run_dir.relative_to(repo).as_posix()}",
                    run_dir)
    doc["speed"] = implied_efficiency(doc, plan)
    doc["loss"] = final_loss(records, variant.training.max_iters, variant.choice.loss,
                             plan.law.name)
    ratio, predicted = peak_memory_ratio(doc, plan, run_layout_memory(plan))
    doc["peak_memory"] = {
        "how": ("torch.cuda.max_memory_reserved" if measured["device"] == "cuda"
                else "the process's peak resident set (Linux VmHWM)"),
        "predicted_for_the_run_bytes": predicted, "measured_over_predicted": ratio}
    doc["checkpoint"] = checkpoint_saves(records)
    doc["restarts"] = measured_restarts(records)
    doc["failures"] = measured_failures(records)
    doc["goodput"] = measured_goodput(records)
    doc["evaluation"] = measured_evaluations(records, measured["config"].get("eval_iters"),
                                             doc["step_time_s"], calibration_run(doc))
    _refuse_unusable_evaluation(doc["evaluation"], run_dir)
    doc["curve"] = run_curve(records)  # read once, above
    return doc, plan, variant


def _run_mfu(measured: dict, plan, run_dir: Path) -> float:
    """The run's MFU against its plan's peak: logged, else from its shape and speed (train.py
    logs MFU only with peak_flops set); refused outside [MIN_MFU, 1]."""
    mfu, world = measured["mfu"], measured["world_size"] or 1
    if mfu is None and measured["shape"]:
        s = measured["shape"]
        fpt = arch.flops_per_token_exact(s["n_layer"], s["n_embd"], s["n_head"], s["n_kv_head"],
                                         s["head_dim"], s["ffn_hidden"], s["vocab_size"],
                                         s["block_size"])
        mfu = float(fpt) * measured["tokens_per_second"] / (world * plan.hardware.peak_tflops * 1e12)
    if not is_positive(mfu):  # 0: a speed so small its MFU underflows (edited)
        raise _error("the run's records give no MFU and no model shape to compute it from",
                     str(run_dir / METRICS), "run train.py with the repo's config/<variant>.py")
    if not MIN_MFU <= mfu <= 1:
        raise _error(f"the run's MFU is {mfu:.3g}, outside [{MIN_MFU}, 1] (as "
                     "hardware.mfu): below 1% the run is broken, above 1 the plan's peak "
                     f"({plan.hardware.peak_tflops:g} TFLOPS per device) is below what it did",
                     str(run_dir / METRICS), "check the run's records and the spec's hardware.gpu")
    return mfu


def _document(measured: dict, plan, variant, run: str, run_dir: Path) -> dict:
    """The calibration file's measurement, what it ran on, and what its plan predicted."""
    t = variant.timing
    return {
        "kind": KIND, "format": FORMAT, "llama3gen_version": __version__,
        "tokens_per_second": measured["tokens_per_second"], "mfu": measured["mfu"],
        "step_time_s": measured["step_time_s"], "peak_memory_bytes": measured["peak_memory_bytes"],
        "peak_memory_allocated_bytes": measured["peak_memory_allocated_bytes"],
        "measured_on": {
            "run": run, "run_dir": str(run_dir), "how": measured["how"],
            "date": measured["date"], "device": measured["device"],
            "gpu": measured["gpu"] or (plan.hardware.gpu if measured["device"] != "cpu" else "cpu"),
            "world_size": measured["world_size"] or 1,
            "ranks_per_node": measured["ranks_per_node"],
            "peak_flops": plan.hardware.peak_tflops * 1e12, "variant": variant.name,
            "shape": measured["shape"], "layout": measured["layout"]},
        "planned": {"tokens_per_second": t.tokens_per_second, "mfu": t.mfu,
                    "loss": variant.choice.loss,
                    "step_time_s": t.step_seconds, "peak_memory_bytes": variant.memory.total,
                    "world_size": variant.training.world_size, "mfu_source": t.mfu_source,
                    "checkpoint_write_GBps": t.checkpoint_write_GBps, "goodput": t.goodput,
                    "shape": _plan_shape(variant), "layout": _plan_layout(variant)},
    }


def _refuse_unusable_evaluation(timed: dict | None, run_dir: Path) -> None:
    low, high = EVALUATION_RATIO
    if timed and not usable_evaluation_ratio(timed["measured_over_predicted"]):
        ratio = timed["measured_over_predicted"]
        raise _error(f"the run's evaluations took {ratio:.3g}× the share of a step a forward's "
                     f"FLOPs give, outside [{low:g}, {high:g}]: an edited or broken record",
                     str(run_dir / METRICS),
                     "check the eval_time_s and step_time_s records, or calibrate another run")


def final_loss(records: list[dict], max_iters: int, predicted: float, law: str) -> dict:
    """The run's validation loss at the plan's last step (as `llama3gen fit` reads a sweep run's),
    beside the loss the plan predicted there; the last one logged, and where, when the run has
    not got there. Comparable only under a law fitted on this data and tokenizer (a `llama3gen
    fit` law file)."""
    from .fit import logged_values
    logged = [(step, loss) for step, loss in logged_values(records, "val_loss")
              if isinstance(step, int)]
    final = [loss for step, loss in logged if step == max_iters]
    return {"predicted": predicted, "law": law, "max_iters": max_iters,
            "final_val_loss": final[-1] if final else None,
            "last_val_loss": list(logged[-1]) if logged else None}


def implied_efficiency(doc: dict, plan) -> dict:
    """What the run tells compiler/steptime.py, on the hardware its repo was planned for: the
    kernel efficiency at which the model gives the run's measured step time (as a spec naming
    this calibration computes it: evaluate.calibrated_view), beside the one the plan assumed;
    or why the model cannot take the run. Recorded for the report; a plan recomputes it."""
    from .evaluate import HardwareView, calibrated_view
    from .hardware import Interconnect
    from .recipe import Recipe
    hw = plan.hardware
    try:
        recipe = Recipe(**vars(plan.recipe)) if hasattr(plan, "recipe") else Recipe()
        view = HardwareView(device=doc["measured_on"]["device"] or "cuda",
                            peak_flops=hw.peak_tflops * 1e12, memory_bytes=0.0,
                            gpus_per_node=hw.gpus_per_node, nodes=hw.nodes,
                            kernel_efficiency=hw.kernel_efficiency,
                            interconnect=Interconnect(hw.intra_node_GBps, hw.inter_node_GBps,
                                                      hw.interconnect_source), recipe=recipe)
    except (AttributeError, TypeError):
        return {"kernel_efficiency": None, "planned_kernel_efficiency": None,
                "why_not": f"{LOCK_NAME} does not record the plan's kernel efficiency and "
                           "interconnect (an older llama3gen)"}
    compiled = bool((doc["measured_on"].get("layout") or {}).get("compile"))
    run = calibrated_view(dataclasses.replace(view, compiled=compiled), doc, "", 1.0)
    return {"kernel_efficiency": None if run.mfu is not None else run.kernel_efficiency,
            "planned_kernel_efficiency": hw.kernel_efficiency,
            "why_not": run.mfu_source or None}


def comparison_rows(doc: dict) -> list[tuple[str, float | None, float | None, str]]:
    """(quantity, planned, measured, unit) for the table."""
    p = doc["planned"]
    return [("tokens/s", p["tokens_per_second"], doc["tokens_per_second"], "tokens"),
            ("MFU", p["mfu"], doc["mfu"], "fraction"),
            ("step time", p["step_time_s"], doc["step_time_s"], "seconds"),
            ("peak memory / device", p["peak_memory_bytes"], doc["peak_memory_bytes"], "bytes")]


def _shown(value, unit: str) -> str:
    if value is None:
        return "not measured"
    return {"tokens": f"{value:,.0f}", "fraction": f"{value:.1%}", "seconds": f"{value:.4g} s",
            "bytes": f"{value / 2**30:.2f} GiB"}[unit]


def report(doc: dict) -> str:
    m, p = doc["measured_on"], doc["planned"]
    per_node = m.get("ranks_per_node")
    nodes = f" on {m['world_size'] // per_node} node(s)" if per_node else ""
    lines = [f"run {m['run']} ({m['how']}; {m['date'] or 'date not recorded'})",
             f"  measured on {layout_text(m['world_size'], m['layout'])}{nodes}, {m['gpu']}, "
             f"{shape_text(m['shape'])}",
             f"  planned for {layout_text(p['world_size'], p['layout'])}, variant {m['variant']}",
             "", f"{'':<22}{'planned':>14}{'measured':>16}{'measured/planned':>18}"]
    for name, planned, measured, unit in comparison_rows(doc):
        ratio = f"{measured / planned:.3f}" if measured is not None and planned else "-"
        lines.append(f"{name:<22}{_shown(planned, unit):>14}{_shown(measured, unit):>16}"
                     f"{ratio:>18}")
    if m["world_size"] != p["world_size"]:
        lines.append(f"note: the run used {m['world_size']} rank(s), the plan {p['world_size']}: "
                     "tokens/s and step time are of different jobs; MFU is per device")
    lines += _loss_lines(doc.get("loss"))
    speed = doc.get("speed") or {}
    if speed.get("kernel_efficiency"):
        lines.append(f"speed: compiler/steptime.py gives the run's measured step time at "
                     f"{speed['kernel_efficiency']:.1%} of peak (its plan computed at "
                     f"{speed['planned_kernel_efficiency']:.1%}); a spec with this calibration "
                     "plans every shape and layout at that, with their own communication on top")
    elif speed.get("why_not"):
        lines.append(f"speed: {speed['why_not']}; a spec with this calibration trains at the "
                     "measured MFU")
    lines.append(_checkpoint_line(doc.get("checkpoint"), p))
    lines.append(_restart_line(doc.get("restarts")))
    lines.append(_failure_line(doc.get("failures")))
    lines.append(_evaluation_line(doc.get("evaluation")))
    lines.append(_goodput_line(doc.get("goodput"), p.get("goodput")))
    peak = doc.get("peak_memory") or {}
    lines.append("note: planned memory includes the allocator margin and the per-process context "
                 f"(compiler/memory.py); measured is {peak.get('how', 'not recorded')}")
    if peak.get("measured_over_predicted"):
        lines.append(f"memory: the run's peak is {peak['measured_over_predicted']:.3f}× what "
                     "compiler/memory.py predicts for the run's own shape and layout; a spec "
                     "with this calibration plans with its predictions scaled by that")
    return "\n".join(lines) + "\n"


def _checkpoint_line(saves: dict | None, planned: dict) -> str:
    if not saves:
        return ("checkpoint: the run saved none (a --benchmark_iters run saves none); a spec with "
                "this calibration keeps its checkpoint write bandwidth")
    assumed = planned.get("checkpoint_write_GBps")
    assumed = (f" (its plan assumed {assumed / planned['world_size']:.3g})"
               if assumed and planned.get("world_size") else "")
    return (f"checkpoint: {saves['saves']} save(s) of {saves['bytes'] / 1e6:,.1f} MB, "
            f"{saves['seconds']:.3g} s each (median) on {saves['world_size']} device(s): "
            f"{saves['GBps_per_device']:.3g} GB/s per device{assumed}; a spec with this "
            "calibration plans checkpoint writes at that, unless it sets "
            "cluster.checkpoint_write_GBps")


def _restart_line(restarts: dict | None) -> str:
    if not restarts:
        return ("restarts: none measured (no process resumed under the same SLURM job id); a "
                "spec with this calibration keeps its restart time")
    return (f"restarts: {restarts['seconds']:.4g} s each, the {restarts['how']}; a spec with this "
            "calibration plans restarts at that, unless it sets cluster.restart_s")


def _failure_line(failures: dict | None) -> str:
    if not failures:
        return ("failures: no timed training to count them over (a file from an older train.py); "
                "a spec with this calibration keeps its failure rate")
    from .goodput import failure_rate
    rate = failure_rate(None, (failures["interruptions"], failures["device_hours"], "run"))[0]
    lost = (f", {failures['lost_steps']:,} step(s) redone at least"
            if failures["interruptions"] else "")
    return (f"failures: {failures['interruptions']} unexpected interruption(s) in "
            f"{failures['device_hours']:.4g} device-hours{lost}; a spec with this calibration "
            f"plans {rate:.3g} failures per device-hour (the default updated by them, "
            "compiler/goodput.py), unless it sets cluster.failures_per_gpu_hour")


def _goodput_line(measured: dict | None, planned: float | None) -> str:
    if not measured:
        return "goodput: not measured (the records do not time the run's start)"
    plan = f"; its plan expects {planned:.2%} over the whole run" if planned else ""
    return (f"goodput: the run trained {measured['training_seconds']:.4g} s of its "
            f"{measured['wall_seconds']:.4g} s of wall clock, {measured['goodput']:.2%} (the rest: "
            f"compilation, evaluations, saves, restarts, waits){plan}; a short run spends more of "
            "it starting up")


def _evaluation_line(timed: dict | None) -> str:
    if not timed:
        return ("evaluation: none timed (a --benchmark_iters run evaluates none); a spec with this "
                "calibration plans an evaluated batch as a forward at the step's rate")
    return (f"evaluation: {timed['seconds_per_batch']:.4g} s per batch ({timed['how']}): "
            f"{timed['share_of_a_step']:.3g} of a step, {timed['measured_over_predicted']:.3f}× "
            f"the {timed['assumed_share']:.3g} a forward's FLOPs give; a spec with this "
            "calibration plans evaluations at that ratio")


def _loss_lines(loss: dict | None) -> list[str]:
    """The report's lines on the final loss against the plan's (none for an older file)."""
    if not loss:
        return []
    predicted, law = loss["predicted"], loss["law"]
    if loss["final_val_loss"] is not None:
        measured = loss["final_val_loss"]
        lines = [f"loss: validation loss {measured:.4f} at the plan's last step "
                 f"({loss['max_iters']:,}) against the {predicted:.4f} it predicted "
                 f"({law}; measured/predicted {measured / predicted:.3f})"]
    elif loss["last_val_loss"]:
        step, value = loss["last_val_loss"]
        lines = [f"loss: the run has not reached the plan's last step ({loss['max_iters']:,}); "
                 f"its last validation loss is {value:.4f} at step {step:,}, the plan predicts "
                 f"{predicted:.4f} at the end ({law})"]
    else:
        return [f"loss: the run logged no validation loss (the plan predicts {predicted:.4f}, "
                f"{law})"]
    if law != "fitted":
        lines.append(f"note: {law} was fitted on other data and another tokenizer, so its loss "
                     "is on another scale than this run's; a law from `llama3gen fit` of this "
                     "repo's own sweep predicts this run's")
    return lines


def _is_calibration(text: str) -> bool:
    try:
        return json.loads(text).get("kind") == KIND
    except (ValueError, AttributeError):
        return False


def _is_our_svg(text: str) -> bool:
    from .figure import CALIBRATION_DESC
    return text.startswith("<svg ") and f"<desc>{CALIBRATION_DESC}</desc>" in text


def write_calibration(path: Path, doc: dict) -> None:
    write_own_file(path, json.dumps(doc, indent=2, sort_keys=True) + "\n", _is_calibration,
                   COMMAND)


def run_curve(records: list[dict]) -> dict:
    """The run's logged curves (metrics.jsonl's records), {"loss": [[step, loss]],
    "tokens_per_second": [[step, tokens/s]]}, each thinned to at most CURVE_POINTS evenly spaced
    records (the first and last kept): what the figure plots, carried in the calibration file so
    that a plan using it can draw it too."""
    last = {}  # step -> record; a step logged twice (a re-run after a resume) keeps its last
    for r in records:
        if "event" not in r and whole_number(r.get("step"), 0):
            last.setdefault(r["step"], {}).update(r)
    steps = sorted(last)

    def series(key):
        points = [[float(s), float(last[s][key])] for s in steps
                  if finite_number(last[s].get(key)) is not None and last[s][key] >= 0]
        if len(points) <= CURVE_POINTS:
            return points
        keep = sorted({round(i * (len(points) - 1) / (CURVE_POINTS - 1))
                       for i in range(CURVE_POINTS)})
        return [points[i] for i in keep]
    return {"loss": series("loss"), "tokens_per_second": series("tokens_per_s")}


def write_svg(path: Path, doc: dict) -> None:
    from .figure import calibration_figure
    write_own_file(path, calibration_figure(plan_record(doc, str(path))), _is_our_svg, COMMAND)


def plan_record(doc: dict, file: str):
    """The calibration as the Plan records it (plan.Calibration); `file`: as the spec names it."""
    from . import plan as P
    m, planned, curve = doc["measured_on"], doc["planned"], doc.get("curve") or {}
    loss, saves = doc.get("loss") or {}, doc.get("checkpoint") or {}
    restarts, failures = doc.get("restarts") or {}, doc.get("failures") or {}
    timed = doc.get("evaluation") or {}

    def numbers(d):
        return P.Measured(tokens_per_second=d["tokens_per_second"], mfu=d["mfu"],
                          step_time_s=d.get("step_time_s"),
                          peak_memory_bytes=d.get("peak_memory_bytes"))
    return P.Calibration(
        file=file, run=str(m.get("run")), how=str(m.get("how")), date=m.get("date"),
        gpu=m.get("gpu"), world_size=m.get("world_size") or 1, variant=str(m.get("variant")),
        measured=numbers(doc), planned=numbers(planned), planned_loss=planned.get("loss"),
        memory_ratio=(doc.get("peak_memory") or {}).get("measured_over_predicted"),
        curve_loss=curve.get("loss") or [],
        curve_tokens_per_second=curve.get("tokens_per_second") or [],
        final_val_loss=finite_number(loss.get("final_val_loss")), law=loss.get("law"),
        checkpoint_seconds=finite_number(saves.get("seconds")),
        checkpoint_bytes=finite_number(saves.get("bytes")),
        checkpoint_GBps_per_device=finite_number(saves.get("GBps_per_device")),
        ranks_per_node=m.get("ranks_per_node"), restart_seconds=finite_number(restarts.get("seconds")),
        restarts=restarts.get("count"), interruptions=failures.get("interruptions"),
        device_hours=finite_number(failures.get("device_hours")), lost_steps=failures.get("lost_steps"),
        evaluation_ratio=finite_number(timed.get("measured_over_predicted")),
        evaluation_how=timed.get("how"), goodput=_share((doc.get("goodput") or {}).get("goodput")),
        planned_goodput=_share(planned.get("goodput")))


def _share(value) -> float | None:
    """A share in (0, 1], else None (not recorded, or edited)."""
    return float(value) if is_positive(value) and value <= 1 else None


# --- a spec's hardware.calibration -------------------------------------------------------------


def load_calibration(path: Path) -> dict:
    """A calibration file for a spec; ValueError (one line) when it cannot be used."""
    doc = read_json(path, "calibration", "llama3gen calibrate RUN_DIR -o FILE")
    if not isinstance(doc, dict) or doc.get("kind") != KIND or doc.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a llama3gen calibration file (format {FORMAT}; "
                         "`llama3gen calibrate RUN_DIR -o FILE` writes one)")
    problem = _calibration_problem(doc)
    if problem:
        raise ValueError(f"calibration file {str(path)!r}: {problem} (`llama3gen calibrate "
                         "RUN_DIR -o FILE` writes a valid one)")
    return doc


def _calibration_problem(doc: dict) -> str | None:
    """What makes a calibration document unusable, or None. The curves are optional."""
    return (_measurement_problem(doc) or _run_log_problem(doc)
            or _curve_problem(doc.get("curve", {})))


def _measurement_problem(doc: dict) -> str | None:
    """The speed, what the run ran on and its plan: what every use of the file reads."""
    if not (is_positive(doc.get("mfu")) and MIN_MFU <= doc["mfu"] <= 1
            and is_positive(doc.get("tokens_per_second"))):
        return (f"mfu must be a number in [{MIN_MFU}, 1] and tokens_per_second one > 0 (got "
                f"{doc.get('mfu')!r}, {doc.get('tokens_per_second')!r})")
    m, planned = doc.get("measured_on"), doc.get("planned")
    if not isinstance(m, dict) or not isinstance(planned, dict):
        return "measured_on and planned must be objects"
    if not is_positive(planned.get("mfu")) or not is_positive(planned.get("tokens_per_second")):
        return "planned.mfu and planned.tokens_per_second must be numbers > 0"
    world = m.get("world_size")
    if world is not None and not whole_number(world):
        return f"measured_on.world_size must be a whole number ≥ 1 (got {world!r})"
    per_node = m.get("ranks_per_node")
    if per_node is not None and not (whole_number(per_node) and (world or 1) % per_node == 0):
        return (f"measured_on.ranks_per_node must be a whole number ≥ 1 that divides "
                f"world_size {world or 1} (got {per_node!r})")
    step = doc.get("step_time_s")
    if step is not None and not is_positive(step):
        return f"step_time_s must be a number > 0 (got {step!r})"
    return _run_problem(m.get("shape"), m.get("layout"))


def _run_log_problem(doc: dict) -> str | None:
    """The parts compiler/runlog.py measured, each null or whole."""
    restarts = doc.get("restarts")
    if restarts is not None and not (
            isinstance(restarts, dict) and is_positive(restarts.get("seconds"))
            and whole_number(restarts.get("count")) and isinstance(restarts.get("how"), str)):
        return ("restarts must be null or give seconds (a number > 0), count (a whole number "
                "≥ 1) and how")
    failures = doc.get("failures")
    if failures is not None and not (
            isinstance(failures, dict) and is_positive(failures.get("device_hours"))
            and whole_number(failures.get("interruptions"), 0) and whole_number(failures.get("lost_steps"), 0)
            and isinstance(failures.get("how"), str)):
        return ("failures must be null or give device_hours (a number > 0), interruptions and "
                "lost_steps (whole numbers ≥ 0) and how")
    measured = doc.get("goodput")
    if measured is not None and not (isinstance(measured, dict) and _share(measured.get("goodput"))
                                     and isinstance(measured.get("how"), str)):
        return "goodput must be null or give goodput (a number in (0, 1]) and how"
    timed, (low, high) = doc.get("evaluation"), EVALUATION_RATIO
    if timed is not None and not (
            isinstance(timed, dict) and isinstance(timed.get("how"), str)
            and usable_evaluation_ratio(timed.get("measured_over_predicted"))):
        return (f"evaluation must be null or give measured_over_predicted (a number in [{low:g}, "
                f"{high:g}]) and how")
    saves = doc.get("checkpoint")
    if saves is not None and not (
            isinstance(saves, dict) and isinstance(saves.get("how"), str)
            and all(is_positive(saves.get(k)) for k in ("GBps_per_device", "seconds", "bytes"))
            and whole_number(saves.get("saves")) and whole_number(saves.get("world_size"))):
        return ("checkpoint must be null or give GBps_per_device, seconds and bytes (numbers > 0), "
                "saves and world_size (whole numbers ≥ 1) and how")
    return None


def _curve_problem(curve) -> str | None:
    if not isinstance(curve, dict) or any(
            not isinstance(curve.get(k, []), list) or not all(map(_curve_point, curve.get(k, [])))
            for k in ("loss", "tokens_per_second")):
        return ("curve.loss and curve.tokens_per_second must be lists of [step, value]: a whole "
                "step ≥ 0 and a value ≥ 0")
    return None


def _curve_point(point) -> bool:
    """[step, value] as run_curve writes it: a training step and a loss or a speed."""
    if not isinstance(point, list) or len(point) != 2 or None in map(finite_number, point):
        return False
    step, value = point
    return 0 <= step < 2**31 and float(step).is_integer() and value >= 0


PARALLELISMS = ("none", "ddp", "fsdp", "hsdp")  # train.py's, and "none" for one process


def _run_problem(shape, layout) -> str | None:
    """What makes the run's shape or layout record unusable to the step-time model (each may be
    absent: a file from a run whose config was not found)."""
    if shape is not None and not (isinstance(shape, dict) and all(
            whole_number(shape.get(k)) for k in SHAPE_KEYS if k != "tie_embeddings")
            and isinstance(shape.get("tie_embeddings"), bool)):
        return ("measured_on.shape must give " + ", ".join(k for k in SHAPE_KEYS
                                                          if k != "tie_embeddings")
                + " as whole numbers ≥ 1 and tie_embeddings as true or false")
    if layout is None:
        return None
    if not isinstance(layout, dict) or layout.get("parallelism") not in PARALLELISMS:
        return f"measured_on.layout.parallelism must be one of {', '.join(PARALLELISMS)}"
    if layout.get("dtype") not in (None, *memory.DTYPE_BYTES):
        return f"measured_on.layout.dtype must be one of {', '.join(memory.DTYPE_BYTES)}"
    for key, least in (("micro_batch_size", 1), ("grad_accum", 1), ("tensor_parallel", 1),
                       ("checkpointed_layers", 0)):
        value = layout.get(key)
        if (value is not None or key == "micro_batch_size") and not whole_number(value, least):
            return f"measured_on.layout.{key} must be a whole number ≥ {least} (got {value!r})"
    return None


def mfu_source(doc: dict, file: str, shape, training, efficiency: float | None = None) -> str:
    """timing.mfu_source of a variant planned with a calibration: the file, the run, and whether
    the measurement came from another shape or layout. efficiency: the kernel efficiency the run
    gave the step-time model (evaluate.calibrated_view); None: the run's MFU replaced the model."""
    m = doc["measured_on"]
    run = (f"run {m.get('run')} ({m.get('how')}, {m.get('date') or 'date not recorded'}) on "
           f"{m.get('world_size')} × {m.get('gpu')}")
    if efficiency is None:
        text, what = f"calibration {file}: MFU {doc['mfu']:.4g} measured by {run}", "MFU"
    else:
        text = (f"predicted: compiler/steptime.py, compute at {efficiency:.4g} of peak, the "
                f"efficiency at which it gives the step time measured by {run} (calibration "
                f"{file}), plus this layout's exposed communication")
        what = "efficiency"
    here = {"n_layer": shape.n_layers, "n_embd": shape.d_model, "n_head": shape.n_heads,
            "n_kv_head": shape.n_kv_heads, "head_dim": shape.head_dim,
            "ffn_hidden": shape.ffn_hidden, "vocab_size": shape.vocab_size,
            "tie_embeddings": shape.tie_embeddings, "block_size": shape.seq_len}
    if m.get("shape") != here:
        text += f"; {what} measured on {shape_text(m.get('shape'))}, applied to this shape"
    layout = m.get("layout") or {}
    parallelism = training.parallelism if training.world_size > 1 else "none"
    if (m.get("world_size") != training.world_size or layout.get("parallelism") != parallelism
            or layout.get("micro_batch_size") != training.micro_batch_size
            or checkpointed_blocks(layout, shape.n_layers) != training.checkpointed_layers):
        text += (f"; measured on {layout_text(m.get('world_size'), layout)}, applied to "
                 f"{training.world_size} rank(s) {parallelism}, micro-batch "
                 f"{training.micro_batch_size}")
    return text
