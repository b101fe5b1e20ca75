"""export_hf.py and sample.py under hostile use (issue #14, items 1, 9 and 17).

Item 1: `export_hf.py --out DIR` only ever replaces files of an earlier export of its own (its
export_hf_manifest.json lists them, with their sha256), refuses every other non-empty directory
and leaves it byte for byte as it was, and appears whole or not at all: a refused, failed, killed
or interrupted export leaves the target as it was.

Items 9 and 17: every argument of both scripts is checked; a wrong one, a mismatched --config or an
incomplete config.json is one line naming it, exit status 2, never a traceback.

One real run trains a tiny model for a few steps on the stdlib corpus (module fixture). The
scripts run in the generated repo: as subprocesses where the process itself matters (how a user
sees it; a kill, Ctrl-C or a file size limit mid-write), else through their main(argv), which is
the whole command line (parsing, checks, the exit status and the one-line error) without the
seconds each new Python spends importing torch.
"""

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _repo_files import TEMPLATES_DIR, load_template_module
from _train_fixtures import make_repo, prepare_data, run_train, subprocess_env, write_config

export_hf = load_template_module("export_hf")
sample = load_template_module("sample")
checkpoint = load_template_module("checkpoint")

MANIFEST = "export_hf_manifest.json"


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    """A generated repo with prepared data, one short run in out/, and its export in hf/."""
    repo = make_repo(tmp_path_factory.mktemp("hostile-export") / "repo")
    shutil.copyfile(TEMPLATES_DIR / "sample.py", repo / "sample.py")
    prepare_data(repo)
    run_train(repo, "config/tiny.py", "--max_iters=3", "--ckpt_interval=3", "--eval_interval=3",
              "--warmup_iters=1")
    proc = run(repo, "export_hf.py", "--ckpt", "out", "--out", "hf")
    assert proc.returncode == 0, proc.stderr
    return repo


@pytest.fixture()
def cli(repo, monkeypatch, capsys):
    """cli(module, *args): module.main(args) with the repo as the current directory, as a
    CompletedProcess (exit status, stdout, stderr)."""
    monkeypatch.chdir(repo)

    def call(module, *args):
        try:
            status = module.main([str(arg) for arg in args])
        except SystemExit as e:  # argparse's own exit
            status = e.code
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(args, status, captured.out, captured.err)

    return call


def run(repo, script, *args, preexec_fn=None, code=None):
    """python <script> <args> in the repo (or python -c <code> <args>), as a user runs it."""
    entry = ["-c", code] if code else [script]
    return subprocess.run([sys.executable, *entry, *args], cwd=repo, env=subprocess_env(),
                          capture_output=True, text=True, timeout=180, preexec_fn=preexec_fn)


def assert_refused(proc, *words):
    """Exit status 2 and one line on stderr, holding each of `words`; no traceback anywhere."""
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def snapshot(directory):
    """{relative path: bytes, or the link's target} of everything under `directory`."""
    directory = Path(directory)
    found = {}
    for path in sorted(directory.rglob("*")):
        key = str(path.relative_to(directory))
        if path.is_symlink():
            found[key] = ("link", os.readlink(path))
        elif path.is_file():
            found[key] = path.read_bytes()
        else:
            found[key] = "dir"
    return found


def leftovers(parent):
    """Hidden staging directories of exports in `parent`."""
    return sorted(p.name for p in Path(parent).iterdir() if ".export-" in p.name)


def exported_weights(hf_dir):
    return export_hf.read_hf_weights(hf_dir)


def assert_is_the_run(repo, hf_dir):
    """hf_dir holds exactly the run's newest checkpoint, and exactly what its manifest lists."""
    weights = exported_weights(hf_dir)
    trained = checkpoint.load_model_weights(repo / "out")
    assert sorted(weights) == sorted(trained)
    assert all(torch.equal(weights[name], trained[name]) for name in weights)
    listed = json.loads((hf_dir / MANIFEST).read_text())["files"]
    assert sorted(listed) == sorted(p.name for p in hf_dir.iterdir() if p.name != MANIFEST)


# ---------------------------------------------------------------------------------------------
# Item 1: folders that are not its exports are refused and stay byte-identical


def someone_elses_model(directory):
    """A folder of another model, as a user downloads one: weights, tokenizer, config, notes."""
    directory.mkdir(parents=True)
    other = {"model.embed_tokens.weight": torch.randn(300, 8)}
    export_hf.write_safetensors(directory / "model.safetensors", list(other),
                                [t.shape for t in other.values()], other.__getitem__,
                                torch.float32)
    (directory / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}\n')
    (directory / "tokenizer_config.json").write_text('{"tokenizer_class": "X"}\n')
    (directory / "config.json").write_text('{"model_type": "llama", "hidden_size": 8}\n')
    (directory / "model-00001-of-00002.safetensors").write_bytes(b"\0" * 64)
    (directory / "NOTES.md").write_text("my fine-tune, do not delete\n")
    return directory


def test_a_folder_of_another_model_is_refused_and_untouched(repo):
    target = someone_elses_model(repo / "models" / "theirs")
    before = snapshot(repo / "models")
    proc = run(repo, "export_hf.py", "--ckpt", "out", "--out", "models/theirs")  # as a user
    assert_refused(proc, "models/theirs", "not empty", MANIFEST, "new or empty directory")
    assert snapshot(repo / "models") == before
    assert leftovers(target.parent) == []


def test_the_prepared_data_folder_is_refused_and_untouched(repo, cli):
    # As the issue found it: a data folder whose only copy of its tokenizer.json is there.
    shutil.copytree(repo / "data" / "stdlib", repo / "data" / "bpe")
    (repo / "data" / "bpe" / "tokenizer.json").write_text('{"model": {"type": "BPE"}}\n')
    before = snapshot(repo / "data")
    for out in ("data/stdlib", "data/bpe"):
        assert_refused(cli(export_hf, "--ckpt", "out", "--out", out), out, "not empty")
    assert snapshot(repo / "data") == before
    # The repo itself (say `--out .`), and its parent, hold the current directory: refused.
    for out in (".", ".."):
        assert_refused(cli(export_hf, "--ckpt", "out", "--out", out), "--out", "current")
    assert snapshot(repo / "data") == before


def test_an_export_without_its_manifest_a_file_and_a_link_are_refused(repo, cli):
    # An export by an older export_hf.py (no manifest): whose files these are is unknown.
    old = repo / "old-style"
    shutil.copytree(repo / "hf", old)
    (old / MANIFEST).unlink()
    # A manifest that names a file outside the folder is no manifest.
    forged = repo / "forged"
    shutil.copytree(repo / "hf", forged)
    (repo / "precious.txt").write_text("keep me\n")
    manifest = json.loads((forged / MANIFEST).read_text())
    manifest["files"]["../precious.txt"] = {"bytes": 8, "sha256": "0" * 64}
    (forged / MANIFEST).write_text(json.dumps(manifest))
    (repo / "a-file").write_text("not a directory\n")
    (repo / "elsewhere").mkdir()
    (repo / "link").symlink_to(repo / "elsewhere")
    before = snapshot(repo)
    for out, words in [("old-style", ["not empty", MANIFEST]), ("forged", ["not empty"]),
                       ("a-file", ["not a directory"]), ("link", ["symbolic link"])]:
        assert_refused(cli(export_hf, "--ckpt", "out", "--out", out), out, *words)
    assert snapshot(repo) == before
    assert leftovers(repo) == []


def test_an_export_with_foreign_or_edited_files_is_refused_and_untouched(repo, cli):
    ours = repo / "hf-edited"
    assert cli(export_hf, "--ckpt", "out", "--out", ours).returncode == 0
    (ours / "README.md").write_text("model card, written by hand\n")
    before = snapshot(ours)
    assert_refused(cli(export_hf, "--ckpt", "out", "--out", ours),
                   "README.md", "not written by export_hf.py")
    assert snapshot(ours) == before

    (ours / "README.md").unlink()
    config = json.loads((ours / "config.json").read_text())
    config["rope_theta"] = 1e6  # edited by hand after the export
    (ours / "config.json").write_text(json.dumps(config))
    before = snapshot(ours)
    assert_refused(cli(export_hf, "--ckpt", "out", "--out", ours),
                   "config.json", "changed")
    assert snapshot(ours) == before

    # Its weights replaced by a link to someone else's, and a folder of theirs put inside.
    ours = repo / "hf-linked"
    assert cli(export_hf, "--ckpt", "out", "--out", ours).returncode == 0
    theirs = someone_elses_model(repo / "models" / "linked-to")
    (ours / "model.safetensors").unlink()
    (ours / "model.safetensors").symlink_to(theirs / "model.safetensors")
    (ours / "extras").mkdir()
    (ours / "extras" / "lora.safetensors").write_bytes(b"\1" * 32)
    before, theirs_before = snapshot(ours), snapshot(theirs)
    assert_refused(cli(export_hf, "--ckpt", "out", "--out", ours), "extras",
                   "changed or removed since the export: model.safetensors")
    assert snapshot(ours) == before and snapshot(theirs) == theirs_before


# ---------------------------------------------------------------------------------------------
# Item 1: a re-export replaces only its own files; new and empty folders work


def test_reexport_into_its_own_export_replaces_only_its_files(repo, cli):
    hf = repo / "hf-again"
    assert cli(export_hf, "--ckpt", "out", "--out", "hf-again").returncode == 0
    assert (hf / "model.safetensors").exists()
    # Sharded now: the single file goes, the shards and their index come.
    proc = cli(export_hf, "--ckpt", "out", "--out", "hf-again", "--shard-size", "100KB")
    assert proc.returncode == 0, proc.stderr
    names = sorted(p.name for p in hf.iterdir())
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names
    assert len([n for n in names if n.startswith("model-0")]) > 1
    assert_is_the_run(repo, hf)
    # And back to one file, in bfloat16: no shard of the earlier export is left to mix in.
    proc = cli(export_hf, "--ckpt", "out", "--out", "hf-again", "--dtype", "bfloat16")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in hf.iterdir()) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", MANIFEST])
    assert json.loads((hf / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert leftovers(repo) == []
    # Re-exporting the same thing gives the same bytes.
    before = snapshot(hf)
    proc = cli(export_hf, "--ckpt", "out", "--out", "hf-again", "--dtype", "bfloat16")
    assert proc.returncode == 0 and snapshot(hf) == before


def test_an_empty_folder_and_a_new_nested_one_are_exported_into(repo, cli):
    (repo / "empty").mkdir()
    for out in ("empty", "new/nested/hf"):
        proc = cli(export_hf, "--ckpt", "out", "--out", out)
        assert proc.returncode == 0, proc.stderr
        assert_is_the_run(repo, repo / out)


# ---------------------------------------------------------------------------------------------
# Item 1: an export that fails, is killed or is interrupted leaves the target as it was

KILL_DURING_WRITE = """
import os, signal, sys
import export_hf
kill_with = getattr(signal, sys.argv[1])
real_write, written = export_hf.write_safetensors, []
def write_then_die(*args, **kwargs):  # the process dies after writing its second shard
    real_write(*args, **kwargs)
    written.append(args[0])
    if len(written) == 2:
        os.kill(os.getpid(), kill_with)
export_hf.write_safetensors = write_then_die
sys.argv = ["export_hf.py"] + sys.argv[2:]
sys.exit(export_hf.main())
"""


@pytest.fixture()
def earlier(repo, cli):
    """A fresh earlier export (sharded) and the snapshot of it."""
    target = repo / "hf-earlier"
    shutil.rmtree(target, ignore_errors=True)
    proc = cli(export_hf, "--ckpt", "out", "--out", "hf-earlier", "--shard-size", "200KB")
    assert proc.returncode == 0, proc.stderr
    return target, snapshot(target)


def test_a_write_that_fails_leaves_the_earlier_export(repo, earlier):
    target, before = earlier

    def small_file_limit():  # files may not grow past 100 kB: the write fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))

    proc = run(repo, "export_hf.py", "--ckpt", "out", "--out", "hf-earlier",
               preexec_fn=small_file_limit)
    assert_refused(proc, "File too large")
    assert snapshot(target) == before
    assert leftovers(repo) == []


def test_a_killed_export_leaves_the_earlier_export_whole(repo, earlier, cli):
    target, before = earlier
    proc = run(repo, "", "SIGKILL", "--ckpt", "out", "--out", "hf-earlier", "--shard-size",
               "100KB", code=KILL_DURING_WRITE)
    assert proc.returncode == -9
    assert snapshot(target) == before
    left = leftovers(repo)
    assert len(left) == 1 and len(list((repo / left[0]).iterdir())) == 2  # two shards, aside
    # The next export names the leftover (it deletes nothing it did not write) and succeeds.
    proc = cli(export_hf, "--ckpt", "out", "--out", "hf-earlier")
    assert proc.returncode == 0, proc.stderr
    assert left[0] in proc.stdout and "killed" in proc.stdout
    assert_is_the_run(repo, target)
    shutil.rmtree(repo / left[0])


def test_ctrl_c_during_an_export_leaves_the_target_as_it_was(repo, earlier):
    target, before = earlier
    proc = run(repo, "", "SIGINT", "--ckpt", "out", "--out", "hf-earlier", "--shard-size",
               "100KB", code=KILL_DURING_WRITE)
    assert proc.returncode == 130, proc.stderr
    assert snapshot(target) == before
    assert leftovers(repo) == []  # what was staged is removed
    # Into a new directory: it does not appear at all.
    proc = run(repo, "", "SIGINT", "--ckpt", "out", "--out", "new/hf-never", "--shard-size",
               "100KB", code=KILL_DURING_WRITE)
    assert proc.returncode == 130 and not (repo / "new" / "hf-never").exists()
    assert leftovers(repo) == leftovers(repo / "new") == []


def test_a_second_export_into_the_same_directory_is_refused_while_the_first_runs(repo, earlier,
                                                                                   cli):
    """Two exports into one --out would replace each other's files between the check and the
    rename. While one holds the lock (here the test holds it, as a running export would), a
    second is refused in one line and --out stays as it was; one into another directory is not
    held up; once the lock is released (the first export ended), the export goes through and
    leaves no lock file behind."""
    import fcntl
    target, before = earlier
    lock = repo / ".hf-earlier.export.lock"
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        proc = run(repo, "export_hf.py", "--ckpt", "out", "--out", "hf-earlier")
        assert_refused(proc, "another export_hf.py is writing --out", "hf-earlier",
                       ".hf-earlier.export.lock")
        assert snapshot(target) == before and leftovers(repo) == []
        proc = cli(export_hf, "--ckpt", "out", "--out", "hf-elsewhere")
        assert proc.returncode == 0, proc.stderr
    # The holder ended without removing its file (a crash): a stale file holds nothing up.
    assert lock.exists()
    proc = cli(export_hf, "--ckpt", "out", "--out", "hf-earlier")
    assert proc.returncode == 0, proc.stderr
    assert_is_the_run(repo, target)
    assert not lock.exists() and not (repo / ".hf-elsewhere.export.lock").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_a_read_only_parent_leaves_the_earlier_export(repo, earlier, cli):
    target, before = earlier
    parent = repo / "locked"
    parent.mkdir(exist_ok=True)
    shutil.copytree(target, parent / "hf")
    parent.chmod(0o555)
    try:
        proc = cli(export_hf, "--ckpt", "out", "--out", "locked/hf")
        assert_refused(proc, "Permission denied")
        assert snapshot(parent / "hf") == before
    finally:
        parent.chmod(0o755)


# ---------------------------------------------------------------------------------------------
# Items 9 and 17: export_hf.py's arguments

BAD_SHARD_SIZES = ["infGB", "-infGB", "nan", "0", "0.5B", "-5GB", "five", "", "1e400B", "GB"]


@pytest.mark.parametrize("size", BAD_SHARD_SIZES)
def test_export_refuses_a_bad_shard_size(repo, size, cli):
    before = snapshot(repo / "hf")
    proc = cli(export_hf, "--ckpt", "out", "--out", "hf", f"--shard-size={size}")
    assert_refused(proc, "--shard-size", repr(size), "e.g. 5GB")
    assert snapshot(repo / "hf") == before


def test_export_refuses_bad_arguments_in_one_line(repo, cli):
    before = snapshot(repo)
    write_config(repo, "other", n_layer=3, ffn_hidden=256)
    (repo / "config" / "broken.py").write_text("n_layer = (\n")
    write_config(repo, "zero", n_layer=0)
    write_config(repo, "heads", n_head=3)
    cases = [
        (["--config", "config/zero.py"], ["--config config/zero.py", "n_layer = 0", "integer > 0"]),
        (["--config", "config/heads.py"], ["n_head = 3", "not a multiple of n_kv_head = 2"]),
        (["--dtype", "int8"], ["--dtype", "'int8'", "float32"]),
        (["--data-dir", "nowhere"], ["--data-dir", "'nowhere'", "meta.json"]),
        (["--config", "config/other.py"], ["config/other.py", "n_layer = 3", "has 2",
                                           "ffn_hidden = 256"]),
        (["--config", "config/broken.py"], ["config/broken.py", "SyntaxError"]),
        (["--config", "config/missing.py"], ["config/missing.py", "no such file"]),
    ]
    for extra, words in cases:
        assert_refused(cli(export_hf, "--ckpt", "out", "--out", "hf", *extra), *words)
    assert_refused(cli(export_hf, "--ckpt", "data", "--out", "hf"), "data", "no valid checkpoint")
    # As a user meets it, in a new process: the OverflowError of the issue.
    assert_refused(run(repo, "export_hf.py", "--ckpt", "out", "--out", "hf", "--shard-size",
                       "infGB"), "--shard-size", "'infGB'")
    for name in ("other.py", "broken.py", "zero.py", "heads.py"):
        (repo / "config" / name).unlink()
    assert snapshot(repo) == before


# ---------------------------------------------------------------------------------------------
# Items 9 and 17: sample.py's arguments, configs and config.json

BAD_SAMPLE_ARGUMENTS = [
    ("--temperature", "-1", "0 = greedy"), ("--temperature", "nan", ">= 0"),
    ("--temperature", "inf", ">= 0"), ("--temperature", "warm", ">= 0"),
    ("--top-k", "0", ">= 1"), ("--top-k", "-5", ">= 1"), ("--top-k", "2.5", ">= 1"),
    ("--max-new-tokens", "0", ">= 1"), ("--max-new-tokens", "-1", ">= 1"),
    ("--num-samples", "0", ">= 1"), ("--seed", "-1", "2**64"), ("--seed", str(2**64), "2**64"),
    ("--device", "gpu", "auto, cpu, cuda"), ("--device", "cuda:x", "cuda:N"),
]


@pytest.mark.parametrize("flag,value,allowed", BAD_SAMPLE_ARGUMENTS)
def test_sample_refuses_a_bad_argument(repo, flag, value, allowed, cli):
    assert_refused(cli(sample, "--ckpt", "out", f"{flag}={value}"), flag, repr(value), allowed)


def test_sample_refuses_bad_use_in_one_line(repo, cli):
    write_config(repo, "other", n_layer=3, n_kv_head=4)
    cases = [
        (["--prompt", ""], ["--prompt", "''", "no tokens"]),
        (["--temperature", "-1"], ["--temperature", "'-1'", ">= 0", "0 = greedy"]),
        (["--top-k", "0"], ["--top-k", "'0'", ">= 1"]),
        (["--config", "config/other.py"], ["config/other.py", "n_layer = 3", "n_kv_head = 4"]),
        (["--hf", "hf"], ["one of --ckpt", "--hf"]),
        (["--prompt", "caf\udce9"], ["--prompt", "not valid UTF-8"]),  # Latin-1 bytes in argv
        (["--data-dir", "data"], ["--data-dir", "'data'", "meta.json"]),
    ]
    hf_cases = [(["--hf", "nowhere"], ["--hf", "'nowhere'", "no config.json", "export_hf.py"]),
                (["--hf", "config"], ["--hf", "'config'", "no config.json"])]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], ["--device", "'cuda'", "no CUDA", "cpu"]))
    for extra, words in cases:
        assert_refused(cli(sample, "--ckpt", "out", "--max-new-tokens", "2", *extra), *words)
    for extra, words in hf_cases:
        assert_refused(cli(sample, "--max-new-tokens", "2", *extra), *words)
    assert_refused(cli(sample, "--hf", "hf", "--config", "config/tiny.py"),
                   "--config", "only with --ckpt")
    assert_refused(cli(sample, "--hf", "hf", "--data-dir", "data/stdlib"),
                   "--data-dir", "only with --ckpt")
    assert_refused(cli(sample, "--ckpt", "out", "--data-dir", "data/stdlib", "--seed", "x"),
                   "--seed", "'x'")
    (repo / "config" / "other.py").unlink()
    # As a user meets them, in a new process: the two cases of the issue.
    assert_refused(run(repo, "sample.py", "--ckpt", "out", "--prompt", ""), "--prompt", "''")
    assert_refused(run(repo, "sample.py", "--hf", "hf", "--temperature", "-1"), "--temperature",
                   "'-1'", "0 = greedy")
    # What the refused cases would have done, working: greedy from the run and from the export.
    ok = cli(sample, "--ckpt", "out", "--prompt", "def ", "--temperature", "0",
             "--max-new-tokens", "8", "--device", "cpu")
    assert ok.returncode == 0 and ok.stdout.startswith("def "), ok.stderr
    same = cli(sample, "--hf", "hf", "--prompt", "def ", "--temperature", "0",
               "--max-new-tokens", "8", "--device", "cpu")
    assert same.returncode == 0 and same.stdout == ok.stdout, same.stderr


def broken_copy(repo, name, edit):
    """A copy of the export hf/ with config.json edited by `edit` (a dict -> JSON text)."""
    target = repo / name
    shutil.copytree(repo / "hf", target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(edit(config))
    return target


def test_sample_refuses_an_incomplete_or_wrong_config_json(repo, cli):
    def without(*keys):
        return lambda c: json.dumps({k: v for k, v in c.items() if k not in keys})

    def with_(**values):
        return lambda c: json.dumps({**c, **values})

    cases = [
        ("no-hidden", without("hidden_size", "vocab_size"), ["hidden_size, vocab_size", "lacks"]),
        ("no-layers", without("num_hidden_layers"), ["num_hidden_layers"]),
        ("list", lambda c: "[1, 2]", ["list", "not a JSON object"]),
        ("not-json", lambda c: json.dumps(c)[:-10], ["not valid JSON"]),
        ("string-size", with_(hidden_size="64"), ["hidden_size", "'64'", "integer > 0"]),
        ("zero-heads", with_(num_attention_heads=0), ["num_attention_heads", "integer > 0"]),
        ("gqa", with_(num_key_value_heads=3), ["n_head = 4", "n_kv_head = 3"]),
        ("rope", with_(rope_parameters="fast"), ["rope_parameters", "'fast'"]),
        ("eos", with_(eos_token_id="end"), ["eos_token_id", "'end'"]),
    ]
    for name, edit, words in cases:
        target = broken_copy(repo, f"hf-{name}", edit)
        assert_refused(cli(sample, "--hf", target, "--max-new-tokens", "2"),
                       str(target / "config.json"), *words)
    # A truncated weights file is named, too.
    target = repo / "hf-truncated"
    shutil.copytree(repo / "hf", target)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    assert_refused(cli(sample, "--hf", target), "model.safetensors", "truncated")
    # A list of end ids (as Llama 3.1's config.json has) works.
    target = broken_copy(repo, "hf-eos-list", with_(eos_token_id=[256, 10]))
    proc = cli(sample, "--hf", target, "--prompt", "def", "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stderr
