"""The WebUI glue: the only place (with ``scripts/``) that imports the WebUI's ``modules``.

:func:`register` is called by the thin script in ``scripts/``: it registers the DreamBooth tab (``on_ui_tabs``) and
the REST routes (``on_app_started``): only when the WebUI serves its API (``--api``, as its own routes), and behind
HTTP basic auth with the ``--api-auth`` credentials when set.  One runner per WebUI process.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

TAB_TITLE = "DreamBooth"
TAB_ID = "dreambooth_tab"
DATA_DIR_ENV = "DREAMBOOTH_DATA_DIR"  # where runs and saved settings go (default: the extension's data/ folder)
_state: dict[str, Any] = {}


def runner() -> Any:
    """The process's one runner (created on first use, with the WebUI host)."""
    if "runner" not in _state:
        from ..runner import Runner
        from .host import WebuiHost

        data_dir = os.environ.get(DATA_DIR_ENV) or Path(__file__).resolve().parents[2] / "data"
        host = WebuiHost(data_dir, runner_busy=lambda: _state["runner"].snapshot().is_running)
        _state["runner"] = Runner(host)
    return _state["runner"]


def on_ui_tabs() -> list[tuple[Any, str, str]]:
    from ..ui.tab import build_tab

    blocks, _ = build_tab(runner().host, runner())
    return [(blocks, TAB_TITLE, TAB_ID)]


def on_app_started(demo: Any, app: Any) -> None:
    """The REST routes, like the WebUI's own API: none without ``--api``; ``--api-auth`` credentials when set."""
    from modules import shared

    from ..ui.api import parse_credentials, register_routes
    from .host import api_enabled

    if not api_enabled(shared.cmd_opts):
        return
    register_routes(app, runner(), credentials=parse_credentials(getattr(shared.cmd_opts, "api_auth", None)))


def register() -> None:
    from modules import script_callbacks

    script_callbacks.on_ui_tabs(on_ui_tabs)
    script_callbacks.on_app_started(on_app_started)
