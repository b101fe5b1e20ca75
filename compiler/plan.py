"""The Plan: everything the compiler decided, with where each number came from.

It is the one input of rendering and is written into the generated repo as llama3gen.lock.json.
Plain data only (pydantic models of ints, floats, strings): no behaviour lives here.
"""

# No `from __future__ import annotations` here: with real annotations pydantic builds these
# models without compiling each annotation string first (1.6% of `solve`'s instructions).
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, model_serializer


class PlanModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # Optional fields left out of the serialised Plan when None, so plans that do not use them
    # serialise (lock files) as before they existed.
    omitted_when_none: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _without_absent_options(self, handler):
        out = handler(self)
        if isinstance(out, dict):
            for name in self.omitted_when_none:
                if out.get(name, 0) is None:
                    del out[name]
        return out


class Shape(PlanModel):
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_hidden: int
    vocab_size: int
    seq_len: int
    rope_theta: float
    norm_eps: float
    tie_embeddings: bool

    @property
    def gqa_ratio(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def ffn_ratio(self) -> float:
        return self.ffn_hidden / self.d_model


class Candidate(PlanModel):
    rank: int
    n_layers: int
    d_model: int
    n_heads: int
    ffn_hidden: int
    n_params: int
    tokens: float
    tokens_per_param: float
    loss: float
    days: float  # training time (the tie-break's), not wall clock: no goodput per candidate
    selected: bool


class SearchStats(PlanModel):
    enumerated: int  # layers × hidden combinations
    valid_shapes: int  # a head layout exists, aspect within bounds (and N in the default window)
    feasible: int  # also satisfying the variant's constraints
    near_optimal: int  # within the near-optimal loss band of the best
    removed_by: dict[str, int]  # constraint → shapes it removed (among valid shapes)
    # of the shapes memory removed, those no number of GPUs would hold (evaluate.fits_at_any_scale)
    need_pipeline_or_context_parallel: int = 0


class Choice(PlanModel):
    shape: Shape
    n_params: int
    n_params_embedding: int
    tokens: float  # D, exactly budget / FLOPs-per-token
    tokens_per_param: float
    loss: float
    objective: float
    flops_per_token_6n: int
    flops_per_token_exact: int
    flops_6n: float  # 6·N·D
    flops_exact: float  # exact training FLOPs per token · D


class Memory(PlanModel):
    """Predicted peak memory per device, bytes, by component (compiler/memory.py)."""

    parameters: float
    gradients: float
    optimizer: float
    activations: float
    logits: float
    other: float
    # bytes a calibration's measured/predicted peak adds (or removes): None without one
    calibration: float | None = None
    total: float
    capacity: float
    fits: bool
    omitted_when_none: ClassVar[tuple[str, ...]] = ("calibration",)


class Training(PlanModel):
    parallelism: str  # "fsdp", "hsdp" or "ddp"
    tensor_parallel: int = 1  # ranks of a node splitting each block (compiler/evaluate.py)
    world_size: int
    global_batch_size: int  # sequences per optimizer step
    global_batch_tokens: int
    micro_batch_size: int  # sequences per rank per forward/backward
    grad_accum: int
    max_iters: int
    tokens_trained: float  # max_iters · global_batch_tokens (≥ D)
    learning_rate: float
    min_lr: float
    lr_schedule: str
    warmup_iters: int
    decay_frac: float
    weight_decay: float
    beta1: float
    beta2: float
    grad_clip: float
    activation_checkpointing: bool  # some block recomputes its forward in backward
    checkpointed_layers: int  # how many: the first k blocks (all of them, or 0)
    compile: bool
    dtype: str
    device: str
    eval_interval: int
    eval_iters: int
    log_interval: int
    ckpt_interval: int
    keep_last_ckpts: int
    seed: int
    init_std: float


class Timing(PlanModel):
    tokens_per_second: float  # whole job
    mfu: float  # exact FLOPs per token × tokens/s / (GPUs × peak)
    mfu_source: str  # predicted by compiler/steptime.py (calibrated or not), or measured
    step_seconds: float  # one optimizer step: compute + exposed communication
    compute_seconds: float
    exposed_comm_seconds: float  # communication on the critical path, per step
    hardware_flops: float  # FLOPs the GPUs execute, recomputation included
    days: float  # training: tokens trained / tokens_per_second
    eval_days: float  # train.py's evaluations, forward only, between steps
    gpu_hours: float
    cost_usd: float | None
    # Goodput (compiler/goodput.py): days above are pure training; these add evaluations,
    # failures and saves.
    failures_per_gpu_hour: float  # per device; 0: failures not modelled
    job_mtbf_s: float | None  # the job's mean time between failures; None when the rate is 0
    checkpoint_bytes: float  # fp32 weights + AdamW's two moments
    checkpoint_write_GBps: float  # the job's aggregate storage bandwidth
    checkpoint_write_s: float  # one save; training waits for it
    young_daly_interval_s: float | None  # √(2 · write time · MTBF); None when the rate is 0
    young_daly_interval_steps: int | None  # that, in whole steps within [1, max_iters]
    checkpoint_interval_s: float  # training.ckpt_interval steps, in seconds
    checkpoint_saves: int  # saves in the whole run, the final one included
    restart_s: float  # per failure
    expected_failures: float
    goodput: float  # pure training time / wall clock
    wall_clock_days: float  # days + eval_days + checkpoint writes + lost work and restarts


class DataLimitedPick(PlanModel):
    """One pick under the data-constrained law (compiler/datalimited.py)."""

    n_layers: int
    d_model: int
    n_params: int
    tokens: float  # D
    epochs: float  # tokens trained / unique tokens
    effective_tokens: float  # D'
    effective_params: float  # N'
    loss: float  # the law at (N', D')
    loss_unique: float  # the law at (N, D): as if every token were fresh


class DataLimited(PlanModel):
    """The data-constrained pick against the one the law alone makes, when the unique tokens fall
    short of that one's D (Muennighoff et al. 2023)."""

    unique_tokens: int  # spec: data.unique_tokens (a mixture: its sources' together)
    unique_params: float  # U_N: the law's compute-optimal N for the unique tokens
    r_d_star: float
    r_n_star: float
    formula: str
    citation: str
    pick: DataLimitedPick  # the variant's choice
    unconstrained: DataLimitedPick  # what ranking by the law alone picks


class Variant(PlanModel):
    name: str
    description: str
    constraints: dict[str, float]
    choice: Choice
    top: list[Candidate]
    stats: SearchStats
    tie_break: str
    training: Training
    memory: Memory
    timing: Timing
    layout_reasons: list[str]
    provenance: dict[str, str]
    epochs: float | None  # tokens trained / the spec's data.unique_tokens (None: not given);
    # with data.sources, the most repeated source's epochs
    source_epochs: dict[str, float] | None = None  # per source: its share of the tokens / its unique tokens
    data_limited: DataLimited | None = None  # None: the unique tokens cover the law's pick
    omitted_when_none: ClassVar[tuple[str, ...]] = ("data_limited",)


class LawEnd(PlanModel):
    """The pick re-solved under one law of a fitted law's bootstrap (compiler/lawfit.py)."""

    end: str  # "low", "fit" or "high": N* at the CI's low end, the fitted law, its high end
    percentile: float | None  # of N* among the resamples (nearest rank); None for the fit
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    n_params: float  # closed-form optimum under C = 6ND at the plan's budget
    tokens: float
    loss: float
    pick: Candidate | None  # the first variant's pick under this law; None: see problem
    problem: str | None


class LawFit(PlanModel):
    """Where a law from `llama3gen fit -o LAW.json` came from, and how much the pick depends on it."""

    file: str  # as the spec names it
    runs: int | None
    budgets: list[float]
    budget_runs: list[int] | None  # runs per budget
    decades_beyond_fit: float | None  # log10(the plan's budget / the largest fitted budget)
    fit_params: list[float] | None
    fit_tokens: list[float] | None
    resamples: int | None
    seed: int | None
    ci_level: float
    ci: dict[str, list[float]]  # E, A, B, alpha, beta as fitted; n_params, tokens, loss here
    ends: list[LawEnd]  # empty: the file carries no bootstrap refits
    method: str
    warnings: list[str]  # what `llama3gen fit` said the runs leave in doubt


class Law(PlanModel):
    name: str
    formula: str
    citation: str
    E: float | None
    A: float | None
    B: float | None
    alpha: float | None
    beta: float | None
    fit: LawFit | None = None  # a law from a `llama3gen fit` file
    omitted_when_none: ClassVar[tuple[str, ...]] = ("fit",)


class Budget(PlanModel):
    flops: float  # in `convention`
    convention: str  # "6N" or "exact"
    source: str  # how it was derived from the spec


class Hardware(PlanModel):
    gpu: str
    peak_tflops: float
    memory_gb: float
    gpus_per_node: int
    nodes: int
    world_size: int
    mfu: float | None  # measured: hardware.mfu, or a calibration's the model cannot reproduce;
    # None: predicted per variant (Timing), at kernel_efficiency (a calibration's, if any)
    kernel_efficiency: float  # fraction of peak compute reaches when nothing waits on the network
    kernel_efficiency_source: str
    intra_node_GBps: float  # per GPU, one direction
    inter_node_GBps: float
    interconnect_source: str
    usd_per_gpu_hour: float | None
    source: str

    @property
    def peak_flops(self) -> float:
        """Dense BF16 peak of one device, FLOP/s."""
        return self.peak_tflops * 1e12


class Optimum(PlanModel):
    n_params: float
    tokens: float
    tokens_per_param: float
    loss: float
    note: str


class Sensitivity(PlanModel):
    law: str
    n_params: float
    tokens: float
    tokens_per_param: float
    loss: float


class FrontierPoint(PlanModel):
    n_params: float
    loss: float


class Job(PlanModel):
    name: str
    partition: str | None
    account: str | None
    qos: str | None
    time_limit: str
    nodes: int
    gpus_per_node: int  # 0 on the cpu pseudo-device
    tasks_per_node: int
    cpus_per_task: int
    mem_per_node_gb: int | None
    signal_before_s: int
    requeue: bool
    variants: list[str]
    default_variant: str


class Recipe(PlanModel):
    """What the plan's memory and speed assume train.py and model.py do (compiler/recipe.py);
    written into config/<variant>.py, where the templates read it."""

    loss_chunk_tokens: int
    ddp_bucket_view: bool
    fsdp_reduce_scatter_every_micro_batch: bool
    tensor_parallel_regather: bool


class SweepRun(PlanModel):
    """One run of the scaling-law sweep: a full run at its own budget (config/sweep/<name>.py).
    The fields config/__variant__.py.j2 reads are a Variant's."""

    name: str
    description: str
    budget_flops: float  # C, in the plan's budget convention
    prior_n_opt: float  # the prior law's optimum N at C (the shapes are spread around it)
    choice: Choice  # N, D = C / FLOPs per token, the prior law's loss
    training: Training
    timing: Timing
    provenance: dict[str, str]


class Sweep(PlanModel):
    """The sweep (compiler/sweep.py): runs smallest budget first."""

    budgets: list[float]
    shapes: int  # asked per budget; fewer where the search space has fewer distinct ones near N*
    aspect: float  # d_model / n_layers the shapes keep near (one family)
    max_fraction: float
    val_tokens: int
    flops: float  # Σ over runs of FLOPs trained (budget convention)
    fraction_of_target: float
    days: float  # Σ predicted training and evaluation days, one run after another, on the spec's
    # hardware
    max_parallel: int  # array tasks at once (sbatch --array %K, submitit array parallelism)
    provenance: dict[str, str]
    runs: list[SweepRun]


class Measured(PlanModel):
    tokens_per_second: float
    mfu: float
    step_time_s: float | None
    peak_memory_bytes: float | None


class Calibration(PlanModel):
    """The spec's hardware.calibration (compiler/calibrate.py): the run it measured, what that
    run's plan predicted, and its logged curves (docs/calibration.md, docs/calibration.svg)."""

    file: str  # as the spec names it
    run: str  # <plan name>:<out_dir in its repo>
    how: str  # benchmark record or median of logged steps
    date: str | None
    gpu: str | None
    world_size: int
    variant: str  # of the run's plan
    measured: Measured
    planned: Measured  # the run's own plan
    planned_loss: float | None  # the run's plan's predicted final loss (None: an older file)
    memory_ratio: float | None  # measured / compiler/memory.py's peak for the run's layout
    curve_loss: list[tuple[float, float]]  # (step, loss); empty in files without curves
    curve_tokens_per_second: list[tuple[float, float]]
    # the run's validation loss at its plan's last step and the law that predicted planned_loss
    # (None: not there yet, or an older file)
    final_val_loss: float | None = None
    law: str | None = None
    # the run's checkpoint saves (median seconds, bytes, GB/s per device); None: it saved none
    checkpoint_seconds: float | None = None
    checkpoint_bytes: float | None = None
    checkpoint_GBps_per_device: float | None = None
    ranks_per_node: int | None = None  # the run's (None: not recorded, an older file)
    restart_seconds: float | None = None  # median of its restarts under SLURM (None: none)
    restarts: int | None = None
    # its unexpected interruptions, over the device-hours it trained, and the steps they lost
    # (None: an older file, or no timed training)
    interruptions: int | None = None
    device_hours: float | None = None
    lost_steps: int | None = None
    # its timed evaluations: measured over assumed share of a step per batch (None: none timed)
    evaluation_ratio: float | None = None
    evaluation_how: str | None = None
    # training time / wall clock: what the run achieved, what its plan expected (None: not known)
    goodput: float | None = None
    planned_goodput: float | None = None
    omitted_when_none: ClassVar[tuple[str, ...]] = (
        "final_val_loss", "law", "checkpoint_seconds", "checkpoint_bytes",
        "checkpoint_GBps_per_device", "ranks_per_node", "restart_seconds", "restarts",
        "interruptions", "device_hours", "lost_steps", "evaluation_ratio", "evaluation_how",
        "goodput", "planned_goodput")

    @property
    def nodes(self) -> int | None:
        """The run's nodes (None: its ranks per node were not recorded)."""
        return self.world_size // self.ranks_per_node if self.ranks_per_node else None


class Plan(PlanModel):
    llama3gen_version: str
    name: str
    spec: dict
    law: Law
    budget: Budget
    hardware: Hardware
    closed_form: Optimum
    sensitivity: list[Sensitivity]
    frontier: list[FrontierPoint]
    variants: list[Variant]
    job: Job
    recipe: Recipe
    warnings: list[str]  # what the user should know before trusting the numbers
    sweep: Sweep | None = None  # the spec's sweep: section (compiler/sweep.py)
    calibration: Calibration | None = None  # the spec's hardware.calibration
    omitted_when_none: ClassVar[tuple[str, ...]] = ("sweep", "calibration")
