"""ComfyUI's `/object_info` catalogue: the nodes `/prompt` takes, their inputs and outputs, with this
gateway's models, adapters, ControlNets and limits."""

from __future__ import annotations

from gateway.apis.comfy.node_classes import LATENT_METHODS, PIXEL_METHODS, SAMPLERS, SCHEDULERS
from gateway.core.service import JobService
from schemas.request import MAX_SEED


def node_info(jobs: JobService, models: list[str], loras: list[str], controlnets: list[str] | None = None) -> dict[str, dict]:
    """ComfyUI's /object_info for the nodes /prompt takes, with this gateway's models, adapters and limits."""
    limits = jobs.settings.limits
    side = {"default": 1024, "min": limits.min_side, "max": limits.max_side, "step": 8}

    def node(name: str, display: str, category: str, required: dict, outputs: list[str], *, output_node: bool = False) -> dict:
        return {
            "input": {"required": required}, "input_order": {"required": list(required)}, "output": outputs,
            "output_is_list": [False] * len(outputs), "output_name": outputs, "name": name, "display_name": display,
            "description": "", "python_module": "nodes", "category": category, "output_node": output_node,
        }

    return {
        "CheckpointLoaderSimple": node("CheckpointLoaderSimple", "Load Checkpoint", "loaders", {"ckpt_name": [models]}, ["MODEL", "CLIP", "VAE"]),
        "LoraLoader": node("LoraLoader", "Load LoRA", "loaders", {
            "model": ["MODEL"], "clip": ["CLIP"], "lora_name": [loras],
            "strength_model": ["FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.01}],
            "strength_clip": ["FLOAT", {"default": 1.0, "min": -4.0, "max": 4.0, "step": 0.01}],
        }, ["MODEL", "CLIP"]),
        "CLIPTextEncode": node("CLIPTextEncode", "CLIP Text Encode (Prompt)", "conditioning",
                               {"text": ["STRING", {"multiline": True}], "clip": ["CLIP"]}, ["CONDITIONING"]),
        "EmptyLatentImage": node("EmptyLatentImage", "Empty Latent Image", "latent", {
            "width": ["INT", side], "height": ["INT", side],
            "batch_size": ["INT", {"default": 1, "min": 1, "max": limits.max_images}],
        }, ["LATENT"]),
        "KSampler": node("KSampler", "KSampler", "sampling", {
            "model": ["MODEL"], "seed": ["INT", {"default": 0, "min": 0, "max": MAX_SEED}],
            "steps": ["INT", {"default": 20, "min": 1, "max": limits.max_steps}],
            "cfg": ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}],
            "sampler_name": [SAMPLERS], "scheduler": [SCHEDULERS], "positive": ["CONDITIONING"], "negative": ["CONDITIONING"],
            "latent_image": ["LATENT"], "denoise": ["FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01}],
        }, ["LATENT"]),
        "LoadImage": node("LoadImage", "Load Image", "image", {"image": [[], {"image_upload": True}]}, ["IMAGE", "MASK"]),
        "VAEEncode": node("VAEEncode", "VAE Encode", "latent", {"pixels": ["IMAGE"], "vae": ["VAE"]}, ["LATENT"]),
        "SetLatentNoiseMask": node("SetLatentNoiseMask", "Set Latent Noise Mask", "latent/inpaint",
                                   {"samples": ["LATENT"], "mask": ["MASK"]}, ["LATENT"]),
        "VAEDecode": node("VAEDecode", "VAE Decode", "latent", {"samples": ["LATENT"], "vae": ["VAE"]}, ["IMAGE"]),
        "SaveImage": node("SaveImage", "Save Image", "image", {"images": ["IMAGE"], "filename_prefix": ["STRING", {"default": "ComfyUI"}]},
                          [], output_node=True),
        "PreviewImage": node("PreviewImage", "Preview Image", "image", {"images": ["IMAGE"]}, [], output_node=True),
        "SaveImageWebsocket": node("SaveImageWebsocket", "SaveImageWebsocket", "image", {"images": ["IMAGE"]}, [], output_node=True),
        **workflow_nodes(node, limits, side, controlnets or []),
    }


def workflow_nodes(node, limits, side: dict, controlnets: list[str]) -> dict[str, dict]:
    """The nodes of the graphs that run as plans: SDXL's base + refiner, hires fix, ControlNet, batches."""
    steps = ["INT", {"default": 20, "min": 1, "max": limits.max_steps}]
    at_step = ["INT", {"default": 0, "min": 0, "max": 10000}]
    sampling = {
        "sampler_name": [SAMPLERS], "scheduler": [SCHEDULERS], "positive": ["CONDITIONING"], "negative": ["CONDITIONING"],
        "cfg": ["FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}],
    }
    crop = [["disabled"]]
    fraction = ["FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}]
    size = {"width": ["INT", side], "height": ["INT", side]}
    return {
        "KSamplerAdvanced": node("KSamplerAdvanced", "KSampler (Advanced)", "sampling", {
            "model": ["MODEL"], "add_noise": [["enable", "disable"]], "noise_seed": ["INT", {"default": 0, "min": 0, "max": MAX_SEED}],
            "steps": steps, **sampling, "latent_image": ["LATENT"], "start_at_step": at_step,
            "end_at_step": ["INT", {"default": 10000, "min": 0, "max": 10000}], "return_with_leftover_noise": [["disable", "enable"]],
        }, ["LATENT"]),
        "CLIPTextEncodeSDXL": node("CLIPTextEncodeSDXL", "CLIPTextEncodeSDXL", "advanced/conditioning", {
            **size, "crop_w": ["INT", {"default": 0, "min": 0}], "crop_h": ["INT", {"default": 0, "min": 0}],
            "target_width": ["INT", side], "target_height": ["INT", side], "text_g": ["STRING", {"multiline": True}],
            "clip": ["CLIP"], "text_l": ["STRING", {"multiline": True}],
        }, ["CONDITIONING"]),
        "CLIPTextEncodeSDXLRefiner": node("CLIPTextEncodeSDXLRefiner", "CLIPTextEncodeSDXLRefiner", "advanced/conditioning", {
            "ascore": ["FLOAT", {"default": 6.0, "min": 0.0, "max": 1000.0, "step": 0.01}], **size,
            "text": ["STRING", {"multiline": True}], "clip": ["CLIP"],
        }, ["CONDITIONING"]),
        "LatentUpscale": node("LatentUpscale", "Upscale Latent", "latent", {
            "samples": ["LATENT"], "upscale_method": [list(LATENT_METHODS)], **size, "crop": crop}, ["LATENT"]),
        "LatentUpscaleBy": node("LatentUpscaleBy", "Upscale Latent By", "latent", {
            "samples": ["LATENT"], "upscale_method": [list(LATENT_METHODS)],
            "scale_by": ["FLOAT", {"default": 1.5, "min": 0.01, "max": 4.0, "step": 0.01}]}, ["LATENT"]),
        "ImageScale": node("ImageScale", "Upscale Image", "image/upscaling", {
            "image": ["IMAGE"], "upscale_method": [list(PIXEL_METHODS)], **size, "crop": crop}, ["IMAGE"]),
        "ImageScaleBy": node("ImageScaleBy", "Upscale Image By", "image/upscaling", {
            "image": ["IMAGE"], "upscale_method": [list(PIXEL_METHODS)],
            "scale_by": ["FLOAT", {"default": 1.0, "min": 0.01, "max": 4.0, "step": 0.01}]}, ["IMAGE"]),
        "ControlNetLoader": node("ControlNetLoader", "Load ControlNet Model", "loaders", {"control_net_name": [controlnets]}, ["CONTROL_NET"]),
        "ControlNetApplyAdvanced": node("ControlNetApplyAdvanced", "Apply ControlNet", "conditioning/controlnet", {
            "positive": ["CONDITIONING"], "negative": ["CONDITIONING"], "control_net": ["CONTROL_NET"], "image": ["IMAGE"],
            "strength": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 2.0, "step": 0.01}],
            "start_percent": fraction, "end_percent": [fraction[0], {**fraction[1], "default": 1.0}],
        }, ["CONDITIONING", "CONDITIONING"]),
        "Canny": node("Canny", "Canny", "image/preprocessors", {
            "image": ["IMAGE"], "low_threshold": ["FLOAT", {"default": 0.4, "min": 0.01, "max": 0.99, "step": 0.01}],
            "high_threshold": ["FLOAT", {"default": 0.8, "min": 0.01, "max": 0.99, "step": 0.01}]}, ["IMAGE"]),
        "RepeatLatentBatch": node("RepeatLatentBatch", "Repeat Latent Batch", "latent/batch", {
            "samples": ["LATENT"], "amount": ["INT", {"default": 1, "min": 1, "max": limits.max_images}]}, ["LATENT"]),
    }
