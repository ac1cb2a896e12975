"""``python -m dreambooth ui``: the DreamBooth tab as its own Gradio app on 127.0.0.1 (no WebUI needed).

The models folder is laid out like the WebUI's: base models in ``DIR/Stable-diffusion`` (trained checkpoints land
there too), our runs and saved settings in ``DIR/dreambooth``.  The REST routes are served beside the page.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..host import Host
from ..runner import Runner

STYLE = Path(__file__).resolve().parents[2] / "style.css"


def launch(
    models_dir: str | os.PathLike,
    port: int = 7870,
    allowed_roots: list[str] | None = None,
    block: bool = True,
) -> tuple[Any, Any, Runner]:
    """Start the app; returns (blocks, tab, runner).  ``block=False`` returns at once (tests, embedding)."""
    from .api import register_routes
    from .tab import build_tab

    host = Host(models_dir, allowed_roots=allowed_roots)
    host.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    runner = Runner(host)
    css = STYLE.read_text(encoding="utf-8") if STYLE.is_file() else None
    blocks, tab = build_tab(host, runner, css=css)
    blocks.queue(concurrency_count=4)
    app, _, _ = blocks.launch(
        server_name="127.0.0.1",
        server_port=port,
        prevent_thread_lock=True,
        show_api=False,
        inbrowser=False,
        quiet=True,
    )
    register_routes(app, runner)
    print(f"DreamBooth is at http://127.0.0.1:{port} (models: {host.models_dir})", flush=True)
    if block:
        blocks.block_thread()
    return blocks, tab, runner
