"""Run the pipeline's stage scripts under the project's virtual environment (standard library only).

`.venv/bin/dvc repro` starts each stage as `python pipeline/<stage>.py`, and
without `source .venv/bin/activate` that `python` is whatever comes first on
PATH, usually a system Python without the project's packages. A stage script
calls :func:`use_project_venv` first, which re-executes it under
`.venv/bin/python` in that one case.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

_GUARD = "SRMAP_VENV_REEXEC"  # set on re-execution


def use_project_venv(root: str | os.PathLike | None = None) -> None:
    """Re-execute the running script under ``<root>/.venv/bin/python`` when this interpreter lacks torch.

    Does nothing when torch is importable here (an activated venv, conda, a
    cluster module), when ``<root>/.venv/bin/python`` does not exist, or when
    this interpreter already is the project's. ``root`` defaults to the
    repository root. On re-execution ``sys.argv`` is passed on unchanged and
    this call does not return.
    """
    root = Path(root) if root is not None else Path(__file__).resolve().parents[1]
    venv = root / ".venv"
    python = venv / "bin" / "python"
    if importlib.util.find_spec("torch") is not None or not python.is_file():
        return
    if Path(sys.prefix).resolve() == venv.resolve() or os.environ.get(_GUARD):
        return  # the venv itself lacks torch: let the stage fail with its own import error
    os.environ[_GUARD] = "1"  # never loop, whatever the venv turns out to hold
    os.execv(str(python), [str(python), *sys.argv])
