"""Where vLLM lives: its own environment, ``.venv-vllm`` (``make vllm``).

vLLM pins transformers and numpy versions of its own, so ivp installs it beside the
main environment rather than in it (``scripts/install-vllm.sh``); ``ivp server
--engine vllm`` runs with that environment's Python, everything else with the main
one. This module needs no vLLM: it only finds that Python.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ENV = "IVP_VLLM_PYTHON"  # overrides where the vLLM environment's Python is
REPO = Path(__file__).resolve().parents[3]  # src/ivp/engine/ -> the checkout


def vllm_python() -> str | None:
    """The Python that imports vLLM: $IVP_VLLM_PYTHON, else .venv-vllm/bin/python of
    this checkout once its install finished; None when neither exists."""
    given = os.environ.get(ENV)
    if given:
        return given if Path(given).exists() else None
    venv = REPO / ".venv-vllm"
    return str(venv / "bin" / "python") if (venv / ".installed").exists() else None


def require_vllm_python() -> str:
    """:func:`vllm_python`, or RuntimeError saying how to install vLLM."""
    python = vllm_python()
    if python is None:
        raise RuntimeError("vLLM is not installed: run `make vllm` (or set "
                           f"{ENV} to a Python that imports vllm)")
    return python


def vllm_version(python: str) -> str:
    """vLLM's version as that Python imports it (a quick check that it works)."""
    out = subprocess.run([python, "-c", "import vllm; print(vllm.__version__)"],
                         capture_output=True, text=True, timeout=300, check=True)
    return out.stdout.strip().splitlines()[-1]


__all__ = ["ENV", "require_vllm_python", "vllm_python", "vllm_version"]
