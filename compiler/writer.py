"""Writing a generated repo: whole or not at all, never over a user's edits, never via symlinks.

A new repo is written into a hidden sibling directory and renamed into place in one rename(2).
Re-compiling into an existing repo first writes every new file beside its target (the step that
can fail: disk full, permissions), then renames each into place and the lock file last. Files the
user added are never touched; generated files the user edited are refused unless `force`.
"""

from __future__ import annotations

import difflib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .errors import UserError
from .render import LOCK_NAME, file_mode, read_lock, sha256

STAGING_SUFFIX = ".llama3gen-new"
STAGING_DIR_SUFFIX = ".llama3gen-tmp"


@dataclass
class RepoState:
    """How a repo on disk compares with a fresh render."""

    missing: list[str] = field(default_factory=list)  # generated, absent on disk
    stale: list[str] = field(default_factory=list)  # on disk as last generated, differs from fresh
    edited: list[str] = field(default_factory=list)  # on disk differs from what was generated
    collisions: list[str] = field(default_factory=list)  # user files where a generated file goes
    obsolete: list[str] = field(default_factory=list)  # generated before, no longer

    @property
    def clean(self) -> bool:
        return not (self.missing or self.stale or self.edited or self.collisions or self.obsolete)


def _read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _refuse_symlinks(root: Path, rel: str) -> None:
    """No component from root down to rel may be a symlink: we never write through one."""
    current = root
    for part in Path(rel).parts:
        current = current / part
        if current.is_symlink():
            raise UserError("refusing to write through a symbolic link", where=str(current),
                            fix="remove the link or compile into another directory")


def compare(repo: Path, files: dict[str, bytes]) -> RepoState:
    state = RepoState()
    old_manifest: dict[str, str] = {}
    if (repo / LOCK_NAME).exists():
        old_manifest = read_lock(repo).get("files", {})
    for rel, data in sorted(files.items()):
        on_disk = _read(repo / rel)
        if rel == LOCK_NAME:
            if on_disk != data and on_disk is not None and rel not in state.stale:
                state.stale.append(rel)
            continue
        if on_disk is None:
            state.missing.append(rel)
        elif on_disk == data:  # already what we would write (e.g. a recompile killed mid-rename)
            continue
        elif rel in old_manifest and sha256(on_disk) != old_manifest[rel]:
            state.edited.append(rel)
        elif rel not in old_manifest and on_disk != data:
            state.collisions.append(rel)
        elif on_disk != data:
            state.stale.append(rel)
    state.obsolete = sorted(set(old_manifest) - set(files))
    return state


def diff(repo: Path, files: dict[str, bytes], paths: list[str]) -> str:
    """Unified diff from what llama3gen generates now to what is on disk (edits show as +)."""
    out = []
    for rel in paths:
        generated = files.get(rel, b"").decode("utf-8", "replace").splitlines(keepends=True)
        on_disk = (_read(repo / rel) or b"").decode("utf-8", "replace").splitlines(keepends=True)
        out.extend(difflib.unified_diff(generated, on_disk, f"generated/{rel}", f"on-disk/{rel}"))
    return "".join(out)


def _check_relative(rel: str) -> None:
    """A generated path is relative, normalised and stays below the repo root."""
    p = PurePosixPath(rel)
    if not p.parts or p.is_absolute() or str(p) != rel or ".." in p.parts:
        raise ValueError(f"refusing to write {rel!r}: not a plain path inside the repo")


def _write_file(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL | O_NOFOLLOW: create the file itself, never write through a link planted at its name.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with open(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(path, mode)


def write_repo(out: Path, files: dict[str, bytes], force: bool = False) -> str:
    """Write `files` into `out`. Returns a one-line summary. Raises UserError, never half-writes."""
    out = Path(out)
    for rel in files:
        _check_relative(rel)
    if out.is_symlink():
        raise UserError("output path is a symbolic link", where=str(out),
                        fix="pass the real directory, or another path")
    if out.exists() and not out.is_dir():
        raise UserError("output path exists and is not a directory", where=str(out),
                        fix="choose another path with -o")
    if out.resolve().parent.is_dir():
        _remove_abandoned_staging(out.resolve().parent, out.name)
    if not out.exists() or not any(out.iterdir()):
        _write_new(out, files)
        return f"wrote {len(files)} files to {out}"
    if not (out / LOCK_NAME).exists() and not force:
        raise UserError(f"output directory is not empty and holds no {LOCK_NAME}", where=str(out),
                        fix="choose an empty or new directory with -o, or pass --force to write into it")
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
        parent.mkdir(parents=True, exist_ok=True)
        # The pid in the name lets a later compile tell an abandoned staging directory.
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.",
                                        suffix=STAGING_DIR_SUFFIX, dir=parent))
        for rel, data in files.items():
            target = staging / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            _write_file(target, data, file_mode(rel))
        for d in sorted({p for p in staging.rglob("*") if p.is_dir()} | {staging}):
            os.chmod(d, 0o755)
        os.replace(staging, out)  # atomic; replaces an empty directory
    except OSError as exc:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        verb = "create the output directory" if staging is None else "write the generated repo"
        raise UserError(f"cannot {verb}: {exc.strerror}", where=str(out),
                        fix="free disk space or fix permissions; nothing was written") from None
    except BaseException:
        if staging is not None and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
        raise


def _update(out: Path, files: dict[str, bytes], force: bool) -> str:
    state = compare(out, files)
    if not force and (state.edited or state.collisions):
        names = ", ".join(state.edited + state.collisions)
        raise UserError(f"refusing to overwrite generated files that were edited by hand: {names}",
                        where=str(out),
                        fix="move your changes elsewhere (git stash), or pass --force to overwrite them")
    changed = [rel for rel, data in files.items() if _read(out / rel) != data]
    for rel in changed:
        _refuse_symlinks(out, rel)
    staged: list[tuple[Path, Path, str]] = []
    try:
        for rel in sorted(changed, key=lambda r: r == LOCK_NAME):  # the lock last
            target = out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + STAGING_SUFFIX)
            tmp.unlink(missing_ok=True)  # left by a killed compile (a link is removed, not followed)
            staged.append((tmp, target, rel))  # before writing: a half-written one is removed too
            _write_file(tmp, files[rel], file_mode(rel))
    except OSError as exc:
        for tmp, _, _ in staged:
            tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write the generated repo: {exc.strerror}", where=str(out),
                        fix="free disk space or fix permissions; the previous repo is intact") from None
    except BaseException:
        for tmp, _, _ in staged:
            tmp.unlink(missing_ok=True)
        raise
    for tmp, target, _ in staged:
        os.replace(tmp, target)
    removed = 0
    for rel in state.obsolete:
        if (out / rel).is_file() and not (out / rel).is_symlink():
            (out / rel).unlink()
            removed += 1
    return f"updated {len(changed)} of {len(files)} files in {out}" + (
        f", removed {removed} no longer generated" if removed else "")
