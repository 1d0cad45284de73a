"""AUTOMATIC1111's web UI API (`/sdapi/v1`): txt2img, img2img and inpainting (generation), their progress,
interrupt and skip (progress), the current model (options), the lists; prompts with LoRA tags (prompt),
the hires fix and ControlNet (plans)."""
