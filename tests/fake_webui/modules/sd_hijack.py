"""Mirrors the module-structure side of ``modules/sd_hijack.py`` (v1.10.1): ``model_hijack.hijack(m)`` /
``undo_hijack(m)`` / ``redo_hijack(m)``.

Real: after every load the WebUI wraps the text encoder(s) in ``FrozenCLIPEmbedderWithCustomWords`` (or the OpenCLIP /
SDXL variants), which keep the original as ``.wrapped``, and wraps the token embedding in ``EmbeddingsWithFixes``
(also ``.wrapped``). So ``sd_model.state_dict()`` has keys like
``cond_stage_model.wrapped.transformer.text_model.embeddings.token_embedding.wrapped.weight`` (SD1),
``cond_stage_model.wrapped.model.token_embedding.wrapped.weight`` (SD2), and for SDXL
``conditioner.embedders.N.wrapped....`` plus the same tensors again under ``cond_stage_model....`` (the hijack sets
``m.cond_stage_model = conditioner``). The fake does exactly these module moves with a plain ``Wrapped`` module; it
does not touch attention optimizations, embeddings (textual inversion) or forward passes.
"""

from __future__ import annotations

import torch

from modules import fake


class Wrapped(torch.nn.Module):
    """Stands in for ``FrozenCLIPEmbedderWithCustomWords`` & co. and ``EmbeddingsWithFixes``: the original is
    ``.wrapped``."""

    def __init__(self, wrapped: torch.nn.Module, kind: str):
        super().__init__()
        self.wrapped = wrapped
        self.kind = kind


def _token_embedding_owner(text_model: torch.nn.Module) -> torch.nn.Module | None:
    """The module whose ``token_embedding`` child is the token embedding (transformers CLIP or OpenCLIP layout)."""
    modules = dict(text_model.named_modules())
    for path in ("transformer.text_model.embeddings", "model"):
        owner = modules.get(path)
        if owner is not None and "token_embedding" in owner._modules:
            return owner
    return None


def _wrap_text_model(text_model: torch.nn.Module) -> Wrapped:
    owner = _token_embedding_owner(text_model)
    if owner is not None and not isinstance(owner.token_embedding, Wrapped):
        owner.token_embedding = Wrapped(owner.token_embedding, "EmbeddingsWithFixes")
    return Wrapped(text_model, "FrozenCLIPEmbedderWithCustomWords")


def _unwrap_text_model(wrapper: Wrapped) -> torch.nn.Module:
    text_model = wrapper.wrapped
    owner = _token_embedding_owner(text_model)
    if owner is not None and isinstance(owner.token_embedding, Wrapped):
        owner.token_embedding = owner.token_embedding.wrapped
    return text_model


class StableDiffusionModelHijack:
    def hijack(self, m: torch.nn.Module) -> None:
        fake.record("sd_hijack.hijack")
        conditioner = m._modules.get("conditioner")
        if conditioner is not None:
            embedders = conditioner._modules.get("embedders")
            text_cond_models = []
            for name, embedder in list((embedders._modules if embedders is not None else {}).items()):
                if isinstance(embedder, Wrapped) or _token_embedding_owner(embedder) is None:
                    continue
                wrapper = _wrap_text_model(embedder)
                setattr(embedders, name, wrapper)
                text_cond_models.append(wrapper)
            if text_cond_models:
                m.cond_stage_model = text_cond_models[0] if len(text_cond_models) == 1 else conditioner
        elif isinstance(m._modules.get("cond_stage_model"), torch.nn.Module) and not isinstance(
            m.cond_stage_model, Wrapped
        ):
            m.cond_stage_model = _wrap_text_model(m.cond_stage_model)

    def undo_hijack(self, m: torch.nn.Module) -> None:
        fake.record("sd_hijack.undo_hijack")
        conditioner = m._modules.get("conditioner")
        if conditioner is not None:
            embedders = conditioner._modules.get("embedders")
            for name, embedder in list((embedders._modules if embedders is not None else {}).items()):
                if isinstance(embedder, Wrapped):
                    setattr(embedders, name, _unwrap_text_model(embedder))
            if "cond_stage_model" in m._modules:
                delattr(m, "cond_stage_model")
        elif isinstance(m._modules.get("cond_stage_model"), Wrapped):
            m.cond_stage_model = _unwrap_text_model(m.cond_stage_model)

    def redo_hijack(self, m: torch.nn.Module) -> None:
        self.undo_hijack(m)
        self.hijack(m)


model_hijack = StableDiffusionModelHijack()
