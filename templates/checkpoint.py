"""Checkpoints that survive crashes: atomic saves, verified loads, resharding on resume.

On-disk layout (under out_dir):

    checkpoints/
      step_00000200/              one checkpoint, named by the number of completed optimizer steps
        manifest.json             written last: format, step, world_size, and the byte size and
                                  sha256 of every other file; a directory without it is not a
                                  checkpoint
        train_state.json          step, tokens seen, data position, the run's config
        rng_rank<r>.pt            Python, torch CPU and CUDA RNG states of rank r
        model_optim.pt            format "torch" (single process, DDP): torch.save of
                                  {"model": full state dict, "optimizer": full state dict}
        .metadata, __<r>_0.distcp format "dcp" (FSDP2): the same two state dicts written sharded
                                  by torch.distributed.checkpoint, one file per rank
      .tmp-step_00000300/         a save in progress (or one killed mid-way); never read, removed
                                  by the next run

State dicts come from torch.distributed.checkpoint.state_dict, so in both formats the model keys
are Hugging Face parameter names (model.layers.0.self_attn.q_proj.weight, ...) and the optimizer
state is keyed by those names too, whatever wraps the model (DDP, FSDP2, activation
checkpointing). That is what lets a run resume on a different number of processes: a "dcp"
checkpoint written by 2 FSDP2 ranks loads into 1 process (DCP reshards on load), and a "torch"
checkpoint loads into an FSDP2 model (each rank keeps its shard of the full tensors).

A save writes everything into .tmp-step_N/, fsyncs every file, hashes them, writes
manifest.json, fsyncs, and only then renames the directory to step_N/ (a rename is atomic on
POSIX file systems). A save that fails (disk full, read-only directory, a crash) therefore
never leaves a half-written step_N/ and never touches an older checkpoint. After a successful
save all but the newest `keep_last` checkpoints that verify are deleted (prune): the checkpoint
just saved is always kept, and one that does not verify (truncated, corrupted) is neither
counted nor deleted, so a damaged checkpoint never stands in for a good one.

A load first verifies the manifest (every file present, of the recorded size and sha256). When
the newest checkpoint fails, the reason is logged and the next older one is tried.

`load_model_weights(path)` returns the model's full, unsharded CPU tensors from either format,
without a process group; export_hf.py uses it.
"""

import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

CHECKPOINT_DIR = "checkpoints"
MANIFEST = "manifest.json"
TRAIN_STATE = "train_state.json"
TORCH_FILE = "model_optim.pt"
STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or is not intact."""


# Checkpoints whose every file this process has hashed (written, or verified in full), keyed by
# path, with the manifest's (inode, mtime) then: pruning re-checks only their sizes, as hashing
# every kept checkpoint at every save would read them all again.
_hashed = {}


def _manifest_stamp(path):
    st = os.stat(Path(path) / MANIFEST)
    return st.st_ino, st.st_mtime_ns


def _rank_world():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _disk_note(directory):
    """Free space where the checkpoint goes: torch.save reports a full disk only as
    'unexpected pos', so say how much room there was."""
    try:
        return f"{shutil.disk_usage(directory).free:,} bytes free in {directory}"
    except OSError:
        return f"{directory} is not accessible"


def _all_errors(error, directory):
    """Every rank's error message (None where it succeeded), on every rank."""
    _, world = _rank_world()
    message = None
    if error is not None:
        message = f"{type(error).__name__}: {error} ({_disk_note(directory)})"
    if world == 1:
        return [message]
    messages = [None] * world
    dist.all_gather_object(messages, message)
    return messages


def _raise_if_any_failed(error, what, directory):
    """Collective: raise CheckpointError on every rank if `error` is set on any rank."""
    failures = [(r, m) for r, m in enumerate(_all_errors(error, directory)) if m is not None]
    if failures:
        details = "; ".join(f"rank {r}: {m}" for r, m in failures)
        raise CheckpointError(f"{what} failed: {details}; older checkpoints are untouched") \
            from error


def checkpoint_dir(out_dir, step):
    return Path(out_dir) / CHECKPOINT_DIR / f"{STEP_PREFIX}{step:08d}"


def list_checkpoints(out_dir):
    """Checkpoint directories in out_dir, newest (highest step) first. Not verified."""
    root = Path(out_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)
             and p.name[len(STEP_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]), reverse=True)


def remove_partial_saves(out_dir, log=print):
    """Delete .tmp-* directories left by saves that were killed. Call on rank 0 at start."""
    root = Path(out_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith(TMP_PREFIX):
            log(f"checkpoint: removing {p.name}, left by a save that did not finish")
            shutil.rmtree(p, ignore_errors=True)


# -----------------------------------------------------------------------------
# Files: fsync, hashing


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _torch_save_synced(obj, path):
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_json_synced(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _rng_state():
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state):
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -----------------------------------------------------------------------------
# Save


def save(out_dir, step, model, optimizer, train_state, *, sharded, keep_last, log=print):
    """Collective: write checkpoint step_<step> atomically and prune old ones; return its path.

    sharded: the model is FSDP2-sharded (write "dcp"); otherwise rank 0 writes "torch".
    Raises CheckpointError on every rank if any rank failed; older checkpoints stay intact.
    """
    rank, world = _rank_world()
    final = checkpoint_dir(out_dir, step)
    root = final.parent
    tmp = root / f"{TMP_PREFIX}{final.name}"

    # Every phase ends with a collective check, so all ranks fail together and none waits forever.
    def phase(what, work):
        error = None
        try:
            work()
        except Exception as e:
            error = e
        _raise_if_any_failed(error, f"checkpoint save at step {step} ({what})", root)

    def make_staging_dir():  # rank 0
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()

    phase(f"creating {tmp}", make_staging_dir if rank == 0 else lambda: None)
    try:
        # Gathering the state is collective for FSDP2: every rank takes part.
        options = StateDictOptions(full_state_dict=not sharded, cpu_offload=not sharded)
        state = {"model": get_model_state_dict(model, options=options),
                 "optimizer": get_optimizer_state_dict(model, optimizer, options=options)}

        def write_state():
            if sharded:  # collective: every rank writes its shards, rank 0 the .metadata
                dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True))
            elif rank == 0:
                _torch_save_synced(state, tmp / TORCH_FILE)

        phase("model and optimizer", write_state)
        state.clear()  # drop the gathered copies before hashing
        phase("RNG states", lambda: _torch_save_synced(_rng_state(), tmp / f"rng_rank{rank}.pt"))
        if world > 1:
            dist.barrier()

        files = {}

        def hash_my_share():  # rank r hashes files r, r + world, ...
            names = sorted(p.name for p in tmp.iterdir() if p.is_file())
            files.update({n: {"bytes": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)}
                          for n in names[rank::world]})

        phase("hashing", hash_my_share)
        if world > 1:
            gathered = [None] * world
            dist.all_gather_object(gathered, files)
            files = {k: v for part in gathered for k, v in part.items()}

        def publish():  # rank 0: train state, manifest, fsync, then the atomic rename
            _write_json_synced(train_state, tmp / TRAIN_STATE)
            files[TRAIN_STATE] = {"bytes": (tmp / TRAIN_STATE).stat().st_size,
                                  "sha256": _sha256(tmp / TRAIN_STATE)}
            manifest = {"format": "dcp" if sharded else "torch", "step": step,
                        "world_size": world, "files": files}
            _write_json_synced(manifest, tmp / MANIFEST)
            _fsync_dir(tmp)
            if final.exists():  # a broken copy of this step from an earlier run: replace it
                stale = root / f"{TMP_PREFIX}stale-{final.name}"
                shutil.rmtree(stale, ignore_errors=True)
                os.replace(final, stale)
                os.replace(tmp, final)
                shutil.rmtree(stale, ignore_errors=True)
            else:
                os.replace(tmp, final)
            _fsync_dir(root)
            _hashed[str(final)] = _manifest_stamp(final)  # its files were hashed just now

        phase("manifest and rename", publish if rank == 0 else lambda: None)
    except CheckpointError:
        if rank == 0:  # leave no half-written staging directory behind
            shutil.rmtree(tmp, ignore_errors=True)
        raise

    if rank == 0:
        prune(out_dir, final, keep_last, log)
    if world > 1:
        dist.barrier()
    return final


def prune(out_dir, just_saved, keep_last, log=print):
    """Delete all but the newest `keep_last` checkpoints that verify. `just_saved` is always
    kept, whatever keep_last says; a checkpoint that does not verify is not counted and not
    deleted (it is logged). Housekeeping: a failure to delete is logged, not fatal."""
    kept = 1  # just_saved
    for path in list_checkpoints(out_dir):
        if path == Path(just_saved):
            continue
        try:
            verify(path, trust_hashed=True)
        except CheckpointError as e:
            log(f"checkpoint: WARNING: {path.name} does not verify, not counted as one of the "
                f"{keep_last} kept: {e}")
            continue
        if kept < keep_last:
            kept += 1
            continue
        try:
            shutil.rmtree(path)
        except OSError as e:
            log(f"checkpoint: could not delete old {path}: {e}")


# -----------------------------------------------------------------------------
# Verify and load


def verify(path, *, trust_hashed=False):
    """Check the manifest of checkpoint `path`; return it, or raise CheckpointError saying why.

    trust_hashed: skip the sha256 of files this process has already hashed in full (written or
    verified, manifest unchanged since); every file's presence and size are checked anyway."""
    path = Path(path)
    try:
        stamp = _manifest_stamp(path)
        with open(path / MANIFEST) as f:
            manifest = json.load(f)
        files = manifest["files"]
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no {MANIFEST} (the save did not finish)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable {MANIFEST} ({e})") from None
    hash_files = not (trust_hashed and _hashed.get(str(path)) == stamp)
    for name, expected in sorted(files.items()):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        size = file.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{path}: {name} is truncated or altered: {size} bytes, "
                                  f"the manifest says {expected['bytes']}")
        if hash_files and _sha256(file) != expected["sha256"]:
            raise CheckpointError(f"{path}: {name} is corrupted: its sha256 differs from the "
                                  f"manifest")
    if hash_files:
        _hashed[str(path)] = stamp
    return manifest


def saved_bytes(path):
    """The bytes checkpoint `path` holds, as its manifest lists them (all but the manifest)."""
    with open(Path(path) / MANIFEST) as f:
        return sum(entry["bytes"] for entry in json.load(f)["files"].values())


def read_train_state(path):
    """The train_state.json of a verified checkpoint: step, tokens seen, the run's config."""
    with open(Path(path) / TRAIN_STATE) as f:
        return json.load(f)


def find_latest_valid(out_dir, log=print):
    """The newest checkpoint in out_dir that verifies, or None. Logs every one it skips."""
    for path in list_checkpoints(out_dir):
        try:
            verify(path)
            return path
        except CheckpointError as e:
            log(f"checkpoint: WARNING: skipping {path.name}: {e}")
    return None


def load(path, model, optimizer, log=print):
    """Collective: restore model, optimizer and this rank's RNG states from a verified checkpoint
    (either format, any number of ranks); return its train_state dict."""
    path = Path(path)
    rank, world = _rank_world()
    with open(path / MANIFEST) as f:
        manifest = json.load(f)
    if manifest["format"] == "torch":
        # Every rank reads the full tensors; set_*_state_dict keeps each rank's shard of them.
        saved = torch.load(path / TORCH_FILE, map_location="cpu", mmap=True, weights_only=True)
        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(model, saved["model"], options=full)
        set_optimizer_state_dict(model, optimizer, saved["optimizer"], options=full)
    elif manifest["format"] == "dcp":
        # Load into state dicts shaped like this run's (sharded or not): DCP reshards as needed.
        state = {"model": get_model_state_dict(model),
                 "optimizer": get_optimizer_state_dict(model, optimizer)}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, optimizer, state["optimizer"])
    else:
        raise CheckpointError(f"{path}: unknown format {manifest['format']!r}")

    rng_file = path / f"rng_rank{rank}.pt"
    if manifest["world_size"] != world or not rng_file.exists():
        log(f"checkpoint: saved by {manifest['world_size']} ranks, resumed on {world}: "
            f"every rank takes rank 0's RNG state (the data order does not depend on it)")
        rng_file = path / "rng_rank0.pt"
    _set_rng_state(torch.load(rng_file, weights_only=False))
    return read_train_state(path)


def _resolve(ckpt_path):
    """A checkpoint directory, or out_dir (its newest valid checkpoint)."""
    path = Path(ckpt_path)
    if (path / MANIFEST).exists() or path.name.startswith(STEP_PREFIX):
        return path
    latest = find_latest_valid(path)
    if latest is None:
        raise CheckpointError(f"{ckpt_path}: no valid checkpoint found")
    return latest


def load_model_weights(ckpt_path):
    """Full, unsharded CPU tensors of a checkpoint's model, keyed by Hugging Face names.

    ckpt_path is a checkpoint directory (out/checkpoints/step_N) or an out_dir (its newest valid
    checkpoint). Works for both formats and needs no process group.
    """
    path = _resolve(ckpt_path)
    manifest = verify(path)
    if manifest["format"] == "torch":
        saved = torch.load(path / TORCH_FILE, map_location="cpu", mmap=True, weights_only=True)
        return dict(saved["model"])
    # Read only the "model" entries of the DCP checkpoint, as full tensors, in this process.
    # (_load_state_dict_from_keys is DCP's own helper for this; it is not yet public API.)
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        loaded = _load_state_dict_from_keys(keys={"model"}, checkpoint_id=str(path))
    return {name: tensor.cpu() for name, tensor in loaded["model"].items()}
