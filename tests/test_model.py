"""templates/model.py is LLaMA 3: its size and FLOPs are the compiler's, its outputs are transformers'.

The compiler's arch module (parameter count, exact FLOPs per token) and Hugging Face's
LlamaForCausalLM are the two independent oracles; model.py must agree with both.
"""

import math
from dataclasses import replace

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from _repo_files import load_arch, load_template_module

model_py = load_template_module("model")
arch = load_arch()
torch.set_num_threads(1)


def tiny_args(n_head, n_kv_head, tie, ffn_rule, head_dim=16, n_embd=None, n_layer=2, vocab=256,
              block_size=64):
    n_embd = n_embd or n_head * head_dim
    rule, (knob, multiple_of) = ffn_rule
    if rule == "llama3":
        ffn_hidden = arch.ffn_hidden_llama3(n_embd, knob, multiple_of)
    else:
        ffn_hidden = arch.ffn_hidden_ratio(n_embd, knob, multiple_of)
    return model_py.ModelArgs(n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_kv_head=n_kv_head,
                              head_dim=head_dim, ffn_hidden=ffn_hidden, vocab_size=vocab,
                              block_size=block_size, rope_theta=500000.0, norm_eps=1e-5,
                              tie_embeddings=tie, init_std=0.02)


def arch_param_count(a):
    return arch.param_count(a.n_layer, a.n_embd, a.n_head, a.n_kv_head, a.head_dim, a.ffn_hidden,
                            a.vocab_size, a.tie_embeddings)


# (n_head, n_kv_head, tie, ffn rule, head_dim, n_embd): GQA ratios 1, 2, 4; tied and untied; both
# FFN rules of arch; the last one has n_embd != n_head · head_dim, which HF's head_dim allows.
SHAPES = [
    (4, 4, False, ("llama3", (1.3, 32)), 16, None),
    (4, 2, True, ("ratio", (3.5, 32)), 16, None),
    (8, 2, False, ("ratio", (3.5, 64)), 16, None),
    (8, 2, True, ("llama3", (1.0, 16)), 8, 96),
]
SHAPE_IDS = ["gqa1-untied-llama3ffn", "gqa2-tied-ratioffn", "gqa4-untied-ratioffn",
             "gqa4-tied-llama3ffn-narrowheads"]


@pytest.mark.parametrize("n_head,n_kv_head,tie,ffn_rule,head_dim,n_embd", SHAPES, ids=SHAPE_IDS)
def test_param_count_matches_arch_on_meta_device(n_head, n_kv_head, tie, ffn_rule, head_dim, n_embd):
    args = tiny_args(n_head, n_kv_head, tie, ffn_rule, head_dim=head_dim, n_embd=n_embd, n_layer=3,
                     vocab=512)
    with torch.device("meta"):
        model = model_py.Llama(args)
    assert sum(p.numel() for p in model.parameters()) == arch_param_count(args)
    assert model.num_params() == arch_param_count(args)
    # Tied means one tensor, not two equal ones: the count above relies on that.
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie


def test_llama3_8b_has_its_published_parameter_count():
    args = model_py.ModelArgs(n_layer=32, n_embd=4096, n_head=32, n_kv_head=8, head_dim=128,
                              ffn_hidden=arch.ffn_hidden_llama3(4096, 1.3, 1024), vocab_size=128256,
                              block_size=8192, rope_theta=500000.0, tie_embeddings=False)
    assert args.ffn_hidden == 14336
    with torch.device("meta"):
        model = model_py.Llama(args)
    assert model.num_params() == 8_030_261_248


@pytest.mark.parametrize("n_head,n_kv_head,tie,ffn_rule,head_dim,n_embd", SHAPES[:3], ids=SHAPE_IDS[:3])
def test_training_step_flops_match_arch_exact(n_head, n_kv_head, tie, ffn_rule, head_dim, n_embd):
    # seq_len 64 with d_model 64-128 makes attention a large share, so leaving it out would fail.
    batch, seq_len = 2, 64
    args = tiny_args(n_head, n_kv_head, tie, ffn_rule, head_dim=head_dim, n_embd=n_embd,
                     block_size=seq_len)
    model = model_py.Llama(args)
    idx = torch.randint(0, args.vocab_size, (batch, seq_len))
    # PyTorch's CPU flash kernel is missing from FlopCounterMode's table; the math backend runs
    # the same attention as plain matmuls (the full T×T square, as arch counts it).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        _, loss = model(idx, idx)
        loss.backward()
    expected_per_token = arch.flops_per_token_exact(args.n_layer, args.n_embd, args.n_head,
                                                    args.n_kv_head, args.head_dim, args.ffn_hidden,
                                                    args.vocab_size, seq_len)
    attention_per_token = 12 * args.n_layer * seq_len * args.n_head * args.head_dim
    assert attention_per_token > 0.05 * expected_per_token  # far above the 1% tolerance
    measured = counter.get_total_flops()
    # FlopCounterMode counts matmul FLOPs exactly, and arch counts the same matmuls: they agree
    # to the integer; 1% leaves room for nothing else and would miss a forgotten matmul of
    # attention (> 5% of the total, asserted above) or a wrong FFN width.
    assert measured == pytest.approx(expected_per_token * batch * seq_len, rel=0.01)


# Ours and transformers compute the same fp32 function with other summation orders and kernels.
# A dot product of length n rounds to about eps32·√n·Σ|terms| (eps32 = 6e-8): a few 1e-7 here
# (widths ≤ 96, 2 layers, activations of order 1), whatever the kernel set, since every kernel
# rounds each operation in fp32; a forward pass does not amplify it by more than a small factor.
# 1e-5 is over a decade above that, and far below what a layout bug does (a wrong RoPE pairing
# or a misplaced norm moves logits of std > 0.1, checked below, by a good part of that std).
LOGIT_TOLERANCE = 1e-5


def hf_twin(args, model):
    """transformers' LlamaForCausalLM with args' shape, fp32, eager attention, model's weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab_size, hidden_size=args.n_embd,
                         num_hidden_layers=args.n_layer, num_attention_heads=args.n_head,
                         num_key_value_heads=args.n_kv_head, head_dim=args.head_dim,
                         intermediate_size=args.ffn_hidden, rope_theta=args.rope_theta,
                         rms_norm_eps=args.norm_eps, max_position_embeddings=args.block_size,
                         tie_word_embeddings=args.tie_embeddings, hidden_act="silu",
                         attention_bias=False, mlp_bias=False, attn_implementation="eager")
    hf = LlamaForCausalLM(config).float().eval()
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf


@pytest.mark.parametrize("n_head,n_kv_head,tie", [(4, 4, False), (4, 4, True), (8, 2, False), (8, 2, True)],
                         ids=["gqa1-untied", "gqa1-tied", "gqa4-untied", "gqa4-tied"])
def test_logits_equal_transformers_llama(n_head, n_kv_head, tie):
    torch.manual_seed(0)
    args = tiny_args(n_head, n_kv_head, tie, ("llama3", (1.3, 32)))
    # A small theta makes every RoPE frequency turn within 64 positions, so a wrong layout shows.
    args = replace(args, rope_theta=100.0)
    model = model_py.Llama(args).eval()
    # Random norm weights too: all-ones would hide a norm applied in the wrong place.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.uniform_(0.5, 1.5)
    hf = hf_twin(args, model)
    idx = torch.randint(0, args.vocab_size, (3, args.block_size))
    with torch.no_grad():
        ours, _ = model(idx)
        theirs = hf(idx).logits
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=0, atol=LOGIT_TOLERANCE)
    assert ours.std() > 0.1  # the comparison is not between two near-zero tensors


def test_sdpa_without_enable_gqa_gives_the_same_output(monkeypatch):
    torch.manual_seed(0)
    model = model_py.Llama(tiny_args(8, 2, False, ("ratio", (3.5, 32)))).eval()
    idx = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        native, _ = model(idx)
        monkeypatch.setattr(model_py, "_SDPA_HAS_GQA", False)
        repeated, _ = model(idx)
    # The same matmuls on K/V repeated or broadcast: only the kernel's blocking can differ, a few
    # ulps of these O(1) outputs (ulp(1) = 1.2e-7); repeating the wrong heads would move them O(1).
    torch.testing.assert_close(native, repeated, rtol=0, atol=1e-6)


def test_attention_is_causal():
    torch.manual_seed(0)
    model = model_py.Llama(tiny_args(4, 2, False, ("ratio", (3.5, 32)))).eval()
    idx = torch.randint(0, 256, (1, 32))
    changed = idx.clone()
    changed[0, 20:] = (changed[0, 20:] + 1) % 256
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    torch.testing.assert_close(a[:, :20], b[:, :20], rtol=0, atol=0)
    assert not torch.allclose(a[:, 20:], b[:, 20:])


def test_init_and_meta_materialisation():
    torch.manual_seed(0)
    args = replace(tiny_args(4, 2, False, ("ratio", (3.5, 32)), n_layer=8), vocab_size=4096)
    direct = model_py.Llama(args)
    with torch.device("meta"):
        late = model_py.Llama(args)
    late.to_empty(device="cpu")
    late.init_weights()
    # The RoPE table is rebuilt, not left as whatever memory to_empty() handed out.
    torch.testing.assert_close(late.model.rope_cos, direct.model.rope_cos, rtol=0, atol=0)
    torch.testing.assert_close(late.model.rope_sin, direct.model.rope_sin, rtol=0, atol=0)
    assert "model.rope_cos" not in late.state_dict()
    std = args.init_std
    residual_std = std / math.sqrt(2 * args.n_layer)
    # A sample std of n normal draws has relative standard error 1/√(2n): ≤ 0.3% for these
    # tensors (n ≥ 64k), so 5% is over 15 standard errors, and a wrong init (say std instead of
    # std/√(2L) = std/4 for the residual projections) is off by far more.
    embed = late.model.embed_tokens.weight
    assert embed.std().item() == pytest.approx(std, rel=0.05)
    down = torch.cat([layer.mlp.down_proj.weight.flatten() for layer in late.model.layers])
    assert down.std().item() == pytest.approx(residual_std, rel=0.05)
    up = torch.cat([layer.mlp.up_proj.weight.flatten() for layer in late.model.layers])
    assert up.std().item() == pytest.approx(std, rel=0.05)
    assert all(torch.equal(layer.input_layernorm.weight, torch.ones(args.n_embd))
               for layer in late.model.layers)


@pytest.mark.parametrize("chunk_tokens", [4096, 7], ids=["one-chunk", "chunks-of-7"])
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_loss_and_gradients_equal_transformers_own_loss(tie, chunk_tokens):
    """The fused head + cross-entropy (model.LinearCrossEntropy) against transformers' own
    shifted-label loss and its autograd gradients, parameter by parameter, with ignored targets
    and with chunks that do not divide the token count."""
    torch.manual_seed(0)
    model = model_py.Llama(tiny_args(4, 2, tie, ("ratio", (3.5, 32))), loss_chunk_tokens=chunk_tokens)
    assert model.loss_chunk_tokens == chunk_tokens
    hf = hf_twin(model.args, model)
    tokens = torch.randint(0, 256, (2, 17))
    ignored = torch.zeros_like(tokens, dtype=torch.bool)
    ignored[:, 3:8] = True
    ours_targets = tokens.masked_fill(ignored, -1)[:, 1:]
    _, loss = model(tokens[:, :-1], ours_targets)
    loss.backward()
    # HF predicts labels[i + 1] from position i and ignores -100; the last position predicts none.
    theirs = hf(input_ids=tokens, labels=tokens.masked_fill(ignored, -100)).loss
    theirs.backward()
    # The loss is a mean of ~30 fp32 log-softmaxes of order ln 256 = 5.5: its rounding is a few
    # ulps of 5.5 (ulp = 4.8e-7) in any summation order; 1e-6 + 1e-6·5.5 allows ~14 ulps.
    torch.testing.assert_close(loss, theirs, rtol=1e-6, atol=1e-6)
    # Gradients: sums over the 32 tokens and over the vocabulary (256) in fp32, other orders in
    # the fused head (softmax − one-hot computed in forward, chunked): relative rounding of about
    # eps32·√256 ≈ 1e-6 of each gradient's size; rtol 1e-4 is two decades above, and atol 1e-7
    # covers elements that cancel to near zero. A dropped or mis-scaled term (ignored targets
    # counted, a chunk lost) changes gradients by O(1) relative.
    hf_params = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, hf_params[name].grad, rtol=1e-4, atol=1e-7, msg=name)
    assert model.lm_head.weight.grad.abs().max() > 1e-3  # the head's gradient is not vacuous
    # Random init (std 0.02): logits of std ≈ 0.02·‖h‖, so the loss is ln(vocab) plus a term of
    # order their variance, far below 5% of ln 256; a mis-scaled init or wrong targets leave it.
    assert loss.item() == pytest.approx(math.log(256), rel=0.05)


def test_fused_loss_under_autocast_computes_in_bf16_and_returns_fp32_gradients():
    """DDP trains fp32 weights under autocast: the fused head must compute as autocast's F.linear
    would (bf16 matmuls, fp32 softmax) and hand back gradients in the parameters' fp32."""
    torch.manual_seed(0)
    h = torch.randn(40, 32, requires_grad=True)
    weight = (torch.randn(300, 32) * 0.1).requires_grad_()
    targets = torch.randint(0, 300, (40,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = model_py.linear_cross_entropy(h, weight, targets, 16)
        eager = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, weight).float(),
                                                  targets)
    exact = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, weight), targets)
    fused_grads = torch.autograd.grad(fused, (h, weight))
    eager_grads = torch.autograd.grad(eager, (h, weight))
    exact_grads = torch.autograd.grad(exact, (h, weight))
    assert [g.dtype for g in fused_grads] == [torch.float32, torch.float32]
    # The same bf16 logits, soft-maxed in fp32 by each in its own order: fp32 rounding of a loss
    # of order ln 300 = 5.7 is ~1e-6; 1e-5 is a decade above it and far below bf16's own error,
    # which the next line requires to be visible (> 1e-6 away from the fp32 result).
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)
    assert (fused - exact).abs() > 1e-6  # and they are bf16's, not fp32's
    # bf16 gradients: as close to the fp32 ones as autocast's own (its weight gradient rounds
    # once to bf16; the fused head accumulates its chunks in fp32).
    # Bounds relative to autocast's own error against the fp32 truth (bf16 rounds to 8 bits,
    # relative 4e-3 per value): the fused head may differ from autocast in summation order, which
    # is fp32 noise far below that error, hence 10% slack; 1% of the gradient's norm is 2.5
    # bf16 epsilons, which a gradient returned in bf16 or without the chunk scale would exceed.
    for ours, theirs, truth in zip(fused_grads, eager_grads, exact_grads):
        assert (ours - truth).norm() <= 1.1 * (theirs - truth).norm()
        assert (ours - truth).norm() < 1e-2 * truth.norm()


def test_loss_without_gradients_and_with_every_target_ignored():
    torch.manual_seed(0)
    model = model_py.Llama(tiny_args(4, 2, False, ("ratio", (3.5, 32)))).eval()
    idx = torch.randint(0, 256, (2, 16))
    targets = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        logits, _ = model(idx)
        none, loss = model(idx, targets)
    assert none is None  # with targets, the full logits are never made
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    torch.testing.assert_close(loss, expected)
    with torch.no_grad():  # as F.cross_entropy: nothing to average is nan, not 0
        assert model(idx, torch.full_like(targets, -1))[1].isnan()
    # Evaluation pays for the forward only, not for gradients nobody asked for.
    with torch.no_grad(), FlopCounterMode(display=False) as with_loss:
        model(idx, targets)
    with torch.no_grad(), FlopCounterMode(display=False) as logits_only:
        model(idx)
    assert with_loss.get_total_flops() == logits_only.get_total_flops()
