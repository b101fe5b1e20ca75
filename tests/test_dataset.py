"""The generated dataset.py: every training sequence exactly once per epoch, whatever the number
of ranks and wherever a run stops and resumes (issue #16 part 1), and train.py's use of it.

Tolerances: pytest.approx without rel= uses its default, 1e-6 relative. Every such comparison
here is float64 arithmetic (numpy and Python, no torch kernels) of the same quantity computed two
ways, which agree to ~1e-15: 1e-6 is far above that and far below any real discrepancy (a wrong
term moves these numbers by percents). Bounds that are not about rounding say why beside them.
"""

import json

import numpy as np
import pytest

from _repo_files import load_template_module
from _train_fixtures import make_repo, prepare_data, read_metrics, run_train

dataset = load_template_module("dataset")
configurator = load_template_module("configurator")


def corpus(tmp_path, n_tokens, block_size=8, seed=1):
    """A train.bin of n_tokens distinct ids (so a sequence is known by its first token)."""
    (tmp_path / "train.bin").write_bytes(np.arange(n_tokens, dtype=np.uint32).tobytes())
    return dataset.TrainSequences(str(tmp_path), block_size, seed)


def read(train, steps, batch, world=1, first=0):
    """The sequence indices that `world` ranks read over steps first..first+steps-1, rank by rank."""
    return np.concatenate([train.step_sequences(s, batch, r, world)
                           for s in range(first, first + steps) for r in range(world)])


@pytest.mark.parametrize("world", [1, 2, 4])
def test_an_epoch_reads_every_sequence_exactly_once_on_any_number_of_ranks(tmp_path, world):
    train = corpus(tmp_path, 8 * 96 + 1)  # K = 96 sequences of 8 + 1 tokens
    assert train.count == 96
    batch = 8
    epoch = read(train, train.count // batch, batch, world)
    assert sorted(epoch) == list(range(96))
    assert (read(train, 12, batch, world) == read(train, 12, batch, 1)).all()  # same sequences
    # the next epoch: every sequence once more, in another order
    second = read(train, 12, batch, world, first=12)
    assert sorted(second) == list(range(96)) and (second != epoch).any()


def test_sequences_tile_the_corpus_so_every_token_is_a_target_once(tmp_path):
    train = corpus(tmp_path, 8 * 10 + 1)
    import torch
    x, y = train.batch(train.starts(np.arange(10)), torch.device("cpu"))
    assert (x.flatten() == torch.arange(80)).all() and (y.flatten() == torch.arange(1, 81)).all()


def test_a_step_spanning_two_epochs_finishes_one_and_starts_the_next(tmp_path):
    train = corpus(tmp_path, 8 * 10 + 1)  # K = 10, batch 4: step 2 reads 8, 9 | 0, 1
    stream = read(train, 5, 4)  # 20 slots: exactly 2 epochs
    assert sorted(stream[:10]) == sorted(stream[10:]) == list(range(10))
    assert train.epochs_after(5, 4) == 2.0 and train.unique_tokens_after(5, 4) == 10 * 8


def test_resuming_anywhere_on_another_world_size_reads_what_an_uninterrupted_run_reads(tmp_path):
    train = corpus(tmp_path, 8 * 200 + 1)
    uninterrupted = read(train, 30, 8, world=1)
    for stop in (1, 7, 13, 29):  # a kill after `stop` steps, resumed by a fresh process on 2 ranks
        fresh = dataset.TrainSequences(str(tmp_path), 8, 1)
        resumed = np.concatenate([read(train, stop, 8, 1), read(fresh, 30 - stop, 8, 2, stop)])
        assert (resumed == uninterrupted).all(), stop
    other_seed = dataset.TrainSequences(str(tmp_path), 8, 2)
    assert (read(other_seed, 30, 8) != uninterrupted).any()


def test_resume_onto_another_train_bin_is_refused_unless_allowed(tmp_path):
    train = corpus(tmp_path, 8 * 50 + 1)
    saved = {"n_train_tokens": 8 * 50 + 1}
    dataset.check_same_data(saved, train, allow_change=False)  # the same data: fine
    dataset.check_same_data({}, train, allow_change=False)  # an older checkpoint: no record
    with pytest.raises(configurator.ConfigError, match="trained on 801.*allow_data_change"):
        dataset.check_same_data({"n_train_tokens": 801}, corpus(tmp_path, 8 * 60 + 1), False)
    dataset.check_same_data({"n_train_tokens": 801}, corpus(tmp_path, 8 * 60 + 1), True)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    path = make_repo(tmp_path_factory.mktemp("repo"))
    prepare_data(path)
    return path


def test_train_py_reports_epochs_and_distinct_tokens(repo):
    """A real run of 40 steps of 8 sequences of 32 + 1 tokens: metrics.jsonl's epoch and
    unique_tokens follow from the corpus size, the checkpoint records the sampler state."""
    proc = run_train(repo, "config/tiny.py", "--out_dir=out/epochs", "--max_iters=20",
                     "--log_interval=10")
    meta = json.loads((repo / "data/stdlib/meta.json").read_text())
    sequences = (meta["n_train_tokens"] - 1) // 32
    assert f"data: {sequences:,} sequences of 32 + 1 tokens" in proc.stdout
    logged = {r["step"]: r for r in read_metrics(repo / "out/epochs") if "loss" in r}
    assert logged[20]["epoch"] == pytest.approx(20 * 8 / sequences)
    assert logged[20]["unique_tokens"] == 20 * 8 * 32
    state = json.loads((repo / "out/epochs/checkpoints/step_00000020/train_state.json").read_text())
    assert state["data"]["sequences"] == sequences and state["data"]["next_step"] == 20


def test_a_corpus_smaller_than_one_batch_is_refused(repo, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    for name in ("meta.json", "val.bin"):
        (small / name).write_bytes((repo / "data/stdlib" / name).read_bytes())
    (small / "train.bin").write_bytes(np.arange(32 * 5 + 1, dtype=np.uint32).tobytes())  # K = 5
    proc = run_train(repo, "config/tiny.py", "--out_dir=out/small", f"--data_dir={small}",
                     check=False)
    assert proc.returncode == 2, proc.stdout
    assert "holds 5 sequences" in proc.stdout and "fewer than one global batch (8)" in proc.stdout
    assert "Traceback" not in proc.stdout


# -----------------------------------------------------------------------------
# The plan: epochs over the spec's data


def test_the_plan_counts_epochs_over_the_unique_tokens_and_warns_past_one():
    from compiler.planner import MANY_EPOCHS, build_plan
    from compiler.spec import parse_spec_text
    base = "name: x\nbudget: {flops: 1e21}\n"
    assert all(v.epochs is None for v in build_plan(parse_spec_text(base)).variants)
    enough = build_plan(parse_spec_text(base + "data: {unique_tokens: 1000000000000}\n"))
    for v in enough.variants:
        assert v.epochs == pytest.approx(v.training.tokens_trained / 1e12)
        assert v.epochs < 1
    assert not any("epochs" in w for w in enough.warnings)
    # a tenth of what the pick trains: the law's own pick would read it 10 times, past Muennighoff
    # et al.'s ~4: a loud warning (the data-constrained pick that replaces it: test_datalimited.py)
    d = build_plan(parse_spec_text(base)).variants[0].training.tokens_trained
    short = build_plan(parse_spec_text(base + f"data: {{unique_tokens: {int(d / 10)}}}\n"))
    first = short.variants[0]
    assert first.data_limited.unconstrained.epochs == pytest.approx(10, rel=1e-6)
    assert first.epochs == pytest.approx(first.training.tokens_trained / int(d / 10))
    assert first.epochs > MANY_EPOCHS
    assert any(w.startswith(f"{first.name}: {first.epochs:.3g} epochs") and "LOUD WARNING" in w
               for w in short.warnings)
    two = build_plan(parse_spec_text(base + f"data: {{unique_tokens: {int(d / 2)}}}\n"))
    assert any("2 epochs" in w and "LOUD" not in w for w in two.warnings)
