"""train.py sends metrics.jsonl's records to TensorBoard and Weights & Biases (issue #18 part 6).

Real CPU training runs of the tiny config, each with one tracker on; the tracker's own files are
read back (TensorBoard's EventAccumulator; the W&B offline run's .wandb log) and must hold the
very numbers metrics.jsonl holds, also across a resume and a run that fails. A run with both
off must not import either package.
"""

import json
import shutil
import struct
import subprocess
import zlib

import pytest

from _train_fixtures import (
    make_repo, prepare_data, read_metrics, run_train, subprocess_env, train_command, train_losses,
    val_losses,
)

CONFIG = "config/tiny.py"
SHORT = ("--max_iters=20", "--eval_interval=10", "--ckpt_interval=10")

# Runs train.py in this interpreter, then writes which tracker modules it imported (tests only).
IMPORTS_WRAPPER = '''import os, runpy, sys
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    with open("imported.json", "w") as f:
        f.write(repr(sorted(m for m in sys.modules
                            if m.split(".")[0] in ("wandb", "tensorboard")
                            or m.startswith("torch.utils.tensorboard"))))
'''


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    path = make_repo(tmp_path_factory.mktemp("repo"))
    prepare_data(path)
    (path / "imports.py").write_text(IMPORTS_WRAPPER)
    return path


def test_trackers_off_import_neither(repo):
    proc = subprocess.run(train_command(CONFIG, "--out_dir=out/off", "--max_iters=2",
                                        wrapper="imports.py"),
                          cwd=repo, env=subprocess_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (repo / "imported.json").read_text() == "[]"
    assert not (repo / "out/off/tensorboard").exists() and not (repo / "out/off/wandb").exists()


def tensorboard_scalars(log_dir, tag):
    """{step: value} of one scalar tag, as TensorBoard itself reads the event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every event
    events.Reload()
    points = events.Scalars(tag)
    steps = [p.step for p in points]
    assert len(steps) == len(set(steps)), f"{tag}: a step logged twice: {steps}"
    return {p.step: p.value for p in points}


def assert_same_numbers(logged, expected, what):
    """Tracker values equal metrics.jsonl's. TensorBoard stores scalars as float32, so the
    bound is float32's rounding of the value, half an ulp: 2**-24 relative."""
    assert sorted(logged) == sorted(expected), f"{what}: steps {sorted(logged)}"
    for step, value in expected.items():
        assert abs(logged[step] - value) <= 2**-24 * abs(value), (what, step, logged[step], value)


def test_tensorboard_holds_the_metrics_records_and_a_resume_replaces_the_lost_steps(repo):
    out = repo / "out/tb"
    run_train(repo, CONFIG, f"--out_dir={out.relative_to(repo)}", "--tensorboard=True", *SHORT)
    # As if the run had died just before its last checkpoint: step 20's is gone, so the resume
    # from step 10 logs steps 11-20 again; TensorBoard must show each step once (purge_step).
    shutil.rmtree(out / "checkpoints/step_00000020")
    run_train(repo, CONFIG, f"--out_dir={out.relative_to(repo)}", "--tensorboard=True", *SHORT)
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2
    expected = train_losses(out)  # the step's last record wins, as in TensorBoard
    assert sorted(expected) == list(range(1, 21))
    assert_same_numbers(tensorboard_scalars(out / "tensorboard", "loss"), expected, "loss")
    assert_same_numbers(tensorboard_scalars(out / "tensorboard", "val_loss"), val_losses(out),
                        "val_loss")
    lrs = {r["step"]: r["lr"] for r in read_metrics(out) if "lr" in r}
    assert_same_numbers(tensorboard_scalars(out / "tensorboard", "lr"), lrs, "lr")
    starts = tensorboard_scalars(out / "tensorboard", "start/world_size")
    assert starts == {0: 1.0, 10: 1.0}  # one start event per launch, at the step it began


# The .wandb file is the LevelDB log format (github.com/google/leveldb doc/log_format.md) behind a
# 7-byte W&B header, records are wandb's own protobuf Record messages. wandb 0.17+ no longer ships
# a Python reader for it (its sdk/internal/datastore.py went with the move to wandb-core), so the
# framing is read here and the records are parsed with wandb's protobuf classes.
WANDB_HEADER = struct.pack("<4sHB", b":W&B", 0xBEE1, 0)
LEVELDB_BLOCK = 32768
LEVELDB_FULL, LEVELDB_LAST = 1, 4


def wandb_records(path):
    """The Record messages of a .wandb file, in order, each checked against its CRC-32."""
    from wandb.proto import wandb_internal_pb2
    raw = path.read_bytes()
    assert raw[:7] == WANDB_HEADER, raw[:7]
    pos, pending = 7, b""
    while pos + 7 <= len(raw):
        block_left = LEVELDB_BLOCK - pos % LEVELDB_BLOCK
        crc, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if block_left < 7 or (kind == 0 and length == 0):  # zero padding to the block's end
            pos += block_left
            continue
        data = raw[pos + 7:pos + 7 + length]
        assert zlib.crc32(data, zlib.crc32(bytes([kind]))) == crc, f"bad CRC at byte {pos}"
        pos += 7 + length
        pending += data
        if kind in (LEVELDB_FULL, LEVELDB_LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def items(entries):
    """{name: value} of a history row's or a config's items (the name a key or a key path)."""
    return {entry.key or "/".join(entry.nested_key): json.loads(entry.value_json)
            for entry in entries}


def wandb_run(out_dir):
    """(history {step: row}, config, exit codes) of the one W&B offline run in out_dir."""
    [run_file] = (out_dir / "wandb").glob("offline-run-*/run-*.wandb")
    history, config, exits = {}, {}, []
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.setdefault(record.history.step.num, {}).update(items(record.history.item))
        elif kind in ("run", "config"):  # the config given to wandb.init, then any updates
            config.update(items((record.run.config if kind == "run" else record.config).update))
        elif kind == "exit":
            exits.append(record.exit.exit_code)
    return history, config, exits


def wandb_env(tmp_path):
    """Offline and quiet, W&B's settings and caches in tmp_path (not the user's home)."""
    return dict(subprocess_env(), WANDB_MODE="offline", WANDB_SILENT="true",
                WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"), WANDB_CACHE_DIR=str(tmp_path))

def test_wandb_offline_run_holds_the_metrics_records(repo, tmp_path):
    out = repo / "out/wb"
    env = wandb_env(tmp_path)
    proc = subprocess.run(train_command(CONFIG, f"--out_dir={out.relative_to(repo)}",
                                        "--wandb_project=llama3gen-test", *SHORT),
                          cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-6000:]
    history, config, exits = wandb_run(out)
    assert exits == [0], "the run was not finished cleanly"
    assert config["learning_rate"] == 3e-3 and config["wandb_project"] == "llama3gen-test"
    logged = {step: row["loss"] for step, row in history.items() if "loss" in row}
    assert logged == train_losses(out)  # JSON both ways: the same float64 exactly
    assert {step: row["val_loss"] for step, row in history.items() if "val_loss" in row} \
        == val_losses(out)
    assert history[0]["start/world_size"] == 1


def test_a_run_that_fails_closes_both_trackers_with_its_records(repo, tmp_path):
    """A real failure: the checkpoint directory's name is taken by a file, so the save at step 2
    raises (exit 1). Both trackers are on; both must hold steps 1-2 and W&B must record exit 1."""
    out = repo / "out/fail"
    out.mkdir(parents=True)
    (out / "checkpoints").write_text("not a directory\n")
    env = wandb_env(tmp_path)
    proc = subprocess.run(train_command(CONFIG, f"--out_dir={out.relative_to(repo)}",
                                        "--tensorboard=True", "--wandb_project=llama3gen-test",
                                        "--max_iters=4", "--ckpt_interval=2"),
                          cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=240)
    assert proc.returncode == 1 and "checkpoint save at step 2" in proc.stdout, proc.stdout[-3000:]
    expected = train_losses(out)
    assert sorted(expected) == [1, 2]
    assert_same_numbers(tensorboard_scalars(out / "tensorboard", "loss"), expected, "loss")
    history, _, exits = wandb_run(out)
    assert exits == [1], "W&B was not told the run failed"
    assert {step: row["loss"] for step, row in history.items() if "loss" in row} == expected
