"""Sample text from a training checkpoint or a Hugging Face export.

    python sample.py --ckpt out --prompt "import os"          # the newest valid checkpoint in out/
    python sample.py --hf hf/ --prompt "import os" --temperature 0.8 --top-k 50 --num-samples 3
    python sample.py --hf hf/ --prompt "import os" --temperature 0                 # greedy

Text is tokenized with the tokenizer.json that data/prepare.py used (found through the data
directory's meta.json, or in the export directory), or as raw UTF-8 bytes when it used none.
Like nanoGPT's sample.py this recomputes the whole context for every new token (no KV cache),
and keeps only the last block_size tokens of the context. Generation stops early at the
end-of-document token when one is known.

Every argument is checked before the model is loaded: a wrong one is refused with one line saying
what is allowed (exit status 2).
"""

import argparse
import json
import math
import os
import re
import sys

import torch

from checkpoint import CheckpointError
from export_hf import (OneLineParser, check_config_matches, check_weights, load_hf_into,
                       model_args_from, read_checkpoint, read_hf_config, read_run_config,
                       resolve_checkpoint, tokenizer_from_data_dir)
from model import Llama


class Tokenizer:
    """tokenizers' tokenizer.json when given one, else token id = byte value."""

    def __init__(self, tokenizer_file=None, bos_token_id=None, eos_token_id=None):
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.hf_tokenizer = None
        if tokenizer_file:
            from tokenizers import Tokenizer as HFTokenizer  # only needed with a tokenizer file

            try:
                self.hf_tokenizer = HFTokenizer.from_file(tokenizer_file)
            except Exception as e:  # tokenizers raises a bare Exception for a bad file
                raise ValueError(f"{tokenizer_file}: not a tokenizer.json ({e})") from None

    def encode(self, text):
        if self.hf_tokenizer is not None:
            ids = self.hf_tokenizer.encode(text, add_special_tokens=False).ids
        else:
            ids = list(text.encode("utf-8"))
        return ([self.bos_token_id] if self.bos_token_id is not None else []) + ids

    def decode(self, ids):
        if self.hf_tokenizer is not None:
            return self.hf_tokenizer.decode(ids)
        # Ids from 256 up (end of document, a padded vocabulary) have no text: leave them out.
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


@torch.no_grad()
def generate(model, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None,
             eos_token_id=None):
    """Append up to max_new_tokens tokens to idx (B, T). temperature 0 is greedy (argmax).

    With eos_token_id (an id, or a list of them as some config.json files hold), stops early
    once every sequence has produced one, as transformers' generate() does (a sequence that
    finished first keeps going here, where transformers pads).
    """
    block_size = model.args.block_size
    if eos_token_id is not None:
        eos_ids = torch.tensor(eos_token_id, device=idx.device).reshape(-1)
    finished = torch.zeros(idx.size(0), dtype=torch.bool, device=idx.device)
    for _ in range(max_new_tokens):
        context = idx[:, -block_size:]
        logits, _ = model(context)
        logits = logits[:, -1, :].float()
        if temperature == 0:
            next_token = logits.argmax(dim=-1, keepdim=True)
        else:
            logits = logits / temperature
            if top_k is not None:
                kth_largest = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                logits = logits.masked_fill(logits < kth_largest, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            next_token = torch.multinomial(probs, num_samples=1, generator=generator)
        idx = torch.cat((idx, next_token), dim=1)
        if eos_token_id is not None:
            finished |= torch.isin(next_token[:, 0], eos_ids)
            if finished.all():
                break
    return idx


def load_model(ckpt=None, config=None, hf=None):
    """(model, the run's data_dir or None) from a checkpoint (with its saved config, or `config`),
    or from a Hugging Face export."""
    if hf:
        model = Llama(read_hf_config(hf))
        load_hf_into(model, hf)
        return model, None
    if not ckpt:
        raise ValueError("give --ckpt (a checkpoint or out_dir) or --hf (an export directory)")
    ckpt_dir = resolve_checkpoint(ckpt)
    settings = read_run_config(ckpt_dir, config)
    args = model_args_from(settings, f"--config {config}" if config else ckpt_dir)
    if config:
        check_config_matches(args, ckpt_dir, config)
    state_dict = read_checkpoint(ckpt_dir)
    check_weights(args, state_dict, ckpt_dir)  # a ValueError naming tensors, not a traceback
    model = Llama(args)
    model.load_state_dict(state_dict, strict=True)
    return model, settings.get("data_dir")


def load_tokenizer(hf=None, data_dir=None):
    """The export's tokenizer.json (ids from its config.json), else the data dir's, else bytes."""
    if hf:
        with open(os.path.join(hf, "config.json")) as f:
            config = json.load(f)  # read_hf_config has checked it
        ids = [config.get("bos_token_id"), config.get("eos_token_id")]
        for key, value in zip(("bos_token_id", "eos_token_id"), ids):
            values = value if isinstance(value, list) and key == "eos_token_id" else [value]
            if not all(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0)
                       for v in values):
                raise ValueError(f"{os.path.join(hf, 'config.json')}: {key} is {value!r}; it "
                                 f"must be an integer >= 0 or null")
        tokenizer_file = os.path.join(hf, "tokenizer.json")
        return Tokenizer(tokenizer_file if os.path.exists(tokenizer_file) else None, *ids)
    if data_dir:
        return Tokenizer(*tokenizer_from_data_dir(data_dir))
    return Tokenizer()


# ---------------------------------------------------------------------------------------------
# Arguments: each type checks its range, so a wrong value is one line before anything loads


def positive_int_argument(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; give an integer >= 1")
    return value


def temperature_argument(text):
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; give a number >= 0 "
                                         f"(0 = greedy)")
    return value


def seed_argument(text):
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**64:  # what torch.Generator.manual_seed takes
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; give an integer from 0 to "
                                         f"2**64 - 1")
    return value


def device_argument(text):
    """auto, cpu, cuda or cuda:N, refused when this machine does not have it."""
    if text == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if text == "cpu":
        return text
    if not re.fullmatch(r"cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; give auto, cpu, cuda or "
                                         f"cuda:N")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA device (or this "
                                         f"PyTorch has no CUDA); use --device cpu or auto")
    if ":" in text and int(text.split(":")[1]) >= count:
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s), "
                                         f"cuda:0 to cuda:{count - 1}")
    return text


def main(argv=None):
    """The command line; returns the exit status: 2, with one line on stderr, for what is wrong
    with the arguments, the checkpoint, the config or the export."""
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", help="a checkpoint, or out_dir for its newest valid one")
    parser.add_argument("--config", help="config/<variant>.py of the run (default: the config "
                                         "saved with the checkpoint); with --ckpt only")
    parser.add_argument("--hf", help="a Hugging Face Llama directory written by export_hf.py")
    parser.add_argument("--data-dir", help="data/prepare.py output, for its tokenizer")
    parser.add_argument("--prompt", default="\n",
                        help="text to continue; it must give at least one token (default: a "
                             "newline)")
    parser.add_argument("--max-new-tokens", type=positive_int_argument, default=200,
                        help="tokens to generate, >= 1")
    parser.add_argument("--temperature", type=temperature_argument, default=0.8,
                        help="softmax temperature, >= 0; 0 means greedy (always the most likely "
                             "token, --top-k and --seed then play no part)")
    parser.add_argument("--top-k", type=positive_int_argument, default=None,
                        help="sample only among the k most likely tokens, k >= 1 (default: all)")
    parser.add_argument("--num-samples", type=positive_int_argument, default=1,
                        help="samples, >= 1")
    parser.add_argument("--seed", type=seed_argument, default=1337, help="0 to 2**64 - 1")
    parser.add_argument("--device", type=device_argument, default="auto",
                        help="auto (cuda when there is one), cpu, cuda or cuda:N")
    opts = parser.parse_args(argv)
    if bool(opts.ckpt) == bool(opts.hf):
        parser.error("give one of --ckpt (a checkpoint or out_dir) or --hf (an export directory)")
    if opts.config and opts.hf:
        parser.error("argument --config: only with --ckpt; an --hf directory has its config.json")
    if opts.data_dir and opts.hf:
        parser.error("argument --data-dir: only with --ckpt; an --hf directory has its tokenizer")
    try:
        opts.prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes that are not UTF-8 in the command line
        parser.error(f"argument --prompt: {opts.prompt!r} is not valid UTF-8 text")
    if opts.hf and not os.path.isfile(os.path.join(opts.hf, "config.json")):
        parser.error(f"argument --hf: {opts.hf!r} holds no config.json; give the directory "
                     f"export_hf.py --out wrote")
    if opts.data_dir and not os.path.isfile(os.path.join(opts.data_dir, "meta.json")):
        parser.error(f"argument --data-dir: {opts.data_dir!r} holds no meta.json; give the "
                     f"directory data/prepare.py wrote")
    try:
        run_sampling(opts, parser)
    except (OSError, ValueError, CheckpointError) as e:  # a wrong path or config: say so briefly
        print(f"sample.py: error: {e}", file=sys.stderr)
        return 2
    return 0


def run_sampling(opts, parser):
    """What the command line does, once its arguments are checked."""
    model, run_data_dir = load_model(opts.ckpt, opts.config, opts.hf)
    tokenizer = load_tokenizer(opts.hf, opts.data_dir or run_data_dir)
    prompt_ids = tokenizer.encode(opts.prompt)
    if not prompt_ids:
        parser.error(f"argument --prompt: {opts.prompt!r} gives no tokens (and this model has no "
                     f"begin-of-text token); give at least one character")
    if max(prompt_ids) >= model.args.vocab_size:
        raise ValueError(f"the prompt has token id {max(prompt_ids)}, but the model's vocabulary "
                         f"has {model.args.vocab_size}: this is not the tokenizer it was trained "
                         f"with; give the run's --data-dir")
    model.to(opts.device).eval()
    generator = torch.Generator(device=opts.device).manual_seed(opts.seed)
    prompt = torch.tensor([prompt_ids], dtype=torch.long, device=opts.device)
    # bf16 matmuls on CUDA (the weights stay fp32); exact fp32 on CPU.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16,
                              enabled=opts.device.startswith("cuda"))
    for _ in range(opts.num_samples):
        with autocast:
            out = generate(model, prompt, opts.max_new_tokens, opts.temperature, opts.top_k,
                           generator, tokenizer.eos_token_id)
        print(tokenizer.decode(out[0].tolist()))
        print("---------------")


if __name__ == "__main__":
    sys.exit(main())
