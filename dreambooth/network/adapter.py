"""The adapter a LoRA / LoHa / LoKr run trains: one LyCORIS module per adapted layer, and its kohya-format tensors.

:func:`build_network` makes a :class:`Network` for the layers :func:`~.names.select_targets` chooses, with
LyCORIS's own module classes (``LoConModule`` for LoRA and LoCon, ``LohaModule``, ``LokrModule``); the math is
theirs.  :meth:`Network.apply` makes each adapted layer compute ``base(x) + multiplier * delta(x)`` by replacing that
layer *instance's* ``forward`` (nothing at class level: the WebUI's own Lora extension patches the classes);
:meth:`Network.restore` puts every layer back exactly as it was.  The base weights are never written.

The modules run in LyCORIS's bypass mode: the delta is computed from the input (``up(down(x)) * alpha / rank`` for
LoRA), never as a full-size weight, which keeps the memory of a step close to the frozen model's, and is the mode in
which LyCORIS applies dropout to the delta.  Its kernel backend is pinned to plain torch while the adapter is applied
(``LYCORIS_KERNEL_BACKEND``; LyCORIS would otherwise pick Triton kernels or ``torch.compile`` per operator on a GPU),
unless the user set that variable.

File tensors (:meth:`Network.kohya_tensors`) are what each LyCORIS module's ``state_dict`` holds, under its kohya
layer name: ``NAME.lora_down.weight``, ``NAME.lora_up.weight``, ``NAME.alpha`` (a 0-d tensor) for LoRA;
``hada_w1_a`` ... for LoHa; ``lokr_w1`` / ``lokr_w2`` or their ``_a`` / ``_b`` halves for LoKr.  The scale the WebUI
applies when it reads them, alpha / rank (LoKr with both factors full: 1, and LyCORIS then stores alpha = rank), is
the scale LyCORIS trains with.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import torch  # imported only by training code (the package's __init__ does not import this module)

from ..errors import DreamBoothError
from .names import Target, select_targets, split_key

KERNEL_VARIABLE = "LYCORIS_KERNEL_BACKEND"
KERNEL_BACKEND = "torch"  # the reference path; the one the tests prove (CPU tensors always take it)
_UNSET = object()


def _module_class(algorithm: str) -> Any:
    if algorithm == "lora":
        from lycoris.modules.locon import LoConModule

        return LoConModule
    if algorithm == "loha":
        from lycoris.modules.loha import LohaModule

        return LohaModule
    if algorithm == "lokr":
        from lycoris.modules.lokr import LokrModule

        return LokrModule
    raise ValueError(f"no adapter for the training method {algorithm!r}")


def _make_module(algorithm: str, target: Target, rank: int, alpha: float, dropout: float) -> Any:
    """One LyCORIS module on ``target``'s layer (bypass mode; multiplier 1)."""
    cls = _module_class(algorithm)
    if algorithm == "lora":
        return cls(target.name, target.module, 1.0, rank, alpha, dropout=dropout, bypass_mode=True)
    # LoHa / LoKr apply dropout to the delta through ``.drop`` like LoRA does, but their constructors print a
    # warning line per layer when given one: built without, then given the same dropout module LyCORIS would make.
    module = cls(target.name, target.module, 1.0, rank, alpha, dropout=0.0, bypass_mode=True)
    if dropout:
        module.drop = torch.nn.Dropout(dropout)
    return module


class Network(torch.nn.Module):
    """The adapter modules of one run, keyed by kohya layer name (``adapters``), and where each one sits."""

    def __init__(self, algorithm: str, targets: list[Target], modules: dict[str, Any]):
        super().__init__()
        self.algorithm = algorithm
        self.adapters = torch.nn.ModuleDict(modules)
        self.targets = {t.name: t for t in targets}  # a plain dict: the base layers are no part of this module
        self._saved_forward: dict[str, Any] = {}  # layer name -> its instance ``forward`` before apply (or _UNSET)
        self._saved_kernel: Any = _UNSET

    # -------------------------------------------------------------------------------------------- apply

    @property
    def is_applied(self) -> bool:
        return bool(self._saved_forward)

    @property
    def has_text_encoder(self) -> bool:
        return any(t.is_text for t in self.targets.values())

    def apply(self) -> None:
        """Make every adapted layer add its adapter's delta (idempotent)."""
        if self.is_applied:
            return
        if self._saved_kernel is _UNSET:
            self._saved_kernel = os.environ.get(KERNEL_VARIABLE)
            if self._saved_kernel is None:
                os.environ[KERNEL_VARIABLE] = KERNEL_BACKEND
        for name, adapter in self.adapters.items():
            layer = self.targets[name].module
            self._saved_forward[name] = layer.__dict__.get("forward", _UNSET)
            adapter.apply_to()

    def restore(self) -> None:
        """Every adapted layer back as it was before :meth:`apply`: its ``forward`` and nothing of LyCORIS's left on
        it.  Safe to call more than once, and when :meth:`apply` was never called."""
        for name in reversed(list(self._saved_forward)):
            layer = self.targets[name].module
            self.adapters[name].restore()
            saved = self._saved_forward.pop(name)
            for attribute in ("forward", "_lycoris_wrappers", "_lycoris_original_forward"):
                layer.__dict__.pop(attribute, None)
            if saved is not _UNSET:
                layer.forward = saved
        if self._saved_kernel is not _UNSET:
            if self._saved_kernel is None:
                os.environ.pop(KERNEL_VARIABLE, None)
            self._saved_kernel = _UNSET

    # -------------------------------------------------------------------------------------------- training

    def param_groups(self, unet_lr: float, text_lr: float) -> list[dict[str, Any]]:
        """The optimizer's groups: the UNet's adapters at ``unet_lr``, the text encoder's at ``text_lr`` (a group
        only when it has parameters)."""
        groups = []
        for is_text, lr in ((False, unet_lr), (True, text_lr)):
            params = [
                p
                for name, adapter in self.adapters.items()
                if self.targets[name].is_text == is_text
                for p in adapter.parameters()
            ]
            if params:
                groups.append({"params": params, "lr": lr})
        return groups

    def text_parameters(self) -> Iterator[Any]:
        for name, adapter in self.adapters.items():
            if self.targets[name].is_text:
                yield from adapter.parameters()

    # -------------------------------------------------------------------------------------------- files

    def kohya_tensors(self) -> dict[str, Any]:
        """The file's tensors: each module's LyCORIS state dict under its kohya layer name (detached; fp32 as
        trained)."""
        return {
            f"{name}.{suffix}": value.detach()
            for name, adapter in self.adapters.items()
            for suffix, value in adapter.state_dict().items()
        }

    def load_kohya_tensors(self, tensors: dict[str, Any], source: str = "the LoRA file") -> None:
        """Continue from a file's tensors (``network_init_from``).  The file must hold exactly these layers with
        these shapes and alphas; else one sentence names ``source`` and the first mismatch."""
        expected = self.kohya_tensors()
        layers: dict[str, dict[str, Any]] = {}
        for key, value in tensors.items():
            name, suffix = split_key(key)
            layers.setdefault(name, {})[suffix] = value

        def refuse(what: str) -> None:
            raise DreamBoothError(f"{source} does not match these settings: {what}.")

        extra = sorted(set(layers) - set(self.adapters))
        if extra:
            hint = (
                " (a text-encoder layer: turn network_train_text_encoder on)"
                if extra[0].startswith("lora_te")
                else " (a conv layer: set network_conv_rank)"
                if _in_conv_block(extra[0])
                else ""
            )
            refuse(f"it adapts the layer {extra[0]}, which these settings do not{hint}")
        missing = [name for name in self.adapters if name not in layers]
        if missing:
            refuse(f"it has no adapter for the layer {missing[0]}, which these settings train")
        wanted_by_layer: dict[str, dict[str, Any]] = {}
        for key, value in expected.items():
            name, suffix = split_key(key)
            wanted_by_layer.setdefault(name, {})[suffix] = value
        for name in self.adapters:
            found, wanted = layers[name], wanted_by_layer[name]
            if set(found) != set(wanted):
                refuse(
                    f"the layer {name} has the tensors {', '.join(sorted(found))}, a {self.algorithm} adapter of these "
                    f"settings has {', '.join(sorted(wanted))} (another training_method or rank?)"
                )
            for suffix, value in found.items():
                if tuple(value.shape) != tuple(wanted[suffix].shape):
                    refuse(
                        f"{name}.{suffix} has the shape {list(value.shape)}, these settings make "
                        f"{list(wanted[suffix].shape)} (another network_rank or network_conv_rank?)"
                    )
            alpha, own = found.get("alpha"), wanted.get("alpha")
            if alpha is not None and own is not None and float(alpha) != float(own):
                refuse(
                    f"{name} has alpha {float(alpha):g}, these settings give {float(own):g} (set network_alpha or "
                    "network_conv_alpha to the file's)"
                )
        with torch.no_grad():
            for name, adapter in self.adapters.items():
                device = next(adapter.parameters()).device
                adapter.load_state_dict({k: v.to(device) for k, v in layers[name].items()}, strict=True)


CONV_BLOCK_PARTS = (
    ("_resnets_", "_downsamplers_", "_upsamplers_"),  # diffusers names (SD 1.x / 2.x)
    ("_in_layers_", "_out_layers_", "_emb_layers_", "_skip_connection", "_0_op"),  # sgm names (SDXL)
)


def _in_conv_block(name: str) -> bool:
    """A UNet layer inside a resnet or a sampler: what a conv rank (LoCon) adds."""
    if not name.startswith("lora_unet_"):
        return False
    sgm_upsampler = name.startswith("lora_unet_output_blocks_") and name.endswith("_conv")
    return sgm_upsampler or any(part in name for parts in CONV_BLOCK_PARTS for part in parts)


def build_network(components: Any, settings: Any, seed: int | None = None) -> Network:
    """The adapter ``settings`` ask for on ``components`` (UNet, and the text encoder(s) with
    ``network_train_text_encoder``: SDXL's two), on the device of the layers it adapts, in fp32, not yet applied.

    Ranks: ``network_rank`` / ``network_alpha`` for Linear and 1x1 conv layers, ``network_conv_rank`` /
    ``network_conv_alpha`` (0: the conv rank) for k x k convolutions, which are adapted only with a conv rank.
    ``seed``: the initial weights are drawn from it (default the settings' seed), without touching torch's RNG.
    """
    algorithm = settings.training_method
    conv_rank = settings.network_conv_rank
    text = settings.network_train_text_encoder
    text_encoder = components.text_encoder if text else None
    text_encoder_2 = getattr(components, "text_encoder_2", None) if text else None
    targets = select_targets(components.unet, text_encoder, conv=conv_rank > 0, text_encoder_2=text_encoder_2)
    modules = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed if seed is None else seed)
        for target in targets:
            if target.conv:
                rank, alpha = conv_rank, settings.network_conv_alpha or conv_rank
            else:
                rank, alpha = settings.network_rank, settings.network_alpha
            modules[target.name] = _make_module(algorithm, target, rank, alpha, settings.network_dropout)
    network = Network(algorithm, targets, modules)
    for target in targets:  # each adapter beside its layer (all on one device in this trainer)
        parameter = next(target.module.parameters())
        adapter = network.adapters[target.name]
        if next(adapter.parameters()).device != parameter.device:
            adapter.to(parameter.device)
    return network
