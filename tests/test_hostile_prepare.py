"""data/prepare.py under hostile use (issue #14, items 9, 15 and 16).

Every case runs the real script as a subprocess on real files, as a user would. A refusal is one
line on stderr naming the argument or file (and line), exit status 2, no traceback, and nothing
written: no out_dir when there was none, the earlier run's files unchanged when there was one,
and no temporary files.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from _repo_files import TEMPLATES_DIR
from _train_fixtures import stdlib_corpus_files, subprocess_env

PREPARE = TEMPLATES_DIR / "data" / "prepare.py"
REPLACEMENT = "\ufffd".encode()  # U+FFFD in UTF-8


def run_prepare(cwd, *args, timeout=60):
    """The script's own command line; a hang fails the test through the timeout."""
    return subprocess.run([sys.executable, str(PREPARE), *map(str, args)], cwd=cwd,
                          env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def assert_refused(proc, *words):
    """Exit 2 with one line on stderr that contains every one of `words`."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def listing(directory):
    """{name: sha256} of every entry, dotfiles (temporary files) included."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A real corpus: the first ~100 kB of the standard library's sources, as .txt files."""
    root = tmp_path_factory.mktemp("corpus")
    for path in stdlib_corpus_files(100_000):
        shutil.copyfile(path, root / (os.path.basename(path) + ".txt"))
    return root


@pytest.fixture(scope="module")
def small_text(corpus):
    """One ~6 kB real text file, for runs with ONE_FILE."""
    path = corpus.parent / "small.txt"
    path.write_bytes((corpus / sorted(os.listdir(corpus))[0]).read_bytes()[:6000])
    return path


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory, corpus):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([p.read_text() for p in sorted(corpus.iterdir())],
                            tokenizers.trainers.BpeTrainer(
                                vocab_size=300, special_tokens=["<|endoftext|>"],
                                initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


SMALL = ["--val_fraction", "0.1", "--chunk_tokens", "1024", "--block_size", "64"]
ONE_FILE = ["--val_fraction", "0.2", "--chunk_tokens", "256", "--block_size", "64"]  # ~6 kB


# -----------------------------------------------------------------------------
# Item 9: every numeric argument is range-checked (a negative chunk size used to loop forever)


@pytest.mark.parametrize("args, names", [
    (["--chunk_tokens", "-5"], "--chunk_tokens"),
    (["--chunk_tokens", "-1"], "--chunk_tokens"),
    (["--chunk_tokens", str(1 << 40)], "--chunk_tokens"),
    (["--chunk_tokens", "1.5"], "--chunk_tokens"),
    (["--val_fraction", "0"], "--val_fraction"),
    (["--val_fraction", "1"], "--val_fraction"),
    (["--val_fraction", "-0.1"], "--val_fraction"),
    (["--val_fraction", "1.5"], "--val_fraction"),
    (["--val_fraction", "nan"], "--val_fraction"),
    (["--val_fraction", "inf"], "--val_fraction"),
    (["--val_fraction", "ten"], "--val_fraction"),
    (["--vocab_size", "-1"], "--vocab_size"),
    (["--vocab_size", str(1 << 33)], "--vocab_size"),
    (["--block_size", "0"], "--block_size"),
    (["--block_size", "-3"], "--block_size"),
    (["--block_size", "1e3"], "--block_size"),
    (["--extensions", ","], "--extensions"),
])
def test_numeric_arguments_are_checked(tmp_path, corpus, args, names):
    proc = run_prepare(tmp_path, "--input", corpus, "--out_dir", tmp_path / "data", *args,
                       timeout=30)
    assert_refused(proc, names)
    assert not (tmp_path / "data").exists()


def test_empty_out_dir_is_refused(tmp_path, corpus):
    assert_refused(run_prepare(tmp_path, "--input", corpus, "--out_dir", ""), "--out_dir")
    assert os.listdir(tmp_path) == []


def test_one_token_chunks_take_linear_time(tmp_path):
    """--chunk_tokens 1 is valid; it used to copy the rest of the stream for every chunk."""
    text = tmp_path / "one.txt"
    text.write_text(("the quick brown fox jumps over the lazy dog\n" * 10_000)[:400_000])
    proc = run_prepare(tmp_path, "--input", text, "--out_dir", tmp_path / "data", "--chunk_tokens",
                       "1", "--val_fraction", "0.25", "--block_size", "8", timeout=60)
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "data/meta.json").read_text())
    assert (meta["n_train_tokens"], meta["n_val_tokens"]) == (300_001, 100_000)  # + end-of-document


def test_interrupt_leaves_no_outputs(tmp_path, corpus):
    """SIGINT in the middle of writing: exit 130, no traceback, none of the outputs in out_dir,
    only the hidden progress of the run, which the same command resumes (or, interrupted before
    the first piece was done, nothing at all). The resumed output: tests/test_prepare_scale.py."""
    data = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, str(PREPARE), "--input", *[str(corpus)] * 40,
                             "--out_dir", str(data), "--workers", "1", *SMALL],
                            env=subprocess_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (data / ".prepare-partial").exists() and proc.poll() is None \
            and time.monotonic() < deadline:
        time.sleep(0.001)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    last = stderr.strip().splitlines()[-1]
    assert "Traceback" not in stderr
    if last == "prepare.py: interrupted; nothing was written":
        assert not data.exists()
    else:
        assert last.startswith("prepare.py: interrupted after ") and "run the same command" in last
        assert os.listdir(data) == [".prepare-partial"]


def test_extensions_accept_a_leading_dot(tmp_path, corpus):
    proc = run_prepare(tmp_path, "--input", corpus, "--out_dir", tmp_path / "data",
                       "--extensions", ".txt", *SMALL)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "data/meta.json").read_text())["n_documents"] == \
        len(list(corpus.iterdir()))


# -----------------------------------------------------------------------------
# Item 16: jsonl, UTF-8, tokenizer and disk errors are one line; invalid UTF-8 is counted


@pytest.mark.parametrize("bad_line, words", [
    ('{"text": 5}', ["docs.jsonl:2", "'text' is 5, not a string"]),
    ('{"text": null}', ["docs.jsonl:2", "'text' is null, not a string"]),
    ('{"text": ["a", "b"]}', ["docs.jsonl:2", "not a string"]),
    ('{"body": "no text key"}', ["docs.jsonl:2", "without 'text'", "--jsonl_key"]),
    ('[1, 2, 3]', ["docs.jsonl:2", "got list"]),
    ('"just a string"', ["docs.jsonl:2", "got str"]),
    ('{"text": "unterminated', ["docs.jsonl:2", "not valid JSON"]),
    ("[" * 100_000, ["docs.jsonl:2", "not valid JSON"]),  # deeper than Python's recursion limit
], ids=["number", "null", "list", "no key", "array", "string", "bad json", "deep"])
def test_bad_jsonl_lines_are_named(tmp_path, bad_line, words):
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "a good first document"}\n' + bad_line + "\n"
                    '{"text": "a good last document"}\n')
    proc = run_prepare(tmp_path, "--input", docs, "--out_dir", tmp_path / "data", *SMALL)
    assert_refused(proc, *words)
    assert sorted(os.listdir(tmp_path)) == ["docs.jsonl"]  # no out_dir, no temporary files


def test_invalid_utf8_in_text_is_counted_or_refused(tmp_path, corpus):
    """Replaced bytes are counted exactly: two stray bytes plus a 3-byte sequence cut after two."""
    good = (corpus / sorted(os.listdir(corpus))[0]).read_bytes()
    bad = tmp_path / "in" / "latin.txt"
    bad.parent.mkdir()
    bad.write_bytes(b"line one\r\ncaf\xe9 \xff\nend \xe2\x82\n" + good)
    proc = run_prepare(tmp_path, "--input", bad.parent, "--out_dir", tmp_path / "data", *ONE_FILE)
    assert proc.returncode == 0, proc.stderr
    warning = [line for line in proc.stderr.splitlines() if "warning" in line and "latin" in line]
    assert len(warning) == 1, proc.stderr
    assert str(bad) in warning[0] and "4 invalid UTF-8 bytes" in warning[0]
    assert "line 2" in warning[0] and "--strict" in warning[0]
    tokens = np.concatenate([np.fromfile(tmp_path / "data" / f, dtype=np.uint32)
                             for f in ("train.bin", "val.bin")])
    text = bytes(tokens[tokens < 256].astype(np.uint8))  # every chunk, in some order
    # Three U+FFFD (one per invalid sequence); \r\n read as \n like Python's text mode does.
    assert text.count(REPLACEMENT) == 3 and b"line one\ncaf" + REPLACEMENT in text

    strict = run_prepare(tmp_path, "--input", bad, "--out_dir", tmp_path / "strict", "--strict",
                         *SMALL)
    assert_refused(strict, f"{bad}:2", "invalid UTF-8", "0xe9", "column 4")
    assert not (tmp_path / "strict").exists()


def test_invalid_utf8_and_lone_surrogates_in_jsonl(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_bytes(b'\xef\xbb\xbf{"text": "a byte-order mark first"}\n'
                     b'{"text": "bad \xff byte"}\n'
                     b'{"text": "lone \\ud800 surrogate"}\n'
                     b'{"text": "a real pair \\ud83d\\ude00 stays"}\n')
    proc = run_prepare(tmp_path, "--input", docs, "--out_dir", tmp_path / "data",
                       "--val_fraction", "0.5", "--chunk_tokens", "8", "--block_size", "4")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1 and str(docs) in warnings[0], proc.stderr
    assert "1 invalid UTF-8 bytes and 1 lone surrogates replaced" in warnings[0]
    assert "line 2" in warnings[0]
    meta = json.loads((tmp_path / "data/meta.json").read_text())
    assert meta["n_documents"] == 4

    for line, words in ((2, ["invalid UTF-8", "0xff"]), (3, ["lone surrogate", "\\ud800"])):
        only = tmp_path / f"only{line}.jsonl"
        only.write_bytes(docs.read_bytes().splitlines(keepends=True)[0]
                         + docs.read_bytes().splitlines(keepends=True)[line - 1])
        strict = run_prepare(tmp_path, "--input", only, "--out_dir", tmp_path / "strict",
                             "--strict", *SMALL)
        assert_refused(strict, f"{only}:2", *words)
        assert not (tmp_path / "strict").exists()


def test_tokenizer_file_errors(tmp_path, corpus):
    garbage = tmp_path / "garbage.json"
    garbage.write_text('{"not": "a tokenizer"}')
    cases = [(tmp_path / "missing.json", "no such file"), (tmp_path, "is a directory")]
    if _has_tokenizers():
        cases.append((garbage, "not a Hugging Face tokenizer.json"))
    for path, words in cases:
        proc = run_prepare(tmp_path, "--input", corpus, "--out_dir", tmp_path / "data",
                           "--tokenizer", path, *SMALL)
        assert_refused(proc, f"--tokenizer {path}", words)
        assert not (tmp_path / "data").exists()


def _has_tokenizers():
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        return False
    return True


def test_input_errors(tmp_path, corpus):
    assert_refused(run_prepare(tmp_path, "--input", tmp_path / "nope.txt", "--out_dir",
                               tmp_path / "data"), "--input", "nope.txt", "no such file")
    if hasattr(os, "mkfifo"):
        # A named pipe: given directly it is refused; found in a directory it is skipped (reading
        # it would wait forever for a writer).
        (tmp_path / "in").mkdir()
        shutil.copyfile(corpus / sorted(os.listdir(corpus))[0], tmp_path / "in" / "a.txt")
        os.mkfifo(tmp_path / "in" / "pipe.txt")
        assert_refused(run_prepare(tmp_path, "--input", tmp_path / "in" / "pipe.txt",
                                   "--out_dir", tmp_path / "data", timeout=30),
                       "pipe.txt", "not a regular file")
        proc = run_prepare(tmp_path, "--input", tmp_path / "in", "--out_dir", tmp_path / "data",
                           *ONE_FILE, timeout=30)
        assert proc.returncode == 0, proc.stderr
        assert json.loads((tmp_path / "data/meta.json").read_text())["n_documents"] == 1


def test_a_failed_run_leaves_the_earlier_output_as_it_was(tmp_path, corpus):
    data = tmp_path / "data"
    assert run_prepare(tmp_path, "--input", corpus, "--out_dir", data, *SMALL).returncode == 0
    before = listing(data)
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "fine"}\n' * 2000 + '{"text": null}\n')  # fails after many chunks
    assert_refused(run_prepare(tmp_path, "--input", docs, "--out_dir", data, "--chunk_tokens",
                               "1024"), "docs.jsonl:2001")
    assert listing(data) == before


def test_files_it_did_not_write_are_never_replaced(tmp_path, small_text, tokenizer_json):
    # A folder with the user's own meta.json (not one of ours), or a directory in train.bin's place
    for i, (name, make) in enumerate((("meta.json", lambda p: p.write_text('{"mine": 1}')),
                                      ("meta.json", os.mkfifo),  # must not block on reading it
                                      ("train.bin", lambda p: p.write_bytes(b"\x00" * 8)),
                                      ("val.bin", lambda p: p.mkdir()))):
        data = tmp_path / f"user-{i}"
        data.mkdir()
        make(data / name)
        before = listing(data)
        proc = run_prepare(tmp_path, "--input", small_text, "--out_dir", data, *ONE_FILE,
                           timeout=30)
        assert_refused(proc, str(data / name), "move it away")
        assert listing(data) == before
    # A tokenizer.json beside the data that is not the one given
    data = tmp_path / "data"
    assert run_prepare(tmp_path, "--input", small_text, "--out_dir", data, "--tokenizer",
                       tokenizer_json, *ONE_FILE).returncode == 0
    (data / "tokenizer.json").write_text(tokenizer_json.read_text().replace("<|endoftext|>",
                                                                            "<|the_users|>"))
    before = listing(data)
    proc = run_prepare(tmp_path, "--input", small_text, "--out_dir", data, "--tokenizer",
                       tokenizer_json, *ONE_FILE)
    assert_refused(proc, str(data / "tokenizer.json"), "differs")
    assert listing(data) == before
    # The same tokenizer again, or the copy beside the data itself, re-prepares in place.
    shutil.copyfile(tokenizer_json, data / "tokenizer.json")
    for tok in (tokenizer_json, data / "tokenizer.json"):
        proc = run_prepare(tmp_path, "--input", small_text, "--out_dir", data, "--tokenizer", tok,
                           *ONE_FILE)
        assert proc.returncode == 0, proc.stderr
        assert (data / "tokenizer.json").read_bytes() == tokenizer_json.read_bytes()


def test_outputs_replace_links_never_write_through_them(tmp_path, small_text):
    data = tmp_path / "data"
    first = run_prepare(tmp_path, "--input", small_text, "--out_dir", data, *ONE_FILE)
    assert first.returncode == 0, first.stderr
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"the user's file")
    (data / "train.bin").unlink()
    (data / "train.bin").symlink_to(outside)
    first = run_prepare(tmp_path, "--input", small_text, "--out_dir", data, *ONE_FILE)
    assert first.returncode == 0, first.stderr
    assert outside.read_bytes() == b"the user's file"
    assert not (data / "train.bin").is_symlink()


FULL_DISK_SCRIPT = r"""
mount -t tmpfs -o size=256k tmpfs "$DISK" || exit 99
"$PY" "$PREP" --input "$SMALL_IN" --out_dir "$DISK/data" $ARGS || exit 98
for f in "$DISK"/data/* "$DISK"/data/.*; do [ -f "$f" ] && sha256sum "$f"; done > "$REPORT/before"
"$PY" "$PREP" --input "$BIG_IN" --out_dir "$DISK/data" $ARGS 2> "$REPORT/stderr"
echo $? > "$REPORT/rc"
for f in "$DISK"/data/* "$DISK"/data/.*; do [ -f "$f" ] && sha256sum "$f"; done > "$REPORT/after"
"$PY" "$PREP" --input "$BIG_IN" --out_dir "$DISK/fresh" $ARGS 2> "$REPORT/stderr_fresh"
echo $? > "$REPORT/rc_fresh"
ls -A "$DISK" > "$REPORT/disk"
exit 0
"""


def test_full_disk(tmp_path, corpus):
    """A real full disk: a 256 kB tmpfs, mounted in a private user and mount namespace (no root
    needed where unprivileged namespaces are allowed)."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1) to mount a small tmpfs")
    small = tmp_path / "small.txt"
    small.write_bytes((corpus / sorted(os.listdir(corpus))[0]).read_bytes()[:5000])  # 20 kB out
    for d in ("disk", "report"):
        (tmp_path / d).mkdir()
    env = dict(subprocess_env(), DISK=str(tmp_path / "disk"), REPORT=str(tmp_path / "report"),
               PY=sys.executable, PREP=str(PREPARE), SMALL_IN=str(small), BIG_IN=str(corpus),
               ARGS=" ".join(ONE_FILE))
    proc = subprocess.run([unshare, "--user", "--map-root-user", "--mount", "sh", "-c",
                           FULL_DISK_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    if proc.returncode == 99 or (proc.returncode != 0 and "unshare" in proc.stderr):
        pytest.skip(f"cannot mount a tmpfs in a namespace here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    report = tmp_path / "report"
    for rc, stderr in (("rc", "stderr"), ("rc_fresh", "stderr_fresh")):
        result = subprocess.CompletedProcess([], int((report / rc).read_text()),
                                             stderr=(report / stderr).read_text())
        assert_refused(result, "--out_dir", "No space left on device", "nothing was written")
    # The earlier run's files are intact and nothing else is there; no trace of the fresh run.
    assert (report / "after").read_text() == (report / "before").read_text()
    assert len((report / "before").read_text().splitlines()) == 3
    assert (report / "disk").read_text().split() == ["data"]


# -----------------------------------------------------------------------------
# Item 15 (prepare.py's half), issue #16 part 5: a split too small for train.py at the model's
# block size is refused before anything is written; at the default block size it is a warning


def test_split_size_check_at_the_block_size_boundary(tmp_path):
    """train.py needs block_size + 2 tokens in each split: refuse at block_size = n - 1, not n - 2."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": "x" * 99}) + "\n" for _ in range(10)))
    # 10 documents of 100 tokens (with end-of-document ids), chunks of 100: one val chunk of 100
    args = ["--input", docs, "--val_fraction", "0.1", "--chunk_tokens", "100"]
    fits = run_prepare(tmp_path, *args, "--out_dir", tmp_path / "a", "--block_size", "98")
    assert fits.returncode == 0 and "warning" not in fits.stderr, fits.stderr
    assert json.loads((tmp_path / "a/meta.json").read_text())["n_val_tokens"] == 100
    short = run_prepare(tmp_path, *args, "--out_dir", tmp_path / "b", "--block_size", "99")
    line = assert_refused(short, str(tmp_path / "b" / "val.bin"), "100 tokens",
                          "block_size + 2 = 101", "nothing was written")
    assert "train.bin" not in line and not (tmp_path / "b").exists()
    # The default block size (2048) is a guess: both splits too small is a warning each.
    default = run_prepare(tmp_path, *args, "--out_dir", tmp_path / "c")
    assert default.returncode == 0
    assert default.stderr.count("block_size + 2 = 2050") == 2, default.stderr


def test_a_corpus_smaller_than_one_batch_is_refused(tmp_path):
    """900 train tokens hold (900 - 1) // 98 = 9 sequences of 98 + 1: one step of 10 cannot be
    read (dataset.py), so prepare.py refuses, from --global_batch_size or the config's."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": "x" * 99}) + "\n" for _ in range(10)))
    args = ["--input", docs, "--val_fraction", "0.1", "--chunk_tokens", "100", "--block_size", "98"]
    nine = run_prepare(tmp_path, *args, "--out_dir", tmp_path / "a", "--global_batch_size", "9")
    assert nine.returncode == 0, nine.stderr
    ten = run_prepare(tmp_path, *args, "--out_dir", tmp_path / "b", "--global_batch_size", "10")
    assert_refused(ten, str(tmp_path / "b" / "train.bin"), "9 sequences", "block_size + 1 = 99",
                   "the 10 that one optimizer step reads", "nothing was written")
    assert not (tmp_path / "b").exists()
    config = tmp_path / "variant.py"
    config.write_text("block_size = 98  # llama3gen\nglobal_batch_size = 10\n")
    proc = run_prepare(tmp_path, *args[:-2], "--out_dir", tmp_path / "c", "--config", config)
    assert_refused(proc, "9 sequences", "the 10 that one optimizer step reads")
    # A source of a mixture: a step draws at most ceil(share · 12) + 1 of its sequences.
    config.write_text("block_size = 98\nglobal_batch_size = 12\ndata_sources = 'web:0.7,code:0.3'\n")
    code = run_prepare(tmp_path, *args[:-2], "--out_dir", tmp_path / "mix/code", "--config", config)
    assert code.returncode == 0, code.stderr  # 9 >= ceil(3.6) + 1
    web = run_prepare(tmp_path, *args[:-2], "--out_dir", tmp_path / "mix/web", "--config", config)
    assert_refused(web, "9 sequences", "fewer than the 10 that one optimizer step may draw from "
                   "this source (its share 0.7 of global_batch_size 12")  # ceil(8.4) + 1


def test_meta_json_fingerprints_the_files_it_describes(tmp_path, small_text, tokenizer_json):
    """Sizes and sha256 in meta.json are those of the files as they lie on disk (an independent
    hash of the finished files), the tokenizer's included."""
    data = tmp_path / "data"
    proc = run_prepare(tmp_path, "--input", small_text, "--out_dir", data, "--tokenizer",
                       tokenizer_json, *ONE_FILE)
    assert proc.returncode == 0, proc.stderr
    fingerprint = json.loads((data / "meta.json").read_text())["fingerprint"]
    assert sorted(fingerprint) == ["tokenizer.json", "train.bin", "val.bin"]
    for name, record in fingerprint.items():
        content = (data / name).read_bytes()
        assert record == {"bytes": len(content), "sha256": hashlib.sha256(content).hexdigest()}


def test_block_size_from_a_config(tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": "x" * 99}) + "\n" for _ in range(10)))
    config = tmp_path / "variant.py"
    config.write_text("n_layer = 2  # llama3gen\nblock_size = 99\nvocab_size = 300\n")
    args = ["--input", docs, "--val_fraction", "0.1", "--chunk_tokens", "100"]
    assert_refused(run_prepare(tmp_path, *args, "--out_dir", tmp_path / "a", "--config", config),
                   "block_size + 2 = 101")
    config.write_text("n_layer = 2  # llama3gen\nblock_size = 98\nvocab_size = 300\n")
    proc = run_prepare(tmp_path, *args, "--out_dir", tmp_path / "a", "--config", config)
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr
    assert json.loads((tmp_path / "a/meta.json").read_text())["vocab_size"] == 300
    # --block_size given beside the config wins.
    config.write_text("n_layer = 2  # llama3gen\nblock_size = 99\nvocab_size = 300\n")
    proc = run_prepare(tmp_path, *args, "--out_dir", tmp_path / "b", "--config", config,
                       "--block_size", "50")
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr
    # The config is read, never run; a config without a literal block_size is refused.
    for text, words in (("block_size = 'long'\n", "not a positive integer"),
                        ("block_size = -1\n", "not a positive integer"),
                        ("import os\nos.mkdir('ran')\n", "no `block_size = <integer>`"),
                        ("block_size = 2 * 64\n", "block_size is computed"),
                        ("block_size = 1" + "+1" * 100_000 + "\n", "not a config file"),
                        ("block_size = = 3\n", "not a config file")):
        config.write_text(text)
        assert_refused(run_prepare(tmp_path, *args, "--out_dir", tmp_path / "c",
                                   "--config", config), f"--config {config}", words)
        assert not (tmp_path / "ran").exists() and not (tmp_path / "c").exists()
    assert_refused(run_prepare(tmp_path, *args, "--out_dir", tmp_path / "c", "--config",
                               tmp_path / "missing.py"), "missing.py", "no such file")
