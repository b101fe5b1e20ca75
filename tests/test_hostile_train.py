"""train.py against hostile use (issue #14, items 2, 5, 14 and 15).

- Every setting has an allowed range (train.py's RULES and RELATIONS, checked by configurator.py):
  an override of the right type but an impossible value is one line naming the key, the value and
  the range, and exit 2, before anything is written.
- Prepared data that cannot train (a val.bin shorter than block_size + 2, an empty train.bin, a
  corrupt meta.json), a checkpoint of another shape in out_dir, and an init_from_hf directory that
  cannot be loaded are one line and exit 2 as well.
- keep_last_ckpts below 1 is refused (it would delete the checkpoint just saved), and pruning
  counts only checkpoints that verify: a truncated newest checkpoint never stands in for a good
  one, and a run always keeps a valid checkpoint.

The sweeps of values call train.py's own functions in this process (a subprocess per value would
cost seconds of `import torch` each); one case of each kind runs `python train.py` as a user does.
"""

import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from _repo_files import REPO_ROOT, load_template_module
from _train_fixtures import TINY_CONFIG, make_repo, prepare_data, run_train

configurator = load_template_module("configurator")
checkpoint = load_template_module("checkpoint")
train = load_template_module("train")
dataset = load_template_module("dataset")
model_py = load_template_module("model")
export_hf = load_template_module("export_hf")

CONFIG = "config/tiny.py"
# 6 quick steps, a checkpoint every 2, no evaluation or logging in between.
SHORT_RUN = ["--max_iters=6", "--ckpt_interval=2", "--eval_interval=100", "--eval_iters=1",
             "--log_interval=100"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    path = make_repo(tmp_path_factory.mktemp("repo"))
    prepare_data(path)
    return path


@pytest.fixture(scope="module")
def keep1_run(repo):
    """6 steps with keep_last_ckpts=1: only step 6 is left."""
    run_train(repo, CONFIG, "--out_dir=out/keep1", "--keep_last_ckpts=1", *SHORT_RUN)
    out = repo / "out/keep1"
    assert names(out) == ["step_00000006"]
    return out


def names(out_dir):
    return [p.name for p in checkpoint.list_checkpoints(out_dir)]


def snapshot(directory):
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def assert_refused(proc, *fragments):
    """Exit 2, no traceback, and exactly one error line, which holds every fragment."""
    assert proc.returncode == 2, proc.stdout
    assert "Traceback" not in proc.stdout, proc.stdout
    errors = [line for line in proc.stdout.splitlines() if "configuration error" in line]
    assert len(errors) == 1, proc.stdout
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def load(repo, *overrides):
    """The settings train.py would run with, through its own tables."""
    return configurator.load_config(train.DEFAULTS, [str(repo / CONFIG), *overrides],
                                    train.RULES, train.RELATIONS)


# -----------------------------------------------------------------------------
# Item 14: ranges of every setting


@pytest.mark.parametrize("override, fragment", [
    ("--eval_interval=0", "eval_interval must be >= 1, got 0"),
    ("--log_interval=0", "log_interval must be >= 1, got 0"),
    ("--ckpt_interval=0", "ckpt_interval must be >= 1, got 0"),
    ("--eval_iters=-1", "eval_iters must be >= 1, got -1"),
    ("--global_batch_size=0", "global_batch_size must be >= 1, got 0"),
    ("--micro_batch_size=0", "micro_batch_size must be >= 1, got 0"),
    ("--seed=-1", "seed must be >= 0, got -1"),
    ("--seed=18446744073709551616", "seed must be >= 0 and below 2**63"),
    ("--n_layer=0", "n_layer must be >= 1, got 0"),
    ("--n_layer=9223372036854775808", "below 2**63"),
    ("--n_embd=-64", "n_embd must be >= 1"),
    ("--n_head=0", "n_head must be >= 1"),
    ("--n_kv_head=0", "n_kv_head must be >= 1"),
    ("--n_kv_head=3", "n_kv_head must be a divisor of n_head (4), got 3"),
    ("--head_dim=15", "head_dim must be even and >= 2, got 15"),
    ("--ffn_hidden=0", "ffn_hidden must be >= 1"),
    ("--vocab_size=0", "vocab_size must be >= 1"),
    ("--block_size=0", "block_size must be >= 1, got 0"),
    ("--max_iters=-3", "max_iters must be >= 1, got -3"),
    ("--max_iters=0", "max_iters must be >= 1, got 0"),
    ("--learning_rate=-0.001", "learning_rate must be > 0, got -0.001"),
    ("--learning_rate=0", "learning_rate must be > 0"),
    ("--learning_rate=1e999", "learning_rate must be > 0 and finite, got inf"),
    ("--min_lr=-1", "min_lr must be >= 0"),
    ("--min_lr=0.1", "min_lr must be at most learning_rate (0.003), got 0.1"),
    ("--warmup_iters=-1", "warmup_iters must be >= 0"),
    ("--decay_frac=1.5", "decay_frac must be in [0, 1], got 1.5"),
    ("--weight_decay=-0.1", "weight_decay must be >= 0"),
    ("--beta1=1", "beta1 must be in [0, 1), got 1.0"),
    ("--beta2=-0.5", "beta2 must be in [0, 1)"),
    ("--grad_clip=-1", "grad_clip must be >= 0"),
    ("--rope_theta=0", "rope_theta must be > 0"),
    ("--norm_eps=1e999", "norm_eps must be > 0 and finite"),
    ("--init_std=-0.02", "init_std must be > 0"),
    ("--out_dir=", "out_dir must be a non-empty path, got ''"),
    ("--out_dir=   ", "out_dir must be a non-empty path"),
    ("--data_dir=", "data_dir must be a non-empty path"),
    ("--device=gpu", "device must be one of 'auto', 'cuda', 'cpu', got 'gpu'"),
    ("--device=CUDA", "device must be one of"),
    ("--dtype=fp16", "dtype must be one of 'bfloat16', 'float32'"),
    ("--parallelism=tp", "parallelism must be one of 'fsdp', 'hsdp', 'ddp'"),
    ("--lr_schedule=linear", "lr_schedule must be one of 'cosine', 'wsd'"),
    ("--keep_last_ckpts=0", "keep_last_ckpts must be >= 1, got 0"),
    ("--keep_last_ckpts=-2", "keep_last_ckpts must be >= 1, got -2"),
    ("--flops_per_token=-1", "flops_per_token must be >= 0"),
    ("--peak_flops=-1e12", "peak_flops must be >= 0"),
    ("--planned_mfu=1.5", "planned_mfu must be in [0, 1]"),
    ("--max_nonfinite_steps=0", "max_nonfinite_steps must be >= 1"),
])
def test_impossible_value_is_one_line_naming_key_value_and_range(repo, override, fragment):
    with pytest.raises(configurator.ConfigError) as e:
        load(repo, override)
    message = str(e.value)
    assert fragment in message and "\n" not in message, message
    assert message.startswith(override + ":"), message  # where the value came from


@pytest.mark.parametrize("override", [
    "--warmup_iters=0", "--grad_clip=0", "--min_lr=0", "--min_lr=0.003", "--decay_frac=0",
    "--decay_frac=1", "--seed=0", "--seed=9223372036854775807", "--planned_mfu=0",
    "--peak_flops=0", "--flops_per_token=0", "--beta1=0", "--keep_last_ckpts=1",
    "--n_kv_head=4", "--n_kv_head=1", "--head_dim=2", "--block_size=1", "--max_iters=1",
    "--device=auto", "--device=cuda", "--dtype=float32", "--parallelism=hsdp",
    "--lr_schedule=wsd", "--init_from_hf=anything",
])
def test_values_at_the_edges_of_a_range_are_accepted(repo, override):
    key, text = override[2:].split("=", 1)
    cfg = load(repo, override)
    assert str(cfg[key]) == text or cfg[key] == float(text)


def test_a_config_file_value_is_checked_and_named(repo):
    (repo / "config/bad.py").write_text((repo / CONFIG).read_text() + "n_head = 3\n")
    with pytest.raises(configurator.ConfigError, match=r"config/bad.py: n_kv_head must be a "
                                                       r"divisor of n_head \(3\), got 2"):
        configurator.load_config(train.DEFAULTS, [str(repo / "config/bad.py")], train.RULES,
                                 train.RELATIONS)


def test_every_setting_has_a_range_and_the_defaults_are_in_it():
    without = [k for k, v in train.DEFAULTS.items()
               if not isinstance(v, bool) and k not in train.RULES]
    assert not without, without
    assert not set(train.RULES) - set(train.DEFAULTS)  # no rule for a setting that is gone
    configurator.load_config(train.DEFAULTS, [], train.RULES, train.RELATIONS)
    # configurator.py refuses a setting that has no rule, so a new one cannot go unchecked
    with pytest.raises(configurator.ConfigError, match="n_new has no allowed range"):
        configurator.load_config({"n_new": 1}, [], {}, [])


def test_compiled_configs_are_in_range(tmp_path):
    """What the compiler writes for its own example spec passes train.py's checks."""
    out = tmp_path / "gen"
    proc = subprocess.run(["llama3gen", "compile", str(REPO_ROOT / "specs/tiny-cpu.yaml"), "-o",
                           str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    configs = sorted((out / "config").glob("*.py"))
    assert configs
    for path in configs:
        configurator.load_config(train.DEFAULTS, [str(path)], train.RULES, train.RELATIONS)


def test_contract_lists_an_allowed_range_for_every_key():
    contract = (REPO_ROOT / "docs/CONTRACT.md").read_text()
    table = contract.split("## config/")[1].split("## Exit status")[0]
    rows = [line for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| key")]
    assert len(rows) > 30
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 4 and cells[3], row


def run_main_here(repo, monkeypatch, *overrides):
    """train.main itself, in this process; returns the ConfigError it raised. (main installs
    SIGTERM/SIGUSR1 handlers: pytest's are put back.)"""
    monkeypatch.chdir(repo)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        with pytest.raises(configurator.ConfigError) as e:
            train.main([CONFIG, *overrides])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_is_refused(repo, monkeypatch):
    message = run_main_here(repo, monkeypatch, "--out_dir=out/cuda", "--device=cuda")
    assert "device='cuda'" in message and "--device=cpu" in message, message
    assert not (repo / "out/cuda").exists()


def test_out_dir_that_is_a_file_is_refused(repo, monkeypatch):
    (repo / "out").mkdir(exist_ok=True)
    (repo / "out/a_file").write_text("the user's\n")
    message = run_main_here(repo, monkeypatch, "--out_dir=out/a_file")
    assert message.startswith("out_dir='out/a_file': cannot create it as a directory"), message
    assert (repo / "out/a_file").read_text() == "the user's\n"
    # --dry_run says so too, without creating anything: its "every check passed" is what a run does
    for out_dir, words in (("out/a_file", "is not a directory"),
                           ("out/a_file/sub", "is not a directory")):
        message = run_main_here(repo, monkeypatch, f"--out_dir={out_dir}", "--dry_run")
        assert message.startswith(f"out_dir={out_dir!r}: ") and words in message, message
    assert (repo / "out/a_file").read_text() == "the user's\n"


# -----------------------------------------------------------------------------
# Item 15: data, checkpoints and init_from_hf that cannot be used


def damaged_data(repo, name, damage):
    """A copy of the prepared data in data/<name> with `damage(path)` applied to it."""
    path = repo / "data" / name
    shutil.copytree(repo / "data/stdlib", path)
    damage(path)
    return path


def test_val_bin_shorter_than_block_size_plus_2_is_one_line(repo):
    def short_val(path):  # 33 tokens: one fewer than block_size (32) + 2
        with open(path / "val.bin", "r+b") as f:
            f.truncate(33 * 4)
    data = damaged_data(repo, "short_val", short_val)
    proc = run_train(repo, CONFIG, "--out_dir=out/short_val", f"--data_dir={data}", check=False)
    assert_refused(proc, "val.bin has 33 tokens", "block_size + 2 = 34", "--val_fraction")
    # at block_size 31 the same file is enough
    assert len(dataset.TokenData(str(data), "val", 31).tokens) == 33


@pytest.mark.parametrize("split, size, fragment", [
    ("train", 0, "train.bin has 0 tokens"),
    ("train", 4 * 20, "train.bin has 20 tokens, fewer than block_size + 2 = 34"),
    ("val", 4 * 100 + 3, "val.bin has 403 bytes, not a whole uint32 count"),
    ("val", None, "val.bin is missing"),
])
def test_token_files_that_cannot_train(repo, tmp_path, split, size, fragment):
    shutil.copytree(repo / "data/stdlib", tmp_path / "d")
    path = tmp_path / "d" / f"{split}.bin"
    if size is None:
        path.unlink()
    else:
        with open(path, "r+b") as f:
            f.truncate(size)
    with pytest.raises(configurator.ConfigError) as e:
        dataset.TokenData(str(tmp_path / "d"), split, 32)
    assert fragment in str(e.value) and "data/prepare.py" in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("content, fragment", [
    (b"{\"vocab_size\": 257,", "is unreadable"),
    (b"\xff\xfe\x00garbage", "is unreadable"),
    (b"", "is unreadable"),
    (b"[257]", "no valid vocab_size"),
    (b'{"vocab_size": "257"}', "no valid vocab_size"),
    (b'{"vocab_size": true}', "no valid vocab_size"),
    (b'{"vocab_size": 257, "max_token_id": -1}', "no valid vocab_size"),
    (b'{"vocab_size": 257, "max_token_id": 3.5}', "no valid vocab_size"),
])
def test_corrupt_meta_json(repo, tmp_path, content, fragment):
    (tmp_path / "meta.json").write_bytes(content)
    with pytest.raises(configurator.ConfigError) as e:
        train.read_meta(str(tmp_path))
    assert fragment in str(e.value) and "data/prepare.py" in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_resuming_a_checkpoint_of_another_shape_is_refused(repo, keep1_run):
    before = snapshot(keep1_run / "checkpoints")
    proc = run_train(repo, CONFIG, f"--out_dir={keep1_run}", "--n_layer=3", "--n_head=2",
                     "--n_kv_head=1", "--head_dim=32", *SHORT_RUN, check=False)
    line = assert_refused(proc, "step_00000006 holds a model of another shape",
                          "n_layer 2 there, 3 here", "n_kv_head 2 there, 1 here",
                          "another out_dir")
    assert "n_embd" not in line  # only the keys that differ
    assert snapshot(keep1_run / "checkpoints") == before


def tiny_args(**changes):
    keys = {f.name for f in train.fields(model_py.ModelArgs)}
    return model_py.ModelArgs(**{k: v for k, v in dict(TINY_CONFIG, **changes).items()
                                 if k in keys})


def hf_dir_with(path, config=None, weights=None):
    path.mkdir()
    if config is not None:
        (path / "config.json").write_text(config if isinstance(config, str)
                                          else json.dumps(config))
    if weights is not None:
        (path / "model.safetensors").write_bytes(weights)
    return path


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p, "not a directory"),  # never created
    (lambda p: hf_dir_with(p), "config.json"),
    (lambda p: hf_dir_with(p, config="{not json"), "config.json"),
    (lambda p: hf_dir_with(p, config=[1, 2]), "cannot load it"),
    (lambda p: hf_dir_with(p, config={"model_type": "llama"}), "cannot load it"),
    (lambda p: hf_dir_with(p, config=export_hf.hf_config(tiny_args(n_layer=3), "float32")),
     "n_layer"),
    (lambda p: hf_dir_with(p, config=export_hf.hf_config(tiny_args(), "float32")),
     "model.safetensors"),  # no weights
    (lambda p: hf_dir_with(p, config=export_hf.hf_config(tiny_args(), "float32"),
                           weights=b"\x01\x02\x03"), "cannot load it"),
    (lambda p: hf_dir_with(p, config=export_hf.hf_config(tiny_args(), "float32"),
                           weights=b"\xff" * 8 + b"{}"), "cannot load it"),
])
def test_bad_init_from_hf_is_one_line(tmp_path, make, fragment):
    hf_dir = str(make(tmp_path / "hf"))
    model = model_py.Llama(tiny_args())
    with pytest.raises(configurator.ConfigError) as e:
        train.load_init_from_hf(model, hf_dir)
    message = str(e.value)
    assert message.startswith(f"init_from_hf={hf_dir!r}: ") and fragment in message, message
    assert "\n" not in message


def test_bad_init_from_hf_through_train_py(repo, tmp_path):
    hf_dir = hf_dir_with(tmp_path / "hf", config=export_hf.hf_config(tiny_args(n_embd=128),
                                                                     "float32"))
    proc = run_train(repo, CONFIG, "--out_dir=out/bad_hf", f"--init_from_hf={hf_dir}",
                     check=False)
    assert_refused(proc, f"init_from_hf='{hf_dir}'", "n_embd")


# -----------------------------------------------------------------------------
# Items 2 and 5: pruning never deletes the checkpoint just saved, and counts only valid ones


def test_keep_last_ckpts_zero_is_refused_and_writes_nothing(repo, keep1_run):
    before = snapshot(keep1_run)  # checkpoints and metrics.jsonl
    proc = run_train(repo, CONFIG, f"--out_dir={keep1_run}", "--keep_last_ckpts=0",
                     "--max_iters=8", "--ckpt_interval=2", check=False)
    assert_refused(proc, "--keep_last_ckpts=0", "keep_last_ckpts must be >= 1, got 0")
    assert snapshot(keep1_run) == before


def test_prune_keeps_the_checkpoint_just_saved_whatever_keep_last_says(keep1_run, tmp_path):
    """checkpoint.prune used directly (not through train.py): keep_last 0 or -1 still keeps the
    checkpoint just saved, and deletes the valid others."""
    for keep_last in (0, -1):
        out = tmp_path / f"keep{keep_last}"
        shutil.copytree(keep1_run, out)
        ckpts = out / "checkpoints"
        for step in (2, 4):
            shutil.copytree(ckpts / "step_00000006", ckpts / f"step_{step:08d}")
        checkpoint.prune(out, ckpts / "step_00000004", keep_last, log=lambda msg: None)
        assert names(out) == ["step_00000004"]
        checkpoint.verify(ckpts / "step_00000004")


def truncate_half(path):
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def test_a_truncated_newest_checkpoint_is_not_a_keeper(repo, keep1_run):
    """keep_last_ckpts=1 and the only checkpoint (step 6) truncated: the rerun starts from
    scratch, keeps its own valid saves, leaves the damaged one alone, and the next run resumes
    from the newest valid checkpoint."""
    out = repo / "out/damaged"
    shutil.copytree(keep1_run, out)
    damaged = out / "checkpoints/step_00000006/model_optim.pt"
    truncate_half(damaged)
    damaged_bytes = damaged.read_bytes()

    first = run_train(repo, CONFIG, f"--out_dir={out}", "--keep_last_ckpts=1", *SHORT_RUN[1:],
                      "--max_iters=4")
    assert "WARNING: skipping step_00000006" in first.stdout and "truncated" in first.stdout
    assert "resumed from" not in first.stdout  # nothing valid to resume from: step 0
    # The valid save of step 4 stays (step 2 was pruned); the damaged step 6 is neither counted
    # nor deleted.
    assert names(out) == ["step_00000006", "step_00000004"], first.stdout
    checkpoint.verify(out / "checkpoints/step_00000004")
    assert damaged.read_bytes() == damaged_bytes
    assert "step_00000006 does not verify, not counted" in first.stdout

    second = run_train(repo, CONFIG, f"--out_dir={out}", "--keep_last_ckpts=1", *SHORT_RUN)
    assert "resumed from" in second.stdout and "at step 4" in second.stdout, second.stdout
    # step 6 saved again replaces the damaged copy; it is the one checkpoint kept
    assert names(out) == ["step_00000006"]
    checkpoint.verify(out / "checkpoints/step_00000006")


def test_prune_counts_only_verified_checkpoints(keep1_run, tmp_path):
    """keep_last 2 with a bit-flipped checkpoint between two valid ones: the corrupt one is not
    one of the two kept, and is not deleted either."""
    out = tmp_path / "flip"
    shutil.copytree(keep1_run, out)
    ckpts = out / "checkpoints"
    for step in (2, 4, 8):
        shutil.copytree(ckpts / "step_00000006", ckpts / f"step_{step:08d}")
    data = ckpts / "step_00000006/model_optim.pt"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    logged = []
    checkpoint.prune(out, ckpts / "step_00000008", 2, log=logged.append)
    assert names(out) == ["step_00000008", "step_00000006", "step_00000004"]
    assert any("step_00000006 does not verify" in line for line in logged), logged
