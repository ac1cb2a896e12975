"""What a LoRA / LoHa / LoKr run does differently from a full fine-tune (``training_method``), in one place.

The base model stays frozen (placed by train/precision.py: in the mixed-precision dtype, never copied to fp32) and
an adapter (dreambooth/network) is trained on it: built after the class images and caches (they come from the base
model alone), optionally started from a LoRA file, applied for the steps, samples and tests, and always taken off
again at the end, whatever happened (the WebUI's model is trained this way).  Its optimizer has the UNet adapters'
and the text encoder adapters' learning rates (SDXL: both encoders' adapters at the text rate); the resumable state
holds the adapter (``network.safetensors``); each save writes one kohya-format ``.safetensors`` into ``lora_dir``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..data.dataset import mix_seed


class NetworkMethod:
    """The adapter of one run and its stages (``trainer``: the :class:`~dreambooth.train.loop.Trainer`)."""

    def __init__(self, trainer: Any):
        self.trainer = trainer
        self.network: Any = None
        self.started_at = time.time()
        self._base_hash: str | None = None
        self.lr_scale = 1.0  # scale_lr's factor
        self._checkpointing_was: bool | None = None  # the UNet's gradient checkpointing before the run

    # -------------------------------------------------------------------------------------------- set-up

    def setup(self, scale: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Build the adapter (from ``network_init_from`` when given), apply it; returns the optimizer's groups and
        the trained modules by name (for the resumable state).  ``scale``: the learning-rate factor of scale_lr."""
        trainer = self.trainer
        s, components = trainer.settings, trainer.components
        unet = components.unet
        self.lr_scale = scale
        if s.gradient_checkpointing:
            self._checkpointing_was = bool(getattr(unet, "is_gradient_checkpointing", False))
            unet.enable_gradient_checkpointing()
        # Frozen, but in training mode: diffusers checkpoints activations only then; SD's UNet has no dropout.
        unet.requires_grad_(False).train()
        for text_encoder in (components.text_encoder, components.text_encoder_2):  # SDXL has a second one
            if text_encoder is not None:
                text_encoder.requires_grad_(False)
        self.network = network = trainer._build_network(components)
        if s.network_init_from:
            from ..network.files import read_network_file

            found = read_network_file(s.network_init_from)
            network.load_kohya_tensors(found.tensors, f"network_init_from: {found.path}")
            trainer.log(f"the adapter starts from {found.path}")
        if s.full_bf16:  # the trained weights in bf16 (see train/paramwise.py)
            network.bfloat16()
        network.train()
        network.apply()
        trainer.log(f"training a {s.training_method} adapter on {len(network.adapters)} layers")
        groups = network.param_groups(s.network_unet_lr * scale, s.network_text_encoder_lr * scale)
        return groups, {"network": network}

    @contextlib.contextmanager
    def randomness(self, batch_index: int) -> Iterator[None]:
        """The adapter's dropout draws of a micro-batch from a generator state seeded by (seed, batch, process),
        torch's own state restored afterwards: a run is reproducible and its resume exact (like every other draw of a
        step, train/loop.py), and nothing outside the step is changed.  Without dropout nothing is drawn."""
        import torch

        s = self.trainer.settings
        if not s.network_dropout:
            yield
            return
        device = self.trainer.dist.device
        cuda = [device] if device.type == "cuda" else []
        seed = mix_seed(s.seed, "dropout", batch_index, self.trainer.dist.rank)
        with torch.random.fork_rng(devices=cuda):
            torch.random.default_generator.manual_seed(seed)
            if cuda:
                torch.cuda.manual_seed(seed)  # this process's device only
            yield

    def freeze_text(self) -> None:
        """``stop_text_encoder``: the text encoder's adapters stop training (their embeddings are cached from now)."""
        for parameter in self.network.text_parameters():
            parameter.requires_grad_(False)

    def restore(self) -> None:
        """The adapter off every layer (idempotent; nothing to do when it was never built)."""
        if self.network is not None:
            self.network.restore()
        if self._checkpointing_was is False:  # the given model as it was: checkpointing is the run's choice
            self.trainer.components.unet.disable_gradient_checkpointing()
            self._checkpointing_was = None

    # -------------------------------------------------------------------------------------------- saving

    def file_path(self, step: int) -> Path:
        return self.trainer._checkpoint_folder() / f"{self.trainer.settings.model_name}_{step}.safetensors"

    def tensors(self) -> dict[str, Any]:
        """The file's tensors (fp16 with save_half)."""
        import torch

        tensors = self.network.kohya_tensors()
        dtype = torch.float16 if self.trainer.settings.save_half else torch.float32
        return {key: value.to(dtype) for key, value in tensors.items()}

    def metadata(self, run: Any) -> dict[str, str]:
        from ..network.metadata import network_metadata

        trainer = self.trainer
        s = trainer.settings
        scale = self.lr_scale
        return network_metadata(
            s,
            trainer.requested,
            trainer.components.arch,
            step=run.step,
            total_steps=run.total,
            instances=run.plan.instances,
            classes=run.plan.classes,
            started_at=self.started_at,
            finished_at=time.time(),
            base_model_hash=self.base_hash(),
            learning_rates=(s.network_unet_lr * scale, s.network_text_encoder_lr * scale),
        )

    def base_hash(self) -> str | None:
        """sha256 of the base model's file (computed once per run); None for a folder or a model in memory."""
        from ..network.metadata import file_sha256

        trainer = self.trainer
        path = trainer.settings.pretrained_model_name_or_path
        if self._base_hash is None and trainer.check_model_path and path and Path(path).is_file():
            try:
                self._base_hash = file_sha256(path)
            except OSError:
                self._base_hash = ""
        return self._base_hash or None
