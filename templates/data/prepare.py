"""Tokenize text into the flat token files train.py reads.

    python data/prepare.py --input corpus/ more.jsonl --out_dir data/mydata \\
        --tokenizer path/to/tokenizer.json --config config/optimal.py --val_fraction 0.005
    python data/prepare.py --input corpus/ --out_dir data/bytes      # raw bytes, no tokenizer

Writes <out_dir>/train.bin and <out_dir>/val.bin (flat little-endian uint32 token ids, one
document after another, each followed by an end-of-document id) and <out_dir>/meta.json
(vocab_size, tokenizer, n_train_tokens, n_val_tokens, dtype, eos_token_id, bos_token_id,
max_token_id, val_fraction, chunk_tokens, n_documents).

Inputs are files or directories (searched recursively, in sorted order, for the --extensions).
A .jsonl file holds one document per line, its text under --jsonl_key; any other file is one
document of UTF-8 text. Files are streamed: text in pieces of about a megabyte cut at line ends,
jsonl line by line, and tokens go to disk in chunks, so memory does not grow with the corpus.
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

Nothing is half-written: the outputs are written beside their final names and renamed into
place only when all are complete, so a failed or interrupted run leaves the out_dir as it was.
Files in out_dir that an earlier run of this script did not write are never replaced.
"""

import argparse
import ast
import codecs
import hashlib
import json
import math
import os
import re
import signal
import sys

import numpy as np

DEFAULT_EOD_NAMES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>")
TEXT_PIECE_BYTES = 1 << 20  # text files are tokenized in pieces of about this size
MIN_CHUNK_TOKENS, MAX_CHUNK_TOKENS = 1 << 10, 1 << 16  # range of the automatic chunk size
CHUNK_TOKENS_LIMIT = 1 << 28  # a chunk is held in memory before it is written (4 bytes a token)
VAL_CHUNKS_WANTED = 20
DEFAULT_BLOCK_SIZE = 2048  # the spec's default seq_len
OUTPUTS = ("train.bin", "val.bin", "meta.json")  # tokenizer.json too, for a tokenizer.json
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


def check_numbers(vocab_size, val_fraction, chunk_tokens, block_size, global_batch_size=0):
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
    return values


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
# Reading documents


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

    def __init__(self, path, strict):
        self.path, self.strict = path, strict
        self.replaced = {"invalid UTF-8 bytes": 0, "lone surrogates": 0}
        self.first_line = None

    def decode(self, raw, line_no):
        if self.strict:
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PrepareError(
                    f"{self.path}:{line_no}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                    f"{e.start + 1}); re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8), "
                    f"or drop --strict to replace invalid bytes with U+FFFD") from None
        before = Replaced.count
        text = raw.decode("utf-8", errors="prepare.replace")
        self.count("invalid UTF-8 bytes", Replaced.count - before, line_no)
        return text

    def fix_surrogates(self, text, line_no):
        """A jsonl string may hold lone surrogates ("\\ud800"), which no tokenizer can encode."""
        if self.strict:
            match = SURROGATES.search(text)
            if match:
                raise PrepareError(
                    f"{self.path}:{line_no}: the text holds a lone surrogate "
                    f"\\u{ord(match.group()):04x} (not a character; UTF-8 cannot encode it); "
                    f"fix the line, or drop --strict to replace it with U+FFFD")
            return text
        text, n = SURROGATES.subn("\ufffd", text)
        self.count("lone surrogates", n, line_no)
        return text

    def count(self, what, n, line_no):
        if n and self.first_line is None:
            self.first_line = line_no
        self.replaced[what] += n

    def report(self):
        counts = [f"{n} {what}" for what, n in self.replaced.items() if n]
        if counts:
            warn(f"{self.path}: {' and '.join(counts)} replaced with U+FFFD (the first on line "
                 f"{self.first_line}); pass --strict to refuse them")


def read_documents(path, jsonl_key, strict=False):
    """Yield (text piece, is the last piece of its document) for one input file."""
    decoder = Decoder(path, strict)
    try:
        with open(path, "rb") as f:  # bytes: lines are decoded one by one, to name a bad one
            if path.endswith(".jsonl"):
                for line_no, raw in enumerate(f, 1):
                    if raw.strip():
                        yield jsonl_text(decoder, raw, line_no, jsonl_key), True
            else:
                # A text file is one document, read in pieces cut after a newline.
                piece, size = [], 0
                for line_no, raw in enumerate(f, 1):
                    line = decoder.decode(raw, line_no)
                    if "\r" in line:  # universal newlines, as Python's text mode reads them
                        line = line.replace("\r\n", "\n").replace("\r", "\n")
                    piece.append(line)
                    size += len(line)
                    if size >= TEXT_PIECE_BYTES:
                        yield "".join(piece), False
                        piece, size = [], 0
                yield "".join(piece), True
    except OSError as e:  # only reading happens in here (the consumer's errors stay outside)
        raise PrepareError(f"{path}: cannot read: {e.strerror or e}") from None
    decoder.report()


def jsonl_text(decoder, raw, line_no, key):
    """The text of one jsonl line: a JSON object whose `key` is a string."""
    path = decoder.path
    line = decoder.decode(raw, line_no)
    if line_no == 1:
        line = line.lstrip("\ufeff")  # a byte-order mark some editors write
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        raise PrepareError(f"{path}:{line_no}: not valid JSON ({e}); each line must be a JSON "
                           f"object such as {{{json.dumps(key)}: \"...\"}}") from None
    if not isinstance(obj, dict) or key not in obj:
        what = f"an object without {key!r}" if isinstance(obj, dict) else type(obj).__name__
        raise PrepareError(f"{path}:{line_no}: expected a JSON object with a {key!r} string, got "
                           f"{what}; fix the line, or name the text field with --jsonl_key")
    text = obj[key]
    if not isinstance(text, str):
        shown = json.dumps(text)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        raise PrepareError(f"{path}:{line_no}: {key!r} is {shown}, not a string; every line needs "
                           f"its text as a JSON string")
    return decoder.fix_surrogates(text, line_no)


# -----------------------------------------------------------------------------
# Writing the outputs


class Staging:
    """Output files written beside their final names in out_dir (".<name>.<pid>.tmp") and renamed
    into place together by commit(), meta.json last; abort() removes them."""

    def __init__(self, out_dir):
        self.out_dir = out_dir
        self.tmp = {}  # final name -> temporary path, in commit order
        self.files = []

    def open(self, name):
        path = os.path.join(self.out_dir, f".{name}.{os.getpid()}.tmp")
        self.tmp[name] = path  # before creating it: an interrupt just after must remove it too
        try:
            # O_EXCL: never write through a file or symlink that is already there
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            del self.tmp[name]  # not ours
            raise
        f = os.fdopen(fd, "wb")
        self.files.append(f)
        return f

    def write(self, name, data):
        f = self.open(name)
        f.write(data)
        self.close(f)

    def close(self, f):
        f.flush()
        os.fsync(f.fileno())  # a full disk must fail here, before anything is renamed
        f.close()

    def commit(self):
        # The renames take microseconds; a signal in between must not leave half of them done.
        blocked = {signal.SIGINT, signal.SIGTERM}
        if hasattr(signal, "pthread_sigmask"):  # POSIX
            signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            for name, tmp in self.tmp.items():
                os.replace(tmp, os.path.join(self.out_dir, name))
            self.tmp = {}
        finally:
            if hasattr(signal, "pthread_sigmask"):
                try:
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)
                except KeyboardInterrupt:
                    pass  # Ctrl-C during the renames: they are done, so the run is complete

    def abort(self):
        for f in self.files:
            try:
                f.close()  # may fail again (a full disk) while flushing
            except OSError:
                pass
        for tmp in self.tmp.values():
            try:
                os.remove(tmp)
            except FileNotFoundError:
                pass
        self.tmp = {}


class SplitWriter:
    """Cut a token stream into chunks and send each to train.bin or val.bin."""

    def __init__(self, staging, val_fraction, chunk_tokens):
        self.staging = staging
        self.val_fraction = val_fraction
        self.chunk_tokens = chunk_tokens
        self.files = {s: staging.open(f"{s}.bin") for s in ("train", "val")}
        self.counts = {"train": 0, "val": 0}
        self.hashes = {s: hashlib.sha256() for s in ("train", "val")}  # streamed, for meta.json
        self.pending = []  # arrays not yet written
        self.n_pending = 0
        self.chunk_index = 0

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

    def finish(self):
        if self.n_pending:
            self._write_chunk(np.concatenate(self.pending))
        for f in self.files.values():
            self.staging.close(f)
        for split in ("train", "val"):
            if self.counts[split] == 0:
                raise PrepareError(
                    f"the {split} split is empty ({self.chunk_index} chunks of {self.chunk_tokens} "
                    f"tokens): give more data, or lower --chunk_tokens or raise --val_fraction")

    def fingerprint(self):
        """{file: {bytes, sha256}}: what train.py compares on resume (meta.json "fingerprint")."""
        return {f"{s}.bin": {"bytes": 4 * self.counts[s], "sha256": self.hashes[s].hexdigest()}
                for s in ("train", "val")}


def check_out_dir(out_dir, tok):
    """Refuse an out_dir where an output would replace a file this script did not write: only
    the files of an earlier run (a meta.json of ours beside them) may be replaced."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise PrepareError(f"--out_dir {out_dir}: exists and is not a directory")
    earlier_meta = os.path.join(out_dir, "meta.json")
    ours = False
    if os.path.isfile(earlier_meta):  # not a pipe, which would block
        try:
            with open(earlier_meta) as f:
                meta = json.load(f)
            ours = isinstance(meta, dict) and {"n_train_tokens", "dtype"} <= set(meta)
        except (OSError, ValueError, RecursionError):
            pass
    for name in OUTPUTS:
        path = os.path.join(out_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            raise PrepareError(f"{path}: is a directory, where data/prepare.py writes a file; "
                               f"move it away or choose another --out_dir")
        if os.path.lexists(path) and not ours:
            raise PrepareError(f"{path}: exists and was not written by data/prepare.py (no "
                               f"meta.json of an earlier run beside it); move it away or choose "
                               f"another --out_dir")
    target = os.path.join(out_dir, "tokenizer.json")
    if tok.path and os.path.lexists(target) and not is_tokenizer_copy(tok, target):
        raise PrepareError(f"{target}: exists and differs from --tokenizer {tok.path}; "
                           f"move it away or choose another --out_dir")


def is_tokenizer_copy(tok, target):
    """Is out_dir/tokenizer.json the --tokenizer file itself, or a copy of it?"""
    if not os.path.isfile(target):
        return False
    if os.path.samefile(tok.path, target):
        return True
    with open(target, "rb") as f:
        return f.read() == tok.data


# -----------------------------------------------------------------------------


def check_split_sizes(meta, out_dir, block_size, global_batch_size):
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
    if not problems and global_batch_size and sequences < global_batch_size:
        problems.append(
            f"{os.path.join(out_dir, 'train.bin')} would hold {sequences:,} sequences of "
            f"block_size + 1 = {block_size + 1} tokens, fewer than the {global_batch_size} that "
            f"one optimizer step reads (global_batch_size): give more data, lower --val_fraction, "
            f"or lower global_batch_size in the config")
    if problems and known:
        raise PrepareError(problems[0] + "; nothing was written")
    for problem in problems:
        warn(f"{problem} (block_size {block_size} is the default: give --config or --block_size "
             f"to make this an error before anything is written)")


def prepare(inputs, out_dir, tokenizer="bytes", vocab_size=0, val_fraction=0.01,
            chunk_tokens=0, extensions=("txt", "md", "jsonl"), jsonl_key="text",
            eod_token="", block_size=None, strict=False, log=print, global_batch_size=0):
    """Tokenize `inputs` into out_dir/{train,val}.bin and meta.json; return the meta dict.
    block_size, global_batch_size: the model's (None, 0: unknown), checked against the splits."""
    check_numbers(vocab_size, val_fraction, chunk_tokens, block_size, global_batch_size)
    if not out_dir:
        raise PrepareError("--out_dir is empty; name the directory for train.bin, val.bin, "
                           "meta.json (e.g. data/shards)")
    extensions = {e.strip().lstrip(".") for e in extensions} - {""}
    if not extensions:
        raise PrepareError("--extensions is empty; give e.g. txt,md,jsonl")
    tok = ByteTokenizer() if tokenizer == "bytes" else HFTokenizer(tokenizer, eod_token)
    vocab_size = vocab_size or tok.vocab_size
    files = list_input_files(inputs, extensions)
    check_out_dir(out_dir, tok)
    if not chunk_tokens:
        chunk_tokens = auto_chunk_tokens(sum(os.path.getsize(f) for f in files), val_fraction)
    created = not os.path.exists(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    staging = Staging(out_dir)
    try:
        writer = SplitWriter(staging, val_fraction, chunk_tokens)
        n_documents, max_id = 0, -1
        for path in files:
            for text, end_of_document in read_documents(path, jsonl_key, strict):
                (ids,) = tok.encode_batch([text])
                if end_of_document and tok.eod_id is not None:
                    ids = np.append(ids, np.uint32(tok.eod_id))
                if len(ids) and int(ids.max()) >= vocab_size:
                    bad = int(ids.max())
                    raise PrepareError(
                        f"{path}: token id {bad} >= vocab_size {vocab_size}; the tokenizer "
                        f"({tok.name}, {tok.vocab_size} ids) does not fit the model's vocabulary: "
                        f"use a smaller tokenizer or a larger vocab_size")
                max_id = max(max_id, int(ids.max()) if len(ids) else -1)
                n_documents += end_of_document
                writer.add(ids)
        writer.finish()
        meta = {
            "vocab_size": vocab_size,
            "tokenizer": tok.name,
            "n_train_tokens": writer.counts["train"],
            "n_val_tokens": writer.counts["val"],
            "dtype": "uint32",
            "eos_token_id": tok.eod_id,
            "bos_token_id": tok.bos_id,
            "max_token_id": max_id,
            "val_fraction": val_fraction,
            "chunk_tokens": chunk_tokens,
            "n_documents": n_documents,
        }
        meta["fingerprint"] = writer.fingerprint()
        if tok.path:
            meta["fingerprint"]["tokenizer.json"] = {
                "bytes": len(tok.data), "sha256": hashlib.sha256(tok.data).hexdigest()}
        check_split_sizes(meta, out_dir, block_size, global_batch_size)
        if tok.path and not is_tokenizer_copy(tok, os.path.join(out_dir, "tokenizer.json")):
            staging.write("tokenizer.json", tok.data)  # kept with the data: export_hf.py ships it
        staging.write("meta.json", (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
        staging.commit()
    except OSError as e:  # reading errors are PrepareErrors already: this is the out_dir
        staging.abort()
        raise PrepareError(f"--out_dir {out_dir}: cannot write ({e.strerror or e}); nothing was "
                           f"written: free some space or choose another --out_dir") from None
    except BaseException:
        staging.abort()
        raise
    finally:
        if created and not os.listdir(out_dir):
            os.rmdir(out_dir)  # a failed run leaves no trace, not even the directory
    log(f"{n_documents} documents from {len(files)} files: {meta['n_train_tokens']:,} train and "
        f"{meta['n_val_tokens']:,} val tokens -> {out_dir}")
    return meta


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit status 2, like every other error here
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv=None):
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
    a = p.parse_args(argv)
    try:
        config = read_config(a.config) if a.config else {}
        block_size = a.block_size if a.block_size is not None else config.get("block_size")
        batch = (a.global_batch_size if a.global_batch_size is not None
                 else config.get("global_batch_size", 0))
        prepare(a.input, a.out_dir, a.tokenizer, a.vocab_size or config.get("vocab_size", 0),
                a.val_fraction, a.chunk_tokens, tuple(a.extensions.split(",")), a.jsonl_key,
                a.eod_token, block_size, a.strict, global_batch_size=batch)
    except PrepareError as e:
        print(f"prepare.py: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # anything not caught closer to its cause, e.g. making --out_dir
        print(f"prepare.py: error: {e.filename or a.out_dir}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prepare.py: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
