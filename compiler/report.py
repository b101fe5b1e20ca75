"""`llama3gen solve`'s readable report: one block per variant, every number labelled."""

from __future__ import annotations

from .plan import Plan, Variant
from .units import checkpointing, duration, si, time_budget

RULE = "=" * 88


def goodput_lines(v: Variant) -> list[str]:
    """Checkpoints, failures and the wall clock they make (compiler/goodput.py)."""
    t, tm = v.training, v.timing
    save = (f"  checkpoint         {tm.checkpoint_bytes / 1e9:.3g} GB, {tm.checkpoint_write_s:.3g} s to write at "
            f"{tm.checkpoint_write_GBps:.3g} GB/s; every {t.ckpt_interval:,} steps "
            f"({duration(tm.checkpoint_interval_s / 86400)}; {v.provenance.get('ckpt_interval', '')})")
    if tm.job_mtbf_s is None:
        return [save, f"  goodput            {tm.goodput:.2%} → wall clock {duration(tm.wall_clock_days)} "
                      "(evaluations included; cluster.failures_per_gpu_hour 0: failures not "
                      "modelled)"]
    return [
        save,
        f"  failures           {tm.failures_per_gpu_hour:.3g} per device-hour → job MTBF "
        f"{duration(tm.job_mtbf_s / 86400)}; {tm.expected_failures:.3g} expected, "
        f"{tm.restart_s:g} s restart each",
        f"  Young–Daly         √(2 · write · MTBF) = {duration(tm.young_daly_interval_s / 86400)} "
        + (f"= {tm.young_daly_interval_steps:,} steps" if tm.young_daly_interval_s <= tm.days * 86400
           else f"> the whole run ({duration(tm.days)}): {tm.young_daly_interval_steps:,} steps, "
                "one checkpoint at the end"),
        f"  goodput            {tm.goodput:.2%} → wall clock {duration(tm.wall_clock_days)} "
        f"(evaluations, checkpoint writes, lost work and restarts included)",
    ]


def data_limited_lines(v: Variant) -> list[str]:
    """The data-constrained pick against the law's own (compiler/datalimited.py)."""
    dl = v.data_limited
    if dl is None:
        return []
    rows = [(name, p) for name, p in (("data-constrained", dl.pick), ("law alone", dl.unconstrained))]
    head = (f"  {'pick':<17} {'shape':>10} {'N':>8} {'D':>9} {'epochs':>7} {'D_eff':>9} "
            f"{'N_eff':>8} {'loss':>9} {'as fresh':>9}")
    lines = ["", f"DATA-LIMITED ({si(dl.unique_tokens)} unique tokens, fewer than the law's pick trains on):",
             f"  law                {dl.formula}",
             f"  source             {dl.citation}",
             f"  U_N                {si(dl.unique_params)} (the law's compute-optimal N for the unique tokens)",
             head]
    for name, p in rows:
        lines.append(f"  {name:<17} {p.n_layers:>4}L×{p.d_model:<5} {si(p.n_params):>8} "
                     f"{si(p.tokens):>9} {p.epochs:>7.3g} {si(p.effective_tokens):>9} "
                     f"{si(p.effective_params):>8} {p.loss:>9.6f} {p.loss_unique:>9.6f}")
    if (dl.pick.n_layers, dl.pick.d_model) == (dl.unconstrained.n_layers, dl.unconstrained.d_model):
        lines.append("  the same shape: within the variant's constraints the data-constrained law "
                     "ranks the law's own pick first too")
    else:
        lines.append(f"  the data-constrained pick predicts {dl.unconstrained.loss - dl.pick.loss:.4g} "
                     "lower loss than the law's own pick, both at their effective D' and N' "
                     "('as fresh': the law alone, as if every token were new)")
    return lines


def _budget_phrase(plan: Plan) -> str:
    """The budget as the spec gave it: FLOPs, or a time budget with its nominal FLOPs."""
    flops, given = f"C = {plan.budget.flops:.3e} FLOPs", time_budget(plan.spec["budget"])
    return flops if given is None else f"{given} of wall clock, nominally {flops}"


def variant_block(plan: Plan, v: Variant) -> str:
    """`solve`'s block for one variant: the search, the pick, how it trains, the runners-up
    and the search's statistics."""
    constraints = ", ".join(f"{k} {val:g}" for k, val in v.constraints.items()) or "none"
    lines = [
        RULE,
        f"VARIANT {v.name}: {v.description}".rstrip(": "),
        f"N-D GRID SEARCH for {_budget_phrase(plan)} ({plan.budget.convention} convention; "
        f"{plan.budget.source})",
        f"law: {plan.law.name}: {plan.law.formula}",
        f"constraints: {constraints}",
        RULE,
    ]
    sections = [("PICK:", _pick_lines(plan, v)), ("TRAINING PLAN:", _training_lines(v)),
                ("TOP CANDIDATES (ranked by loss, then time):", _top_lines(v)),
                ("SEARCH STATISTICS:", _search_lines(v))]
    for k, (title, body) in enumerate(sections):
        lines += ([""] if k else []) + [title] + body
    return "\n".join(lines)


def _pick_lines(plan: Plan, v: Variant) -> list[str]:
    c, s = v.choice, v.choice.shape
    return [
        f"  predicted loss     {c.loss:.6f}   ({plan.law.name}"
        + (" at the effective N' and D': data-constrained, see DATA-LIMITED)" if v.data_limited
           else ")"),
        f"  N (parameters)     {si(c.n_params)}   ({c.n_params:,}; embeddings {c.n_params_embedding:,})",
        f"  D (tokens)         {si(c.tokens)}   "
        + ("(= C / FLOPs per token, exactly)" if time_budget(plan.spec["budget"]) is None
           else "(what the budget's wall clock trains at this plan's speed: compiler/timebudget.py)"),
        f"  D/N                {c.tokens_per_param:.1f} tokens per parameter",
        *([f"  epochs             {v.epochs:.3g} over the data's unique tokens (spec: data)"]
          if v.epochs is not None and not v.source_epochs else []),
        *(["  epochs             " + ", ".join(f"{n} {e:.3g}" for n, e in v.source_epochs.items())
           + " (per source: its weight's share of D / its unique tokens; spec: data.sources)"]
          if v.source_epochs else []),
        f"  C, 6N convention   {c.flops_6n:.4e}   (6·N·D, {c.flops_per_token_6n:,} FLOPs/token)",
        f"  C, exact           {c.flops_exact:.4e}   (every matmul + attention, {c.flops_per_token_exact:,} FLOPs/token)",
        f"  shape              {s.n_layers}L × d {s.d_model} × {s.n_heads} heads (head_dim {s.head_dim})",
        f"  FFN                {s.ffn_hidden} ({s.ffn_ratio:.2f}× d, SwiGLU)",
        f"  GQA                {s.n_kv_heads} KV heads ({s.n_heads // s.n_kv_heads}:1 Q:KV)",
        f"  vocab, seq         {s.vocab_size:,}, {s.seq_len:,} (RoPE θ {s.rope_theta:g}, "
        f"{'tied' if s.tie_embeddings else 'untied'} embeddings)",
        f"  tie-break          {v.tie_break}",
    ]


def _training_lines(v: Variant) -> list[str]:
    s, t, tm, mem = v.choice.shape, v.training, v.timing, v.memory
    return [
        f"  layout             {t.parallelism}{f' × tensor parallel {t.tensor_parallel}' if t.tensor_parallel > 1 else ''} over {t.world_size} devices, micro-batch {t.micro_batch_size} × "
        f"accum {t.grad_accum}, activation checkpointing {checkpointing(t, s.n_layers)}",
        f"  global batch       {t.global_batch_size} × {s.seq_len} = {t.global_batch_tokens:,} tokens "
        f"({v.provenance.get('global_batch_size', '')})",
        f"  learning rate      {t.learning_rate:.3e} peak, {t.lr_schedule}, warmup {t.warmup_iters}, "
        f"{t.max_iters:,} steps ({v.provenance.get('learning_rate', '')})",
        f"  memory / device    {mem.total / 2**30:.1f} GiB of {mem.capacity / 2**30:.1f} GiB "
        f"(params {mem.parameters / 2**30:.1f}, grads {mem.gradients / 2**30:.1f}, "
        f"AdamW {mem.optimizer / 2**30:.1f}, activations {mem.activations / 2**30:.1f}, "
        f"logits {mem.logits / 2**30:.1f}, other {mem.other / 2**30:.1f}"
        + ("" if mem.calibration is None else
           f", calibration {mem.calibration / 2**30:+.1f}: the run measured") + ")",
        f"  throughput         {tm.tokens_per_second:,.0f} tokens/s, MFU {tm.mfu:.1%} "
        f"({tm.mfu_source})",
        f"  step               {tm.step_seconds:.3g} s = compute {tm.compute_seconds:.3g} s + "
        f"exposed communication {tm.exposed_comm_seconds:.3g} s",
        f"  time               {duration(tm.days)} of training + {duration(tm.eval_days)} of "
        f"evaluation ({v.provenance.get('eval_days', '')})",
        *goodput_lines(v),
        f"  GPU-hours          {tm.gpu_hours:,.1f}"
        + (f", ${tm.cost_usd:,.0f}" if tm.cost_usd is not None else "")
        + " (GPUs × wall clock: what a reservation bills)",
        *data_limited_lines(v),
    ]


def _top_lines(v: Variant) -> list[str]:
    lines = [f"  {'rank':>4} {'loss':>9} {'N':>8} {'D':>9} {'D/N':>7} {'L':>4} {'d':>6} "
             f"{'heads':>5} {'FFN':>6} {'train d':>7}"]
    for r in v.top:
        mark = "  <- SELECTED" if r.selected else ""
        lines.append(f"  {r.rank:>4} {r.loss:>9.6f} {si(r.n_params):>8} {si(r.tokens):>9} "
                     f"{r.tokens_per_param:>7.1f} {r.n_layers:>4} {r.d_model:>6} {r.n_heads:>5} "
                     f"{r.ffn_hidden:>6} {r.days:>7.2f}{mark}")
    return lines


def _search_lines(v: Variant) -> list[str]:
    st = v.stats
    removed = ", ".join(f"{k}: {n:,}" for k, n in st.removed_by.items()) or "none"
    return [
        f"  shapes enumerated (layers × hidden)  {st.enumerated:,}",
        f"  valid LLaMA-3 shapes                 {st.valid_shapes:,}",
        f"  removed by constraint                {removed}",
        *([f"  beyond data and tensor parallelism   {st.need_pipeline_or_context_parallel:,} of "
           "them fit on no number of GPUs (one sequence's activations exceed a GPU): they would "
           "need pipeline or context parallelism, which llama3gen does not generate"]
          if st.need_pipeline_or_context_parallel else []),
        f"  feasible                             {st.feasible:,}",
        f"  within the near-optimal band         {st.near_optimal:,}",
    ]


def sweep_lines(plan: Plan) -> list[str]:
    """The sweep (compiler/sweep.py): budgets, runs per budget, cost."""
    sw = plan.sweep
    lines = [f"SWEEP: {len(sw.runs)} runs, {sw.flops:.4g} FLOPs = {sw.fraction_of_target:.2%} of the "
             f"target (at most {sw.max_fraction:g}); {duration(sw.days)} one after another",
             f"  budgets: {sw.provenance['budgets']}", f"  shapes: {sw.provenance['shapes']}"]
    for c in sw.budgets:
        runs = [r for r in sw.runs if r.budget_flops == c]
        shapes = ", ".join(f"{r.choice.shape.n_layers}L×{r.choice.shape.d_model} "
                           f"(N {si(r.choice.n_params)})" for r in runs)
        lines.append(f"  C {c:.3g}: {shapes}")
    return lines


def law_fit_lines(plan: Plan) -> list[str]:
    """A fitted law's provenance, its CIs at this budget, and the pick under the CI's ends
    (compiler/lawfit.py; the generated docs/law.md shows the same)."""
    fit = plan.law.fit
    runs = f"{fit.runs} runs at " if fit.runs else ""
    beyond = (f"; this budget is {fit.decades_beyond_fit:.1f} decades beyond the largest"
              if fit.decades_beyond_fit is not None else "")
    lines = [f"FITTED LAW ({fit.file}: {runs}{len(fit.budgets)} budgets, {min(fit.budgets):.3g} – "
             f"{max(fit.budgets):.3g} FLOPs{beyond}):"]
    pct = f"{100 * fit.ci_level:g}%"
    ci = "; ".join(f"{name} {si(fit.ci[key][0])} – {si(fit.ci[key][1])}" if key != "loss" else
                   f"loss {fit.ci[key][0]:.4f} – {fit.ci[key][1]:.4f}"
                   for name, key in (("N*", "n_params"), ("D*", "tokens"), ("", "loss"))
                   if key in fit.ci)
    if ci:
        lines.append(f"  {pct} CI here     {ci}" + (f" ({fit.resamples:,} bootstrap resamples)"
                                                    if fit.resamples else ""))
    if not fit.ends:
        lines.append("  sensitivity        none: the law file carries no bootstrap refits")
    for end in fit.ends:
        where = "the fit" if end.percentile is None else f"{end.percentile:g}th pct. of N*"
        pick = (f"{end.pick.n_layers}L × {end.pick.d_model} (N {si(end.pick.n_params)}, "
                f"loss {end.pick.loss:.4f})" if end.pick is not None else end.problem)
        lines.append(f"  {end.end:<5} {where:<18} N* {si(end.n_params):>9}  D* {si(end.tokens):>10}"
                     f"  pick {pick}")
    return lines


def solve_report(plan: Plan) -> str:
    co = plan.closed_form
    blocks = [variant_block(plan, v) for v in plan.variants]
    sens = [f"  {s.law:<24} N* {si(s.n_params):>9}  D* {si(s.tokens):>10}  D/N {s.tokens_per_param:>6.1f}  "
            f"loss {s.loss:.4f}" for s in plan.sensitivity]
    tail = [
        RULE,
        "CLOSED-FORM OPTIMUM (the limit the grid approaches):",
        f"  N* {si(co.n_params)}, D* {si(co.tokens)}, D/N {co.tokens_per_param:.1f}, loss {co.loss:.6f}",
        f"  {co.note}",
        "",
        "SENSITIVITY (closed-form optimum of the same budget under each catalog law):",
        *sens,
        RULE,
    ]
    if plan.law.fit is not None:
        tail += law_fit_lines(plan) + [RULE]
    if plan.sweep is not None:
        tail += sweep_lines(plan) + [RULE]
    if plan.warnings:
        tail += ["WARNINGS:", *(f"  - {w}" for w in plan.warnings), RULE]
    return "\n\n".join(blocks) + "\n\n" + "\n".join(tail) + "\n"
