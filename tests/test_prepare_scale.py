"""data/prepare.py at corpus scale (issue #16 part 6): parallel workers with output identical
for any number of them, memory that stays flat, progress, and resuming an interrupted run.

Every case runs the real script as a subprocess on real text nobody here wrote (the standard
library's sources), as a user would. Files larger than a segment (SEGMENT_BYTES, 1 MiB) are
built by joining sources, so that documents cross segment and task boundaries.
"""

import hashlib
import itertools
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from _repo_files import TEMPLATES_DIR
from _train_fixtures import stdlib_corpus_files, subprocess_env

PREPARE = TEMPLATES_DIR / "data" / "prepare.py"
SEGMENT_BYTES = 1 << 20  # prepare.py's
OUTPUTS = ("train.bin", "val.bin", "meta.json")


def run_prepare(*args, timeout=180, **kwargs):
    return subprocess.run([sys.executable, str(PREPARE), *map(str, args)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def start_prepare(*args):
    return subprocess.Popen([sys.executable, str(PREPARE), *map(str, args)], env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def outputs(data_dir):
    return {name: hashlib.sha256((Path(data_dir) / name).read_bytes()).hexdigest()
            for name in OUTPUTS}


def sources():
    """The standard library's top-level sources (about 4 MB, at least 2)."""
    return stdlib_corpus_files(4_000_000)


def joined_sources(path, n_bytes, skip=0):
    """One file of about n_bytes: stdlib sources joined, from the `skip`-th on, round and round."""
    files = sources()
    with open(path, "wb") as out:
        for name in itertools.islice(itertools.cycle(files), skip, None):
            out.write(Path(name).read_bytes())
            if out.tell() >= n_bytes:
                break
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A 1.5 MB text file (two segments), a 1.2 MB jsonl of sources (documents crossing the
    segment boundary), and small files, about 3 MB in all."""
    root = tmp_path_factory.mktemp("corpus")
    joined_sources(root / "a_big.txt", 1_500_000)
    texts = [Path(f).read_text(encoding="utf-8", errors="replace")
             for f in sources()[40:]]
    with open(root / "b_docs.jsonl", "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
            if f.tell() >= 1_200_000:
                break
    for i, name in enumerate(sources()[100:130]):
        (root / f"c_small_{i:02d}.txt").write_bytes(Path(name).read_bytes())
    return root


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory, corpus):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = (corpus / "a_big.txt").read_text(encoding="utf-8", errors="replace")[:400_000]
    tok.train_from_iterator([text], tokenizers.trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


COMMON = ["--val_fraction", "0.05", "--chunk_tokens", "4096", "--block_size", "64"]


def test_output_is_identical_for_any_number_of_workers(tmp_path, corpus, tokenizer_json):
    """A real BPE tokenizer.json, 1, 2 and 3 workers: the same bytes in every output file."""
    results = {}
    for workers in (1, 2, 3):
        out = tmp_path / f"w{workers}"
        proc = run_prepare("--input", corpus, "--out_dir", out, "--tokenizer", tokenizer_json,
                           "--workers", workers, *COMMON)
        assert proc.returncode == 0, proc.stderr
        results[workers] = outputs(out)
    assert results[1] == results[2] == results[3]
    meta = json.loads((tmp_path / "w1/meta.json").read_text())
    assert meta["n_documents"] == len(list(corpus.iterdir())) - 1 + \
        len((corpus / "b_docs.jsonl").read_text().splitlines())


def test_every_byte_of_a_file_cut_into_segments_is_there_in_order(tmp_path):
    """Raw bytes over a 2.5 MB file (three segments) on 2 workers: the chunks, put back in the
    order the split rule assigns them, are the file's bytes and one end-of-document id."""
    text = joined_sources(tmp_path / "one.txt", 2_500_000)
    out = tmp_path / "data"
    proc = run_prepare("--input", text, "--out_dir", out, "--workers", "2", *COMMON)
    assert proc.returncode == 0, proc.stderr
    splits = {s: np.fromfile(out / f"{s}.bin", dtype=np.uint32) for s in ("train", "val")}
    stream, taken = [], {"train": 0, "val": 0}
    for k in range(-(-sum(map(len, splits.values())) // 4096)):  # chunk k, as prepare.py cuts
        split = "val" if int((k + 1) * 0.05) > int(k * 0.05) else "train"
        stream.append(splits[split][taken[split]:taken[split] + 4096])
        taken[split] += 4096
    stream = np.concatenate(stream)
    raw = text.read_bytes().replace(b"\r\n", b"\n")
    assert stream[-1] == 256 and bytes(stream[:-1].astype(np.uint8)) == raw


def test_line_numbers_count_from_the_start_of_the_file(tmp_path):
    """A bad line and a bad byte past the first two segments of a jsonl file: the error and the
    warning name their real line numbers, whatever the number of workers."""
    lines = [json.dumps({"text": f"document {i} " + "x" * 200}) for i in range(12_000)]  # 2.7 MB
    bad_byte, bad_json = 10_500, 11_800  # 1-based line numbers, both beyond 2 MiB
    raw = [line.encode() for line in lines]
    raw[bad_byte - 1] = raw[bad_byte - 1].replace(b"document", b"docum\xffent")
    docs = tmp_path / "docs.jsonl"
    docs.write_bytes(b"\n".join(raw) + b"\n")
    assert sum(len(r) + 1 for r in raw[:bad_byte - 1]) > 2 * SEGMENT_BYTES
    for workers in (1, 2):
        proc = run_prepare("--input", docs, "--out_dir", tmp_path / f"ok{workers}",
                           "--workers", workers, *COMMON)
        assert proc.returncode == 0, proc.stderr
        assert f"1 invalid UTF-8 bytes replaced with U+FFFD (the first on line {bad_byte})" \
            in proc.stderr
    raw[bad_json - 1] = b'{"text": 5}'
    docs.write_bytes(b"\n".join(raw) + b"\n")
    for workers in (1, 2):
        proc = run_prepare("--input", docs, "--out_dir", tmp_path / f"bad{workers}",
                           "--workers", workers, *COMMON)
        assert proc.returncode == 2 and f"docs.jsonl:{bad_json}: 'text' is 5" in proc.stderr
        assert not (tmp_path / f"bad{workers}").exists()


def test_progress_lines_in_a_log_and_on_a_terminal(tmp_path, corpus):
    proc = run_prepare("--input", corpus, "--out_dir", tmp_path / "log", "--workers", "2",
                       "--progress_seconds", "0", *COMMON)
    assert proc.returncode == 0, proc.stderr
    pattern = re.compile(r"prepare: [\d,]+ documents, [\d,]+ tokens, [\d.e+-]+M tokens/s, "
                         r"[\d,.]+ of [\d,.]+ MB \(\d+%\), ETA (\d+:\d\d:\d\d|unknown)$")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("prepare: ")]
    assert len(lines) >= 3 and all(pattern.match(line) for line in lines), proc.stdout
    # On a terminal the line is redrawn in place (carriage returns) and ends with a newline.
    leader, follower = pty.openpty()
    tty = subprocess.Popen([sys.executable, str(PREPARE), "--input", str(corpus), "--out_dir",
                            str(tmp_path / "tty"), "--workers", "1", *COMMON],
                           env=subprocess_env(), stdout=follower, stderr=subprocess.PIPE)
    os.close(follower)
    seen = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 60)
        try:
            chunk = os.read(leader, 4096) if ready else b""
        except OSError:  # the other side closed
            chunk = b""
        if not chunk:
            break
        seen += chunk
    assert tty.wait(timeout=60) == 0
    text = seen.decode()
    assert "\rprepare: " in text and re.search(r"\(100%\), ETA 0:00:00\x1b\[K\r?\n", text), text


def wait_for(predicate, proc, timeout=60):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.002)


@pytest.fixture(scope="module")
def big_input(tmp_path_factory):
    """8 MB of text in 4 files (raw bytes tokenize fast: a run takes seconds, 8+ tasks)."""
    root = tmp_path_factory.mktemp("big")
    for i in range(4):
        joined_sources(root / f"part{i}.txt", 2_000_000, skip=20 * i)
    return root


@pytest.fixture(scope="module")
def reference(tmp_path_factory, big_input):
    out = tmp_path_factory.mktemp("reference") / "data"
    proc = run_prepare("--input", big_input, "--out_dir", out, "--workers", "1", *COMMON)
    assert proc.returncode == 0, proc.stderr
    return outputs(out)


def test_an_interrupted_run_resumes_to_the_same_output(tmp_path, big_input, reference):
    out = tmp_path / "data"
    proc = start_prepare("--input", big_input, "--out_dir", out, "--workers", "1",
                         "--progress_seconds", "0", *COMMON)
    assert proc.stdout.readline().startswith("prepare: ")  # one piece done
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    assert re.fullmatch(r"prepare.py: interrupted after [\d.,]+ MB of the input; the progress is "
                        rf"saved in {re.escape(str(out))}/.prepare-partial: run the same command "
                        r"again to resume \(--no_resume starts over\)", last), stderr
    assert os.listdir(out) == [".prepare-partial"]
    done = json.loads((out / ".prepare-partial/progress.json").read_text())["bytes_done"]
    assert 0 < done < 8_000_000
    # Resumed on another number of workers: the same bytes as the uninterrupted run.
    again = run_prepare("--input", big_input, "--out_dir", out, "--workers", "2", *COMMON)
    assert again.returncode == 0, again.stderr
    assert f"resuming the interrupted run in {out}/.prepare-partial at {done / 1e6:,.1f} MB" \
        in again.stdout
    assert outputs(out) == reference and sorted(os.listdir(out)) == sorted(OUTPUTS)


def test_a_killed_run_resumes_from_its_last_saved_progress(tmp_path, big_input, reference):
    """SIGKILL (no handler runs) after a few saves; the data written after the last save is cut
    off and done again."""
    out = tmp_path / "data"
    proc = start_prepare("--input", big_input, "--out_dir", out, "--workers", "2",
                         "--save_seconds", "0", *COMMON)
    progress = out / ".prepare-partial/progress.json"
    wait_for(lambda: progress.exists() and json.loads(progress.read_text())["bytes_done"]
             >= 2_000_000, proc)
    proc.kill()
    proc.communicate(timeout=60)
    saved = json.loads(progress.read_text())
    assert saved["bytes_done"] < 8_000_000, "finished before the kill"
    again = run_prepare("--input", big_input, "--out_dir", out, "--workers", "1", *COMMON)
    assert again.returncode == 0, again.stderr
    assert "resuming the interrupted run" in again.stdout
    assert outputs(out) == reference


def test_a_run_with_other_settings_or_inputs_starts_over_and_says_why(tmp_path, big_input):
    out = tmp_path / "data"
    proc = start_prepare("--input", big_input, "--out_dir", out, "--workers", "1",
                         "--progress_seconds", "0", *COMMON)
    assert proc.stdout.readline().startswith("prepare: ")
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    other = [a if a != "0.05" else "0.1" for a in COMMON]
    again = run_prepare("--input", big_input, "--out_dir", out, "--workers", "2", *other)
    assert again.returncode == 0, again.stderr
    assert (f"not resuming the interrupted run in {out}/.prepare-partial (--val_fraction changed "
            "since): starting over") in again.stdout
    fresh = run_prepare("--input", big_input, "--out_dir", tmp_path / "fresh", *other)
    assert fresh.returncode == 0 and outputs(out) == outputs(tmp_path / "fresh")
    # An input file that changed since the interrupted run: said so, and started over.
    proc = start_prepare("--input", big_input, "--out_dir", tmp_path / "b", "--workers", "1",
                         "--progress_seconds", "0", *COMMON)
    assert proc.stdout.readline().startswith("prepare: ")
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    os.utime(big_input / "part3.txt", ns=(0, 0))
    again = run_prepare("--input", big_input, "--out_dir", tmp_path / "b", "--no_resume", *COMMON)
    assert "(--no_resume was given): starting over" in again.stdout
    proc = start_prepare("--input", big_input, "--out_dir", tmp_path / "c", "--workers", "1",
                         "--progress_seconds", "0", *COMMON)
    assert proc.stdout.readline().startswith("prepare: ")
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    os.utime(big_input / "part3.txt")
    again = run_prepare("--input", big_input, "--out_dir", tmp_path / "c", *COMMON)
    assert ("(the input files (names, sizes or modification times) changed since): starting over"
            in again.stdout), again.stdout


def test_a_second_run_into_the_same_out_dir_is_refused_while_one_writes(tmp_path, corpus):
    import fcntl
    partial = tmp_path / "data/.prepare-partial"
    partial.mkdir(parents=True)
    fd = os.open(partial, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a running prepare.py holds it
    try:
        proc = run_prepare("--input", corpus, "--out_dir", tmp_path / "data", *COMMON)
    finally:
        os.close(fd)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"prepare.py: error: another data/prepare.py is writing into "
                                   f"{tmp_path / 'data'}; wait for it, or choose another --out_dir")
    assert os.listdir(partial) == []


# The peak is VmHWM, this program's own: getrusage's ru_maxrss is carried across exec on Linux,
# so it would report the test runner's resident set at the fork whenever that is the larger, and
# both runs would measure the same number.
MEASURE_RSS = """
import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    assert not e.code, e.code
hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM:")]
print("maxrss_kib", hwm[0].split()[1])
"""


def test_memory_stays_flat_as_the_corpus_grows(tmp_path, big_input):
    """2 MB and 8 MB of input in one process (--workers 1): 6 MB more text is 24 MB more
    tokens (4 bytes each), which would all show in the peak RSS if any stage kept them. The peak
    may grow by a few MB (4 MB seen: allocator fragmentation), so the bound is half of the 24."""
    (tmp_path / "measure.py").write_text(MEASURE_RSS)
    peaks = []
    for inputs in ([big_input / "part0.txt"], [big_input]):
        proc = subprocess.run([sys.executable, str(tmp_path / "measure.py"), str(PREPARE),
                               "--input", *map(str, inputs), "--out_dir",
                               str(tmp_path / f"d{len(peaks)}"), "--workers", "1", *COMMON],
                              env=subprocess_env(), capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr
        peaks.append(int(proc.stdout.split("maxrss_kib")[-1]) * 1024)
    tokens = [json.loads((tmp_path / f"d{i}/meta.json").read_text()) for i in range(2)]
    more_tokens = sum(tokens[1][f"n_{s}_tokens"] - tokens[0][f"n_{s}_tokens"] for s in ("train", "val"))
    assert 4 * more_tokens > 24e6
    assert peaks[1] - peaks[0] < 2 * more_tokens, (peaks, more_tokens)  # half of 4 bytes each


@pytest.mark.parametrize("progress, reason", [
    (None, "the interrupted run saved no progress yet"),
    ("not json", "the interrupted run saved no progress yet"),
    ('{"settings": {}}', "its progress.json is incomplete"),
    ('{"settings": {"format": 99}}', "its progress.json is of another version"),
])
def test_a_partial_run_that_cannot_resume_is_replaced_and_said_why(tmp_path, corpus, progress,
                                                                   reason):
    partial = tmp_path / "data/.prepare-partial"
    partial.mkdir(parents=True)
    (partial / "train.bin").write_bytes(b"\0" * 64)  # a killed run's leftovers
    if progress is not None:
        (partial / "progress.json").write_text(progress)
    proc = run_prepare("--input", corpus, "--out_dir", tmp_path / "data", *COMMON)
    assert proc.returncode == 0, proc.stderr
    assert f"not resuming the interrupted run in {partial} ({reason}" in proc.stdout
    assert sorted(os.listdir(tmp_path / "data")) == sorted(OUTPUTS)


def test_a_file_it_did_not_write_in_the_partial_directory_is_refused(tmp_path, corpus):
    partial = tmp_path / "data/.prepare-partial"
    partial.mkdir(parents=True)
    (partial / "notes.txt").write_text("the user's")
    proc = run_prepare("--input", corpus, "--out_dir", tmp_path / "data", *COMMON)
    assert proc.returncode == 2 and "notes.txt, which data/prepare.py did not write" in proc.stderr
    assert os.listdir(partial) == ["notes.txt"]
