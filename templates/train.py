"""Pre-train a LLaMA-3 model. One file, read top to bottom.

    python train.py config/<variant>.py                       # one process (CPU or one GPU)
    torchrun --standalone --nproc_per_node=8 train.py config/<variant>.py --max_iters=100

Settings: the defaults below, overridden by the config files named on the command line, then by
--key=value arguments (configurator.py checks names, types and the ranges in RULES below).
docs/CONTRACT.md lists them.

What happens:
- one process, or one per GPU under torchrun (NCCL on CUDA, gloo on CPU), the model wrapped in
  FSDP2 (`fully_shard` per block, then the root; "hsdp" shards within a node and replicates
  across nodes) or DDP; bf16 on CUDA; optional torch.compile and activation checkpointing,
  block by block;
- every optimizer step reads the next global_batch_size of train.bin's sequences, each sequence
  once per epoch in a seeded order (dataset.py), a pure function of (seed, step). Rank r takes
  its slice of that step's sequences and splits it into micro-batches (gradient accumulation), so
  the tokens a step sees do not depend on the number of ranks and a run resumes anywhere at any
  step; the log counts epochs and the distinct tokens read;
- AdamW (weight decay on 2-D weights only), linear warmup then cosine or WSD decay, gradient
  clipping; a step whose loss or gradient norm is not finite is skipped, and the run stops after
  max_nonfinite_steps such steps in a row;
- logs (stdout, and out_dir/metrics.jsonl, appended line by line): loss, lr, grad norm, tokens/s,
  step time, MFU against the plan, peak CUDA memory, and a re-estimated finish time; val loss
  every eval_interval steps; with tensorboard = True or a wandb_project, the same records go to
  TensorBoard (out_dir/tensorboard) or Weights & Biases (out_dir/wandb; WANDB_MODE=offline
  needs no network) too, from rank 0;
- --benchmark_iters=N: a short run to measure speed before the long one: warm up, time N steps,
  write one "benchmark" record to metrics.jsonl (what `llama3gen calibrate` reads) and exit 0
  without evaluating or checkpointing;
- checkpoints (checkpoint.py) every ckpt_interval steps and at the end; at start the run resumes
  from the newest checkpoint in out_dir that verifies (or starts from init_from_hf), and refuses
  to resume onto data whose fingerprint (meta.json) differs from the checkpoint's, naming the
  files, unless --allow_data_change;
- --dry_run: the checks of a start (config, data re-hashed against meta.json, checkpoint) and
  the run's tokens against the corpus's, then exit 0: no training, no GPU, nothing written;
- data_sources="web:0.7,code:0.3": a mixture of prepared directories under data_dir, drawn in
  those proportions with per-source epochs (dataset.py);
- SIGTERM or SIGUSR1 (preemption, SLURM's warning signal): save at the next step boundary and
  exit 75, which asks the launcher to requeue; a second signal more than 5 s after the first
  exits at once (repeats within 5 s are the duplicates SLURM and torchrun deliver).

Exit status: 0 finished, 75 saved after a signal (requeue me), 2 bad configuration or data (one
line, nothing trained), else failure.
"""

import contextlib
import math
import os
import signal
import struct
import sys
import time
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.distributed as dist

import checkpoint
from metrics import Metrics, check_trackers, peak_memory
from dataset import (
    check_same_data, data_fingerprint, open_train_data, read_meta, source_dirs, verify_fingerprint,
)
from parallelize import check_tensor_parallel, grad_norm_and_clip, parallelize
from configurator import (
    ANY_TEXT, NOT_EMPTY, ConfigError, at_least, between, even_at_least, greater_than, load_config,
    one_of,
)
from model import Llama, ModelArgs

# -----------------------------------------------------------------------------
# Default settings (docs/CONTRACT.md). config/<variant>.py and --key=value override them.
# model
n_layer = 2
n_embd = 64
n_head = 4
n_kv_head = 2
head_dim = 16
ffn_hidden = 192
vocab_size = 257
block_size = 64
rope_theta = 500000.0
norm_eps = 1e-5
tie_embeddings = False
init_std = 0.02
# data and output
data_dir = "data/bytes"
out_dir = "out"
# batch: global_batch_size sequences per optimizer step, micro_batch_size per rank per pass
global_batch_size = 8
micro_batch_size = 8
# optimizer and schedule
learning_rate = 1e-3
min_lr = 1e-4
lr_schedule = "cosine"  # "cosine" or "wsd" (warmup, stable, then linear decay to min_lr)
warmup_iters = 10
decay_frac = 0.2  # wsd: fraction of max_iters spent decaying
max_iters = 100
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0  # 0 disables clipping (the norm is still logged)
# evaluation, logging, checkpoints
eval_interval = 50
eval_iters = 2  # each evaluation reads eval_iters × global_batch_size val sequences
log_interval = 10
ckpt_interval = 50
keep_last_ckpts = 3
# system
device = "auto"  # "auto", "cuda" or "cpu"
dtype = "bfloat16"  # autocast / FSDP2 param dtype on CUDA; CPU always trains in float32
parallelism = "fsdp"  # "fsdp", "hsdp" (shard in a node, replicate across) or "ddp"; 1 process: none
activation_checkpointing = False  # blocks recompute their forward in backward
checkpointed_layers = 0  # how many: the first k (0: all; Megatron-LM's --recompute-num-layers)
compile = False
seed = 1337
# the recipe the plan's memory and speed assume (llama3gen's compiler/recipe.py); change it here
# and re-check memory: the plan counted with these
loss_chunk_tokens = 4096  # tokens per chunk of the fused output head + loss (model.py)
ddp_bucket_view = True  # DDP gradients are views into its buckets (no second fp32 copy)
fsdp_reduce_scatter_every_micro_batch = True  # False: sync the last micro-batch only (less
# communication, but the full fp32 gradient on every rank until then)
tensor_parallel_regather = True  # TP: keep 1/t of a block's gathered inputs, gather again in
# backward (parallelize.py's GatherSequence; eager blocks that are not checkpointed)
# the plan (for MFU and the finish-time estimate); 0 means unknown
flops_per_token = 0
peak_flops = 0.0
planned_mfu = 0.0
init_from_hf = ""  # a Hugging Face Llama directory to start from, when out_dir has no checkpoint
allow_data_change = False  # resume even if the data's fingerprint is not the checkpoint's
dry_run = False  # check config, data (re-hashed) and checkpoint, print the plan of the run, exit
data_sources = ""  # a mixture: "web:0.7,code:0.3" reads data_dir/web and data_dir/code (dataset.py)
tensor_parallel = 1  # ranks of a node that split each block (parallelize.py); divides the node
max_nonfinite_steps = 5  # stop after this many steps in a row with a non-finite loss or grad norm
benchmark_iters = 0  # > 0: warm up, time this many steps, write a "benchmark" record, exit (no checkpoint)
tensorboard = False  # also send metrics.jsonl's records to TensorBoard, in out_dir/tensorboard
wandb_project = ""  # also send them to this Weights & Biases project ("": off), run files in out_dir/wandb
# -----------------------------------------------------------------------------
CONFIG_KEYS = [k for k, v in list(globals().items())
               if not k.startswith("_") and isinstance(v, (bool, int, float, str))]
DEFAULTS = {k: globals()[k] for k in CONFIG_KEYS}
# Allowed values of every setting that is not a bool; configurator.py checks them after all
# overrides and names the key, the value and the range (docs/CONTRACT.md lists the same).
RULES = {
    "n_layer": at_least(1), "n_embd": at_least(1), "n_head": at_least(1),
    "n_kv_head": at_least(1), "head_dim": even_at_least(2),  # RoPE rotates pairs of dimensions
    "ffn_hidden": at_least(1), "vocab_size": at_least(1), "block_size": at_least(1),
    "rope_theta": greater_than(0), "norm_eps": greater_than(0), "init_std": greater_than(0),
    "data_dir": NOT_EMPTY, "out_dir": NOT_EMPTY,
    "global_batch_size": at_least(1), "micro_batch_size": at_least(1),
    "learning_rate": greater_than(0), "min_lr": at_least(0),
    "lr_schedule": one_of("cosine", "wsd"), "warmup_iters": at_least(0),
    "decay_frac": between(0, 1), "max_iters": at_least(1),
    "weight_decay": at_least(0), "beta1": between(0, 1, high_included=False),
    "beta2": between(0, 1, high_included=False), "grad_clip": at_least(0),
    "eval_interval": at_least(1), "eval_iters": at_least(1), "log_interval": at_least(1),
    "ckpt_interval": at_least(1),
    "keep_last_ckpts": at_least(1),  # 0 would delete the checkpoint just saved
    "device": one_of("auto", "cuda", "cpu"), "dtype": one_of("bfloat16", "float32"),
    "parallelism": one_of("fsdp", "hsdp", "ddp"), "seed": at_least(0),
    "loss_chunk_tokens": at_least(1), "tensor_parallel": at_least(1),
    "flops_per_token": at_least(0), "peak_flops": at_least(0), "planned_mfu": between(0, 1),
    "init_from_hf": ANY_TEXT,  # checked when it is used: a run that resumes ignores it
    "data_sources": ANY_TEXT,  # parsed by dataset.parse_sources, with its own message
    "max_nonfinite_steps": at_least(1), "benchmark_iters": at_least(0),
    "checkpointed_layers": at_least(0),
    "wandb_project": ANY_TEXT,
}
RELATIONS = [  # (key, test, what is allowed): settings that must agree with each other
    ("n_kv_head", lambda c: c["n_head"] % c["n_kv_head"] == 0, "a divisor of n_head ({n_head})"),
    ("min_lr", lambda c: c["min_lr"] <= c["learning_rate"],
     "at most learning_rate ({learning_rate})"),
    ("checkpointed_layers", lambda c: c["checkpointed_layers"] <= c["n_layer"],
     "at most n_layer ({n_layer})"),
]
EXIT_REQUEUE = 75  # EX_TEMPFAIL: a checkpoint was saved after SIGTERM/SIGUSR1
PARALLELISM_NAMES = {"fsdp": "FSDP2", "hsdp": "HSDP (FSDP2 on a nodes × GPUs mesh)", "ddp": "DDP"}
DUPLICATE_SIGNAL_WINDOW_S = 5.0  # repeats of a signal this soon are the same request
MFU_WARN_FRACTION = 0.5  # warn when achieved MFU is below this fraction of planned_mfu
BENCHMARK_WARMUP_STEPS = 3  # untimed steps before a benchmark: compilation, allocator, caches


class Config(dict):
    """The settings, readable as cfg.learning_rate."""
    __getattr__ = dict.__getitem__


def log(msg):
    """Print on rank 0 only."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(msg, flush=True)


# -----------------------------------------------------------------------------
# Distributed setup


def setup_distributed(cfg):
    """Return (rank, world_size, device). Starts a process group under torchrun."""
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if "RANK" not in os.environ:  # plain `python train.py`
        return 0, 1, torch.device("cuda" if use_cuda else "cpu")
    local_rank = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), dev


def ranks_per_node():
    """Processes on this node (torchrun's LOCAL_WORLD_SIZE): with the world size, the nodes a
    calibration's step-time model spreads the run over."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def slurm_job_id():
    """The SLURM job this process runs in (None outside SLURM). A requeued job keeps its id: a
    stop and the next process's first step under one id are one restart, which `llama3gen
    calibrate` times."""
    return os.environ.get("SLURM_JOB_ID")


def all_reduce_mean(value, dev):
    """Mean over ranks of a float or a scalar tensor, as a float (gloo has no AVG: SUM / world)."""
    if not dist.is_initialized():
        return float(value)
    t = torch.as_tensor(value, dtype=torch.float64, device=dev).reshape(1)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def any_rank(flag, dev):
    """True on every rank if `flag` is true on any rank."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)], device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# -----------------------------------------------------------------------------
# Learning-rate schedule: a pure function of the step, so the checkpointed step is its state


def get_lr(step, cfg):
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / cfg.warmup_iters
    if cfg.lr_schedule == "cosine":
        progress = (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
        return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (
            cfg.learning_rate - cfg.min_lr)
    # wsd: constant after warmup, then a linear decay over the last decay_frac of the run
    decay_start = cfg.max_iters - int(cfg.decay_frac * cfg.max_iters)
    if step < decay_start:
        return cfg.learning_rate
    progress = (step - decay_start) / max(1, cfg.max_iters - decay_start)
    return cfg.learning_rate + (cfg.min_lr - cfg.learning_rate) * min(progress, 1.0)


# -----------------------------------------------------------------------------
# Model, parallelism, optimizer


MODEL_SHAPE_KEYS = ("n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "ffn_hidden",
                    "vocab_size", "tie_embeddings")


def check_checkpoint_shape(path, cfg):
    """Refuse to resume a checkpoint whose model has another shape than this run's config."""
    saved = checkpoint.read_train_state(path).get("config", {})
    differ = [f"{k} {saved.get(k)!r} there, {cfg[k]!r} here" for k in MODEL_SHAPE_KEYS
              if saved.get(k) != cfg[k]]
    if differ:
        raise ConfigError(f"{path} holds a model of another shape ({'; '.join(differ)}): resume "
                          f"with that run's config, or train this one into another out_dir")


def load_init_from_hf(model, hf_dir):
    """Copy an HF Llama directory's weights into `model`; any problem with it is one line."""
    from export_hf import load_hf_into
    if not os.path.isdir(hf_dir):
        raise ConfigError(f"init_from_hf={hf_dir!r}: not a directory (give a Hugging Face Llama "
                          f"directory, e.g. one export_hf.py wrote)")
    try:
        load_hf_into(model, hf_dir)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, struct.error) as e:
        reason = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
        raise ConfigError(f"init_from_hf={hf_dir!r}: cannot load it: {type(e).__name__}: "
                          f"{reason}") from None


def checkpointed_blocks(cfg):
    """How many blocks, the first ones, recompute their forward in backward."""
    return (cfg.checkpointed_layers or cfg.n_layer) if cfg.activation_checkpointing else 0


def build_model(cfg, dev, world, start_from_hf):
    """The model, with activation checkpointing, compile and its parallelism applied."""
    args = ModelArgs(**{f.name: cfg[f.name] for f in fields(ModelArgs)})
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    with torch.device(dev):
        model = Llama(args, loss_chunk_tokens=cfg.loss_chunk_tokens)
    if start_from_hf:  # continued pre-training: every rank loads the full weights before wrapping
        load_init_from_hf(model, cfg.init_from_hf)
    layers = model.model.layers
    # Recompute blocks' activations in backward: every block, or the first k. Backward meets the
    # last blocks first, while all earlier layers' tensors are held: checkpointing the earliest
    # lowers that peak most (compiler/memory.py).
    checkpointed = checkpointed_blocks(cfg)
    if checkpointed:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
        for i in range(checkpointed):
            layers[i] = checkpoint_wrapper(layers[i])
    if cfg.compile:  # block by block, in place (parameter names do not change)
        for block in layers:
            block.compile()
    return parallelize(model, cfg, dev, world)  # TP, then DDP or FSDP2 (parallelize.py)


def make_optimizer(model, cfg):
    """AdamW; weight decay on matrices (2-D weights, embeddings included), not on norm weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.tensor_parallel > 1:  # plain, TP and FSDP parameters on several meshes: no fused or
        # multi-tensor kernel takes them together, so step one parameter at a time (the same
        # two groups as every other layout, so a checkpoint resumes on any layout)
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                                 foreach=False)
    # fused: one kernel per parameter (CUDA and CPU) instead of a dozen elementwise passes
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=True)


def grad_sync(model, enabled, cfg):
    """Skip the gradient reduction on all but the last micro-step of an accumulation: always
    under DDP; under FSDP2 only if cfg.fsdp_reduce_scatter_every_micro_batch is False.

    By default FSDP2 reduce-scatters after every micro-step (torchtitan's default): skipping it
    leaves every rank holding the full unsharded fp32 gradient, 4 bytes per parameter, which for
    a multi-billion model costs more memory than the communication it saves.
    """
    if hasattr(model, "no_sync"):  # DDP
        return contextlib.nullcontext() if enabled else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync") and not cfg.fsdp_reduce_scatter_every_micro_batch:
        model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def due(step, cfg, interval):
    """Whether train.py evaluates (interval "eval_interval") or saves ("ckpt_interval") after
    `step`: every that many steps, and at the last."""
    return step % cfg[interval] == 0 or step == cfg.max_iters


@torch.no_grad()
def evaluate(model, val, cfg, rank, world, dev, autocast):
    """Mean loss over a fixed set of eval_iters × global_batch_size val sequences."""
    model.eval()
    rng = np.random.default_rng([cfg.seed, 1])  # the same val sequences at every evaluation
    offsets = val.offsets(rng, cfg.eval_iters * cfg.global_batch_size)
    per_rank = len(offsets) // world
    mine = offsets[rank * per_rank:(rank + 1) * per_rank]
    total = 0.0
    for i in range(0, len(mine), cfg.micro_batch_size):
        x, y = val.batch(mine[i:i + cfg.micro_batch_size], dev)
        with autocast:
            _, loss = model(x, y)
        total += loss.item()
    model.train()
    return all_reduce_mean(total / math.ceil(len(mine) / cfg.micro_batch_size), dev)


# -----------------------------------------------------------------------------
# Signals and metrics


class StopRequest:
    """SIGTERM/SIGUSR1 set a flag checked at step boundaries (save, then exit 75).

    The same signal often arrives twice within milliseconds (SLURM signals every process of the
    step and torchrun forwards it again, docs/CONTRACT.md): repeats within
    DUPLICATE_SIGNAL_WINDOW_S of the first are that one request. A signal after the window means
    "stop now": exit at once, without saving (the last checkpoint stays valid).
    """

    def __init__(self):
        self.signal = None
        self.first_at = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    @staticmethod
    def _say(msg):  # os.write: print() from a signal handler can hit a reentrant buffered write
        os.write(sys.stderr.fileno(), f"rank {os.environ.get('RANK', '0')}: {msg}\n".encode())

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        now = time.monotonic()
        if self.signal is None:
            self.signal, self.first_at = signum, now
            self._say(f"{name} received: will save a checkpoint at the end of this step and exit "
                      f"{EXIT_REQUEUE}")
        elif now - self.first_at < DUPLICATE_SIGNAL_WINDOW_S:
            self._say(f"{name} again (a duplicate delivery): still saving at the step boundary")
        else:
            self._say(f"second signal ({name}): exiting now without saving")
            os._exit(128 + signum)


def sync(dev):
    """Wait for the device's queued work, so a clock read after it has timed that work."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def benchmark_record(cfg, world, dev, accum, steps, seconds):
    """The summary of --benchmark_iters: speed over the timed steps and what it ran on."""
    tokens_per_s = steps * cfg.global_batch_size * cfg.block_size / seconds
    return {"event": "benchmark", "steps": steps, "seconds": seconds,
            "step_time_s": seconds / steps, "tokens_per_s": tokens_per_s,
            "mfu": (cfg.flops_per_token * tokens_per_s / (world * cfg.peak_flops)
                    if cfg.flops_per_token and cfg.peak_flops else None),
            "planned_mfu": cfg.planned_mfu or None, **peak_memory(dev),
            "world_size": world, "ranks_per_node": ranks_per_node(), "device": dev.type,
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "shape": {k: cfg[k] for k in (*MODEL_SHAPE_KEYS, "block_size")},
            "layout": {"parallelism": cfg.parallelism if world > 1 else "none",
                       "global_batch_size": cfg.global_batch_size,
                       "micro_batch_size": cfg.micro_batch_size, "grad_accum": accum,
                       "activation_checkpointing": cfg.activation_checkpointing,
                       "checkpointed_layers": cfg.checkpointed_layers,
                       "compile": cfg.compile, "tensor_parallel": cfg.tensor_parallel,
                       "dtype": cfg.dtype if dev.type == "cuda" else "float32"},
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# -----------------------------------------------------------------------------
# The data, and --dry_run


def open_data(cfg, data_world):
    """train.bin and val.bin, after every check that needs no model, and meta.json's fingerprint
    (dataset.py: the files must have the sizes it records)."""
    if cfg.global_batch_size % (data_world * cfg.micro_batch_size):
        raise ConfigError(f"global_batch_size {cfg.global_batch_size} is not a multiple of "
                          f"data-parallel size {data_world} × micro_batch_size "
                          f"{cfg.micro_batch_size}")
    for directory in source_dirs(cfg.data_dir, cfg.data_sources).values():
        vocab, max_id = read_meta(directory)
        if vocab > cfg.vocab_size or max_id >= cfg.vocab_size:
            raise ConfigError(f"{directory}: tokenizer has {vocab} ids (largest used "
                              f"{max_id}), the model's vocab_size is {cfg.vocab_size}")
    train_data, val_data = open_train_data(cfg.data_dir, cfg.data_sources, cfg.block_size,
                                           cfg.seed)
    if cfg.data_sources and train_data.too_small(cfg.global_batch_size):
        raise ConfigError(train_data.too_small(cfg.global_batch_size))
    if train_data.count < cfg.global_batch_size:
        raise ConfigError(f"{train_data.path} holds {train_data.count} sequences of block_size + 1 "
                          f"tokens, fewer than one global batch ({cfg.global_batch_size}): give "
                          "data/prepare.py more text, or lower global_batch_size")
    return train_data, val_data, data_fingerprint(cfg.data_dir, cfg.data_sources)


def source_epochs(train_data, step, cfg):
    """{"source_epochs": {source: epochs}} for a mixture (logged and checkpointed), else {}."""
    if not cfg.data_sources:
        return {}
    return {"source_epochs": train_data.source_epochs_after(step, cfg.global_batch_size)}


def out_dir_problem(out_dir):
    """Why the run could not create out_dir (or write into it), found without creating it: the
    dry run's stand-in for set_up's makedirs. None where it can."""
    path = os.path.abspath(out_dir)
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        return f"out_dir={out_dir!r}: {path} is not a directory; give another out_dir"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"out_dir={out_dir!r}: no permission to write in {path}; give another out_dir"
    return None


def check_without_training(cfg):
    """--dry_run: what a run checks before its first step (the config, the data re-hashed against
    meta.json, the newest checkpoint and whether it resumes onto this data), on the CPU, without
    a process group, a GPU or writing anything; then the run's tokens and epochs. Exit 0."""
    world = int(os.environ.get("WORLD_SIZE", "1"))  # under torchrun: the run's world size
    problem = check_tensor_parallel(cfg, world)
    if problem:
        raise ConfigError(problem)
    train_data, _, fingerprint = open_data(cfg, world // cfg.tensor_parallel)
    problem = out_dir_problem(cfg.out_dir)
    if problem:
        raise ConfigError(problem)
    if fingerprint is None:
        log(f"data: WARNING: {cfg.data_dir}/meta.json has no fingerprint (prepared by an older "
            f"data/prepare.py): the data cannot be checked; prepare it again to get one")
    else:
        verify_fingerprint(cfg.data_dir, fingerprint, log)
    with torch.device("meta"):  # shapes only: no memory, no device
        model = Llama(ModelArgs(**{f.name: cfg[f.name] for f in fields(ModelArgs)}))
    log(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, {cfg.n_layer} "
        f"layers, d {cfg.n_embd}; {world} rank(s); device {cfg.device!r} (torch sees "
        f"{torch.cuda.device_count()} CUDA GPU(s) here)")
    latest = checkpoint.find_latest_valid(cfg.out_dir, log) if os.path.isdir(cfg.out_dir) else None
    step = 0
    if latest:
        check_checkpoint_shape(latest, cfg)
        state = checkpoint.read_train_state(latest)
        for change in check_same_data(state.get("data", {}), train_data, cfg.allow_data_change,
                                      fingerprint):
            log(f"WARNING: allow_data_change: would resume on changed data: {change}")
        step = state["step"]
        log(f"checkpoint: {latest} verifies and fits this config; the run resumes at step "
            f"{step:,} of {cfg.max_iters:,}")
    else:
        log(f"checkpoint: none in {cfg.out_dir}; the run starts at step 0"
            + (f" from the Hugging Face weights in {cfg.init_from_hf}" if cfg.init_from_hf else ""))
    log(train_data.describe_run(cfg.max_iters, cfg.global_batch_size))
    log("dry run: every check passed; nothing was trained or written")
    return 0


def format_duration(seconds):
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


# -----------------------------------------------------------------------------


def main(argv):
    """Train; returns the exit status. metrics.jsonl and the trackers are closed however the
    run ends (an exception too: W&B then marks the run failed)."""
    with contextlib.ExitStack() as on_exit:
        return train(argv, on_exit)


def train(argv, on_exit):
    """The whole run, step by step; each step is a function below."""
    stop = StopRequest()  # from the start: a signal during setup still ends in a save and 75
    cfg = Config(load_config(DEFAULTS, argv, RULES, RELATIONS))
    if cfg.dry_run:
        return check_without_training(cfg)
    run = set_up(cfg)
    latest = newest_checkpoint(cfg, run)
    model, optimizer, autocast, sharded = build_training(cfg, run, start_from_hf=not latest
                                                         and bool(cfg.init_from_hf))
    step, tokens_seen = resume(cfg, run, latest, model, optimizer) if latest else (0, 0)
    log(run.train_data.describe_run(cfg.max_iters, cfg.global_batch_size))
    log_plan(cfg, run)
    metrics = on_exit.enter_context(Metrics(cfg, run.master, resumed_step=step if latest else None))
    metrics.write(event="start", step=step, world_size=run.world,
                  ranks_per_node=ranks_per_node(), resumed_from=str(latest or ""),
                  device=run.dev.type, grad_accum=run.accum, config=dict(cfg),
                  time=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), unix_time=time.time())

    def save():
        seconds = save_checkpoint(cfg, run, model, optimizer, sharded, step, tokens_seen, metrics)
        progress.add_pause("ckpt_interval", seconds)

    # --- the training loop
    model.train()
    nonfinite_in_a_row, last_saved, status = 0, step if latest else None, 0
    # --benchmark_iters=N: after a few warm-up steps, time N steps; no evaluation, no checkpoint
    benchmark = cfg.benchmark_iters > 0
    timed_from = step + min(BENCHMARK_WARMUP_STEPS, cfg.benchmark_iters)
    last_step = timed_from + cfg.benchmark_iters if benchmark else cfg.max_iters
    warm_up_steps, benchmark_t0 = timed_from - step, None
    progress = Progress(cfg, run, metrics, last_step)
    while step < last_step:
        if benchmark and step == timed_from:
            sync(run.dev)
            benchmark_t0 = time.time()
        t0 = time.time()
        lr = get_lr(step, cfg)
        loss_value, grad_norm = train_step(cfg, run, model, optimizer, autocast, step, lr)
        updated = math.isfinite(loss_value) and math.isfinite(grad_norm)
        nonfinite_in_a_row = 0 if updated else nonfinite_in_a_row + 1
        if not updated:
            log(f"step {step + 1}: WARNING: non-finite loss {loss_value} or grad norm {grad_norm}: "
                f"update skipped ({nonfinite_in_a_row} in a row)")
            metrics.write(event="skipped", step=step + 1, loss=loss_value, grad_norm=grad_norm)
        step += 1
        tokens_seen += run.tokens_per_step
        progress.add(step, time.time() - t0)

        if nonfinite_in_a_row >= cfg.max_nonfinite_steps:
            log(f"ERROR: stopping at step {step}: {nonfinite_in_a_row} steps in a row had a "
                f"non-finite loss or gradient norm (last: loss {loss_value}, grad norm "
                f"{grad_norm}). "
                f"Weights were not updated by those steps; the last checkpoint in "
                f"{cfg.out_dir}/checkpoints is from before. Lower learning_rate or check the data.")
            metrics.write(event="stopped_nonfinite", step=step)
            status = 1
            break
        if step % cfg.log_interval == 0 or step == last_step:
            progress.report(step, tokens_seen, loss_value, lr, grad_norm)
        if not benchmark and due(step, cfg, "eval_interval"):
            t_eval = time.time()
            val_loss = evaluate(model, run.val_data, cfg, run.data_rank, run.data_world, run.dev,
                                autocast)  # its all-reduce waits for every rank's forwards
            eval_s = time.time() - t_eval
            progress.add_pause("eval_interval", eval_s)
            log(f"step {step}: val loss {val_loss:.4f} ({eval_s:.3g} s)")
            metrics.write(step=step, val_loss=val_loss, eval_time_s=eval_s)
        if not benchmark and due(step, cfg, "ckpt_interval"):
            save()
            last_saved = step
        if any_rank(stop.signal is not None, run.dev):  # every rank stops at the same step
            if last_saved != step and not benchmark:
                save()
            log(f"stopping at step {step} after a signal; exit {EXIT_REQUEUE} (requeue to resume)")
            metrics.write(event="requeue", step=step, unix_time=time.time(),
                          slurm_job_id=slurm_job_id())
            status = EXIT_REQUEUE
            break

    if benchmark and status == 0:
        sync(run.dev)
        report_benchmark(cfg, run, metrics, warm_up_steps, time.time() - benchmark_t0)
    metrics.close(status)
    return status


# -----------------------------------------------------------------------------
# The steps of train(), in order


@dataclass
class Run:
    """Where this process trains and on what, fixed once set up."""

    rank: int
    world: int
    dev: torch.device
    data_rank: int  # the ranks of a tensor-parallel group read the same data
    data_world: int
    accum: int  # micro-batches per optimizer step
    train_data: object
    val_data: object
    fingerprint: dict | None  # meta.json's, saved in every checkpoint
    tokens_per_step: int

    @property
    def master(self):
        return self.rank == 0


def set_up(cfg):
    """The process group, every check that needs the world size or the data, the data, out_dir."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device='cuda' but torch sees no CUDA GPU (torch {torch.__version__}, "
                          f"CUDA build: {torch.version.cuda or 'none'}): use --device=cpu or auto")
    rank, world, dev = setup_distributed(cfg)
    problem = check_tensor_parallel(cfg, world) or check_trackers(cfg)
    if problem:
        raise ConfigError(problem)
    data_world = world // cfg.tensor_parallel
    train_data, val_data, fingerprint = open_data(cfg, data_world)
    try:
        os.makedirs(cfg.out_dir, exist_ok=True)
    except OSError as e:  # a file of that name, no permission, ...
        raise ConfigError(f"out_dir={cfg.out_dir!r}: cannot create it as a directory "
                          f"({e.strerror})") from None
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Run(rank=rank, world=world, dev=dev, data_rank=rank // cfg.tensor_parallel,
               data_world=data_world,
               accum=cfg.global_batch_size // (data_world * cfg.micro_batch_size),
               train_data=train_data, val_data=val_data, fingerprint=fingerprint,
               tokens_per_step=cfg.global_batch_size * cfg.block_size)


def newest_checkpoint(cfg, run):
    """The newest checkpoint that verifies (rank 0 reads and hashes, the others are told), after
    removing interrupted saves; None to start fresh."""
    latest = None
    if run.master:
        checkpoint.remove_partial_saves(cfg.out_dir, log)
        latest = checkpoint.find_latest_valid(cfg.out_dir, log)
    if run.world > 1:
        box = [str(latest) if latest else None]
        dist.broadcast_object_list(box, src=0)
        latest = box[0]
    if latest:
        check_checkpoint_shape(latest, cfg)
    return latest


def build_training(cfg, run, start_from_hf):
    """(model, optimizer, autocast context, sharded): the model on its layout and its AdamW."""
    model, sharded, fsdp = build_model(cfg, run.dev, run.world, start_from_hf)
    optimizer = make_optimizer(model, cfg)
    # FSDP2 applies bf16 through its MixedPrecisionPolicy; DDP / one process use autocast.
    use_bf16 = run.dev.type == "cuda" and cfg.dtype == "bfloat16"
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 and not fsdp
                else contextlib.nullcontext())
    n_params = sum(p.numel() for p in model.parameters())  # a DTensor reports its full size
    layout = PARALLELISM_NAMES[cfg.parallelism] if run.data_world > 1 else "one process"
    if cfg.tensor_parallel > 1:
        layout = (f"tensor parallel {cfg.tensor_parallel}"
                  + (f" × {layout}" if run.data_world > 1 else ""))
    recomputed = checkpointed_blocks(cfg)
    log(f"model: {n_params:,} parameters, {cfg.n_layer} layers, d {cfg.n_embd}; "
        f"{run.world} rank(s) on {run.dev.type}, {layout}; {run.tokens_per_step:,} tokens/step = "
        f"{run.data_world} × {cfg.micro_batch_size} × {run.accum} accum × {cfg.block_size}"
        + (f"; activation checkpointing of {recomputed} of {cfg.n_layer} blocks" if recomputed
           else ""))
    if start_from_hf:
        log(f"initialised from the Hugging Face weights in {cfg.init_from_hf}")
    return model, optimizer, autocast, sharded


def resume(cfg, run, latest, model, optimizer):
    """Load the checkpoint into model and optimizer, refusing other data unless told to;
    returns (step, tokens seen)."""
    state = checkpoint.load(latest, model, optimizer, log)
    for change in check_same_data(state.get("data", {}), run.train_data, cfg.allow_data_change,
                                  run.fingerprint):
        log(f"WARNING: allow_data_change: resuming on changed data: {change}")
    saved = state["config"]
    changed = [k for k in ("seed", "global_batch_size", "block_size", "data_dir")
               if saved.get(k) != cfg[k]]
    log(f"resumed from {latest} at step {state['step']}" +
        (f" (WARNING: {', '.join(changed)} changed: the data order differs from the saved run)"
         if changed else ""))
    return state["step"], state["tokens_seen"]


def log_plan(cfg, run):
    """The plan's time for the run, when the config carries the plan's FLOPs and MFU."""
    if cfg.flops_per_token and cfg.peak_flops and cfg.planned_mfu:
        plan_s = (cfg.max_iters * run.tokens_per_step * cfg.flops_per_token
                  / (run.world * cfg.peak_flops * cfg.planned_mfu))
        log(f"plan: {cfg.max_iters} steps × {run.tokens_per_step:,} tokens × "
            f"{cfg.flops_per_token:,} FLOPs/token at {cfg.planned_mfu:.0%} MFU on {run.world} "
            f"device(s): {format_duration(plan_s)}")


def train_step(cfg, run, model, optimizer, autocast, step, lr):
    """One optimizer step on global step `step`'s sequences (this rank's share, in micro-batches):
    returns (mean loss, gradient norm), both global. A non-finite one skips the update, the same
    decision on every rank."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    data = run.train_data
    offsets = data.starts(data.step_sequences(step, cfg.global_batch_size, run.data_rank,
                                              run.data_world))
    loss_sum = torch.zeros((), device=run.dev)  # summed on the device: no sync per micro-step
    for micro in range(run.accum):
        x, y = data.batch(offsets[micro * cfg.micro_batch_size:
                                  (micro + 1) * cfg.micro_batch_size], run.dev)
        with grad_sync(model, micro == run.accum - 1, cfg):
            with autocast:
                _, loss = model(x, y)
            (loss / run.accum).backward()
        loss_sum += loss.detach().float()
    loss_value = all_reduce_mean(loss_sum / run.accum, run.dev)
    grad_norm = grad_norm_and_clip(model, cfg.grad_clip)
    if math.isfinite(loss_value) and math.isfinite(grad_norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, grad_norm


class Progress:
    """Speed and the finish estimate, logged every log_interval steps (console and metrics)."""

    def __init__(self, cfg, run, metrics, last_step):
        self.cfg, self.run, self.metrics = cfg, run, metrics
        self.last_step = last_step  # this process's: max_iters, or a benchmark's end
        self.steps_timed, self.time_in_steps = 0, 0.0  # since the start, for the estimate
        # what stops training between steps, by the setting that schedules it: [count, seconds]
        self.pauses = {"eval_interval": [0, 0.0], "ckpt_interval": [0, 0.0]}
        self.interval_time, self.interval_steps = 0.0, 0  # since the last report
        self.warned_mfu = False

    def add(self, step, seconds):
        self.steps_timed += 1
        self.time_in_steps += seconds
        self.interval_time += seconds
        self.interval_steps += 1
        if self.steps_timed == 1:  # this process has trained: a restart ends here
            self.metrics.write(event="first_step", step=step, unix_time=time.time(),
                               slurm_job_id=slurm_job_id())

    def add_pause(self, interval, seconds):
        """An evaluation ("eval_interval") or a checkpoint save ("ckpt_interval") took seconds."""
        self.pauses[interval][0] += 1
        self.pauses[interval][1] += seconds

    def eta_seconds(self, step):
        """The steps left at this process's mean step time, and the evaluations and saves left
        (those after this step's report included) at their mean times once one was timed."""
        eta = (self.last_step - step) * self.time_in_steps / self.steps_timed
        if self.last_step != self.cfg.max_iters:  # a benchmark: it evaluates and saves nothing
            return eta
        for interval, (count, seconds) in self.pauses.items():
            if count:  # the steps in [step, last] it is due() at: every cfg[interval]-th, the last
                last, every = self.last_step, self.cfg[interval]
                eta += (last // every - (step - 1) // every + (last % every != 0)) * seconds / count
        return eta

    def report(self, step, tokens_seen, loss_value, lr, grad_norm):
        cfg, run = self.cfg, self.run
        tokens_per_s = self.interval_steps * run.tokens_per_step / self.interval_time
        epoch = run.train_data.epochs_after(step, cfg.global_batch_size)
        record = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                  "tokens_per_s": tokens_per_s,
                  "step_time_s": self.interval_time / self.interval_steps,
                  "tokens_seen": tokens_seen, "epoch": epoch,
                  "unique_tokens": run.train_data.unique_tokens_after(step, cfg.global_batch_size),
                  **source_epochs(run.train_data, step, cfg),
                  **{k: v for k, v in peak_memory(run.dev).items() if v is not None},
                  "unix_time": time.time()}  # the process's last sign of life, should it die
        line = (f"step {step}/{self.last_step} | loss {loss_value:.4f} | lr {lr:.3e} | "
                f"grad norm {grad_norm:.3f} | {tokens_per_s:,.0f} tok/s | epoch {epoch:.3f}")
        if "source_epochs" in record:  # a mixture: each source's own epochs
            line += " (" + ", ".join(f"{n} {e:.3f}" for n, e in record["source_epochs"].items()) + ")"
        if cfg.flops_per_token and cfg.peak_flops:
            record["mfu"] = cfg.flops_per_token * tokens_per_s / (run.world * cfg.peak_flops)
            line += f" | MFU {record['mfu']:.1%}"
            if cfg.planned_mfu:
                line += f" (plan {cfg.planned_mfu:.0%})"
        record["eta_s"] = self.eta_seconds(step)
        line += f" | eta {format_duration(record['eta_s'])}"
        self.metrics.write(**record)  # first the durable record, then the console
        log(line)
        self.interval_time, self.interval_steps = 0.0, 0
        self._warn_if_slow(step, record)

    def _warn_if_slow(self, step, record):
        """The first interval holds compilation and warm-up: judge MFU after it, warn once."""
        cfg = self.cfg
        if ("mfu" in record and cfg.planned_mfu and not self.warned_mfu
                and self.steps_timed > cfg.log_interval
                and record["mfu"] < MFU_WARN_FRACTION * cfg.planned_mfu):
            self.warned_mfu = True
            log(f"WARNING: achieved MFU {record['mfu']:.1%} is far below the planned "
                f"{cfg.planned_mfu:.0%}: at this speed the run takes about "
                f"{cfg.planned_mfu / record['mfu']:.1f}× the planned time "
                f"(finish in {format_duration(record['eta_s'])})")
            self.metrics.write(event="mfu_below_plan", step=step, mfu=record["mfu"],
                               planned_mfu=cfg.planned_mfu)


def save_checkpoint(cfg, run, model, optimizer, sharded, step, tokens_seen, metrics):
    """A checkpoint of step `step`, with where the data stands (checkpoint.py writes it whole);
    returns how long training stopped for it (`llama3gen calibrate` plans checkpoint writes by
    it)."""
    data = run.train_data
    train_state = {"step": step, "tokens_seen": tokens_seen, "config": dict(cfg),
                   "data": {"sampler": "each sequence once per epoch, numpy "
                                       "default_rng([seed, 2, epoch]).permutation (dataset.py)",
                            "next_step": step, "n_train_tokens": data.n_tokens,
                            "fingerprint": run.fingerprint, "sequences": data.count,
                            "epoch": data.epochs_after(step, cfg.global_batch_size),
                            **source_epochs(data, step, cfg)}}
    t0 = time.time()
    path = checkpoint.save(cfg.out_dir, step, model, optimizer, train_state, sharded=sharded,
                           keep_last=cfg.keep_last_ckpts, log=log)
    seconds = time.time() - t0
    log(f"saved checkpoint {path} ({seconds:.1f}s)")
    if run.master:
        metrics.write(event="checkpoint", step=step, seconds=seconds,
                      bytes=checkpoint.saved_bytes(path), world_size=run.world)
    return seconds


def report_benchmark(cfg, run, metrics, warm_up_steps, seconds):
    """--benchmark_iters: the timed steps' record (what `llama3gen calibrate` reads)."""
    record = benchmark_record(cfg, run.world, run.dev, run.accum, cfg.benchmark_iters, seconds)
    metrics.write(**record)
    log(f"benchmark: {record['steps']} steps after {warm_up_steps} warm-up: "
        f"{record['step_time_s']:.3f} s/step, {record['tokens_per_s']:,.0f} tok/s"
        + (f", MFU {record['mfu']:.1%}" if record["mfu"] is not None else "")
        + f"; recorded in {cfg.out_dir}/metrics.jsonl (llama3gen calibrate reads it)")


def finish(status):
    """Exit. Under torchrun, tear the process group down first and leave with os._exit: gloo
    has been seen to abort in interpreter shutdown after a clean run otherwise."""
    sys.stdout.flush()
    sys.stderr.flush()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    try:
        exit_status = main(sys.argv[1:])
    except ConfigError as e:
        print(f"train.py: configuration error: {e}", file=sys.stderr, flush=True)
        exit_status = 2
    except checkpoint.CheckpointError as e:
        print(f"train.py: ERROR: {e}", file=sys.stderr, flush=True)
        exit_status = 1
    except KeyboardInterrupt:  # Ctrl-C: metrics.jsonl says so; the last checkpoint stays valid
        print("train.py: stopped by hand (Ctrl-C), without saving; the same command resumes "
              "from the last checkpoint", file=sys.stderr, flush=True)
        exit_status = 128 + signal.SIGINT
    finish(exit_status)
