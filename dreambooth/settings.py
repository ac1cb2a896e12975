"""The settings of a training run: every field declared once, with its default, bounds and help text.

Field names follow the community DreamBooth guide (``pretrained_model_name_or_path``, ``instance_data_dir``,
``with_prior_preservation``, ``prior_loss_weight``, ...) since users bring its configs; our own names only for what
it lacks.  The UI and the README are built from, or checked against, :func:`fields`.

* :meth:`Settings.validate` returns every problem as a sentence; nothing is corrected silently.
* JSON files carry ``schema_version``; older versions are migrated step by step (:data:`MIGRATIONS`).
* :func:`concepts_from_list` imports the guide's ``concepts_list.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DreamBoothError

SCHEMA_VERSION = 2
# Upper bounds: far above any real run, low enough that nothing overflows or runs for ever.
MAX_SEED = 2**32 - 1  # numpy and torch generators both take seeds up to here
MAX_STEPS = 10_000_000
MAX_CLASS_IMAGES = 100_000
MAX_BUCKET_SIDE = 8192
TRAINING_METHODS = ("full", "lora", "loha", "lokr")
NETWORK_METHODS = TRAINING_METHODS[1:]
SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "cosine_with_hard_restarts",
    "polynomial",
)
OPTIMIZERS = ("adamw", "adamw_8bit", "adafactor", "prodigy", "lion", "lion_8bit", "adamw_schedule_free")
LOSS_TYPES = ("l2", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
MAX_TIMESTEPS = 1000  # the noise schedules of SD 1.x / 2.x / SDXL have 1000 training timesteps


class SettingsError(DreamBoothError):
    """Settings that cannot be used; ``problems`` lists every reason as a sentence."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid settings:\n" + "\n".join(f"  - {p}" for p in self.problems))


def setting(
    default: Any,
    help: str,
    group: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple[str, ...] | None = None,
    aliases: tuple[str, ...] = (),
    headless_only: bool = False,
    label: str = "",
) -> Any:
    """Declare one settings field: default, one-line help, UI group, bounds / choices, accepted old names.

    ``label``: the name people read in the tab and the README (the field's name, the guide's, stays the key).
    """
    metadata = {
        "label": label,
        "help": help,
        "group": group,
        "minimum": minimum,
        "maximum": maximum,
        "choices": choices,
        "aliases": aliases,
        "headless_only": headless_only,
    }
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class Concept:
    """One subject (or style) to teach: its images, its prompts, and its class for prior preservation."""

    instance_data_dir: str = setting(
        "", "Folder of the subject's images (searched recursively).", "concept", label="Instance images folder"
    )
    instance_prompt: str = setting(
        "",
        "Prompt with the rare identifier, e.g. 'photo of zwx dog'; [filewords] inserts the caption.",
        "concept",
        label="Instance prompt",
    )
    loss_weight: float = setting(
        1.0,
        "Multiplies this concept's instance loss (its class images keep prior_loss_weight).",
        "concept",
        minimum=0.0,
        maximum=100.0,
        label="Loss weight of this concept",
    )
    repeats: int | None = setting(
        None,
        "Times each instance image of this concept is seen per epoch (kohya's folder repeats); empty: balanced, "
        "its images repeat until the longest concept's are all used.",
        "concept",
        minimum=1,
        maximum=10000,
        label="Repeats of this concept",
    )
    validation_data_dir: str = setting(
        "",
        "Folder of held-out images of this concept for the validation loss (never trained on; captioned like the "
        "instance images); empty: validation_split of the instance images.",
        "concept",
        label="Validation images folder",
    )
    class_data_dir: str = setting(
        "",
        "Folder of class (regularisation) images; missing ones are generated there.",
        "concept",
        label="Class images folder",
    )
    class_prompt: str = setting(
        "", "Prompt of the class without the identifier, e.g. 'photo of a dog'.", "concept", label="Class prompt"
    )
    class_negative_prompt: str = setting(
        "", "Negative prompt used when generating class images.", "concept", label="Class negative prompt"
    )
    num_class_images: int | None = setting(
        None,
        "Class images for this concept (empty: the global num_class_images).",
        "concept",
        minimum=0,
        maximum=MAX_CLASS_IMAGES,
        label="Class images of this concept",
    )
    sample_prompt: str = setting(
        "",
        "Prompt of this concept's samples (empty: the instance prompt).",
        "concept",
        label="Sample prompt of this concept",
    )


@dataclass
class Settings:
    """Everything one training run needs.  See :func:`fields` for help texts and bounds."""

    # --- model and output
    pretrained_model_name_or_path: str = setting(
        "",
        "Base model: a .safetensors/.ckpt file (with NAME.yaml beside it if any) or a diffusers folder.",
        "model",
        label="Base model",
    )
    pretrained_vae_name_or_path: str = setting(
        "",
        "A separate VAE (.safetensors/.ckpt file or diffusers VAE folder); empty: the model's own.",
        "model",
        label="VAE",
    )
    output_dir: str = setting(
        "",
        "Folder for checkpoints, samples, logs and the training state (the tab: one folder per model name).",
        "model",
        headless_only=True,
        label="Output folder",
    )
    model_name: str = setting("dreambooth", "Name of the output: NAME_STEP.safetensors.", "model", label="Model name")
    checkpoint_dir: str = setting(
        "",
        "Folder of the output checkpoints (empty: output_dir; relative: inside output_dir; the tab: the WebUI's "
        "model folder).",
        "saving",
        headless_only=True,
        label="Checkpoint folder",
    )
    lora_dir: str = setting(
        "",
        "Folder of the output LoRA files (empty: output_dir; relative: inside output_dir; the tab: the WebUI's Lora "
        "folder).",
        "saving",
        headless_only=True,
        label="Lora folder",
    )
    save_format: str = setting(
        "safetensors", "Output file format.", "saving", choices=("safetensors", "ckpt"), label="File format"
    )
    save_half: bool = setting(
        False,
        "Store the output checkpoint (or LoRA file) in fp16 (half the size).",
        "saving",
        aliases=("save_unet_half",),
        label="Save in fp16",
    )
    resume_from: str = setting(
        "", "A training state folder to continue from (output_dir/state/...).", "model", label="Resume from state"
    )

    # --- data
    concepts: list[Concept] = setting([], "The concepts to train (any number).", "concepts", label="Concepts")
    resolution: int = setting(
        512, "Training resolution in pixels (multiple of 8).", "basics", minimum=64, maximum=4096, label="Resolution"
    )
    center_crop: bool = setting(
        False, "Crop the centre of each image (else a random crop each epoch).", "basics", label="Center crop"
    )
    hflip: bool = setting(
        False, "Also train on horizontally flipped images (random per epoch).", "basics", label="Horizontal flip"
    )
    use_txt_as_label: bool = setting(
        False, "Caption each image from IMAGE.txt beside it.", "basics", label="Captions from IMAGE.txt"
    )
    use_filename_as_label: bool = setting(
        False, "Caption each image from its file name.", "basics", label="Captions from file names"
    )
    caption_template: str = setting(
        "[PX][P]",
        "How the caption combines with the prompt: [PX] the prompt, [P] the caption.",
        "basics",
        label="Caption template",
    )

    # --- aspect-ratio buckets and augmentation
    use_aspect_ratio_bucket: bool = setting(
        False,
        "Train each image at the bucket (about resolution² pixels) closest to its aspect ratio, not a square crop.",
        "dataset",
        label="Aspect-ratio buckets",
    )
    aspect_buckets: str = setting(
        "",
        "Custom bucket list, e.g. '512x512 576x448 448x576' (empty: generated from the sides below).",
        "dataset",
        label="Custom buckets",
    )
    bucket_min_side: int | None = setting(
        None,
        "Smallest generated bucket side in px, a multiple of 64 (empty: resolution / 2).",
        "dataset",
        minimum=64,
        maximum=MAX_BUCKET_SIDE,
        label="Smallest bucket side",
    )
    bucket_max_side: int | None = setting(
        None,
        "Largest generated bucket side in px, a multiple of 64 (empty: resolution x 2).",
        "dataset",
        minimum=64,
        maximum=MAX_BUCKET_SIDE,
        label="Largest bucket side",
    )
    debug_arb: bool = setting(
        False,
        "Log every image's bucket and the counts, and save them to output_dir/buckets.json.",
        "dataset",
        label="Log buckets",
    )
    augment_probability: float = setting(
        0.5,
        "Chance that each augmentation below is applied to an augmented variant.",
        "dataset",
        minimum=0.0,
        maximum=1.0,
        label="Augmentation chance",
    )
    augment_rotation: float = setting(
        0.0,
        "Rotate by up to this many degrees either way (0: off).",
        "dataset",
        minimum=0.0,
        maximum=30.0,
        label="Rotation (degrees)",
    )
    augment_brightness: float = setting(
        0.0,
        "Brightness jitter: a factor in 1 ± this (0: off).",
        "dataset",
        minimum=0.0,
        maximum=1.0,
        label="Brightness jitter",
    )
    augment_contrast: float = setting(
        0.0,
        "Contrast jitter: a factor in 1 ± this (0: off).",
        "dataset",
        minimum=0.0,
        maximum=1.0,
        label="Contrast jitter",
    )
    augment_random_crop: float = setting(
        0.0,
        "Random crop: keep a random window of (1 - this) to 1 of each side (0: off).",
        "dataset",
        minimum=0.0,
        maximum=0.5,
        label="Random crop",
    )
    augment_variants: int = setting(
        4,
        "Augmented variants of each image when latents are cached (each encoded once); uncached: new each epoch.",
        "dataset",
        minimum=1,
        maximum=64,
        label="Augmented variants",
    )
    inpainting_full_mask_ratio: float = setting(
        0.25,
        "Inpainting models: share of training samples masked whole (the rest get random rectangles and strokes).",
        "dataset",
        minimum=0.0,
        maximum=1.0,
        label="Inpainting: share of full masks",
    )

    # --- prior preservation
    with_prior_preservation: bool = setting(
        False,
        "Train on class images too, so the class keeps its look (prior preservation).",
        "prior",
        label="Prior preservation",
    )
    prior_loss_weight: float = setting(
        1.0, "Weight of the class images' loss.", "prior", minimum=0.0, maximum=100.0, label="Prior loss weight"
    )
    num_class_images: int = setting(
        100,
        "Class images per concept; missing ones are generated first.",
        "prior",
        minimum=0,
        maximum=MAX_CLASS_IMAGES,
        label="Class images",
    )
    sample_batch_size: int = setting(
        4,
        "Batch size when generating class images and samples.",
        "prior",
        minimum=1,
        maximum=64,
        aliases=("infer_batch_size",),
        label="Generation batch size",
    )
    class_inference_steps: int = setting(
        30, "Denoising steps when generating class images.", "prior", minimum=1, maximum=500, label="Class image steps"
    )
    prior_from_base_model: bool = setting(
        False,
        "Prior preservation without class images: for each instance image, the frozen base model's prediction on the "
        "class prompt (same noisy latent) is the target of the trained model's, weighted by prior_loss_weight. Costs "
        "one more forward pass per step (LoRA: with the adapter off; full fine-tune: a half-precision copy of the base "
        "UNet is kept). Use instead of with_prior_preservation when you have no time or disk for class images.",
        "prior",
        label="Prior from the base model (no class images)",
    )

    # --- schedule
    seed: int = setting(
        1234, "Random seed of the run (data order, noise, crops).", "basics", minimum=0, maximum=MAX_SEED, label="Seed"
    )
    train_batch_size: int = setting(
        1, "Instance images per step.", "basics", minimum=1, maximum=256, label="Batch size"
    )
    num_train_epochs: int | None = setting(
        None, "Epochs to train (empty: from max_train_steps).", "basics", minimum=1, maximum=100000, label="Epochs"
    )
    max_train_steps: int | None = setting(
        None,
        "Optimizer steps to train; wins over epochs (empty with no epochs: 100 per instance image).",
        "basics",
        minimum=1,
        maximum=MAX_STEPS,
        label="Training steps",
    )
    gradient_accumulation_steps: int = setting(
        1,
        "Batches whose gradients are summed before each optimizer step.",
        "basics",
        minimum=1,
        maximum=1024,
        label="Gradient accumulation",
    )

    # --- learning rate and optimiser
    learning_rate: float = setting(
        5e-6, "Learning rate of the UNet.", "optimizer", minimum=0.0, maximum=1.0, label="Learning rate"
    )
    scale_lr: bool = setting(
        False,
        "Multiply the learning rates by batch size x accumulation steps.",
        "optimizer",
        label="Scale learning rate",
    )
    lr_scheduler: str = setting(
        "constant", "Learning-rate schedule.", "optimizer", choices=SCHEDULERS, label="LR schedule"
    )
    lr_warmup_steps: int = setting(
        0, "Steps of linear warm-up from 0.", "optimizer", minimum=0, maximum=MAX_STEPS, label="Warm-up steps"
    )
    lr_cycles: int = setting(
        1,
        "Cycles of the cosine_with_restarts schedule.",
        "optimizer",
        minimum=1,
        maximum=1000,
        aliases=("lr_num_cycles",),
        label="LR cycles",
    )
    lr_power: float = setting(
        1.0, "Power of the polynomial schedule.", "optimizer", minimum=0.0, maximum=10.0, label="Polynomial power"
    )
    optimizer: str = setting(
        "adamw",
        "AdamW; adamw_8bit and lion_8bit: bitsandbytes' 8-bit states (less memory); adafactor (transformers, a fixed "
        "learning rate); prodigy (prodigyopt: finds its own step size, learning rate 1.0); lion (lion-pytorch: one "
        "state, about 10x lower learning rate than AdamW); adamw_schedule_free (schedulefree: no decay schedule "
        "needed; samples and checkpoints hold its averaged weights). The Adam betas, epsilon and weight decay below "
        "apply to each that has them.",
        "optimizer",
        choices=OPTIMIZERS,
        label="Optimizer",
    )
    prodigy_d_coef: float = setting(
        1.0,
        "Prodigy: multiplier of the step size it estimates (below 1: more careful).",
        "optimizer",
        minimum=0.0,
        maximum=100.0,
        label="Prodigy d coefficient",
    )
    prodigy_use_bias_correction: bool = setting(
        False, "Prodigy: Adam's bias correction of its moments.", "optimizer", label="Prodigy bias correction"
    )
    prodigy_safeguard_warmup: bool = setting(
        False,
        "Prodigy: keep the learning-rate warm-up out of its step-size estimate (use with warm-up steps).",
        "optimizer",
        label="Prodigy safeguard warm-up",
    )
    adam_beta1: float = setting(0.9, "Adam beta1.", "optimizer", minimum=0.0, maximum=0.9999, label="Adam beta1")
    adam_beta2: float = setting(0.999, "Adam beta2.", "optimizer", minimum=0.0, maximum=0.99999, label="Adam beta2")
    adam_weight_decay: float = setting(
        1e-2, "Adam weight decay.", "optimizer", minimum=0.0, maximum=1.0, label="Weight decay"
    )
    adam_epsilon: float = setting(1e-8, "Adam epsilon.", "optimizer", minimum=0.0, maximum=1.0, label="Adam epsilon")
    max_grad_norm: float = setting(
        1.0,
        "Clip the gradient norm to this value (0: no clipping). With fused_backward each parameter's gradient norm "
        "is clipped on its own (the global norm would need every gradient at once).",
        "optimizer",
        minimum=0.0,
        maximum=1e6,
        label="Gradient clipping",
    )
    use_ema: bool = setting(
        False,
        "Keep an exponential moving average (EMA) of the trained weights (LoRA: of the adapter) and use it for "
        "samples, test images and the saved output: smoother, often better results from long runs.",
        "optimizer",
        label="EMA of the weights",
    )
    ema_decay: float = setting(
        0.999,
        "EMA decay per update, reached after a warm-up (the first update copies the weights, the k-th uses "
        "min(decay, k / (k + 9))); higher remembers longer: about 1 / (1 - decay) updates.",
        "optimizer",
        minimum=0.0,
        maximum=0.999999,
        label="EMA decay",
    )
    ema_update_every: int = setting(
        1,
        "Update the EMA every N optimizer steps (the decay applies per update).",
        "optimizer",
        minimum=1,
        maximum=MAX_STEPS,
        label="EMA every N steps",
    )
    ema_on_cpu: bool = setting(
        False,
        "Keep the EMA in CPU memory instead of on the GPU (saves GPU memory of one fp32 copy of the trained weights; "
        "each update copies the weights to the CPU).",
        "optimizer",
        label="EMA in CPU memory",
    )
    ema_output: str = setting(
        "ema",
        "What the saves hold with use_ema: ema (NAME_STEP.safetensors holds the EMA weights); both (also "
        "NAME_STEP_trained.safetensors with the weights as trained, without averaging).",
        "optimizer",
        choices=("ema", "both"),
        label="EMA output",
    )

    # --- loss weighting and noise
    loss_type: str = setting(
        "l2",
        "The loss of each prediction: l2 (mean squared error), huber (pseudo-Huber: 2c(sqrt(d² + c²) - c), less "
        "pulled by outliers), smooth_l1 (2(sqrt(d² + c²) - c)).",
        "loss",
        choices=LOSS_TYPES,
        label="Loss type",
    )
    huber_c: float = setting(
        0.1,
        "c of the huber and smooth_l1 losses (where they change from quadratic to linear).",
        "loss",
        minimum=0.001,
        maximum=1.0,
        label="Huber c",
    )
    huber_schedule: str = setting(
        "snr",
        "c over the timesteps: constant; exponential (1 at t=0 down to huber_c at the last timestep); snr "
        "((1 - huber_c) / (1 + sigma_t)² + huber_c, sigma_t = sqrt((1 - alpha-bar_t) / alpha-bar_t)).",
        "loss",
        choices=HUBER_SCHEDULES,
        label="Huber schedule",
    )
    min_snr_gamma: float = setting(
        0.0,
        "Min-SNR weighting (0: off; 5 is usual): each sample's loss times min(SNR, gamma) / SNR (v-prediction: "
        "/ (SNR + 1)), so the low-noise timesteps weigh less.",
        "loss",
        minimum=0.0,
        maximum=100.0,
        label="Min-SNR gamma",
    )
    debiased_estimation: bool = setting(
        False,
        "Weight each sample's loss by 1 / sqrt(SNR) (v-prediction: 1 / sqrt(SNR + 1)), SNR capped at 1000 as kohya "
        "does and the weight at 1000 (zero terminal SNR).",
        "loss",
        label="Debiased estimation",
    )
    noise_offset: float = setting(
        0.0,
        "Add this x N(0, 1) per image and channel to the noise (0: off; 0.05-0.1 usual): lets the model learn very "
        "dark and very bright images.",
        "loss",
        minimum=0.0,
        maximum=1.0,
        label="Noise offset",
    )
    noise_offset_random_strength: bool = setting(
        False,
        "Scale each image's noise offset by a random U(0, 1) factor.",
        "loss",
        label="Random noise-offset strength",
    )
    input_perturbation: float = setting(
        0.0,
        "Noise the UNet input with noise + this x N(0, 1) while the target keeps the plain noise (0: off; 0.1 usual).",
        "loss",
        minimum=0.0,
        maximum=1.0,
        label="Input perturbation",
    )
    zero_terminal_snr: bool = setting(
        False,
        "Rescale the noise schedule so its last timestep is pure noise (zero terminal SNR); samples then use "
        "trailing timesteps. For v-prediction models.",
        "loss",
        label="Zero terminal SNR",
    )
    min_timestep: int = setting(
        0,
        "Smallest timestep drawn for training.",
        "loss",
        minimum=0,
        maximum=MAX_TIMESTEPS - 1,
        label="Smallest timestep",
    )
    max_timestep: int | None = setting(
        None,
        "Timesteps are drawn below this one (empty: the schedule's 1000).",
        "loss",
        minimum=1,
        maximum=MAX_TIMESTEPS,
        label="Timesteps below",
    )
    masked_loss: bool = setting(
        False,
        "Weigh each instance image's loss by IMAGE.mask.png beside it (white: train, black: ignore, grey: in "
        "between); images without a mask train everywhere. The Dataset tools make masks from transparent images.",
        "loss",
        label="Masked loss",
    )
    masked_loss_unmasked_weight: float = setting(
        0.0,
        "Masked loss: the weight of the masks' black part (0: ignored; 1: as without a mask).",
        "loss",
        minimum=0.0,
        maximum=1.0,
        label="Masked loss: weight of black",
    )

    # --- memory and speed
    mixed_precision: str = setting(
        "no",
        "Compute in fp16 or bf16: trained weights stay fp32; the VAE and a frozen text encoder are held in that dtype "
        "(checkpoints keep their exact fp32 weights).",
        "memory",
        choices=("no", "fp16", "bf16"),
        label="Mixed precision",
    )
    gradient_checkpointing: bool = setting(
        False,
        "Recompute activations in the backward pass: less memory, about 20% slower.",
        "memory",
        label="Gradient checkpointing",
    )
    cache_latents: bool = setting(
        True,
        "Encode each image once with the VAE (in memory and on disk) instead of every step.",
        "memory",
        label="Cache latents",
    )
    attention: str = setting(
        "sdpa",
        "Attention kernel: PyTorch SDPA, or xformers when installed.",
        "memory",
        choices=("sdpa", "xformers"),
        label="Attention kernel",
    )
    low_memory: bool = setting(
        False,
        "Fit my GPU: at start the trainer turns on the fastest combination of the memory switches that keep what "
        "is trained (cache_latents, mixed_precision, 8-bit AdamW, bf16 weights, fused backward, gradient "
        "checkpointing, in that order of cost) that the memory estimate says fits gpu_memory_gb, and logs it with "
        "the estimate (GPU size not known: all of them); batch, resolution and text-encoder training stay as set. "
        "(Whatever this says, the VAE and a frozen text encoder wait on the CPU during the steps once their outputs "
        "are cached.)",
        "memory",
        label="Fit my GPU",
    )
    gpu_memory_gb: float = setting(
        0.0,
        "GPU memory to fit, in GB as cards are sold (8 = an 8 GB card); 0: the GPU's own size when there is one. "
        "Used by Fit my GPU and the memory estimate.",
        "memory",
        minimum=0.0,
        maximum=4096.0,
        label="GPU memory (GB)",
    )
    fused_backward: bool = setting(
        False,
        "Update each weight as soon as its gradient is complete in the backward pass and free that gradient at once, "
        "so the gradients of the whole model never exist together (less memory). max_grad_norm then clips each "
        "parameter's gradient on its own. Not with mixed_precision fp16 or several processes.",
        "memory",
        label="Fused backward pass",
    )
    full_bf16: bool = setting(
        False,
        "Keep the trained weights in bf16 (half the memory of fp32): each update is computed in fp32 and written back "
        "with stochastic rounding, so small updates are not lost. Needs mixed_precision bf16. Checkpoints and "
        "training states hold the weights upcast to fp32.",
        "memory",
        label="bf16 weights",
    )
    device: str = setting(
        "auto",
        "Where to train: auto (CUDA when present), cuda, cpu.",
        "memory",
        choices=("auto", "cuda", "cpu"),
        headless_only=True,
        label="Device",
    )

    # --- text encoder
    train_text_encoder: bool = setting(
        False, "Train the text encoder too (SDXL: both text encoders).", "text_encoder", label="Train text encoder"
    )
    text_encoder_learning_rate: float | None = setting(
        None,
        "Learning rate of the text encoder (empty: learning_rate).",
        "text_encoder",
        minimum=0.0,
        maximum=1.0,
        label="Text encoder learning rate",
    )
    text_encoder_2_learning_rate: float | None = setting(
        None,
        "SDXL: learning rate of the second text encoder (OpenCLIP ViT-bigG) when train_text_encoder is on (empty: "
        "the text encoder's learning rate; 0: it stays frozen). Unused by SD 1.x/2.x.",
        "text_encoder",
        minimum=0.0,
        maximum=1.0,
        label="Second text encoder learning rate (SDXL)",
    )
    stop_text_encoder: float = setting(
        1.0,
        "Fraction of the steps after which the text encoder is frozen.",
        "text_encoder",
        minimum=0.0,
        maximum=1.0,
        label="Stop text encoder at",
    )
    clip_skip: int = setting(
        1,
        "Use the output of the N-th last text-encoder layer (1: the last). SDXL counts from the penultimate layer, "
        "as it was trained: 1 is the penultimate layer of both encoders (diffusers' clip_skip None), N skips N-1 "
        "more.",
        "text_encoder",
        minimum=1,
        maximum=12,
        label="CLIP skip",
    )

    # --- LoRA / LoHa / LoKr (dreambooth/network): a small adapter trained on the frozen model
    training_method: str = setting(
        "full",
        "What is trained: full (every UNet weight: a checkpoint), or a small adapter on the frozen model, saved as "
        "one file for the WebUI's Lora folder: lora (LoRA; LoCon with a conv rank), loha (LyCORIS LoHa), lokr "
        "(LyCORIS LoKr).",
        "network",
        choices=TRAINING_METHODS,
        label="Training method",
    )
    network_rank: int = setting(
        16,
        "Rank (dim) of the adapter on attention and linear layers: its size and capacity.",
        "network",
        minimum=1,
        maximum=1024,
        label="Rank (dim)",
    )
    network_alpha: float = setting(
        8.0,
        "Alpha: the adapter's output is scaled by alpha / rank (8 with rank 16: half, as kohya's defaults; 0: "
        "alpha = rank, no scaling). LoKr with both factors full (a rank too large to factor) uses scale 1, as the "
        "WebUI does.",
        "network",
        minimum=0.0,
        maximum=1024.0,
        label="Alpha",
    )
    network_dropout: float = setting(
        0.0,
        "Dropout on the adapter's output while training (0: none).",
        "network",
        minimum=0.0,
        maximum=0.9,
        label="Adapter dropout",
    )
    network_conv_rank: int = setting(
        0,
        "Rank of adapters on the 3x3 convolutions of the resnets and samplers (LoCon); 0: attention and linear "
        "layers only.",
        "network",
        minimum=0,
        maximum=1024,
        label="Conv rank",
    )
    network_conv_alpha: float = setting(
        0.0,
        "Alpha of the conv adapters (scale conv alpha / conv rank); 0: the conv rank (no scaling).",
        "network",
        minimum=0.0,
        maximum=1024.0,
        label="Conv alpha",
    )
    network_train_text_encoder: bool = setting(
        False,
        "Train adapters on the text encoder's attention and MLP layers too (lora_te keys; SDXL: both encoders, "
        "lora_te1 and lora_te2).",
        "network",
        label="Adapt the text encoder",
    )
    network_unet_lr: float = setting(
        1e-4,
        "Learning rate of the UNet's adapters (learning_rate is for full training).",
        "network",
        minimum=0.0,
        maximum=1.0,
        label="UNet adapter learning rate",
    )
    network_text_encoder_lr: float = setting(
        5e-5,
        "Learning rate of the text encoder's adapters.",
        "network",
        minimum=0.0,
        maximum=1.0,
        label="Text encoder adapter learning rate",
    )
    network_init_from: str = setting(
        "",
        "A LoRA file to continue from (its layers and shapes must match these settings); empty: a new adapter.",
        "network",
        label="Start from LoRA file",
    )

    # --- saving
    save_model_every_n_steps: int = setting(
        0,
        "Save a checkpoint every N steps (0: only at the end).",
        "saving",
        minimum=0,
        maximum=MAX_STEPS,
        aliases=("save_interval",),
        label="Save every N steps",
    )
    save_training_state: bool = setting(
        True, "Keep a resumable training state with the latest checkpoint.", "saving", label="Keep training state"
    )
    save_total_limit: int = setting(
        0,
        "Keep only the newest N checkpoints of this run (0: keep all); the resumable state's checkpoint always stays.",
        "saving",
        minimum=0,
        maximum=100000,
        label="Keep newest N checkpoints",
    )
    validation_split: float = setting(
        0.0,
        "Share of each concept's instance images held out for the validation loss, never trained on (0: none; a "
        "concept's validation_data_dir replaces its share).",
        "saving",
        minimum=0.0,
        maximum=0.9,
        label="Validation share of images",
    )
    validation_steps: int = setting(
        100,
        "Compute the validation loss every N steps (and at the end), at fixed timesteps and noises.",
        "saving",
        minimum=1,
        maximum=MAX_STEPS,
        label="Validation every N steps",
    )
    save_best: bool = setting(
        False,
        "Keep the checkpoint (or LoRA file) of the lowest validation loss as NAME_best, replaced when it improves.",
        "saving",
        label="Keep the best checkpoint",
    )

    # --- samples
    save_sample_prompt: str = setting(
        "",
        "Prompt of the samples made at each save (empty: each concept's instance prompt).",
        "samples",
        label="Sample prompt",
    )
    save_sample_negative_prompt: str = setting(
        "", "Negative prompt of the samples.", "samples", label="Sample negative prompt"
    )
    n_save_sample: int = setting(
        1, "Samples per prompt at each save (0: none).", "samples", minimum=0, maximum=64, label="Samples per prompt"
    )
    save_infer_steps: int = setting(
        20,
        "Denoising steps of the samples.",
        "samples",
        minimum=1,
        maximum=500,
        aliases=("infer_steps",),
        label="Sample steps",
    )
    save_guidance_scale: float = setting(
        7.5,
        "Guidance scale of the samples.",
        "samples",
        minimum=0.0,
        maximum=50.0,
        aliases=("guidance_scale",),
        label="Guidance scale",
    )
    sample_seed: int = setting(
        42,
        "Seed of the samples (the same at every save, to compare).",
        "samples",
        minimum=0,
        maximum=MAX_SEED,
        label="Sample seed",
    )

    # --- test after saving
    test_prompt: str = setting(
        "", "After each save, generate this prompt (empty: no test).", "samples", label="Test prompt"
    )
    test_prompts_file: str = setting(
        "", "After each save, generate every line of this text file.", "samples", label="Test prompts file"
    )
    test_negative_prompt: str = setting(
        "", "Negative prompt of the test images.", "samples", label="Test negative prompt"
    )
    test_seed: int = setting(0, "Seed of the test images.", "samples", minimum=0, maximum=MAX_SEED, label="Test seed")
    test_images_per_prompt: int = setting(
        1,
        "Test images per prompt.",
        "samples",
        minimum=1,
        maximum=64,
        aliases=("test_num_per_prompt",),
        label="Test images per prompt",
    )

    # --- logging
    report_to: str = setting(
        "none",
        "Log losses and learning rates to tensorboard or wandb.",
        "logging",
        choices=("none", "tensorboard", "wandb"),
        aliases=("log_with",),
        label="Log to",
    )
    logging_dir: str = setting(
        "logs", "Log folder (relative paths are inside output_dir).", "logging", label="Log folder"
    )

    # ------------------------------------------------------------------------------------------------ derived

    @property
    def has_augmentation(self) -> bool:
        return bool(
            self.augment_rotation or self.augment_brightness or self.augment_contrast or self.augment_random_crop
        )

    @property
    def has_prior_preservation(self) -> bool:
        return self.with_prior_preservation

    @property
    def has_validation(self) -> bool:
        """Some images are held out for the validation loss (a share, or a concept's validation folder)."""
        return self.validation_split > 0 or any(c.validation_data_dir for c in self.concepts)

    @property
    def trains_network(self) -> bool:
        """An adapter (LoRA / LoHa / LoKr) is trained on the frozen model, not the model itself."""
        return self.training_method in NETWORK_METHODS

    def text_encoder_lr(self) -> float:
        return self.learning_rate if self.text_encoder_learning_rate is None else self.text_encoder_learning_rate

    def text_encoder_2_lr(self) -> float:
        """SDXL's second text encoder's learning rate (0: frozen)."""
        if self.text_encoder_2_learning_rate is None:
            return self.text_encoder_lr()
        return self.text_encoder_2_learning_rate

    def class_images_for(self, concept: Concept) -> int:
        return self.num_class_images if concept.num_class_images is None else concept.num_class_images

    def effective(self) -> Settings:
        """A copy the trainer may change.  The low-memory switch is applied by the trainer at start
        (:func:`dreambooth.memory.fit.apply_low_memory`): its choice needs the GPU and the memory estimate."""
        return dataclasses.replace(self, concepts=[dataclasses.replace(c) for c in self.concepts])

    # ---------------------------------------------------------------------------------------------- validate

    def validate(self, check_files: bool = True, model_in_memory: bool = False) -> list[str]:
        """Every problem as a sentence; empty when the settings can be used.

        ``model_in_memory``: the base model is given as loaded components, so its path is not checked.
        """
        from .validation import validate_settings

        return validate_settings(self, check_files=check_files, model_in_memory=model_in_memory)

    def raise_if_invalid(self, check_files: bool = True, model_in_memory: bool = False) -> None:
        problems = self.validate(check_files=check_files, model_in_memory=model_in_memory)
        if problems:
            raise SettingsError(problems)

    # ---------------------------------------------------------------------------------------------- files

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {"schema_version": SCHEMA_VERSION, **data}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | os.PathLike) -> Path:
        from .models.files import atomic_path

        with atomic_path(path) as temp:
            temp.write_text(self.to_json(), encoding="utf-8")
        return Path(path)

    @classmethod
    def from_dict(
        cls, data: dict[str, Any], base_dir: str | os.PathLike | None = None, notes: list[str] | None = None
    ) -> Settings:
        """Settings from a dict (a JSON file's content), migrated to the current schema.

        Unknown keys are an error (a typo must not be ignored silently); old names and the guide's names are
        accepted.  ``notes``, when given, receives a sentence for each name that was translated or ignored
        (:mod:`dreambooth.guide_names`): the CLI prints them and the tab shows them.
        """
        from .guide_names import translate_guide_names

        notes = [] if notes is None else notes
        problems: list[str] = []
        data = translate_guide_names(migrate(dict(data)), base_dir, notes, problems)
        known = {f.name: f for f in dataclasses.fields(cls)}
        aliases = {a: f.name for f in dataclasses.fields(cls) for a in f.metadata.get("aliases", ())}
        values: dict[str, Any] = {}
        for key, value in data.items():
            name = aliases.get(key, key)
            if name not in known:
                problems.append(f"unknown setting {_show(key)} (check the spelling; see the README for the list)")
                continue
            if name != key and name in data:
                if data[name] != value:
                    notes.append(f"'{key}' ({_show(value)}) is not used: '{name}' ({_show(data[name])}) is given too")
                continue
            values[name] = value
        concepts = values.pop("concepts", [])
        if not isinstance(concepts, list):
            problems.append("'concepts' must be a list of concept objects")
            concepts = []
        parsed = []
        concept_fields = {f.name for f in dataclasses.fields(Concept)}
        for index, item in enumerate(concepts):
            if not isinstance(item, dict):
                problems.append(f"concepts: concept {index + 1} must be an object, not {_show(item)}")
                continue
            unknown = sorted(set(item) - concept_fields)
            if unknown:
                problems.append(f"concept {index + 1}: unknown field(s) {', '.join(_show(k) for k in unknown)}")
            checked = {}
            for spec in dataclasses.fields(Concept):
                if spec.name in item:
                    coerced, problem = _coerce(spec, item[spec.name])
                    if problem:
                        problems.append(f"concept {index + 1}: {problem}")
                    else:
                        checked[spec.name] = coerced
            parsed.append(_resolve_concept_paths(Concept(**checked), base_dir))
        for name, value in list(values.items()):
            coerced, problem = _coerce(known[name], value)
            if problem:
                problems.append(problem)
            else:
                values[name] = coerced
        if problems:
            raise SettingsError(problems)
        return cls(concepts=parsed, **values)

    @classmethod
    def load(cls, path: str | os.PathLike, notes: list[str] | None = None) -> Settings:
        """Settings from a JSON file; relative concept folders are relative to the file's folder."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError, RecursionError) as error:
            # ValueError covers JSONDecodeError and integers longer than Python converts (4300 digits)
            raise SettingsError([f"{path}: cannot read the settings file ({str(error)[:300]})"]) from error
        if not isinstance(data, dict):
            raise SettingsError([f"{path}: a settings file holds one JSON object"])
        return cls.from_dict(data, base_dir=path.parent, notes=notes)

    def with_overrides(self, assignments: list[str], notes: list[str] | None = None) -> Settings:
        """Apply ``key=value`` strings (the CLI's ``--set``); values are parsed as JSON when they can be.

        ``concepts.N.FIELD=value`` sets a field of concept N (counting from 0; N = the number of concepts adds one).
        A concept field by its own name (``class_data_dir=...``) sets it in the only concept; with several concepts
        it must say which.
        """
        data = self.to_dict()
        settings_fields = {f.name: f for f in dataclasses.fields(Settings)}
        concept_fields = {f.name: f for f in dataclasses.fields(Concept)}
        aliases = {a: f.name for f in dataclasses.fields(Settings) for a in f.metadata.get("aliases", ())}
        for assignment in assignments:
            if "=" not in assignment:
                raise SettingsError([f"--set expects key=value, got {_show(assignment)}"])
            key, text = assignment.split("=", 1)
            key = key.strip()
            target, name, spec = data, aliases.get(key, key), settings_fields.get(aliases.get(key, key))
            if key.startswith("concepts."):
                target, name = _concept_target(data["concepts"], key, concept_fields)
                spec = concept_fields[name]
            elif spec is None and key in concept_fields:
                if len(data["concepts"]) > 1:
                    raise SettingsError(
                        [
                            f"--set {key}: there are {len(data['concepts'])} concepts; say which one, e.g. "
                            f"--set concepts.0.{key}=... (counting from 0)"
                        ]
                    )
                if not data["concepts"]:
                    data["concepts"].append({})
                target, spec = data["concepts"][0], concept_fields[key]
            if spec is not None and str(spec.type).startswith("str"):
                value: Any = text  # text fields take the text as given: --set model_name=2024
            else:
                try:
                    value = json.loads(text)
                except (ValueError, RecursionError):
                    value = text
            target[name] = value
        return Settings.from_dict(data, notes=notes)


def _concept_target(
    concepts: list[dict[str, Any]], key: str, concept_fields: dict[str, dataclasses.Field]
) -> tuple[dict[str, Any], str]:
    """The concept dict and field name that ``concepts.N.FIELD`` points to."""
    parts = key.split(".")
    if len(parts) != 3 or not parts[1].isdigit():
        raise SettingsError([f"--set {_show(key)}: write concepts.N.FIELD=value, N counting from 0"])
    index, name = int(parts[1]), parts[2]
    if name not in concept_fields:
        raise SettingsError(
            [f"--set {_show(key)}: a concept has no field {_show(name)} (it has: {', '.join(concept_fields)})"]
        )
    if index > len(concepts):
        raise SettingsError(
            [f"--set {key}: there are {len(concepts)} concepts (concepts.{len(concepts)} would add one)"]
        )
    if index == len(concepts):
        concepts.append({})
    return concepts[index], name


def _resolve_concept_paths(concept: Concept, base_dir: str | os.PathLike | None) -> Concept:
    if base_dir is None:
        return concept
    for name in ("instance_data_dir", "class_data_dir", "validation_data_dir"):
        value = getattr(concept, name)
        if value and not Path(value).is_absolute():
            setattr(concept, name, str((Path(base_dir) / value).resolve()))
    return concept


# Text limits: a path longer than Linux's PATH_MAX cannot be opened; a prompt longer than this is no prompt
# (CLIP reads 75 tokens, about 300 characters of English; the rest is cut).
MAX_TEXT = 10_000
MAX_PATH = 4096
PATH_FIELDS = frozenset(
    {
        "pretrained_model_name_or_path",
        "pretrained_vae_name_or_path",
        "output_dir",
        "checkpoint_dir",
        "lora_dir",
        "network_init_from",
        "resume_from",
        "test_prompts_file",
        "logging_dir",
        "instance_data_dir",
        "class_data_dir",
        "validation_data_dir",
    }
)


def _show(value: Any) -> str:
    """``repr`` of a value for a message, cut to 60 characters (a value can be 100,000 characters long)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def text_problem(name: str, value: str) -> str | None:
    """Why text ``value`` cannot be field ``name`` (a NUL character, too long), or None."""
    if "\0" in value:
        return f"'{name}' contains a NUL character (\\0), which no file name or prompt may hold: remove it"
    limit = MAX_PATH if name in PATH_FIELDS else MAX_TEXT
    if len(value) > limit:
        what = "a path" if name in PATH_FIELDS else "text"
        return f"'{name}' is {len(value):,} characters long; {what} here may have at most {limit:,}"
    return None


def _coerce(spec: dataclasses.Field, value: Any) -> tuple[Any, str | None]:
    """Check one value against its field's type; ints given as whole floats are accepted."""
    kind = spec.type if isinstance(spec.type, str) else getattr(spec.type, "__name__", str(spec.type))
    optional = "None" in kind
    if value is None:
        return (None, None) if optional else (value, f"'{spec.name}' needs a value")
    if kind.startswith("bool"):
        if isinstance(value, bool):
            return value, None
        return value, f"'{spec.name}' must be true or false, not {_show(value)}"
    if isinstance(value, float) and not math.isfinite(value):
        return value, f"'{spec.name}' must be a finite number, not {value!r}"
    if kind.startswith("int"):
        if isinstance(value, int) and not isinstance(value, bool):
            return value, None
        if isinstance(value, float) and value.is_integer():
            return int(value), None
        return value, f"'{spec.name}' must be a whole number, not {_show(value)}"
    if kind.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value, f"'{spec.name}' must be a number, not {_show(value)}"
        try:
            return float(value), None
        except OverflowError:
            return value, f"'{spec.name}' is {len(str(value))} digits long: far too large"
    if kind.startswith("str"):
        if not isinstance(value, str):
            return value, f"'{spec.name}' must be text, not {_show(value)}"
        return value, text_problem(spec.name, value)
    return value, None


# ------------------------------------------------------------------------------------------------- migrations


def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    """v1 had the guide's flat single-concept fields, ``use_8bit_adam`` and ``save_interval``.

    A v1 file may be the guide's argparse arguments written out, where null means "not given": those are dropped,
    so the default applies.
    """
    data = {key: value for key, value in data.items() if value is not None}
    concept = {}
    if not data.get("concepts"):
        for key in ("instance_data_dir", "instance_prompt", "class_data_dir", "class_prompt"):
            if key in data:
                concept[key] = data.pop(key)
    if concept:
        data["concepts"] = [concept]
    if "use_8bit_adam" in data and isinstance(data["use_8bit_adam"], bool):
        data["optimizer"] = "adamw_8bit" if data.pop("use_8bit_adam") else "adamw"
    if "enable_xformers_memory_efficient_attention" in data:
        data["attention"] = "xformers" if data.pop("enable_xformers_memory_efficient_attention") else "sdpa"
    if "not_cache_latents" in data and isinstance(data["not_cache_latents"], bool):
        data["cache_latents"] = not data.pop("not_cache_latents")
    return data


MIGRATIONS = {1: _v1_to_v2}


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Bring a settings dict from its ``schema_version`` (1 when absent) to :data:`SCHEMA_VERSION`."""
    version = data.pop("schema_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1 or version > SCHEMA_VERSION:
        raise SettingsError(
            [f"schema_version {_show(version)} is not known to this version (it reads 1 to {SCHEMA_VERSION})"]
        )
    while version < SCHEMA_VERSION:
        data = MIGRATIONS[version](data)
        version += 1
    return data


def concepts_from_list(path: str | os.PathLike) -> list[Concept]:
    """Read the community ``concepts_list.json`` (a list of concept objects; relative paths from its folder)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as error:
        raise SettingsError([f"{path}: cannot read the concepts list ({str(error)[:300]})"]) from error
    if not isinstance(data, list):
        raise SettingsError([f"{path}: a concepts list is a JSON list of objects"])
    return Settings.from_dict({"schema_version": SCHEMA_VERSION, "concepts": data}, base_dir=path.parent).concepts


def fields() -> list[dataclasses.Field]:
    """The settings fields, in declaration order (concepts is a list of :class:`Concept`)."""
    return list(dataclasses.fields(Settings))
