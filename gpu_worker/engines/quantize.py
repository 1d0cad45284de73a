"""`--quantize fp8`: the UNets' attention and feed-forward linear layers in float8 (torchao).

Weights and activations are scaled per row to float8 e4m3 and multiplied with the GPU's float8 tensor
cores (`torch._scaled_mm`), which exist from compute capability 8.9 (Ada: L4, L40S, RTX 4090; Hopper:
H100, H200). Only the linear layers inside the transformer blocks are converted: they carry most of
SDXL's FLOPs, and all their sides are multiples of 16 as float8 matmuls need; convolutions, the time
embedding and the VAE stay in the model's dtype. Anywhere else (a CPU, an older GPU, no torchao) the
worker refuses to start with one line that says why, instead of running something other than asked.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("imagegen.worker.quantize")

QUANTIZE_CHOICES = ("none", "fp8")
FP8_MIN_CAPABILITY = (8, 9)
FP8_GPUS = "compute capability 8.9 or newer: L4, L40S, RTX 4090, H100, H200"


def refusal(quantize: str, device: str) -> str | None:
    """Why `--quantize` cannot run on `device` here, in one line; None when it can."""
    if quantize not in QUANTIZE_CHOICES:
        return f"--quantize: expected one of {', '.join(QUANTIZE_CHOICES)}, got {quantize!r}"
    if quantize == "none":
        return None
    if not device.startswith("cuda"):
        return f"--quantize fp8 needs a CUDA GPU with float8 tensor cores ({FP8_GPUS}); this worker's device is {device}"
    import torch

    if not torch.cuda.is_available():
        return f"--quantize fp8 needs a CUDA GPU with float8 tensor cores ({FP8_GPUS}); torch sees no CUDA device"
    capability = torch.cuda.get_device_capability(torch.device(device))
    if capability < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(torch.device(device))
        return (
            f"--quantize fp8 needs float8 tensor cores ({FP8_GPUS}); {device} is {name}, "
            f"compute capability {capability[0]}.{capability[1]}"
        )
    try:
        import torchao.quantization  # noqa: F401
    except ImportError as exc:
        return f"--quantize fp8 needs torchao ({exc}): pip install 'imagegen[fp8]'"
    return None


def in_transformer_block(module: Any, name: str) -> bool:
    """The linear layers float8 runs: those of the attention and feed-forward blocks, sides divisible by 16."""
    import torch

    return (
        isinstance(module, torch.nn.Linear)
        and ".transformer_blocks." in f".{name}"
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def quantize_fp8(unet: Any) -> int:
    """Converts the UNet's transformer-block linear layers to float8 in place; returns how many."""
    from torchao.quantization import quantize_

    try:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

        config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    except ImportError:  # torchao before 0.10 named it as a function
        from torchao.quantization import PerRow, float8_dynamic_activation_float8_weight

        config = float8_dynamic_activation_float8_weight(granularity=PerRow())
    count = sum(1 for name, module in unet.named_modules() if in_transformer_block(module, name))
    quantize_(unet, config, filter_fn=in_transformer_block)
    return count
