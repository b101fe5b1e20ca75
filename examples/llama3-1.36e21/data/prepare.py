"""Tokenize text into the flat token files train.py reads.

    python data/prepare.py --input corpus/ more.jsonl --out_dir data/mydata \\
        --tokenizer path/to/tokenizer.json --vocab_size 128256 --val_fraction 0.005
    python data/prepare.py --input corpus/ --out_dir data/bytes      # raw bytes, no tokenizer

Writes <out_dir>/train.bin and <out_dir>/val.bin (flat little-endian uint32 token ids, one
document after another, each followed by an end-of-document id) and <out_dir>/meta.json
(vocab_size, tokenizer, n_train_tokens, n_val_tokens, dtype, eos_token_id, bos_token_id,
max_token_id, val_fraction, chunk_tokens, n_documents).

Inputs are files or directories (searched recursively, in sorted order, for the --extensions).
A .jsonl file holds one document per line, its text under --jsonl_key; any other file is one
document of UTF-8 text. Files are streamed: text in pieces of about a megabyte cut at line ends,
jsonl line by line, and tokens go to disk in chunks, so memory does not grow with the corpus.

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
tokens each, so small corpora get a val split too. Output files are written beside their
final names and renamed into place only when complete.
"""

import argparse
import json
import math
import os
import shutil
import sys

import numpy as np

DEFAULT_EOD_NAMES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<eos>")
TEXT_PIECE_BYTES = 1 << 20  # text files are tokenized in pieces of about this size
MIN_CHUNK_TOKENS, MAX_CHUNK_TOKENS = 1 << 10, 1 << 16
VAL_CHUNKS_WANTED = 20


def auto_chunk_tokens(total_bytes, val_fraction):
    """A chunk size giving about VAL_CHUNKS_WANTED val chunks. Tokens are estimated as bytes / 4
    (a BPE tokenizer on English); raw bytes give 4× more tokens, hence more, smaller-share chunks."""
    estimate = total_bytes / 4 * val_fraction / VAL_CHUNKS_WANTED
    return int(min(MAX_CHUNK_TOKENS, max(MIN_CHUNK_TOKENS, estimate)))


class PrepareError(ValueError):
    pass


# -----------------------------------------------------------------------------
# Tokenizers: encode(list of str) -> list of lists of ids


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, end of document 256."""
    name = "bytes"
    vocab_size = 257
    eod_id = 256
    bos_id = None

    def encode_batch(self, texts):
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.uint32) for t in texts]


class HFTokenizer:
    """A Hugging Face tokenizer.json, loaded with the `tokenizers` library."""

    def __init__(self, path, eod_token):
        from tokenizers import Tokenizer  # only needed for this tokenizer
        self.path = path
        self.name = "tokenizer.json"
        self.tokenizer = Tokenizer.from_file(path)
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
    """Files named directly, plus files under named directories with one of `extensions`."""
    files = []
    for path in inputs:
        if os.path.isdir(path):
            found = []
            for root, dirs, names in os.walk(path):
                dirs.sort()
                found += [os.path.join(root, n) for n in names
                          if n.rsplit(".", 1)[-1] in extensions]
            files += sorted(found)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise PrepareError(f"input not found: {path}")
    if not files:
        raise PrepareError(f"no input files in {', '.join(inputs)} "
                           f"(directories are searched for: {', '.join(sorted(extensions))})")
    return files


def read_documents(path, jsonl_key):
    """Yield (text piece, is the last piece of its document) for one input file."""
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[jsonl_key]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise PrepareError(f"{path}:{line_no}: expected a JSON object with a "
                                       f"{jsonl_key!r} string ({type(e).__name__}: {e})") from None
                yield text, True
        return
    # A text file is one document, read in pieces cut after a newline.
    with open(path, encoding="utf-8", errors="replace") as f:
        piece = []
        size = 0
        for line in f:
            piece.append(line)
            size += len(line)
            if size >= TEXT_PIECE_BYTES:
                yield "".join(piece), False
                piece, size = [], 0
        yield "".join(piece), True


# -----------------------------------------------------------------------------
# Writing the split


class SplitWriter:
    """Cut a token stream into chunks and send each to train.bin or val.bin."""

    def __init__(self, out_dir, val_fraction, chunk_tokens):
        self.val_fraction = val_fraction
        self.chunk_tokens = chunk_tokens
        self.tmp_paths = {s: os.path.join(out_dir, f".{s}.bin.tmp") for s in ("train", "val")}
        self.files = {s: open(p, "wb") for s, p in self.tmp_paths.items()}
        self.counts = {"train": 0, "val": 0}
        self.pending = []  # arrays not yet written
        self.n_pending = 0
        self.chunk_index = 0

    def _split_of_chunk(self, k):
        f = self.val_fraction
        return "val" if math.floor((k + 1) * f) > math.floor(k * f) else "train"

    def add(self, ids):
        self.pending.append(ids)
        self.n_pending += len(ids)
        while self.n_pending >= self.chunk_tokens:
            stream = np.concatenate(self.pending)
            self._write_chunk(stream[:self.chunk_tokens])
            rest = stream[self.chunk_tokens:]
            self.pending, self.n_pending = [rest], len(rest)

    def _write_chunk(self, chunk):
        split = self._split_of_chunk(self.chunk_index)
        chunk.astype("<u4").tofile(self.files[split])
        self.counts[split] += len(chunk)
        self.chunk_index += 1

    def finish(self, out_dir):
        if self.n_pending:
            self._write_chunk(np.concatenate(self.pending))
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for split in ("train", "val"):
            if self.counts[split] == 0:
                self.abort()
                raise PrepareError(
                    f"the {split} split is empty ({self.chunk_index} chunks of {self.chunk_tokens} "
                    f"tokens): give more data, or lower --chunk_tokens or raise --val_fraction")
        for split, tmp in self.tmp_paths.items():
            os.replace(tmp, os.path.join(out_dir, f"{split}.bin"))

    def abort(self):
        for split, f in self.files.items():
            f.close()
            if os.path.exists(self.tmp_paths[split]):
                os.remove(self.tmp_paths[split])


# -----------------------------------------------------------------------------


def prepare(inputs, out_dir, tokenizer="bytes", vocab_size=0, val_fraction=0.01,
            chunk_tokens=0, extensions=("txt", "md", "jsonl"), jsonl_key="text",
            eod_token="", log=print):
    """Tokenize `inputs` into out_dir/{train,val}.bin and meta.json; return the meta dict."""
    if not 0.0 < val_fraction < 1.0:
        raise PrepareError(f"--val_fraction must be in (0, 1), got {val_fraction}")
    tok = ByteTokenizer() if tokenizer == "bytes" else HFTokenizer(tokenizer, eod_token)
    vocab_size = vocab_size or tok.vocab_size
    files = list_input_files(inputs, set(extensions))
    if not chunk_tokens:
        chunk_tokens = auto_chunk_tokens(sum(os.path.getsize(f) for f in files), val_fraction)
    os.makedirs(out_dir, exist_ok=True)
    writer = SplitWriter(out_dir, val_fraction, chunk_tokens)
    n_documents, max_id = 0, -1
    try:
        for path in files:
            for text, end_of_document in read_documents(path, jsonl_key):
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
        writer.finish(out_dir)
    except BaseException:
        writer.abort()
        raise
    tokenizer_name = tok.name
    if isinstance(tok, HFTokenizer):  # keep the tokenizer with the data (export_hf.py ships it)
        target = os.path.join(out_dir, "tokenizer.json")
        if os.path.abspath(tok.path) != os.path.abspath(target):
            shutil.copyfile(tok.path, target)
    meta = {
        "vocab_size": vocab_size,
        "tokenizer": tokenizer_name,
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
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True)
        f.write("\n")
    log(f"{n_documents} documents from {len(files)} files: {meta['n_train_tokens']:,} train and "
        f"{meta['n_val_tokens']:,} val tokens -> {out_dir}")
    return meta


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="text/jsonl files or directories")
    p.add_argument("--out_dir", required=True, help="where train.bin, val.bin, meta.json go")
    p.add_argument("--tokenizer", default="bytes", help="path to a tokenizer.json, or 'bytes'")
    p.add_argument("--vocab_size", type=int, default=0,
                   help="the model's vocabulary; ids >= it are refused (default: the tokenizer's)")
    p.add_argument("--val_fraction", type=float, default=0.01)
    p.add_argument("--chunk_tokens", type=int, default=0,
                   help="granularity of the train/val split, in tokens (default: from the input "
                        "size, 1024 to 65536)")
    p.add_argument("--extensions", default="txt,md,jsonl",
                   help="comma-separated file extensions searched for in directories")
    p.add_argument("--jsonl_key", default="text")
    p.add_argument("--eod_token", default="", help="end-of-document token of a tokenizer.json")
    a = p.parse_args(argv)
    try:
        prepare(a.input, a.out_dir, a.tokenizer, a.vocab_size, a.val_fraction, a.chunk_tokens,
                tuple(a.extensions.split(",")), a.jsonl_key, a.eod_token)
    except PrepareError as e:
        print(f"prepare.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
