#!/usr/bin/env python3
"""Set-up and entry point on a fresh machine: ``python bootstrap.py demo`` or ``python bootstrap.py test``.

Only the standard library is used here, so this runs with any Python 3.10+ that has pip and venv.

Environments (created on first use, refreshed when their requirement files change):

* ``.venv``        -- the *latest* world: current diffusers / transformers / accelerate. Runs the demo and
                      the part of the test suite that does not need gradio.
* ``.venv-webui``  -- the versions AUTOMATIC1111 v1.10.1 pins (gradio 3.41.2, transformers 4.30.2, ...).
                      Runs the whole test suite.

torch is installed first and on its own, from ``$DREAMBOOTH_TORCH`` (a pip requirement, default
``torch==2.13.0``); an environment that already has torch keeps it.  Nothing here downloads model weights.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
ENVS = {
    "latest": (ROOT / ".venv", ROOT / "envs" / "latest.txt"),
    "webui": (ROOT / ".venv-webui", ROOT / "envs" / "webui.txt"),
}
NO_DEPS = ROOT / "envs" / "no-deps.txt"
CHROMIUM = "/usr/bin/chromium"
TORCH_SPEC = os.environ.get("DREAMBOOTH_TORCH", "torch==2.13.0")


def _python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _run(cmd: list[str | Path], **kwargs) -> int:
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.call([str(c) for c in cmd], cwd=ROOT, **kwargs)


def _check(cmd: list[str | Path]) -> None:
    code = _run(cmd)
    if code != 0:
        raise SystemExit(f"bootstrap: command failed with exit code {code}: {' '.join(map(str, cmd))}")


def _stamp(requirements: Path) -> str:
    digest = hashlib.sha256(TORCH_SPEC.encode())
    for path in (requirements, NO_DEPS, Path(__file__)):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def ensure_env(name: str) -> Path:
    """Create or refresh one environment; return its python."""
    venv, requirements = ENVS[name]
    python = _python(venv)
    stamp_file = venv / ".bootstrap-stamp"
    stamp = _stamp(requirements)
    if python.exists() and stamp_file.exists() and stamp_file.read_text() == stamp:
        return python
    print(f"bootstrap: preparing the '{name}' environment in {venv.name} ...", flush=True)
    if not python.exists():
        _check([sys.executable, "-m", "venv", venv])
    pip = [python, "-m", "pip", "--disable-pip-version-check"]
    has_torch = subprocess.call([str(python), "-c", "import torch"], stderr=subprocess.DEVNULL) == 0
    if not has_torch:
        _check([*pip, "install", "-q", TORCH_SPEC])
    # Pin torch to what is there now, so no requirement below can swap it for another build.
    version = subprocess.check_output(
        [str(python), "-c", "import torch; print(torch.__version__.split('+')[0])"], text=True
    ).strip()
    constraint = venv / "torch-constraint.txt"
    constraint.write_text(f"torch=={version}\n")
    _check([*pip, "install", "-q", "-r", requirements, "-c", constraint])
    _check([*pip, "install", "-q", "--no-deps", "-r", NO_DEPS])
    stamp_file.write_text(stamp)
    return python


def ensure_browser() -> None:
    """The browser tests drive Debian's Chromium; install it when missing and we may (root, apt-get)."""
    if Path(CHROMIUM).exists():
        return
    if hasattr(os, "geteuid") and os.geteuid() == 0 and Path("/usr/bin/apt-get").exists():
        print("bootstrap: installing Debian's chromium for the browser tests ...", flush=True)
        quiet = {"stdout": subprocess.DEVNULL}
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        _run(["apt-get", "update", "-qq"], env=env, **quiet)
        _run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, **quiet)
    if not Path(CHROMIUM).exists():
        print(
            f"bootstrap: {CHROMIUM} is missing (apt-get install chromium as root); the browser tests "
            "skip, or fail when CI=true",
            flush=True,
        )


def run_tests(extra: list[str]) -> int:
    latest = ensure_env("latest")
    webui = ensure_env("webui")
    ensure_browser()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    steps = [
        ("lint", [latest, "-m", "ruff", "check", "."]),
        ("format", [latest, "-m", "ruff", "format", "--check", "."]),
        ("tests in the 'webui' environment", [webui, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra]),
        (
            "tests in the 'latest' environment",
            [latest, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gradio", *extra],
        ),
    ]
    failed = []
    for title, cmd in steps:
        print(f"\n=== {title} ===", flush=True)
        if _run(cmd, env=env) != 0:
            failed.append(title)
    if failed:
        print(f"\nbootstrap: FAILED: {', '.join(failed)}", flush=True)
        return 1
    print("\nbootstrap: all checks passed", flush=True)
    return 0


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 10):  # noqa: UP036 - this file may be run by any python3
        raise SystemExit("bootstrap: Python 3.10 or newer is needed")
    if not argv or argv[0] not in {"demo", "test", "env"}:
        print(__doc__)
        print("usage: python bootstrap.py demo [demo options] | test [pytest options] | env latest|webui")
        return 2
    command, rest = argv[0], argv[1:]
    if command == "test":
        return run_tests(rest)
    if command == "env":
        for name in rest or ["latest", "webui"]:
            print(ensure_env(name))
        return 0
    python = ensure_env("latest")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return _run([python, "-m", "dreambooth", "demo", *rest], env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
