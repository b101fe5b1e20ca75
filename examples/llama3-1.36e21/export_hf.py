"""Export a training checkpoint as a Hugging Face Llama directory, and load one back.

    python export_hf.py --ckpt out --out hf/            # the newest valid checkpoint in out/
    python export_hf.py --ckpt out/checkpoints/step_00001000 --out hf/ --dtype bfloat16 \\
        --shard-size 5GB --config config/<variant>.py

The model's shape comes from the config train.py saved with the checkpoint, or from --config.

The directory holds config.json (a LlamaConfig), generation_config.json, the weights as safetensors
(model.safetensors, or model-0000k-of-0000n.safetensors shards plus model.safetensors.index.json
when they exceed --shard-size), when data/prepare.py used a tokenizer.json, that tokenizer, and
export_hf_manifest.json: the size and sha256 of every file this script wrote. transformers then
loads it like any Llama:

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("hf/")

model.py already uses transformers' parameter names and RoPE layout, so no tensor is renamed or
permuted here. The weights are written one tensor at a time (a safetensors file is a JSON header of
names, dtypes, shapes and byte offsets followed by the raw bytes), so exporting holds no second
copy of the model; the same bytes come out for the same weights, with no timestamps or versions.

--out must be new, empty, or an earlier export of this script whose files are unchanged (its
manifest says which they are); anything else is refused and left as it is. The export is written
into a hidden sibling directory and renamed into place, so --out holds either the old export or
the whole new one, never a mix or a half-written file. Two exports into one --out at a time (two
jobs, two terminals) would replace each other's files: the second is refused while the first
holds the lock file .<out>.export.lock beside --out (removed when it ends).

The reverse, load_hf_into(model, hf_dir), is what train.py's init_from_hf uses to start from a
Hugging Face Llama (continued pre-training); it refuses a directory whose shapes differ from the
config, naming every field that differs.
"""

import argparse
import contextlib
import ctypes
import fcntl
import json
import math
import os
import runpy
import shutil
import struct
import sys
from dataclasses import fields

import torch

import checkpoint
from model import Llama, ModelArgs

# safetensors dtype names; the format stores little-endian values.
SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
}
TORCH_DTYPES = {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
EXPORT_MANIFEST = "export_hf_manifest.json"  # what an export wrote: only those files are replaced
WRITE_CHUNK_ELEMENTS = 1 << 24
# ModelArgs fields that fix tensor shapes: an HF directory must match these to be loaded.
SHAPE_FIELDS = ("n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "ffn_hidden", "vocab_size",
                "tie_embeddings")


# ---------------------------------------------------------------------------------------------
# Reading a training checkpoint


def resolve_checkpoint(ckpt_path):
    """A verified checkpoint directory: ckpt_path itself, or the newest valid one in an out_dir."""
    if os.path.exists(os.path.join(ckpt_path, checkpoint.MANIFEST)):
        checkpoint.verify(ckpt_path)  # before anything reads its train_state.json
        return str(ckpt_path)
    latest = checkpoint.find_latest_valid(ckpt_path)
    if latest is None:
        raise FileNotFoundError(f"{ckpt_path}: not a checkpoint, and holds no valid checkpoint")
    return str(latest)


def read_checkpoint(ckpt_dir):
    """Full, unsharded CPU tensors of a training checkpoint, keyed by HF parameter names.

    Single-process, DDP and FSDP2 (sharded) checkpoints all read the same way.
    """
    return checkpoint.load_model_weights(ckpt_dir)


def read_run_config(ckpt_dir=None, config_path=None):
    """The run's settings: those of config_path (a config/<variant>.py) when given, else the
    ones train.py saved with the checkpoint."""
    if config_path:
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"--config {config_path}: no such file")
        try:
            return runpy.run_path(config_path)
        except Exception as e:  # a config is Python: any error in it is the config's
            raise ValueError(f"--config {config_path}: running it failed: "
                             f"{type(e).__name__}: {e}") from None
    path = os.path.join(ckpt_dir, checkpoint.TRAIN_STATE)
    with open(path) as f:
        state = json.load(f)
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        raise ValueError(f"{path} holds no run config; give the run's --config")
    return state["config"]


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value):
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def model_args_from(settings, source):
    """ModelArgs from a dict of run settings (config file or saved config), each value checked."""
    missing = [f.name for f in fields(ModelArgs) if f.name not in settings]
    if missing:
        raise ValueError(f"{source} does not set {', '.join(missing)}")
    values = {f.name: settings[f.name] for f in fields(ModelArgs)}
    for name, value in values.items():
        if name == "tie_embeddings":
            ok, allowed = isinstance(value, bool), "True or False"
        elif name == "init_std":
            ok, allowed = _is_number(value) and value >= 0, "a number >= 0"
        elif name in ("rope_theta", "norm_eps"):
            ok, allowed = _is_number(value) and value > 0, "a number > 0"
        else:
            ok, allowed = _is_int(value) and value > 0, "an integer > 0"
        if not ok:
            raise ValueError(f"{source}: {name} = {value!r}; it must be {allowed}")
    if values["n_head"] % values["n_kv_head"]:
        raise ValueError(f"{source}: n_head = {values['n_head']} is not a multiple of "
                         f"n_kv_head = {values['n_kv_head']}")
    return ModelArgs(**values)


def check_config_matches(args, ckpt_dir, config_path):
    """Refuse a --config whose model shape is not the checkpoint's, naming each field that
    differs (the checkpoint's own saved config says what it was trained with)."""
    try:
        saved = read_run_config(ckpt_dir)
    except (OSError, ValueError):
        return  # an older checkpoint without its config: check_weights still compares shapes
    differs = [f"{name} = {getattr(args, name)!r} (the checkpoint has {saved[name]!r})"
               for name in SHAPE_FIELDS if name in saved and saved[name] != getattr(args, name)]
    if differs:
        raise ValueError(f"--config {config_path} does not match checkpoint {ckpt_dir}: "
                         + ", ".join(differs) + "; give that run's own config, or leave "
                         "--config out to use the one saved with the checkpoint")


def check_weights(args, state_dict, source):
    """Raise ValueError naming every missing, unexpected or mis-shaped tensor of `state_dict`."""
    with torch.device("meta"):
        expected = {name: tuple(t.shape) for name, t in Llama(args).state_dict().items()}
    if args.tie_embeddings and "lm_head.weight" not in state_dict:
        expected.pop("lm_head.weight")  # HF stores a tied head once, as the embedding
    problems = [f"missing {name} {shape}" for name, shape in expected.items()
                if name not in state_dict]
    problems += [f"unexpected {name}" for name in state_dict if name not in expected]
    problems += [f"{name}: shape {tuple(state_dict[name].shape)}, the config needs {shape}"
                 for name, shape in expected.items()
                 if name in state_dict and tuple(state_dict[name].shape) != shape]
    if problems:
        raise ValueError(f"{source} does not match the model config:\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------------------------------------
# config.json, both ways


def hf_config(args, dtype_name, bos_token_id=None, eos_token_id=None):
    """LlamaConfig fields (as config.json holds them) for a model of shape `args`."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args.vocab_size,
        "hidden_size": args.n_embd,
        "num_hidden_layers": args.n_layer,
        "num_attention_heads": args.n_head,
        "num_key_value_heads": args.n_kv_head,
        "head_dim": args.head_dim,
        "intermediate_size": args.ffn_hidden,
        "hidden_act": "silu",
        "max_position_embeddings": args.block_size,
        "rms_norm_eps": args.norm_eps,
        # transformers 4.x reads rope_theta and rope_scaling; 5.x reads rope_parameters.
        "rope_theta": args.rope_theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "tie_word_embeddings": args.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": args.init_std,
        "pretraining_tp": 1,
        "use_cache": True,
        # Unknown ids are written as null: LlamaConfig's defaults (1 and 2) are some other vocab's.
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "torch_dtype": dtype_name,  # transformers 4.x
        "dtype": dtype_name,  # transformers 5.x
    }


# config.json keys a Llama must set (the others have LlamaConfig's defaults), and their kind
HF_REQUIRED = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
               "vocab_size", "max_position_embeddings", "rms_norm_eps")
HF_POSITIVE_INTS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
                    "vocab_size", "max_position_embeddings", "num_key_value_heads", "head_dim")
HF_POSITIVE_NUMBERS = ("rms_norm_eps", "rope_theta")


def args_from_hf_config(config, source="config.json"):
    """ModelArgs for an HF Llama config.json (a dict). Refuses what model.py does not implement,
    and a config that lacks a key or holds a value no Llama has."""
    if not isinstance(config, dict):
        raise ValueError(f"{source} holds a {type(config).__name__}, not a JSON object")
    missing = [key for key in HF_REQUIRED if key not in config]
    if missing:
        raise ValueError(f"{source} lacks {', '.join(missing)}, which a Llama config.json sets")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ValueError(f"{source}: rope_parameters/rope_scaling is {rope!r}, not an object")
    checks = [(key, config.get(key), _is_int, "an integer > 0") for key in HF_POSITIVE_INTS]
    checks += [(key, config.get(key), _is_number, "a number > 0") for key in HF_POSITIVE_NUMBERS]
    checks.append(("rope_theta", rope.get("rope_theta"), _is_number, "a number > 0"))
    for key, value, kind, allowed in checks:
        if value is not None and not (kind(value) and value > 0):
            raise ValueError(f"{source}: {key} is {value!r}; it must be {allowed}")

    unsupported = []
    if config.get("model_type", "llama") != "llama":
        unsupported.append(f"model_type {config['model_type']!r}")
    if config.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act {config['hidden_act']!r}")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            unsupported.append(f"{flag} true")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        # e.g. LLaMA 3.1's "llama3" frequency scaling: ignoring it would silently change the model.
        unsupported.append(f"RoPE scaling {rope_type!r}")
    if unsupported:
        raise ValueError(f"{source}: this Llama uses what model.py does not implement: "
                         + ", ".join(unsupported))
    n_embd, n_head = config["hidden_size"], config["num_attention_heads"]
    settings = dict(
        n_layer=config["num_hidden_layers"],
        n_embd=n_embd,
        n_head=n_head,
        n_kv_head=config.get("num_key_value_heads") or n_head,
        head_dim=config.get("head_dim") or n_embd // n_head,
        ffn_hidden=config["intermediate_size"],
        vocab_size=config["vocab_size"],
        block_size=config["max_position_embeddings"],
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        norm_eps=float(config["rms_norm_eps"]),
        tie_embeddings=config.get("tie_word_embeddings", False),
        init_std=config.get("initializer_range", 0.02),
    )
    return model_args_from(settings, source)  # every value's type, heads that do not divide


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


# ---------------------------------------------------------------------------------------------
# safetensors, written and read one tensor at a time
# Format (https://github.com/huggingface/safetensors): 8 bytes little-endian header length, the
# JSON header {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
# then the tensors' bytes back to back, offsets counted from the end of the header.


def _nbytes(shape, dtype):
    return torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()


def write_safetensors(path, names, shapes, get_tensor, dtype):
    """Write tensors `names` (shapes known up front) to `path`, fetched and cast one at a time."""
    assert sys.byteorder == "little", "safetensors stores little-endian values"
    header, offset = {}, 0
    for name, shape in zip(names, shapes):
        size = _nbytes(shape, dtype)
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}  # transformers checks this key
    header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # pad so the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for name in names:
            flat = get_tensor(name).detach().to("cpu", dtype).contiguous().reshape(-1)
            # The raw bytes of each chunk, read straight from memory (torch-only; no numpy), in
            # chunks so that a large embedding is never copied whole.
            for chunk in flat.split(WRITE_CHUNK_ELEMENTS):
                f.write(ctypes.string_at(chunk.data_ptr(), chunk.numel() * chunk.element_size()))


def read_safetensors_header(path):
    """(the header's tensor entries, file offset of the first data byte) of a safetensors file;
    ValueError naming the file when it is not one."""
    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(min(header_len, 100 << 20)))  # the format's own limit
            data_bytes = os.fstat(f.fileno()).st_size - 8 - header_len
        header.pop("__metadata__", None)
        for name, info in header.items():
            begin, end = info["data_offsets"]
            dtype = TORCH_DTYPES.get(info["dtype"])
            if dtype is None or end - begin != _nbytes(info["shape"], dtype):
                raise ValueError(f"tensor {name}: dtype {info['dtype']}, shape {info['shape']}, "
                                 f"offsets {begin}..{end} do not agree")
            if end > data_bytes:
                raise ValueError(f"truncated: tensor {name} ends past the end of the file")
    except (struct.error, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a safetensors file this script reads ({e})") from None
    return header, 8 + header_len


def iter_safetensors(path):
    """(name, CPU tensor) for each tensor of a safetensors file, read one at a time."""
    header, data_start = read_safetensors_header(path)
    with open(path, "rb") as f:
        for name, info in header.items():
            begin, end = info["data_offsets"]
            f.seek(data_start + begin)
            raw = bytearray(f.read(end - begin))
            if len(raw) != end - begin:
                raise ValueError(f"{path}: truncated: tensor {name} ends past the end of the file")
            dtype = TORCH_DTYPES[info["dtype"]]
            yield name, (torch.frombuffer(raw, dtype=dtype).reshape(info["shape"]) if raw
                         else torch.empty(info["shape"], dtype=dtype))


def read_safetensors(path):
    """All tensors of one safetensors file, as a dict of CPU tensors."""
    return dict(iter_safetensors(path))


def parse_size(text):
    """'5GB' -> 5_000_000_000 (decimal, as transformers' max_shard_size); '200KiB' also works.
    ValueError for anything but a finite size of at least one byte."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    number, scale = text.strip().upper(), 1
    for unit, unit_scale in units.items():
        if number.endswith(unit):
            number, scale = number[: -len(unit)], unit_scale
            break
    try:
        size = float(number) * scale
    except ValueError:
        size = math.nan
    if not (math.isfinite(size) and size >= 1):  # inf, nan, 0, negative, not a number
        raise ValueError(f"{text!r} is not a size: give a number of bytes >= 1 with an optional "
                         f"unit (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 5GB or 500MB")
    return int(size)


def plan_shards(names, sizes, max_shard_bytes):
    """Split tensors, in order, into consecutive groups of at most max_shard_bytes each.

    A tensor larger than the limit gets a shard of its own (transformers does the same).
    """
    shards, current, current_bytes = [], [], 0
    for name, size in zip(names, sizes):
        if current and current_bytes + size > max_shard_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(name)
        current_bytes += size
    return shards + [current]


# ---------------------------------------------------------------------------------------------
# Export and import


def export(state_dict, args, out_dir, dtype="float32", max_shard_bytes=5 * 10**9,
           tokenizer_file=None, bos_token_id=None, eos_token_id=None):
    """Write `state_dict` (HF names, any dtype/device) as an HF Llama directory `out_dir`;
    return the number of parameters written.

    out_dir must be absent, empty, or an unchanged earlier export (see earlier_export); the new
    export is written aside and renamed into place, so a failure leaves out_dir as it was.
    """
    check_weights(args, state_dict, "the checkpoint")
    torch_dtype = EXPORT_DTYPES[dtype]
    if not max_shard_bytes >= 1:
        raise ValueError(f"max_shard_bytes = {max_shard_bytes!r}; it must be at least 1")
    with torch.device("meta"):
        names = list(Llama(args).state_dict())  # the model's order: embedding, layers, norm, head
    if args.tie_embeddings:
        names.remove("lm_head.weight")  # stored once; transformers ties it back on load
    shapes = [tuple(state_dict[name].shape) for name in names]
    sizes = [_nbytes(shape, torch_dtype) for shape in shapes]

    out_dir = os.path.abspath(out_dir)
    with exporting_into(out_dir):
        earlier = earlier_export(out_dir)  # before anything is written: refuse early
        staging = make_staging_dir(out_dir)
        try:
            write_export_files(staging, state_dict, args, names, shapes, sizes, dtype,
                               max_shard_bytes, tokenizer_file, bos_token_id, eos_token_id)
        except BaseException as e:  # a failure or Ctrl-C: out_dir is as it was; drop the staging
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(e, OSError):
                raise OSError(f"writing the export failed, so {out_dir} was not changed: {e}") \
                    from None
            raise
        try:
            publish(staging, out_dir, earlier)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return sum(torch.Size(shape).numel() for shape in shapes)


@contextlib.contextmanager
def exporting_into(out_dir):
    """Hold the lock of exports into out_dir: the file .<name>.export.lock beside it, flock'ed,
    removed (while still held) when the export ends. ValueError while another process holds it.
    A lock taken on a file its holder has just removed is no lock: take the new one instead."""
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    path = os.path.join(parent, f".{name}.export.lock")
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ValueError(f"another export_hf.py is writing --out {out_dir} (it holds {path}); "
                             f"wait for it to finish, or export into another directory") from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    try:
        yield
    finally:
        os.unlink(path)
        os.close(fd)


def write_export_files(directory, state_dict, args, names, shapes, sizes, dtype, max_shard_bytes,
                       tokenizer_file, bos_token_id, eos_token_id):
    """The files of an export, and its manifest, into `directory`."""
    torch_dtype = EXPORT_DTYPES[dtype]
    shards = plan_shards(names, sizes, max_shard_bytes)
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        filename = (SINGLE_FILE if len(shards) == 1
                    else f"model-{k:05d}-of-{len(shards):05d}.safetensors")
        write_safetensors(os.path.join(directory, filename), shard,
                          [shapes[names.index(name)] for name in shard], state_dict.__getitem__,
                          torch_dtype)
        weight_map.update({name: filename for name in shard})
    if len(shards) > 1:
        write_json(os.path.join(directory, INDEX_FILE),
                   {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map})

    write_json(os.path.join(directory, "config.json"),
               hf_config(args, dtype, bos_token_id, eos_token_id))
    generation = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
                  "max_length": args.block_size}
    write_json(os.path.join(directory, "generation_config.json"), generation)
    if tokenizer_file:
        shutil.copyfile(tokenizer_file, os.path.join(directory, "tokenizer.json"))
        # Without this, transformers would build its LLaMA tokenizer class around the file.
        write_json(os.path.join(directory, "tokenizer_config.json"),
                   {"tokenizer_class": "PreTrainedTokenizerFast"})
    write_export_manifest(directory)


# ---------------------------------------------------------------------------------------------
# The export directory: only an earlier export's own files are ever replaced


def _file_record(path):
    return {"bytes": os.path.getsize(path), "sha256": checkpoint._sha256(path)}


def write_export_manifest(directory):
    """export_hf_manifest.json: the size and sha256 of every file in `directory`, each synced to
    disk first (so that the rename publishes only bytes that are really there)."""
    files = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        files[name] = _file_record(path)
    write_json(os.path.join(directory, EXPORT_MANIFEST),
               {"written_by": "export_hf.py", "files": files})
    checkpoint._fsync_dir(directory)


def _read_export_manifest(out_dir):
    """The {name: record} of out_dir's export manifest, or None when it has none (or a bad one)."""
    try:
        with open(os.path.join(out_dir, EXPORT_MANIFEST)) as f:
            files = json.load(f)["files"]
        # Plain names only: a manifest must never point outside its directory.
        if isinstance(files, dict) and all(isinstance(name, str) and name == os.path.basename(name)
               and name not in ("", ".", "..", EXPORT_MANIFEST) for name in files):
            return files
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def earlier_export(out_dir):
    """The file names of the earlier export in out_dir, to be replaced; None when out_dir is
    absent or empty. ValueError for anything else: nothing in it is ever deleted or replaced
    unless this script wrote it and it is unchanged since."""
    if os.path.islink(out_dir):
        raise ValueError(f"--out {out_dir} is a symbolic link; give the directory itself "
                         f"({os.path.realpath(out_dir)}) or a new one")
    if not os.path.lexists(out_dir):
        return None
    if not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir} exists and is not a directory")
    cwd = os.getcwd()
    if os.path.commonpath([cwd, os.path.realpath(out_dir)]) == os.path.realpath(out_dir):
        raise ValueError(f"--out {out_dir} is the current directory or holds it; "
                         f"give a new directory, e.g. hf/")
    entries = sorted(os.listdir(out_dir))
    if not entries:
        return None
    files = _read_export_manifest(out_dir)
    if files is None:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ValueError(f"--out {out_dir} is not empty ({shown}) and is not an export of "
                         f"export_hf.py (no valid {EXPORT_MANIFEST}; an export by an older "
                         f"export_hf.py has none either); nothing was changed: give a new or "
                         f"empty directory")
    foreign = [name for name in entries if name not in files and name != EXPORT_MANIFEST]
    changed = [name for name, record in files.items()
               if os.path.islink(os.path.join(out_dir, name))
               or not os.path.isfile(os.path.join(out_dir, name))
               or _file_record(os.path.join(out_dir, name)) != record]
    if foreign or changed:
        what = ([f"not written by export_hf.py: {', '.join(foreign)}"] if foreign else []) + \
               ([f"changed or removed since the export: {', '.join(changed)}"] if changed else [])
        raise ValueError(f"--out {out_dir} is an earlier export, but it holds files "
                         f"{'; '.join(what)}; nothing was changed: move them out, or give a new "
                         f"directory")
    return sorted(files)


def make_staging_dir(out_dir):
    """A new hidden directory beside out_dir (same file system, so the final rename is atomic);
    exporting_into has made out_dir's parent."""
    parent, name = os.path.split(out_dir)
    for left in sorted(os.listdir(parent)):
        if left.startswith(f".{name}.export-"):
            print(f"note: {os.path.join(parent, left)} was left by an export that was killed "
                  f"(it never touched {out_dir}); it can be deleted")
    staging = os.path.join(parent, f".{name}.export-{os.getpid()}")
    os.mkdir(staging)  # fails rather than reuse anything already there
    return staging


def publish(staging, out_dir, earlier):
    """Rename the finished export `staging` to out_dir. An earlier export is moved aside first
    and only its own files are then deleted: out_dir is always the old export or the new one."""
    if earlier is None:
        os.rename(staging, out_dir)  # replaces an empty directory; fails on a non-empty one
    else:
        old = staging + "-old"
        os.rename(out_dir, old)
        try:
            os.rename(staging, out_dir)
        except BaseException:
            os.rename(old, out_dir)
            raise
        for name in earlier + [EXPORT_MANIFEST]:
            try:
                os.remove(os.path.join(old, name))
            except FileNotFoundError:
                pass
        try:
            os.rmdir(old)
        except OSError:  # something appeared in it meanwhile: keep it
            print(f"note: kept {old}: it holds files that export_hf.py did not write")
    checkpoint._fsync_dir(os.path.dirname(out_dir))


def hf_weight_files(hf_dir):
    """Paths of an HF directory's safetensors: one file, or the shards its index names."""
    index_path = os.path.join(hf_dir, INDEX_FILE)
    if os.path.exists(index_path):
        with open(index_path) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(hf_dir, SINGLE_FILE)):
        files = [SINGLE_FILE]
    else:
        raise FileNotFoundError(f"{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE}")
    return [os.path.join(hf_dir, filename) for filename in files]


def read_hf_weights(hf_dir):
    """Every tensor of an HF directory, as one dict of CPU tensors."""
    return {name: t for path in hf_weight_files(hf_dir) for name, t in iter_safetensors(path)}


def read_hf_config(hf_dir):
    """ModelArgs of an HF directory's config.json; ValueError naming the file when it is wrong."""
    path = os.path.join(hf_dir, "config.json")
    with open(path) as f:
        try:
            config = json.load(f)
        except ValueError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    return args_from_hf_config(config, path)


def check_hf_dir(hf_dir, args):
    """Raise ValueError naming each ModelArgs field whose value in the HF directory's config.json
    differs from `args`, or else each of its tensors that is missing or mis-shaped."""
    hf_args = read_hf_config(hf_dir)
    mismatches = [f"{name}: {hf_dir}/config.json has {getattr(hf_args, name)!r}, "
                  f"this run's config has {getattr(args, name)!r}"
                  for name in SHAPE_FIELDS if getattr(hf_args, name) != getattr(args, name)]
    if mismatches:
        raise ValueError(f"cannot initialise from {hf_dir}, its shape differs:\n  "
                         + "\n  ".join(mismatches))
    for name in ("rope_theta", "norm_eps"):  # allowed to change (e.g. a larger θ for long context)
        if getattr(hf_args, name) != getattr(args, name):
            print(f"note: {hf_dir} was trained with {name}={getattr(hf_args, name)!r}, "
                  f"continuing with {getattr(args, name)!r}")
    # Shapes from the file headers alone, as meta tensors: no weight is read for the check.
    shapes = {name: torch.empty(info["shape"], device="meta")
              for path in hf_weight_files(hf_dir)
              for name, info in read_safetensors_header(path)[0].items()}
    check_weights(args, shapes, hf_dir)


def read_hf_checkpoint(hf_dir, args):
    """An HF Llama directory's weights, checked against `args`, as a full state dict for
    Llama(args) (e.g. for torch.distributed.checkpoint.state_dict.set_model_state_dict)."""
    check_hf_dir(hf_dir, args)
    weights = read_hf_weights(hf_dir)
    if args.tie_embeddings:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    return weights


@torch.no_grad()
def load_hf_into(model, hf_dir):
    """Copy the weights of an HF Llama directory into `model`, one tensor at a time, after
    checking its config and shapes. `model` must hold real, unsharded parameters: call this
    before FSDP's fully_shard (or use read_hf_checkpoint on a sharded model)."""
    check_hf_dir(hf_dir, model.args)
    if any(p.is_meta for p in model.parameters()):
        raise ValueError("the model is on the meta device: materialise it (to_empty) first")
    params = model.state_dict()  # views of the parameters themselves: copy_ fills the model
    for path in hf_weight_files(hf_dir):
        for name, tensor in iter_safetensors(path):
            params[name].copy_(tensor)  # a tied head shares the embedding's storage
    return model


def tokenizer_from_data_dir(data_dir):
    """(tokenizer.json path or None, bos id, eos id) from data/prepare.py's meta.json; (None,
    None, None) when there is no meta.json. ValueError when meta.json names a tokenizer file that
    is not there: exporting or sampling without it would silently use the wrong tokens."""
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(meta_path):
        return None, None, None
    with open(meta_path) as f:
        try:
            meta = json.load(f)
        except ValueError as e:
            raise ValueError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: not a JSON object; re-run data/prepare.py")
    tokenizer = meta.get("tokenizer")
    path = None
    if isinstance(tokenizer, str) and tokenizer.endswith(".json"):
        for candidate in (tokenizer, os.path.join(data_dir, tokenizer),
                          os.path.join(data_dir, os.path.basename(tokenizer))):
            if os.path.isfile(candidate):
                path = candidate
                break
        else:
            raise ValueError(f"{meta_path} names tokenizer {tokenizer}, which is not there; "
                             f"put it back (or copy it into {data_dir})")
    ids = {key: meta.get(key) for key in ("bos_token_id", "eos_token_id")}
    for key, value in ids.items():
        if value is not None and not (_is_int(value) and value >= 0):
            raise ValueError(f"{meta_path}: {key} is {value!r}; it must be an integer >= 0")
    return path, ids["bos_token_id"], ids["eos_token_id"]


# ---------------------------------------------------------------------------------------------
# Command line


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a wrong argument is one line (what, the value, what is allowed), exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def size_argument(text):
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv=None):
    """The command line; returns the exit status: 2, with one line on stderr, for what is wrong
    with the arguments, the checkpoint, the config or --out."""
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True,
                        help="a checkpoint (out/checkpoints/step_N), or out_dir for its newest")
    parser.add_argument("--out", required=True,
                        help="directory to write the HF model into: new, empty, or an earlier "
                             "export of this script (only its files are replaced)")
    parser.add_argument("--config", default=None,
                        help="config/<variant>.py of the run (default: the config saved with "
                             "the checkpoint)")
    parser.add_argument("--dtype", default="float32", choices=sorted(EXPORT_DTYPES),
                        help="dtype of the exported weights (float32 loses nothing)")
    parser.add_argument("--shard-size", default=parse_size("5GB"), type=size_argument,
                        help="largest safetensors file before splitting, >= 1 byte (e.g. 5GB, "
                             "500MB, 200KiB; default 5GB)")
    parser.add_argument("--data-dir", default=None,
                        help="data/prepare.py output, for the tokenizer (default: data_dir)")
    opts = parser.parse_args(argv)
    if opts.data_dir is not None and not os.path.isfile(os.path.join(opts.data_dir, "meta.json")):
        parser.error(f"argument --data-dir: {opts.data_dir!r} holds no meta.json; give the "
                     f"directory data/prepare.py wrote")
    try:
        export_checkpoint(opts)
    except (OSError, ValueError, checkpoint.CheckpointError) as e:  # say what is wrong, briefly
        print(f"export_hf.py: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"export_hf.py: interrupted; {opts.out} is as it was", file=sys.stderr)
        return 130
    return 0


def export_checkpoint(opts):
    """What the command line does, once its arguments are checked."""
    ckpt_dir = resolve_checkpoint(opts.ckpt)
    settings = read_run_config(ckpt_dir, opts.config)
    args = model_args_from(settings, f"--config {opts.config}" if opts.config
                           else f"{ckpt_dir}/{checkpoint.TRAIN_STATE}")
    if opts.config:
        check_config_matches(args, ckpt_dir, opts.config)
    data_dir = opts.data_dir or settings.get("data_dir")
    tokenizer_file, bos, eos = tokenizer_from_data_dir(data_dir) if data_dir else (None, None, None)
    if data_dir and not os.path.isfile(os.path.join(data_dir, "meta.json")):
        print(f"note: {data_dir}/meta.json not found, so no tokenizer is exported; give "
              f"--data-dir if the run used one")
    state_dict = read_checkpoint(ckpt_dir)
    n_params = export(state_dict, args, opts.out, dtype=opts.dtype,
                      max_shard_bytes=opts.shard_size, tokenizer_file=tokenizer_file,
                      bos_token_id=bos, eos_token_id=eos)
    print(f"exported {ckpt_dir}: {n_params:,} parameters ({opts.dtype}) to {opts.out}"
          + (" with tokenizer.json" if tokenizer_file else " (no tokenizer: byte-level data)"))


if __name__ == "__main__":
    sys.exit(main())
