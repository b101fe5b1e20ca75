#!/usr/bin/env bash
# Run the numerically sensitive tests under portable kernels: torch's `default` CPU capability
# and numpy's baseline SIMD (the compiler's math, hence lock files and examples/, runs on numpy).
# A bound that holds only for one CPU's rounding fails here on any machine (issue #13).
# Usage: bash tests/portable_kernels.sh [pytest args]   (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
export ATEN_CPU_CAPABILITY=default
# oneDNN (bf16 matmuls, the CPU flash-attention's brgemm) detects its ISA on its own. Left alone on
# an AMX CPU (Sapphire Rapids and later) it picks AMX, and torch 2.13's bf16 CPU flash-attention
# then packs its operands in VNNI layout with a routine that the `default` build throws from
# ("pack_vnni2 is only supported when avx512 is supported"). AVX2 is what every x86-64 CI
# machine here has, so this pass runs the same oneDNN code on Intel and AMD alike.
export ONEDNN_MAX_CPU_ISA=AVX2
export NPY_DISABLE_CPU_FEATURES="X86_V3 X86_V4 AVX512_ICL AVX512_SPR"  # those absent are ignored
python - <<'PY'
import numpy, torch
from numpy._core._multiarray_umath import __cpu_features__ as npy
assert torch.backends.cpu.get_cpu_capability() == "DEFAULT", torch.backends.cpu.get_cpu_capability()
assert not npy["X86_V3"] and not npy["X86_V4"], "numpy still dispatches AVX2 or AVX-512"
q = torch.ones(1, 2, 64, 16, dtype=torch.bfloat16)  # the call AMX + `default` broke, shown first
torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
print(f"portable kernels: torch {torch.backends.cpu.get_cpu_capability()}, oneDNN at most AVX2, "
      "numpy baseline SIMD")
PY
# Training and resume (losses and weights across world sizes), export and the model against
# transformers, the memory model against PyTorch's trackers, byte-identical compiles, the
# step-time model and the solver against their published and hand-written references, the
# data-constrained law against its authors' numbers. Left to the main pass, the same under any
# kernels: test_properties' random specs and the signal, damage and refusal handling of
# train.py and the compiler (robustness, not rounding), the bench scripts' smoke runs, and the
# compile partitioner's count (a graph property; 50 s of tracing).
not_rounding="compile_partitioner_saves or duplicate_signal or later_second_signal or damaged_newest"
not_rounding+=" or failed_save or nonfinite_steps or check_passes or recompile_after"
not_rounding+=" or foreign_directory or pip_install or bench_quick or gpu_sh_dry or reports_config_errors"
not_rounding+=" or cannot_split"
python -m pytest -q -p no:cacheprovider -k "not ($not_rounding)" "$@" \
    tests/test_train.py tests/test_resume.py tests/test_export_hf.py tests/test_model.py \
    tests/test_memory.py tests/test_compile.py tests/test_bench_smoke.py tests/test_datalimited.py
