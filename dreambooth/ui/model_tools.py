"""The tab's LoRA tools: merge a LoRA / LoHa / LoKr into a checkpoint, extract a LoRA from a full fine-tune.

As the dataset tools, each asks the host's path policy first: the models and the LoRA it reads lie under the read
roots, the file it writes under the write roots.  A bare output name lands in the folder the WebUI lists it from:
a merged checkpoint in the checkpoint folder, an extracted LoRA in the Lora folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gradio as gr

from ..errors import DreamBoothError
from ..host import Host


class ModelTools:
    def __init__(self, host: Host):
        self.host = host

    # ------------------------------------------------------------------------------------------ paths

    @property
    def lora_dir(self) -> Path:
        """The host's Lora folder (where trained LoRAs land)."""
        return Path(self.host.lora_dir)

    def _model_path(self, value: str) -> str:
        """A checkpoint from the dropdown (its title) or typed (a path)."""
        titles = {choice.title: choice.path for choice in self.host.list_checkpoints()}
        return titles.get(value, value)

    def _lora_files(self) -> dict[str, str]:
        """The LoRA files in the Lora folder by their path inside it (what the dropdown offers)."""
        root = self.lora_dir
        if not root.is_dir():
            return {}
        found = sorted(p for p in root.rglob("*") if p.suffix.lower() == ".safetensors" and p.is_file())
        return {str(p.relative_to(root)): str(p) for p in found}

    @staticmethod
    def _output(name: str, folder: Path) -> Path:
        """``name`` as typed; a bare name (no folder) inside ``folder``, with ``.safetensors`` when it has no suffix."""
        path = Path(name.strip())
        if path.suffix.lower() not in (".safetensors", ".ckpt"):
            path = path.with_name(path.name + ".safetensors")
        return folder / path if len(path.parts) == 1 else path

    def _check(self, read: dict[str, str], write: dict[str, Path]) -> str:
        """'' when the server may read each of ``read`` and write each of ``write`` ({label: path}), else the
        sentence saying which it may not."""
        policy = self.host.paths
        for label, path in read.items():
            problem = f"{label}: give a file." if not path else policy.check_read(path, label)
            if problem:
                return problem
        for label, path in write.items():
            problem = policy.check_write(path, label)
            if problem:
                return problem
        return ""

    # ------------------------------------------------------------------------------------------ handlers

    def merge(self, base: str, lora: str, weight: Any, name: str, half: bool, overwrite: bool) -> str:
        """Merge ``lora`` into ``base`` at ``weight``; a bare output name goes into the checkpoint folder."""
        from ..network.merge import merge_lora

        if not (name or "").strip():
            return "**Not merged:** New checkpoint: give a file name, e.g. mymodel-style.safetensors."
        base_path, out = self._model_path(base or ""), self._output(name, self.host.checkpoint_dir)
        lora = self._lora_files().get(lora or "", lora or "")
        refused = self._check({"Base checkpoint": base_path, "LoRA file": lora}, {"New checkpoint": out})
        if refused:
            return f"**Not merged:** {refused}"
        try:
            report = merge_lora(base_path, lora, out, weight=float(weight), half=bool(half), overwrite=bool(overwrite))
        except (DreamBoothError, ValueError, TypeError) as error:
            return f"**Not merged:** {error}"
        self.host.refresh_checkpoints()
        return "```\n" + report.summary() + "\n```"

    def extract(self, tuned: str, base: str, name: str, rank: Any, conv_rank: Any, overwrite: bool) -> str:
        """Extract a LoRA of ``tuned - base``; a bare output name goes into the Lora folder."""
        from ..network.extract import extract_lora

        if not (name or "").strip():
            return "**Not extracted:** LoRA file: give a file name, e.g. mymodel.safetensors."
        tuned_path, base_path = self._model_path(tuned or ""), self._model_path(base or "")
        out = self._output(name, self.lora_dir)
        refused = self._check({"Fine-tuned checkpoint": tuned_path, "Base checkpoint": base_path}, {"LoRA file": out})
        if refused:
            return f"**Not extracted:** {refused}"
        try:
            conv = int(conv_rank or 0) or None  # 0: no conv layers
            report = extract_lora(tuned_path, base_path, out, int(rank or 0), conv, overwrite=bool(overwrite))
        except (DreamBoothError, ValueError, TypeError) as error:
            return f"**Not extracted:** {error}"
        self.host.refresh_networks()
        return "```\n" + report.summary() + "\n```"

    # ------------------------------------------------------------------------------------------ layout

    def build(self) -> None:
        checkpoints = [choice.title for choice in self.host.list_checkpoints()]

        def model(label: str, elem_id: str) -> Any:
            return gr.Dropdown(checkpoints, label=label, allow_custom_value=True, elem_id=elem_id)

        with gr.Accordion("LoRA: merge into a checkpoint", open=False, elem_id="db_tool_merge_lora"):
            with gr.Row():
                base = model("Base checkpoint", "db_tool_merge_base")
                lora = gr.Dropdown(
                    list(self._lora_files()),
                    label="LoRA / LoHa / LoKr file (from the Lora folder, or a path)",
                    allow_custom_value=True,
                    elem_id="db_tool_merge_lora_file",
                )
            with gr.Row():
                weight = gr.Number(value=1.0, label="Weight (as in <lora:NAME:W>)", elem_id="db_tool_merge_weight")
                name = gr.Textbox(
                    label="New checkpoint (a name goes into the checkpoint folder)", elem_id="db_tool_merge_out"
                )
                half = gr.Checkbox(label="Save as fp16", elem_id="db_tool_merge_half")
                overwrite = gr.Checkbox(label="Replace an existing file", elem_id="db_tool_merge_overwrite")
            run = gr.Button("Merge", elem_id="db_tool_merge_run")
            report = gr.Markdown(elem_id="db_tool_merge_report")
            run.click(self.merge, [base, lora, weight, name, half, overwrite], report)

        with gr.Accordion("LoRA: extract from a fine-tuned checkpoint", open=False, elem_id="db_tool_extract_lora"):
            with gr.Row():
                tuned = model("Fine-tuned checkpoint", "db_tool_extract_tuned")
                base = model("Base checkpoint it was trained from", "db_tool_extract_base")
            with gr.Row():
                name = gr.Textbox(label="LoRA file (a name goes into the Lora folder)", elem_id="db_tool_extract_out")
                rank = gr.Number(value=32, precision=0, minimum=1, label="Rank", elem_id="db_tool_extract_rank")
                conv_rank = gr.Number(
                    value=0, precision=0, minimum=0, label="Conv rank (0: none)", elem_id="db_tool_extract_conv_rank"
                )
                overwrite = gr.Checkbox(label="Replace an existing file", elem_id="db_tool_extract_overwrite")
            run = gr.Button("Extract", elem_id="db_tool_extract_run")
            report = gr.Markdown(elem_id="db_tool_extract_report")
            run.click(self.extract, [tuned, base, name, rank, conv_rank, overwrite], report)
