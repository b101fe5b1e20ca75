"""Tokenize text into the flat token files train.py reads.

    python data/prepare.py --input corpus/ more.jsonl --out_dir data/mydata \\
        --tokenizer path/to/tokenizer.json --config config/optimal.py --val_fraction 0.005
    python data/prepare.py --input corpus/ --out_dir data/bytes      # raw bytes, no tokenizer
    python data/prepare.py ... --workers 16        # processes that tokenize (default: all cores)
    python data/prepare.py ... --shard 0/8   (.. 7/8), then ... --merge 8   # over several nodes

Writes <out_dir>/train.bin and <out_dir>/val.bin (flat little-endian uint32 token ids, one
document after another, each followed by an end-of-document id) and <out_dir>/meta.json
(vocab_size, tokenizer, n_train_tokens, n_val_tokens, dtype, eos_token_id, bos_token_id,
max_token_id, val_fraction, chunk_tokens, n_documents, fingerprint).

Inputs are files or directories (searched recursively, in sorted order, for the --extensions).
A .jsonl file holds one document per line, its text under --jsonl_key; any other file is one
document of UTF-8 text.

At corpus scale: files are cut into segments at every multiple of 1 MiB (a segment holds the
lines that begin in it; a text file is tokenized a segment at a time), segments are grouped into
tasks, and --workers processes (default: one per CPU core this process may use) tokenize the
tasks while this one writes their tokens in input order. The output depends on the input alone,
byte for byte the same for any number of workers. At most two tasks per worker are in flight,
so memory stays flat whatever the corpus size. Progress (documents, tokens, tokens/s, ETA) is a
line redrawn on a terminal, else a plain line every --progress_seconds (a log). The progress is
saved every --save_seconds and on Ctrl-C or SIGTERM (a second one stops at once) in
<out_dir>/.prepare-partial/; running the same command again resumes from there (with any number
of workers), and says plainly why when it cannot (other settings or input files) and starts over.

Corpora larger than a node: `--shard I/N` tokenizes only shard I (from 0) of N, a contiguous run
of whole files of the sorted input list, balanced by bytes (a file belongs to the shard its
middle byte falls in; a file is never split, so split one huge file yourself), into
<out_dir>/shard-I-of-N/tokens.bin (the shard's token stream, not yet split) and shard.json (its
settings, counts and sha256). Every shard lists and sizes all the inputs, so the chunk size and
the settings are the corpus's. Then `--merge N`, with the same arguments, checks every shard
(refusing one that is missing, unfinished, made with other settings or inputs, or changed since,
before anything is written), joins their streams in shard order and splits the whole stream as
one run does: chunk k of the corpus's stream goes to val.bin by the rule below, so the out_dir is
byte for byte what one run without --shard writes. The shards are removed after the merge (it
needs their size again in free space while it writes). scripts/prepare.sbatch runs the shards as
a SLURM job array and the merge as a job that starts when all of them succeeded.

Invalid UTF-8 bytes (and, in jsonl, lone surrogate escapes such as "\\ud800") are replaced by
U+FFFD with a warning that names the file and counts them; --strict refuses them instead.

Tokenizers:
- a local tokenizer.json (Hugging Face `tokenizers`); it is copied beside the data so that
  export_hf.py can ship it with the model. The end-of-document id is --eod_token, or the first of
  the usual names (<|end_of_text|>, <|endoftext|>, </s>, <eos>) the tokenizer knows.
- `bytes`: every UTF-8 byte is its own id (0-255) and the end-of-document id is 256, so the
  vocabulary has 257 entries.
Any id >= --vocab_size (the model's vocabulary, default the tokenizer's) is refused with an error.

Train/validation split: the token stream is cut into chunks of --chunk_tokens tokens and chunk k
goes to val.bin when floor((k + 1) · val_fraction) > floor(k · val_fraction), i.e. one chunk in
every 1/val_fraction. The split is deterministic, needs no second pass over the data, and works
for one huge document as well as for many small ones. By default the chunk size follows from the
input's size in bytes (known before reading): about 20 val chunks, between 1,024 and 65,536
tokens each, so small corpora get a val split too.

train.py needs at least block_size + 2 tokens in each split, and at least global_batch_size
training sequences of block_size + 1 tokens: a split that falls short is refused before anything
is written. block_size, vocab_size and global_batch_size come from --config config/<variant>.py
when given (read, not run), or --block_size and --global_batch_size; without either, block_size
is taken as 2048 (the spec's default seq_len) and a shortfall is only a warning.

meta.json's "fingerprint" holds the size and sha256 of train.bin, val.bin (and tokenizer.json),
hashed as they are written: train.py refuses to resume a run onto other data, and
`train.py --dry_run` re-hashes the files against it.

Nothing is half-written: the outputs are written in <out_dir>/.prepare-partial/ and renamed into
place only when all are complete, so a failed run leaves the out_dir as it was, and an
interrupted one adds only that hidden directory (its progress). Files in out_dir that an earlier
run of this script did not write are never replaced.
"""

import argparse
import ast
import codecs
import collections
import concurrent.futures
import concurrent.futures.process
import contextlib
import fcntl
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import re
import signal
import sys
import threading
import time
from fractions import Fraction

import numpy as np

DEFAULT_EOD_NAMES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>")
SEGMENT_BYTES = 1 << 20  # files are cut at every multiple of this (a text file's pieces)
MIN_TASK_BYTES = 1 << 16  # a worker's task: one segment, or several small files up to ...
# ... the input's share of one of this many tasks per worker (task_bytes_for): when the last
# task ends, the other workers idle for about half a task; 32 keeps that near 1% of the run
# (8 per worker measured 3.5% slower with 2 workers: bench/README.md)
TASKS_PER_WORKER = 32
HASH_BLOCK_BYTES = 8 << 20  # re-hashing an interrupted run's output reads this much at a time
PROGRESS_SECONDS = 5  # a progress line this often in a log (a terminal's line is redrawn)
SAVE_SECONDS = 30  # the progress of a run is saved this often (what an interrupted run resumes)
PROGRESS_FORMAT = 1  # progress.json's layout; another one is not resumed
MIN_CHUNK_TOKENS, MAX_CHUNK_TOKENS = 1 << 10, 1 << 16  # range of the automatic chunk size
CHUNK_TOKENS_LIMIT = 1 << 28  # a chunk is held in memory before it is written (4 bytes a token)
VAL_CHUNKS_WANTED = 20
DEFAULT_BLOCK_SIZE = 2048  # the spec's default seq_len
OUTPUTS = ("train.bin", "val.bin", "meta.json")  # tokenizer.json too, for a tokenizer.json
SHARD_OUTPUTS = ("tokens.bin", "shard.json")  # in out_dir/shard-<I>-of-<N>/ (--shard I/N)
MAX_SHARDS = 4096
SURROGATES = re.compile("[\ud800-\udfff]")  # valid in JSON ("\ud800"), not encodable as UTF-8


def auto_chunk_tokens(total_bytes, val_fraction):
    """A chunk size giving about VAL_CHUNKS_WANTED val chunks. Tokens are estimated as bytes / 4
    (a BPE tokenizer on English); raw bytes give 4× more tokens, hence more, smaller-share chunks."""
    estimate = total_bytes / 4 * val_fraction / VAL_CHUNKS_WANTED
    return int(min(MAX_CHUNK_TOKENS, max(MIN_CHUNK_TOKENS, estimate)))


class PrepareError(ValueError):
    pass


def warn(message):
    print(f"prepare.py: warning: {message}", file=sys.stderr)


# -----------------------------------------------------------------------------
# Arguments


def check_numbers(vocab_size, val_fraction, chunk_tokens, block_size, global_batch_size=0,
                  workers=0):
    """Range checks: a bad value must fail here, not loop forever or write nonsense later."""
    if not 0.0 < val_fraction < 1.0:  # also refuses nan and inf
        raise PrepareError(f"--val_fraction must be a number strictly between 0 and 1 "
                           f"(e.g. 0.01), got {val_fraction}")
    if not 0 <= chunk_tokens <= CHUNK_TOKENS_LIMIT:
        raise PrepareError(f"--chunk_tokens must be 0 (chosen from the input size) or a number of "
                           f"tokens from 1 to {CHUNK_TOKENS_LIMIT}, got {chunk_tokens}")
    if not 0 <= vocab_size <= 1 << 32:  # ids are stored as uint32
        raise PrepareError(f"--vocab_size must be 0 (the tokenizer's) or a vocabulary size from "
                           f"1 to {1 << 32}, got {vocab_size}")
    if block_size is not None and block_size < 1:
        raise PrepareError(f"--block_size must be a positive number of tokens (the model's "
                           f"block_size), got {block_size}")
    if global_batch_size < 0:
        raise PrepareError(f"--global_batch_size must be 0 (unknown) or the sequences per "
                           f"optimizer step, got {global_batch_size}")
    if not 0 <= workers <= 4096:
        raise PrepareError(f"--workers must be 0 (one per CPU core) or a number of processes "
                           f"from 1 to 4096, got {workers}")


NOT_A_LITERAL = object()
CONFIG_KEYS = ("block_size", "vocab_size", "global_batch_size")  # what prepare.py checks against


def read_config(path):
    """block_size, vocab_size and global_batch_size assigned in a config/<variant>.py, read as
    literals, never run."""
    if not os.path.isfile(path):
        raise PrepareError(f"--config {path}: no such file; give one of the repo's "
                           f"config/<variant>.py, or --block_size N instead")
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), path)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:  # the last two: nesting
        raise PrepareError(f"--config {path}: not a config file "
                           f"({str(e) or type(e).__name__})") from None
    values = {}
    for node in tree.body:  # plain `key = literal` lines, as llama3gen writes them
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id in CONFIG_KEYS:
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except (ValueError, RecursionError):
                values[node.targets[0].id] = NOT_A_LITERAL  # refused below
    for key in CONFIG_KEYS:
        value = values.get(key)
        if key in values and (type(value) is not int or value < 1):
            shown = "computed" if value is NOT_A_LITERAL else f"{value!r:.40}"
            raise PrepareError(f"--config {path}: {key} is {shown}, not a positive integer; "
                               f"write it as `{key} = <integer>`, or give --{key}")
    if "block_size" not in values:
        raise PrepareError(f"--config {path}: no `block_size = <integer>` line; give "
                           f"--block_size N instead")
    for node in tree.body:  # a mixture's sources (train.py's data_sources), when a literal
        if isinstance(node, ast.Assign) and len(node.targets) == 1 \
                and isinstance(node.targets[0], ast.Name) and node.targets[0].id == "data_sources" \
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            values["data_sources"] = node.value.value
    return values


def source_share(data_sources, out_dir):
    """The weight share of the mixture source that out_dir is (data_dir/<name>, train.py's
    data_sources 'name:weight,...'), or None when out_dir is not one of its sources."""
    weights = {}
    for item in data_sources.split(","):
        name, _, weight = item.strip().partition(":")
        try:
            weights[name] = Fraction(weight.strip()).limit_denominator(10 ** 6)
        except (ValueError, ZeroDivisionError):
            return None  # train.py refuses it, with its own message
    name = os.path.basename(os.path.normpath(out_dir))
    total = sum(weights.values())
    return weights[name] / total if name in weights and total > 0 else None


# -----------------------------------------------------------------------------
# Tokenizers: encode(list of str) -> list of lists of ids


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, end of document 256."""
    name = "bytes"
    path = data = None
    vocab_size = 257
    eod_id = 256
    bos_id = None

    def encode_batch(self, texts):
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.uint32) for t in texts]


class HFTokenizer:
    """A Hugging Face tokenizer.json, loaded with the `tokenizers` library."""

    def __init__(self, path, eod_token):
        if not os.path.isfile(path):
            what = "is a directory" if os.path.isdir(path) else "no such file"
            raise PrepareError(f"--tokenizer {path}: {what}; give the path of a Hugging Face "
                               f"tokenizer.json, or 'bytes' for raw bytes")
        try:
            from tokenizers import Tokenizer  # only needed for this tokenizer
        except ImportError:
            raise PrepareError(f"--tokenizer {path} needs the `tokenizers` package: "
                               f"pip install tokenizers") from None
        self.path = path
        self.name = "tokenizer.json"
        with open(path, "rb") as f:
            self.data = f.read()  # loaded and copied beside the data from the same bytes
        try:
            self.tokenizer = Tokenizer.from_buffer(self.data)
        except Exception as e:  # the library raises plain Exception for any unreadable file
            raise PrepareError(f"--tokenizer {path}: not a Hugging Face tokenizer.json "
                               f"({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                               ) from None
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        names = [eod_token] if eod_token else DEFAULT_EOD_NAMES
        ids = [self.tokenizer.token_to_id(n) for n in names]
        found = [(n, i) for n, i in zip(names, ids) if i is not None]
        if eod_token == "none":
            self.eod_id = None
        elif not found:
            raise PrepareError(
                f"{path}: no end-of-document token among {', '.join(names)}; name one with "
                f"--eod_token, or pass --eod_token none to join documents without a separator")
        else:
            self.eod_id = found[0][1]
        bos = [self.tokenizer.token_to_id(n) for n in ("<|begin_of_text|>", "<s>", "<bos>")]
        self.bos_id = next((i for i in bos if i is not None), None)

    def encode_batch(self, texts):
        # add_special_tokens=False: documents are separated by eod ids only, as in pre-training.
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.uint32) for e in encodings]


# -----------------------------------------------------------------------------
# Reading documents: input files cut into segments, segments grouped into tasks


def list_input_files(inputs, extensions):
    """Files named directly, plus regular files under named directories with one of `extensions`."""
    files = []
    for path in inputs:
        if os.path.isdir(path):
            found = []
            for root, dirs, names in os.walk(path):
                dirs.sort()
                found += [os.path.join(root, n) for n in names
                          if n.rsplit(".", 1)[-1] in extensions
                          and os.path.isfile(os.path.join(root, n))]  # no pipes or devices
            files += sorted(found)
        elif os.path.isfile(path):
            files.append(path)
        elif os.path.exists(path):
            raise PrepareError(f"--input {path}: not a regular file or a directory")
        else:
            raise PrepareError(f"--input {path}: no such file or directory")
    if not files:
        raise PrepareError(f"no input files in {', '.join(inputs)} "
                           f"(directories are searched for: {', '.join(sorted(extensions))})")
    return files


def segments_of(sizes):
    """The input in order as segments (file index, start, end, is the file's last segment): a
    file is cut at every multiple of SEGMENT_BYTES and a segment holds the lines that begin in
    it, so where a text file's pieces end depends on the file alone, never on the workers."""
    for index, size in enumerate(sizes):
        starts = range(0, size, SEGMENT_BYTES) if size else [0]
        for start in starts:
            yield index, start, min(start + SEGMENT_BYTES, size), start == starts[-1]


def tasks_of(segments, task_bytes):
    """Consecutive segments grouped into tasks of about task_bytes (small files share one)."""
    task, size = [], 0
    for segment in segments:
        if task and size + segment[2] - segment[1] > task_bytes:
            yield tuple(task)
            task, size = [], 0
        task.append(segment)
        size += segment[2] - segment[1]
    if task:
        yield tuple(task)


def task_bytes_for(total_bytes, workers):
    """Tasks small enough that every worker gets several (load balance), large enough that the
    cost of sending one (about a millisecond) stays small: MIN_TASK_BYTES to SEGMENT_BYTES."""
    return int(min(SEGMENT_BYTES, max(MIN_TASK_BYTES, total_bytes / (TASKS_PER_WORKER * workers))))


def segment_lines(f, start, end):
    """The lines (bytes, newline included) that begin in [start, end) of the binary file f."""
    if start:  # skip the rest of a line that began before `start`, in blocks (it may be huge)
        f.seek(start - 1)
        while True:
            block = f.read(1 << 16)
            newline = block.find(b"\n")
            if newline >= 0:
                f.seek(f.tell() - len(block) + newline + 1)
                break
            if not block or f.tell() >= end:
                return
    position = f.tell()
    while position < end:
        line = f.readline()
        if not line:
            return
        position += len(line)
        yield line


class LineError(Exception):
    """A refusal at a line of an input file, the line counted within one task; the main process,
    which knows the lines of the file's earlier tasks, turns it into a PrepareError."""

    def __init__(self, index, line, detail):  # index: of the file among the input files
        super().__init__(index, line, detail)  # as args: an exception must pickle to cross


class Replaced:
    """Bytes replaced by U+FFFD so far, counted by the 'prepare.replace' decode error handler."""
    count = 0


def _replace_and_count(error):
    Replaced.count += error.end - error.start
    return "\ufffd", error.end


codecs.register_error("prepare.replace", _replace_and_count)


class Decoder:
    """UTF-8 lines of one file: invalid bytes become U+FFFD (counted for a warning), or with
    strict=True an error naming the file, line and column."""

    def __init__(self, path, strict, index=0):
        self.path, self.strict, self.index = path, strict, index  # index: among the input files
        self.replaced = {"invalid UTF-8 bytes": 0, "lone surrogates": 0}
        self.first_line = None
        self.lines = 0  # read so far

    def decode(self, raw, line_no):
        if self.strict:
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise LineError(
                    self.index, line_no,
                    f"invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                    f"re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8), or drop "
                    f"--strict to replace invalid bytes with U+FFFD") from None
        before = Replaced.count
        text = raw.decode("utf-8", errors="prepare.replace")
        self.count("invalid UTF-8 bytes", Replaced.count - before, line_no)
        return text

    def fix_surrogates(self, text, line_no):
        """A jsonl string may hold lone surrogates ("\\ud800"), which no tokenizer can encode."""
        if self.strict:
            match = SURROGATES.search(text)
            if match:
                raise LineError(
                    self.index, line_no,
                    f"the text holds a lone surrogate \\u{ord(match.group()):04x} (not a "
                    f"character; UTF-8 cannot encode it); fix the line, or drop --strict to "
                    f"replace it with U+FFFD")
            return text
        text, n = SURROGATES.subn("\ufffd", text)
        self.count("lone surrogates", n, line_no)
        return text

    def count(self, what, n, line_no):
        if n and self.first_line is None:
            self.first_line = line_no
        self.replaced[what] += n


def segment_documents(path, start, end, last, jsonl_key, decoder, first_line):
    """Yield (text, ends a document) for one segment; lines are numbered from first_line.
    A .jsonl line is a document; any other file is one document, a piece per segment."""
    is_jsonl = path.endswith(".jsonl")
    piece = []
    try:
        with open(path, "rb") as f:  # bytes: lines are decoded one by one, to name a bad one
            for line_no, raw in enumerate(segment_lines(f, start, end), first_line):
                decoder.lines += 1
                if is_jsonl:
                    if raw.strip():
                        yield jsonl_text(decoder, raw, line_no, jsonl_key, start == 0), True
                    continue
                line = decoder.decode(raw, line_no)
                if "\r" in line:  # universal newlines, as Python's text mode reads them
                    line = line.replace("\r\n", "\n").replace("\r", "\n")
                piece.append(line)
    except OSError as e:  # only reading happens in here (the consumer's errors stay outside)
        raise PrepareError(f"{path}: cannot read: {e.strerror or e}") from None
    if not is_jsonl:
        yield "".join(piece), last


def jsonl_text(decoder, raw, line_no, key, first_segment):
    """The text of one jsonl line: a JSON object whose `key` is a string."""
    index = decoder.index
    line = decoder.decode(raw, line_no)
    if line_no == 1 and first_segment:
        line = line.lstrip("\ufeff")  # a byte-order mark some editors write
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        raise LineError(index, line_no, f"not valid JSON ({e}); each line must be a JSON object "
                                       f"such as {{{json.dumps(key)}: \"...\"}}") from None
    if not isinstance(obj, dict) or key not in obj:
        what = f"an object without {key!r}" if isinstance(obj, dict) else type(obj).__name__
        raise LineError(index, line_no, f"expected a JSON object with a {key!r} string, got "
                                       f"{what}; fix the line, or name the text field with "
                                       f"--jsonl_key")
    text = obj[key]
    if not isinstance(text, str):
        shown = json.dumps(text)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise LineError(index, line_no, f"{key!r} is {shown}, not a string; every line needs its "
                                       f"text as a JSON string")
    return decoder.fix_surrogates(text, line_no)


# -----------------------------------------------------------------------------
# Tokenizing a task, in a worker process (or in this one for --workers 1)

_worker = {}  # set once per worker process by start_worker (a pool initializer takes no return)


def start_worker(tok, vocab_size, files, jsonl_key, strict, in_pool):
    """Set up a worker process: one thread each, the workers are the parallelism."""
    if in_pool:  # Ctrl-C and SIGTERM are the main process's to handle (it saves the progress)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        threading.Thread(target=exit_with_parent, args=(os.getppid(),), daemon=True).start()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # `tokenizers` would start a thread per core
    _worker.update(tok=tok, vocab_size=vocab_size, files=files, jsonl_key=jsonl_key,
                   strict=strict)


def exit_with_parent(parent):
    """A worker whose main process was killed (SIGKILL, the OOM killer) would wait for work
    forever: leave when the parent is gone (the worker is then re-parented)."""
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def tokenize_task(task):
    """One task's token ids (end-of-document ids included) and, per segment, what the main
    process merges: (file index, lines, documents, replaced counts, first replaced line, last)."""
    tok, files, vocab_size = _worker["tok"], _worker["files"], _worker["vocab_size"]
    texts, owners, ends, segments = [], [], [], []
    lines_in_task = {}  # a file's lines in this task so far: its later segments count on
    for index, start, end, last in task:
        path = files[index]
        decoder = Decoder(path, _worker["strict"], index)
        first_line = lines_in_task.get(index, 0) + 1
        documents = 0
        for text, ends_document in segment_documents(path, start, end, last,
                                                     _worker["jsonl_key"], decoder, first_line):
            texts.append(text)
            owners.append(index)
            ends.append(ends_document)
            documents += ends_document
        lines_in_task[index] = first_line - 1 + decoder.lines
        first_replaced = decoder.first_line and decoder.first_line - first_line + 1  # in segment
        segments.append((index, decoder.lines, documents, decoder.replaced, first_replaced, last))
    ids = []
    eod = np.array([tok.eod_id if tok.eod_id is not None else 0], dtype=np.uint32)
    for encoded, owner, ends_document in zip(tok.encode_batch(texts), owners, ends):
        if ends_document and tok.eod_id is not None:
            encoded = np.concatenate([encoded, eod])
        if len(encoded) and int(encoded.max()) >= vocab_size:
            raise PrepareError(
                f"{files[owner]}: token id {int(encoded.max())} >= vocab_size {vocab_size}; the "
                f"tokenizer ({tok.name}, {tok.vocab_size} ids) does not fit the model's "
                f"vocabulary: use a smaller tokenizer or a larger vocab_size")
        ids.append(encoded)
    return (np.concatenate(ids) if ids else np.zeros(0, dtype=np.uint32)), segments


# -----------------------------------------------------------------------------
# Running the tasks: in order, at most a few in flight (memory stays flat)


def ordered_results(tasks, workers, worker_args):
    """(task, tokenize_task(task)) for `tasks`, in task order, from `workers` processes (in this
    one for 1). At most 2 tasks per worker are queued or done-but-unread, so memory holds a few
    tasks' text and tokens whatever the corpus size."""
    if workers == 1:
        start_worker(*worker_args, in_pool=False)
        for task in tasks:
            yield task, tokenize_task(task)
        return
    # fork: the workers start at once and need no re-import of this script
    context = multiprocessing.get_context(
        "fork" if "fork" in multiprocessing.get_all_start_methods() else None)
    pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=context,
                                                  initializer=start_worker,
                                                  initargs=(*worker_args, True))
    in_flight, finished = collections.deque(), False
    try:
        for task in tasks:
            in_flight.append((task, pool.submit(tokenize_task, task)))
            if len(in_flight) >= 2 * workers:
                task, future = in_flight.popleft()
                yield task, future.result()
        while in_flight:
            task, future = in_flight.popleft()
            yield task, future.result()
        finished = True
    finally:  # after an error or an interrupt, drop the queued tasks (the running ones finish)
        pool.shutdown(wait=True, cancel_futures=not finished)


# -----------------------------------------------------------------------------
# Writing the outputs: a partial run in out_dir/.prepare-partial, renamed into place at the end


class Partial:
    """<out_dir>/.prepare-partial/: train.bin and val.bin as far as they are written,
    progress.json (how far, with which settings) and pending-<task>.bin (the tokens of the chunk
    being filled). An interrupted run leaves it, and the same command resumes from it.
    flock()ed while a run uses it. commit() renames the outputs into out_dir, meta.json last,
    and removes it; abort() removes it."""

    NAME = ".prepare-partial"
    OURS = re.compile(r"(train\.bin|val\.bin|progress\.json|pending-\d+\.bin|meta\.json|"
                      r"tokenizer\.json|tokens\.bin|shard\.json)(\.tmp)?")

    def __init__(self, out_dir):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, self.NAME)
        self.fd = None

    def open(self):
        """Create or reuse the directory and lock it; return the saved progress (or None)."""
        if os.path.islink(self.path) or (os.path.lexists(self.path)
                                         and not os.path.isdir(self.path)):
            raise PrepareError(f"{self.path}: not a directory; move it away (data/prepare.py "
                               f"keeps an interrupted run's progress there)")
        os.makedirs(self.path, exist_ok=True)
        foreign = [n for n in os.listdir(self.path) if not self.OURS.fullmatch(n)]
        if foreign:
            raise PrepareError(f"{self.path}: holds {foreign[0]}, which data/prepare.py did not "
                               f"write; move it away")
        self.fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise PrepareError(f"another data/prepare.py is writing into {self.out_dir}; wait "
                               f"for it, or choose another --out_dir") from None
        try:
            with open(os.path.join(self.path, "progress.json")) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def file(self, name):
        return os.path.join(self.path, name)

    def clear(self):
        """Remove what an earlier run left (a restart)."""
        for name in os.listdir(self.path):
            os.remove(self.file(name))

    def write_atomic(self, name, data):
        """Write a file of the partial run whole or not at all (fsync, then rename)."""
        with open(self.file(name + ".tmp"), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(self.file(name + ".tmp"), self.file(name))

    def commit(self, extra, names=("train.bin", "val.bin")):
        """Rename `names` (written already) and `extra` ({name: bytes}, meta.json last) into
        out_dir."""
        for name, data in extra.items():
            self.write_atomic(name, data)
        # The renames take microseconds; a signal in between must not leave half of them done.
        blocked = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            for name in (*names, *extra):
                os.replace(self.file(name), os.path.join(self.out_dir, name))
            self.abort()
        finally:
            try:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
            except KeyboardInterrupt:
                pass  # Ctrl-C during the renames: they are done, so the run is complete

    def abort(self):
        """Remove the partial run and its directory, if this process holds it (not another's)."""
        if self.fd is not None and os.path.isdir(self.path):
            self.clear()
            os.rmdir(self.path)
        self.close()

    def close(self):
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None


class SplitWriter:
    """Cut a token stream into chunks and send each to train.bin or val.bin (in the partial
    run's directory), hashing what it writes. save() and resume() carry its state across an
    interrupted run."""

    SPLITS = ("train", "val")

    def __init__(self, partial, val_fraction, chunk_tokens):
        self.partial = partial
        self.val_fraction = val_fraction
        self.chunk_tokens = chunk_tokens
        self.files = {}
        self.counts = {s: 0 for s in self.SPLITS}
        self.hashes = {s: hashlib.sha256() for s in self.SPLITS}  # streamed, for meta.json
        self.pending = []  # arrays not yet written
        self.n_pending = 0
        self.chunk_index = 0

    def start(self, saved=None):
        """Open the split files: new ones, or (saved: a state from save()) the interrupted run's,
        cut back to where that state was saved and re-hashed up to there."""
        for split in self.SPLITS:
            path = self.partial.file(f"{split}.bin")
            flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
            self.files[split] = os.fdopen(os.open(path, flags, 0o666), "r+b")
            size = 4 * saved["counts"][split] if saved else 0
            self.files[split].truncate(size)
            while block := self.files[split].read(HASH_BLOCK_BYTES):
                self.hashes[split].update(block)
            self.files[split].seek(size)
        if saved:
            self.counts = dict(saved["counts"])
            self.chunk_index = saved["chunk_index"]
            pending = np.fromfile(self.partial.file(saved["pending_file"]), dtype="<u4")
            self.pending, self.n_pending = [pending], len(pending)

    def _split_of_chunk(self, k):
        f = self.val_fraction
        return "val" if math.floor((k + 1) * f) > math.floor(k * f) else "train"

    def add(self, ids):
        self.pending.append(ids)
        self.n_pending += len(ids)
        if self.n_pending < self.chunk_tokens:
            return
        # One concatenation, then views: time stays linear even for --chunk_tokens 1.
        stream = np.concatenate(self.pending)
        whole = len(stream) - len(stream) % self.chunk_tokens
        for start in range(0, whole, self.chunk_tokens):
            self._write_chunk(stream[start:start + self.chunk_tokens])
        rest = stream[whole:]
        self.pending, self.n_pending = [rest], len(rest)

    def _write_chunk(self, chunk):
        split = self._split_of_chunk(self.chunk_index)
        data = chunk.astype("<u4").tobytes()
        self.files[split].write(data)
        self.hashes[split].update(data)
        self.counts[split] += len(chunk)
        self.chunk_index += 1

    def save(self, segments_done):
        """Make everything written so far durable and return the state that resumes it."""
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())  # the data first: the state saved after it may rely on it
        pending_file = f"pending-{segments_done}.bin"
        pending = np.concatenate(self.pending) if self.pending else np.zeros(0, np.uint32)
        self.partial.write_atomic(pending_file, pending.astype("<u4").tobytes())
        return {"counts": dict(self.counts), "chunk_index": self.chunk_index,
                "pending_file": pending_file}

    def finish(self):
        if self.n_pending:
            self._write_chunk(np.concatenate(self.pending))
            self.pending, self.n_pending = [], 0
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())  # a full disk must fail here, before anything is renamed
            f.close()
        self.check_counts()

    @property
    def file_names(self):
        return tuple(f"{s}.bin" for s in self.SPLITS)

    def check_counts(self):
        for split in self.SPLITS:
            if self.counts[split] == 0:
                raise PrepareError(
                    f"the {split} split is empty ({self.chunk_index} chunks of {self.chunk_tokens} "
                    f"tokens): give more data, or lower --chunk_tokens or raise --val_fraction")

    def close(self):
        for f in self.files.values():
            try:
                f.close()  # may fail again (a full disk) while flushing
            except OSError:
                pass

    def fingerprint(self):
        """{file: {bytes, sha256}}: what train.py compares on resume (meta.json "fingerprint")."""
        return {f"{s}.bin": {"bytes": 4 * self.counts[s], "sha256": self.hashes[s].hexdigest()}
                for s in self.SPLITS}


class ShardWriter(SplitWriter):
    """A shard's token stream, whole, in tokens.bin (--shard): which chunks go to val.bin depends
    on where the shard begins in the corpus's stream, so the split is the merge's."""

    SPLITS = ("tokens",)

    def _split_of_chunk(self, k):
        return "tokens"

    def check_counts(self):
        pass  # a shard may be empty (more shards than files); the merge checks the splits


def check_out_dir(out_dir, tok):
    """Refuse an out_dir where an output would replace a file this script did not write: only
    the files of an earlier run (a meta.json of ours beside them) may be replaced."""
    check_replaceable(out_dir, OUTPUTS, {"n_train_tokens", "dtype"})
    target = os.path.join(out_dir, "tokenizer.json")
    if tok.path and os.path.lexists(target) and not is_tokenizer_copy(tok, target):
        raise PrepareError(f"{target}: exists and differs from --tokenizer {tok.path}; "
                           f"move it away or choose another --out_dir")


def check_replaceable(directory, outputs, record_keys):
    """Refuse a directory where one of `outputs` would replace a file that an earlier run did not
    write: its record (the last of outputs: meta.json, shard.json) must be ours (record_keys)."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise PrepareError(f"{directory}: exists and is not a directory; move it away or choose "
                           f"another --out_dir")
    record = outputs[-1]
    ours = False
    if os.path.isfile(os.path.join(directory, record)):  # not a pipe, which would block
        try:
            with open(os.path.join(directory, record)) as f:
                meta = json.load(f)
            ours = isinstance(meta, dict) and record_keys <= set(meta)
        except (OSError, ValueError, RecursionError):
            pass
    for name in outputs:
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            raise PrepareError(f"{path}: is a directory, where data/prepare.py writes a file; "
                               f"move it away or choose another --out_dir")
        if os.path.lexists(path) and not ours:
            raise PrepareError(f"{path}: exists and was not written by data/prepare.py (no "
                               f"{record} of an earlier run beside it); move it away or choose "
                               f"another --out_dir")


def is_tokenizer_copy(tok, target):
    """Is out_dir/tokenizer.json the --tokenizer file itself, or a copy of it?"""
    if not os.path.isfile(target):
        return False
    if os.path.samefile(tok.path, target):
        return True
    with open(target, "rb") as f:
        return f.read() == tok.data


# -----------------------------------------------------------------------------
# Progress, interrupts and resuming


class Progress:
    """Documents, tokens, tokens/s and ETA: one line redrawn in place on a terminal, else a plain
    line every `every_s` seconds (a log). Rates count this run only (a resumed run's
    earlier part took no time here)."""

    def __init__(self, total_bytes, done_bytes, done_tokens, every_s, stream=None):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.every_s = min(every_s, 0.5) if self.tty else every_s
        self.total, self.first_done, self.tokens_at_start = total_bytes, done_bytes, done_tokens
        self.start = self.last = time.monotonic()

    def update(self, done_bytes, documents, tokens, final=False):
        now = time.monotonic()
        if not final and now - self.last < self.every_s:
            return
        self.last = now
        elapsed = max(now - self.start, 1e-9)
        rate = (tokens - self.tokens_at_start) / elapsed
        bytes_rate = (done_bytes - self.first_done) / elapsed
        eta = (self.total - done_bytes) / bytes_rate if bytes_rate > 0 else float("inf")
        line = (f"prepare: {documents:,} documents, {tokens:,} tokens, {rate / 1e6:.3g}M tokens/s, "
                f"{done_bytes / 1e6:,.1f} of {self.total / 1e6:,.1f} MB "
                f"({100 * done_bytes / max(self.total, 1):.0f}%), ETA {format_eta(eta)}")
        if self.tty:
            self.stream.write("\r" + line + "\033[K" + ("\n" if final else ""))
        elif not final:
            self.stream.write(line + "\n")
        self.stream.flush()


def format_eta(seconds):
    if not math.isfinite(seconds):
        return "unknown"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Interrupts:
    """SIGINT and SIGTERM: the first asks to stop after the current task (the progress is saved,
    the same command resumes); a second stops at once (the last saved progress stays)."""

    def __init__(self):
        self.signal = None
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum
        os.write(sys.stderr.fileno(), b"prepare.py: interrupted: saving the progress after the "
                                      b"current piece (interrupt again to stop at once)\n")

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Interrupted(Exception):
    """Stopped by a signal; the progress is saved (or there was none to save)."""


def run_settings(files, sizes, tok, vocab_size, val_fraction, chunk_tokens, jsonl_key, strict):
    """Everything the output depends on: a saved run resumes only under the same settings.
    The inputs count by name, size and modification time (not content: that is read once)."""
    inputs = hashlib.sha256()
    for path, size in zip(files, sizes):
        inputs.update(f"{os.path.abspath(path)}\0{size}\0{os.stat(path).st_mtime_ns}\0".encode())
    return {"format": PROGRESS_FORMAT, "inputs": f"{len(files)} files, sha256 {inputs.hexdigest()}",
            "tokenizer": hashlib.sha256(tok.data).hexdigest() if tok.data else tok.name,
            "eod_token_id": tok.eod_id, "vocab_size": vocab_size, "val_fraction": val_fraction,
            "chunk_tokens": chunk_tokens, "jsonl_key": jsonl_key, "strict": strict,
            "segment_bytes": SEGMENT_BYTES}


SETTING_NAMES = {"inputs": "the input files (names, sizes or modification times)",
                 "tokenizer": "--tokenizer", "eod_token_id": "--eod_token",
                 "vocab_size": "--vocab_size", "val_fraction": "--val_fraction",
                 "chunk_tokens": "--chunk_tokens", "jsonl_key": "--jsonl_key", "strict": "--strict"}


def why_restart(saved, settings, partial):
    """None when `saved` (progress.json) resumes under `settings`, else why it cannot."""
    if saved is None:
        return "the interrupted run saved no progress yet"
    try:
        if saved["settings"]["format"] != PROGRESS_FORMAT:
            return "its progress.json is of another version of data/prepare.py"
        changed = [SETTING_NAMES.get(k, k) for k in settings if saved["settings"].get(k) != settings[k]]
        if changed:
            return f"{', '.join(changed)} changed since"
        state = saved["writer"]
        for split in state["counts"]:
            path = partial.file(f"{split}.bin")
            if not os.path.isfile(path) or os.path.getsize(path) < 4 * state["counts"][split]:
                return f"{path} is shorter than its saved progress"
        if not os.path.isfile(partial.file(state["pending_file"])):
            return f"{partial.file(state['pending_file'])} is missing"
        int(saved["segments_done"]), int(saved["bytes_done"]), int(saved["documents"])
    except (KeyError, TypeError, ValueError):  # not a progress.json this script wrote whole
        return "its progress.json is incomplete"
    return None


# -----------------------------------------------------------------------------


def check_split_sizes(meta, out_dir, block_size, global_batch_size, share=None):
    """What train.py will need of the splits, checked before anything is written: validation
    reads windows of block_size + 1 tokens (TokenData: block_size + 2 tokens at least), and a
    step reads global_batch_size training sequences of block_size + 1 tokens that tile train.bin
    ((tokens - 1) // block_size of them, dataset.py). With block_size unknown (None: neither
    --block_size nor --config) the default is a guess, so a shortfall is only a warning."""
    known = block_size is not None
    block_size = block_size if known else DEFAULT_BLOCK_SIZE
    problems = []
    for split in ("train", "val"):
        n = meta[f"n_{split}_tokens"]
        if n < block_size + 2:
            problems.append(
                f"{os.path.join(out_dir, split + '.bin')} would hold {n:,} tokens, fewer than "
                f"block_size + 2 = {block_size + 2} (one sequence of block_size + 1 tokens and a "
                f"choice of start) that train.py needs: give more data"
                f"{', raise --val_fraction' if split == 'val' else ''} or use a smaller "
                f"block_size (--block_size or --config)")
    sequences = (meta["n_train_tokens"] - 1) // block_size
    # a mixture's source: a step draws less than 2 more than its share (dataset.py's rule)
    need = math.ceil(share * global_batch_size) + 1 if share else global_batch_size
    if not problems and global_batch_size and sequences < need:
        reads = (f"that one optimizer step may draw from this source (its share {float(share):.3g} "
                 f"of global_batch_size {global_batch_size}, rounded up, + 1)" if share else
                 "that one optimizer step reads (global_batch_size)")
        problems.append(
            f"{os.path.join(out_dir, 'train.bin')} would hold {sequences:,} sequences of "
            f"block_size + 1 = {block_size + 1} tokens, fewer than the {need} {reads}: give "
            f"more data, lower --val_fraction, or lower global_batch_size in the config")
    if problems and known:
        raise PrepareError(problems[0] + "; nothing was written")
    for problem in problems:
        warn(f"{problem} (block_size {block_size} is the default: give --config or --block_size "
             f"to make this an error before anything is written)")


def new_file_state(index):
    """What the main process keeps of the input file being read: for line numbers and warnings."""
    return {"index": index, "lines": 0, "first_line": None,
            "replaced": {"invalid UTF-8 bytes": 0, "lone surrogates": 0}}


def merge_segments(state, segments, files):
    """Add a task's per-segment counts to the run's state; warn about a finished file's
    replaced characters (the same warning whatever the number of workers)."""
    for index, lines, documents, replaced, first_line, last in segments:
        if state["file"]["index"] != index:
            state["file"] = new_file_state(index)
        f = state["file"]
        if first_line is not None and f["first_line"] is None:
            f["first_line"] = f["lines"] + first_line
        f["lines"] += lines
        for what, n in replaced.items():
            f["replaced"][what] += n
        state["documents"] += documents
        counts = [f"{n} {what}" for what, n in f["replaced"].items() if n]
        if last and counts:
            warn(f"{files[index]}: {' and '.join(counts)} replaced with U+FFFD (the first on line "
                 f"{f['first_line']}); pass --strict to refuse them")


def line_error(e, state, files):
    """A worker's LineError as the user's PrepareError: file:line counted from the file's start."""
    index, line, detail = e.args
    before = state["file"]["lines"] if state["file"]["index"] == index else 0
    return PrepareError(f"{files[index]}:{before + line}: {detail}")


def start_run(partial, settings, resume, log):
    """The state to start from: a fresh one, or the interrupted run's (said which, and why)."""
    had_files = os.path.isdir(partial.path) and bool(os.listdir(partial.path))
    saved = partial.open()
    why = why_restart(saved, settings, partial) if resume else "--no_resume was given"
    if saved is not None and why is None:
        written = 4 * sum(saved["writer"]["counts"].values())
        log(f"prepare.py: resuming the interrupted run in {partial.path} at "
            f"{saved['bytes_done'] / 1e6:,.1f} MB of the input ({saved['documents']:,} documents; "
            f"re-hashing the {written / 1e6:,.1f} MB of tokens written so far first)")
        return saved
    if had_files:
        log(f"prepare.py: not resuming the interrupted run in {partial.path} ({why}): "
            f"starting over")
        partial.clear()
    return {"settings": settings, "segments_done": 0, "bytes_done": 0, "documents": 0, "max_id": -1,
            "file": new_file_state(-1), "writer": None}


def save_progress(partial, writer, state):
    """progress.json, written after the data it counts is on disk (SplitWriter.save)."""
    old = (state.get("writer") or {}).get("pending_file")
    state["writer"] = writer.save(state["segments_done"])
    partial.write_atomic("progress.json", json.dumps(state, indent=1).encode())
    if old and old != state["writer"]["pending_file"]:
        os.remove(partial.file(old))


def tokenize_all(state, writer, partial, files, sizes, workers, worker_args, interrupts,
                 progress_seconds, save_seconds):
    """Run the tasks not done yet in `state`, in order, into `writer`; save the progress every
    save_seconds and after an interrupt (then raise Interrupted)."""
    tokens = sum(writer.counts.values()) + writer.n_pending
    progress = Progress(sum(sizes), state["bytes_done"], tokens, progress_seconds)
    segments = itertools.islice(segments_of(sizes), state["segments_done"], None)
    tasks = tasks_of(segments, task_bytes_for(sum(sizes), workers))
    last_save = time.monotonic()
    try:
        with contextlib.closing(ordered_results(tasks, workers, worker_args)) as results:
            for task, (ids, segments) in results:
                merge_segments(state, segments, files)
                writer.add(ids)
                state["max_id"] = max(state["max_id"], int(ids.max()) if len(ids) else -1)
                state["segments_done"] += len(task)
                state["bytes_done"] += sum(end - start for _, start, end, _ in task)
                tokens = sum(writer.counts.values()) + writer.n_pending
                progress.update(state["bytes_done"], state["documents"], tokens)
                if interrupts.signal or time.monotonic() - last_save >= save_seconds:
                    save_progress(partial, writer, state)
                    last_save = time.monotonic()
                    if interrupts.signal:
                        raise Interrupted()
        progress.update(state["bytes_done"], state["documents"], tokens, final=True)
    except LineError as e:
        raise line_error(e, state, files) from None
    except concurrent.futures.process.BrokenProcessPool:
        raise PrepareError("a tokenizer worker process died (killed, or out of memory): nothing "
                           "was written; run again, with fewer --workers if memory ran out"
                           ) from None


def make_meta(tok, vocab_size, writer, state, val_fraction, chunk_tokens):
    meta = {
        "vocab_size": vocab_size,
        "tokenizer": tok.name,
        "n_train_tokens": writer.counts["train"],
        "n_val_tokens": writer.counts["val"],
        "dtype": "uint32",
        "eos_token_id": tok.eod_id,
        "bos_token_id": tok.bos_id,
        "max_token_id": state["max_id"],
        "val_fraction": val_fraction,
        "chunk_tokens": chunk_tokens,
        "n_documents": state["documents"],
        "fingerprint": writer.fingerprint(),
    }
    if tok.path:
        meta["fingerprint"]["tokenizer.json"] = {"bytes": len(tok.data),
                                                 "sha256": hashlib.sha256(tok.data).hexdigest()}
    return meta


Inputs = collections.namedtuple("Inputs", "tok vocab_size files sizes chunk_tokens settings")


def abandon(writer, partial, out_dir, error):
    """After a failure: close the writer and remove the partial outputs (nothing half-written);
    a write error (OSError: reading errors are PrepareErrors already) is raised as the one-line
    error a user reads, anything else is the caller's to re-raise."""
    writer.close()
    partial.abort()
    if isinstance(error, OSError):
        raise PrepareError(f"--out_dir {out_dir}: cannot write ({error.strerror or error}); "
                           "nothing was written: free some space or choose another --out_dir"
                           ) from None


def require_out_dir(out_dir):
    if not out_dir:
        raise PrepareError("--out_dir is empty; name the directory for train.bin, val.bin, "
                           "meta.json (e.g. data/shards)")


def read_inputs(inputs, tokenizer, vocab_size, val_fraction, chunk_tokens, extensions,
                jsonl_key, eod_token, strict):
    """The tokenizer, the input files and their sizes, the chunk size and the run's settings:
    all of the corpus's, also for one shard of it (what the merge and every shard agree on)."""
    extensions = {e.strip().lstrip(".") for e in extensions} - {""}
    if not extensions:
        raise PrepareError("--extensions is empty; give e.g. txt,md,jsonl")
    tok = ByteTokenizer() if tokenizer == "bytes" else HFTokenizer(tokenizer, eod_token)
    vocab_size = vocab_size or tok.vocab_size
    files = list_input_files(inputs, extensions)
    sizes = [os.path.getsize(f) for f in files]
    chunk_tokens = chunk_tokens or auto_chunk_tokens(sum(sizes), val_fraction)
    settings = run_settings(files, sizes, tok, vocab_size, val_fraction, chunk_tokens, jsonl_key,
                            strict)
    return Inputs(tok, vocab_size, files, sizes, chunk_tokens, settings)


def make_dirs(path):
    """os.makedirs(path); return the directories it created, deepest first (removed again, when
    empty, after a failed run)."""
    created, missing = [], os.path.abspath(path)
    while not os.path.exists(missing):
        created.append(missing)
        missing = os.path.dirname(missing)
    os.makedirs(path, exist_ok=True)
    return created


def commit_split(partial, writer, state, run, out_dir, val_fraction, block_size,
                 global_batch_size, share):
    """Check the splits against the model, then rename train.bin, val.bin, meta.json (and a
    copy of tokenizer.json) into out_dir; return the meta dict."""
    meta = make_meta(run.tok, run.vocab_size, writer, state, val_fraction, run.chunk_tokens)
    check_split_sizes(meta, out_dir, block_size, global_batch_size, share)
    extra = {}
    if run.tok.path and not is_tokenizer_copy(run.tok, os.path.join(out_dir, "tokenizer.json")):
        extra["tokenizer.json"] = run.tok.data  # kept with the data: export_hf.py ships it
    extra["meta.json"] = (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode()
    partial.commit(extra, writer.file_names)
    return meta


def prepare(inputs, out_dir, tokenizer="bytes", vocab_size=0, val_fraction=0.01,
            chunk_tokens=0, extensions=("txt", "md", "jsonl"), jsonl_key="text",
            eod_token="", block_size=None, strict=False, log=print, global_batch_size=0,
            workers=0, resume=True, progress_seconds=PROGRESS_SECONDS, save_seconds=SAVE_SECONDS,
            share=None, shard=None):
    """Tokenize `inputs` into out_dir/{train,val}.bin and meta.json; return the meta dict.
    block_size, global_batch_size: the model's (None, 0: unknown), checked against the splits;
    share: out_dir's weight share when it is a source of a mixture (source_share).
    workers: processes that tokenize (0: one per CPU core this process may use).
    shard: (index, count) to tokenize only that shard of the input files into
    out_dir/shard-<index>-of-<count>/ (merge_shards joins them); returns its shard.json dict."""
    check_numbers(vocab_size, val_fraction, chunk_tokens, block_size, global_batch_size, workers)
    require_out_dir(out_dir)
    run = read_inputs(inputs, tokenizer, vocab_size, val_fraction, chunk_tokens, extensions,
                      jsonl_key, eod_token, strict)
    check_out_dir(out_dir, run.tok)
    files, sizes, settings, run_dir = run.files, run.sizes, run.settings, out_dir
    if shard is not None:
        files, sizes, settings, run_dir = shard_part(run, out_dir, *shard)
        done = finished_shard(out_dir, *shard, settings) if resume else None
        if done:
            log(f"shard {shard[0]}/{shard[1]} is done already ({run_dir}, the same settings): "
                f"nothing to do (--no_resume tokenizes it again)")
            return done
    created = make_dirs(run_dir)
    partial = Partial(run_dir)
    writer = (SplitWriter if shard is None else ShardWriter)(partial, val_fraction,
                                                            run.chunk_tokens)
    state = None
    interrupts = Interrupts()  # from here a signal is a request to save and stop
    try:
        state = start_run(partial, settings, resume, log)
        writer.start(state["writer"])
        tokenize_all(state, writer, partial, files, sizes, workers or available_cores(),
                     (run.tok, run.vocab_size, files, jsonl_key, strict), interrupts,
                     progress_seconds, save_seconds)
        interrupts.restore()  # the rest takes moments: Ctrl-C stops it as before
        writer.finish()
        if shard is None:
            meta = commit_split(partial, writer, state, run, out_dir, val_fraction, block_size,
                                global_batch_size, share)
        else:
            meta = commit_shard(partial, writer, state, settings)
    except (Interrupted, KeyboardInterrupt) as e:
        writer.close()
        if partial.fd is None or not os.path.isfile(partial.file("progress.json")):
            partial.abort()  # nothing saved to resume from: leave no trace
            raise Interrupted("interrupted; nothing was written") from None
        partial.close()
        how = "stopped at once" if isinstance(e, KeyboardInterrupt) else "interrupted"
        done = f" after {state['bytes_done'] / 1e6:,.1f} MB of the input" if state else ""
        raise Interrupted(f"{how}{done}; the progress is saved in {partial.path}: run the same "
                          f"command again to resume (--no_resume starts over)") from None
    except BaseException as e:
        abandon(writer, partial, out_dir, e)
        raise
    finally:
        interrupts.restore()
        for directory in created:
            if not os.listdir(directory):
                os.rmdir(directory)  # a failed run leaves no trace, not even the directory
    if shard is None:
        log(f"{state['documents']} documents from {len(files)} files: {meta['n_train_tokens']:,} "
            f"train and {meta['n_val_tokens']:,} val tokens -> {out_dir}")
    else:
        log(f"shard {shard[0]}/{shard[1]}: {state['documents']} documents from {len(files)} "
            f"files: {meta['n_tokens']:,} tokens -> {run_dir} (then: the same command with "
            f"--merge {shard[1]} instead of --shard)")
    return meta


# -----------------------------------------------------------------------------
# Shards: one job of a SLURM array tokenizes a part of the files, a last one merges them


def parse_shard(text):
    """--shard I/N: (I, N), 0 <= I < N."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match or not int(match[1]) < int(match[2]) <= MAX_SHARDS:
        raise PrepareError(f"--shard {text}: expected I/N, shard I (counted from 0) of N, "
                           f"0 <= I < N <= {MAX_SHARDS}, e.g. --shard 0/4 (scripts/prepare.sbatch "
                           f"gives $SLURM_ARRAY_TASK_ID/N)")
    return int(match[1]), int(match[2])


def shard_bounds(sizes, count):
    """[(first file, end file)] of each of `count` shards: contiguous runs of whole files of the
    sorted list, balanced by bytes (a file belongs to the shard its middle byte falls in; a
    shard may be empty when there are fewer files than shards)."""
    total = sum(sizes)
    starts = itertools.accumulate(sizes, initial=0)
    owners = [min(count - 1, count * (2 * start + size) // (2 * total)) if total
              else i * count // len(sizes) for i, (start, size) in enumerate(zip(starts, sizes))]
    ends = [sum(owner <= i for owner in owners) for i in range(count)]
    return list(zip([0] + ends[:-1], ends))


def shard_dir(out_dir, index, count):
    return os.path.join(out_dir, f"shard-{index}-of-{count}")


def shard_part(run, out_dir, index, count):
    """Shard index/count of the run: its files, their sizes, its settings and its directory."""
    lo, hi = shard_bounds(run.sizes, count)[index]
    directory = shard_dir(out_dir, index, count)
    check_replaceable(directory, SHARD_OUTPUTS, {"shard", "settings"})
    return (run.files[lo:hi], run.sizes[lo:hi], {**run.settings, "shard": f"{index}/{count}"},
            directory)


def commit_shard(partial, writer, state, settings):
    """Rename tokens.bin and shard.json (what the merge needs of it) into the shard's directory."""
    record = {"shard": settings["shard"], "settings": settings, "n_tokens": writer.counts["tokens"],
              "n_documents": state["documents"], "max_token_id": state["max_id"],
              "fingerprint": writer.fingerprint()}
    partial.commit({"shard.json": (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()},
                   writer.file_names)
    return record


class ShardError(PrepareError):
    def __init__(self, index, count, problem):
        super().__init__(
            f"shard {index}/{count}: {problem}; run it again (data/prepare.py with the merge's "
            f"arguments and --shard {index}/{count} instead of --merge {count}: array task {index} "
            f"of scripts/prepare.sbatch), then the merge")


def read_shard(out_dir, index, count, settings):
    """A finished shard's shard.json, checked against the merge's settings; refuses a shard
    that is missing, unfinished, made with other settings or changed since."""
    path = shard_dir(out_dir, index, count)
    record_path = os.path.join(path, "shard.json")
    if not os.path.isfile(record_path):
        why = ("was interrupted (its progress is in .prepare-partial)"
               if os.path.isdir(os.path.join(path, Partial.NAME)) else
               "has not finished" if os.path.isdir(path) else "was not run (no such directory)")
        others = other_shard_counts(out_dir, count)
        if others:
            why += f"; {out_dir} holds shards of N = {', '.join(others)}: --merge {others[0]}?"
        raise ShardError(index, count, f"{record_path} is missing: the shard {why}")
    try:
        with open(record_path) as f:
            record = json.load(f)
        saved, n_bytes = record["settings"], record["fingerprint"]["tokens.bin"]["bytes"]
        changed = [SETTING_NAMES.get(k, k) for k in settings if saved.get(k) != settings[k]]
        shard = record["shard"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        raise ShardError(index, count, f"{record_path} is not a shard.json that data/prepare.py "
                                       f"wrote whole") from None
    if shard != f"{index}/{count}" or saved.get("shard") != shard:
        raise ShardError(index, count, f"{record_path} is of shard {shard}")
    if changed:
        raise ShardError(index, count, f"it was tokenized with other settings than the merge's "
                                       f"(changed: {', '.join(changed)}; or merge with the "
                                       f"arguments the shards were made with)")
    tokens = os.path.join(path, "tokens.bin")
    if not os.path.isfile(tokens) or os.path.getsize(tokens) != n_bytes:
        raise ShardError(index, count, f"{tokens} is not the {n_bytes:,} bytes its shard.json "
                                       f"says (missing, truncated or changed since)")
    return record


def other_shard_counts(out_dir, count):
    """The N of the shard-I-of-N directories in out_dir other than `count`, as strings."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    found = {m[1] for m in map(re.compile(r"shard-\d+-of-(\d+)").fullmatch, names) if m}
    return sorted(found - {str(count)}, key=int)


def finished_shard(out_dir, index, count, settings):
    """The shard.json of a shard already done with these settings (a resubmitted array skips
    it), else None."""
    try:
        return read_shard(out_dir, index, count, settings)
    except ShardError:
        return None


def shard_blocks(out_dir, index, count):
    """The bytes of a shard's tokens.bin, a block at a time."""
    path = os.path.join(shard_dir(out_dir, index, count), "tokens.bin")
    try:
        with open(path, "rb") as f:
            while True:
                block = f.read(HASH_BLOCK_BYTES)  # a multiple of 4: whole token ids
                if not block:
                    return
                yield block
    except OSError as e:
        raise ShardError(index, count, f"cannot read {path} ({e.strerror or e})") from None


def copy_shards(out_dir, records, writer, progress_seconds):
    """The shards' tokens, in shard order, into `writer` (the corpus's stream, cut into chunks as
    one run would cut it), each checked against its sha256 as it is read; with a progress line
    (its MB are of tokens.bin files, a shard's documents counted pro rata as it is read)."""
    progress = Progress(sum(4 * r["n_tokens"] for r in records), 0, 0, progress_seconds)
    done, documents = 0, 0
    for index, record in enumerate(records):
        digest, start, shard_bytes = hashlib.sha256(), done, 4 * record["n_tokens"]
        for block in shard_blocks(out_dir, index, len(records)):
            digest.update(block)
            writer.add(np.frombuffer(block, dtype="<u4"))
            done += len(block)
            share = record["n_documents"] * (done - start) // max(shard_bytes, 1)
            progress.update(done, documents + share, done // 4)
        if digest.hexdigest() != record["fingerprint"]["tokens.bin"]["sha256"]:
            raise ShardError(index, len(records), "its tokens.bin does not hash to the sha256 its "
                                                  "shard.json says (changed since)")
        documents += record["n_documents"]
    progress.update(done, documents, done // 4, final=True)


def remove_shard(out_dir, index, count):
    """A merged shard's files (its directory too, when nothing else is in it)."""
    path = shard_dir(out_dir, index, count)
    for name in SHARD_OUTPUTS:
        os.remove(os.path.join(path, name))
    if not os.listdir(path):
        os.rmdir(path)


def merge_shards(count, inputs, out_dir, tokenizer="bytes", vocab_size=0, val_fraction=0.01,
                 chunk_tokens=0, extensions=("txt", "md", "jsonl"), jsonl_key="text",
                 eod_token="", block_size=None, strict=False, log=print, global_batch_size=0,
                 share=None, progress_seconds=PROGRESS_SECONDS):
    """Join out_dir/shard-<i>-of-<count>/ (i = 0 .. count - 1, from prepare(shard=(i, count)) with
    the same arguments) into out_dir as one prepare() run writes it, byte for byte; then remove
    the shards. Every shard is checked before anything is written."""
    check_numbers(vocab_size, val_fraction, chunk_tokens, block_size, global_batch_size)
    require_out_dir(out_dir)
    if not 1 <= count <= MAX_SHARDS:
        raise PrepareError(f"--merge {count}: give the number of shards, the N of their "
                           f"--shard I/N, from 1 to {MAX_SHARDS}")
    run = read_inputs(inputs, tokenizer, vocab_size, val_fraction, chunk_tokens, extensions,
                      jsonl_key, eod_token, strict)
    check_out_dir(out_dir, run.tok)
    records = [read_shard(out_dir, i, count, run.settings) for i in range(count)]
    partial = Partial(out_dir)
    writer = SplitWriter(partial, val_fraction, run.chunk_tokens)
    state = {"documents": sum(r["n_documents"] for r in records),
             "max_id": max(r["max_token_id"] for r in records)}
    try:
        partial.open()
        partial.clear()  # an interrupted merge's leftovers (a merge does not resume)
        writer.start()
        copy_shards(out_dir, records, writer, progress_seconds)
        writer.finish()
        meta = commit_split(partial, writer, state, run, out_dir, val_fraction, block_size,
                            global_batch_size, share)
    except BaseException as e:
        abandon(writer, partial, out_dir, e)
        raise
    for index in range(count):
        remove_shard(out_dir, index, count)
    log(f"merged {count} shards, {state['documents']} documents from {len(run.files)} files: "
        f"{meta['n_train_tokens']:,} train and {meta['n_val_tokens']:,} val tokens -> {out_dir}")
    return meta


def available_cores():
    """The CPU cores this process may run on (a SLURM job's or taskset's share), else all."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, like every other error here
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser():
    p = ArgumentParser(prog="prepare.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="text/jsonl files or directories")
    p.add_argument("--out_dir", required=True, help="where train.bin, val.bin, meta.json go")
    p.add_argument("--tokenizer", default="bytes", help="path to a tokenizer.json, or 'bytes'")
    p.add_argument("--vocab_size", type=int, default=0,
                   help="the model's vocabulary; ids >= it are refused (default: the config's "
                        "with --config, else the tokenizer's)")
    p.add_argument("--val_fraction", type=float, default=0.01)
    p.add_argument("--chunk_tokens", type=int, default=0,
                   help="granularity of the train/val split, in tokens (default: from the input "
                        "size, 1024 to 65536)")
    p.add_argument("--block_size", type=int,
                   help="the model's block_size: a split with fewer than block_size + 2 tokens "
                        f"gets a warning (default: the config's, else {DEFAULT_BLOCK_SIZE})")
    p.add_argument("--global_batch_size", type=int,
                   help="sequences per optimizer step: a train split with fewer sequences is "
                        "refused (default: the config's, else not checked)")
    p.add_argument("--config", default="",
                   help="a config/<variant>.py to take block_size, vocab_size and "
                        "global_batch_size from")
    p.add_argument("--strict", action="store_true",
                   help="refuse invalid UTF-8 and lone surrogates instead of replacing them")
    p.add_argument("--extensions", default="txt,md,jsonl",
                   help="comma-separated file extensions searched for in directories")
    p.add_argument("--jsonl_key", default="text")
    p.add_argument("--eod_token", default="", help="end-of-document token of a tokenizer.json")
    p.add_argument("--workers", type=int, default=0,
                   help="processes that tokenize (default 0: one per CPU core this process may "
                        "use); the output is the same for any number")
    p.add_argument("--no_resume", action="store_true",
                   help="start over even where an interrupted run of the same command saved "
                        "its progress")
    p.add_argument("--progress_seconds", type=float, default=PROGRESS_SECONDS,
                   help=f"seconds between progress lines when stdout is not a terminal "
                        f"(default {PROGRESS_SECONDS})")
    p.add_argument("--save_seconds", type=float, default=SAVE_SECONDS,
                   help=f"seconds between saves of the progress an interrupted run resumes from "
                        f"(default {SAVE_SECONDS})")
    parallel = p.add_mutually_exclusive_group()
    parallel.add_argument("--shard", metavar="I/N",
                          help="tokenize only shard I (from 0) of N, a part of the input files "
                               "balanced by bytes, into <out_dir>/shard-I-of-N/ (one task of "
                               "scripts/prepare.sbatch's job array)")
    parallel.add_argument("--merge", type=int, metavar="N",
                          help="join the N shards in <out_dir> into train.bin, val.bin and "
                               "meta.json, as one run without --shard writes them; give the "
                               "shards' arguments")
    return p


def main(argv=None):
    a = build_parser().parse_args(argv)
    try:
        config = read_config(a.config) if a.config else {}
        block_size = a.block_size if a.block_size is not None else config.get("block_size")
        batch = (a.global_batch_size if a.global_batch_size is not None
                 else config.get("global_batch_size", 0))
        common = dict(inputs=a.input, out_dir=a.out_dir, tokenizer=a.tokenizer,
                      vocab_size=a.vocab_size or config.get("vocab_size", 0),
                      val_fraction=a.val_fraction, chunk_tokens=a.chunk_tokens,
                      extensions=tuple(a.extensions.split(",")), jsonl_key=a.jsonl_key,
                      eod_token=a.eod_token, block_size=block_size, strict=a.strict,
                      global_batch_size=batch,
                      share=source_share(config.get("data_sources", ""), a.out_dir))
        if a.merge is not None:
            merge_shards(a.merge, **common, progress_seconds=a.progress_seconds)
        else:
            prepare(**common, workers=a.workers, resume=not a.no_resume,
                    progress_seconds=a.progress_seconds, save_seconds=a.save_seconds,
                    shard=parse_shard(a.shard) if a.shard is not None else None)
    except PrepareError as e:
        print(f"prepare.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # anything not caught closer to its cause, e.g. making --out_dir
        print(f"prepare.py: error: {e.filename or a.out_dir}: {e.strerror or e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"prepare.py: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:  # before the outputs were begun
        print("prepare.py: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
