"""LLaMA 3, in one file.

RMSNorm, rotary position embeddings (RoPE), grouped-query attention (GQA), SwiGLU feed-forward, no
biases, and an untied (or optionally tied) output head. Parameter names are exactly those of
Hugging Face's LlamaForCausalLM, so a state dict maps 1:1 onto a transformers checkpoint:

    model.embed_tokens.weight
    model.layers.{i}.input_layernorm.weight
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight
    model.layers.{i}.post_attention_layernorm.weight
    model.layers.{i}.mlp.{gate,up,down}_proj.weight
    model.norm.weight
    lm_head.weight

RoPE uses Hugging Face's "rotate_half" layout (the two halves of a head are the real and imaginary
parts), so weights move between this file and transformers without any permutation. Attention runs
on flash-attn when it is installed and the tensors are bf16/fp16 on CUDA, otherwise on PyTorch's
scaled_dot_product_attention. Given targets, the output head and the cross-entropy run fused and
chunked (LinearCrossEntropy), so the (tokens × vocab) logits are never kept. The parameter count
and FLOPs of this model are computed by the compiler that generated this repo (llama3gen's arch
module); its tests check that both agree.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Partial  # tensor parallelism's tensors

try:  # optional: Dao-AILab flash-attention 2, used on CUDA with bf16/fp16 tensors
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None

# scaled_dot_product_attention learned enable_gqa (k/v with fewer heads than q) in PyTorch 2.5.
_SDPA_HAS_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


@dataclass
class ModelArgs:
    # The model keys of config/<variant>.py (docs/CONTRACT.md); the defaults are a toy model.
    n_layer: int = 2
    n_embd: int = 128  # d_model
    n_head: int = 4  # query heads
    n_kv_head: int = 2  # key/value heads; n_head // n_kv_head query heads share each one
    head_dim: int = 32
    ffn_hidden: int = 384  # SwiGLU hidden size (Hugging Face: intermediate_size)
    vocab_size: int = 512
    block_size: int = 256  # longest sequence; the RoPE table is precomputed up to it
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02


class RMSNorm(nn.Module):
    """x / rms(x) · weight, computed in fp32 whatever the input dtype (as Meta and HF do)."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        input_dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(input_dtype)


def rope_cos_sin(head_dim, max_positions, theta):
    """cos and sin tables of shape (max_positions, head_dim), in fp32, HF's layout.

    Frequency i rotates the pair (x[i], x[i + head_dim/2]); both halves of the table repeat the
    same frequencies, which is what rotate_half below expects.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    positions = torch.arange(max_positions, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)  # (T, head_dim/2)
    angles = torch.cat((angles, angles), dim=-1)  # (T, head_dim)
    return angles.cos(), angles.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """Rotate x of shape (B, T, heads, head_dim) by the angles of its positions."""
    cos = cos[None, :, None, :].to(x.dtype)  # (1, T, 1, head_dim), broadcast over batch and heads
    sin = sin[None, :, None, :].to(x.dtype)
    return x * cos + rotate_half(x) * sin


def causal_attention(q, k, v):
    """Causal attention: q (B, T, n_head, hd), k and v (B, T, n_kv_head, hd) -> like q."""
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        return flash_attn_func(q, k, v, causal=True)  # takes (B, T, heads, hd) and GQA natively
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # SDPA wants (B, heads, T, hd)
    if _SDPA_HAS_GQA:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:  # older PyTorch: give every query head its own copy of its k/v head
        repeats = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(repeats, dim=1), v.repeat_interleave(repeats, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return y.transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = args.n_head, args.n_kv_head, args.head_dim
        self.q_proj = nn.Linear(args.n_embd, args.n_head * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.n_embd, args.n_kv_head * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.n_embd, args.n_kv_head * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_head * args.head_dim, args.n_embd, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        # -1 heads: under tensor parallelism (parallelize.py) each rank holds a slice of them
        q = self.q_proj(x).view(B, T, -1, self.head_dim)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)
        v = self.v_proj(x).view(B, T, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = causal_attention(q, k, v)
        return self.o_proj(y.reshape(B, T, -1))


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x))."""

    def __init__(self, args):
        super().__init__()
        self.gate_proj = nn.Linear(args.n_embd, args.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(args.n_embd, args.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(args.ffn_hidden, args.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def matmul_input(h):
    """h in autocast's dtype, cast once here. Left to autocast (DDP and one process on CUDA: an
    fp32 residual stream, bf16 matmuls), q, k and v (gate and up) would each cast h and keep their
    own bf16 copy for backward; now they share one, and their gradients are summed in bf16 before
    the cast's backward returns fp32, as under FSDP2's bf16 compute."""
    device = h.device.type
    if torch.is_autocast_enabled(device):
        return h.to(torch.get_autocast_dtype(device))
    return h


class Block(nn.Module):
    """Pre-norm transformer block (HF: LlamaDecoderLayer)."""

    def __init__(self, args):
        super().__init__()
        self.input_layernorm = RMSNorm(args.n_embd, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.n_embd, args.norm_eps)
        self.mlp = FeedForward(args)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(matmul_input(self.input_layernorm(x)), cos, sin)
        return x + self.mlp(matmul_input(self.post_attention_layernorm(x)))


class Backbone(nn.Module):
    """Embedding, blocks and final norm (HF: LlamaModel, hence the `model.` prefix of names)."""

    def __init__(self, args):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.n_embd)
        # train.py applies FSDP2's fully_shard and activation checkpointing block by block here.
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layer))
        self.norm = RMSNorm(args.n_embd, args.norm_eps)
        # The RoPE table is derived from args, not learned: a non-persistent buffer stays out of the
        # state dict (and so out of checkpoints and exports) but moves with .to(device).
        cos, sin = rope_cos_sin(args.head_dim, args.block_size, args.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, idx):
        T = idx.size(1)
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


# Tokens per chunk of the fused output head and loss, unless Llama(loss_chunk_tokens=...) says
# otherwise (train.py passes its config's loss_chunk_tokens, the number llama3gen's memory model
# counted with): the fp32 logits of one chunk are chunk × vocab × 4 bytes (2 GiB at LLaMA-3's
# 128,256), whatever the micro-batch.
LOSS_CHUNK_TOKENS = 4096


def chunked_cross_entropy(h, weight, targets, chunk_tokens, needs_grad_h, needs_grad_weight,
                          divisor=None):
    """Mean cross-entropy of h @ weight.T against targets (-1: ignored), chunk by chunk, and the
    gradients of its sum with respect to h and weight (None where not wanted). Returns
    (loss, grad_h, grad_weight, n); the gradients of the mean are these / n. n is the number of
    kept targets, or divisor when given (a share of a mean over more tokens than these)."""
    # h (N, d), weight (vocab, d), targets (N,). Under autocast, compute in its dtype as F.linear
    # would.
    device = h.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        h, weight = h.to(dtype), weight.to(dtype)
    keep = (targets != -1).unsqueeze(1)  # (N, 1): ignored tokens get no loss and no gradient
    targets = targets.clamp(min=0).unsqueeze(1)
    n_kept = keep.sum()
    loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
    grad_h = torch.empty_like(h) if needs_grad_h else None
    # fp32 accumulation across chunks, as one big matmul would accumulate
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if needs_grad_weight else None
    with torch.autocast(device, enabled=False):
        for start in range(0, h.size(0), chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            h_chunk, keep_chunk, target_chunk = h[rows], keep[rows], targets[rows]
            logits = (h_chunk @ weight.t()).float()
            target_logit = logits.gather(1, target_chunk)
            row_max = logits.amax(dim=1, keepdim=True)
            probs = logits.sub_(row_max).exp_()  # in place: one (chunk, vocab) fp32 buffer
            del logits
            sum_exp = probs.sum(dim=1, keepdim=True)
            log_sum_exp = row_max + sum_exp.log()
            loss_sum += ((log_sum_exp - target_logit) * keep_chunk).sum()
            if not (needs_grad_h or needs_grad_weight):
                del probs
                continue
            probs.div_(sum_exp).scatter_add_(1, target_chunk, -keep_chunk.float())
            grad_logits = probs.to(h.dtype)  # softmax - one-hot (ignored rows masked below)
            del probs
            if needs_grad_h:
                torch.mm(grad_logits, weight, out=grad_h[rows])
                grad_h[rows].mul_(keep_chunk)
            if needs_grad_weight:
                h_kept = h_chunk * keep_chunk
                if grad_weight.dtype == grad_logits.dtype:  # addmm_, in a form that
                    # torch.utils.flop_counter counts (it misses the in-place overload)
                    torch.addmm(grad_weight, grad_logits.t(), h_kept, out=grad_weight)
                else:
                    grad_weight += grad_logits.t() @ h_kept
            del grad_logits  # before the next chunk's logits: one chunk's buffers at a time
    n = n_kept if divisor is None else divisor
    return loss_sum / n, grad_h, grad_weight, n  # nan if all are ignored, as F's


class LinearCrossEntropy(torch.autograd.Function):
    """mean(cross_entropy(h @ weight.T, targets)) over targets != -1, without keeping the logits.

    Eager PyTorch keeps the logits, an fp32 copy, the fp32 log-softmax and two fp32 gradients of
    it alive around the loss's backward: about 14 bytes per token and vocabulary entry in bf16,
    1.8 MB a token at vocab 128,256, often the largest activation of a step. But the gradient of
    cross-entropy with respect to the logits, softmax - one-hot, is known as soon as the softmax
    is. So forward walks the tokens in chunks (chunked_cross_entropy): logits, loss, and both
    gradients chunk by chunk; one chunk's logits exist at a time and none are saved. Backward
    only scales the stored gradients. Numerically this is F.cross_entropy on fp32 logits
    (max-shifted log-sum-exp), as the unfused head computes it.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_tokens, divisor=None):
        ctx.dtypes, ctx.consumed = (h.dtype, weight.dtype), False  # gradients go back in these
        loss, grad_h, grad_weight, n = chunked_cross_entropy(
            h, weight, targets, chunk_tokens, *ctx.needs_input_grad[:2], divisor=divisor)
        ctx.save_for_backward(grad_h, grad_weight, n)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        # The stored gradients are scaled in place: no second vocab × d buffer at the peak. So a
        # graph through this loss can be walked back only once (no retain_graph=True).
        if ctx.consumed:
            raise RuntimeError("LinearCrossEntropy: backward twice (retain_graph) is not supported")
        ctx.consumed = True
        grad_h, grad_weight, n = ctx.saved_tensors  # n: the mean's divisor
        h_dtype, weight_dtype = ctx.dtypes
        scale = grad_loss / n
        return (grad_h.mul_(scale).to(h_dtype) if grad_h is not None else None,
                grad_weight.mul_(scale).to(weight_dtype) if grad_weight is not None else None,
                None, None, None)


def linear_cross_entropy(h, weight, targets, chunk_tokens, divisor=None):
    """The fused head + loss; without autograd (evaluation), the loss alone, no gradients."""
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(h, weight, targets, chunk_tokens, divisor)
    return chunked_cross_entropy(h, weight, targets, chunk_tokens, False, False, divisor)[0]


def sequence_parallel_cross_entropy(h, weight, targets, chunk_tokens):
    """The fused head + loss under tensor parallelism (parallelize.py): h is a DTensor split by
    sequence over the tensor group, weight replicated in it. Each rank scores its own tokens
    against the whole vocabulary, so every softmax lies on one rank (the loss stays exact) and
    the head's work is split t ways instead of repeated. Returns the group's mean on every rank,
    with this rank's share as its gradient: the shares sum to the mean, so the replicated
    weight's gradient is partial and is summed over the group, as the norms' are."""
    mesh = h.device_mesh
    group = mesh.get_group()
    local = h.to_local()
    start = mesh.get_local_rank() * -(-h.size(1) // mesh.size())  # Shard(1) splits as torch.chunk
    targets = targets[:, start:start + local.size(1)].flatten()
    kept = (targets != -1).sum()
    torch.distributed.all_reduce(kept, group=group)  # the group's kept targets: the mean's divisor
    weight = weight.to_local(grad_placements=[Partial()])
    share = linear_cross_entropy(local.flatten(0, 1), weight, targets, chunk_tokens, kept)
    total = share.detach().clone()
    torch.distributed.all_reduce(total, group=group)
    return share + (total - share.detach())  # the group's value, this rank's gradient


class Llama(nn.Module):
    """HF: LlamaForCausalLM."""

    def __init__(self, args: ModelArgs, loss_chunk_tokens: int | None = None):
        super().__init__()
        assert args.n_head % args.n_kv_head == 0, "n_kv_head must divide n_head"
        assert args.head_dim % 2 == 0, "RoPE rotates pairs of dimensions: head_dim must be even"
        self.args = args
        self.loss_chunk_tokens = loss_chunk_tokens or LOSS_CHUNK_TOKENS
        self.model = Backbone(args)
        self.lm_head = nn.Linear(args.n_embd, args.vocab_size, bias=False)
        if args.tie_embeddings:  # one matrix for both ends; it then counts once in num_params()
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, scale_residual=True):
        """Initialise every weight in place (a no-op on the meta device).

        Embeddings and linear weights are drawn from normal(0, init_std), RMSNorm weights are 1.
        With scale_residual, the two projections that write into the residual stream (o_proj and
        down_proj) use init_std / sqrt(2 · n_layer) instead, as GPT-2 and nanoGPT do, so the
        residual stream's variance does not grow with depth. A model built on the meta device and
        then materialised with .to_empty(device=...) must call this again; it also rebuilds the
        RoPE table, whose values to_empty() leaves undefined.
        """
        std = self.args.init_std
        residual_std = std / math.sqrt(2 * self.args.n_layer) if scale_residual else std
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_residual = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(module.weight, mean=0.0, std=residual_std if is_residual else std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        # Tied, lm_head.weight is embed_tokens.weight: both inits draw from normal(0, init_std).
        cos, sin = rope_cos_sin(self.args.head_dim, self.args.block_size, self.args.rope_theta)
        self.model.rope_cos.copy_(cos)
        self.model.rope_sin.copy_(sin)

    def forward(self, idx, targets=None):
        """idx, targets: (B, T) token ids. Without targets: the logits (B, T, vocab) and None. With
        targets: None and the mean cross-entropy over targets that are not -1; the output head and
        the loss are then fused (LinearCrossEntropy), so the full logits never exist."""
        T = idx.size(1)
        assert T <= self.args.block_size, f"{T} tokens, block_size is {self.args.block_size}"
        h = self.model(idx)
        if targets is None:
            return self.lm_head(h), None
        if isinstance(h, DTensor):  # tensor parallelism: this rank's tokens only (parallelize.py)
            return None, sequence_parallel_cross_entropy(h, self.lm_head.weight, targets,
                                                         self.loss_chunk_tokens)
        loss = linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets.flatten(),
                                    self.loss_chunk_tokens)
        return None, loss

    def num_params(self):
        """Parameters, embeddings included, a tied matrix counted once (llama3gen's N)."""
        return sum(p.numel() for p in self.parameters())
