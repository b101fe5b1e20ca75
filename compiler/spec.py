"""The spec: what the user wrote, validated. Pydantic v2, unknown keys rejected.

`load_spec(path)` is the only way in: it parses YAML safely, validates, and turns every problem
into a UserError naming file:line:column, the field path, what was wrong and what is allowed.
"""

# No `from __future__ import annotations` here: with real annotations pydantic builds these
# models without compiling each annotation string first (1.6% of `solve`'s instructions).
import functools
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr,
                      ValidationError, ValidationInfo, field_validator, model_serializer,
                      model_validator)
from pydantic_core import PydanticCustomError

from . import hardware, laws
from .errors import UserError

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
# Cluster strings reach sbatch lines and shell scripts: allow what SLURM itself allows in
# partition/account/qos names, nothing a shell would interpret.
CLUSTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
TIME_LIMIT_PATTERN = r"^([0-9]{1,3}-)?[0-9]{1,3}:[0-9]{2}:[0-9]{2}$"  # not \d: any Unicode digit
SIGNAL_SLACK_S = 60  # SLURM may send --signal up to this much earlier than asked

# A search space larger than this is refused before it is enumerated (memory, not patience):
# enumeration and planning hold ~500 bytes per shape, so 4M shapes peak near 2 GB (50M needed 24).
MAX_CANDIDATES = 4_000_000
# Shapes well past any trained model (LLaMA 3 405B: 126 layers, d_model 16384), and small enough
# that parameter and FLOP counts stay exact in int64 whatever the other fields say.
MAX_LAYERS = 1024
MAX_D_MODEL = 131_072
MAX_BYTES = 1 << 20  # specs are hand-written; a megabyte of YAML is not a spec

MFU = Annotated[float, Field(ge=hardware.MIN_MFU, le=1, allow_inf_nan=False)]


def _invalid(kind: str, message: str, fix: str) -> PydanticCustomError:
    """A validation error that carries its own fix (shown by _fix_for)."""
    return PydanticCustomError(kind, message.replace("{", "{{").replace("}", "}}"), {"fix": fix})


def _refuse_bool(value):
    # pydantic's lax mode reads True as 1; YAML reads yes/no/on/off/true/false as booleans, so
    # `nodes: yes` or `seed: no` would silently become 1 or 0.
    if isinstance(value, bool):
        raise _invalid("bool_not_number", "a YAML boolean is not a number",
                       "write a number; YAML reads true/false, yes/no and on/off as booleans")
    return value


NotBool = BeforeValidator(_refuse_bool)


def _is_numeric(annotation) -> bool:
    """int or float, possibly Optional or Annotated (not inside a list or a model)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _is_numeric(args[0])
    if origin in (Union, types.UnionType):
        return any(_is_numeric(a) for a in args)
    return annotation in (int, float)


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value, info: ValidationInfo):
        # Strings stay allowed ("5.0e12", quoted numbers are common); booleans do not.
        if isinstance(value, bool) and _is_numeric(cls.model_fields[info.field_name].annotation):
            _refuse_bool(value)
        return value


class Budget(StrictModel):
    """Exactly one of: FLOPs, GPU-hours, or days on the spec's hardware. GPU-hours and days
    are wall clock: the run trains for what checkpoint writes and failures leave of them."""

    flops: Annotated[float, Field(gt=0, le=1e32, allow_inf_nan=False)] | None = None
    gpu_hours: Annotated[float, Field(gt=0, le=1e9, allow_inf_nan=False)] | None = None
    days: Annotated[float, Field(gt=0, le=3650, allow_inf_nan=False)] | None = None

    @model_validator(mode="after")
    def _exactly_one(self):
        given = [k for k in ("flops", "gpu_hours", "days") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of flops, gpu_hours or days"
                             + (f" (got {', '.join(given)})" if given else ""))
        return self


class CustomGPU(StrictModel):
    name: Annotated[str, Field(pattern=CLUSTER_NAME_PATTERN)]
    bf16_tflops: Annotated[float, Field(ge=1e-3, le=1e6, allow_inf_nan=False)]
    memory_gb: Annotated[float, Field(gt=0, le=1e5, allow_inf_nan=False)]
    default_mfu: MFU = 0.4

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, value):
        # hardware.GPU.is_cpu goes by name: a GPU called "cpu" would train on host cores in fp32.
        if value.lower() == hardware.CPU_PSEUDO_DEVICE:
            raise _invalid("reserved_name", "this name is reserved for the CPU pseudo-device",
                           "give the custom GPU another name, or write `gpu: cpu` to train on "
                           "host cores")
        return value


class Interconnect(StrictModel):
    """Per-GPU bandwidth in GB/s, one direction: inside a node, and between nodes."""

    intra_node_GBps: Annotated[float, Field(gt=0, le=1e5, allow_inf_nan=False)]
    inter_node_GBps: Annotated[float, Field(gt=0, le=1e5, allow_inf_nan=False)]


class Hardware(StrictModel):
    gpu: Union[str, CustomGPU] = "a100-80gb"
    gpus_per_node: Annotated[int, Field(ge=1, le=1024)] = 8
    nodes: Annotated[int, Field(ge=1, le=100_000)] = 1
    mfu: MFU | None = None
    usd_per_gpu_hour: Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)] | None = None
    cpus_per_gpu: Annotated[int, Field(ge=1, le=1024)] = 8
    host_memory_gb: Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)] | None = None
    interconnect: Interconnect | None = None  # overrides the catalog's (hardware.INTERCONNECT)
    # A `llama3gen calibrate -o` file, relative to the spec file: its measured MFU replaces the
    # step-time model's (compiler/calibrate.py); read once here, kept in _calibration.
    calibration: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    _calibration: dict | None = PrivateAttr(default=None)

    @field_validator("calibration")
    @classmethod
    def _readable_calibration(cls, value, info: ValidationInfo):
        if value is not None:
            _calibration_file(value, info)  # its errors point at the key
        return value

    @model_validator(mode="after")
    def _one_measured_mfu(self, info: ValidationInfo):
        if self.mfu is not None and self.calibration is not None:
            raise _invalid("mfu_and_calibration", "hardware.mfu and hardware.calibration both give "
                           "a measured MFU", "keep one: hardware.calibration (its file holds the "
                           "MFU a run measured) or hardware.mfu")
        if self.calibration is not None:
            self._calibration = _calibration_file(self.calibration, info)
        return self

    @property
    def calibration_data(self) -> dict | None:
        """The calibration file's contents (compiler/calibrate.py), when the spec names one."""
        return self._calibration

    @property
    def measured_mfu(self) -> float | None:
        """A measured MFU: the spec's hardware.mfu or its calibration's; None: predict it."""
        return self._calibration["mfu"] if self._calibration else self.mfu

    @property
    def measured_memory_ratio(self) -> float | None:
        """The calibration's measured / predicted peak memory (None: not measured, or none)."""
        peak = (self._calibration or {}).get("peak_memory") or {}
        ratio = peak.get("measured_over_predicted")
        return float(ratio) if isinstance(ratio, (int, float)) and ratio > 0 else None

    @property
    def measured_evaluation_ratio(self) -> float | None:
        """The calibration's measured / assumed share of a step an evaluated batch takes (None:
        no evaluation timed, or no calibration)."""
        timed = (self._calibration or {}).get("evaluation") or {}
        return timed.get("measured_over_predicted")

    @field_validator("gpu")
    @classmethod
    def _known_gpu(cls, value):
        if isinstance(value, str) and hardware.lookup(value) is None:
            known = ", ".join(sorted(hardware.CATALOG))
            raise ValueError(f"unknown GPU {value!r}; catalog: {known}; or give "
                             "{name, bf16_tflops, memory_gb}")
        return value

    def device(self) -> hardware.GPU:
        if isinstance(self.gpu, str):
            return hardware.lookup(self.gpu)
        g = self.gpu
        return hardware.GPU(g.name, g.bf16_tflops, g.memory_gb, g.default_mfu, "spec (custom GPU)")

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def effective_mfu(self) -> float:
        measured = self.measured_mfu
        return measured if measured is not None else self.device().default_mfu


def _calibration_file(name: str, info: ValidationInfo) -> dict:
    """hardware.calibration read relative to the spec's directory (cwd for text without a file)."""
    from .calibrate import load_calibration
    base = Path((info.context or {}).get("spec_dir") or ".")
    try:
        return load_calibration(base / name)
    except ValueError as exc:
        raise _invalid("calibration_file", str(exc), "write one with `llama3gen calibrate RUN_DIR "
                       "-o FILE` and give its path relative to the spec file") from None


class FFNLlama3(StrictModel):
    """LLaMA-3's rule: f = multiple_of·ceil(int(mult·int(8d/3))/multiple_of) (8B: 1.3, 1024)."""

    llama3_multiplier: Annotated[float, Field(gt=0, le=64, allow_inf_nan=False)]
    multiple_of: Annotated[int, Field(ge=1, le=65536)] = 256


class FFNRatio(StrictModel):
    """f = ratio·d rounded down to a multiple (the reference: 3.5·d to 256)."""

    ratio: Annotated[float, Field(gt=0, le=64, allow_inf_nan=False)]
    multiple_of: Annotated[int, Field(ge=1, le=65536)] = 256


class Model(StrictModel):
    vocab_size: Annotated[int, Field(ge=2, le=10_000_000)] = 128256
    seq_len: Annotated[int, Field(ge=8, le=1_048_576)] = 2048
    head_dim: Annotated[int, Field(ge=8, le=1024)] = 128
    kv_heads: Annotated[int, Field(ge=1, le=1024)] = 8
    ffn: Union[FFNLlama3, FFNRatio] = FFNLlama3(llama3_multiplier=1.3, multiple_of=256)
    rope_theta: Annotated[float, Field(gt=0, le=1e12, allow_inf_nan=False)] = 500000.0
    norm_eps: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)] = 1e-5
    tie_embeddings: bool = False

    @field_validator("head_dim")
    @classmethod
    def _even_head_dim(cls, value):
        if value % 2:
            raise ValueError("head_dim must be even (RoPE rotates pairs of dimensions)")
        return value


class IntRange(StrictModel):
    min: Annotated[int, Field(ge=1, le=1 << 30)]
    max: Annotated[int, Field(ge=1, le=1 << 30)]
    step: Annotated[int, Field(ge=1, le=1 << 30)] = 1

    @model_validator(mode="after")
    def _ordered(self):
        if self.min > self.max:
            raise ValueError(f"empty range: min {self.min} > max {self.max}")
        return self

    def values(self) -> list[int]:
        return list(range(self.min, self.max + 1, self.step))

    def count(self) -> int:
        return (self.max - self.min) // self.step + 1


IntChoices = Annotated[list[Annotated[int, Field(ge=1, le=1 << 30), NotBool]], Field(min_length=1, max_length=100_000)]


class Bounds(StrictModel):
    min: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    max: Annotated[float, Field(gt=0, allow_inf_nan=False)] | None = None

    @model_validator(mode="after")
    def _ordered(self):
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"empty bounds: min {self.min:g} > max {self.max:g}")
        return self


class CustomLaw(StrictModel):
    # Bounds wide of every published fit (alpha, beta 0.07-0.8; A, B 10^2-10^4) that keep the
    # closed-form optimum (alpha·A/(beta·B))^(1/(alpha+beta)) finite: beta 1e-300 overflowed it.
    E: Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]
    A: Annotated[float, Field(ge=1e-6, le=1e6, allow_inf_nan=False)]
    B: Annotated[float, Field(ge=1e-6, le=1e6, allow_inf_nan=False)]
    alpha: Annotated[float, Field(ge=0.05, le=5, allow_inf_nan=False)]
    beta: Annotated[float, Field(ge=0.05, le=5, allow_inf_nan=False)]
    name: Annotated[str, Field(pattern=NAME_PATTERN)] = "custom"


class TokensPerParamLaw(StrictModel):
    tokens_per_param: Annotated[float, Field(ge=1e-3, le=1e6, allow_inf_nan=False)]


class FileLaw(StrictModel):
    # A `llama3gen fit -o` file, relative to the spec file (docs/FIT.md); read once here.
    file: Annotated[str, Field(min_length=1, max_length=4096)]
    _law: laws.ScalingLaw | None = PrivateAttr(default=None)
    # What else the file says (runs, CIs, bootstrap refits): plan.law.fit; None where a plan
    # re-solves under one of its resampled laws (compiler/lawfit.py).
    _fitted: laws.LawFile | None = PrivateAttr(default=None)

    @field_validator("file")
    @classmethod
    def _readable(cls, value, info: ValidationInfo):
        _law_file(value, info)  # its errors point at the key
        return value

    @model_validator(mode="after")
    def _read(self, info: ValidationInfo):
        self._fitted = _law_file(self.file, info)
        self._law = self._fitted.law
        return self


def _law_file(name: str, info: ValidationInfo) -> laws.LawFile:
    base = Path((info.context or {}).get("spec_dir") or ".")
    try:
        return laws.read_law_file(base / name, name)
    except ValueError as exc:
        raise _invalid("law_file", str(exc), "write one with `llama3gen fit RUNS.csv -o FILE` "
                       "and give its path relative to the spec file") from None


class Search(StrictModel):
    layers: Union[IntRange, IntChoices] = IntRange(min=4, max=64)
    hidden: Union[IntRange, IntChoices] = IntRange(min=256, max=8192, step=128)
    # d_model / n_layers. Kaplan et al. 2020 (Fig. 5): loss is within a few percent over aspect
    # ratios of about 20-200; the LLaMA-3 family sits at 100-128. The laws do not see shape, so the
    # bounds keep the search where they were fitted.
    aspect: Bounds = Bounds(min=32, max=192)
    scaling_law: Union[str, CustomLaw, TokensPerParamLaw, FileLaw] = laws.DEFAULT_LAW
    flops: Literal["6N", "exact"] = "6N"
    top_k: Annotated[int, Field(ge=1, le=1000)] = 10
    # Shapes whose loss is within this fraction of the best are treated as equally good; among
    # them the one that trains fastest (and fits) wins. Kaplan 2020: loss is flat in shape.
    near_optimal: Annotated[float, Field(ge=0, le=0.1, allow_inf_nan=False)] = 0.0001

    @field_validator("layers", "hidden")
    @classmethod
    def _within_shape_limits(cls, value, info):
        limit = MAX_LAYERS if info.field_name == "layers" else MAX_D_MODEL
        top = value.max if isinstance(value, IntRange) else max(value)
        if top > limit:
            raise ValueError(f"{info.field_name} goes up to {top:,}; llama3gen searches at most "
                             f"{limit:,} ({'layers' if info.field_name == 'layers' else 'd_model'})")
        return value

    @field_validator("scaling_law")
    @classmethod
    def _known_law(cls, value):
        if isinstance(value, str) and value not in laws.CATALOG:
            raise ValueError(f"unknown scaling law {value!r}; catalog: "
                             f"{', '.join(sorted(laws.CATALOG))}; or give {{E, A, B, alpha, beta}}"
                             " or {tokens_per_param: 20}")
        return value

    def law(self):
        if isinstance(self.scaling_law, str):
            return laws.CATALOG[self.scaling_law]
        if isinstance(self.scaling_law, FileLaw):
            return self.scaling_law._law
        if isinstance(self.scaling_law, TokensPerParamLaw):
            return laws.TokensPerParamRule(self.scaling_law.tokens_per_param,
                                           laws.CATALOG[laws.DEFAULT_LAW])
        c = self.scaling_law
        return laws.ScalingLaw(c.name, c.E, c.A, c.B, c.alpha, c.beta, "spec (custom fit)")

    def layer_values(self) -> list[int]:
        return self.layers.values() if isinstance(self.layers, IntRange) else sorted(set(self.layers))

    def hidden_values(self) -> list[int]:
        return self.hidden.values() if isinstance(self.hidden, IntRange) else sorted(set(self.hidden))

    @model_validator(mode="after")
    def _bounded_space(self):
        def size(axis):
            return axis.count() if isinstance(axis, IntRange) else len(axis)
        total = size(self.layers) * size(self.hidden)
        if total > MAX_CANDIDATES:
            raise ValueError(f"search space has {total:,} shapes (layers × hidden), more than the "
                             f"{MAX_CANDIDATES:,} llama3gen enumerates; narrow a range or raise its step")
        return self


class Variant(StrictModel):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    tokens_per_param: Bounds | None = None
    params: Bounds | None = None  # N, all parameters
    # The expected wall clock, evaluations, checkpoint writes, lost work and restarts included
    # (goodput.py).
    max_days: Annotated[float, Field(gt=0, le=36500, allow_inf_nan=False)] | None = None
    description: Annotated[str, Field(max_length=500)] | None = None

    @field_validator("description")
    @classmethod
    def _printable(cls, value):
        # isprintable() also refuses DEL, C1 controls (NEL), U+2028/9 and bidi/zero-width marks.
        if value is not None and not value.isprintable():
            raise ValueError("description must be one line of printable text")
        return value


def _default_variants() -> list[Variant]:
    return [
        Variant(name="optimal", description="lowest predicted loss for the budget"),
        Variant(name="chinchilla", tokens_per_param=Bounds(min=15, max=25),
                description="about 20 tokens per parameter (Hoffmann et al. 2022)"),
    ]


def _clock(seconds: int) -> str:
    """3725 → '01:02:05', SLURM's HH:MM:SS."""
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Cluster(StrictModel):
    partition: Annotated[str, Field(pattern=CLUSTER_NAME_PATTERN)] | None = None
    account: Annotated[str, Field(pattern=CLUSTER_NAME_PATTERN)] | None = None
    qos: Annotated[str, Field(pattern=CLUSTER_NAME_PATTERN)] | None = None
    # Before time_limit, whose validator reads it.
    signal_before_s: Annotated[int, Field(ge=10, le=3600)] = 120
    time_limit: Annotated[str, Field(pattern=TIME_LIMIT_PATTERN)] = "48:00:00"
    mem_per_node_gb: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    # Goodput (compiler/goodput.py); left out: the defaults it states. Failures per device-hour
    # (0: none, the old fixed checkpoint interval), aggregate checkpoint write GB/s of the job,
    # seconds a restart after a failure costs.
    failures_per_gpu_hour: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None
    checkpoint_write_GBps: Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)] | None = None
    restart_s: Annotated[int, Field(ge=0, le=86400)] | None = None

    @field_validator("time_limit")
    @classmethod
    def _room_for_the_signal(cls, value, info: ValidationInfo):
        days, _, clock = value.rpartition("-")
        hours, minutes, seconds = (int(part) for part in clock.split(":"))
        if minutes > 59 or seconds > 59 or (days and hours > 23):
            raise _invalid("time_limit_clock", "minutes and seconds go up to 59, hours to 23 after "
                           "a day count", 'write [D-]HH:MM:SS, e.g. "1-12:30:00" or "36:30:00"')
        total = int(days or 0) * 86400 + hours * 3600 + minutes * 60 + seconds
        if total == 0:
            raise _invalid("time_limit_zero", "SLURM reads a time limit of 0 as no limit: the "
                           "checkpoint signal would never come",
                           'give the job\'s wall-clock limit, e.g. "48:00:00" (at most the '
                           "partition's)")
        # SLURM sends the signal signal_before_s ahead of the limit, and up to a minute earlier
        # than asked (sbatch(1), --signal): at the job's start, every job would requeue at once.
        signal = info.data.get("signal_before_s")
        if signal is not None and total <= signal + SIGNAL_SLACK_S:
            fix = f"make cluster.time_limit longer than {_clock(signal + SIGNAL_SLACK_S)}"
            if total - SIGNAL_SLACK_S - 1 >= 10:
                fix += f", or cluster.signal_before_s at most {total - SIGNAL_SLACK_S - 1}"
            raise _invalid("time_limit_short", f"{total} s leaves no time to train: SLURM sends the "
                           f"checkpoint signal cluster.signal_before_s = {signal} s before the limit, "
                           f"and up to {SIGNAL_SLACK_S} s early", fix)
        return value


class Training(StrictModel):
    """Overrides for what the planner decides; anything left out comes from laws and rules."""

    global_batch_tokens: Annotated[int, Field(ge=1, le=1 << 40)] | None = None
    learning_rate: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = None
    min_lr_ratio: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 0.1
    schedule: Literal["cosine", "wsd"] = "cosine"
    warmup_frac: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.01
    max_warmup_iters: Annotated[int, Field(ge=0, le=1_000_000)] = 2000
    decay_frac: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 0.2
    weight_decay: Annotated[float, Field(ge=0, le=10, allow_inf_nan=False)] = 0.1
    beta1: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.9
    beta2: Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)] = 0.95
    grad_clip: Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)] = 1.0
    # "auto": no block, the fewest leading blocks that fit, or every block, whichever the
    # planner predicts fastest within memory; true: every block; false: none.
    activation_checkpointing: Literal["auto", True, False] = "auto"
    # Ranks of a node that split each block (templates/parallelize.py): "auto" lets the planner
    # choose 1, 2, 4 or 8 by predicted speed within memory; a number fixes it.
    tensor_parallel: Annotated[Literal["auto", 1, 2, 4, 8], NotBool] = "auto"
    compile: bool = True
    eval_interval: Annotated[int, Field(ge=1, le=10_000_000)] | None = None
    eval_iters: Annotated[int, Field(ge=1, le=100_000)] = 20
    ckpt_interval: Annotated[int, Field(ge=1, le=10_000_000)] | None = None
    keep_last_ckpts: Annotated[int, Field(ge=1, le=1000)] = 3
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 1337


SOURCE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$"  # a directory under data_dir


class Source(StrictModel):
    """One prepared dataset of a mixture (data/prepare.py --out_dir data/shards/<name>): its
    unique tokens (its meta.json n_train_tokens) and its share of every step's sequences."""

    name: Annotated[str, Field(pattern=SOURCE_NAME_PATTERN)]
    unique_tokens: Annotated[int, Field(ge=1, le=10**16)]
    weight: Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)]


class Data(StrictModel):
    """What the training data holds, so the plan can say how many passes over it the run makes:
    its unique tokens (data/prepare.py's meta.json n_train_tokens), or a mixture of sources, each
    with its unique tokens and weight (train.py draws each step's sequences in those
    proportions, dataset.py). Below a pick's D, shapes are ranked by the data-constrained law
    (Muennighoff et al. 2023)."""

    unique_tokens: Annotated[int, Field(ge=1, le=10**16)] | None = None
    sources: Annotated[list[Source], Field(min_length=1, max_length=64)] | None = None

    @model_validator(mode="after")
    def _one_of(self):
        if (self.unique_tokens is None) == (self.sources is None):
            raise ValueError("give either unique_tokens or sources (a mixture), not both or "
                             "neither")
        if self.sources:
            names = [s.name for s in self.sources]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"source names must be unique; repeated: {', '.join(dupes)}")
        return self

    def shares(self) -> dict[str, float]:
        """Each source's share of the tokens (weights normalised to sum 1)."""
        total = sum(s.weight for s in self.sources)
        return {s.name: s.weight / total for s in self.sources}

    def portions(self) -> list[tuple[float, int]]:
        """(share of the tokens, unique tokens) per source: one of share 1 without a mixture."""
        if self.sources is None:
            return [(1.0, self.unique_tokens)]
        shares = self.shares()
        return [(shares[s.name], s.unique_tokens) for s in self.sources]

    @property
    def total_unique_tokens(self) -> int:
        return sum(unique for _, unique in self.portions())


Flops = Annotated[float, Field(gt=0, le=1e32, allow_inf_nan=False), NotBool]


class BudgetRange(StrictModel):
    """`count` budgets log-spaced from `min` to `max` FLOPs, both included."""

    min: Flops
    max: Flops
    count: Annotated[int, Field(ge=2, le=32)]

    @model_validator(mode="after")
    def _ordered(self):
        if self.min >= self.max:
            raise _invalid("budget_range", f"empty range: min {self.min:g} >= max {self.max:g}",
                           "give min below max, e.g. {min: 1e18, max: 1e20, count: 5}")
        return self

    def values(self) -> list[float]:
        ratio = (self.max / self.min) ** (1.0 / (self.count - 1))
        return [self.min * ratio**i for i in range(self.count - 1)] + [self.max]


class Sweep(StrictModel):
    """A scaling-law sweep of small runs before the target run (compiler/sweep.py, docs/FIT.md).
    Left out, budgets derive from the target budget and max_fraction."""

    budgets: Union[Annotated[list[Flops], Field(min_length=2, max_length=32)], BudgetRange] | None = None
    # A parabola per budget needs 3 points; Hoffmann et al. 2022 and DeepSeek LLM used ~9-10.
    shapes: Annotated[int, Field(ge=3, le=64)] = 8
    # The whole sweep (every run's budget) costs at most this share of the target budget.
    max_fraction: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 0.1
    # Tokens each run's final validation loss is measured over (compiler/sweep.py VAL_TOKENS).
    val_tokens: Annotated[int, Field(ge=1, le=1 << 40)] | None = None
    # SLURM array tasks running at once (sbatch --array=...%max_parallel); None: all of them.
    max_parallel: Annotated[int, Field(ge=1, le=10_000)] | None = None
    # d_model / n_layers the sweep's shapes keep near, so that they are one family (compiler/
    # sweep.py family_shapes); None: the geometric middle of search.aspect.
    aspect: Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)] | None = None

    @field_validator("budgets")
    @classmethod
    def _distinct(cls, value):
        if isinstance(value, list) and len(set(value)) != len(value):
            raise _invalid("repeated_budget", "a budget is listed twice",
                           "list each sweep budget once; `shapes` sets the runs per budget")
        return value

    def budget_values(self) -> list[float] | None:
        if self.budgets is None:
            return None
        return self.budgets.values() if isinstance(self.budgets, BudgetRange) \
            else sorted(self.budgets)


class Spec(StrictModel):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    budget: Budget
    hardware: Hardware = Hardware()
    model: Model = Model()
    search: Search = Search()
    variants: Annotated[list[Variant], Field(min_length=1, max_length=32)] = Field(
        default_factory=_default_variants)
    cluster: Cluster = Cluster()
    training: Training = Training()
    data: Data | None = None
    sweep: Sweep | None = None

    @model_serializer(mode="wrap")
    def _without_absent_sweep(self, handler):
        # A spec without a sweep dumps as it did before sweeps existed: lock files of existing
        # repos stay byte-identical.
        out = handler(self)
        if isinstance(out, dict) and out.get("sweep", 0) is None:
            del out["sweep"]
        return out

    @model_validator(mode="after")
    def _consistent(self):
        names = [v.name for v in self.variants]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"variant names must be unique; repeated: {', '.join(dupes)}")
        t, per_node = self.training.tensor_parallel, self.hardware.gpus_per_node
        if t != "auto" and t > 1 and per_node % t:
            raise _invalid("tensor_parallel_node", f"training.tensor_parallel {t} does not divide "
                           f"hardware.gpus_per_node {per_node}: a tensor group lies inside a node",
                           "a degree that divides the GPUs of a node, or \"auto\"")
        return self


# --------------------------------------------------------------------------------------------
# Loading: YAML → Spec, with positions for every error.


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses aliases (YAML bombs) and keeps no Python tags."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.MarkedYAMLError(None, None, "aliases (*name) are not allowed in a spec",
                                       event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        # PyYAML keeps the last of repeated keys silently; a second `budget:` is a mistake.
        seen = set()
        for key_node, _ in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key in seen:
                raise yaml.MarkedYAMLError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_object(self, node, deep=False):
        # Scalar constructors raise plain ValueError (int('9'*5000), date 2024-13-45, !!int x):
        # give them the node's position like any other YAML error.
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError) as exc:
            raise yaml.MarkedYAMLError(None, None, f"cannot read this value: {exc}",
                                       node.start_mark) from None


def _compose_and_load(text: str):
    """(the YAML node tree, for error positions; the data it holds), from one parse."""
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        return root, (loader.construct_document(root) if root is not None else None)
    finally:
        loader.dispose()


def _position(root: yaml.Node | None, loc: tuple, at_key: bool = False) -> yaml.Mark | None:
    """Walk the composed YAML tree along a pydantic error location; return the deepest mark.

    `at_key` points at the last key itself rather than its value (for unknown keys)."""
    node, mark = root, root.start_mark if root is not None else None
    for depth, key in enumerate(loc):
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == key:
                    last = depth == len(loc) - 1
                    node, mark = v, (k.start_mark if at_key and last else v.start_mark)
                    break
            else:
                return mark
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            mark = node.start_mark
        else:
            return mark
    return mark


def _where(path: str, mark: yaml.Mark | None) -> str:
    return f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path


def field_where(text: str, path: str, field: str) -> str:
    """"file:line:column" of a field path as errors name it ("sweep.budgets", "variants[small]":
    a variant by name) in the spec's text, for errors raised after validation (the planner's);
    the bare path when the field is not written in the spec (a default) or the text is unreadable."""
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError:
        return path
    mark = None
    for part in re.findall(r"[^.\[\]]+", field):
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == part), None)
        elif isinstance(node, yaml.SequenceNode):
            node = next((item for i, item in enumerate(node.value) if part == str(i)
                         or isinstance(item, yaml.MappingNode) and any(
                             k.value == "name" and v.value == part for k, v in item.value)), None)
        else:
            node = None
        if node is None:
            return path
        mark = node.start_mark
    return _where(path, mark)


def _user_loc(loc: tuple, data) -> tuple:
    """A pydantic error location as spec keys and indices: without the union members' names that
    pydantic puts between them ("CustomLaw", "list[constrained-int]", "str"). Walks the data, so
    that keys the user wrote are kept whatever they look like (the custom law's E, A and B)."""
    return tuple(part for i, part in enumerate(loc) if i not in _member_tags(loc, data))


def _member_tags(loc: tuple, data) -> set[int]:
    """Positions in `loc` that name a union member rather than a key or index."""
    tags = set()
    for i, part in enumerate(loc):
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        elif isinstance(part, str) and _is_type_tag(part):
            tags.add(i)
        else:
            data = None  # a key the user did not write (a missing one): nothing below it
    return tags


def _other_member(loc: tuple, chosen: tuple, data) -> bool:
    """Whether an error at `loc` comes from another member of a union the `chosen` error is in
    (the same value read as another type): not another problem."""
    return any(loc[:i] == chosen[:i] and loc[i:i + 1] != chosen[i:i + 1]
               for i in _member_tags(chosen, data))


@functools.cache
def _model_names() -> frozenset[str]:
    names, todo = set(), [StrictModel]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return frozenset(names)


def _is_type_tag(part: str) -> bool:
    return part in _model_names() or "[" in part \
        or part in {"str", "int", "float", "bool", "list", "dict", "literal"} \
        or part.startswith(("function-", "constrained-", "tagged-union"))


def parse_spec_text(text: str, path: str = "<spec>", spec_dir: str | Path | None = None) -> Spec:
    """Parse and validate YAML text; every failure is a UserError with a position. Files the spec
    names (hardware.calibration) are relative to spec_dir (default: the working directory)."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise UserError(f"spec is larger than {MAX_BYTES // 1024} KiB", where=path,
                        fix="a spec is a few lines of YAML; check you passed the right file")
    try:
        root, data = _compose_and_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        raise UserError(f"invalid YAML: {exc.problem or exc.context}", where=_where(path, mark),
                        fix="check indentation, colons and quotes at that position") from None
    except yaml.reader.ReaderError as exc:  # a character YAML forbids; it knows the offset only
        at = exc.position
        where = f"{path}:{text.count(chr(10), 0, at) + 1}:{at - text.rfind(chr(10), 0, at)}"
        raise UserError(f"invalid YAML: control character U+{exc.character:04X} is not allowed",
                        where=where,
                        fix="remove it, or write it as an escape in a double-quoted string") from None
    except yaml.YAMLError as exc:
        raise UserError(f"invalid YAML: {exc}", where=path,
                        fix="check the YAML syntax; start from specs/tiny-cpu.yaml") from None
    except RecursionError:
        raise UserError("YAML nested too deeply", where=path,
                        fix="a spec nests a few levels; check for runaway brackets") from None
    if not isinstance(data, dict):
        raise UserError("a spec is a YAML mapping with at least `name` and `budget`", where=path,
                        fix="start from specs/1.36e21.yaml or specs/tiny-cpu.yaml")
    try:
        return Spec.model_validate(data, context={"spec_dir": spec_dir})
    except ValidationError as exc:
        raise _first_error(exc, root, data, path) from None
    except RecursionError:
        raise UserError("spec nested too deeply", where=path,
                        fix="a spec nests a few levels; check for runaway brackets") from None


def _first_error(exc: ValidationError, root, data, path: str) -> UserError:
    errors = exc.errors(include_url=False)
    # Union errors repeat once per member; the one with the deepest location says most.
    # At equal depth prefer a bad value, then a wrong type, over a missing or unknown key: the
    # member whose shape the user wrote says what is wrong ({tokens_per_param: 0} is a bad ratio,
    # not a law missing alpha; `layers: []` is an empty list, not a wrong-typed range).
    def says_most(e):
        kind = e["type"]
        return (len(_user_loc(e["loc"], data)),
                0 if kind in ("missing", "extra_forbidden") else 1 if kind.endswith("_type") else 2)
    error = max(errors, key=says_most)
    loc = _user_loc(error["loc"], data)
    field = ".".join(map(str, loc)) or "(top level)"
    message = _describe(error)
    more = len({_user_loc(e["loc"], data) for e in errors
                if not _other_member(e["loc"], error["loc"], data)}) - 1
    if more > 0:
        message += f" ({more} more problem{'s' if more > 1 else ''} after this one)"
    at_key = error["type"] == "extra_forbidden"
    return UserError(message, where=_where(path, _position(root, loc, at_key)), field=field,
                     fix=_fix_for(error, field))


def _describe(error: dict) -> str:
    kind, msg = error["type"], error["msg"]
    value = error.get("input")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    msg = re.sub(r"^(Value error|Assertion failed), ", "", msg)
    return f"{msg} (got {shown})" if not isinstance(value, dict) else msg


def _fix_for(error: dict, field: str) -> str:
    kind = error["type"]
    if "fix" in error.get("ctx", {}):
        return error["ctx"]["fix"]
    if kind == "extra_forbidden":
        return "remove it or check its spelling; `llama3gen schema` lists every key"
    if kind == "missing":
        return f"add `{field.split('.')[-1]}`; `llama3gen schema` describes it"
    if kind == "string_pattern_mismatch":
        pattern = error.get("ctx", {}).get("pattern", "")
        return f"use only characters matching {pattern}"
    if kind in {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}:
        return "use a value within the bound above"
    if kind in {"float_parsing", "int_parsing", "float_type", "int_type", "finite_number"}:
        return "give a finite number (e.g. 1.36e21 or 8)"
    return "see `llama3gen schema` for what this field allows"


def _shown_path(path) -> str:
    """The path as the user typed it, quoted where it would not read as one (spaces at its ends,
    control characters)."""
    text = str(path)
    return text if text and text.isprintable() and text.strip() == text else repr(text)


def load_spec(path: str | Path) -> tuple[Spec, str]:
    """Read and validate a spec file. Returns the Spec and the file's text."""
    shown = _shown_path(path)
    if not str(path):  # Path("") is ".", the working directory
        raise UserError("the spec path is empty ('')",
                        fix="pass the path of a YAML spec, e.g. specs/1.36e21.yaml")
    p = Path(path)
    try:
        with p.open("rb") as fh:  # read one byte past the limit: /dev/zero is not a spec either
            raw = fh.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise UserError("spec file not found", where=shown,
                        fix="pass the path of a YAML spec, e.g. specs/1.36e21.yaml") from None
    except IsADirectoryError:
        raise UserError("is a directory, not a spec file", where=shown,
                        fix="pass the path of a YAML spec, e.g. specs/1.36e21.yaml") from None
    except OSError as exc:
        raise UserError(f"cannot read spec: {exc.strerror}", where=shown,
                        fix="check the file's permissions") from None
    if len(raw) > MAX_BYTES:
        raise UserError(f"spec is larger than {MAX_BYTES // 1024} KiB", where=shown,
                        fix="a spec is a few lines of YAML; check you passed the right file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"spec is not UTF-8 text (byte {exc.start})", where=shown,
                        fix="save the spec as UTF-8") from None
    return parse_spec_text(text, shown, p.parent), text


def json_schema() -> dict:
    schema = Spec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "llama3gen spec"
    return schema

