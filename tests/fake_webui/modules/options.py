"""Mirrors ``modules/options.py`` (v1.10.1): ``OptionInfo``, ``options_section`` and ``Options``.

``Options.set`` is the real algorithm line for line (including what it returns); the fake records each call as
``opts.set`` with its result. Not mirrored: ``--freeze-settings-in-sections`` / ``--freeze-specific-settings``,
``save``/``load`` to a json file, ``dumpjson``; ``component`` is whatever the caller passes (the fake never builds
gradio components).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from modules import errors, fake


class OptionInfo:
    def __init__(
        self,
        default: Any = None,
        label: str = "",
        component: Any = None,
        component_args: Any = None,
        onchange: Callable[[], Any] | None = None,
        section: tuple[Any, ...] | None = None,
        refresh: Callable[[], Any] | None = None,
        comment_before: str = "",
        comment_after: str = "",
        infotext: str | None = None,
        restrict_api: bool = False,
        category_id: str | None = None,
    ):
        self.default = default
        self.label = label
        self.component = component
        self.component_args = component_args
        self.onchange = onchange
        self.section = section
        self.category_id = category_id
        self.refresh = refresh
        self.do_not_save = False
        self.comment_before = comment_before
        self.comment_after = comment_after
        self.infotext = infotext
        self.restrict_api = restrict_api

    def link(self, label: str, url: str) -> OptionInfo:
        self.comment_before += f"[<a href='{url}' target='_blank'>{label}</a>]"
        return self

    def js(self, label: str, js_func: str) -> OptionInfo:
        self.comment_before += f"[<a onclick='{js_func}(); return false'>{label}</a>]"
        return self

    def info(self, info: str) -> OptionInfo:
        self.comment_after += f"<span class='info'>({info})</span>"
        return self

    def html(self, html: str) -> OptionInfo:
        self.comment_after += html
        return self

    def needs_restart(self) -> OptionInfo:
        self.comment_after += " <span class='info'>(requires restart)</span>"
        return self

    def needs_reload_ui(self) -> OptionInfo:
        self.comment_after += " <span class='info'>(requires Reload UI)</span>"
        return self


def options_section(section_identifier: tuple[Any, ...], options_dict: dict[str, OptionInfo]) -> dict[str, OptionInfo]:
    for v in options_dict.values():
        if len(section_identifier) == 2:
            v.section = section_identifier
        elif len(section_identifier) == 3:
            v.section = section_identifier[0:2]
            v.category_id = section_identifier[2]

    return options_dict


options_builtin_fields = {"data_labels", "data", "restricted_opts", "typemap", "_templates"}


class Options:
    typemap = {int: float}  # noqa: RUF012 (as in the real class)

    def __init__(self, data_labels: dict[str, OptionInfo], restricted_opts: set[str]):
        self._templates = dict(data_labels)
        self.data_labels = data_labels
        self.data = {k: v.default for k, v in self.data_labels.items() if not v.do_not_save}
        self.restricted_opts = restricted_opts

    def __setattr__(self, key: str, value: Any) -> None:
        if key in options_builtin_fields:
            return super().__setattr__(key, value)

        if self.data is not None and (key in self.data or key in self.data_labels):
            from modules import shared

            assert not shared.cmd_opts.freeze_settings, "changing settings is disabled"

            info = self.data_labels.get(key, None)
            if info.do_not_save:
                return None

            comp_args = info.component_args if info else None
            if isinstance(comp_args, dict) and comp_args.get("visible", True) is False:
                raise RuntimeError(f"not possible to set '{key}' because it is restricted")

            if shared.cmd_opts.hide_ui_dir_config and key in self.restricted_opts:
                raise RuntimeError(f"not possible to set '{key}' because it is restricted with --hide_ui_dir_config")

            self.data[key] = value
            return None

        return super().__setattr__(key, value)

    def __getattr__(self, item: str) -> Any:
        if item in options_builtin_fields:
            return super().__getattribute__(item)

        if self.data is not None and item in self.data:
            return self.data[item]

        if item in self.data_labels:
            return self.data_labels[item].default

        return super().__getattribute__(item)

    def set(self, key: str, value: Any, is_api: bool = False, run_callbacks: bool = True) -> bool:
        """sets an option and calls its onchange callback, returning True if the option changed and False otherwise"""
        result = self._set(key, value, is_api, run_callbacks)
        fake.record("opts.set", key=key, value=value, is_api=is_api, run_callbacks=run_callbacks, result=result)
        return result

    def _set(self, key: str, value: Any, is_api: bool, run_callbacks: bool) -> bool:
        oldval = self.data.get(key, None)
        if oldval == value:
            return False

        option = self.data_labels[key]
        if option.do_not_save:
            return False

        if is_api and option.restrict_api:
            return False

        try:
            setattr(self, key, value)
        except RuntimeError:
            return False

        if run_callbacks and option.onchange is not None:
            try:
                option.onchange()
            except Exception as e:
                errors.display(e, f"changing setting {key} to {value}")
                setattr(self, key, oldval)
                return False

        return True

    def get_default(self, key: str) -> Any:
        data_label = self.data_labels.get(key)
        if data_label is None:
            return None

        return data_label.default

    def onchange(self, key: str, func: Callable[[], Any], call: bool = True) -> None:
        item = self.data_labels.get(key)
        item.onchange = func

        if call:
            func()

    def add_option(self, key: str, info: OptionInfo) -> None:
        self.data_labels[key] = info
        if key not in self.data and not info.do_not_save:
            self.data[key] = info.default

    def reset(self) -> None:
        """Fake only: back to the built-in options (dropping options added since) and their defaults."""
        self.data_labels = dict(self._templates)
        self.data = {k: v.default for k, v in self.data_labels.items() if not v.do_not_save}
