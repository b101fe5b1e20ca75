"""What a run's metrics.jsonl says about the time between its steps: checkpoint saves,
evaluations, restarts, unexpected interruptions, and the share of the wall clock that trained.

train.py writes the records (docs/CONTRACT.md "metrics.jsonl"), one process after another
appending to one file; `llama3gen calibrate` (compiler/calibrate.py) reads them through these
functions, which take whatever the file holds: a record edited by hand or cut short is left out,
never a traceback. Only the standard library: no torch, no numpy at import.
"""

from __future__ import annotations

import math
import statistics

from .jsonfile import whole_number


def finite_number(value) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def is_positive(value) -> bool:
    return finite_number(value) is not None and value > 0


def split_processes(records: list[dict]) -> list[list[dict]]:
    """The records cut at each "start" event (train.py writes one per process start); records
    before the first start, if any, make a segment of their own."""
    segments = []
    for r in records:
        if r.get("event") == "start" or not segments:
            segments.append([])
        segments[-1].append(r)
    return segments


def whole_or_none(value) -> int | None:
    return value if whole_number(value) else None


def text_or_none(value) -> str | None:
    return value if isinstance(value, str) else None


def start_config(record: dict) -> dict:
    """A start record's config (every setting of the process), or {} (not a start, or edited)."""
    config = record.get("config") if record.get("event") == "start" else None
    return config if isinstance(config, dict) else {}


def checkpoint_saves(records: list[dict]) -> dict | None:
    """The run's checkpoint saves (train.py's "checkpoint" records): the median time training
    stopped for one and the bandwidth per device that makes of its bytes; None: no save."""
    def per_device(r):  # GB/s
        return r["bytes"] / r["seconds"] / 1e9 / r["world_size"]
    saves = [r for r in records if r.get("event") == "checkpoint" and is_positive(r.get("seconds"))
             and is_positive(r.get("bytes")) and whole_number(r.get("world_size"))
             and is_positive(per_device(r))]  # not 0 or inf: edited numbers
    if not saves:
        return None
    return {"saves": len(saves), "bytes": saves[-1]["bytes"],
            "seconds": statistics.median(r["seconds"] for r in saves),
            "world_size": saves[-1]["world_size"],
            "GBps_per_device": statistics.median(map(per_device, saves)),
            "how": (f"median of {len(saves)} save(s) by train.py: gather, write, fsync, hash and "
                    "rename, the time training waits")}


# How a process can end with a record of why it is not a failure: saved after a signal and asked
# for a requeue, stopped on non-finite losses, finished its benchmark, or stopped by hand (Ctrl-C).
# A process that reached its config's max_iters finished too (_ended_by_itself). An "error"
# record (an exception) says why, but it is a failure.
SELF_ENDINGS = ("requeue", "stopped_nonfinite", "benchmark", "stopped_by_hand")


def _ended_by_itself(process: list[dict]) -> bool:
    """Whether a process's records (one of split_processes' segments) say why it stopped."""
    max_iters = start_config(process[0]).get("max_iters")
    return any(r.get("event") in SELF_ENDINGS
               or (whole_number(max_iters) and whole_number(r.get("step")) and r["step"] >= max_iters)
               for r in process)


def _interrupted(process: list[dict], following: list[dict] | None) -> bool:
    """An unexpected interruption: a process that trained, stopped with no record of why (a
    crash, a node or GPU failure, a kill) and was resumed from a checkpoint by the next one."""
    return (following is not None and following[0].get("event") == "start"
            and bool(following[0].get("resumed_from"))
            and any(r.get("event") == "first_step" for r in process)
            and not _ended_by_itself(process))


def _timed(process: list[dict]) -> list[dict]:
    """A process's records that time its training: a unix_time, and not its start (before it)."""
    return [r for r in process if r.get("event") != "start" and is_positive(r.get("unix_time"))]


def measured_goodput(records: list[dict]) -> dict | None:
    """The share of the run's wall clock that trained: Σ over logged records of step_time_s ×
    the steps since the process's previous log (or its start), over the time from the first
    start record (set up, before its first step) to the last record. What is not training:
    compilation, evaluations, saves, restarts, waits in a queue. None where the records do not
    time both (a file from an older train.py) or disagree (more training than wall clock)."""
    processes = split_processes(records)
    begun = processes[0][0].get("unix_time") if processes[0][0].get("event") == "start" else None
    training, ends = 0.0, []
    for process in processes:
        previous = process[0].get("step") if process[0].get("event") == "start" else None
        for r in process:
            if "event" in r or not whole_number(r.get("step"), 0):
                continue
            if whole_number(previous, 0) and r["step"] > previous and is_positive(r.get("step_time_s")):
                training += (r["step"] - previous) * r["step_time_s"]
            previous = r["step"]
        ends += [r["unix_time"] for r in _timed(process)]
    if not (is_positive(begun) and ends and 0 < training <= max(ends) - begun < math.inf):
        return None
    wall = max(ends) - begun
    return {"training_seconds": training, "wall_seconds": wall, "goodput": training / wall,
            "how": ("Σ logged step times / the time from the first process's start (set up) to "
                    "the last record; the rest is compilation, evaluations, saves, restarts and "
                    "waits")}


def measured_restarts(records: list[dict]) -> dict | None:
    """The restarts the run went through under one SLURM job id: from a process's stop to the next
    process's first trained step (the queue's wait, the new process's start, process group,
    checkpoint load, compilation and one step). The stop is a "requeue" record's time (the
    process saved and exited), or an interrupted process's last timed record (up to a
    log_interval before it died). Stops outside SLURM, or resumed under another job id (a new
    submission, perhaps days later), are left out. The median, or None where there was none."""
    gaps, kinds = [], {"requeue": 0, "interruption": 0}
    processes = split_processes(records)
    for process, following in zip(processes, processes[1:]):
        requeue = next((r for r in process if r.get("event") == "requeue"), None)
        if requeue is not None:
            stop, kind = requeue, "requeue"
        elif _interrupted(process, following) and _timed(process):
            stop, kind = _timed(process)[-1], "interruption"
        else:
            continue
        job = stop.get("slurm_job_id") or next(
            (r.get("slurm_job_id") for r in process if r.get("event") == "first_step"), None)
        first = next((r for r in following if r.get("event") == "first_step"), None)
        if (job and is_positive(stop.get("unix_time")) and first is not None
                and first.get("slurm_job_id") == job and finite_number(first.get("unix_time"))
                and first["unix_time"] > stop["unix_time"]):
            gaps.append(first["unix_time"] - stop["unix_time"])
            kinds[kind] += 1
    if not gaps:
        return None
    return {"count": len(gaps), "seconds": statistics.median(gaps),
            "how": (f"median of {len(gaps)} restart(s) under the same SLURM job "
                    f"({kinds['requeue']} after a requeue, {kinds['interruption']} after an "
                    "interruption): from the stop to the next process's first trained step "
                    "(queue, start, process group, checkpoint load, compilation)")}


def measured_failures(records: list[dict]) -> dict | None:
    """The run's unexpected interruptions (_interrupted) and the device-hours over which they
    happened: each process's time from its first to its last timed record (its first trained
    step to its last log) × its world size. The steps lost to each: from the interrupted
    process's last logged step back to the checkpoint the next resumed from (a lower bound: the
    steps after the last log are not recorded). None where no process trained for a timed
    interval."""
    processes = split_processes(records)
    count, hours, lost, errors = 0, 0.0, 0, []
    for process, following in zip(processes, [*processes[1:], None]):
        timed = _timed(process)
        world = process[0].get("world_size") if process[0].get("event") == "start" else 1
        if len(timed) >= 2 and whole_number(world):
            hours += max(0.0, timed[-1]["unix_time"] - timed[0]["unix_time"]) * world / 3600
        if _interrupted(process, following):
            count += 1
            errors += [text_or_none(r.get("error")) or "?" for r in process if r.get("event") == "error"]
            logged = [r["step"] for r in process if whole_number(r.get("step"), 0)]
            resumed = following[0].get("step")
            if logged and whole_number(resumed, 0):
                lost += max(0, max(logged) - resumed)
    if not 0 < hours < math.inf:  # inf: a hand-edited time
        return None
    return {"interruptions": count, "device_hours": hours, "lost_steps": lost,
            "how": (f"{count} unexpected interruption(s) in {len(processes)} process(es): a "
                    "process that trained, stopped with no record of why or with an error (crash, "
                    "node or GPU failure, kill) and was resumed from a checkpoint"
                    + _errors_text(errors) + "; device-hours from each process's first trained "
                    "step to its last record, × its ranks")}


def _errors_text(errors: list[str]) -> str:
    """How many interruptions train.py recorded an exception for, and the first line of each kind."""
    if not errors:
        return ""
    kinds = sorted({e.splitlines()[0][:120] if e else "?" for e in errors})
    shown = "; ".join(kinds[:3]) + (f"; {len(kinds) - 3} more" if len(kinds) > 3 else "")
    return f" ({len(errors)} with an error record: {shown})"


# An evaluated batch costing under 1% or over 100× the share of a step its FLOPs say is a broken
# or edited record, not a measurement to plan with.
EVALUATION_RATIO = (0.01, 100.0)


def usable_evaluation_ratio(ratio) -> bool:
    """A measured over assumed evaluation share within EVALUATION_RATIO."""
    low, high = EVALUATION_RATIO
    return is_positive(ratio) and low <= ratio <= high


def measured_evaluations(records: list[dict], eval_iters, step_time_s, run) -> dict | None:
    """The run's evaluations against its measured step: the median seconds of one evaluated
    batch (each evaluation over its process's eval_iters, else the measured config's; a process's
    first left out where it evaluated again: compilation, warm-up) over the step time, the share
    of a step one evaluated batch took; and that over the share the plan assumes for the run's
    own shape and checkpointing (evaluate.forward_share). None where the run timed no evaluation
    (a --benchmark_iters run evaluates none)."""
    per_batch, left_out = [], 0
    for process in split_processes(records):
        batches = (whole_or_none(start_config(process[0]).get("eval_iters"))
                   or whole_or_none(eval_iters))
        timed = [r["eval_time_s"] for r in process
                 if "val_loss" in r and is_positive(r.get("eval_time_s"))]
        if batches and timed:
            left_out += len(timed) > 1
            per_batch += [t / batches for t in timed[1:] or timed]
    if not per_batch or not is_positive(step_time_s) or run is None:
        return None
    from .evaluate import forward_share, hardware_flops_per_token
    seconds = statistics.median(per_batch)
    assumed = float(forward_share(hardware_flops_per_token(run.shape, False),
                                  hardware_flops_per_token(run.shape, run.checkpointing))[0])
    return {"evaluations": len(per_batch), "seconds_per_batch": seconds,
            "share_of_a_step": seconds / step_time_s, "assumed_share": assumed,
            "measured_over_predicted": seconds / step_time_s / assumed,
            "how": (f"median over {len(per_batch)} timed evaluation(s), per batch, {left_out} "
                    "left out as a process's first (warm-up)")}
