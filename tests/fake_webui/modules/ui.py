"""Mirrors the page of ``modules/ui.py`` ``create_ui()`` (v1.10.1), only as far as the extension meets it in a browser.

Kept from the real code: the quicksettings checkpoint dropdown (``elem_id="setting_sd_model_checkpoint"``, choices
from the checkpoint titles, its ``change`` event setting the option), the hidden ``change_checkpoint`` button with the
real ``_js`` and ``run_settings_single`` (``modules/ui_settings.py``: ``opts.set``; when the option did not change,
the answer is the option's value, else the value with fresh choices), the extension tabs from ``ui_tabs_callback``
rendered as ``gr.TabItem(label, id=ifid, elem_id=f"tab_{ifid}")``, and the page's script functions that extensions
call: ``gradioApp()`` (script.js), ``selectCheckpoint(name)`` and ``updateInput(target)`` (javascript/ui.js); of the
txt2img tab only its prompt (``gr.Textbox(elem_id="txt2img_prompt", lines=3)``, as ``ui_toprow.Toprow`` makes it) and
a Generate button that records the prompt gradio holds (``fake.record("txt2img", prompt=...)``; it generates
nothing).  Not mirrored: img2img, the settings tab, themes, localisation, ``opts.save`` (no config file).
"""

from __future__ import annotations

import json
from typing import Any

from modules import fake, script_callbacks, sd_models, shared

# script.js and javascript/ui.js of v1.10.1, the parts an extension calls.  The real page loads them as <script>
# tags; here a load event defines them on window, which is the same global scope.
PAGE_JS = """() => {
    window.gradioApp = function() {
        const elems = document.getElementsByTagName('gradio-app');
        const elem = elems.length == 0 ? document : elems[0];
        if (elem !== document) {
            elem.getElementById = function(id) {
                return document.getElementById(id);
            };
        }
        return elem.shadowRoot ? elem.shadowRoot : elem;
    };
    window.updateInput = function(target) {
        let e = new Event("input", {bubbles: true});
        Object.defineProperty(e, "target", {value: target});
        target.dispatchEvent(e);
    };
    window.desiredCheckpointName = null;
    window.selectCheckpoint = function(name) {
        desiredCheckpointName = name;
        gradioApp().getElementById('change_checkpoint').click();
    };
}"""
CHANGE_CHECKPOINT_JS = (  # verbatim
    "function(v){ var res = desiredCheckpointName; desiredCheckpointName = ''; return [res || v, null]; }"
)


def _dumpjson() -> str:
    return json.dumps(shared.opts.data, default=str)


def get_value_for_setting(key: str) -> Any:
    """Real (ui_settings.py): the option's value with its component_args (for the checkpoint: fresh choices)."""
    import gradio as gr

    args = {"choices": sd_models.checkpoint_tiles()} if key == "sd_model_checkpoint" else {}
    return gr.update(value=getattr(shared.opts, key), **args)


def run_settings_single(value: Any, key: str) -> tuple[Any, str]:
    """Real (ui_settings.py ``UiSettings.run_settings_single``), less ``same_type`` and ``opts.save``."""
    import gradio as gr

    if value is None or not shared.opts.set(key, value):
        return gr.update(value=getattr(shared.opts, key)), _dumpjson()
    return get_value_for_setting(key), _dumpjson()


def _generate(prompt: str) -> str:
    """Fake only: what txt2img would be asked for (the prompt as gradio holds it, the model loaded)."""
    model = sd_models.model_data.sd_model
    title = getattr(getattr(model, "sd_checkpoint_info", None), "title", "")
    fake.record("txt2img", prompt=prompt, model=title)
    return f"{title}: {prompt}"


def create_ui() -> Any:
    """The page: quicksettings (the checkpoint dropdown) above the tabs, with each extension's tab."""
    import gradio as gr

    interfaces = script_callbacks.ui_tabs_callback()
    with gr.Blocks(analytics_enabled=False, title="Stable Diffusion") as demo:
        with gr.Row(elem_id="quicksettings"):
            checkpoint = gr.Dropdown(
                label="Stable Diffusion checkpoint",
                choices=sd_models.checkpoint_tiles(),
                value=shared.opts.sd_model_checkpoint,
                elem_id="setting_sd_model_checkpoint",
            )
        text_settings = gr.Textbox(elem_id="settings_json", value=_dumpjson, visible=False)
        dummy_component = gr.Label(visible=False)
        with gr.Tabs(elem_id="tabs"):
            with gr.TabItem("txt2img", id="txt2img", elem_id="tab_txt2img"):
                prompt = gr.Textbox(label="Prompt", elem_id="txt2img_prompt", show_label=False, lines=3)
                generate = gr.Button("Generate", elem_id="txt2img_generate")
                generated = gr.Textbox(elem_id="txt2img_generated", interactive=False, show_label=False)
                generate.click(_generate, prompt, generated)
            for interface, label, ifid in interfaces:
                with gr.TabItem(label, id=ifid, elem_id=f"tab_{ifid}"):
                    interface.render()
        checkpoint.change(
            fn=lambda value: run_settings_single(value, key="sd_model_checkpoint"),
            inputs=[checkpoint],
            outputs=[checkpoint, text_settings],
        )
        button_set_checkpoint = gr.Button("Change checkpoint", elem_id="change_checkpoint", visible=False)
        button_set_checkpoint.click(
            fn=lambda value, _: run_settings_single(value, key="sd_model_checkpoint"),
            _js=CHANGE_CHECKPOINT_JS,
            inputs=[checkpoint, dummy_component],
            outputs=[checkpoint, text_settings],
        )
        demo.load(None, None, None, _js=PAGE_JS)
    return demo
