"""Reading the JSON files llama3gen writes for a spec to name (a fitted law, a calibration)."""

from __future__ import annotations

import json
from pathlib import Path


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
