"""A LoRA adapter built for the tiny-sdxl pipeline, for the tests that load one."""

from __future__ import annotations

from pathlib import Path

import torch


def build_tiny_lora(base_dir: Path, folder: Path) -> Path:
    """A LoRA for the tiny UNet's attention projections, with random (non-zero) up and down weights."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
        unet.add_adapter(config)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionXLPipeline.save_lora_weights(folder, unet_lora_layers=layers, safe_serialization=True)
    return folder
