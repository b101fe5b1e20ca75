"""Training throughput on CPU: the generated model against transformers' LlamaForCausalLM.

    python bench/train_cpu.py                  # full run, eager and torch.compile (a few minutes)
    python bench/train_cpu.py --no-compile     # eager only
    python bench/train_cpu.py --quick          # smoke run: a toy model, a few steps, eager only
    python bench/train_cpu.py --profile        # also print the top ops of one eager step of each
    python bench/train_cpu.py --prototype-fused  # also a fused-QKV / gate-up prototype (eager)

What is timed: one optimizer step = forward (fp32 cross-entropy), backward and an AdamW step, on
random tokens, batch × seq tokens per step, fp32. Both models have the same configuration and the
same weights (transformers loads the generated model's state dict: the parameter names are the
same), transformers with attn_implementation="sdpa" and no attention mask, as the generated model
has none. Each computes its loss its own way: the generated model(x, y) with its fused, chunked
output head + cross-entropy (model.LinearCrossEntropy); transformers' logits, then
F.cross_entropy on them in fp32 (what its own loss does, without the label shift). Both step the
same optimizer, fused AdamW: what the generated train.py uses, and transformers' Trainer default
("adamw_torch_fused") with PyTorch >= 2.8. The two are checked to give the same loss before timing.

How: every model first takes --warmup steps (for a compiled model, the first step's wall time,
compilation included, is reported). Then --reps rounds; in each round every model runs --steps
steps, in an order that rotates from round to round, so slow spells of a shared machine fall on
all of them. Reported: median tokens/s over the rounds with min–max, achieved FLOP/s (exact
training FLOPs per token, as the compiler counts them, × tokens/s) against this machine's measured
fp32 matmul peak (the best of a few large torch.mm), and the per-round ratio generated /
transformers (median over rounds, target ≥ 1.0×).

torch.compile is applied block by block (each decoder layer's .compile()), as the generated
train.py does, to both models.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_MODEL = REPO_ROOT / "templates" / "model.py"
TARGET_RATIO = 1.0


def load_model_module(path: Path):
    """Import a generated model.py under a private name (it may sit in any generated repo)."""
    spec = importlib.util.spec_from_file_location("llama3gen_bench_model", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


def load_arch():
    """The compiler's arch module (parameter and FLOP counts): installed, else by path."""
    try:
        from llama3gen import arch
        return arch
    except ImportError:
        spec = importlib.util.spec_from_file_location("llama3gen_bench_arch",
                                                      REPO_ROOT / "compiler" / "arch.py")
        arch = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(arch)
        return arch


def transformers_twin(args, state_dict, torch):
    """LlamaForCausalLM with args' configuration, SDPA attention, and these weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.n_embd,
                         num_hidden_layers=args.n_layer, num_attention_heads=args.n_head,
                         num_key_value_heads=args.n_kv_head, head_dim=args.head_dim,
                         intermediate_size=args.ffn_hidden, rope_theta=args.rope_theta,
                         rms_norm_eps=args.norm_eps, max_position_embeddings=args.block_size,
                         tie_word_embeddings=args.tie_embeddings, hidden_act="silu",
                         attention_bias=False, mlp_bias=False, use_cache=False,
                         attn_implementation="sdpa")
    hf = LlamaForCausalLM(config).float()
    hf.load_state_dict(state_dict, strict=True)
    return hf


class Contender:
    """A model, its optimizer and its loss function, timed step by step."""

    def __init__(self, name, model, loss_fn, torch, compiled):
        self.name, self.model, self.loss_fn, self.compiled = name, model, loss_fn, compiled
        self.optimizer = make_optimizer(torch, model)
        self.rates: list[float] = []
        self.first_step_s = None

    def step(self, x, y):
        loss = self.loss_fn(self.model, x, y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss


def make_optimizer(torch, model):
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                             fused=True)


def generated_loss(model, x, y):
    return model(x, y)[1]


def transformers_loss(model, x, y):
    # The same fp32 cross-entropy the generated model computes (HF's own loss would shift labels).
    import torch.nn.functional as F
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))


def fused_prototype(model, model_py, torch):
    """A copy of the generated model with one q|k|v matmul and one gate|up matmul per block.

    A prototype for a possible change to model.py (not part of it): the fused weights are the
    concatenations of the originals, so the function, and the loss, are unchanged.
    """
    nn, F = torch.nn, torch.nn.functional

    class FusedAttention(nn.Module):
        def __init__(self, attn):
            super().__init__()
            self.n_head, self.n_kv_head, self.head_dim = attn.n_head, attn.n_kv_head, attn.head_dim
            self.qkv = nn.Parameter(torch.cat([attn.q_proj.weight, attn.k_proj.weight,
                                               attn.v_proj.weight]).detach().clone())
            self.o_proj = attn.o_proj

        def forward(self, x, cos, sin):
            B, T, _ = x.shape
            qkv = F.linear(x, self.qkv).view(B, T, -1, self.head_dim)
            q, k, v = qkv.split([self.n_head, self.n_kv_head, self.n_kv_head], dim=2)
            q, k = model_py.apply_rope(q, cos, sin), model_py.apply_rope(k, cos, sin)
            y = model_py.causal_attention(q, k, v)
            return self.o_proj(y.reshape(B, T, -1))

    class FusedFeedForward(nn.Module):
        def __init__(self, mlp):
            super().__init__()
            self.gate_up = nn.Parameter(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
                                        .detach().clone())
            self.down_proj = mlp.down_proj

        def forward(self, x):
            gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)

    for block in model.model.layers:
        block.self_attn = FusedAttention(block.self_attn)
        block.mlp = FusedFeedForward(block.mlp)
    return model


def compile_blocks(layers):
    for block in layers:
        block.compile()


def matmul_peak(torch, n: int, repeats: int = 5) -> float:
    """Best fp32 FLOP/s of an n×n×n torch.mm at the current thread count."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def profile_step(torch, contender, x, y, rows=12):
    from torch.profiler import ProfilerActivity, profile
    contender.step(x, y)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        contender.step(x, y)
    print(f"\n== profile: one step of {contender.name}, top {rows} ops by self CPU time ==")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(TEMPLATE_MODEL), help="model.py to benchmark")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the CPUs may be shared)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=768)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model")
    p.add_argument("--steps", type=int, default=2, help="timed steps per model per round")
    p.add_argument("--reps", type=int, default=11, help="rounds (short rounds: a shared CPU drifts less within one)")
    p.add_argument("--matmul", type=int, default=3000,
                   help="size of the peak-measuring torch.mm (not a power of two: MKL slows on those)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile contenders")
    p.add_argument("--profile", action="store_true", help="profile one eager step of each model")
    p.add_argument("--prototype-fused", action="store_true",
                   help="also time a prototype of the generated model with fused q|k|v and "
                        "gate|up matmuls (eager; a suggestion for model.py, not part of it)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 layers, d 64, vocab 256, seq 32, 2 rounds, eager only")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.d_model, args.heads, args.kv_heads, args.ffn = 2, 64, 4, 2, 192
        args.vocab, args.seq, args.batch, args.warmup, args.steps, args.reps = 256, 32, 2, 1, 2, 2
        args.matmul, args.no_compile = 256, True
    return args


def main(argv=None) -> int:
    opts = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", str(opts.threads))
    import torch

    torch.set_num_threads(opts.threads)
    model_py = load_model_module(Path(opts.model))
    arch = load_arch()
    args = model_py.ModelArgs(n_layer=opts.layers, n_embd=opts.d_model, n_head=opts.heads,
                              n_kv_head=opts.kv_heads, head_dim=opts.d_model // opts.heads,
                              ffn_hidden=opts.ffn, vocab_size=opts.vocab, block_size=opts.seq)
    torch.manual_seed(0)
    reference = model_py.Llama(args)
    weights = {k: v.clone() for k, v in reference.state_dict().items()}

    def generated(compiled):
        model = model_py.Llama(args)
        model.load_state_dict(weights, strict=True)
        if compiled:
            compile_blocks(model.model.layers)
        return Contender("generated" + (" + compile" if compiled else ""), model, generated_loss,
                         torch, compiled)

    def transformers(compiled):
        model = transformers_twin(args, weights, torch)
        if compiled:
            compile_blocks(model.model.layers)
        return Contender("transformers" + (" + compile" if compiled else ""), model,
                         transformers_loss, torch, compiled)

    contenders = [generated(False), transformers(False)]
    if not opts.no_compile:
        contenders += [generated(True), transformers(True)]
    if opts.prototype_fused:
        fused = generated(False)
        fused_prototype(fused.model, model_py, torch)
        fused.name = "generated, fused (proto)"
        fused.optimizer = make_optimizer(torch, fused.model)
        contenders.append(fused)
    for c in contenders:
        c.model.train()

    tokens_per_step = opts.batch * opts.seq
    fpt = arch.flops_per_token_exact(args.n_layer, args.n_embd, args.n_head, args.n_kv_head,
                                     args.head_dim, args.ffn_hidden, args.vocab_size, opts.seq)
    n_params = reference.num_params()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); model {opts.model}")
    print(f"config: {args.n_layer} layers, d {args.n_embd}, {args.n_head}/{args.n_kv_head} heads × "
          f"{args.head_dim}, ffn {args.ffn_hidden}, vocab {args.vocab_size}; {n_params:,} parameters; "
          f"batch {opts.batch} × seq {opts.seq} = {tokens_per_step} tokens/step; "
          f"{fpt:,} training FLOPs/token (exact)")

    gen = torch.Generator().manual_seed(1)
    x = torch.randint(0, args.vocab_size, (opts.batch, opts.seq), generator=gen)
    y = torch.randint(0, args.vocab_size, (opts.batch, opts.seq), generator=gen)

    # Same configuration and weights ⇒ same loss (fp32, up to summation order).
    with torch.no_grad():
        ours = generated_loss(contenders[0].model, x, y).item()
        theirs = transformers_loss(contenders[1].model, x, y).item()
        if opts.prototype_fused:  # the prototype computes the same function
            fused_loss = generated_loss(contenders[-1].model, x, y).item()
            if abs(fused_loss - ours) > 1e-4 * abs(ours):
                raise SystemExit(f"the fused prototype's loss {fused_loss} differs from {ours}")
    if abs(ours - theirs) > 1e-4 * abs(theirs):
        raise SystemExit(f"the two models disagree before training: loss {ours} vs {theirs}")
    print(f"same weights, same loss: generated {ours:.6f}, transformers {theirs:.6f}")

    peak = matmul_peak(torch, opts.matmul)
    print(f"measured fp32 matmul peak ({opts.matmul}³ torch.mm, best of 5): {peak / 1e9:.1f} GFLOP/s")

    for c in contenders:
        t0 = time.perf_counter()
        c.step(x, y)
        c.first_step_s = time.perf_counter() - t0
        for _ in range(opts.warmup - 1):
            c.step(x, y)
    compiled = [c for c in contenders if c.compiled]
    if compiled:
        eager_first = {c.name: c.first_step_s for c in contenders if not c.compiled}
        for c in compiled:
            base = eager_first[c.name.replace(" + compile", "")]
            print(f"torch.compile: first step of {c.name} took {c.first_step_s:.1f} s "
                  f"(eager first step {base:.2f} s): compilation ≈ {c.first_step_s - base:.1f} s")

    for rep in range(opts.reps):
        order = contenders[rep % len(contenders):] + contenders[:rep % len(contenders)]
        for c in order:
            t0 = time.perf_counter()
            for _ in range(opts.steps):
                c.step(x, y)
            c.rates.append(opts.steps * tokens_per_step / (time.perf_counter() - t0))

    print(f"\n{opts.reps} interleaved rounds of {opts.steps} steps (forward + backward + AdamW):")
    print(f"  {'model':<24} {'tokens/s median':>16} {'min–max':>17} {'GFLOP/s':>9} {'% of mm peak':>13}")
    for c in contenders:
        med = statistics.median(c.rates)
        print(f"  {c.name:<24} {med:>16,.0f} {min(c.rates):>8,.0f}–{max(c.rates):<8,.0f} "
              f"{med * fpt / 1e9:>9.2f} {med * fpt / peak:>12.1%}")

    def ratio_line(a, b):
        per_round = [ra / rb for ra, rb in zip(a.rates, b.rates)]
        med = statistics.median(per_round)
        q1, _, q3 = statistics.quantiles(per_round, n=4, method="inclusive") if len(per_round) > 1 else (med, med, med)
        verdict = "PASS" if med >= TARGET_RATIO else "FAIL"
        if q1 <= TARGET_RATIO <= q3:  # a shared CPU: say when the noise is larger than the gap
            verdict += " (within noise: the middle half of rounds straddles the target)"
        print(f"  {a.name} / {b.name}: {med:.3f}× (middle half of rounds {q1:.3f}–{q3:.3f}, "
              f"min {min(per_round):.3f}, max {max(per_round):.3f})   target ≥ "
              f"{TARGET_RATIO:.1f}×: {verdict}")

    by_name = {c.name: c for c in contenders}
    print("\nratios (median of per-round ratios):")
    ratio_line(by_name["generated"], by_name["transformers"])
    if compiled:
        ratio_line(by_name["generated + compile"], by_name["transformers + compile"])
        ratio_line(by_name["generated + compile"], by_name["transformers"])
    if opts.prototype_fused:
        ratio_line(by_name["generated, fused (proto)"], by_name["transformers"])

    if opts.profile:
        for c in contenders:
            if not c.compiled:
                profile_step(torch, c, x, y)
    return 0


if __name__ == "__main__":
    sys.exit(main())
