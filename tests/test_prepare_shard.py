"""data/prepare.py for corpora larger than a node (issue #16 part 6): `--shard I/N` tokenizes one
part of the input files, `--merge N` joins the parts into the out_dir that one run writes, byte for
byte, and refuses shards that are missing, unfinished, made with other settings or changed.

The script runs as a subprocess on the standard library's sources (test_prepare_scale's corpus:
a file of two segments, a jsonl file and small files, 3 MB), with raw bytes and with a BPE
tokenizer.json trained here. The live-cluster run of scripts/prepare.sh is in
test_prepare_slurm.py.
"""

import importlib.util
import json
import random
import shutil
import signal

import pytest

from _repo_files import TEMPLATES_DIR
from test_prepare_scale import COMMON, OUTPUTS, outputs, run_prepare, start_prepare
from test_prepare_scale import big_input, corpus, reference, tokenizer_json  # noqa: F401 (fixtures)


def run_shards(corpus, out, count, *args):
    """Every shard's run (on 1 or 2 workers, alternately); returns their stdout."""
    logs = []
    for index in range(count):
        proc = run_prepare("--input", corpus, "--out_dir", out, "--shard", f"{index}/{count}",
                           "--workers", 1 + index % 2, *COMMON, *args)
        assert proc.returncode == 0, proc.stderr
        logs.append(proc.stdout)
    return logs


def merge(corpus, out, count, *args):
    return run_prepare("--input", corpus, "--out_dir", out, "--merge", count, *COMMON, *args)


def listing(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


@pytest.mark.parametrize("count, tokenizer", [(2, "bytes"), (4, "tokenizer.json")])
def test_merged_shards_are_the_files_one_run_writes(tmp_path, corpus, tokenizer_json, count,
                                                    tokenizer):
    """2 shards of raw bytes; 4 shards of BPE tokens, one of them empty (the 1.5 MB file's
    middle byte is in the first quarter of the 3.4 MB, the 1.3 MB jsonl's in the third, the
    small files' in the last): the merged out_dir holds the same files with the same bytes as
    one run's, and nothing else."""
    args = ["--tokenizer", tokenizer_json] if tokenizer == "tokenizer.json" else []
    one = run_prepare("--input", corpus, "--out_dir", tmp_path / "one", "--workers", 2,
                      *COMMON, *args)
    assert one.returncode == 0, one.stderr
    logs = run_shards(corpus, tmp_path / "merged", count, *args)
    merged = merge(corpus, tmp_path / "merged", count, *args, "--progress_seconds", 0)
    assert merged.returncode == 0, merged.stderr
    assert listing(tmp_path / "merged") == listing(tmp_path / "one")  # the shards are gone
    assert outputs(tmp_path / "merged") == outputs(tmp_path / "one")
    meta = json.loads((tmp_path / "merged/meta.json").read_text())
    assert meta["n_val_tokens"] > 0 and meta["n_train_tokens"] > meta["n_val_tokens"]
    progress = [line for line in merged.stdout.splitlines() if line.startswith("prepare: ")]
    tokens = meta["n_train_tokens"] + meta["n_val_tokens"]
    assert progress[-1].startswith(f"prepare: {meta['n_documents']:,} documents, {tokens:,} "
                                   f"tokens, ") and "(100%)" in progress[-1], merged.stdout
    if tokenizer == "tokenizer.json":
        assert (tmp_path / "merged/tokenizer.json").read_bytes() == tokenizer_json.read_bytes()
    files = sorted(corpus.iterdir())
    bounds = load_prepare().shard_bounds([f.stat().st_size for f in files], count)
    for index, (lo, hi) in enumerate(bounds):
        assert f"shard {index}/{count}: " in logs[index] and f" from {hi - lo} files: " in logs[index]
    if count == 4:
        assert any(lo == hi for lo, hi in bounds), f"no empty shard among {bounds}: the corpus " \
                                                   "changed; choose another count"


def load_prepare():
    spec = importlib.util.spec_from_file_location("_prepare", TEMPLATES_DIR / "data/prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shards_are_contiguous_whole_files_balanced_by_bytes():
    """Random file sizes: every file in exactly one shard, in order; a shard holds the files
    whose middle byte falls in its 1/N of the bytes, so it exceeds total / N by at most the
    largest file (half of one at each end)."""
    prepare = load_prepare()
    rng = random.Random(0)
    for _ in range(300):
        sizes = [rng.choice([0, 1, 10, 1000, 10 ** 6]) for _ in range(rng.randint(1, 40))]
        count = rng.randint(1, 12)
        bounds = prepare.shard_bounds(sizes, count)
        assert len(bounds) == count and bounds[0][0] == 0 and bounds[-1][1] == len(sizes)
        assert all(a[1] == b[0] and a[0] <= a[1] for a, b in zip(bounds, bounds[1:]))
        for lo, hi in bounds:
            assert sum(sizes[lo:hi]) <= sum(sizes) / count + max(sizes)


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory, corpus):
    """The corpus tokenized (raw bytes) as 2 shards, not merged yet."""
    out = tmp_path_factory.mktemp("shards") / "data"
    run_shards(corpus, out, 2)
    return out


@pytest.fixture
def shards(tmp_path, two_shards):
    return shutil.copytree(two_shards, tmp_path / "data")


def assert_refused(proc, out, before, *phrases):
    """Exit 2, one error naming the shard and how to redo it, and the out_dir as it was."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("prepare.py: error: shard ") and "Traceback" not in proc.stderr
    for phrase in phrases:
        assert phrase in proc.stderr, proc.stderr
    assert listing(out) == before


def test_a_missing_or_interrupted_shard_is_refused(corpus, shards):
    shutil.rmtree(shards / "shard-1-of-2")
    before = listing(shards)
    assert_refused(merge(corpus, shards, 2), shards, before,
                   "shard 1/2: ", "shard-1-of-2/shard.json is missing: the shard was not run",
                   "--shard 1/2 instead of --merge 2", "array task 1 of scripts/prepare.sbatch")
    (shards / "shard-1-of-2/.prepare-partial").mkdir(parents=True)  # as an interrupted run leaves
    before = listing(shards)
    assert_refused(merge(corpus, shards, 2), shards, before, "the shard was interrupted")
    assert_refused(merge(corpus, shards, 3), shards, before,  # shards of another count
                   "shard 0/3: ", "shard-0-of-3/shard.json is missing: the shard was not run",
                   "holds shards of N = 2: --merge 2?")


def test_a_shard_made_with_other_settings_or_inputs_is_refused(corpus, shards, tokenizer_json):
    run_prepare("--input", corpus, "--out_dir", shards, "--shard", "1/2", "--tokenizer",
                tokenizer_json, *COMMON)
    before = listing(shards)
    assert_refused(merge(corpus, shards, 2), shards, before,
                   "shard 1/2: it was tokenized with other settings than the merge's (changed: "
                   "--tokenizer, --eod_token, --vocab_size")
    (shards.parent / "more.txt").write_text("a file added since the shards were made\n")
    proc = run_prepare("--input", corpus, shards.parent / "more.txt", "--out_dir", shards,
                       "--merge", 2, *COMMON)
    assert_refused(proc, shards, before, "shard 0/2: ", "(changed: the input files (names, "
                                                        "sizes or modification times)")


@pytest.mark.parametrize("damage, phrase", [
    (lambda data: data[:-4], "is not the"),  # truncated
    (lambda data: data[:8] + bytes([data[8] ^ 1]) + data[9:], "does not hash to the sha256"),
])
def test_a_changed_shard_is_refused(corpus, shards, damage, phrase):
    tokens = shards / "shard-1-of-2/tokens.bin"
    tokens.write_bytes(damage(tokens.read_bytes()))
    before = listing(shards)
    assert_refused(merge(corpus, shards, 2), shards, before, "shard 1/2: ", phrase)


def test_an_interrupted_shard_is_refused_then_resumed(tmp_path, big_input, reference):
    """SIGTERM (SLURM's at the time limit) stops shard 0/2 of 8 MB with its progress saved: the
    merge refuses it; the same command resumes it, and the merge is the one run's output."""
    out = tmp_path / "data"
    proc = start_prepare("--input", big_input, "--out_dir", out, "--shard", "0/2", "--workers", 1,
                         "--progress_seconds", 0, *COMMON)
    assert proc.stdout.readline().startswith("prepare: ")  # one piece done
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "the progress is saved in" in stderr, stderr
    second = run_prepare("--input", big_input, "--out_dir", out, "--shard", "1/2", *COMMON)
    assert second.returncode == 0, second.stderr
    before = listing(out)
    assert_refused(merge(big_input, out, 2), out, before, "shard 0/2: ", "the shard was interrupted")
    again = run_prepare("--input", big_input, "--out_dir", out, "--shard", "0/2", *COMMON)
    assert again.returncode == 0 and "resuming the interrupted run" in again.stdout, again.stderr
    assert merge(big_input, out, 2).returncode == 0
    assert outputs(out) == reference and listing(out) == sorted(OUTPUTS)


def test_a_finished_shard_is_not_tokenized_again(corpus, shards):
    """A resubmitted array: the finished shard says so and leaves its files alone."""
    before = {p: p.stat().st_mtime_ns for p in (shards / "shard-0-of-2").iterdir()}
    proc = run_prepare("--input", corpus, "--out_dir", shards, "--shard", "0/2", *COMMON)
    assert proc.returncode == 0, proc.stderr
    assert "shard 0/2 is done already" in proc.stdout
    assert {p: p.stat().st_mtime_ns for p in (shards / "shard-0-of-2").iterdir()} == before


@pytest.mark.parametrize("args, phrase", [
    (["--shard", "2/2"], "--shard 2/2: expected I/N"),
    (["--shard", "x"], "--shard x: expected I/N"),
    (["--merge", "0"], "--merge 0: give the number of shards, the N of their --shard I/N"),
    (["--shard", "0/2", "--merge", "2"], "not allowed with argument"),
])
def test_bad_shard_arguments_are_refused(tmp_path, corpus, args, phrase):
    proc = run_prepare("--input", corpus, "--out_dir", tmp_path / "data", *args, *COMMON)
    assert proc.returncode == 2 and phrase in proc.stderr, proc.stderr
    assert not (tmp_path / "data").exists()
