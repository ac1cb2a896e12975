"""The core imports neither gradio nor the WebUI's ``modules``, and importing the package is cheap."""

from __future__ import annotations

import pkgutil
import subprocess
import sys
from pathlib import Path

import dreambooth

ROOT = Path(__file__).resolve().parents[1]
UI_ONLY = {"dreambooth.ui", "dreambooth.webui"}


def core_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(dreambooth.__path__, "dreambooth."):
        if info.name == "dreambooth.__main__" or any(info.name.startswith(p) for p in UI_ONLY):
            continue
        names.append(info.name)
    return names


def test_core_imports_without_gradio_or_webui_modules():
    script = (
        "import sys\n"
        "sys.modules['gradio'] = None\n"
        "sys.modules['modules'] = None\n"
        f"import importlib\nfor name in {core_modules()!r}:\n    importlib.import_module(name)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(core_modules()) >= 8


def test_importing_the_package_does_not_import_heavy_libraries():
    script = (
        "import sys, dreambooth, dreambooth.cli, dreambooth.models.components\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'gradio') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
