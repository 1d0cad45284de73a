"""AUTOMATIC1111's web UI API: txt2img, img2img and inpainting, prompts with LoRA tags, the lists."""
