"""The node classes a ComfyUI prompt may use here, and the values their inputs take: ComfyUI's samplers
and schedulers as this service's schedulers, its upscale methods, and model names as its clients send them."""

from __future__ import annotations

# (ComfyUI sampler, scheduler) -> this service's scheduler
SCHEDULES: dict[tuple[str, str], str] = {
    ("euler", "normal"): "euler",
    ("euler_ancestral", "normal"): "euler_a",
    ("dpmpp_2m", "normal"): "dpmpp_2m",
    ("dpmpp_2m", "karras"): "dpmpp_2m_karras",
    ("dpmpp_2m_sde", "normal"): "dpmpp_2m_sde",
    ("dpmpp_2m_sde", "karras"): "dpmpp_2m_sde_karras",
    ("ddim", "normal"): "ddim",
    ("ddim", "ddim_uniform"): "ddim",
    ("uni_pc", "normal"): "unipc",
    ("deis", "normal"): "deis",
}
SAMPLERS = sorted({sampler for sampler, _ in SCHEDULES})
SCHEDULERS = sorted({scheduler for _, scheduler in SCHEDULES})
NODES = ("CheckpointLoaderSimple", "LoraLoader", "CLIPTextEncode", "CLIPTextEncodeSDXL", "CLIPTextEncodeSDXLRefiner",
         "EmptyLatentImage", "LoadImage", "VAEEncode", "SetLatentNoiseMask", "RepeatLatentBatch", "KSampler", "KSamplerAdvanced",
         "LatentUpscale", "LatentUpscaleBy", "ImageScale", "ImageScaleBy", "ControlNetLoader", "ControlNetApplyAdvanced", "Canny",
         "VAEDecode", "SaveImage", "PreviewImage", "SaveImageWebsocket")
SAMPLER_NODES = ("KSampler", "KSamplerAdvanced")
TEXT_NODES = ("CLIPTextEncode", "CLIPTextEncodeSDXL", "CLIPTextEncodeSDXLRefiner")
LATENT_METHODS = {"nearest-exact": "nearest-exact", "bilinear": "bilinear", "area": "area", "bicubic": "bicubic"}
PIXEL_METHODS = {"nearest-exact": "nearest", "bilinear": "bilinear", "bicubic": "bicubic", "lanczos": "lanczos"}
OUTPUTS = ("SaveImage", "PreviewImage", "SaveImageWebsocket")
SOCKET_OUTPUT = "SaveImageWebsocket"  # its images go to the prompt's socket only, never to /history
LATENTS = ("EmptyLatentImage", "VAEEncode", "SetLatentNoiseMask")  # what a first KSampler's latent_image may be
WEIGHT_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


def weights_name(value: str) -> str:
    """A model or adapter name as ComfyUI's clients send it (a file name, maybe in a folder) without the folder and suffix."""
    name = value.replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in WEIGHT_FILE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name
