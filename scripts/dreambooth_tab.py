"""WebUI entry point: registers the DreamBooth tab and its REST routes.  Thin on purpose.

The package is imported under a private name (:data:`PACKAGE`) from the folder beside this one, so that
- it works whatever the extension's folder is called (a ZIP download renames it), and
- it coexists with another extension whose top-level package is also named ``dreambooth``: neither takes the
  other's ``sys.modules`` entry.
If the package cannot load (a missing or too new dependency), the tab still appears and says what to do.
"""

import importlib
import importlib.util
import sys
import traceback
from pathlib import Path

PACKAGE = "sd_webui_dreambooth_trainer"
SOURCE = Path(__file__).resolve().parents[1] / "dreambooth"


def load_package():
    if PACKAGE in sys.modules:
        return sys.modules[PACKAGE]
    spec = importlib.util.spec_from_file_location(
        PACKAGE, SOURCE / "__init__.py", submodule_search_locations=[str(SOURCE)]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = package
    try:
        spec.loader.exec_module(package)
    except BaseException:
        del sys.modules[PACKAGE]
        raise
    return package


def _error_tab(error_text):
    def tab():
        import gradio as gr

        with gr.Blocks(analytics_enabled=False) as blocks:
            gr.Markdown(
                "## DreamBooth could not start\n"
                f"```\n{error_text}\n```\n"
                "Restart the WebUI once so that the extension's `install.py` runs; if this stays, install the "
                "missing package named above into the WebUI's Python (`venv`), then restart. "
                "The rest of the WebUI is unaffected."
            )
        return [(blocks, "DreamBooth", "dreambooth_tab")]

    return tab


def register():
    from modules import script_callbacks

    try:
        load_package()
        importlib.import_module(PACKAGE + ".webui").register()
    except Exception:
        error_text = traceback.format_exc(limit=3)
        print(f"DreamBooth extension: could not load:\n{error_text}", file=sys.stderr)
        script_callbacks.on_ui_tabs(_error_tab(error_text))


register()
