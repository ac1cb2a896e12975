"""``python -m dreambooth ui``: the DreamBooth tab as its own Gradio app on 127.0.0.1 (no WebUI needed).

The models folder is laid out like the WebUI's: base models in ``DIR/Stable-diffusion`` (trained checkpoints land
there too), trained LoRA files in ``DIR/Lora``, our runs and saved settings in ``DIR/dreambooth``.  The REST routes
are served beside the page; with ``auth`` ("user:pass", several separated by commas) the page asks for a login
(gradio's) and the routes for HTTP basic auth with the same credentials.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..host import Host, default_allowed_roots
from ..runner import Runner

STYLE = Path(__file__).resolve().parents[2] / "style.css"


def launch(
    models_dir: str | os.PathLike,
    port: int = 7870,
    allowed_roots: list[str] | None = None,
    block: bool = True,
    write_roots: list[str] | None = None,
    auth: str | None = None,
) -> tuple[Any, Any, Runner]:
    """Start the app; returns (blocks, tab, runner).  ``block=False`` returns at once (tests, embedding).

    ``allowed_roots`` are added to the default read roots (home, the current folder, the models folder, or
    ``$DREAMBOOTH_ALLOWED_ROOTS``); ``write_roots`` to the folders the app may write (the checkpoint folder,
    ``DIR/Lora`` and ``DIR/dreambooth``, plus ``$DREAMBOOTH_WRITE_ROOTS``).
    """
    from ..errors import DreamBoothError
    from ..host import default_write_roots
    from .api import parse_credentials, register_routes
    from .tab import build_tab

    credentials = parse_credentials(auth)
    if credentials is not None and not credentials:
        raise DreamBoothError(f"--auth '{auth}': give user:password (several separated by commas)")
    models = Path(models_dir).resolve()
    host = Host(
        models,
        allowed_roots=[*default_allowed_roots(models, Path.cwd()), *(allowed_roots or [])],
        write_roots=[*default_write_roots(), *(write_roots or [])],
    )
    host.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    host.lora_dir.mkdir(parents=True, exist_ok=True)
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
        auth=list(credentials.items()) if credentials else None,
    )
    register_routes(app, runner, credentials=credentials)
    print(f"DreamBooth is at http://127.0.0.1:{port} (models: {host.models_dir})", flush=True)
    if block:
        blocks.block_thread()
    return blocks, tab, runner
