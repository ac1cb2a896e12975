"""Serve the fake WebUI's page with the extension loaded, as ``webui.py`` does: for browser tests.

``python tests/fake_webui/webui.py ROOT PORT BASE [OTHER ...]`` resets the fake under ROOT, puts the base checkpoint
BASE (with its sidecar yaml) and any OTHER ones into ``ROOT/models/Stable-diffusion`` and loads BASE, imports the fake
``networks`` (as the Lora extension's script does), runs the extension's ``scripts/`` file (which
registers the tab and the routes), builds the page (``modules.ui.create_ui``) and serves it on 127.0.0.1:PORT until
killed.  The caller sets ``DREAMBOOTH_ALLOWED_ROOTS`` / ``DREAMBOOTH_DATA_DIR`` as it needs.
"""

from __future__ import annotations

import runpy
import shutil
import sys
import time
from pathlib import Path

FAKE = Path(__file__).resolve().parent
ROOT = FAKE.parents[1]


def main(root: str, port: int, base: str, *others: str) -> None:
    sys.path.insert(0, str(FAKE))
    from modules import fake, paths, script_callbacks, ui

    fake.reset(root)
    folder = Path(paths.models_path) / "Stable-diffusion"
    folder.mkdir(parents=True, exist_ok=True)
    source = Path(base)
    for checkpoint in (source, *map(Path, others)):
        for path in (checkpoint, checkpoint.with_suffix(".yaml")):
            if path.is_file():
                shutil.copy(path, folder / path.name)
    fake.load_checkpoint(folder / source.name)
    import networks  # noqa: F401  (the Lora extension's script imports it at start: sys.modules["networks"])

    runpy.run_path(str(ROOT / "scripts" / "dreambooth_tab.py"))
    demo = ui.create_ui()
    demo.queue(concurrency_count=4)
    app, _, _ = demo.launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, show_api=False, quiet=True
    )
    script_callbacks.app_started_callback(demo, app)
    print(f"fake WebUI at http://127.0.0.1:{port}", flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3], *sys.argv[4:])
