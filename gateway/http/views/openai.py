"""OpenAI's Images API shapes (`/v1/images/...`, `/v1/models`): the generation, edit and variation
requests, the images answer, the model list and OpenAI's error shape."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from schemas.request import JsonBool, JsonFloat, JsonInt, is_random_seed


def _random_is_none(value: Any) -> Any:
    return None if is_random_seed(value) else value


JsonSeed = Annotated[JsonInt | None, BeforeValidator(_random_is_none)]
"""A JSON body's seed: an integer, or -1 (or absent) for a random one."""
FormSeed = Annotated[int | None, BeforeValidator(_random_is_none)]
"""A multipart form's seed: digits, or -1 (or absent) for a random one."""


class OpenAIImageRequest(BaseModel):
    """OpenAI's `POST /v1/images/generations` body, plus a few imagegen fields (send them with the
    OpenAI client's `extra_body`)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="What to draw.")
    model: str | None = Field(
        None, description="A served model, or an OpenAI name (dall-e-2, dall-e-3, gpt-image-1, ...) for the current one."
    )
    n: JsonInt = Field(
        1, ge=1, description="How many images, 1..the server's limit (8 unless configured); one job each, seeds seed, seed+1, ..."
    )
    size: str | None = Field(None, description="WIDTHxHEIGHT, multiples of 8 (e.g. 1024x1024), or auto (1024x1024).")
    quality: Literal["auto", "standard", "hd", "low", "medium", "high"] | None = Field(
        None,
        description="Scales the model's default steps: low half, standard/medium/auto the default, high/hd 1.5x.",
    )
    response_format: Literal["b64_json", "url"] | None = Field(
        None, description="b64_json or url (an absolute URL of /v1/jobs/{id}/image); as OpenAI, b64_json by default for "
        "gpt-image-* models, url for dall-e-*, no model and the models served here."
    )
    output_format: Literal["png", "jpeg", "webp"] | None = Field(None, description="Image encoding; png by default.")
    output_compression: JsonInt | None = Field(None, ge=0, le=100, description="jpeg/webp quality, 0..100.")
    style: Literal["vivid", "natural"] | None = Field(None, description="Accepted; has no effect.")
    background: Literal["auto", "opaque", "transparent"] | None = Field(
        None, description="auto or opaque; transparent is not available."
    )
    moderation: Literal["auto", "low"] | None = Field(None, description="Accepted; has no effect.")
    stream: JsonBool | None = Field(None, description="Only false: streaming is not available here.")
    user: str | None = Field(None, description="Accepted; has no effect.")
    safety_identifier: str | None = Field(None, description="Accepted; has no effect.")
    seed: JsonSeed = Field(None, ge=0, description="imagegen: seed of the first image; random when absent or -1.")
    negative_prompt: str | None = Field(None, description="imagegen: what not to draw.")
    steps: JsonInt | None = Field(None, description="imagegen: denoising steps; overrides quality.")
    guidance: JsonFloat | None = Field(None, description="imagegen: classifier-free guidance scale.")


class OpenAIEditRequest(BaseModel):
    """The text fields of OpenAI's `POST /v1/images/edits` form (the files, `image` or `image[]` and
    `mask`, come beside them), plus a few imagegen fields (the OpenAI client's `extra_body`)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(description="What the edited image shows.")
    model: str | None = Field(None, description="A served model, or an OpenAI name for the current one.")
    n: int = Field(1, ge=1, description="How many images, one job each, seeds seed, seed+1, ...")
    size: str | None = Field(None, description="WIDTHxHEIGHT (the image scaled and centre-cropped to it) or auto (the image's own size).")
    quality: Literal["auto", "standard", "hd", "low", "medium", "high"] | None = Field(None, description="Scales the model's default steps.")
    response_format: Literal["b64_json", "url"] | None = Field(None, description="As OpenAI: b64_json for gpt-image-*, else url by default.")
    output_format: Literal["png", "jpeg", "webp"] | None = Field(None, description="Image encoding; png by default.")
    output_compression: int | None = Field(None, ge=0, le=100, description="jpeg/webp quality, 0..100.")
    background: Literal["auto", "opaque", "transparent"] | None = Field(None, description="auto or opaque; transparent is not available.")
    input_fidelity: Literal["high", "low"] | None = Field(None, description="Accepted; has no effect.")
    stream: bool | None = Field(None, description="Only false: streaming is not available here.")
    user: str | None = Field(None, description="Accepted; has no effect.")
    safety_identifier: str | None = Field(None, description="Accepted; has no effect.")
    seed: FormSeed = Field(None, ge=0, description="imagegen: seed of the first image; random when absent or -1.")
    negative_prompt: str | None = Field(None, description="imagegen: what not to draw.")
    steps: int | None = Field(None, description="imagegen: denoising steps; overrides quality.")
    guidance: float | None = Field(None, description="imagegen: classifier-free guidance scale.")
    strength: float | None = Field(
        None, description="imagegen: how much to change the image, 0.01..1; 1 where a mask says (redrawn), 0.75 without one."
    )


class OpenAIVariationRequest(BaseModel):
    """The text fields of OpenAI's `POST /v1/images/variations` form (the file is `image`), plus a few
    imagegen fields."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="A served model, or an OpenAI name for the current one.")
    n: int = Field(1, ge=1, description="How many variations, one job each, seeds seed, seed+1, ...")
    size: str | None = Field(None, description="WIDTHxHEIGHT (the image scaled and centre-cropped to it) or auto (the image's own size).")
    response_format: Literal["b64_json", "url"] | None = Field(None, description="As OpenAI: url by default (b64_json for gpt-image-*).")
    user: str | None = Field(None, description="Accepted; has no effect.")
    prompt: str | None = Field(None, description="imagegen: what the variations show; a neutral prompt when absent.")
    seed: FormSeed = Field(None, ge=0, description="imagegen: seed of the first variation; random when absent or -1.")
    negative_prompt: str | None = Field(None, description="imagegen: what not to draw.")
    steps: int | None = Field(None, description="imagegen: denoising steps.")
    guidance: float | None = Field(None, description="imagegen: classifier-free guidance scale.")
    strength: float | None = Field(None, description="imagegen: how far from the image, 0.01..1; 0.6 when absent.")


class OpenAIModel(BaseModel):
    """A served model in OpenAI's shape (`GET /v1/models`)."""

    id: str
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time its longest-running live worker started.")
    owned_by: str = "imagegen"


class OpenAIModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[OpenAIModel]


class OpenAIImage(BaseModel):
    b64_json: str | None = Field(None, description="The image, base64 (response_format b64_json).")
    url: str | None = Field(None, description="Where to fetch the image (response_format url).")
    revised_prompt: str | None = None
    job_id: str | None = Field(None, description="imagegen: the job that made this image.")
    seed: int | None = Field(None, description="imagegen: the seed it was made with.")


class OpenAIImagesResponse(BaseModel):
    created: int = Field(description="Unix time the images were finished.")
    data: list[OpenAIImage]
    size: str | None = None
    output_format: str | None = None


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(description="invalid_request_error, permission_error, rate_limit_error or server_error.")
    param: str | None = Field(None, description="The request field at fault.")
    code: str | None = None


class OpenAIError(BaseModel):
    """An error in OpenAI's shape, as OpenAI's client libraries expect it."""

    error: OpenAIErrorDetail
