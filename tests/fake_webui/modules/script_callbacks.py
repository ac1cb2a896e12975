"""Mirrors ``modules/script_callbacks.py`` (v1.10.1): registration of extension callbacks and the runners calling them.

Same ``on_*`` signatures and the same ``callback_map`` categories. Simplified: callbacks run in registration order
(the real one may reorder them by extension metadata and the user's priority settings), and the callback name uses
``"fake/<file>/<category>"``. As in the real runners, an exception in one callback is reported (``errors.report``) and
does not stop the others; the fake also keeps ``(category, exception)`` in ``exceptions`` so a test can fail on it.

Fake-only helpers: ``registered(category)``, ``registered_ui_tabs()``, ``clear()``, ``exceptions``.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from collections.abc import Callable
from typing import Any

from modules import errors, fake


@dataclasses.dataclass
class ScriptCallback:
    script: str
    callback: Any
    name: str = "unnamed"


callback_map: dict[str, list[ScriptCallback]] = {
    "callbacks_app_started": [],
    "callbacks_model_loaded": [],
    "callbacks_ui_tabs": [],
    "callbacks_ui_train_tabs": [],
    "callbacks_ui_settings": [],
    "callbacks_before_image_saved": [],
    "callbacks_image_saved": [],
    "callbacks_extra_noise": [],
    "callbacks_cfg_denoiser": [],
    "callbacks_cfg_denoised": [],
    "callbacks_cfg_after_cfg": [],
    "callbacks_before_component": [],
    "callbacks_after_component": [],
    "callbacks_image_grid": [],
    "callbacks_infotext_pasted": [],
    "callbacks_script_unloaded": [],
    "callbacks_before_ui": [],
    "callbacks_on_reload": [],
    "callbacks_list_optimizers": [],
    "callbacks_list_unets": [],
    "callbacks_before_token_counter": [],
}

exceptions: list[tuple[str, BaseException]] = []


def add_callback(
    callbacks: list[ScriptCallback],
    fun: Callable[..., Any],
    *,
    name: str | None = None,
    category: str = "unknown",
    filename: str | None = None,
) -> None:
    if filename is None:
        stack = [x for x in inspect.stack() if x.filename != __file__]
        filename = stack[0].filename if stack else "unknown file"

    callback_name = f"fake/{os.path.basename(filename)}/{category}"  # noqa: PTH119
    if name is not None:
        callback_name += f"/{name}"

    unique_callback_name = callback_name
    for index in range(1000):
        if not any(x.name == unique_callback_name for x in callbacks):
            break
        unique_callback_name = f"{callback_name}-{index + 1}"

    callbacks.append(ScriptCallback(filename, fun, unique_callback_name))


def ordered_callbacks(category: str, unordered_callbacks: list[ScriptCallback] | None = None) -> list[ScriptCallback]:
    """Real: sorted by extension metadata and user priorities; fake: registration order."""
    if unordered_callbacks is None:
        unordered_callbacks = callback_map.get("callbacks_" + category, [])
    return list(unordered_callbacks)


def clear_callbacks() -> None:
    for callback_list in callback_map.values():
        callback_list.clear()


def _report(c: ScriptCallback, job: str, category: str, e: BaseException) -> None:
    exceptions.append((category, e))
    errors.report(f"Error executing callback {job} for {c.script}", exc_info=True)


def app_started_callback(demo: Any, app: Any) -> None:
    """Real: called with ``(shared.demo, app)`` after launch, or ``(None, app)`` with ``--nowebui``."""
    fake.record("script_callbacks.app_started_callback", demo=demo, app=app)
    for c in ordered_callbacks("app_started"):
        try:
            c.callback(demo, app)
        except Exception as e:
            _report(c, "app_started_callback", "app_started", e)


def app_reload_callback() -> None:
    for c in ordered_callbacks("on_reload"):
        try:
            c.callback()
        except Exception as e:
            _report(c, "callbacks_on_reload", "on_reload", e)


def model_loaded_callback(sd_model: Any) -> None:
    for c in ordered_callbacks("model_loaded"):
        try:
            c.callback(sd_model)
        except Exception as e:
            _report(c, "model_loaded_callback", "model_loaded", e)


def ui_tabs_callback() -> list[tuple[Any, str, str]]:
    """Real: concatenates what each callback returns (``None`` counts as ``[]``)."""
    res: list[tuple[Any, str, str]] = []
    for c in ordered_callbacks("ui_tabs"):
        try:
            res += c.callback() or []
        except Exception as e:
            _report(c, "ui_tabs_callback", "ui_tabs", e)
    return res


def ui_settings_callback() -> None:
    for c in ordered_callbacks("ui_settings"):
        try:
            c.callback()
        except Exception as e:
            _report(c, "ui_settings_callback", "ui_settings", e)


def script_unloaded_callback() -> None:
    """Real: runs in reverse registration order."""
    for c in reversed(ordered_callbacks("script_unloaded")):
        try:
            c.callback()
        except Exception as e:
            _report(c, "script_unloaded", "script_unloaded", e)


def before_ui_callback() -> None:
    for c in reversed(ordered_callbacks("before_ui")):
        try:
            c.callback()
        except Exception as e:
            _report(c, "before_ui", "before_ui", e)


def remove_current_script_callbacks() -> None:
    stack = [x for x in inspect.stack() if x.filename != __file__]
    filename = stack[0].filename if stack else "unknown file"
    if filename == "unknown file":
        return
    for callback_list in callback_map.values():
        for callback_to_remove in [cb for cb in callback_list if cb.script == filename]:
            callback_list.remove(callback_to_remove)


def remove_callbacks_for_function(callback_func: Callable[..., Any]) -> None:
    for callback_list in callback_map.values():
        for callback_to_remove in [cb for cb in callback_list if cb.callback == callback_func]:
            callback_list.remove(callback_to_remove)


def on_app_started(callback: Callable[[Any, Any], Any], *, name: str | None = None) -> None:
    """register a function to be called when the webui started, the gradio `Block` component and
    fastapi `FastAPI` object are passed as the arguments"""
    add_callback(callback_map["callbacks_app_started"], callback, name=name, category="app_started")


def on_before_reload(callback: Callable[[], Any], *, name: str | None = None) -> None:
    add_callback(callback_map["callbacks_on_reload"], callback, name=name, category="on_reload")


def on_model_loaded(callback: Callable[[Any], Any], *, name: str | None = None) -> None:
    add_callback(callback_map["callbacks_model_loaded"], callback, name=name, category="model_loaded")


def on_ui_tabs(callback: Callable[[], Any], *, name: str | None = None) -> None:
    """The function must return None or a list of ``(gradio_component, title, elem_id)`` tuples."""
    add_callback(callback_map["callbacks_ui_tabs"], callback, name=name, category="ui_tabs")


def on_ui_settings(callback: Callable[[], Any], *, name: str | None = None) -> None:
    add_callback(callback_map["callbacks_ui_settings"], callback, name=name, category="ui_settings")


def on_script_unloaded(callback: Callable[[], Any], *, name: str | None = None) -> None:
    """register a function to be called before the script is unloaded. Any hooks/hijacks/monkeying about that
    the script did should be reverted here"""
    add_callback(callback_map["callbacks_script_unloaded"], callback, name=name, category="script_unloaded")


def on_before_ui(callback: Callable[[], Any], *, name: str | None = None) -> None:
    add_callback(callback_map["callbacks_before_ui"], callback, name=name, category="before_ui")


# ------------------------------------------------------------------------------------------- fake-only helpers


def registered(category: str) -> list[Callable[..., Any]]:
    """The callables registered for ``category`` (``"ui_tabs"``, ``"app_started"``, ``"script_unloaded"`` ...)."""
    return [c.callback for c in callback_map["callbacks_" + category]]


def registered_ui_tabs() -> list[Callable[..., Any]]:
    return registered("ui_tabs")


def clear() -> None:
    """``clear_callbacks()`` plus the recorded exceptions."""
    clear_callbacks()
    exceptions.clear()
