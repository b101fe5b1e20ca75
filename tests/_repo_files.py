"""Paths of this repository, and imports of the plain-Python templates without the compiler.

Files under templates/ that never vary are valid Python, copied verbatim into the generated repo,
where they import each other by bare name (`from model import Llama`). load_template_module
reproduces that: it puts templates/ on sys.path and imports the file as a top-level module.
"""

import importlib
import importlib.util
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
TEMPLATES_DIR = REPO_ROOT / "templates"
COMPILER_DIR = REPO_ROOT / "compiler"


def load_template_module(name):
    """Import templates/<name>.py (e.g. "model", "export_hf") as the top-level module `name`."""
    if not (TEMPLATES_DIR / f"{name}.py").is_file():
        raise FileNotFoundError(f"no plain-Python template {TEMPLATES_DIR / name}.py")
    if str(TEMPLATES_DIR) not in sys.path:
        sys.path.insert(0, str(TEMPLATES_DIR))
    module = sys.modules.get(name)
    if module is not None and Path(getattr(module, "__file__", "") or "").parent != TEMPLATES_DIR:
        raise ImportError(f"a different module named {name!r} is already imported: {module}")
    return importlib.import_module(name)


def load_arch():
    """The compiler's arch module: the installed llama3gen package, else compiler/arch.py by path."""
    try:
        from llama3gen import arch
        return arch
    except ImportError:
        pass
    spec = importlib.util.spec_from_file_location("_llama3gen_arch", COMPILER_DIR / "arch.py")
    arch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(arch)
    return arch
