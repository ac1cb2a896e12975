"""SDXL: two text encoders (CLIP ViT-L and OpenCLIP ViT-bigG), both hidden states concatenated as the context, the
second's pooled (projected) output and six size conditionings ("time ids") as the UNet's added embedding.

The conditioning is made as diffusers' ``StableDiffusionXLPipeline.encode_prompt`` makes it (and Stability's sgm:
``layer: hidden, layer_idx: -2`` for both embedders): each encoder's hidden state ``clip_skip`` layers below the
last one (``clip_skip`` 1 = the penultimate layer, as SDXL was trained; diffusers' ``clip_skip=None``), without the
final layer norm; the pooled output is bigG's projected end-of-text state from its last layer.  The time ids are
(original height, original width, crop top, crop left, target height, target width) of each sample's real crop
(:class:`~dreambooth.data.images.Crop`).  The SDXL VAE overflows in fp16: it stays fp32 unless another VAE is given.
"""

from __future__ import annotations

from typing import Any

from .base import Conditioning, Family


class SDXL(Family):
    name = "sdxl"
    default_resolution = 1024
    text_encoder_names = ("text_encoder", "text_encoder_2")
    uses_crops = True
    vae_in_fp32 = True

    def check(self, components: Any, clip_skip: int) -> str | None:
        layers = min(e.config.num_hidden_layers for e in self.text_encoders(components))
        if clip_skip > layers - 1:
            return (
                f"clip_skip is {clip_skip} but SDXL's text encoders have {layers} layers: with SDXL, clip_skip 1 is "
                f"the penultimate layer (as SDXL was trained), so at most {layers - 1} can be used"
            )
        return None

    def encode(self, components: Any, prompts: list[str], clip_skip: int) -> Conditioning:
        import torch

        states, pooled = [], None
        pairs = ((components.tokenizer, components.text_encoder), (components.tokenizer_2, components.text_encoder_2))
        for tokenizer, encoder in pairs:
            device = next(encoder.parameters()).device
            length = tokenizer.model_max_length
            ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")
            ids = ids.input_ids.to(device)
            output = encoder(ids, output_hidden_states=True)
            states.append(output.hidden_states[-(clip_skip + 1)])
            pooled = output[0]  # the second encoder's (CLIPTextModelWithProjection): its projected text embedding
        hidden = torch.cat([s.to(states[-1].device) for s in states], dim=-1)
        return Conditioning(hidden, pooled)

    def unet_inputs(self, conditioning: Conditioning, crops: list[Any] | None = None) -> dict[str, Any]:
        import torch

        if crops is None or len(crops) != len(conditioning.hidden):
            raise ValueError("SDXL's UNet needs the crop of every sample (its time ids)")
        time_ids = torch.tensor([c.time_ids() for c in crops], dtype=torch.float32, device=conditioning.hidden.device)
        return {
            "encoder_hidden_states": conditioning.hidden,
            "added_cond_kwargs": {"text_embeds": conditioning.pooled, "time_ids": time_ids},
        }

    def pipeline(self, components: Any, scheduler: Any) -> Any:
        from ...compat import quiet_library_notices

        with quiet_library_notices():
            from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=components.vae,
            text_encoder=components.text_encoder,
            text_encoder_2=components.text_encoder_2,
            tokenizer=components.tokenizer,
            tokenizer_2=components.tokenizer_2,
            unet=components.unet,
            scheduler=scheduler,
            force_zeros_for_empty_prompt=True,  # SDXL base's: an empty negative prompt is zeros, as in the WebUI
            add_watermarker=False,
        )

    def pipeline_inputs(
        self, pipe: Any, components: Any, prompts: list[str], negative: list[str], clip_skip: int, dtype: Any
    ) -> dict[str, Any]:
        embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompt=prompts,
            device=next(components.text_encoder_2.parameters()).device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=True,
            negative_prompt=None if not any(negative) else negative,
            clip_skip=None if clip_skip <= 1 else clip_skip - 1,  # diffusers counts from the penultimate layer
        )
        return {
            "prompt_embeds": embeds.to(dtype),
            "negative_prompt_embeds": negative_embeds.to(dtype),
            "pooled_prompt_embeds": pooled.to(dtype),
            "negative_pooled_prompt_embeds": negative_pooled.to(dtype),
        }
