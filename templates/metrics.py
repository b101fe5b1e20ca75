"""What a run measures and where it goes: metrics.jsonl, and TensorBoard or Weights & Biases.

As torchtitan keeps metrics beside the training loop: train.py hands every record to Metrics,
which appends it to out_dir/metrics.jsonl (what `llama3gen calibrate` reads) and, when the config
turns them on, sends its numbers to the trackers (imported only then). peak_memory() is what a
record says about memory.
"""

import importlib.util
import json
import os
import time

import torch

from configurator import ConfigError


class Metrics:
    """Appends one JSON object per line to out_dir/metrics.jsonl (rank 0), line-buffered so a
    crash loses at most the line being written; an existing file is never rewritten. With
    cfg.tensorboard or cfg.wandb_project every record also goes to those trackers."""

    def __init__(self, cfg, enabled, resumed_step):
        self.file, self.trackers = None, []
        if not enabled:
            return
        # W&B first: wandb.init is what fails (no login, no network), before anything is open
        self.trackers = (([WandB(cfg)] if cfg.wandb_project else [])
                         + ([TensorBoard(cfg, resumed_step)] if cfg.tensorboard else []))
        self.file = open(os.path.join(cfg.out_dir, "metrics.jsonl"), "a", buffering=1)

    def write(self, **record):
        if self.file:
            self.file.write(json.dumps(record) + "\n")
        for tracker in self.trackers:
            tracker.write(record)

    def close(self, status=0):
        """Close the file and the trackers, once; `status` is the run's exit status."""
        if self.file:
            self.file.close()
            self.file = None
        for tracker in self.trackers:
            tracker.close(status)
        self.trackers = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None and self.file:  # the file only: the trackers get the status
            self.file.write(json.dumps(ending(exc_type, exc)) + "\n")
        self.close(1 if exc_type else 0)  # after close(status) this does nothing


MAX_ERROR_CHARS = 1000  # of an exception's message: its first lines say what went wrong


def ending(exc_type, exc):
    """The record of an exception that ends the run: Ctrl-C is a stop by hand, which `llama3gen
    calibrate` does not count as a failure; anything else is an error, with what it said."""
    if issubclass(exc_type, KeyboardInterrupt):
        return {"event": "stopped_by_hand", "unix_time": time.time()}
    return {"event": "error", "error": f"{exc_type.__name__}: {exc}"[:MAX_ERROR_CHARS],
            "unix_time": time.time()}


# Experiment trackers (nanoGPT's wandb_log, in its spirit): each gets every record's numbers under
# metrics.jsonl's names (an event's as "<event>/<name>") at the record's step, and the config.
# They are imported only when turned on.


def check_trackers(cfg):
    """The problem with the trackers the config turns on, or None (checked on every rank)."""
    wanted = ((["tensorboard"] if cfg.tensorboard else [])
              + (["wandb"] if cfg.wandb_project else []))
    missing = [name for name in wanted if importlib.util.find_spec(name) is None]
    if missing:
        return (f"{' and '.join(missing)} not installed, but the config logs to it: "
                f"pip install {' '.join(missing)}, or turn it off (--tensorboard=False, "
                f"--wandb_project=)")
    return None


def tracker_values(record):
    """The numbers of a metrics.jsonl record (not its step), named for a tracker."""
    prefix = f"{record['event']}/" if "event" in record else ""
    return {prefix + k: v for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoard:
    """Scalars in out_dir/tensorboard (torch.utils.tensorboard)."""

    def __init__(self, cfg, resumed_step):
        from torch.utils.tensorboard import SummaryWriter
        # purge_step: a resumed run hides what an interrupted one logged after its checkpoint
        self.writer = SummaryWriter(os.path.join(cfg.out_dir, "tensorboard"),
                                    purge_step=None if resumed_step is None else resumed_step + 1)
        self.writer.add_text("config", json.dumps(dict(cfg), indent=1), resumed_step or 0)

    def write(self, record):
        for name, value in tracker_values(record).items():
            self.writer.add_scalar(name, value, record.get("step"))

    def close(self, status):
        self.writer.close()


class WandB:
    """A Weights & Biases run named after out_dir, its files in out_dir/wandb. Each launch (a
    resume too) is a run of its own; WANDB_MODE=offline keeps it on disk (`wandb sync` later)."""

    def __init__(self, cfg):
        import wandb
        try:
            self.run = wandb.init(project=cfg.wandb_project, dir=cfg.out_dir, config=dict(cfg),
                                  name=os.path.basename(os.path.abspath(cfg.out_dir)))
        except Exception as e:  # wandb's errors (no login, no network) have no common base
            reason = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
            raise ConfigError(f"wandb_project={cfg.wandb_project!r}: wandb.init failed: "
                              f"{type(e).__name__}: {reason} (WANDB_MODE=offline logs without "
                              f"network; `wandb sync` uploads later)") from None

    def write(self, record):
        self.run.log(tracker_values(record), step=record.get("step"))

    def close(self, status):
        self.run.finish(exit_code=status)


def peak_memory(dev):
    """Peaks since the start, in bytes: the CUDA caching allocator's; on CPU the process's peak
    resident set, what the plan's host memory counts."""
    if dev.type != "cuda":
        return {"max_memory_allocated": None, "max_memory_reserved": None,
                "max_rss": peak_resident_bytes()}
    return {"max_memory_allocated": torch.cuda.max_memory_allocated(dev),
            "max_memory_reserved": torch.cuda.max_memory_reserved(dev)}


def peak_resident_bytes():
    """This program's peak resident set: Linux's VmHWM. Not getrusage's ru_maxrss, which Linux
    carries across exec: a train.py started by a large process (torchrun, a test runner) would
    report its parent's resident set at the fork."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    import resource  # no /proc (macOS): ru_maxrss, in bytes there
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
