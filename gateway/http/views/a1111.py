"""AUTOMATIC1111 web UI's shapes (`/sdapi/v1/...`): the txt2img and img2img bodies and answer, FastAPI's
error shape, the lists, the options and the progress."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from schemas.request import JsonBool, JsonFloat, JsonInt


class A1111Txt2ImgRequest(BaseModel):
    """AUTOMATIC1111 web UI's `POST /sdapi/v1/txt2img` body. Fields left out take the served model's
    defaults (not A1111's 512x512, 50 steps and CFG 7). Fields of features not offered here are accepted
    only at their "off" values; every other field is refused by name."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field("", description="What to draw.")
    negative_prompt: str | None = Field(None, description="What not to draw.")
    seed: JsonInt | None = Field(None, description="Seed of the first image; -1 or absent: random.")
    sampler_name: str | None = Field(None, description="Euler, Euler a, DPM++ 2M, DPM++ 2M SDE, DDIM, UniPC or DEIS (GET /sdapi/v1/samplers).")
    sampler_index: str | None = Field(None, description="The older name of sampler_name; sampler_name wins.")
    scheduler: str | None = Field(None, description="Automatic, Uniform or Karras (Karras with the DPM++ samplers only).")
    batch_size: JsonInt = Field(1, ge=1, description="Images per batch; batch_size x n_iter images in all, one job each.")
    n_iter: JsonInt = Field(1, ge=1, description="Batches.")
    steps: JsonInt | None = Field(None, description="Denoising steps; the model's default when absent.")
    cfg_scale: JsonFloat | None = Field(None, description="Classifier-free guidance scale; the model's default when absent.")
    width: JsonInt | None = Field(None, description="Multiple of 8; the model's default when absent.")
    height: JsonInt | None = Field(None, description="Multiple of 8; the model's default when absent.")
    refiner_checkpoint: str | None = Field(None, description="Any name: the SDXL refiner the workers loaded takes the last part.")
    refiner_switch_at: JsonFloat | None = Field(None, description="With refiner_checkpoint: the share of the schedule the base runs.")
    override_settings: dict[str, Any] | None = Field(
        None, description="sd_model_checkpoint: a served model for this request; CLIP_stop_at_last_layers (1) and sd_vae "
        "(Automatic, None) only at their defaults."
    )
    override_settings_restore_afterwards: JsonBool | None = Field(None, description="Accepted; settings are per request here.")
    send_images: JsonBool | None = Field(None, description="false: the answer carries no images.")
    save_images: JsonBool | None = Field(None, description="Accepted; nothing is saved to the server's disk.")
    do_not_save_samples: JsonBool | None = Field(None, description="Accepted; nothing is saved to the server's disk.")
    do_not_save_grid: JsonBool | None = Field(None, description="Accepted; nothing is saved to the server's disk.")
    force_task_id: str | None = Field(None, description="Accepted; the jobs' ids are in the answer's info.")
    comments: dict[str, Any] | None = Field(None, description="Accepted; has no effect.")
    disable_extra_networks: JsonBool | None = Field(None, description="Accepted; prompts carry no extra networks here.")
    subseed: JsonInt | None = Field(None, description="Accepted; variation seeds are not offered (subseed_strength 0).")
    # Features not offered: accepted only when off.
    subseed_strength: JsonFloat | None = Field(None, description="Only 0.")
    seed_resize_from_h: JsonInt | None = Field(None, description="Only -1 or 0.")
    seed_resize_from_w: JsonInt | None = Field(None, description="Only -1 or 0.")
    styles: list[str] | None = Field(None, description="Only empty.")
    restore_faces: JsonBool | None = Field(None, description="Only false.")
    tiling: JsonBool | None = Field(None, description="Only false.")
    enable_hr: JsonBool | None = Field(None, description="txt2img: the hires fix, with the hr_* fields and denoising_strength (0.7); "
                                       "without it the hr_* fields are ignored, as A1111 does.")
    eta: JsonFloat | None = Field(
        None, description="DDIM: the noise each step adds, 0..1 (0 when absent). Euler a and DPM++ 2M SDE: only 1, "
        "their fixed noise here (A1111's default). Ignored by the other samplers, as A1111 does."
    )
    s_min_uncond: JsonFloat | None = Field(None, description="Only 0.")
    s_churn: JsonFloat | None = Field(None, description="Only 0.")
    s_tmax: JsonFloat | None = Field(None, description="Only absent or 0.")
    s_tmin: JsonFloat | None = Field(None, description="Only 0.")
    s_noise: JsonFloat | None = Field(None, description="Only 1.")
    script_name: str | None = Field(None, description="Only absent: scripts are not offered.")
    script_args: list[Any] | None = Field(None, description="Only empty.")
    alwayson_scripts: dict[str, Any] | None = Field(None, description="Only the ControlNet extension's: {\"controlnet\": {\"args\": [unit]}}, one enabled unit.")
    infotext: str | None = Field(None, description="Only absent or empty.")
    firstpass_image: str | None = Field(None, description="Only absent.")
    # The hires fix's settings, used only with enable_hr (gateway/apis/a1111/plans.py), as in A1111.
    denoising_strength: JsonFloat | None = None
    firstphase_width: JsonInt | None = None
    firstphase_height: JsonInt | None = None
    hr_scale: JsonFloat | None = None
    hr_upscaler: str | None = None
    hr_second_pass_steps: JsonInt | None = None
    hr_resize_x: JsonInt | None = None
    hr_resize_y: JsonInt | None = None
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str | None = None
    hr_negative_prompt: str | None = None
    hr_additional_modules: list[Any] | None = None


class A1111Img2ImgRequest(A1111Txt2ImgRequest):
    """AUTOMATIC1111's `POST /sdapi/v1/img2img` body: txt2img's fields, the init image and, to inpaint,
    a mask with A1111's settings for it (unused without a mask, as in A1111)."""

    init_images: list[str] | None = Field(None, description="Exactly one image, base64 or a data:image/...;base64, URL.")
    denoising_strength: JsonFloat | None = Field(None, description="How much to change the image, 0.01..1; 0.75 (A1111's default) when absent.")
    resize_mode: JsonInt | None = Field(
        None, description="0 (the default): stretched to width x height; 1: scaled and centre-cropped to fit. "
        "Without width and height the output takes the init image's size."
    )
    include_init_images: JsonBool | None = Field(None, description="Only false.")
    image_cfg_scale: JsonFloat | None = Field(None, description="Accepted; used by instruct-pix2pix models only, none here.")
    mask: str | None = Field(
        None, description="Inpainting: a picture of the init image's size, white (or, with transparency, opaque) where to paint."
    )
    mask_blur: JsonInt | None = Field(None, description="Pixels of Gaussian blur at the mask's edges, both ways (0..64); overrides the next two.")
    mask_blur_x: JsonInt | None = Field(None, description="Across (0..64); 4 when absent.")
    mask_blur_y: JsonInt | None = Field(None, description="Down (0..64); 4 when absent.")
    mask_round: JsonBool | None = Field(None, description="Round the mask to black and white before blurring it (the default).")
    inpainting_fill: JsonInt | None = Field(
        None, description="What the model starts from under the mask: 0 (the default) the surroundings' colours, 1 the image as it is."
    )
    inpaint_full_res: JsonBool | None = Field(
        None, description="true (the default): only the masked area, cut out and inpainted at width x height, then pasted back "
        "(the answer has the init image's size); false: the whole picture at width x height."
    )
    inpaint_full_res_padding: JsonInt | None = Field(None, description="Pixels around the masked area taken with it (0..256); 0 when absent.")
    inpainting_mask_invert: JsonInt | None = Field(None, description="1: paint where the mask is black instead.")
    initial_noise_multiplier: JsonFloat | None = Field(None, description="Only 1.")
    latent_mask: str | None = Field(None, description="Only absent.")


class A1111Images(BaseModel):
    images: list[str] = Field(description="The images, base64 PNG, in seed order.")
    parameters: dict[str, Any] = Field(description="The request as sent.")
    info: str = Field(description="JSON text: seed, all_seeds, sizes, sampler, steps, model, job_ids, infotexts.")


class A1111Error(BaseModel):
    """An error in FastAPI's shape, as AUTOMATIC1111's API gives them: a list of field problems (422), else a message."""

    detail: str | list[dict[str, Any]]


class A1111Lora(BaseModel):
    """A LoRA adapter the workers loaded, as AUTOMATIC1111 lists them; prompts use it as <lora:NAME:WEIGHT>."""

    name: str
    alias: str
    path: str = Field(description="Its name: adapters are loaded by the workers at start, not read from files here.")
    metadata: dict[str, Any]


class A1111Model(BaseModel):
    title: str
    model_name: str
    hash: str | None = Field(None, description="A1111's short hash: the first 10 hex digits of sha256.")
    sha256: str | None = Field(None, description="The sha256 of the model's UNet weights, as its workers publish it; null when not on their disk.")
    filename: str
    config: str | None = None


class A1111Memory(BaseModel):
    """AUTOMATIC1111's memory figures: the gateway's RAM ({free, used, total} bytes) and CUDA's ({"error": "unavailable"} here)."""

    ram: dict[str, Any]
    cuda: dict[str, Any]


class A1111Scripts(BaseModel):
    txt2img: list[str] = Field(description="None here: scripts are not offered.")
    img2img: list[str]


class A1111Embeddings(BaseModel):
    loaded: dict[str, Any] = Field(description="None here: textual-inversion embeddings are not offered.")
    skipped: dict[str, Any]


class A1111Sampler(BaseModel):
    name: str
    aliases: list[str]
    options: dict[str, Any]


class A1111Schedule(BaseModel):
    name: str
    label: str
    aliases: list[str] | None = None
    default_rho: float
    need_inner_model: bool


class A1111Options(BaseModel):
    sd_model_checkpoint: str | None = Field(description="The current model: the one requests that name none get.")


class A1111OptionsUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sd_model_checkpoint: str | None = Field(None, description="A served model (GET /sdapi/v1/sd-models) to make the current one.")
    CLIP_stop_at_last_layers: JsonInt | None = Field(None, description="Only 1 (the default).")
    sd_vae: str | None = Field(None, description="Only Automatic or None (the model's own VAE).")


class A1111ProgressState(BaseModel):
    skipped: bool
    interrupted: bool
    stopping_generation: bool
    job: str = Field(description="The job in hand: the request's first unfinished job.")
    job_count: int = Field(description="The request's jobs (batch_size x n_iter); 0 when the caller has none unfinished.")
    job_timestamp: str
    job_no: int = Field(description="The job in hand's place among them, from 0.")
    sampling_step: int
    sampling_steps: int


class A1111Progress(BaseModel):
    """AUTOMATIC1111's `GET /sdapi/v1/progress`, for the caller's newest unfinished request."""

    progress: float = Field(description="Steps done over all steps of the request's jobs, 0..1.")
    eta_relative: float = Field(description="Seconds until the request's last job is expected done.")
    state: A1111ProgressState
    current_image: str | None = Field(
        None,
        description="The job in hand's newest preview (a small JPEG in base64, every few steps as the workers' --preview-every says); "
        "null while it is queued, before its first preview, or with skip_current_image=true.",
    )
    textinfo: str | None = None
