"""Sample text from a training checkpoint or a Hugging Face export.

    python sample.py --ckpt out --prompt "import os"          # the newest valid checkpoint in out/
    python sample.py --hf hf/ --prompt "import os" --temperature 0.8 --top-k 50 --num-samples 3
    python sample.py --hf hf/ --prompt "import os" --temperature 0                 # greedy

Text is tokenized with the tokenizer.json that data/prepare.py used (found through the data
directory's meta.json, or in the export directory), or as raw UTF-8 bytes when it used none.
Like nanoGPT's sample.py this recomputes the whole context for every new token (no KV cache),
and keeps only the last block_size tokens of the context. Generation stops early at the
end-of-document token when one is known.
"""

import argparse
import json
import os
import sys

import torch

from checkpoint import CheckpointError
from export_hf import (load_hf_into, model_args_from, read_checkpoint, read_hf_config,
                       read_run_config, resolve_checkpoint, tokenizer_from_data_dir)
from model import Llama


class Tokenizer:
    """tokenizers' tokenizer.json when given one, else token id = byte value."""

    def __init__(self, tokenizer_file=None, bos_token_id=None, eos_token_id=None):
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.hf_tokenizer = None
        if tokenizer_file:
            from tokenizers import Tokenizer as HFTokenizer  # only needed with a tokenizer file

            self.hf_tokenizer = HFTokenizer.from_file(tokenizer_file)

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

    With eos_token_id, stops early once every sequence has produced it, as transformers'
    generate() does (a sequence that finished first keeps going here, where transformers pads).
    """
    block_size = model.args.block_size
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
            finished |= next_token[:, 0] == eos_token_id
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
    model = Llama(model_args_from(settings, config or ckpt_dir))
    model.load_state_dict(read_checkpoint(ckpt_dir), strict=True)
    return model, settings.get("data_dir")


def load_tokenizer(hf=None, data_dir=None):
    """The export's tokenizer.json (ids from its config.json), else the data dir's, else bytes."""
    if hf:
        with open(os.path.join(hf, "config.json")) as f:
            config = json.load(f)
        tokenizer_file = os.path.join(hf, "tokenizer.json")
        return Tokenizer(tokenizer_file if os.path.exists(tokenizer_file) else None,
                         config.get("bos_token_id"), config.get("eos_token_id"))
    if data_dir:
        return Tokenizer(*tokenizer_from_data_dir(data_dir))
    return Tokenizer()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", help="a checkpoint, or out_dir for its newest valid one")
    parser.add_argument("--config", help="config/<variant>.py of the run (default: the config "
                                         "saved with the checkpoint)")
    parser.add_argument("--hf", help="a Hugging Face Llama directory written by export_hf.py")
    parser.add_argument("--data-dir", help="data/prepare.py output, for its tokenizer")
    parser.add_argument("--prompt", default="\n")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu")
    opts = parser.parse_args(argv)

    model, run_data_dir = load_model(opts.ckpt, opts.config, opts.hf)
    tokenizer = load_tokenizer(opts.hf, opts.data_dir or run_data_dir)
    device = opts.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    generator = torch.Generator(device=device).manual_seed(opts.seed)
    prompt = torch.tensor([tokenizer.encode(opts.prompt)], dtype=torch.long, device=device)
    # bf16 matmuls on CUDA (the weights stay fp32); exact fp32 on CPU.
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
    for _ in range(opts.num_samples):
        with autocast:
            out = generate(model, prompt, opts.max_new_tokens, opts.temperature, opts.top_k,
                           generator, tokenizer.eos_token_id)
        print(tokenizer.decode(out[0].tolist()))
        print("---------------")


if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError, CheckpointError) as e:  # a wrong path or config: say so briefly
        sys.exit(f"sample.py: error: {e}")
