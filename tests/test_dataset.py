"""The generated dataset.py: every training sequence exactly once per epoch, whatever the number
of ranks and wherever a run stops and resumes (issue #16 part 1), and train.py's use of it.

Tolerances: pytest.approx without rel= uses its default, 1e-6 relative. Every such comparison
here is float64 arithmetic (numpy and Python, no torch kernels) of the same quantity computed two
ways, which agree to ~1e-15: 1e-6 is far above that and far below any real discrepancy (a wrong
term moves these numbers by percents). Bounds that are not about rounding say why beside them.
"""

import hashlib
import json
import shutil

import numpy as np
import pytest

from _repo_files import load_template_module
from _train_fixtures import (
    make_repo, prepare_data, read_metrics, run_train, stdlib_corpus_files, subprocess_env,
)

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
    """Checkpoints without a fingerprint (older runs) are compared by train.bin's token count."""
    train = corpus(tmp_path, 8 * 50 + 1)
    saved = {"n_train_tokens": 8 * 50 + 1}
    assert dataset.check_same_data(saved, train, allow_change=False) == []  # the same data
    assert dataset.check_same_data({}, train, allow_change=False) == []  # no record at all
    with pytest.raises(configurator.ConfigError, match="401 tokens when.*481 now.*allow_data_change"):
        dataset.check_same_data({"n_train_tokens": 401}, corpus(tmp_path, 8 * 60 + 1), False)
    assert dataset.check_same_data({"n_train_tokens": 401}, corpus(tmp_path, 8 * 60 + 1), True)


def test_fingerprints_name_the_file_that_changed(tmp_path):
    train = corpus(tmp_path, 8 * 50 + 1)
    then = {"train.bin": {"bytes": 1604, "sha256": "a" * 64}, "val.bin": {"bytes": 40, "sha256": "b" * 64}}
    assert dataset.check_same_data({"fingerprint": then}, train, False, dict(then)) == []
    now = dict(then, **{"val.bin": {"bytes": 40, "sha256": "c" * 64}})
    with pytest.raises(configurator.ConfigError) as e:
        dataset.check_same_data({"fingerprint": then}, train, False, now)
    message = str(e.value)
    assert "val.bin (40 bytes, sha256 bbbbbbbbbbbbbbbb… when the checkpoint was saved, 40 bytes, " \
           "sha256 cccccccccccccccc… now)" in message
    assert "train.bin (" not in message and "--allow_data_change=True" in message
    with_tokenizer = dict(then, **{"tokenizer.json": {"bytes": 9, "sha256": "d" * 64}})
    changes = dataset.check_same_data({"fingerprint": then}, train, True, with_tokenizer)
    assert changes == ["tokenizer.json (absent when the checkpoint was saved, 9 bytes, sha256 "
                       "dddddddddddddddd… now)"]


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
    (small / "val.bin").write_bytes((repo / "data/stdlib/val.bin").read_bytes())
    meta = json.loads((repo / "data/stdlib/meta.json").read_text())
    del meta["fingerprint"]  # a hand-made train.bin: as from a prepare.py without fingerprints
    (small / "meta.json").write_text(json.dumps(meta))
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


# -----------------------------------------------------------------------------
# The corpus checked before the run (issue #16 part 5), with the real train.py and prepare.py


def prepare_other(repo, data_dir, max_bytes):
    """data/prepare.py on another slice of the stdlib corpus, into data_dir (replacing it)."""
    import subprocess
    import sys
    subprocess.run([sys.executable, "data/prepare.py", "--input", *stdlib_corpus_files(max_bytes),
                    "--out_dir", str(data_dir), "--val_fraction", "0.1", "--chunk_tokens",
                    "16384", "--config", "config/tiny.py"], cwd=repo, env=subprocess_env(),
                   check=True, capture_output=True)


def test_a_changed_data_directory_is_refused_on_resume(repo, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(repo / "data/stdlib", data)
    out = tmp_path / "out"
    common = ("config/tiny.py", f"--data_dir={data}", f"--out_dir={out}", "--ckpt_interval=5")
    run_train(repo, *common, "--max_iters=5")
    state = json.loads((out / "checkpoints/step_00000005/train_state.json").read_text())
    assert state["data"]["fingerprint"] == json.loads((data / "meta.json").read_text())["fingerprint"]
    prepare_other(repo, data, 1_500_000)  # other text in the same directory
    proc = run_train(repo, *common, "--max_iters=10", check=False)
    assert proc.returncode == 2, proc.stdout
    (line,) = [l for l in proc.stdout.splitlines() if "configuration error" in l]
    assert f"{data} is not the data the checkpoint trained on: train.bin (" in line
    assert "val.bin (" in line and "--allow_data_change=True" in line and "Traceback" not in proc.stdout
    assert not (out / "checkpoints/step_00000010").exists()
    allowed = run_train(repo, *common, "--max_iters=10", "--allow_data_change")
    assert "WARNING: allow_data_change: resuming on changed data: train.bin (" in allowed.stdout
    assert (out / "checkpoints/step_00000010").exists()


def test_dry_run_checks_data_config_and_checkpoint_without_training(repo, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(repo / "data/stdlib", data)
    out = tmp_path / "out"
    common = ("config/tiny.py", f"--data_dir={data}", f"--out_dir={out}")
    dry = run_train(repo, *common, "--dry_run", "--device=cuda")  # no GPU needed
    meta = json.loads((data / "meta.json").read_text())
    for name in ("train.bin", "val.bin"):
        digest = hashlib.sha256((data / name).read_bytes()).hexdigest()  # independent hash
        assert f"data: {name} matches meta.json" in dry.stdout and digest[:16] in dry.stdout
    sequences = (meta["n_train_tokens"] - 1) // 32
    assert (f"data: {sequences:,} sequences of 32 + 1 tokens in {data}/train.bin "
            f"({meta['n_train_tokens']:,} tokens); the run reads 40 steps × 8 sequences × 32 = "
            f"10,240 tokens (10,240 distinct): {40 * 8 / sequences:.3g} epochs") in dry.stdout
    assert f"checkpoint: none in {out}; the run starts at step 0" in dry.stdout
    assert not out.exists()  # nothing written, nothing trained
    run_train(repo, *common, "--max_iters=5", "--ckpt_interval=5")
    again = run_train(repo, *common, "--dry_run")
    assert "step_00000005 verifies and fits this config; the run resumes at step 5 of 40" in again.stdout
    assert len(read_metrics(out)) == len([l for l in (out / "metrics.jsonl").read_text().splitlines()])
    # Same size, other contents: only the re-hash sees it (a normal start compares sizes).
    tokens = np.fromfile(data / "val.bin", dtype=np.uint32)
    tokens[len(tokens) // 2] ^= 1
    tokens.tofile(data / "val.bin")
    bad = run_train(repo, *common, "--dry_run", check=False)
    assert bad.returncode == 2 and "val.bin: its sha256 differs" in bad.stdout, bad.stdout
    # A shorter file: every start refuses it.
    (data / "val.bin").write_bytes(tokens[:-1].tobytes())
    short = run_train(repo, *common, "--max_iters=6", check=False)
    assert short.returncode == 2 and f"{data}/val.bin has {4 * len(tokens) - 4:,} bytes, but" in short.stdout


# -----------------------------------------------------------------------------
# Mixtures (issue #16 part 4): sources drawn in the weights' proportions, each once per its epoch


def mixture(tmp_path, counts, weights, block_size=8):
    """Sources s0, s1, ... of counts[i] sequences; source i's ids start at i * 10**6, so a
    sequence's first token says its source and index. Returns the TrainMixture."""
    for i, k in enumerate(counts):
        d = tmp_path / f"s{i}"
        d.mkdir()
        (d / "train.bin").write_bytes((i * 10**6 + np.arange(k * block_size + 1, dtype=np.uint32)).tobytes())
        (d / "val.bin").write_bytes(np.arange(100, dtype=np.uint32).tobytes())
    text = ",".join(f"s{i}:{w}" for i, w in enumerate(weights))
    return dataset.open_train_data(str(tmp_path), text, block_size, seed=3)[0]


def sources_read(train, steps, batch, world=1, first=0):
    """(source, index) of every sequence read, step by step (a list per step), via real batches."""
    import torch
    out = []
    for s in range(first, first + steps):
        starts = np.concatenate([train.starts(train.step_sequences(s, batch, r, world))
                                 for r in range(world)])
        x, _ = train.batch(starts, torch.device("cpu"))
        out.append([(int(t) // 10**6, int(t) % 10**6 // 8) for t in x[:, 0]])
    return out


def deficit_rule(weights, n_slots):
    """The stated rule computed the plain way (dataset.py): slot by slot, the source furthest
    behind its share w_i·(j + 1) gets the slot, ties to the first; exact fractions."""
    from fractions import Fraction
    weights = [Fraction(w) / sum(map(Fraction, weights)) for w in weights]
    taken, sources = [0] * len(weights), []
    for j in range(n_slots):
        deficits = [w * (j + 1) - n for w, n in zip(weights, taken)]
        i = deficits.index(max(deficits))
        taken[i] += 1
        sources.append(i)
    return sources


@pytest.mark.parametrize("world", [1, 2, 4])
def test_mixture_steps_hold_the_stated_counts_and_each_source_once_per_epoch(tmp_path, world):
    """0.7 / 0.3 over 56 and 24 sequences, batch 8: each step holds the rule's counts (5 or 6
    of 5.6 from source 0, as two sources round), and 10 steps read 80 = 56 + 24 sequences:
    each source exactly once."""
    train = mixture(tmp_path, [56, 24], ["0.7", "0.3"])
    steps = sources_read(train, 10, 8, world)
    expected = deficit_rule(["0.7", "0.3"], 80)
    for s, step in enumerate(steps):
        assert [src for src, _ in step] == expected[8 * s:8 * s + 8]
        assert sum(src == 0 for src, _ in step) in (5, 6)
    read = [pair for step in steps for pair in step]
    assert sorted(i for src, i in read if src == 0) == list(range(56))
    assert sorted(i for src, i in read if src == 1) == list(range(24))
    assert train.source_epochs_after(10, 8) == {"s0": 1.0, "s1": 1.0}
    assert train.unique_tokens_after(10, 8) == 80 * 8
    # the next 10 steps: each source's next epoch, in another order of its own
    again = [p for step in sources_read(train, 10, 8, world, first=10) for p in step]
    assert sorted(i for src, i in again if src == 0) == list(range(56))
    assert [i for src, i in again if src == 0] != [i for src, i in read if src == 0]


def test_mixture_resumes_anywhere_on_another_world_size(tmp_path):
    train = mixture(tmp_path, [30, 20, 10], ["0.5", "0.3", "0.2"])
    uninterrupted = sources_read(train, 25, 8, world=1)
    fresh = dataset.open_train_data(str(tmp_path), "s0:0.5,s1:0.3,s2:0.2", 8, seed=3)[0]
    assert sources_read(fresh, 12, 8, world=2, first=13) == uninterrupted[13:]
    assert [src for step in uninterrupted for src, _ in step] == deficit_rule(["0.5", "0.3", "0.2"], 200)
    counts = np.array([[sum(src == i for src, _ in step) for i in range(3)] for step in uninterrupted])
    assert (abs(counts - np.array([4, 2.4, 1.6])) < 2).all()  # the rule's bound per step
    total = counts.sum(axis=0)  # 200 slots = 20 whole periods of 10: exactly the shares
    assert list(total) == [100, 60, 40]
    assert train.source_epochs_after(25, 8) == {"s0": total[0] / 30, "s1": total[1] / 20,
                                                "s2": total[2] / 10}


@pytest.mark.parametrize("text", ["web", "web:0", "web:-1", "web:x", "a/b:1", "web:1,web:2", ""])
def test_bad_data_sources_are_refused(text):
    with pytest.raises(configurator.ConfigError, match="data_sources"):
        dataset.parse_sources(text)


def test_train_py_on_a_mixture_logs_per_source_epochs(repo, tmp_path):
    """Two real prepared sources (other slices of the stdlib), 0.75 / 0.25, a real run."""
    mix = tmp_path / "mix"
    shutil.copytree(repo / "data/stdlib", mix / "web")
    prepare_other(repo, mix / "code", 1_000_000)
    proc = run_train(repo, "config/tiny.py", f"--data_dir={mix}", "--data_sources=web:0.75,code:0.25",
                     f"--out_dir={tmp_path / 'out'}", "--max_iters=10", "--log_interval=10",
                     "--eval_interval=10", "--ckpt_interval=10")
    counts = {}
    for name in ("web", "code"):
        meta = json.loads((mix / name / "meta.json").read_text())
        counts[name] = (meta["n_train_tokens"] - 1) // 32
        assert f"data: source {name} (weight {0.75 if name == 'web' else 0.25:g}): " \
               f"{counts[name]:,} sequences" in proc.stdout
    record = [r for r in read_metrics(tmp_path / "out") if r.get("step") == 10 and "loss" in r][0]
    # 80 sequences, 20 periods of 4 (0.75 / 0.25): 60 of web, 20 of code
    assert record["source_epochs"] == {"web": 60 / counts["web"], "code": 20 / counts["code"]}
    state = json.loads((tmp_path / "out/checkpoints/step_00000010/train_state.json").read_text())
    assert sorted(state["data"]["fingerprint"]) == ["code/train.bin", "code/val.bin",
                                                    "web/train.bin", "web/val.bin"]


def test_the_plan_counts_epochs_per_source_of_a_mixture(tmp_path):
    """data.sources: each source's epochs are its weight's share of the tokens trained over its
    unique tokens (computed here from the Plan's own token count), warned per source, and the
    generated config names the sources for train.py."""
    import subprocess
    import sys
    from compiler.planner import build_plan
    from compiler.spec import parse_spec_text
    base = "name: x\nbudget: {flops: 1e21}\n"
    d = build_plan(parse_spec_text(base)).variants[0].training.tokens_trained
    spec = base + (f"data:\n  sources:\n    - {{name: web, unique_tokens: {int(d)}, weight: 3}}\n"
                   f"    - {{name: code, unique_tokens: {int(d / 20)}, weight: 1}}\n")
    plan = build_plan(parse_spec_text(spec))
    for v in plan.variants:
        tokens = v.training.tokens_trained
        assert v.source_epochs == pytest.approx({"web": 0.75 * tokens / int(d),
                                                 "code": 0.25 * tokens / int(d / 20)})
        assert v.epochs == max(v.source_epochs.values())
    first = plan.variants[0]
    assert any(w.startswith(f"{first.name}: 5 epochs over data.sources code") and "LOUD" in w
               for w in plan.warnings)
    assert not any("data.sources web" in w for w in plan.warnings)
    for bad, words in (("  unique_tokens: 5\n  sources: [{name: a, unique_tokens: 1, weight: 1}]",
                        "not both"),
                       ("  sources: [{name: a, unique_tokens: 1, weight: 1}, "
                        "{name: a, unique_tokens: 2, weight: 1}]", "repeated: a"),
                       ("  sources: [{name: a, unique_tokens: 1, weight: 0}]", "greater than 0")):
        with pytest.raises(Exception, match=words):
            parse_spec_text(base + "data:\n" + bad + "\n")
    (tmp_path / "mix.yaml").write_text(spec)
    subprocess.run([sys.executable, "-m", "llama3gen.cli", "compile", str(tmp_path / "mix.yaml"),
                    "-o", str(tmp_path / "repo")], check=True, capture_output=True)
    config = (tmp_path / "repo/config/optimal.py").read_text()
    assert "data_sources = 'web:3.0,code:1.0'" in config
    assert "epochs over source `code`" in (tmp_path / "repo/docs/comparison.md").read_text()
    assert "--out_dir data/shards/code" in (tmp_path / "repo/README.md").read_text()
