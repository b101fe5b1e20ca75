"""Activation checkpointing of some blocks (train.py's checkpointed_layers: the first k of L, as
Megatron-LM's --recompute-method block --recompute-num-layers k) in the planner: evaluate.py's
fewest blocks that fit, their memory (memory.py) and their cost (FLOPs, TP all-reduces).
What the blocks really save is measured in tests/test_memory.py (MemTracker, FSDPMemTracker);
that train.py checkpoints the blocks the config names, and trains the same numbers, in
tests/test_train.py.

Tolerances: every comparison is float64 arithmetic (numpy, no torch kernels) of one quantity
computed two ways; where it is not exact equality, the bound says why beside it.
"""

import dataclasses

import numpy as np
import pytest

from compiler import arch
from compiler import hardware as catalog
from compiler.evaluate import PARTIAL, ROUNDING_GUARD, HardwareView, evaluate, hardware_flops_per_token
from compiler.memory import ModelShape, memory_per_device
from compiler.steptime import _tensor_parallel_seconds


def h100s(nodes, memory_ratio=1.0):
    gpu = catalog.lookup("h100-sxm")
    return HardwareView(device="cuda", peak_flops=gpu.peak_flops, memory_bytes=gpu.memory_bytes,
                        gpus_per_node=8, nodes=nodes, kernel_efficiency=0.385,
                        interconnect=catalog.interconnect(gpu), memory_ratio=memory_ratio)


def random_shapes(count, seed=0):
    """LLaMA-3-like shapes from 1B to 100B at long sequences, where checkpointing matters."""
    rng = np.random.default_rng(seed)
    heads = rng.choice([16, 32, 64], count)
    d = heads * 128
    return ModelShape(rng.integers(8, 96, count), d, heads, 8, 128,
                      256 * np.round(3.5 * d / 256).astype(int), 128256,
                      rng.choice([4096, 8192, 16384], count))


def one(shapes, i):
    count = np.asarray(shapes.n_layers).size
    return ModelShape(*(int(np.broadcast_to(getattr(shapes, f), count)[i]) for f in
                        ("n_layers", "d_model", "n_heads", "n_kv_heads", "head_dim",
                         "ffn_hidden", "vocab_size", "seq_len")))


def test_screening_total_is_the_breakdowns_total():
    """HardwareView.peak_bytes (the search's screen) and memory(...).total (the plan's
    breakdown) sum the same terms in the same order; where two moments tie, the breakdown's
    argmax may pick the other one, a last-bit difference: rel 1e-15 allows a few ulps."""
    shapes = random_shapes(400)
    blocks = np.random.default_rng(1).integers(0, 96, 400)
    for ratio in (1.0, 0.93):
        view = h100s(2, memory_ratio=ratio)
        for parallelism in ("ddp", "fsdp", "hsdp"):
            for ac in (False, True, blocks):
                screen = view.peak_bytes(shapes, 2, parallelism, 1, ac, grad_accum=3)
                total = view.memory(shapes, 2, parallelism, 1, ac, grad_accum=3).total
                np.testing.assert_allclose(screen, total, rtol=1e-15, atol=0)


def test_the_blocks_chosen_are_the_fewest_that_fit():
    """For every shape and layout where checkpointing some blocks is an option, the count is the
    fewest that fits, found by trying every count. One more is allowed only where the fewest
    fits within ROUNDING_GUARD of the capacity: the guard's deliberate round-up at a tie."""
    view = h100s(4)
    shapes = random_shapes(60, seed=2)
    ev = evaluate(shapes, view, 256)
    checked = moving_peak = 0
    for (p, t), counts in ev.partial_layers.items():
        micro = ev.options[(p, t, PARTIAL)]
        for i in np.flatnonzero(counts):
            s, k, m = one(shapes, i), int(counts[i]), int(micro[i])
            accum = 256 // (view.world_size // t) // m
            every = np.arange(int(s.n_layers))
            totals = view.peak_bytes(s, m, p, t, every, grad_accum=accum)
            fewest = int(np.flatnonzero(totals <= view.capacity)[0])
            tie = totals[fewest] > view.capacity * (1 - ROUNDING_GUARD)
            assert k == fewest or (tie and k == fewest + 1), (i, p, t, k, fewest)
            phases = view.memory(s, m, p, t, every[[1, -1]], grad_accum=accum).phase
            moving_peak += phases[0] != phases[1]
            checked += 1
    # the test sees both cases: one moment the peak throughout, and a peak that moves
    assert checked > 100 and 0 < moving_peak < checked, (checked, moving_peak)


def test_some_blocks_cost_their_own_recomputation_only():
    s = ModelShape(80, 8192, 64, 8, 128, 28672, 128256, 8192)
    exact = arch.flops_per_token_exact(80, 8192, 64, 8, 128, 28672, 128256, 8192)
    lm_head = 6 * 128256 * 8192
    forward_of_blocks = (exact - lm_head) / 3  # what checkpointing every block adds
    for k in (0, 1, 24, 80):
        assert hardware_flops_per_token(s, np.int64(k)) == pytest.approx(
            exact + k / 80 * forward_of_blocks, rel=1e-12)  # float64 sums of ~1e11 terms
    assert hardware_flops_per_token(s, True) == hardware_flops_per_token(s, np.int64(80))
    assert hardware_flops_per_token(s, False) == exact
    # TP all-reduces: 4 per block, 2 more in each recomputed one, 1 more in each other one that
    # gathers its inputs again in backward (regather)
    link = catalog.interconnect(catalog.lookup("h100-sxm"))
    per_block = _tensor_parallel_seconds(8192, 8192, 1, 8, 0.0, False, 8, link) / 4
    assert _tensor_parallel_seconds(8192, 8192, 80, 8, 0.25, False, 8, link) == pytest.approx(
        80 * (4 + 2 * 0.25) * per_block)
    assert _tensor_parallel_seconds(8192, 8192, 80, 8, 0.25, True, 8, link) == pytest.approx(
        80 * (4 + 2 * 0.25 + 0.75) * per_block)


def test_a_shape_that_needs_some_recomputation_pays_for_that_only():
    """Llama 3 70B at 8192 tokens on 32 nodes of H100 (400 Gb/s): without tensor parallelism
    (fixed off, as training.tensor_parallel: 1 does) micro-batch 2 fits only with recomputation.
    Checkpointing 75 of the 80 blocks fits it and is predicted faster than recomputing all 80;
    the plan's reasons say so and compare."""
    from compiler.layout import plan_layout
    s = ModelShape(80, 8192, 64, 8, 128, 28672, 128256, 8192)
    view = dataclasses.replace(h100s(32), tensor_parallel=1)
    lay = plan_layout(s, view, 2048)
    assert lay.fits and lay.activation_checkpointing and 0 < lay.checkpointed_layers < 80
    every = lay.speeds["fsdp+ac"]
    assert 0 < every < lay.tokens_per_second
    assert lay.speeds[f"fsdp+ac{lay.checkpointed_layers}/80"] == lay.tokens_per_second
    reason = next(r for r in lay.reasons if r.startswith("activation checkpointing"))
    assert f"the first {lay.checkpointed_layers} of 80 blocks" in reason
    assert f"every block: {every / lay.tokens_per_second:.0%}" in reason
    # the same decision with checkpointing fixed on by the spec: every block
    on = plan_layout(s, HardwareView(**{**view.__dict__, "activation_checkpointing": True}), 2048)
    assert on.checkpointed_layers == 80 and on.tokens_per_second == pytest.approx(every)


def test_the_memory_of_k_blocks_lies_between_none_and_all():
    s = ModelShape(32, 4096, 32, 8, 128, 14336, 128256, 8192)
    totals = [memory_per_device(s, 1, parallelism="fsdp", world_size=8, gpus_per_node=8,
                                activation_checkpointing=ac).total
              for ac in (False, np.int64(8), np.int64(16), np.int64(31), True)]
    assert totals == sorted(totals, reverse=True) and totals[0] > totals[-1]
    # affine below L: equal steps in k, equal steps in memory (one moment is the peak here)
    assert totals[1] - totals[2] == pytest.approx(totals[0] - totals[1], rel=1e-9)


LONG_SEQUENCES = """\
name: long
budget: {flops: 3.0e23}
hardware: {gpu: h100-sxm, gpus_per_node: 8, nodes: 4}
model: {seq_len: 16384}
search: {layers: {min: 40, max: 64}, hidden: {min: 6144, max: 8192, step: 512}}
variants: [{name: optimal}]
"""


def test_a_plan_that_checkpoints_some_blocks_says_so_and_its_config_does_it():
    """A 3e23 FLOPs budget at 16,384 tokens per sequence on 4 nodes of H100: the pick fits
    micro-batch 1 only with recomputation, and not every block needs it. The plan, the report and
    the generated config agree on the count, and train.py reads it as that count."""
    import ast
    from compiler.planner import build_plan
    from compiler.render import render_files
    from compiler.report import variant_block
    from compiler.spec import parse_spec_text
    plan = build_plan(parse_spec_text(LONG_SEQUENCES))
    v = plan.variants[0]
    t, layers = v.training, v.choice.shape.n_layers
    assert t.activation_checkpointing and 0 < t.checkpointed_layers < layers
    assert f"activation checkpointing {t.checkpointed_layers} of {layers} blocks" in variant_block(plan, v)
    assert f"the first {t.checkpointed_layers} of {layers} blocks" in v.provenance["timing"]
    config = render_files(plan, LONG_SEQUENCES)["config/optimal.py"].decode()
    values = {n.targets[0].id: ast.literal_eval(n.value) for n in ast.parse(config).body
              if isinstance(n, ast.Assign)}
    assert values["activation_checkpointing"] is True
    assert values["checkpointed_layers"] == t.checkpointed_layers


def test_a_runs_layout_record_counts_its_blocks_as_train_py_reads_its_config():
    """calibrate.py compares a run's layout with the plan's by this count: records written before
    checkpointed_layers existed meant every block."""
    from compiler.calibrate import checkpointed_blocks
    assert checkpointed_blocks({"activation_checkpointing": False, "checkpointed_layers": 5}, 8) == 0
    assert checkpointed_blocks({"activation_checkpointing": True, "checkpointed_layers": 5}, 8) == 5
    assert checkpointed_blocks({"activation_checkpointing": True, "checkpointed_layers": 0}, 8) == 8
    assert checkpointed_blocks({"activation_checkpointing": True}, 8) == 8
