"""The LLaMA-3 shape: parameter count and training FLOPs per token.

Every function here is pure and works elementwise on numpy arrays as well as on Python ints, so
the solver can evaluate millions of candidate shapes in one call. The generated `model.py` must
agree with these counts exactly; tests build it on the meta device and compare.

Conventions (docs/DESIGN.md, "The math lives in one place"):
- A layer holds wq d·(h·dh), wk and wv d·(kv·dh) each, wo (h·dh)·d, SwiGLU 3·d·f and two RMSNorm
  weights 2·d. The model adds the embedding V·d, a final norm d and, when untied, lm_head V·d.
- Training FLOPs per token = 3 × forward (backward costs twice the forward).
  `6N` counts every parameter (Kaplan 2020; Hoffmann 2022 fitted their laws with C = 6ND).
  `exact` counts every matmul: 6·(layer matmul params + lm_head) plus attention scores and values
  12·L·T·(h·dh), the full T×T square as PaLM, nanoGPT and torchtitan count it. The embedding is a
  lookup and costs nothing.
"""

from __future__ import annotations

import numpy as np

FLOPS_CONVENTIONS = ("6N", "exact")


def ffn_hidden_llama3(d_model, multiplier, multiple_of):
    """LLaMA-3's FFN rule: f = multiple_of·ceil(int(multiplier·int(8d/3)) / multiple_of).

    This is Meta's reference code (llama/model.py, FeedForward.__init__); 8B: d=4096, 1.3, 1024 → 14336.
    """
    base = (8 * np.asarray(d_model, dtype=np.int64)) // 3
    # Meta applies int() to a float product; floor matches it for the positive values used here.
    scaled = np.floor(multiplier * base + 1e-9).astype(np.int64)
    out = multiple_of * -(-scaled // multiple_of)
    return out if out.ndim else int(out)


def ffn_hidden_ratio(d_model, ratio, multiple_of):
    """A plain ratio rounded down to a multiple: the reference report's 3.5·d to 256 (2048 → 7168)."""
    raw = np.floor(ratio * np.asarray(d_model, dtype=np.float64) + 1e-9).astype(np.int64)
    out = multiple_of * (raw // multiple_of)
    return out if out.ndim else int(out)


def layer_matmul_params(d_model, n_heads, n_kv_heads, head_dim, ffn_hidden):
    """Weights of one block's matmuls: q and o projections, k and v projections, SwiGLU."""
    attn = 2 * d_model * n_heads * head_dim + 2 * d_model * n_kv_heads * head_dim
    return attn + 3 * d_model * ffn_hidden


def param_count(n_layers, d_model, n_heads, n_kv_heads, head_dim, ffn_hidden, vocab_size,
                tie_embeddings=False):
    """All parameters, embeddings included (the N of the Chinchilla fits)."""
    per_layer = layer_matmul_params(d_model, n_heads, n_kv_heads, head_dim, ffn_hidden) + 2 * d_model
    embeddings = vocab_size * d_model * np.where(tie_embeddings, 1, 2)
    total = n_layers * per_layer + embeddings + d_model
    return total if np.ndim(total) else int(total)


def embedding_params(d_model, vocab_size, tie_embeddings=False):
    """Input embedding plus, when untied, the output head."""
    total = vocab_size * d_model * np.where(tie_embeddings, 1, 2)
    return total if np.ndim(total) else int(total)


def flops_per_token_6n(n_params):
    """Training FLOPs per token under the 6N convention."""
    return 6 * n_params


def flops_per_token_exact(n_layers, d_model, n_heads, n_kv_heads, head_dim, ffn_hidden, vocab_size,
                          seq_len):
    """Training FLOPs per token counting every matmul of forward and backward (3× forward)."""
    matmul_params = n_layers * layer_matmul_params(d_model, n_heads, n_kv_heads, head_dim, ffn_hidden)
    lm_head = vocab_size * d_model
    attention = 12 * n_layers * seq_len * n_heads * head_dim
    total = 6 * (matmul_params + lm_head) + attention
    return total if np.ndim(total) else int(total)
