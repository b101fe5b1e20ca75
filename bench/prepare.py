"""Tokenization throughput: the generated data/prepare.py against `tokenizers`' own encode_batch.

    python bench/prepare.py                 # ~16 MB of text, a 32k BPE trained here (a few minutes)
    python bench/prepare.py --mb 64         # more text
    python bench/prepare.py --quick         # smoke run: 1 MB, a 1k BPE, one round

The text: the standard library's .py sources (text nobody here wrote), recursively in sorted
order, site-packages excluded, up to --mb megabytes. The tokenizer: a byte-level BPE of
--vocab_size ids trained here with `tokenizers` on that text (cached in --work). Each method
tokenizes the same files:

- encode_batch: the files read into memory first (not timed), then one
  `Tokenizer.encode_batch(texts, add_special_tokens=False)` with the library's own thread pool
  over every core (TOKENIZERS_PARALLELISM=true): the library at its fastest, nothing written.
- prepare.py --workers N: the generated script as a user runs it (process start, reading,
  UTF-8 checks, the train/val split, writing and hashing the outputs all inside the time), for
  N = 1, 2 and this machine's cores.

--rounds rounds, each running every method once in an order that rotates from round to round,
so slow spells of a shared machine fall on all of them; reported: the best round of each (the
least disturbed), tokens/s, and ratios side by side; also the CPU seconds each whole command used
(its processes together, start-up included) and tokens per CPU-second against encode_batch's:
the cost per token, which other loads on a shared machine disturb far less than wall time. Targets (issue #16 part 6): prepare.py
with all cores ≥ 0.9× encode_batch; 2 workers ≥ 1.8× 1 worker (near-linear).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PREPARE = REPO / "templates" / "data" / "prepare.py"
EOD = "<|endoftext|>"


def corpus_files(megabytes):
    """Sorted stdlib sources up to `megabytes` MB (a deterministic, real corpus)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(stdlib.rglob("*.py")):
        if "site-packages" in path.parts or not path.is_file():
            continue
        files.append(path)
        total += path.stat().st_size
        if total >= megabytes * 1e6:
            break
    return files, total


def train_tokenizer(files, vocab_size, path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    if path.exists():
        return path
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = (f.read_text(encoding="utf-8", errors="replace") for f in files)
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOD], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(path))
    return path


def time_encode_batch(tokenizer_path, files):
    """Seconds and tokens of one encode_batch over the files' texts, all cores."""
    code = f"""
import json, os, sys, time
os.environ["TOKENIZERS_PARALLELISM"] = "true"
from tokenizers import Tokenizer
tok = Tokenizer.from_file({str(tokenizer_path)!r})
texts = [open(p, encoding="utf-8", errors="replace").read() for p in json.load(sys.stdin)]
t0 = time.perf_counter()
n = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
print(json.dumps({{"seconds": time.perf_counter() - t0, "tokens": n}}))
"""
    before = cpu_seconds()
    proc = subprocess.run([sys.executable, "-c", code], input=json.dumps(list(map(str, files))),
                          capture_output=True, text=True, check=True)
    return dict(json.loads(proc.stdout), cpu=cpu_seconds() - before)


def cpu_seconds():
    """User + system CPU time of the finished child processes (and theirs) so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_prepare(tokenizer_path, files, workers, out_dir):
    """Seconds (wall, the whole command) and tokens written by prepare.py --workers N."""
    cmd = [sys.executable, str(PREPARE), "--input", *map(str, files), "--out_dir", str(out_dir),
           "--tokenizer", str(tokenizer_path), "--workers", str(workers), "--val_fraction",
           "0.01", "--block_size", "64", "--no_resume", "--progress_seconds", "1e9"]
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    meta = json.loads((Path(out_dir) / "meta.json").read_text())
    return {"seconds": seconds, "cpu": cpu, "tokens": meta["n_train_tokens"]
            + meta["n_val_tokens"] - meta["n_documents"]}  # less the end-of-document ids


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=16.0, help="megabytes of text")
    p.add_argument("--vocab_size", type=int, default=32000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", default="", help="a directory to keep the tokenizer and outputs in")
    p.add_argument("--quick", action="store_true", help="1 MB, a 1k BPE, one round")
    a = p.parse_args(argv)
    if a.quick:
        a.mb, a.vocab_size, a.rounds = 1.0, 1000, 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    work = Path(a.work or tempfile.mkdtemp(prefix="bench-prepare-"))
    work.mkdir(parents=True, exist_ok=True)
    files, total = corpus_files(a.mb)
    print(f"text: {len(files)} stdlib files, {total / 1e6:.1f} MB; {cores} CPU cores")
    t0 = time.perf_counter()
    tokenizer = train_tokenizer(files, a.vocab_size, work / f"bpe-{a.vocab_size}-{a.mb:g}mb.json")
    print(f"tokenizer: byte-level BPE, {a.vocab_size:,} ids ({tokenizer}; "
          f"{time.perf_counter() - t0:.0f} s)")

    methods = {"encode_batch (all cores)": lambda: time_encode_batch(tokenizer, files)}
    for workers in sorted({1, 2, cores}):
        methods[f"prepare.py --workers {workers}"] = (
            lambda w=workers: time_prepare(tokenizer, files, w, work / f"out-{w}"))
    best = {}
    names = list(methods)
    for r in range(a.rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            result = methods[name]()
            if name not in best or result["seconds"] < best[name]["seconds"]:
                best[name] = result
    outputs = {n: (work / f"out-{n.split()[-1]}/train.bin").read_bytes()
               for n in names if n.startswith("prepare")}
    identical = len(set(outputs.values())) == 1

    base = best[names[0]]
    base_rate = base["tokens"] / base["seconds"]
    base_per_cpu = base["tokens"] / base["cpu"]
    print(f"\n{'method':30} {'seconds':>8} {'tokens':>12} {'M tokens/s':>11} {'vs encode_batch':>16}"
          f" {'CPU s':>7} {'per CPU-s vs':>13}")
    for name in names:
        r = best[name]
        rate = r["tokens"] / r["seconds"]
        print(f"{name:30} {r['seconds']:8.2f} {r['tokens']:12,} {rate / 1e6:11.3f} "
              f"{rate / base_rate:15.2f}× {r['cpu']:7.2f} {r['tokens'] / r['cpu'] / base_per_cpu:12.2f}×")
    rate = {n: best[n]["tokens"] / best[n]["seconds"] for n in names}
    all_cores = rate[f"prepare.py --workers {cores}"] / base_rate
    scaling = rate["prepare.py --workers 2"] / rate["prepare.py --workers 1"]
    print(f"\nprepare.py with all {cores} cores / encode_batch: {all_cores:.2f}× "
          f"(target ≥ 0.9×: {'PASS' if all_cores >= 0.9 else 'FAIL'})")
    print(f"prepare.py 2 workers / 1 worker: {scaling:.2f}× "
          f"(target ≥ 1.8×: {'PASS' if scaling >= 1.8 else 'FAIL'})")
    print(f"outputs of every --workers byte-identical: {identical}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
