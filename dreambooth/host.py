"""Where the tab runs: the folders it may use, the checkpoints it offers, and what wraps a training job.

:class:`Host` is the standalone app (``python -m dreambooth ui``): a models folder laid out like the WebUI's
(``DIR/Stable-diffusion`` holds the checkpoints, ``DIR/Lora`` the LoRA files), our own folder ``DIR/dreambooth`` for
runs and saved settings.
The WebUI's host (:mod:`dreambooth.webui.host`) overrides the hooks that reach into the WebUI: the loaded model, the
queue lock, the checkpoint list, switching models.  Everything here is plain Python: no gradio, no ``modules``.

Security (the tab and the REST routes are reachable from other machines with ``--listen`` / ``--api``): every path a
request names is checked by the host's one :class:`~.paths.PathPolicy` (:attr:`Host.paths`): what a job reads lies
under the read roots, what it writes (outputs, and the class images it generates) under the write roots.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .paths import ALLOWED_ROOTS_ENV, READ_HINT, WRITE_HINT, WRITE_ROOTS_ENV, PathPolicy, roots_from_env
from .paths import is_within as is_within  # re-exported for callers of the old home of the rule
from .settings import Settings

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")
log = logging.getLogger(__name__)
LAST_USED = "last_used.json"
LOCAL_BLIP = "BLIP (local model)"
OPTIONAL_PACKAGES = {
    "bitsandbytes": "8-bit AdamW (optimizer adamw_8bit) is unavailable: pip install bitsandbytes",
    "xformers": "the xformers attention backend is unavailable (PyTorch SDPA is used): pip install xformers",
    "prodigyopt": "optimizer prodigy is unavailable: pip install prodigyopt",
    "lion_pytorch": "optimizer lion is unavailable: pip install lion-pytorch",
    "schedulefree": "optimizer adamw_schedule_free is unavailable: pip install schedulefree",
}


REQUIRED_PACKAGES = {  # distribution -> (import name, what to install)
    "diffusers": ("diffusers", "diffusers>=0.29,<0.32"),
    "transformers": ("transformers", "transformers"),
    "safetensors": ("safetensors", "safetensors>=0.4"),
    "PyYAML": ("yaml", "PyYAML>=5.4"),
}


def _version(distribution: str) -> tuple[int, ...] | None:
    from importlib import metadata

    try:
        text = metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None
    numbers = []
    for part in text.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        numbers.append(int(digits or 0))
    return tuple(numbers)


def diffusers_transformers_clash() -> str:
    """diffusers 0.32 and newer fail to import with transformers older than 4.41 (the WebUI pins 4.30.2)."""
    diffusers, transformers = _version("diffusers"), _version("transformers")
    if diffusers and transformers and diffusers >= (0, 32) and transformers < (4, 41):
        return (
            "**diffusers is too new for this transformers** (diffusers 0.32+ needs transformers 4.41+): run "
            "pip install 'diffusers>=0.29,<0.32' in the WebUI's venv, then restart."
        )
    return ""


@dataclass(frozen=True)
class CheckpointChoice:
    """One base model the tab offers: a title for people, a path for the trainer."""

    title: str
    path: str


def default_allowed_roots(*extra: Path) -> list[Path]:
    """The read roots: ``$DREAMBOOTH_ALLOWED_ROOTS`` (os.pathsep-separated) when set, else the user's home plus
    ``extra``."""
    return roots_from_env(ALLOWED_ROOTS_ENV) or [Path.home().resolve(), *(Path(p).resolve() for p in extra)]


def default_write_roots() -> list[Path]:
    """Write roots besides the checkpoint folder and our own folder: ``$DREAMBOOTH_WRITE_ROOTS`` (none when unset)."""
    return roots_from_env(WRITE_ROOTS_ENV) or []


class Host:
    """The standalone app's host; the WebUI subclass overrides the marked hooks.

    ``allowed_roots``: the folders requests may read (default :func:`default_allowed_roots` of the models folder
    and the current folder); ``write_roots``: the folders they may write besides the checkpoint folder and
    ``data_dir`` (default :func:`default_write_roots`).
    """

    kind = "standalone"
    # how the owner of this server allows more folders (the end of a refusal sentence)
    read_hint = f"start the app with --allow DIR (or {READ_HINT})"
    write_hint = f"start the app with --allow-write DIR (or {WRITE_HINT})"

    def __init__(
        self,
        models_dir: str | os.PathLike = "models",
        data_dir: str | os.PathLike | None = None,
        allowed_roots: list[str | os.PathLike] | None = None,
        write_roots: list[str | os.PathLike] | None = None,
    ):
        self.models_dir = Path(models_dir).resolve()
        self.data_dir = Path(data_dir).resolve() if data_dir else self.models_dir / "dreambooth"
        if allowed_roots is None:
            self.allowed_roots = default_allowed_roots(self.models_dir, Path.cwd())
        else:
            self.allowed_roots = [Path(p).expanduser().resolve() for p in allowed_roots]
        if write_roots is None:
            self.write_roots = default_write_roots()
        else:
            self.write_roots = [Path(p).expanduser().resolve() for p in write_roots]
        self._network_bases: dict[str, str] = {}  # LoRA file written by a job here -> that job's base model

    @property
    def paths(self) -> PathPolicy:
        """What requests may read and write here (made on each use: the WebUI's ``--ckpt-dir`` and ``--lora-dir``
        are read live)."""
        own = [self.checkpoint_dir, self.lora_dir, self.data_dir]
        return PathPolicy(
            read_roots=(*self.allowed_roots, *own),
            write_roots=(*own, *self.write_roots),
            read_hint=self.read_hint,
            write_hint=self.write_hint,
        )

    # ----------------------------------------------------------------------------------------- folders

    @property
    def checkpoint_dir(self) -> Path:
        """Where base models are found and trained checkpoints land (WebUI: ``--ckpt-dir`` or its models folder)."""
        return self.models_dir / "Stable-diffusion"

    @property
    def lora_dir(self) -> Path:
        """Where trained LoRA / LoHa / LoKr files land (WebUI: its Lora extension's ``--lora-dir``, which it scans)."""
        return self.models_dir / "Lora"

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"

    @property
    def settings_dir(self) -> Path:
        return self.data_dir / "settings"

    def run_dir(self, model_name: str) -> Path:
        return self.runs_dir / model_name

    # ----------------------------------------------------------------------------------------- models

    def list_checkpoints(self) -> list[CheckpointChoice]:
        """Checkpoints in the checkpoint folder (recursive), titled by their path inside it."""
        root = self.checkpoint_dir
        if not root.is_dir():
            return []
        found = sorted(p for p in root.rglob("*") if p.suffix.lower() in CHECKPOINT_SUFFIXES and p.is_file())
        return [CheckpointChoice(str(p.relative_to(root)), str(p)) for p in found]

    def loaded_checkpoint(self) -> str | None:
        """Path of the model loaded for generation now (WebUI only; the default base model)."""
        return None

    def refresh_checkpoints(self) -> None:
        """Make a newly written checkpoint visible (the WebUI re-scans its list; here the scan is live)."""

    def use_checkpoint(self, path: str) -> tuple[bool, str]:
        """Switch txt2img to ``path``; returns (done, message)."""
        return False, f"The standalone app has no txt2img: copy {path} into the WebUI's models/Stable-diffusion."

    # ----------------------------------------------------------------------------------------- LoRA files

    def is_network_file(self, path: str | os.PathLike) -> bool:
        """Whether ``path`` is a LoRA / LoHa / LoKr file: in the Lora folder, or with kohya's network metadata."""
        from .network.card import read_metadata

        path = Path(path)
        if path.suffix.lower() not in CHECKPOINT_SUFFIXES:
            return False
        if is_within(path, [self.lora_dir.resolve()]):
            return True
        try:
            return "ss_network_module" in read_metadata(path)
        except Exception:  # not a readable safetensors file: not one of ours
            return False

    def refresh_networks(self) -> None:
        """Make a newly written LoRA file visible (the WebUI re-scans its Lora list; here there is none)."""

    def network_base(self, path: str) -> str:
        """The base model the LoRA file ``path`` was trained on: the job's (when this host ran it), else the one
        its metadata names; '' when neither is known."""
        from .network.card import base_model_of

        return self._network_bases.get(str(Path(path))) or base_model_of(path)

    def use_network(self, path: str) -> tuple[bool, str, str, str]:
        """Switch txt2img to the LoRA file's base model and hand back its prompt tag; returns
        (done, message, tag, base model path)."""
        from .network.card import lora_tag

        base = self.network_base(path)
        with_base = f" with its base model {base}" if base else ""
        return (
            False,
            f"The standalone app has no txt2img: copy {path} into the WebUI's models/Lora folder and put "
            f"`{lora_tag(path)}` into a txt2img prompt{with_base}.",
            "",
            "",
        )

    # ----------------------------------------------------------------------------------------- jobs

    def prepare(self, settings: Settings) -> Settings:
        """The settings a job from the tab runs with: outputs in our folders, whatever the request says; with prior
        preservation, a concept without a class folder gets one in the run folder (where the trainer may write)."""
        run_dir = self.run_dir(settings.model_name)
        concepts = [dataclasses.replace(c) for c in settings.concepts]
        if settings.has_prior_preservation:
            for index, concept in enumerate(concepts, start=1):
                if not concept.class_data_dir:
                    concept.class_data_dir = str(run_dir / f"class_images_{index}")
        return dataclasses.replace(
            settings,
            output_dir=str(run_dir),
            checkpoint_dir=str(self.checkpoint_dir),
            lora_dir=str(self.lora_dir),
            concepts=concepts,
        )

    def check_settings(self, settings: Settings) -> list[str]:
        """Every reason not to start: the settings' own problems, then paths this server may not read or write.

        A class folder counts as a write when the trainer would generate images there (fewer usable class images
        than wanted); a complete one is only read.  While any path is refused, the settings are validated without
        looking at files (what exists outside the allowed folders is not this server's to say).
        """
        policy = self.paths
        readable = [
            ("pretrained_model_name_or_path", settings.pretrained_model_name_or_path),
            ("pretrained_vae_name_or_path", settings.pretrained_vae_name_or_path),
            ("test_prompts_file", settings.test_prompts_file),
            ("resume_from", settings.resume_from),
            ("network_init_from", getattr(settings, "network_init_from", "")),
        ]
        for index, concept in enumerate(settings.concepts, start=1):
            readable.append((f"concept {index} instance_data_dir", concept.instance_data_dir))
            readable.append((f"concept {index} class_data_dir", concept.class_data_dir))
            readable.append((f"concept {index} validation_data_dir", concept.validation_data_dir))
        refused = [policy.check_read(value, name) for name, value in readable if value]
        if settings.has_prior_preservation:
            refused.extend(self._class_folder_writes(settings, policy))
        if settings.output_dir:
            out = Path(settings.output_dir)
            for name, value in (
                ("output_dir", out),
                ("checkpoint_dir", out / settings.checkpoint_dir),
                ("lora_dir", out / settings.lora_dir),
                ("logging_dir", out / settings.logging_dir),
            ):
                refused.append(policy.check_write(value, name))
        if getattr(settings, "training_method", "full") != "full":
            from .network.card import prompt_name_problem

            refused.append(prompt_name_problem(settings.model_name))
        refused = [p for p in refused if p]
        return settings.validate(check_files=not refused) + refused

    @staticmethod
    def _class_folder_writes(settings: Settings, policy: PathPolicy) -> list[str]:
        """Class folders the trainer would write class images into, outside the write roots."""
        from .data.class_images import usable_class_images

        problems = []
        for index, concept in enumerate(settings.concepts, start=1):
            folder = concept.class_data_dir
            if not folder or not policy.may_read(folder) or policy.may_write(folder):
                continue  # no folder, already refused as a read, or writable
            try:
                have = len(usable_class_images(folder, concept.class_prompt))
            except Exception:  # an unlistable folder: the trainer reports it; here it would be written into
                have = 0
            missing = settings.class_images_for(concept) - have
            if missing > 0:
                what = f"{missing} missing class image(s) would be generated there"
                problems.append(policy.check_write(folder, f"concept {index} class_data_dir", what))
        return problems

    @contextlib.contextmanager
    def session(self, settings: Settings, log: Callable[[str], None]) -> Iterator[Any]:
        """Wraps one job; yields the base model's components when they come from memory, else None."""
        yield None

    def interrupted(self) -> bool:
        """Whether the host asked to stop (the WebUI's Interrupt button)."""
        return False

    def report_progress(self, progress: Any) -> None:
        """Mirror progress where the host shows it (the WebUI's ``shared.state``)."""

    def samples_written(self, paths: list[Path]) -> None:
        """Show the newest sample where the host shows previews (the WebUI's live preview)."""

    def checkpoint_written(self, paths: list[Path], settings: Settings | None = None) -> None:
        """After the job of ``settings`` wrote ``paths``: the LoRA files get their card sidecar (``NAME.json``) and
        the Lora list is refreshed; checkpoints refresh the checkpoint list."""
        files = [Path(p) for p in paths if Path(p).suffix.lower() in CHECKPOINT_SUFFIXES]
        method = getattr(settings, "training_method", "full")
        networks = [p for p in files if method != "full" or self.is_network_file(p)]
        for path in networks:
            if settings is None:
                continue
            self._network_bases[str(path)] = settings.pretrained_model_name_or_path
            try:
                from .network.card import write_user_metadata

                write_user_metadata(path, settings)
            except Exception as error:  # the card's extras only: the LoRA file itself is written
                log.warning("could not write the Lora card's sidecar for %s: %s", path, error)
        if networks:
            self.refresh_networks()
        if len(networks) < len(files) or not files:
            self.refresh_checkpoints()

    def job_ended(self, state: str, error: str) -> None:
        """Called on the trainer thread after every job, whatever its end."""

    # ----------------------------------------------------------------------------------------- environment

    def environment_notes(self) -> list[str]:
        """Sentences shown at the top of the tab: missing required packages, optional ones, then security warnings."""
        import importlib.util

        notes = [
            f"**{name} is missing: training cannot start.** Restart the WebUI once (the extension's install.py "
            f"installs it) or run: pip install '{spec}'"
            for name, (module, spec) in REQUIRED_PACKAGES.items()
            if importlib.util.find_spec(module) is None
        ]
        clash = diffusers_transformers_clash()
        if clash:
            notes.append(clash)
        notes.extend(note for name, note in OPTIONAL_PACKAGES.items() if importlib.util.find_spec(name) is None)
        return notes + self.security_notes()

    def security_notes(self) -> list[str]:
        """Warnings about who can reach this server (the WebUI: listening beyond this machine without a password)."""
        return []

    def saved_states(self) -> list[str]:
        """Resumable training states of earlier jobs (``runs/NAME/state``, also when a kill between the renames of
        a save left it under another name), newest first."""
        from .train.state import find_state

        if not self.runs_dir.is_dir():
            return []
        found = {run / "state": find_state(run / "state") for run in self.runs_dir.iterdir() if run.is_dir()}
        found = {name: folder for name, folder in found.items() if folder is not None}
        newest_first = sorted(found, key=lambda name: (found[name] / "state.json").stat().st_mtime, reverse=True)
        return [str(name) for name in newest_first]

    # ----------------------------------------------------------------------------------------- captioning

    def captioner_names(self) -> list[str]:
        """The captioners the Dataset tools offer here (the WebUI adds its own interrogators)."""
        return [LOCAL_BLIP]

    @contextlib.contextmanager
    def captioner(self, name: str, model: str = "") -> Iterator[Any]:
        """A callable PIL image -> caption, loaded for one job only."""
        if name != LOCAL_BLIP:
            raise ValueError(f"unknown captioner '{name}'; choose one of {', '.join(self.captioner_names())}")
        from .data.captioning import DEFAULT_BLIP_ID, BlipCaptioner

        yield BlipCaptioner(model or DEFAULT_BLIP_ID)  # a model id is looked up in the local cache only

    def caption_folder(self, name: str, model: str, folder: str, **options: Any) -> Any:
        """Caption ``folder`` with captioner ``name``; ``options`` as :func:`~.data.captioning.caption_folder`."""
        from .data.captioning import caption_folder

        with self.captioner(name, model) as captioner:
            return caption_folder(folder, captioner, **options)

    # ----------------------------------------------------------------------------------------- saved settings

    def saved_settings(self) -> list[str]:
        """Names of the settings saved per output model."""
        if not self.settings_dir.is_dir():
            return []
        return sorted(p.stem for p in self.settings_dir.glob("*.json"))

    def save_settings(self, settings: Settings, name: str | None = None) -> Path:
        name = name or settings.model_name
        if not name or any(c in name for c in '/\\:*?"<>|') or name.startswith("."):
            raise ValueError(f"'{name}' is not a plain name for a settings file")
        return settings.save(self.settings_dir / f"{name}.json")

    def load_settings(self, name: str) -> Settings:
        if name not in self.saved_settings():
            raise FileNotFoundError(f"no saved settings named '{name}' in {self.settings_dir}")
        return Settings.load(self.settings_dir / f"{name}.json")

    def remember_last_used(self, settings: Settings) -> None:
        settings.save(self.data_dir / LAST_USED)

    def last_used(self) -> Settings | None:
        """The settings of the last Train press (they come back after a restart); None if none or unreadable."""
        path = self.data_dir / LAST_USED
        if not path.is_file():
            return None
        try:
            return Settings.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except Exception:  # an unreadable file must not stop the tab from opening
            return None
