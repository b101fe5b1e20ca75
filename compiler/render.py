"""Plan → files. Deterministic rendering and an all-or-nothing write.

templates/ mirrors the generated tree. Files ending in `.j2` are Jinja2 templates (StrictUndefined:
a missing Plan field is an error, never an empty string); everything else is copied verbatim.
`config/__variant__.py.j2` is rendered once per variant as `config/<variant>.py`.

We use plain Jinja2 rather than cookiecutter: cookiecutter's value is prompting for a context and
hooks, and here the context is the Plan and rendering must be a pure function of it (byte-identical
output, no timestamps, no prompts, no user config files read from $HOME).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from pathlib import Path, PurePosixPath

import jinja2

from . import __version__, figure, lawfit
from .errors import UserError
from .plan import Plan
from .units import checkpointing, duration, si, time_budget

LOCK_NAME = "llama3gen.lock.json"
VARIANT_TEMPLATE = "__variant__"
EXECUTABLE_SUFFIXES = (".sh", ".sbatch")
PARTIAL_PREFIX = "_"  # templates/.../_name.j2: included by other templates, not generated
IGNORED_PARTS = {"__pycache__", ".pytest_cache"}
# The scaling-law sweep (spec `sweep:`): configs, outputs, and the files generated only with one.
SWEEP_CONFIG_DIR = "config/sweep"
SWEEP_OUT_DIR = "out/sweep"
SWEEP_FILES = {"sweep.py", "scripts/sweep.sh", "scripts/sweep.sbatch", "docs/sweep.md"}
CALIBRATION_FILES = {"docs/calibration.md"}  # only with a spec's hardware.calibration
# Generated only for a plan from a fitted law (search.scaling_law: {file: LAW.json}).
LAW_FIT_FILES = {"docs/law.md"}


def templates_dir() -> Path:
    """templates/ ships inside the wheel as llama3gen/templates; in a checkout it sits beside compiler/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "templates", here.parent / "templates"):
        if candidate.is_dir():
            return candidate
    raise RuntimeError("llama3gen's templates/ directory is missing from the installation")


# --- Jinja filters: formatting only, no decisions -------------------------------------------

def _shquote(value) -> str:
    return shlex.quote(str(value))


def _cell(value) -> str:
    # Text from the spec inside a Markdown table row: a `|` would end the cell, a newline the row.
    return " ".join(str(value).splitlines()).replace("|", "\\|")


def _sci(value, digits: int = 3) -> str:
    return f"{float(value):.{digits}e}"


def _gib(value) -> str:
    return f"{float(value) / 2**30:.1f} GiB"


def _fixed(value, digits: int = 4) -> str:
    return f"{float(value):.{digits}f}"


def _commas(value) -> str:
    return f"{int(value):,}"


def _pyrepr(value) -> str:
    # Python literals for config files: repr of str/int/float/bool/None is valid Python.
    if not isinstance(value, (str, int, float, bool, type(None))):
        raise TypeError(f"pyrepr of {type(value).__name__}")
    return repr(value)


def _bytecode_cache() -> jinja2.BytecodeCache | None:
    """Compiled templates cached per user (Jinja2 keys entries by template source, so an edited
    template is recompiled): compiling them from source is a fifth of `compile`'s time. The cache
    changes only speed, never output; without a writable cache directory we go without."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(base, "llama3gen", f"jinja-{__version__}-{jinja2.__version__}")
    try:
        os.makedirs(path, exist_ok=True)
        if not os.access(path, os.W_OK):
            return None
    except OSError:
        return None
    return jinja2.FileSystemBytecodeCache(path)


def _environment(root: Path) -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(root)), undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True, autoescape=False,
        bytecode_cache=_bytecode_cache())
    env.filters.update(shquote=_shquote, cell=_cell, pyrepr=_pyrepr, sci=_sci, si=si,
                       duration=duration, time_budget=time_budget, checkpointing=checkpointing,
                       gib=_gib, fixed=_fixed, commas=_commas,
                       tojson=lambda v: json.dumps(v, sort_keys=True))
    return env


# Floats in the lock file keep this many significant digits: numpy's SIMD pow/exp may differ in
# the last bit between CPUs, and a regenerated repo must diff clean on any machine.
LOCK_FLOAT_DIGITS = 10


def _fixed_floats(value):
    if isinstance(value, float):
        return float(f"{value:.{LOCK_FLOAT_DIGITS}g}")
    if isinstance(value, dict):
        return {k: _fixed_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_fixed_floats(v) for v in value]
    return value


def lock_text(plan: Plan, spec_text: str, manifest: dict[str, str]) -> str:
    doc = {"llama3gen_version": __version__, "plan": _fixed_floats(plan.model_dump(mode="json")),
           "spec_text": spec_text, "files": manifest}
    return json.dumps(doc, sort_keys=True, indent=2, ensure_ascii=True) + "\n"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def render_files(plan: Plan, spec_text: str) -> dict[str, bytes]:
    """Every generated file, path (POSIX, relative) → bytes. Pure: same Plan, same bytes."""
    root = templates_dir()
    env = _environment(root)
    context = {"plan": plan, "job": plan.job, "variants": plan.variants,
               "version": __version__, "lock_name": LOCK_NAME}
    files: dict[str, bytes] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = PurePosixPath(path.relative_to(root).as_posix())
        if IGNORED_PARTS & set(rel.parts) or rel.suffix == ".pyc":  # pip byte-compiles installed templates
            continue
        if rel.name.startswith(PARTIAL_PREFIX) and VARIANT_TEMPLATE not in rel.name:  # included
            continue
        if rel.suffix != ".j2":
            files[str(rel)] = _normalise(path.read_bytes())
            continue
        template = env.get_template(str(rel))
        target = rel.with_suffix("")
        if VARIANT_TEMPLATE in target.name:
            for v in plan.variants:
                name = target.name.replace(VARIANT_TEMPLATE, v.name)
                files[str(target.with_name(name))] = _normalise(template.render(
                    context, variant=v, config_path=f"config/{name}", out_dir=f"out/{v.name}"
                ).encode("utf-8"))
            for run in plan.sweep.runs if plan.sweep else ():  # the same config format
                path = f"{SWEEP_CONFIG_DIR}/{run.name}.py"
                files[path] = _normalise(template.render(
                    context, variant=run, config_path=path, out_dir=f"{SWEEP_OUT_DIR}/{run.name}"
                ).encode("utf-8"))
        elif ((str(target) in SWEEP_FILES and plan.sweep is None)
              or (str(target) in CALIBRATION_FILES and plan.calibration is None)
              or (str(target) in LAW_FIT_FILES and plan.law.fit is None)):
            continue
        else:
            files[str(target)] = _normalise(template.render(context).encode("utf-8"))
    files["docs/isoflop.svg"] = figure.isoflop_svg(plan).encode("utf-8")
    if plan.sweep is not None:
        files["docs/sweep.svg"] = figure.sweep_ladder_svg(plan).encode("utf-8")
    if plan.calibration is not None and figure.has_calibration_curves(plan.calibration):
        files["docs/calibration.svg"] = figure.calibration_figure(
            plan.calibration, f"drawn by llama3gen compile from {plan.calibration.file}"
        ).encode("utf-8")
    if plan.law.fit is not None and plan.law.fit.ends:
        files["docs/law.svg"] = lawfit.law_svg(plan).encode("utf-8")
    manifest = {path: sha256(data) for path, data in sorted(files.items())}
    files[LOCK_NAME] = lock_text(plan, spec_text, manifest).encode("utf-8")
    return files


def _normalise(data: bytes) -> bytes:
    """LF line endings and exactly one trailing newline for text."""
    text = data.replace(b"\r\n", b"\n")
    return text.rstrip(b"\n") + b"\n" if text.strip() else text


def file_mode(path: str) -> int:
    return 0o755 if path.endswith(EXECUTABLE_SUFFIXES) else 0o644


def check_relative(rel: str) -> bool:
    """A generated path is relative, normalised and stays below the repo root."""
    p = PurePosixPath(rel)
    return bool(p.parts) and not p.is_absolute() and str(p) == rel and ".." not in p.parts


def read_lock_plan(repo: Path) -> dict:
    """The lock file's plan (a dict). One this llama3gen wrote must validate as a Plan (a
    hand-edited lock is refused, naming the field); another version's is returned as it is, for
    the caller to read the fields it knows."""
    from pydantic import ValidationError
    lock = read_lock(repo)
    plan = lock.get("plan")
    if not isinstance(plan, dict):
        raise UserError(f"{LOCK_NAME} holds no plan", where=str(repo / LOCK_NAME),
                        fix="re-compile the repo (llama3gen compile SPEC -o DIR)")
    if plan.get("llama3gen_version") == __version__:
        try:
            Plan.model_validate(plan)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = ".".join(map(str, error["loc"]))
            raise UserError(f"{LOCK_NAME}'s plan is not as llama3gen wrote it: plan.{field}: "
                            f"{error['msg']}", where=str(repo / LOCK_NAME),
                            fix="re-compile the repo (llama3gen compile SPEC -o DIR)") from None
    return plan


def read_lock(repo: Path) -> dict:
    """The lock file as a dict whose "files" maps plain relative paths to sha256 digests."""
    path = repo / LOCK_NAME
    # What to do about a lock we cannot use: --force needs the lock to know which files are generated.
    fix = (f"restore it (`git checkout -- {LOCK_NAME}` if the repo is under git), or compile into a "
           "new directory with -o and move your own files over")
    try:
        lock = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"not a generated repo: {LOCK_NAME} is missing", where=str(repo),
                        fix="pass the directory `llama3gen compile` wrote") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {LOCK_NAME}: {exc}", where=str(path), fix=fix) from None
    files = lock.get("files") if isinstance(lock, dict) else None
    if not (isinstance(files, dict) and isinstance(lock.get("spec_text", ""), str)
            and all(isinstance(rel, str) and check_relative(rel) and isinstance(digest, str)
                    for rel, digest in files.items())):
        raise UserError(f"{LOCK_NAME} is not a llama3gen lock file (it needs an object with "
                        '"files": {relative path: sha256} and "spec_text")', where=str(path), fix=fix)
    return lock
