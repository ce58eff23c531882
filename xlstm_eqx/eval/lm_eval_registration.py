"""Registering ``xlstm_eqx`` in lm-eval's model registry, so that lm-eval's own CLI finds it:

    lm_eval --model xlstm_eqx --model_args checkpoint=RUN_DIR --tasks shakespeare --include_path PATH

lm-eval 0.4 loads models only from its own table (``lm_eval.models.MODEL_MAPPING``); it has no plugin entry
points. So ``python -m xlstm_eqx.eval.lm_eval_registration install`` writes a ``.pth`` file into the
environment's site-packages (``make`` does this when it sets up ``.venv``). At interpreter start it loads this
file by path (no jax, no xlstm_eqx import: start-up stays fast) and adds an import hook that, right after
``lm_eval.models`` has filled the registry, registers ``xlstm_eqx`` as a lazy ``"module:Class"`` entry. The
adapter itself is imported only when a run asks for it. ``uninstall`` removes the file; ``status`` reports.

This module must import nothing outside the standard library.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import sysconfig
from pathlib import Path

MODEL_NAME = "xlstm_eqx"
TARGET = "xlstm_eqx.eval.lm_adapter:XlstmEqxLM"
PTH_NAME = "xlstm_eqx_lm_eval.pth"
WATCHED = "lm_eval.models"


def register() -> None:
    """Adds ``xlstm_eqx`` to lm-eval's model registry now (lm-eval must be importable)."""
    import lm_eval.models  # noqa: F401  (fills the registry with lm-eval's own models first)
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=TARGET)


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the real loader of ``lm_eval.models``, then registers ``xlstm_eqx``."""

    def __init__(self, inner: importlib.abc.Loader):
        self.inner = inner

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module) -> None:
        self.inner.exec_module(module)
        register()

    def __getattr__(self, name: str):  # resource readers and the like
        return getattr(self.inner, name)


class RegistrationFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it wraps the loader the other finders give ``lm_eval.models``."""

    def find_spec(self, fullname, path, target=None):
        if fullname != WATCHED:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


def install_import_hook() -> None:
    """Registers ``xlstm_eqx`` whenever lm-eval's model table is imported (now, if it already was)."""
    if WATCHED in sys.modules:
        register()
    elif not any(isinstance(finder, RegistrationFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, RegistrationFinder())


def pth_line() -> str:
    """The one line the ``.pth`` file holds: load this file by path and install the hook; silent if it moved."""
    here = str(Path(__file__).resolve())
    return (
        f"import os, importlib.util as u; p = {here!r}; s = os.path.isfile(p) and "
        "u.spec_from_file_location('_xlstm_eqx_lm_eval_registration', p); m = s and u.module_from_spec(s); "
        "s and (s.loader.exec_module(m), m.install_import_hook())\n"
    )


def pth_path() -> Path:
    return Path(sysconfig.get_paths()["purelib"]) / PTH_NAME


def main(argv: list[str] | None = None) -> int:
    command = (argv if argv is not None else sys.argv[1:]) or ["status"]
    path = pth_path()
    if command == ["install"]:
        path.write_text(pth_line())
        print(f"lm-eval will find --model {MODEL_NAME}: wrote {path}")
    elif command == ["uninstall"]:
        path.unlink(missing_ok=True)
        print(f"removed {path}")
    elif command == ["status"]:
        state = "installed" if path.is_file() and path.read_text() == pth_line() else "not installed"
        print(f"{state}: {path}")
    else:
        print("usage: python -m xlstm_eqx.eval.lm_eval_registration install|uninstall|status", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
