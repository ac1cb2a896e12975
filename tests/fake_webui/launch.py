"""Mirrors the WebUI's ``launch.py`` (v1.10.1) as seen by an extension's ``install.py``: ``is_installed``, ``run_pip``,
``run``, ``python``, ``args`` (real: from ``modules/launch_utils.py``).

Nothing is ever installed or executed: every call is recorded in ``calls`` as ``(function, arguments)``.
``is_installed(package)`` answers, in order: the fake's ``installed`` overrides (names compared case-insensitively,
``_`` = ``-``), then ``default_installed`` if it is not None, else the real check (``importlib.metadata.distribution``,
then ``importlib.util.find_spec``). ``run_pip("install a==1 b>=2 ...")`` marks the named packages installed, so a
second run of an ``install.py`` sees them. ``run_pip`` returns None with ``args.skip_install`` (real), else ``""``; it
raises ``RuntimeError`` like the real one when ``pip_fails`` is set.
Fake only: ``configure(missing=..., present=..., others_installed=...)``, ``reset()``, ``pip_commands()``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import re
import shlex
import sys
from collections.abc import Iterable
from typing import Any

python = sys.executable
git = os.environ.get("GIT", "git")
index_url = os.environ.get("INDEX_URL", "")
dir_repos = "repositories"
default_command_live = os.environ.get("WEBUI_LAUNCH_LIVE_OUTPUT") == "1"
args = argparse.Namespace(skip_install=False, skip_prepare_environment=False, reinstall_torch=False)

calls: list[tuple[str, dict[str, Any]]] = []
installed: dict[str, bool] = {}
default_installed: bool | None = None
pip_fails = False


_PIP_OPTIONS_WITH_VALUE = {
    "-r",
    "--requirement",
    "-c",
    "--constraint",
    "-i",
    "--index-url",
    "--extra-index-url",
    "-f",
    "--find-links",
    "-e",
    "--editable",
    "-t",
    "--target",
    "--prefix",
    "--root",
}


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def configure(missing: Iterable[str] = (), present: Iterable[str] = (), others_installed: bool | None = True) -> None:
    """Fake only (starts with ``reset()``): names in ``missing`` report False, in ``present`` True, every other name
    ``others_installed`` (None: ask the real environment)."""
    global default_installed
    reset()
    default_installed = others_installed
    for name in present:
        installed[_canon(name)] = True
    for name in missing:
        installed[_canon(name)] = False


def reset() -> None:
    global default_installed, pip_fails
    calls.clear()
    installed.clear()
    default_installed = None
    pip_fails = False
    args.skip_install = False


def is_installed(package: str) -> bool:
    calls.append(("is_installed", {"package": package}))
    known = installed.get(_canon(package))
    if known is not None:
        return known
    if default_installed is not None:
        return default_installed
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        try:
            spec = importlib.util.find_spec(package)
        except ModuleNotFoundError:
            return False
        return spec is not None
    return dist is not None


def run(
    command: str,
    desc: str | None = None,
    errdesc: str | None = None,
    custom_env: Any = None,
    live: bool = default_command_live,
) -> str:
    calls.append(("run", {"command": command, "desc": desc, "errdesc": errdesc, "live": live}))
    if desc is not None:
        print(desc)
    return ""


def run_pip(command: str, desc: str | None = None, live: bool = default_command_live) -> str | None:
    calls.append(("run_pip", {"command": command, "desc": desc, "live": live}))
    if args.skip_install:
        return None
    if pip_fails:
        raise RuntimeError(
            f'Couldn\'t install {desc}.\nCommand: "{python}" -m pip {command} --prefer-binary\nError code: 1'
        )
    words = shlex.split(command)
    if words and words[0] == "install":
        skip_next = False
        for word in words[1:]:
            if skip_next or word.startswith("-"):
                skip_next = word in _PIP_OPTIONS_WITH_VALUE
                continue
            name = re.split(r"[<>=!~\[;@ ]", word, maxsplit=1)[0]
            if name:
                installed[_canon(name)] = True
    print(f"Installing {desc}")
    return ""


def pip_commands() -> list[str]:
    """Fake only: the ``command`` of every ``run_pip`` call, in order."""
    return [a["command"] for name, a in calls if name == "run_pip"]


def git_tag() -> str:
    return "v1.10.1"


def commit_hash() -> str:
    return "82a973c04367123ae98bd9abdf80d9eda9b910e2"


def repo_dir(name: str) -> str:
    return os.path.join(os.path.dirname(__file__), dir_repos, name)  # noqa: PTH118, PTH120
