"""The files llama3gen writes outside a generated repo (a fitted law, a calibration, their
figures): reading them back, and writing them whole, never over a file another program wrote."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .errors import UserError


def whole_number(value, least: int = 1) -> bool:
    """A record's whole number, from `least` up to an int32, as every count and model dimension
    in one is (numpy's arithmetic on far larger ones overflows)."""
    return isinstance(value, int) and not isinstance(value, bool) and least <= value < 2**31


def read_json(path, what: str, writer: str):
    """The parsed document; ValueError (one line) naming `what` file, and `writer`, the command
    that makes one, when it is missing or not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{what} file {str(path)!r} not found (a path relative to the spec file; "
                         f"`{writer}` writes one)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {what} file {str(path)!r}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} file {path}:{exc.lineno}:{exc.colno} is not JSON: "
                         f"{exc.msg}") from None
    except ValueError:
        raise ValueError(f"{what} file {str(path)!r} is not JSON") from None


def write_own_file(path: Path, text: str, ours, command: str) -> None:
    """Write `text` to a temporary file beside `path`, then os.replace: a reader never sees half
    a file. Never through a symbolic link, never over a file `ours(its text)` does not claim for
    `command` (the llama3gen command that writes such files); one-line UserErrors otherwise."""
    if path.is_symlink():
        raise UserError(f"is a symbolic link; {command} writes no file through one",
                        where=str(path), fix="give the path of a regular file")
    if path.is_dir():
        raise UserError(f"is a directory; {command} writes a file", where=str(path),
                        fix="give the path of a file (in that directory, or elsewhere)")
    if path.exists():
        try:
            mine = path.is_file() and ours(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            mine = False
        if not mine:
            raise UserError(f"exists and was not written by {command}; not overwriting it",
                            where=str(path), fix="choose another path, or move that file away")
    if not path.parent.is_dir():
        raise UserError("its directory does not exist", where=str(path),
                        fix="create the directory first")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise UserError(f"cannot write it: {exc.strerror}", where=str(path),
                        fix="check the directory's permissions") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        os.unlink(tmp)
        raise UserError(f"cannot write it: {exc.strerror}", where=str(path),
                        fix="check the directory's permissions and free space") from None
    except BaseException:
        os.unlink(tmp)
        raise
