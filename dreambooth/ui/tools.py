"""The tab's "Dataset tools": prepare (crop / resize / buckets), captioning, masks from transparency, and a caption
editor.

Each tool asks the host's path policy (the page may be reachable from other machines): what it reads lies under the
read roots, what it writes under the write roots.  It never changes an original image: prepare writes a new folder
(a write), captioning and the editor write ``IMAGE.txt`` files beside the images, the mask tool ``IMAGE.mask.png``
files (writes into that folder).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import gradio as gr

from ..errors import DreamBoothError
from ..host import LOCAL_BLIP, Host

MAX_EDITOR_ROWS = 500
CROPS = ["center", "entropy", "focal"]


def _hub_id(text: str) -> bool:
    """``org/name`` (looked up in the local Hugging Face cache, not a path the policy checks)."""
    return re.fullmatch(r"[A-Za-z0-9_-][\w.-]*/[A-Za-z0-9_-][\w.-]*", text) is not None


class DatasetTools:
    def __init__(self, host: Host):
        self.host = host

    def _check(self, read: dict[str, str] | None = None, write: dict[str, str] | None = None) -> str:
        """'' when the server may read each of ``read`` and write each of ``write`` ({label: path}), else the
        sentence saying which it may not."""
        policy = self.host.paths
        for label, path in (read or {}).items():
            if not path:
                return f"{label}: give a folder."
            problem = policy.check_read(path, label)
            if problem:
                return problem
        for label, path in (write or {}).items():
            if not path:
                return f"{label}: give a folder."
            problem = policy.check_write(path, label)
            if problem:
                return problem
        return ""

    # ------------------------------------------------------------------------------------------ prepare

    def prepare(
        self,
        src: str,
        dst: str,
        size: Any,
        crop: str,
        bucket: bool,
        image_format: str,
        background: str,
        focal_file: str = "",
    ) -> str:
        from ..data.prepare import load_focal_points, parse_colour, prepare_folder

        refused = self._check(
            read={"Source folder": src, **({"Focal points": focal_file} if focal_file else {})},
            write={"New folder": dst},
        )
        if refused:
            return f"**Not prepared:** {refused}"
        try:
            report = prepare_folder(
                src,
                dst,
                size=int(size or 512),
                crop=crop,
                bucket=bool(bucket),
                image_format=image_format,
                background=parse_colour(background or "#ffffff"),
                focal_points=load_focal_points(focal_file) if focal_file else None,
            )
        except (DreamBoothError, ValueError) as error:
            return f"**Not prepared:** {error}"
        return "```\n" + report.summary() + "\n```"

    # ------------------------------------------------------------------------------------------ captioning

    def caption(self, folder: str, source: str, model: str, prefix: str, suffix: str, overwrite: bool, dedupe: bool):
        local_model = {"BLIP model folder": model} if source == LOCAL_BLIP and model and not _hub_id(model) else {}
        refused = self._check(read=local_model, write={"Image folder (captions are written there)": folder})
        if refused:
            return f"**Not captioned:** {refused}"
        try:
            report = self.host.caption_folder(
                source, model, folder, prefix=prefix, suffix=suffix, overwrite=overwrite, dedupe_tags=dedupe
            )
        except (DreamBoothError, ValueError, OSError) as error:
            return f"**Not captioned:** {error}"
        return "```\n" + report.summary() + "\n```"

    def alpha_masks(self, folder: str, overwrite: bool) -> str:
        """IMAGE.mask.png from the alpha channel of each transparent image of ``folder`` (data/loss_masks.py)."""
        from ..data.loss_masks import write_alpha_masks

        refused = self._check(write={"Image folder (masks are written there)": folder})
        if refused:
            return f"**No masks written:** {refused}"
        try:
            report = write_alpha_masks(folder, overwrite=bool(overwrite))
        except (DreamBoothError, ValueError) as error:
            return f"**No masks written:** {error}"
        return "```\n" + report.summary() + "\n```"

    # ------------------------------------------------------------------------------------------ editor

    def load_captions(self, folder: str) -> tuple[Any, Any, str]:
        from ..data.captions import folder_captions

        refused = self._check(read={"Image folder": folder})
        if refused:
            return gr.update(), gr.update(), f"**Not loaded:** {refused}"
        try:
            rows = folder_captions(folder)
        except DreamBoothError as error:
            return gr.update(), gr.update(), f"**Not loaded:** {error}"
        shown = rows[:MAX_EDITOR_ROWS]
        more = f" (the first {MAX_EDITOR_ROWS} shown)" if len(rows) > MAX_EDITOR_ROWS else ""
        table = [[str(path.relative_to(folder)), caption] for path, caption in shown]
        gallery = [(str(path), caption) for path, caption in shown]
        return table or [["", ""]], gallery, f"{len(rows)} image(s){more}."

    @staticmethod
    def _rows(table: Any) -> list[list[str]]:
        values = table.values.tolist() if hasattr(table, "values") else table
        return [[str(a), "" if b is None else str(b)] for a, b in (values or []) if a]

    def replace(self, table: Any, find: str, replace: str) -> tuple[Any, str]:
        from ..data.captions import replace_in_captions

        rows = self._rows(table)
        captions, changed = replace_in_captions([r[1] for r in rows], find or "", replace or "")
        return [[r[0], c] for r, c in zip(rows, captions)] or [["", ""]], f"{changed} caption(s) changed (not saved)."

    def save(self, folder: str, table: Any) -> str:
        from ..data.captions import save_captions

        refused = self._check(write={"Image folder (captions are written there)": folder})
        if refused:
            return f"**Not saved:** {refused}"
        root = Path(folder).resolve()
        rows = []
        for name, caption in self._rows(table):
            image = (root / name).resolve()
            if root not in image.parents:  # an edited file name must not point outside the folder
                return f"**Not saved:** '{name}' is not inside {root}."
            rows.append((image, caption))
        return f"Saved {save_captions(rows)} caption file(s)."

    # ------------------------------------------------------------------------------------------ layout

    def build(self) -> None:
        with gr.Accordion("Prepare: crop and resize into a new folder", open=False, elem_id="db_tool_prepare"):
            with gr.Row():
                src = gr.Textbox(label="Source folder", elem_id="db_tool_prepare_src")
                dst = gr.Textbox(label="New folder", elem_id="db_tool_prepare_dst")
            with gr.Row():
                size = gr.Number(value=512, precision=0, label="Size", elem_id="db_tool_prepare_size")
                crop = gr.Dropdown(CROPS, value="center", label="Crop", elem_id="db_tool_prepare_crop")
                bucket = gr.Checkbox(label="Nearest aspect bucket, not a square", elem_id="db_tool_prepare_bucket")
                image_format = gr.Dropdown(["png", "jpg", "webp"], value="png", label="Format")
                background = gr.Textbox(value="#ffffff", label="Background of transparent images")
            focal = gr.Textbox(
                label='Focal points (crop "focal"): a JSON file {"relative/path.jpg": [x, y]}, x and y from 0 to 1',
                elem_id="db_tool_prepare_focal",
            )
            run = gr.Button("Prepare", elem_id="db_tool_prepare_run")
            report = gr.Markdown(elem_id="db_tool_prepare_report")
            run.click(self.prepare, [src, dst, size, crop, bucket, image_format, background, focal], report)

        with gr.Accordion("Captions: write IMAGE.txt automatically", open=False, elem_id="db_tool_caption"):
            sources = self.host.captioner_names()
            with gr.Row():
                folder = gr.Textbox(label="Image folder", elem_id="db_tool_caption_folder")
                source = gr.Dropdown(sources, value=sources[0], label="Captioner", elem_id="db_tool_caption_source")
                model = gr.Textbox(label="Local BLIP model folder or cached id (local BLIP only)")
            with gr.Row():
                prefix = gr.Textbox(label="Prefix (e.g. the identifier)")
                suffix = gr.Textbox(label="Suffix")
                overwrite = gr.Checkbox(label="Overwrite existing captions")
                dedupe = gr.Checkbox(value=True, label="Remove duplicate tags")
            run = gr.Button("Caption", elem_id="db_tool_caption_run")
            report = gr.Markdown(elem_id="db_tool_caption_report")
            run.click(self.caption, [folder, source, model, prefix, suffix, overwrite, dedupe], report)

        with gr.Accordion("Masks for the masked loss, from transparency", open=False, elem_id="db_tool_masks"):
            with gr.Row():
                folder = gr.Textbox(label="Image folder", elem_id="db_tool_masks_folder", scale=4)
                overwrite = gr.Checkbox(label="Overwrite existing masks", elem_id="db_tool_masks_overwrite")
            run = gr.Button("Write IMAGE.mask.png from alpha", elem_id="db_tool_masks_run")
            report = gr.Markdown(elem_id="db_tool_masks_report")
            run.click(self.alpha_masks, [folder, overwrite], report)

        with gr.Accordion("Caption editor", open=False, elem_id="db_tool_editor"):
            with gr.Row():
                folder = gr.Textbox(label="Image folder", elem_id="db_tool_editor_folder", scale=4)
                load = gr.Button("Load", elem_id="db_tool_editor_load", scale=1)
            gallery = gr.Gallery(label="Images and captions", columns=6, height=260, elem_id="db_tool_editor_gallery")
            table = gr.Dataframe(
                headers=["image", "caption"],
                datatype=["str", "str"],
                col_count=(2, "fixed"),
                interactive=True,
                elem_id="db_tool_editor_table",
            )
            with gr.Row():
                find = gr.Textbox(label="Find")
                replace = gr.Textbox(label="Replace with")
                do_replace = gr.Button("Replace in all")
                save = gr.Button("Save captions", variant="primary", elem_id="db_tool_editor_save")
            message = gr.Markdown(elem_id="db_tool_editor_message")
            load.click(self.load_captions, folder, [table, gallery, message])
            do_replace.click(self.replace, [table, find, replace], [table, message])
            save.click(self.save, [folder, table], message)
