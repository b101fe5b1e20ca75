"""Export a training checkpoint as a Hugging Face Llama directory, and load one back.

    python export_hf.py --ckpt out --out hf/            # the newest valid checkpoint in out/
    python export_hf.py --ckpt out/checkpoints/step_00001000 --out hf/ --dtype bfloat16 \\
        --shard-size 5GB --config config/<variant>.py

The model's shape comes from the config train.py saved with the checkpoint, or from --config.

The directory holds config.json (a LlamaConfig), generation_config.json, the weights as safetensors
(model.safetensors, or model-0000k-of-0000n.safetensors shards plus model.safetensors.index.json
when they exceed --shard-size) and, when data/prepare.py used a tokenizer.json, that tokenizer.
transformers then loads it like any Llama:

    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("hf/")

model.py already uses transformers' parameter names and RoPE layout, so no tensor is renamed or
permuted here. The weights are written one tensor at a time (a safetensors file is a JSON header of
names, dtypes, shapes and byte offsets followed by the raw bytes), so exporting holds no second
copy of the model; the same bytes come out for the same weights, with no timestamps or versions.

The reverse, load_hf_into(model, hf_dir), is what train.py's init_from_hf uses to start from a
Hugging Face Llama (continued pre-training); it refuses a directory whose shapes differ from the
config, naming every field that differs.
"""

import argparse
import ctypes
import json
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
WRITE_CHUNK_ELEMENTS = 1 << 24
# ModelArgs fields that fix tensor shapes: an HF directory must match these to be loaded.
SHAPE_FIELDS = ("n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "ffn_hidden", "vocab_size",
                "tie_embeddings")


# ---------------------------------------------------------------------------------------------
# Reading a training checkpoint


def resolve_checkpoint(ckpt_path):
    """A checkpoint directory: ckpt_path itself, or the newest valid one when it is an out_dir."""
    if os.path.exists(os.path.join(ckpt_path, checkpoint.MANIFEST)):
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
        return runpy.run_path(config_path)
    with open(os.path.join(ckpt_dir, checkpoint.TRAIN_STATE)) as f:
        return json.load(f)["config"]


def model_args_from(settings, source):
    """ModelArgs from a dict of run settings (config file or saved config)."""
    missing = [f.name for f in fields(ModelArgs) if f.name not in settings]
    if missing:
        raise ValueError(f"{source} does not set {', '.join(missing)}")
    return ModelArgs(**{f.name: settings[f.name] for f in fields(ModelArgs)})


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


def args_from_hf_config(config):
    """ModelArgs for an HF Llama config.json (a dict). Refuses what model.py does not implement."""
    unsupported = []
    if config.get("model_type", "llama") != "llama":
        unsupported.append(f"model_type {config['model_type']!r}")
    if config.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act {config['hidden_act']!r}")
    for flag in ("attention_bias", "mlp_bias"):
        if config.get(flag):
            unsupported.append(f"{flag} true")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        # e.g. LLaMA 3.1's "llama3" frequency scaling: ignoring it would silently change the model.
        unsupported.append(f"RoPE scaling {rope_type!r}")
    if unsupported:
        raise ValueError("this Llama uses what model.py does not implement: "
                         + ", ".join(unsupported))
    n_embd, n_head = config["hidden_size"], config["num_attention_heads"]
    return ModelArgs(
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
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        init_std=float(config.get("initializer_range", 0.02)),
    )


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


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
    """(the header's tensor entries, file offset of the first data byte) of a safetensors file."""
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
    header.pop("__metadata__", None)
    return header, 8 + header_len


def iter_safetensors(path):
    """(name, CPU tensor) for each tensor of a safetensors file, read one at a time."""
    header, data_start = read_safetensors_header(path)
    with open(path, "rb") as f:
        for name, info in header.items():
            begin, end = info["data_offsets"]
            f.seek(data_start + begin)
            raw = bytearray(f.read(end - begin))
            dtype = TORCH_DTYPES[info["dtype"]]
            yield name, (torch.frombuffer(raw, dtype=dtype).reshape(info["shape"]) if raw
                         else torch.empty(info["shape"], dtype=dtype))


def read_safetensors(path):
    """All tensors of one safetensors file, as a dict of CPU tensors."""
    return dict(iter_safetensors(path))


def parse_size(text):
    """'5GB' -> 5_000_000_000 (decimal, as transformers' max_shard_size); '200KiB' also works."""
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
             "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
    text = text.strip().upper()
    for unit, scale in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    return int(text)


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
    return the number of parameters written."""
    check_weights(args, state_dict, "the checkpoint")
    torch_dtype = EXPORT_DTYPES[dtype]
    with torch.device("meta"):
        names = list(Llama(args).state_dict())  # the model's order: embedding, layers, norm, head
    if args.tie_embeddings:
        names.remove("lm_head.weight")  # stored once; transformers ties it back on load
    shapes = [tuple(state_dict[name].shape) for name in names]
    sizes = [_nbytes(shape, torch_dtype) for shape in shapes]

    os.makedirs(out_dir, exist_ok=True)
    for stale in os.listdir(out_dir):  # files of an earlier export would shadow or mix in
        if stale.endswith(".safetensors") or stale in (INDEX_FILE, "tokenizer.json",
                                                       "tokenizer_config.json"):
            os.remove(os.path.join(out_dir, stale))
    shards = plan_shards(names, sizes, max_shard_bytes)
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        filename = (SINGLE_FILE if len(shards) == 1
                    else f"model-{k:05d}-of-{len(shards):05d}.safetensors")
        write_safetensors(os.path.join(out_dir, filename), shard,
                          [shapes[names.index(name)] for name in shard], state_dict.__getitem__,
                          torch_dtype)
        weight_map.update({name: filename for name in shard})
    if len(shards) > 1:
        write_json(os.path.join(out_dir, INDEX_FILE),
                   {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map})

    write_json(os.path.join(out_dir, "config.json"),
               hf_config(args, dtype, bos_token_id, eos_token_id))
    generation = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id,
                  "max_length": args.block_size}
    write_json(os.path.join(out_dir, "generation_config.json"), generation)
    if tokenizer_file:
        shutil.copyfile(tokenizer_file, os.path.join(out_dir, "tokenizer.json"))
        # Without this, transformers would build its LLaMA tokenizer class around the file.
        write_json(os.path.join(out_dir, "tokenizer_config.json"),
                   {"tokenizer_class": "PreTrainedTokenizerFast"})
    return sum(torch.Size(shape).numel() for shape in shapes)


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
    with open(os.path.join(hf_dir, "config.json")) as f:
        return args_from_hf_config(json.load(f))


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
    """(tokenizer.json path or None, bos id, eos id) from data/prepare.py's meta.json."""
    meta_path = os.path.join(data_dir, "meta.json")
    if not os.path.exists(meta_path):
        return None, None, None
    with open(meta_path) as f:
        meta = json.load(f)
    tokenizer = meta.get("tokenizer")
    path = None
    if isinstance(tokenizer, str) and tokenizer.endswith(".json"):
        for candidate in (tokenizer, os.path.join(data_dir, tokenizer),
                          os.path.join(data_dir, os.path.basename(tokenizer))):
            if os.path.isfile(candidate):
                path = candidate
                break
    return path, meta.get("bos_token_id"), meta.get("eos_token_id")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True,
                        help="a checkpoint (out/checkpoints/step_N), or out_dir for its newest")
    parser.add_argument("--out", required=True, help="directory to write the HF model into")
    parser.add_argument("--config", default=None,
                        help="config/<variant>.py of the run (default: the config saved with "
                             "the checkpoint)")
    parser.add_argument("--dtype", default="float32", choices=sorted(EXPORT_DTYPES),
                        help="dtype of the exported weights (float32 loses nothing)")
    parser.add_argument("--shard-size", default="5GB",
                        help="largest safetensors file before splitting (e.g. 5GB, 500MB)")
    parser.add_argument("--data-dir", default=None,
                        help="data/prepare.py output, for the tokenizer (default: data_dir)")
    opts = parser.parse_args(argv)

    ckpt_dir = resolve_checkpoint(opts.ckpt)
    settings = read_run_config(ckpt_dir, opts.config)
    args = model_args_from(settings, opts.config or f"{ckpt_dir}/{checkpoint.TRAIN_STATE}")
    data_dir = opts.data_dir or settings.get("data_dir")
    tokenizer_file, bos, eos = tokenizer_from_data_dir(data_dir) if data_dir else (None, None, None)
    state_dict = read_checkpoint(ckpt_dir)
    n_params = export(state_dict, args, opts.out, dtype=opts.dtype,
                      max_shard_bytes=parse_size(opts.shard_size), tokenizer_file=tokenizer_file,
                      bos_token_id=bos, eos_token_id=eos)
    print(f"exported {ckpt_dir}: {n_params:,} parameters ({opts.dtype}) to {opts.out}"
          + (" with tokenizer.json" if tokenizer_file else " (no tokenizer: byte-level data)"))


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError, checkpoint.CheckpointError) as e:  # say what is wrong, briefly
        sys.exit(f"export_hf.py: error: {e}")
