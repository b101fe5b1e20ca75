"""Writing a generated repo: whole or not at all, never over a user's files, never via symlinks.

A new repo is written into a hidden sibling directory and renamed into place in one rename(2).
Re-compiling into an existing repo (or writing into an existing empty directory, such as `-o .`)
goes through a journal, `llama3gen.journal.json` in the repo:

1. the journal is written in state "staging", naming every file about to change;
2. every new file is written beside its target as `<name>.llama3gen-new` (the step that can fail:
   disk full, permissions; a failure or Ctrl-C removes them again);
3. the journal is switched to "committed": from here on the update is done, whatever happens;
4. each staged file is renamed into place (the lock file last), obsolete files are removed, and
   the journal is deleted.

A compile killed at any point leaves its journal behind, and the next `compile` or `check` reads
it first: a "staging" journal is rolled back (the staged files are removed), a "committed" one is
rolled forward (the renames are finished). Ctrl-C during step 4 waits for it to end.

Files the user added are never touched, not even with `force`: `force` overwrites (or deletes)
only files the lock lists as generated. Nothing is written or deleted through a symbolic link.
Two llama3gen processes never work on one repo at once: each holds `locked(out)`.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import fcntl
import json
import os
import shutil
import signal
import stat
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .errors import UserError
from .render import LOCK_NAME, check_relative, file_mode, read_lock, sha256

STAGING_SUFFIX = ".llama3gen-new"
STAGING_DIR_SUFFIX = ".llama3gen-tmp"
LOCK_SUFFIX = ".llama3gen-lock"
JOURNAL_NAME = "llama3gen.journal.json"


@dataclass
class RepoState:
    """How a repo on disk compares with a fresh render."""

    missing: list[str] = field(default_factory=list)  # generated, absent on disk
    stale: list[str] = field(default_factory=list)  # on disk as last generated, differs from fresh
    edited: list[str] = field(default_factory=list)  # on disk differs from what was generated
    collisions: list[str] = field(default_factory=list)  # user files where a generated file goes
    in_the_way: list[str] = field(default_factory=list)  # "path: why" — a directory where a file goes...
    obsolete: list[str] = field(default_factory=list)  # generated before, no longer, unedited
    obsolete_edited: list[str] = field(default_factory=list)  # generated before, no longer, edited

    @property
    def clean(self) -> bool:
        return not (self.missing or self.stale or self.edited or self.collisions or self.in_the_way
                    or self.obsolete or self.obsolete_edited)


class InterruptedAfterWrite(KeyboardInterrupt):
    """Ctrl-C that came once the repo was already written: the CLI says so, not 'nothing was written'."""


def _read(path: Path) -> bytes | None:
    """A regular file's bytes, None when absent (compare() has already refused anything else)."""
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _in_the_way(root: Path, rel: str) -> str | None:
    """Why rel cannot be a generated file: a file where one of its directories goes, or a
    directory (FIFO, socket...) where the file goes. None when nothing is in the way."""
    parts = PurePosixPath(rel).parts
    current = root
    for i, part in enumerate(parts):
        current = current / part
        try:
            mode = os.stat(current).st_mode  # follows links: those are refused when written
        except FileNotFoundError:
            return None
        if i < len(parts) - 1 and not stat.S_ISDIR(mode):
            return f"{'/'.join(parts[:i + 1])} is a file where llama3gen puts the directory of {rel}"
        if i == len(parts) - 1 and not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
            return f"{rel} is {kind} where llama3gen puts a file"
    return None


def _link_on_path(root: Path, rel: str) -> Path | None:
    """The first component from root down to rel that is a symlink, if any."""
    current = root
    for part in PurePosixPath(rel).parts:
        current = current / part
        if current.is_symlink():
            return current
    return None


def _refuse_symlinks(root: Path, rel: str, verb: str = "write") -> None:
    """We never write or delete through a symlink."""
    link = _link_on_path(root, rel)
    if link is not None:
        raise UserError(f"refusing to {verb} through a symbolic link", where=str(link),
                        fix="remove the link or compile into another directory")


def compare(repo: Path, files: dict[str, bytes]) -> RepoState:
    state = RepoState()
    old_manifest: dict[str, str] = {}
    if (repo / LOCK_NAME).exists() or (repo / LOCK_NAME).is_symlink():
        old_manifest = read_lock(repo)["files"]
    for rel, data in sorted(files.items()):
        blocked = _in_the_way(repo, rel)
        if blocked:
            state.in_the_way.append(blocked)
            continue
        on_disk = _read(repo / rel)
        if rel == LOCK_NAME:
            if on_disk != data and on_disk is not None:
                state.stale.append(rel)
            continue
        if on_disk is None:
            state.missing.append(rel)
        elif on_disk == data:  # already what we would write
            continue
        elif rel in old_manifest and sha256(on_disk) != old_manifest[rel]:
            state.edited.append(rel)
        elif rel not in old_manifest:
            state.collisions.append(rel)
        else:
            state.stale.append(rel)
    for rel in sorted(set(old_manifest) - set(files)):
        if _link_on_path(repo, rel) is not None:
            state.obsolete.append(rel)  # compile refuses to delete through the link
        elif _in_the_way(repo, rel) is None and (on_disk := _read(repo / rel)) is not None:
            edited = sha256(on_disk) != old_manifest[rel]
            (state.obsolete_edited if edited else state.obsolete).append(rel)
    return state


def diff(repo: Path, files: dict[str, bytes], paths: list[str]) -> str:
    """Unified diff from what llama3gen generates now to what is on disk (edits show as +)."""
    out = []
    for rel in paths:
        generated = files.get(rel, b"").decode("utf-8", "replace").splitlines(keepends=True)
        on_disk = (_read(repo / rel) or b"").decode("utf-8", "replace").splitlines(keepends=True)
        out.extend(difflib.unified_diff(generated, on_disk, f"generated/{rel}", f"on-disk/{rel}"))
    return "".join(out)


def _write_file(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL | O_NOFOLLOW: create the file itself, never write through a link planted at its name.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with open(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(path, mode)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- one llama3gen process per repo ---------------------------------------------------------

def lock_path(out: Path) -> Path:
    """The lock file: beside the repo, not in it (a new repo replaces its directory in one
    rename, and the generated tree stays exactly what was generated). Deleted when released."""
    base = Path(out).resolve()
    return base.with_name(f".{base.name}{LOCK_SUFFIX}")


@contextlib.contextmanager
def locked(out: Path):
    """Hold an exclusive flock for `out`; a second compile or check waits for the first."""
    out = Path(out)
    path = lock_path(out)
    while True:
        owned = True
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS) or not out.is_dir():
                raise UserError(f"cannot create the lock file {path.name} beside the output "
                                f"directory: {exc.strerror}", where=str(out),
                                fix="fix the permissions of its parent directory, or choose another path with -o") from None
            # The parent is read-only to us, but the repo exists: lock the repo directory itself.
            fd, owned = os.open(out, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC), False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another llama3gen process working on {out} to finish "
                  f"(it holds {path})", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        # The holder we waited for deletes the file on release: if ours is no longer the one at
        # the path, lock the new one instead.
        try:
            same = not owned or os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        if owned:
            with contextlib.suppress(OSError):
                os.unlink(path)
        os.close(fd)


@contextlib.contextmanager
def _uninterruptible(done: str):
    """Ctrl-C is held back until the block ends (renames that must all happen); it is then raised
    as InterruptedAfterWrite(done), so the CLI can say truthfully what was written."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught and previous is signal.default_int_handler:
        raise InterruptedAfterWrite(done)


# --- the journal ----------------------------------------------------------------------------

def _write_journal(out: Path, journal: dict) -> None:
    tmp = out / (JOURNAL_NAME + STAGING_SUFFIX)
    tmp.unlink(missing_ok=True)
    _write_file(tmp, (json.dumps(journal, sort_keys=True, indent=1) + "\n").encode(), 0o644)
    os.replace(tmp, out / JOURNAL_NAME)
    _fsync_dir(out)


def _read_journal(out: Path) -> dict | None:
    path = out / JOURNAL_NAME
    if not os.path.lexists(path):
        return None
    bad = UserError(f"{JOURNAL_NAME} (the record of an interrupted update) is unreadable",
                    where=str(path), fix="delete it, then run `llama3gen check` to see what the "
                    "interrupted update changed, and re-compile (with --force where it says so)")
    try:
        if path.is_symlink():
            raise bad
        journal = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise bad from None
    if not (isinstance(journal, dict) and journal.get("state") in ("staging", "committed")
            and all(isinstance(journal.get(k), dict) for k in ("write", "remove"))
            and isinstance(journal.get("dirs"), list)):
        raise bad
    for rel in [*journal["write"], *journal["remove"], *journal["dirs"]]:
        if not isinstance(rel, str) or not check_relative(rel):
            raise bad
    return journal


def _file_sha(path: Path) -> str | None:
    if path.is_symlink() or not path.is_file():
        return None
    return sha256(path.read_bytes())


def _roll_back(out: Path, journal: dict) -> None:
    """Undo steps 1-2: remove the staged files and the directories made for them."""
    for rel in journal["write"]:
        staged = out / (rel + STAGING_SUFFIX)
        if _link_on_path(out, rel) is None and (staged.is_file() or staged.is_symlink()):
            staged.unlink()
    for rel in sorted(journal["dirs"], reverse=True):  # deepest first
        if _link_on_path(out, rel) is None:
            with contextlib.suppress(OSError):  # not empty: someone put a file there; keep it
                (out / rel).rmdir()
    (out / JOURNAL_NAME).unlink(missing_ok=True)
    (out / (JOURNAL_NAME + STAGING_SUFFIX)).unlink(missing_ok=True)


def _roll_forward(out: Path, journal: dict) -> None:
    """Finish step 4: every staged file into place, obsolete files removed, the lock last."""
    def put(rel: str, digest: str) -> None:
        staged = out / (rel + STAGING_SUFFIX)
        if _link_on_path(out, rel) is None and _file_sha(staged) == digest:
            os.replace(staged, out / rel)

    for rel, digest in journal["write"].items():
        if rel != LOCK_NAME:
            put(rel, digest)
    for rel, digest in journal["remove"].items():
        if _link_on_path(out, rel) is None and _file_sha(out / rel) == digest:
            (out / rel).unlink()
    if LOCK_NAME in journal["write"]:
        put(LOCK_NAME, journal["write"][LOCK_NAME])
    _fsync_dir(out)
    (out / JOURNAL_NAME).unlink(missing_ok=True)
    (out / (JOURNAL_NAME + STAGING_SUFFIX)).unlink(missing_ok=True)


def recover(out: Path) -> str | None:
    """Finish or undo an update that was killed (see the module docstring). Call under locked().
    Returns what was done, or None when there was nothing to do."""
    out = Path(out)
    if not out.is_dir() or out.is_symlink():
        return None
    (out / (JOURNAL_NAME + STAGING_SUFFIX)).unlink(missing_ok=True)  # a journal half-written when killed
    journal = _read_journal(out)
    if journal is None:
        return None
    if journal["state"] == "staging":
        _roll_back(out, journal)
        return f"{out}: an interrupted compile had not replaced any file yet; removed what it staged"
    done = f"{out}: finished the renames of an interrupted compile"
    with _uninterruptible(done):
        _roll_forward(out, journal)
    return done


@contextlib.contextmanager
def recovered(repo: Path):
    """For `check`: wait for any compile of repo to finish, recover a killed one, then compare."""
    repo = Path(repo)
    if not repo.is_dir() or repo.is_symlink():
        yield  # nothing to lock; read_lock says what is wrong
        return
    with locked(repo):
        note = recover(repo)
        if note:
            print(note, file=sys.stderr)
        yield


# --- compile --------------------------------------------------------------------------------

def write_repo(out: Path, files: dict[str, bytes], force: bool = False) -> str:
    """Write `files` into `out`. Returns a one-line summary. Raises UserError, never half-writes."""
    out = Path(out)
    for rel in files:
        if not check_relative(rel):
            raise ValueError(f"refusing to write {rel!r}: not a plain path inside the repo")
    if out.is_symlink():
        raise UserError("output path is a symbolic link", where=str(out),
                        fix="pass the real directory, or another path")
    if out.exists() and not out.is_dir():
        raise UserError("output path exists and is not a directory", where=str(out),
                        fix="choose another path with -o")
    base = out.resolve()
    if base.parent == base:
        raise UserError("cannot compile into the root directory", where=str(out),
                        fix="choose a new directory with -o")
    try:
        base.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the output directory: {exc.strerror}", where=str(out),
                        fix="choose another path with -o, or fix permissions; nothing was written") from None
    with locked(out):
        _remove_abandoned_staging(base.parent, base.name)
        note = recover(out)
        if note:
            print(note, file=sys.stderr)
        if not out.exists():
            _write_new(out, files)
            return f"wrote {len(files)} files to {out}"
        if not any(out.iterdir()):  # an empty directory, maybe the current one: fill it in place
            _update(out, files, force)
            return f"wrote {len(files)} files to {out}"
        if not (out / LOCK_NAME).exists():
            raise UserError(f"output directory is not empty and holds no {LOCK_NAME}, so "
                            "llama3gen did not generate it", where=str(out),
                            fix="choose an empty or new directory with -o (--force only "
                            "overwrites files of a repo llama3gen generated)")
        return _update(out, files, force)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_abandoned_staging(parent: Path, name: str) -> None:
    """Staging directories of compiles that were killed (their process is gone) are removed."""
    for leftover in parent.glob(f".{name}.*{STAGING_DIR_SUFFIX}"):
        pid = leftover.name[len(name) + 2:].split(".", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)) and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)


def _write_new(out: Path, files: dict[str, bytes]) -> None:
    parent = out.resolve().parent
    staging = None
    try:
        # The pid in the name lets a later compile tell an abandoned staging directory.
        staging = Path(tempfile.mkdtemp(prefix=f".{out.resolve().name}.{os.getpid()}.",
                                        suffix=STAGING_DIR_SUFFIX, dir=parent))
        for rel, data in files.items():
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            _write_file(target, data, file_mode(rel))
        for d in sorted({p for p in staging.rglob("*") if p.is_dir()} | {staging}):
            os.chmod(d, 0o755)
        with _uninterruptible(f"{out} was written completely"):
            os.replace(staging, out)  # atomic
    except OSError as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        verb = "create the output directory" if staging is None else "write the generated repo"
        raise UserError(f"cannot {verb}: {exc.strerror}", where=str(out),
                        fix="free disk space or fix permissions; nothing was written") from None
    except InterruptedAfterWrite:
        raise
    except BaseException:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        raise


def _refuse_edits(out: Path, state: RepoState, force: bool) -> None:
    if state.in_the_way:
        raise UserError(f"something is in the way of the generated files: {'; '.join(state.in_the_way)}",
                        where=str(out), fix="move it elsewhere (it is not a generated file, so "
                        "--force does not replace it)")
    if state.collisions:
        raise UserError("refusing to overwrite files llama3gen did not generate (the lock does "
                        f"not list them): {', '.join(state.collisions)}", where=str(out),
                        fix="move or rename them; --force overwrites only generated files")
    if force or not (state.edited or state.obsolete_edited):
        return
    what = []
    if state.edited:
        what.append(f"overwrite generated files that were edited by hand: {', '.join(state.edited)}")
    if state.obsolete_edited:
        what.append("delete files that are no longer generated but were edited by hand: "
                    f"{', '.join(state.obsolete_edited)}")
    raise UserError(f"refusing to {'; and to '.join(what)}", where=str(out),
                    fix="move your changes elsewhere (git stash), or pass --force to "
                    f"{'overwrite' if state.edited else 'delete'} them")


def _update(out: Path, files: dict[str, bytes], force: bool) -> str:
    state = compare(out, files)
    _refuse_edits(out, state, force)
    changed = [rel for rel, data in files.items() if _read(out / rel) != data]
    remove = state.obsolete + state.obsolete_edited  # edited ones only get here with force
    for rel in changed:
        _refuse_symlinks(out, rel)
    for rel in remove:
        _refuse_symlinks(out, rel, "delete")
    if not changed and not remove:
        return f"updated 0 of {len(files)} files in {out}"
    new_dirs = sorted({str(p) for rel in changed for p in PurePosixPath(rel).parents
                       if str(p) != "." and not (out / p).exists()})
    journal = {"state": "staging", "write": {rel: sha256(files[rel]) for rel in changed},
               "remove": {rel: sha256(_read(out / rel)) for rel in remove}, "dirs": new_dirs}
    try:
        _write_journal(out, journal)
        for rel in new_dirs:
            (out / rel).mkdir()
        for rel in changed:
            tmp = out / (rel + STAGING_SUFFIX)
            tmp.unlink(missing_ok=True)  # left by a killed compile (a link is removed, not followed)
            _write_file(tmp, files[rel], file_mode(rel))
    except OSError as exc:
        _roll_back(out, journal)
        raise UserError(f"cannot write the generated repo: {exc.strerror}", where=str(out),
                        fix="free disk space or fix permissions; the previous repo is intact") from None
    except BaseException:
        _roll_back(out, journal)
        raise
    summary = f"updated {len(changed)} of {len(files)} files in {out}" + (
        f", removed {len(remove)} no longer generated" if remove else "")
    # The commit point: once the journal says "committed", the next run finishes the renames.
    with _uninterruptible(f"the update was complete: {summary}"):
        try:
            _write_journal(out, {**journal, "state": "committed"})
        except OSError as exc:
            _roll_back(out, journal)
            raise UserError(f"cannot write the generated repo: {exc.strerror}", where=str(out),
                            fix="free disk space or fix permissions; the previous repo is intact") from None
        try:
            _roll_forward(out, journal)
        except OSError as exc:
            raise UserError(f"cannot finish the update: {exc.strerror}", where=str(out),
                            fix="fix that, then run `llama3gen check` or compile again: it "
                            f"finishes the update {JOURNAL_NAME} records") from None
    return summary
