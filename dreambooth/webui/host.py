"""The WebUI as a host: its checkpoint list and folder, its loaded model, its queue lock, Interrupt and progress.

Facts of AUTOMATIC1111 v1.10.1 this relies on (measured on its source):
- ``call_queue.queue_lock`` is a non-reentrant FIFO lock held by every generation: a job holds it from start to end,
  so txt2img waits instead of fighting for the GPU.  ``opts.set("sd_model_checkpoint", ...)`` takes it too, so a model
  switch is never attempted while a job runs.
- ``sd_models.send_model_to_cpu`` frees the loaded model's GPU memory; ``send_model_to_device`` gives it back
  (``reload_model_weights`` would return early and leave the model on the CPU).
- ``model_data.sd_model`` is the loaded model without triggering a load; its ``state_dict()`` keys are the single
  file's keys except for ``.wrapped`` segments that the text-encoder hijack inserts.  SDXL (sgm's ``DiffusionEngine``,
  checked in the real WebUI): the hijack also sets ``cond_stage_model = conditioner``, so both text encoders appear
  a second time under ``cond_stage_model.embedders.*`` (the same tensors), and ``denoiser.sigmas`` is a buffer the
  model computes from the yaml, absent from the file.
- The loaded weights equal the file only when no Lora deltas are patched in (``network_current_names``) and no Lora
  network is loaded (the Lora extension's ``networks.loaded_networks``: its class-level forward patches re-apply
  those to the loaded model's layers), no other VAE is loaded (``loaded_vae_file``), nothing is fp8, and the dtype is
  the file's (a LoRA run, which never changes the base weights, also takes them in fp16 / bf16): else the file is
  read from disk.
- The Lora extension's module ``networks`` stays in ``sys.modules`` once its script loaded:
  ``networks.list_available_networks()`` re-scans ``--lora-dir`` (the extra-networks page ``lora`` does the same in
  its ``refresh()``).
- ``opts.set`` can report success for a switch that loaded another model: a switch is checked on the loaded model.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..host import CheckpointChoice, Host, default_allowed_roots
from ..paths import READ_HINT, WRITE_HINT
from ..settings import Settings

JOB_NAME = "dreambooth"
log = logging.getLogger(__name__)
WEBUI_CAPTIONERS = {"BLIP (WebUI)": "blip", "DeepDanbooru (WebUI)": "deepbooru"}


def _modules() -> Any:
    from modules import call_queue, devices, paths, sd_models, shared

    return call_queue, devices, paths, sd_models, shared


def _same_file(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return False
    return Path(a).resolve() == Path(b).resolve()


def listens_beyond_this_machine(cmd_opts: Any) -> str:
    """The WebUI flag that makes it reachable from other machines ('' when it serves 127.0.0.1 only)."""
    for flag in ("listen", "share", "ngrok"):
        if getattr(cmd_opts, flag, None):
            return f"--{flag}"
    server_name = getattr(cmd_opts, "server_name", None)
    if server_name and server_name not in ("127.0.0.1", "localhost", "::1"):
        return f"--server-name {server_name}"
    return ""


def api_enabled(cmd_opts: Any) -> bool:
    """Whether the WebUI serves its API (``--api``; ``--nowebui`` serves the API alone)."""
    return bool(getattr(cmd_opts, "api", False) or getattr(cmd_opts, "nowebui", False))


class WebuiHost(Host):
    kind = "webui"
    read_hint = READ_HINT
    write_hint = WRITE_HINT

    def __init__(self, data_dir: str | Path, runner_busy: Callable[[], bool] | None = None):
        _, _, paths, _, _ = _modules()
        webui_dir = Path(getattr(paths, "script_path", Path.cwd()))
        super().__init__(
            Path(paths.models_path),
            data_dir=data_dir,
            allowed_roots=default_allowed_roots(webui_dir),
        )
        self.runner_busy = runner_busy or (lambda: False)

    def security_notes(self) -> list[str]:
        """A warning line when other machines can reach the tab or the REST routes without a password."""
        _, _, _, _, shared = _modules()
        opts = shared.cmd_opts
        flag = listens_beyond_this_machine(opts)
        if not flag:
            return []
        notes = []
        if api_enabled(opts) and not getattr(opts, "api_auth", None):
            notes.append(
                f"**Warning: the DreamBooth REST routes have no password** (`--api` without `--api-auth`, and "
                f"`{flag}` makes them reachable from other machines): anyone who reaches this server can start "
                "training jobs. Start the WebUI with `--api-auth user:password`."
            )
        if not (getattr(opts, "gradio_auth", None) or getattr(opts, "gradio_auth_path", None)):
            notes.append(
                f"**Warning: this page has no password** (`{flag}` without `--gradio-auth`): anyone who reaches "
                "this server can use this tab. Start the WebUI with `--gradio-auth user:password`."
            )
        return notes

    # ------------------------------------------------------------------------------------------ models

    @property
    def checkpoint_dir(self) -> Path:
        _, _, _, _, shared = _modules()
        configured = getattr(shared.cmd_opts, "ckpt_dir", None)
        return Path(configured) if configured else self.models_dir / "Stable-diffusion"

    @property
    def lora_dir(self) -> Path:
        """The folder the built-in Lora extension scans: ``--lora-dir`` (its preload sets it, default
        ``models/Lora``); ``models/Lora`` when that extension is absent or disabled."""
        _, _, _, _, shared = _modules()
        configured = getattr(shared.cmd_opts, "lora_dir", None)
        return Path(configured) if configured else self.models_dir / "Lora"

    def list_checkpoints(self) -> list[CheckpointChoice]:
        _, _, _, sd_models, _ = _modules()
        return [CheckpointChoice(info.title, info.filename) for info in sd_models.checkpoints_list.values()]

    def _loaded_model(self) -> Any:
        _, _, _, sd_models, _ = _modules()
        return sd_models.model_data.sd_model  # not shared.sd_model: reading that loads a model when none is

    def loaded_checkpoint(self) -> str | None:
        model = self._loaded_model()
        info = getattr(model, "sd_checkpoint_info", None)
        return getattr(info, "filename", None)

    def refresh_checkpoints(self) -> None:
        """Re-scan the checkpoint list, keeping the user's model choice: ``list_models()`` resets the
        ``sd_model_checkpoint`` option to the ``--ckpt`` file when one was given, which would make the next txt2img
        load that model instead of the one the user picked."""
        _, _, _, sd_models, shared = _modules()
        chosen = shared.opts.data.get("sd_model_checkpoint")
        sd_models.list_models()
        if chosen is not None:
            shared.opts.data["sd_model_checkpoint"] = chosen

    def _info_for(self, path: str) -> Any:
        _, _, _, sd_models, _ = _modules()
        for info in sd_models.checkpoints_list.values():
            if _same_file(info.filename, path):
                return info
        return None

    def _info_named(self, name: str) -> Any:
        """The one listed checkpoint whose file is called ``name`` (a LoRA made on another machine names its base
        by a path that is not here); None when none or several are."""
        _, _, _, sd_models, _ = _modules()
        found = [info for info in sd_models.checkpoints_list.values() if Path(info.filename).name == name]
        return found[0] if len(found) == 1 else None

    def use_checkpoint(self, path: str) -> tuple[bool, str]:
        """Switch txt2img to ``path`` and check on the loaded model that it happened."""
        if self.runner_busy():
            return False, "A training job holds the GPU: switch after it ends."
        _, _, _, _, shared = _modules()
        self.refresh_checkpoints()
        info = self._info_for(path)
        if info is None:
            return False, f"{path} is not in the WebUI's checkpoint list (is it inside {self.checkpoint_dir}?)"
        previous = getattr(self._loaded_model(), "sd_checkpoint_info", None)
        try:
            shared.opts.set("sd_model_checkpoint", info.title)
        except Exception as error:  # the WebUI's own loader failed: report it, then check what is loaded
            message = f"the WebUI could not load it ({error})"
        else:
            message = "the WebUI loaded another model instead"
        if _same_file(self.loaded_checkpoint(), path):
            return True, f"txt2img now uses {info.title}."
        self._repair(previous)
        return False, f"{info.title}: {message}; the previous model is loaded again."

    # ------------------------------------------------------------------------------------------ LoRA files

    def refresh_networks(self) -> None:
        """Re-scan the Lora extension's list, so a new file is listed (and found by its alias) at once.  Without
        that extension (disabled, or another owns the name ``networks``) there is nothing to refresh."""
        networks = sys.modules.get("networks")
        try:
            if callable(getattr(networks, "list_available_networks", None)):
                networks.list_available_networks()
                return
            pages = getattr(sys.modules.get("modules.ui_extra_networks"), "extra_pages", None) or []
            for page in list(pages):
                if getattr(page, "name", "") == "lora":
                    page.refresh()
        except Exception as error:  # the list only: the file is written, and a prompt finds it by its name anyway
            log.warning("could not refresh the WebUI's Lora list: %s", error)

    def use_network(self, path: str) -> tuple[bool, str, str, str]:
        """Switch txt2img to the base model the LoRA file ``path`` was trained on; on success hand back
        ``<lora:NAME:1>`` for the txt2img prompt.  Returns (done, message, tag, base model path)."""
        from ..network.card import lora_tag, prompt_name_problem

        name = Path(path).stem
        problem = prompt_name_problem(name, "the file name")
        if problem:
            return False, f"{problem} (rename {path}).", "", ""
        if self.runner_busy():
            return False, "A training job holds the GPU: switch after it ends.", "", ""
        base = self.network_base(path)
        if not base:
            return False, f"{path} does not say which base model it was trained on: choose one by hand.", "", ""
        self.refresh_checkpoints()
        info = self._info_for(base) or self._info_named(Path(base).name)
        if info is None:
            return (
                False,
                f"its base model {base} is not in the WebUI's checkpoint list: choose a model of the same family and "
                f"put `{lora_tag(path)}` into the prompt.",
                "",
                "",
            )
        self.refresh_networks()
        tag, base = lora_tag(path), info.filename
        if _same_file(self.loaded_checkpoint(), base):
            return True, f"txt2img uses {info.title} already; `{tag}` goes into its prompt.", tag, base
        done, text = self.use_checkpoint(base)
        if not done:
            return False, text, "", ""
        return True, f"{text[:-1]}, and `{tag}` goes into its prompt.", tag, base

    def _repair(self, previous: Any) -> None:
        """After a failed switch the WebUI may hold a half-loaded model: load the previous one again."""
        if previous is None or _same_file(self.loaded_checkpoint(), previous.filename):
            return
        call_queue, _, _, sd_models, _ = _modules()
        with contextlib.suppress(Exception), call_queue.queue_lock:
            sd_models.reload_model_weights(info=previous, forced_reload=True)

    # ------------------------------------------------------------------------------------------ jobs

    def _memory_is_clean(self, model: Any, path: str, frozen: bool = False) -> str:
        """Why the loaded weights differ from the file ``path`` ('' when they do not).  ``frozen``: for a run that
        never changes them (LoRA), weights the WebUI cast to fp16 / bf16 count as clean."""
        import torch

        info = getattr(model, "sd_checkpoint_info", None)
        if model is None or not _same_file(getattr(info, "filename", None), path):
            return "it is not the loaded model"
        if getattr(model, "loaded_vae_file", None):
            return f"the loaded model carries another VAE ({Path(model.loaded_vae_file).name})"
        probe_key, probe = None, None
        networks = sys.modules.get("networks")
        loaded = getattr(networks, "loaded_networks", None)
        if isinstance(loaded, list) and loaded:  # the Lora extension's forwards would patch them in again
            names = ", ".join(str(getattr(n, "name", n)) for n in loaded)
            return f"a Lora network is loaded in the WebUI ({names}; generate once without it to unload it)"
        for name, module in model.named_modules():
            if getattr(module, "network_current_names", ()):
                return f"a Lora is patched into the loaded weights ({name})"
        for key, tensor in model.state_dict().items():
            if tensor.dtype in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)):
                return "the loaded weights are stored in fp8"
            if probe is None and key.startswith("model.diffusion_model.") and tensor.is_floating_point():
                probe_key, probe = key, tensor
        if probe is None:
            return "the loaded model has no UNet weights"
        in_file = self._file_keys(path)
        if in_file is not None:  # what the WebUI did not load (EMA copies aside) would be missing from the output
            lacking = sorted(k for k in in_file - self._loaded_tensors(model).keys() if not k.startswith("model_ema."))
            if lacking:
                return f"the loaded model lacks {len(lacking)} of the file's tensors (e.g. {lacking[0]})"
        if probe.dtype != torch.float32 and not (frozen and probe.dtype in (torch.float16, torch.bfloat16)):
            file_dtype = self._file_dtype(path, probe_key)
            if file_dtype != probe.dtype:
                return f"the loaded weights are {probe.dtype} while the file holds {file_dtype or 'another dtype'}"
        return ""

    @staticmethod
    def _loaded_tensors(model: Any) -> dict[str, Any]:
        """The loaded model's tensors under the file's names: the hijack's ``.wrapped`` segments removed, and each
        tensor once (for SDXL the hijack sets ``cond_stage_model = conditioner``, so ``state_dict()`` lists both
        text encoders a second time under ``cond_stage_model.``; ``named_children`` names a shared child once)."""
        children = {name for name, _ in model.named_children()}
        return {
            key.replace(".wrapped.", "."): tensor
            for key, tensor in model.state_dict().items()
            if "." not in key or key.split(".", 1)[0] in children
        }

    @staticmethod
    def _file_keys(path: str) -> set[str] | None:
        """The tensor names a .safetensors file holds (its header only); None for other files."""
        if not path.lower().endswith(".safetensors"):
            return None
        from safetensors import safe_open

        with safe_open(path, framework="pt", device="cpu") as handle:
            return set(handle.keys())

    @staticmethod
    def _file_dtype(path: str, key: str) -> Any:
        if not path.lower().endswith(".safetensors"):
            return None
        from safetensors import safe_open

        dtypes = {"F16": "float16", "BF16": "bfloat16", "F32": "float32"}
        import torch

        with safe_open(path, framework="pt", device="cpu") as handle:
            name = dtypes.get(handle.get_slice(key).get_dtype())
        return getattr(torch, name) if name else None

    def _components_from_memory(self, model: Any, path: str, shared: bool = False) -> Any:
        """The loaded model's weights as our components: fp32 copies, so the WebUI's model is never trained; with
        ``shared`` (a LoRA run: the base weights stay frozen) the loaded tensors themselves, in their dtype, with no
        copy (the adapter wraps our modules' forwards, never the WebUI's, and the trainer restores them)."""
        import torch

        from ..models import files
        from ..models.components import components_from_state_dict

        state, dtype = {}, torch.float32
        in_file = self._file_keys(path)
        for key, tensor in self._loaded_tensors(model).items():
            # buffers the WebUI computes (sgm's denoiser.sigmas) are not the file's: outputs keep the file's keys
            if (key not in in_file) if in_file is not None else key.startswith("denoiser."):
                continue
            if not tensor.is_floating_point():
                state[key] = tensor
            elif shared:
                state[key] = tensor.detach()
                if key.startswith("model.diffusion_model."):
                    dtype = tensor.dtype
            else:
                state[key] = tensor.detach().to("cpu", torch.float32, copy=True)
        yaml_path = files.sidecar_yaml_path(path)
        metadata = {}
        if path.lower().endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, framework="pt", device="cpu") as handle:
                metadata = dict(handle.metadata() or {})
        return components_from_state_dict(
            state,
            f"{path} (loaded in the WebUI)",
            yaml_config=files.read_yaml(yaml_path) if yaml_path.is_file() else None,
            metadata=metadata,
            device=next(iter(state.values())).device if shared and state else "cpu",
            dtype=dtype,
        )

    @contextlib.contextmanager
    def session(self, settings: Settings, log: Callable[[str], None]) -> Iterator[Any]:
        """Hold the queue lock, free the loaded models' GPU memory, and put everything back whatever happens."""
        call_queue, devices, _, sd_models, shared = _modules()
        log("waiting for the WebUI's queue (a running generation finishes first)")
        with call_queue.queue_lock:
            shared.state.begin(job=JOB_NAME)
            current = sd_models.model_data.sd_model
            loaded = [current, *getattr(sd_models.model_data, "loaded_sd_models", [])]
            models = list({id(m): m for m in loaded if m is not None}.values())
            components = None
            try:
                for model in models:  # cached models may sit in VRAM too (sd_checkpoints_keep_in_cpu off)
                    sd_models.send_model_to_cpu(model)
                on_gpu = [m for m in models if getattr(getattr(m, "device", None), "type", "cpu") == "cuda"]
                if on_gpu:
                    log(f"moved {len(on_gpu)} loaded model(s) off the GPU for training")
                model = self._loaded_model()
                frozen = getattr(settings, "training_method", "full") != "full"  # an adapter: the base stays as is
                why = self._memory_is_clean(model, settings.pretrained_model_name_or_path, frozen=frozen)
                if not why:
                    path = settings.pretrained_model_name_or_path
                    components = self._components_from_memory(model, path, shared=frozen)
                    if frozen:
                        dtype = str(components.unet.dtype).replace("torch.", "")
                        log(
                            f"training the {settings.training_method} on the weights already loaded in the WebUI "
                            f"({dtype}, shared: no copy, no second read from disk)"
                        )
                    else:
                        log("training from the model already loaded in the WebUI (no second read from disk)")
                elif model is not None:
                    log(f"reading the base model from disk: {why}")
                model = None
                yield components
            finally:
                components = None
                gc.collect()
                devices.torch_gc()
                if current is not None:  # the others stay on the CPU, where the WebUI keeps cached models
                    try:
                        sd_models.send_model_to_device(current)
                    except Exception as error:
                        log(f"could not move the WebUI's model back to the GPU: {error}")
                shared.state.end()

    def captioner_names(self) -> list[str]:
        return [*WEBUI_CAPTIONERS, *super().captioner_names()]

    def caption_folder(self, name: str, model: str, folder: str, **options: Any) -> Any:
        """The WebUI's own interrogators (under its queue lock, loaded for the job only, Interrupt stops), or a
        local BLIP."""
        if name not in WEBUI_CAPTIONERS:
            return super().caption_folder(name, model, folder, **options)
        from .captioning import webui_caption_folder

        return webui_caption_folder(folder, WEBUI_CAPTIONERS[name], wait=False, **options)

    def interrupted(self) -> bool:
        _, _, _, _, shared = _modules()
        state = shared.state
        return bool(state.interrupted or getattr(state, "stopping_generation", False))

    def report_progress(self, progress: Any) -> None:
        _, _, _, _, shared = _modules()
        state = shared.state
        state.job_count = 1
        if progress.phase == "training":
            state.sampling_step, state.sampling_steps = progress.step, progress.total_steps
        state.textinfo = f"DreamBooth: {progress.phase} {progress.message}".strip()

    def samples_written(self, paths: list[Path]) -> None:
        if not paths:
            return
        from PIL import Image

        _, _, _, _, shared = _modules()
        with Image.open(paths[-1]) as image:
            shared.state.assign_current_image(image.convert("RGB"))
