"""The published component configs of Stable Diffusion 1.5 and SDXL base 1.0.

The values of `unet/config.json`, `text_encoder/config.json`, `text_encoder_2/config.json` and
`vae/config.json` in stable-diffusion-v1-5/stable-diffusion-v1-5 (the former
runwayml/stable-diffusion-v1-5) and stabilityai/stable-diffusion-xl-base-1.0, as published on the
Hub (bookkeeping keys such as `_diffusers_version` left out). They let the estimator and
bench/gpu.py build the full architectures on the meta device (or with random weights) without a
download; tests check the parameter counts against the known totals.
"""

from __future__ import annotations

import copy
from typing import Any

_CLIP_L = {  # openai/clip-vit-large-patch14's text tower: both models' first text encoder
    "architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408, "hidden_size": 768,
    "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-05, "projection_dim": 768, "attention_dropout": 0.0,
    "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02, "bos_token_id": 0, "eos_token_id": 2,
    "pad_token_id": 1, "torch_dtype": "float32",
}

_VAE = {
    "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "sample_size": 512, "scaling_factor": 0.18215,
}

SD15: dict[str, dict[str, Any]] = {
    "unet": {
        "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
        "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    },
    "text_encoder": _CLIP_L,
    "vae": _VAE,
}

SDXL: dict[str, dict[str, Any]] = {
    "unet": {
        "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
        "block_out_channels": [320, 640, 1280], "center_input_sample": False, "class_embed_type": None,
        "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 2048,
        "cross_attention_norm": None, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
        "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
        "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-05, "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None,
        "only_cross_attention": False, "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
        "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False, "resnet_time_scale_shift": "default",
        "sample_size": 128, "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
        "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 10],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
        "use_linear_projection": True,
    },
    "text_encoder": {**_CLIP_L, "torch_dtype": "float16"},
    "text_encoder_2": {  # laion/CLIP-ViT-bigG-14's text tower
        "architectures": ["CLIPTextModelWithProjection"], "model_type": "clip_text_model", "vocab_size": 49408,
        "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
        "max_position_embeddings": 77, "hidden_act": "gelu", "layer_norm_eps": 1e-05, "projection_dim": 1280,
        "attention_dropout": 0.0, "dropout": 0.0, "initializer_factor": 1.0, "initializer_range": 0.02,
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "torch_dtype": "float16",
    },
    "vae": {**_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
}

PUBLISHED = {"sd": SD15, "sdxl": SDXL}
PUBLISHED_IDS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd", "runwayml/stable-diffusion-v1-5": "sd",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
}


def published_config(kind: str, component: str) -> dict[str, Any]:
    """A copy of the published config of one component ('unet', 'text_encoder', ...) of 'sd' or 'sdxl'."""
    return copy.deepcopy(PUBLISHED[kind][component])
