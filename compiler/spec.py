"""The spec: what the user wrote, validated. Pydantic v2, unknown keys rejected.

`load_spec(path)` is the only way in: it parses YAML safely, validates, and turns every problem
into a UserError naming file:line:column, the field path, what was wrong and what is allowed.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from . import hardware, laws
from .errors import UserError

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
# Cluster strings reach sbatch lines and shell scripts: allow what SLURM itself allows in
# partition/account/qos names, nothing a shell would interpret.
CLUSTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
TIME_LIMIT_PATTERN = r"^([0-9]{1,3}-)?[0-9]{1,3}:[0-9]{2}:[0-9]{2}$"  # not \d: any Unicode digit

# A search space larger than this is refused before it is enumerated (memory, not patience):
# enumeration and planning hold ~500 bytes per shape, so 4M shapes peak near 2 GB (50M needed 24).
MAX_CANDIDATES = 4_000_000
# Shapes well past any trained model (LLaMA 3 405B: 126 layers, d_model 16384), and small enough
# that parameter and FLOP counts stay exact in int64 whatever the other fields say.
MAX_LAYERS = 1024
MAX_D_MODEL = 131_072
MAX_BYTES = 1 << 20  # specs are hand-written; a megabyte of YAML is not a spec

# MFU below 1% is a mistake, and near zero it made predicted training times infinite.
MFU = Annotated[float, Field(ge=0.01, le=1, allow_inf_nan=False)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


class Budget(StrictModel):
    """Exactly one of: FLOPs, GPU-hours, or wall-clock days on the spec's hardware."""

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


class Hardware(StrictModel):
    gpu: Union[str, CustomGPU] = "a100-80gb"
    gpus_per_node: Annotated[int, Field(ge=1, le=1024)] = 8
    nodes: Annotated[int, Field(ge=1, le=100_000)] = 1
    mfu: MFU | None = None
    usd_per_gpu_hour: Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)] | None = None
    cpus_per_gpu: Annotated[int, Field(ge=1, le=1024)] = 8
    host_memory_gb: Annotated[float, Field(gt=0, le=1e6, allow_inf_nan=False)] | None = None

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
        return self.mfu if self.mfu is not None else self.device().default_mfu


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


IntChoices = Annotated[list[Annotated[int, Field(ge=1, le=1 << 30)]], Field(min_length=1, max_length=100_000)]


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


class Search(StrictModel):
    layers: Union[IntRange, IntChoices] = IntRange(min=4, max=64)
    hidden: Union[IntRange, IntChoices] = IntRange(min=256, max=8192, step=128)
    # d_model / n_layers. Kaplan et al. 2020 (Fig. 5): loss is within a few percent over aspect
    # ratios of about 20-200; the LLaMA-3 family sits at 100-128. The laws do not see shape, so the
    # bounds keep the search where they were fitted.
    aspect: Bounds = Bounds(min=32, max=192)
    scaling_law: Union[str, CustomLaw, TokensPerParamLaw] = laws.DEFAULT_LAW
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


class Cluster(StrictModel):
    partition: Annotated[str, Field(pattern=CLUSTER_NAME_PATTERN)] | None = None
    account: Annotated[str, Field(pattern=CLUSTER_NAME_PATTERN)] | None = None
    qos: Annotated[str, Field(pattern=CLUSTER_NAME_PATTERN)] | None = None
    time_limit: Annotated[str, Field(pattern=TIME_LIMIT_PATTERN)] = "48:00:00"
    mem_per_node_gb: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    signal_before_s: Annotated[int, Field(ge=10, le=3600)] = 120


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
    activation_checkpointing: Literal["auto", True, False] = "auto"
    compile: bool = True
    eval_interval: Annotated[int, Field(ge=1, le=10_000_000)] | None = None
    eval_iters: Annotated[int, Field(ge=1, le=100_000)] = 20
    ckpt_interval: Annotated[int, Field(ge=1, le=10_000_000)] | None = None
    keep_last_ckpts: Annotated[int, Field(ge=1, le=1000)] = 3
    seed: Annotated[int, Field(ge=0, le=2**31 - 1)] = 1337


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

    @model_validator(mode="after")
    def _consistent(self):
        names = [v.name for v in self.variants]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"variant names must be unique; repeated: {', '.join(dupes)}")
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


def _field_path(loc: tuple) -> str:
    # pydantic puts union member names into locations ("str", "IntRange", "list[...]"); a user
    # thinks in spec keys, so keep only keys and indices.
    parts = [str(p) for p in loc if isinstance(p, int) or (isinstance(p, str) and not _is_type_tag(p))]
    return ".".join(parts)


def _is_type_tag(part: str) -> bool:
    return part[:1].isupper() or "[" in part or part in {"str", "int", "float", "bool", "literal"} \
        or part.startswith(("function-", "constrained-", "tagged-union"))


def parse_spec_text(text: str, path: str = "<spec>") -> Spec:
    """Parse and validate YAML text; every failure is a UserError with a position."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_BYTES:
        raise UserError(f"spec is larger than {MAX_BYTES // 1024} KiB", where=path,
                        fix="a spec is a few lines of YAML; check you passed the right file")
    try:
        root = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader) if root is not None else None
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
        return Spec.model_validate(data)
    except ValidationError as exc:
        raise _first_error(exc, root, path) from None
    except RecursionError:
        raise UserError("spec nested too deeply", where=path,
                        fix="a spec nests a few levels; check for runaway brackets") from None


def _first_error(exc: ValidationError, root, path: str) -> UserError:
    errors = exc.errors(include_url=False)
    # Union errors repeat once per member; the one with the deepest location says most.
    # At equal depth prefer a bad value, then a wrong type, over a missing or unknown key: the
    # member whose shape the user wrote says what is wrong ({tokens_per_param: 0} is a bad ratio,
    # not a law missing alpha; `layers: []` is an empty list, not a wrong-typed range).
    def says_most(e):
        depth = len([p for p in e["loc"] if not (isinstance(p, str) and _is_type_tag(p))])
        kind = e["type"]
        return depth, 0 if kind in ("missing", "extra_forbidden") else 1 if kind.endswith("_type") else 2
    error = max(errors, key=says_most)
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and _is_type_tag(p)))
    field = _field_path(error["loc"]) or "(top level)"
    message = _describe(error)
    more = len({_field_path(e["loc"]) for e in errors}) - 1
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


def load_spec(path: str | Path) -> tuple[Spec, str]:
    """Read and validate a spec file. Returns the Spec and the file's text."""
    p = Path(path)
    try:
        with p.open("rb") as fh:  # read one byte past the limit: /dev/zero is not a spec either
            raw = fh.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise UserError("spec file not found", where=str(path),
                        fix="pass the path of a YAML spec, e.g. specs/1.36e21.yaml") from None
    except IsADirectoryError:
        raise UserError("is a directory, not a spec file", where=str(path),
                        fix="pass the path of a YAML spec, e.g. specs/1.36e21.yaml") from None
    except OSError as exc:
        raise UserError(f"cannot read spec: {exc.strerror}", where=str(path),
                        fix="check the file's permissions") from None
    if len(raw) > MAX_BYTES:
        raise UserError(f"spec is larger than {MAX_BYTES // 1024} KiB", where=str(path),
                        fix="a spec is a few lines of YAML; check you passed the right file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"spec is not UTF-8 text (byte {exc.start})", where=str(path),
                        fix="save the spec as UTF-8") from None
    return parse_spec_text(text, str(path)), text


def json_schema() -> dict:
    schema = Spec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "llama3gen spec"
    return schema

