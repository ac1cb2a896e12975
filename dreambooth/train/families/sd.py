"""SD 1.x and 2.x (and their inpainting models): one CLIP text encoder, whose hidden state is the context."""

from __future__ import annotations

from typing import Any

from .base import Conditioning, Family


class StableDiffusion(Family):
    name = "sd"
    default_resolution = 512

    def check(self, components: Any, clip_skip: int) -> str | None:
        layers = components.text_encoder.config.num_hidden_layers
        if clip_skip > layers:
            return f"clip_skip is {clip_skip} but the text encoder has only {layers} layers"
        return None

    def encode(self, components: Any, prompts: list[str], clip_skip: int) -> Conditioning:
        from ..sampling import encode_prompts

        return Conditioning(encode_prompts(components.text_encoder, components.tokenizer, prompts, clip_skip))

    def pipeline(self, components: Any, scheduler: Any) -> Any:
        from ...compat import quiet_library_notices
        from ...models.inpainting import pipeline_class

        with quiet_library_notices():  # the pipeline module resolves CLIP's image processor, which we never use
            pipeline = pipeline_class(components)
        return pipeline(
            vae=components.vae,
            text_encoder=components.text_encoder,
            tokenizer=components.tokenizer,
            unet=components.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def pipeline_inputs(
        self, pipe: Any, components: Any, prompts: list[str], negative: list[str], clip_skip: int, dtype: Any
    ) -> dict[str, Any]:
        embeds = self.encode(components, prompts, clip_skip).hidden
        negative_embeds = self.encode(components, negative, clip_skip).hidden
        return {"prompt_embeds": embeds.to(dtype), "negative_prompt_embeds": negative_embeds.to(dtype)}
