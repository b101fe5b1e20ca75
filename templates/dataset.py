"""The data train.py reads: every training sequence once per epoch, in a seeded order.

train.bin (data/prepare.py: uint32 token ids, documents joined by the end-of-document id) is cut
into K = (tokens - 1) // block_size sequences of block_size + 1 tokens that overlap by one token:
inputs tokens[k·T : (k+1)·T], targets the same shifted by one. Consecutive sequences tile the
corpus, so every token but the first is a target exactly once per epoch (Megatron's GPT dataset
cuts the same way). Sequences are not aligned to documents: one may span a boundary, which the
end-of-document id marks (as in nanoGPT and torchtitan); aligning would waste the tails.

Order: epoch e visits the K sequences in the permutation numpy.random.default_rng([seed, 2, e])
draws. Optimizer steps consume that stream global_batch_size sequences at a time (a step may span
the end of one epoch and the start of the next), and rank r takes its contiguous share of a
step's sequences. It is all a pure function of (seed, step): a run resumes at any step, on any
number of ranks, and reads exactly the sequences an uninterrupted run would have.

Validation reads a fixed set of random windows of val.bin (TokenData.offsets), the same at every
evaluation, so val losses are comparable along a run.

The data is checked before a run: meta.json's fingerprint (the size and sha256 of every file
data/prepare.py wrote, hashed as it wrote them) must match the files' sizes at every start, the
checkpoint records it, and a resume onto data with another fingerprint is refused, naming the
files that changed (check_same_data). `train.py --dry_run` re-hashes the files
(verify_fingerprint): that reads the whole corpus, so a normal start only compares sizes.
"""

import hashlib
import json
import math
import os
import time
from fractions import Fraction

import numpy as np
import torch

from configurator import ConfigError

ORDER_STREAM = 2  # default_rng([seed, ORDER_STREAM, epoch]): the training order's own stream
HASH_BLOCK_BYTES = 8 << 20  # verify_fingerprint reads this much at a time (memory stays flat)
PROGRESS_SECONDS = 10  # verify_fingerprint logs its progress this often


def load_meta(data_dir):
    """data/prepare.py's meta.json as a dict (a clear error when it is missing or unreadable)."""
    path = os.path.join(data_dir, "meta.json")
    redo = f"run data/prepare.py --out_dir {data_dir} (README.md, step 2)"
    if not os.path.isfile(path):
        raise ConfigError(f"no prepared data: {path} is missing; {redo} first")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise ConfigError(f"{path} is unreadable ({e}); {redo} again") from None
    return meta if isinstance(meta, dict) else {}  # not an object: no valid keys (read_meta says)


def read_meta(data_dir):
    """(vocab_size, largest token id) from data/prepare.py's meta.json."""
    path = os.path.join(data_dir, "meta.json")
    redo = f"run data/prepare.py --out_dir {data_dir} (README.md, step 2)"
    meta = load_meta(data_dir)
    vocab = meta.get("vocab_size")
    max_id = meta.get("max_token_id", vocab - 1) if isinstance(vocab, int) else None
    if not all(type(n) is int and n >= 0 for n in (vocab, max_id)):
        raise ConfigError(f"{path} has no valid vocab_size and max_token_id (non-negative "
                          f"integers); {redo} again")
    return vocab, max_id


class TokenData:
    """train.bin / val.bin of data/prepare.py, read through a memory map."""

    def __init__(self, data_dir, split, block_size):
        path = os.path.join(data_dir, f"{split}.bin")
        size = os.path.getsize(path) if os.path.isfile(path) else None
        if size is None or size % 4:  # flat uint32 ids (docs/CONTRACT.md)
            what = "is missing" if size is None else f"has {size} bytes, not a whole uint32 count"
            raise ConfigError(f"{path} {what}; run data/prepare.py --out_dir {data_dir} again")
        # A sequence and its next-token targets need block_size + 1 tokens (+1 for a choice).
        if size // 4 < block_size + 2:
            more = "more text" + (" or a larger --val_fraction" if split == "val" else "")
            raise ConfigError(f"{path} has {size // 4} tokens, fewer than block_size + 2 = "
                              f"{block_size + 2}: give data/prepare.py {more}, or lower block_size")
        self.path, self.data_dir = path, data_dir
        self.tokens = np.memmap(path, dtype=np.uint32, mode="r")
        self.block_size = block_size

    def offsets(self, rng, count):
        """Random window starts (validation)."""
        return rng.integers(0, len(self.tokens) - self.block_size, size=count)

    def batch(self, offsets, dev):
        """Inputs and next-token targets, (len(offsets), block_size) int64 each."""
        rows = np.stack([self.tokens[o:o + self.block_size + 1] for o in offsets]).astype(np.int64)
        x = torch.from_numpy(rows[:, :-1].copy())
        y = torch.from_numpy(rows[:, 1:].copy())
        if dev.type == "cuda":
            x = x.pin_memory().to(dev, non_blocking=True)
            y = y.pin_memory().to(dev, non_blocking=True)
        return x, y


class TrainSequences(TokenData):
    """train.bin as K sequences read in a seeded order, each once per epoch (module docstring)."""

    def __init__(self, data_dir, block_size, seed, source=None):
        super().__init__(data_dir, "train", block_size)
        self.count = (len(self.tokens) - 1) // block_size  # K
        self.n_tokens = len(self.tokens)
        # a mixture's source i draws its own orders: default_rng([seed, 2, epoch, i])
        self.seed, self.stream = seed, () if source is None else (source,)
        self._orders = {}  # epoch -> permutation; the two most recent are kept

    def order(self, epoch):
        """The permutation of the K sequences that epoch `epoch` reads."""
        if epoch not in self._orders:
            if len(self._orders) >= 2:
                del self._orders[min(self._orders)]
            rng = np.random.default_rng([self.seed, ORDER_STREAM, epoch, *self.stream])
            self._orders[epoch] = rng.permutation(self.count)
        return self._orders[epoch]

    def step_sequences(self, step, global_batch_size, rank=0, world=1):
        """The sequence indices rank `rank` of `world` reads at global step `step` (0-based)."""
        per_rank = global_batch_size // world
        first = step * global_batch_size + rank * per_rank
        return self.stream_sequences(np.arange(first, first + per_rank, dtype=np.int64))

    def stream_sequences(self, slots):
        """The sequence indices at positions `slots` of the stream of epochs, one after another."""
        epochs, positions = np.divmod(slots, self.count)
        out = np.empty(len(slots), dtype=np.int64)
        for epoch in np.unique(epochs):
            mine = epochs == epoch
            out[mine] = self.order(int(epoch))[positions[mine]]
        return out

    def starts(self, sequences):
        """Token offsets of the given sequences, for batch()."""
        return np.asarray(sequences, dtype=np.int64) * self.block_size

    def epochs_after(self, steps, global_batch_size):
        """Epochs (fractional) that `steps` optimizer steps read."""
        return steps * global_batch_size / self.count

    def unique_tokens_after(self, steps, global_batch_size):
        """Distinct training tokens (targets) `steps` optimizer steps have read."""
        return min(steps * global_batch_size, self.count) * self.block_size


    def describe_run(self, max_iters, global_batch_size):
        """The run's tokens against the corpus's and the epochs that follow, in one line."""
        run_tokens = max_iters * global_batch_size * self.block_size
        epochs = self.epochs_after(max_iters, global_batch_size)
        line = (f"data: {self.count:,} sequences of {self.block_size} + 1 tokens in {self.path} "
                f"({len(self.tokens):,} tokens); the run reads {max_iters:,} steps × "
                f"{global_batch_size:,} sequences × {self.block_size} = {run_tokens:,} tokens "
                f"({self.unique_tokens_after(max_iters, global_batch_size):,} distinct): "
                f"{epochs:.3g} epochs")
        return line + (" (WARNING: more than one pass over the data)" if epochs > 1 else "")


# -----------------------------------------------------------------------------
# Mixtures: several prepared datasets (sources) drawn in fixed proportions
#
# The rule, exact in integers: the weights, normalised to sum 1, have a common denominator D
# (0.7 / 0.3: D = 10), and in every D consecutive slots of the global sequence stream source i
# holds exactly w_i·D. Within a period, slot j goes to the source furthest behind its share,
# argmax_i (w_i·(j + 1) − n_i(j)) with n_i(j) its slots so far (ties: the first source): the
# sequential largest-deficit rule, which keeps |n_i(j) − w_i·j| < 1 for every j. The slot is that
# source's sequence number n_i(j) in its own stream (its own seeded order, each of its sequences
# once per its own epoch). So a step of B sequences holds less than 2 away from w_i·B of source
# i (with two sources: w_i·B rounded down or up), and the first j sequences of the run within 1
# of w_i·j. It is a function of the slot alone: the counts per step do not depend on the number
# of ranks, and a resume on any world size reads what an uninterrupted run reads.
MAX_PERIOD = 100_000  # the largest common denominator D of the weights (the period is kept)


def parse_sources(text):
    """'web:0.7,code:0.3' -> [(name, Fraction weight)], the weights normalised to sum 1."""
    sources = []
    for item in text.split(","):
        name, _, weight = item.strip().partition(":")
        try:
            value = Fraction(weight.strip()).limit_denominator(10 ** 6)
        except (ValueError, ZeroDivisionError):
            value = None
        if not name or value is None or value <= 0 or "/" in name or name.startswith("."):
            raise ConfigError(f"data_sources={text!r}: {item.strip()!r} is not name:weight with a "
                              f"plain directory name and a positive weight; write e.g. "
                              f"data_sources='web:0.7,code:0.3' (each source in data_dir/<name>)")
        sources.append((name, value))
    names = [n for n, _ in sources]
    if len(set(names)) < len(names):
        raise ConfigError(f"data_sources={text!r}: a source is named twice")
    total = sum(w for _, w in sources)
    return [(n, w / total) for n, w in sources]


class MixtureRule:
    """The rule above for weights (Fractions summing to 1): which source each slot reads."""

    def __init__(self, weights):
        self.period = math.lcm(*(w.denominator for w in weights))
        if self.period > MAX_PERIOD:
            raise ConfigError(f"mixture weights {', '.join(map(str, weights))} need a period of "
                              f"{self.period:,} slots (their common denominator), more than "
                              f"{MAX_PERIOD:,}: round them to fewer decimals")
        self.shares = [int(w * self.period) for w in weights]  # slots per period, per source
        self.source = np.empty(self.period, dtype=np.int64)  # slot of the period -> source
        self.before = np.zeros((len(weights), self.period + 1), dtype=np.int64)  # n_i(j) in it
        taken = [0] * len(weights)
        for j in range(self.period):
            deficits = [share * (j + 1) - n * self.period for share, n in zip(self.shares, taken)]
            i = deficits.index(max(deficits))
            self.source[j] = i
            taken[i] += 1
            self.before[:, j + 1] = taken

    def counts(self, slots):
        """n_i(j): sequences of each source (rows) among the first j of the stream, j in slots."""
        periods, rest = np.divmod(np.asarray(slots, dtype=np.int64), self.period)
        return np.array(self.shares)[:, None] * periods + self.before[:, rest]

    def assign(self, slots):
        """(source, its sequence number in its own stream) of each slot."""
        periods, rest = np.divmod(np.asarray(slots, dtype=np.int64), self.period)
        source = self.source[rest]
        return source, np.array(self.shares)[source] * periods + self.before[source, rest]


class Mixture:
    """Parts (one TokenData per source) read as one: a global offset is the part's base plus
    its own offset, so batch() takes offsets across parts as TokenData.batch does within one."""

    def __init__(self, data_dir, names, parts):
        self.data_dir, self.names, self.parts = data_dir, names, parts
        self.block_size = parts[0].block_size
        self.bases = np.cumsum([0] + [len(p.tokens) for p in parts])
        self.path = ", ".join(p.path for p in parts)

    def batch(self, offsets, dev):
        offsets = np.asarray(offsets, dtype=np.int64)
        owner = np.searchsorted(self.bases, offsets, side="right") - 1
        rows = [self.parts[i].tokens[o - self.bases[i]:o - self.bases[i] + self.block_size + 1]
                for i, o in zip(owner, offsets)]
        rows = np.stack(rows).astype(np.int64)
        x, y = torch.from_numpy(rows[:, :-1].copy()), torch.from_numpy(rows[:, 1:].copy())
        if dev.type == "cuda":
            x = x.pin_memory().to(dev, non_blocking=True)
            y = y.pin_memory().to(dev, non_blocking=True)
        return x, y


class ValMixture(Mixture):
    """The sources' val.bin: `count` windows drawn per source by the mixture rule."""

    def __init__(self, data_dir, sources, block_size):
        super().__init__(data_dir, [n for n, _ in sources],
                         [TokenData(os.path.join(data_dir, n), "val", block_size) for n, _ in sources])
        self.weights = [w for _, w in sources]
        self.rule = MixtureRule(self.weights)

    def offsets(self, rng, count):
        counts = self.rule.counts([count])[:, 0]
        return np.concatenate([self.bases[i] + part.offsets(rng, int(n))
                               for i, (part, n) in enumerate(zip(self.parts, counts))])


class TrainMixture(Mixture):
    """The sources' train.bin in the weights' proportions (the rule above), each source with its
    own permutation and epoch counter. Reads like TrainSequences: a sequence number g is
    seq_bases[i] + source i's sequence index."""

    def __init__(self, data_dir, sources, block_size, seed):
        super().__init__(data_dir, [n for n, _ in sources],
                         [TrainSequences(os.path.join(data_dir, n), block_size, seed, source=i)
                          for i, (n, _) in enumerate(sources)])
        self.weights = [w for _, w in sources]
        self.rule = MixtureRule(self.weights)
        self.seq_bases = np.cumsum([0] + [p.count for p in self.parts])
        self.count = int(self.seq_bases[-1])
        self.n_tokens = int(self.bases[-1])

    def step_sequences(self, step, global_batch_size, rank=0, world=1):
        per_rank = global_batch_size // world
        first = step * global_batch_size + rank * per_rank
        source, position = self.rule.assign(np.arange(first, first + per_rank, dtype=np.int64))
        out = np.empty(per_rank, dtype=np.int64)
        for i, part in enumerate(self.parts):
            mine = source == i
            out[mine] = self.seq_bases[i] + part.stream_sequences(position[mine])
        return out

    def starts(self, sequences):
        sequences = np.asarray(sequences, dtype=np.int64)
        owner = np.searchsorted(self.seq_bases, sequences, side="right") - 1
        return self.bases[owner] + (sequences - self.seq_bases[owner]) * self.block_size

    def source_sequences_after(self, steps, global_batch_size):
        return self.rule.counts([steps * global_batch_size])[:, 0]

    def source_epochs_after(self, steps, global_batch_size):
        """{source: epochs (fractional) of its own data} after `steps` optimizer steps."""
        n = self.source_sequences_after(steps, global_batch_size)
        return {name: int(k) / p.count for name, k, p in zip(self.names, n, self.parts)}

    def epochs_after(self, steps, global_batch_size):
        """The most repeated source's epochs: what the repetition warnings are about."""
        return max(self.source_epochs_after(steps, global_batch_size).values())

    def unique_tokens_after(self, steps, global_batch_size):
        n = self.source_sequences_after(steps, global_batch_size)
        return int(sum(min(int(k), p.count) for k, p in zip(n, self.parts))) * self.block_size

    def too_small(self, global_batch_size):
        """A problem, when a source holds fewer sequences than one step may draw from it
        (fewer than 2 more than w_i·B: the rule above), else None."""
        for name, part, w in zip(self.names, self.parts, self.weights):
            need = math.ceil(w * global_batch_size) + 1
            if part.count < need:
                return (f"{part.path} holds {part.count} sequences of block_size + 1 tokens, "
                        f"fewer than the up to {need} a step draws from source {name!r}: give "
                        f"it more text, lower its weight, or lower global_batch_size")
        return None

    def describe_run(self, max_iters, global_batch_size):
        lines = []
        n = self.source_sequences_after(max_iters, global_batch_size)
        for name, k, part, w in zip(self.names, n, self.parts, self.weights):
            epochs = int(k) / part.count
            lines.append(f"data: source {name} (weight {float(w):.4g}): {part.count:,} sequences "
                         f"of {self.block_size} + 1 tokens in {part.path} ({part.n_tokens:,} "
                         f"tokens); the run reads {int(k):,} of them, {int(k) * self.block_size:,} "
                         f"tokens: {epochs:.3g} epochs"
                         + (" (WARNING: more than one pass over this source)" if epochs > 1 else ""))
        return "\n".join(lines)


def source_dirs(data_dir, data_sources):
    """The prepared directories a run reads: data_dir, or data_dir/<name> per source."""
    if not data_sources:
        return {"": data_dir}
    return {name: os.path.join(data_dir, name) for name, _ in parse_sources(data_sources)}


def data_fingerprint(data_dir, data_sources):
    """read_fingerprint of every directory the run reads, as one {file: record} (a mixture's
    files named <source>/<file>); None if any has none (prepared before fingerprints)."""
    combined = {}
    for name, directory in source_dirs(data_dir, data_sources).items():
        fingerprint = read_fingerprint(directory)
        if fingerprint is None:
            return None
        combined.update({os.path.join(name, f): r for f, r in fingerprint.items()})
    return combined


def open_train_data(data_dir, data_sources, block_size, seed):
    """(training data, validation data): data_dir itself, or the mixture data_sources names."""
    if not data_sources:
        return TrainSequences(data_dir, block_size, seed), TokenData(data_dir, "val", block_size)
    sources = parse_sources(data_sources)
    return (TrainMixture(data_dir, sources, block_size, seed),
            ValMixture(data_dir, sources, block_size))


# -----------------------------------------------------------------------------
# The fingerprint: is this the data the run (or its checkpoint) was prepared and trained on?


def read_fingerprint(data_dir):
    """meta.json's fingerprint ({file: {bytes, sha256}}), after checking that the files have the
    sizes it records: a file replaced or truncated since data/prepare.py wrote it is refused.
    None for data prepared before fingerprints were written."""
    fingerprint = load_meta(data_dir).get("fingerprint")
    if not isinstance(fingerprint, dict):
        return None
    meta_path, redo = os.path.join(data_dir, "meta.json"), f"run data/prepare.py --out_dir {data_dir}"
    for name, record in sorted(fingerprint.items()):
        path = os.path.join(data_dir, name)
        expected = record.get("bytes") if isinstance(record, dict) else None
        if type(expected) is not int:
            raise ConfigError(f"{meta_path}: the fingerprint of {name} has no size; {redo} again")
        size = os.path.getsize(path) if os.path.isfile(path) else None
        if size != expected:
            found = "is missing" if size is None else f"has {size:,} bytes"
            raise ConfigError(f"{path} {found}, but {meta_path} records {expected:,} bytes: the "
                              f"directory holds files of another data/prepare.py run; {redo} again")
    return fingerprint


def sha256_of_file(path, log, every_s=PROGRESS_SECONDS):
    """The sha256 of a file, read in blocks; logs progress every `every_s` seconds."""
    digest, done, size = hashlib.sha256(), 0, os.path.getsize(path)
    last = start = time.monotonic()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK_BYTES):
            digest.update(block)
            done += len(block)
            if time.monotonic() - last > every_s:
                last = time.monotonic()
                log(f"data: hashing {path}: {done / 1e9:.1f} of {size / 1e9:.1f} GB "
                    f"({done / 1e6 / (last - start):,.0f} MB/s)")
    return digest.hexdigest()


def verify_fingerprint(data_dir, fingerprint, log):
    """Re-hash every file meta.json's fingerprint names; refuse any whose sha256 differs."""
    for name, record in sorted(fingerprint.items()):
        path = os.path.join(data_dir, name)
        if sha256_of_file(path, log) != record.get("sha256"):
            raise ConfigError(f"{path}: its sha256 differs from the one data/prepare.py recorded "
                              f"in meta.json (same size, other contents: corrupted or replaced); "
                              f"run data/prepare.py --out_dir {data_dir} again")
        log(f"data: {name} matches meta.json ({record['bytes']:,} bytes, sha256 "
            f"{record['sha256'][:16]}…)")


def _describe_file(record):
    if record is None:
        return "absent"
    return f"{record.get('bytes', 0):,} bytes, sha256 {str(record.get('sha256'))[:16]}…"


def check_same_data(saved, train, allow_change, fingerprint=None):
    """Refuse to resume onto other data than the checkpoint's (`saved`: its data state), naming
    what changed: the step would point into other sequences. Compares the fingerprints when both
    sides have one, else train.bin's token count. allow_change: the user's say-so. Returns the
    changes (empty when none), for a warning when they are allowed."""
    then = saved.get("fingerprint")
    if isinstance(then, dict) and fingerprint is not None:
        changes = [f"{name} ({_describe_file(then.get(name))} when the checkpoint was saved, "
                   f"{_describe_file(fingerprint.get(name))} now)"
                   for name in sorted(set(then) | set(fingerprint))
                   if then.get(name) != fingerprint.get(name)]
        what = f"{train.data_dir} is not the data the checkpoint trained on"
    else:
        count = saved.get("n_train_tokens")
        changes = ([] if count is None or count == train.n_tokens else
                   [f"train.bin ({count:,} tokens when the checkpoint was saved, "
                    f"{train.n_tokens:,} now)"])
        what = f"{train.path} is not the train.bin the checkpoint trained on"
    if changes and not allow_change:
        raise ConfigError(f"{what}: {'; '.join(changes)}. Resuming would read other sequences "
                          f"than the saved step says: point data_dir at the run's data, or pass "
                          f"--allow_data_change=True to continue on this data anyway")
    return changes
