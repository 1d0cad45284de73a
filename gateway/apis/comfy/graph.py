"""A ComfyUI prompt (its node graph, in the API format) read as one of this service's requests.

The graph a text-to-image workflow makes is taken: a checkpoint (`CheckpointLoaderSimple`), LoRAs on it
(`LoraLoader`, the same strength for the model and the text encoder), two `CLIPTextEncode` texts, an
`EmptyLatentImage`, one `KSampler` with `denoise` 1, a `VAEDecode` of the checkpoint's VAE, and the
`SaveImage` / `PreviewImage` / `SaveImageWebsocket` nodes that show it; or, for image to image, a `VAEEncode` of a `LoadImage`
(an image uploaded with `/upload/image`) instead of the `EmptyLatentImage`, with `denoise` as its
strength, and for inpainting a `SetLatentNoiseMask` of that with a `LoadImage`'s mask (the transparent
part of its image, as ComfyUI reads it). It becomes a request of `batch_size` images (one from an image): the
checkpoint is the model, the texts the prompt and negative prompt, the sampler and scheduler one of this
service's schedulers, the LoRAs its `loras`.

Longer graphs compile into a plan (schemas/plan.py): ComfyUI's standard SDXL workflow (a second checkpoint
as the refiner, `CLIPTextEncodeSDXL` / `CLIPTextEncodeSDXLRefiner`, two `KSamplerAdvanced` handing over at
`end_at_step` / `start_at_step`), hires fix (`LatentUpscale` / `LatentUpscaleBy`, or `VAEDecode`,
`ImageScale` / `ImageScaleBy`, `VAEEncode`, then a second sampler with `denoise`), a `ControlNetLoader` and
`ControlNetApplyAdvanced` (its image a `LoadImage`, or a `Canny` of one, its thresholds taken) on the first sampler, and
`RepeatLatentBatch` (more images). The first sampler's seed drives every stage. Outputs showing several
`VAEDecode` nodes (the first pass of a hires fix beside the final image) make one request each, their images
under their own output nodes.

Any other node, or a link these nodes do not make, is refused in ComfyUI's own error shape (`error` and
`node_errors` naming the node and its input), as ComfyUI refuses a prompt that fails validation; nothing
is left out quietly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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


class GraphInvalid(Exception):
    """A prompt ComfyUI's way of answering refuses: `error` ({type, message, details, extra_info}) and
    `node_errors` ({node id: {errors, dependent_outputs, class_type}})."""

    def __init__(self, kind: str, message: str, details: str = "", node_errors: dict | None = None):
        super().__init__(f"{message}: {details}" if details else message)
        self.kind, self.message, self.details, self.node_errors = kind, message, details, node_errors or {}

    def body(self) -> dict:
        return {"error": {"type": self.kind, "message": self.message, "details": self.details, "extra_info": {}},
                "node_errors": self.node_errors}


@dataclass(frozen=True)
class Problem:
    node: str
    kind: str  # ComfyUI's error type: required_input_missing, value_not_in_list, invalid_input_type, ...
    message: str
    input_name: str | None = None


@dataclass
class ReadGraph:
    """What the graph asks for: this service's request fields, and which node played each part."""

    fields: dict[str, Any]
    sampler: str  # node ids
    decode: str
    latent: str
    positive: str
    negative: str
    checkpoint: str
    outputs: dict[str, str]  # output node id -> its class
    classes: dict[str, str]  # every node's class
    loras: dict[str, str] = field(default_factory=dict)  # adapter -> its LoraLoader node
    image: str | None = None  # the LoadImage node, for image to image
    image_name: str | None = None  # the uploaded image it loads
    mask: str | None = None  # the SetLatentNoiseMask node, for inpainting
    mask_name: str | None = None  # the uploaded image whose transparent part is the mask
    control_name: str | None = None  # the uploaded image a ControlNetApplyAdvanced takes
    control: str | None = None  # its LoadImage node
    stage_nodes: list[str] = field(default_factory=list)  # the node of each stage of the plan, for its errors
    control_loader: str | None = None  # the ControlNetLoader node
    others: list["ReadGraph"] = field(default_factory=list)  # the images other VAEDecodes show (several outputs)

    @property
    def all_outputs(self) -> dict[str, str]:
        return {**self.outputs, **{o: kind for other in self.others for o, kind in other.outputs.items()}}

    def node_of(self, request_field: str, message: str = "") -> tuple[str, str]:
        """(node, input) a request field came from, for the errors the request's own checks raise."""
        by_field = {
            "prompt": (self.positive, "text"), "negative_prompt": (self.negative, "text"), "width": (self.latent, "width"),
            "height": (self.latent, "height"), "n": (self.latent, "batch_size"), "seed": (self.sampler, "seed"),
            "steps": (self.sampler, "steps"), "guidance": (self.sampler, "cfg"), "scheduler": (self.sampler, "sampler_name"),
            "model": (self.checkpoint, "ckpt_name"),
        }
        if request_field == "loras" and self.loras:
            return next(iter(self.loras.values())), "lora_name"
        if request_field in ("init_image", "width", "height") and self.image is not None:
            return self.image, "image"
        if request_field == "mask_image" and self.mask is not None:
            return self.mask, "mask"
        if request_field == "strength":
            return self.sampler, "denoise"
        if request_field == "controlnet" and self.control is not None:
            return self.control, "image"
        if request_field.startswith("stages") and self.control_loader is not None and "ControlNet" in message:
            return self.control_loader, "control_net_name"
        if request_field.startswith("stages.") and request_field.split(".")[1].isdigit():
            index = int(request_field.split(".")[1])
            if index < len(self.stage_nodes):
                node = self.stage_nodes[index]
                kind = self.classes.get(node, "")
                return node, {"LatentUpscaleBy": "scale_by", "ImageScaleBy": "scale_by", "LatentUpscale": "width", "ImageScale": "width"}.get(kind, "steps")
        return by_field.get(request_field, (self.sampler, request_field))


def weights_name(value: str) -> str:
    """A model or adapter name as ComfyUI's clients send it (a file name, maybe in a folder) without the folder and suffix."""
    name = value.replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in WEIGHT_FILE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


class GraphReader:
    def __init__(self, graph: object, *, served_models: list[str]):
        self.graph = graph
        self.served = served_models
        self.problems: list[Problem] = []

    def read(self) -> ReadGraph:
        graph = self.graph
        if not isinstance(graph, dict) or not graph:
            raise GraphInvalid("invalid_prompt", "Cannot execute because the prompt is not a graph of nodes",
                               "send {\"prompt\": {node_id: {\"class_type\": ..., \"inputs\": {...}}}} in ComfyUI's API format")
        for node_id, node in graph.items():
            if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
                raise GraphInvalid("invalid_prompt", "Cannot execute because a node is missing the class_type property.", f"Node ID '#{node_id}'")
            if not isinstance(node.get("inputs", {}), dict):
                raise GraphInvalid("invalid_prompt", f"Cannot execute because node {node_id}'s inputs are not an object.", f"Node ID '#{node_id}'")
            if node["class_type"] not in NODES:
                raise GraphInvalid(
                    "invalid_prompt", f"Cannot execute because node {node['class_type']} does not exist.",
                    f"Node ID '#{node_id}': this server runs the nodes {', '.join(NODES)}",
                )
        outputs = {node_id: node["class_type"] for node_id, node in graph.items() if node["class_type"] in OUTPUTS}
        if not outputs:
            raise GraphInvalid("prompt_no_outputs", "Prompt has no outputs", "add a SaveImage, PreviewImage or SaveImageWebsocket node")
        decodes = {output: self.link(output, "images", "VAEDecode") for output in outputs}
        found = sorted({d for d in decodes.values() if d is not None})
        reads = [self.read_from(d, {o: kind for o, kind in outputs.items() if decodes[o] == d}) for d in found]
        if self.problems or not reads or None in reads:
            raise self.invalid(outputs)
        reads.sort(key=lambda r: len(r.stage_nodes), reverse=True)  # the longest chain first: the final image
        read, read.others = reads[0], reads[1:]  # the others: outputs of another VAEDecode (a first pass), jobs of their own
        return read

    def read_from(self, decode: str, outputs: dict[str, str]) -> ReadGraph | None:
        chain = self.latent_chain(decode)
        vae_source = self.link(decode, "vae", "CheckpointLoaderSimple", output=2)
        if not chain:
            return None
        sampler = chain[0][1]
        inputs = self.inputs(sampler)
        advanced = self.graph[sampler]["class_type"] == "KSamplerAdvanced"
        model_chain = self.chain(sampler, "model", output=0)
        positive, control = self.conditioning(sampler, "positive")
        negative, _ = self.conditioning(sampler, "negative")
        latent_kind = self.source_class(sampler, "latent_image")
        batch = None
        latent_from = sampler
        if latent_kind == "RepeatLatentBatch":
            batch = self.link(sampler, "latent_image", "RepeatLatentBatch")
            latent_from, latent_kind = batch, self.source_class(batch, "samples") if batch else None
        latent_input = "samples" if latent_from == batch else "latent_image"
        latent = self.link(latent_from, latent_input, latent_kind if latent_kind in LATENTS else "EmptyLatentImage") if latent_from else None
        image = masked = encoded = mask_source = None
        if latent is not None and latent_kind == "SetLatentNoiseMask":  # inpainting: the mask of a LoadImage
            masked, encoded = latent, self.link(latent, "samples", "VAEEncode")
            mask_source = self.link(latent, "mask", "LoadImage", output=1)
        elif latent is not None and latent_kind == "VAEEncode":
            encoded = latent
        if encoded is not None:  # image to image
            image = self.link(encoded, "pixels", "LoadImage")
        texts = {}
        for role, node in (("positive", positive), ("negative", negative)):
            if node is None:
                continue
            texts[role] = self.text(node)
            clip_chain = self.chain(node, "clip", output=1)
            if model_chain is not None and clip_chain is not None and clip_chain != model_chain:
                self.fail(node, "invalid_input_type",
                          "its clip must come through the same checkpoint and LoraLoader nodes as the KSampler's model", "clip")
        checkpoint = model_chain[0] if model_chain else None
        model = self.checkpoint_model(checkpoint) if checkpoint else None
        loras: dict[str, str] = {}
        weights: dict[str, float] = {}
        for loader in (model_chain or [])[1:]:
            name, weight = self.lora(loader)
            if name is None:
                continue
            if name in loras:
                self.fail(loader, "invalid_input_type", f"the LoRA {name!r} is loaded twice", "lora_name")
            loras[name], weights[name] = loader, weight
        scheduler = self.scheduler(sampler, inputs)
        denoise = 1.0 if advanced else inputs.get("denoise", 1.0)
        if image is None and denoise != 1:
            self.fail(sampler, "value_not_in_list", "denoise below 1 needs an image to start from: a VAEEncode of a LoadImage as latent_image",
                      "denoise")
        elif image is not None and not (isinstance(denoise, (int, float)) and not isinstance(denoise, bool) and 0.01 <= denoise <= 1):
            self.fail(sampler, "value_smaller_than_min", f"denoise must be between 0.01 and 1 here, got {denoise!r}", "denoise")
        size = {name: self.value(latent, name, int) for name in ("width", "height", "batch_size")} if latent and image is None else {}
        if batch is not None:
            amount = self.value(batch, "amount", int)
            if amount is not None and size.get("batch_size") is not None:
                size["batch_size"] = size["batch_size"] * amount
        numbers = {name: self.value(sampler, key, kind)
                   for name, key, kind in (("seed", "noise_seed" if advanced else "seed", int), ("steps", "steps", int), ("cfg", "cfg", float))}
        picture = self.value(image, "image", str) if image is not None else None
        mask_picture = self.value(mask_source, "image", str) if masked is not None and mask_source is not None else None
        stages = self.stages(chain, checkpoint, texts, control) if len(chain) > 1 or advanced or control else None
        if self.problems or None in (positive, negative, latent, checkpoint, vae_source):
            return None
        fields: dict[str, Any] = {
            "prompt": texts.get("positive"),
            "negative_prompt": texts.get("negative") or None,
            "width": size.get("width"),  # from an image: its own size
            "height": size.get("height"),
            "n": size.get("batch_size"),
            "strength": float(denoise) if image is not None else None,
            "seed": numbers["seed"],
            "steps": numbers["steps"],
            "guidance": numbers["cfg"],
            "scheduler": scheduler,
            "model": model,
            "format": "PNG",
            "stages": stages,
        }
        if weights:
            fields["loras"] = weights
        control_node = control[1] if control else None
        return ReadGraph(fields={k: v for k, v in fields.items() if v is not None}, sampler=sampler, decode=decode, latent=latent,
                         positive=positive, negative=negative, checkpoint=checkpoint, outputs=outputs, loras=loras,
                         classes={n: node["class_type"] for n, node in self.graph.items()}, image=image, image_name=picture,
                         mask=masked, mask_name=mask_picture, control=control_node, stage_nodes=[node for _, node in chain],
                         control_loader=control[2] if control else None,
                         control_name=self.value(control_node, "image", str) if control_node else None)

    # -- chains of stages ------------------------------------------------------------------------

    def latent_chain(self, decode: str) -> list[tuple[str, str]] | None:
        """[(kind, node)] from the first sampler to the one the VAEDecode decodes: samplers, latent upscales,
        and pixel upscales (a VAEDecode, ImageScale, VAEEncode between two samplers)."""
        chain: list[tuple[str, str]] = []
        at, name = decode, "samples"
        for _ in range(len(self.graph) + 1):
            kind = self.source_class(at, name)
            if kind in SAMPLER_NODES:
                node = self.link(at, name, SAMPLER_NODES)
                chain.append(("sample", node))
                after = self.source_class(node, "latent_image")
                if after not in ("LatentUpscale", "LatentUpscaleBy", *SAMPLER_NODES) and not (after == "VAEEncode" and self.pixel_upscale(node)):
                    return list(reversed(chain))
                at, name = node, "latent_image"
            elif kind in ("LatentUpscale", "LatentUpscaleBy"):
                node = self.link(at, name, kind)
                chain.append(("latent", node))
                at, name = node, "samples"
            elif kind == "VAEEncode" and chain:
                encode = self.link(at, name, "VAEEncode")
                scale = self.link(encode, "pixels", ("ImageScale", "ImageScaleBy"))
                decoded = self.link(scale, "image", "VAEDecode") if scale else None
                if decoded is None:
                    return None
                chain.append(("pixel", scale))
                at, name = decoded, "samples"
            else:
                self.link(at, name, SAMPLER_NODES)  # names what it must be
                return None
        self.fail(decode, "invalid_input_type", "its latents link in a circle", "samples")
        return None

    def pixel_upscale(self, sampler: str) -> bool:
        encode = str(self.inputs(sampler)["latent_image"][0])
        return self.source_class(encode, "pixels") in ("ImageScale", "ImageScaleBy")

    def conditioning(self, sampler: str, role: str) -> tuple[str | None, tuple[dict, str | None, str | None] | None]:
        """The text node of a sampler's positive or negative input, through a ControlNetApplyAdvanced
        (its unit and control image's LoadImage node, when there is one)."""
        if self.source_class(sampler, role) != "ControlNetApplyAdvanced":
            return self.link(sampler, role, TEXT_NODES), None
        apply = self.link(sampler, role, "ControlNetApplyAdvanced", output=0 if role == "positive" else 1)
        if apply is None:
            return None, None
        loader = self.link(apply, "control_net", "ControlNetLoader")
        source = self.link(apply, "image", ("LoadImage", "Canny"))
        unit = {
            "model": weights_name(self.value(loader, "control_net_name", str) or "") if loader else None,
            "weight": self.value(apply, "strength", float),
            "start": self.value(apply, "start_percent", float),
            "end": self.value(apply, "end_percent", float),
            "preprocessor": "none",
        }
        if source is not None and self.graph[source]["class_type"] == "Canny":
            unit |= self.canny(source)
            source = self.link(source, "image", "LoadImage")
        return self.link(apply, role, TEXT_NODES), (unit, source, loader)

    def canny(self, node: str) -> dict:
        """ComfyUI's Canny thresholds (0.01-0.99 of the gradient's range) on this service's 0-255 scale."""
        unit: dict[str, Any] = {"preprocessor": "canny"}
        for name in ("low_threshold", "high_threshold"):
            value = self.value(node, name, float)
            if value is not None and not 0.01 <= value <= 0.99:
                self.fail(node, "value_not_in_range", f"must be from 0.01 to 0.99, got {value!r}", name)
            elif value is not None:
                unit[name] = max(1, round(value * 255))
        return unit

    def text(self, node: str) -> str | None:
        kind = self.graph[node]["class_type"]
        if kind == "CLIPTextEncodeSDXL":
            text_g, text_l = self.value(node, "text_g", str), self.value(node, "text_l", str)
            if text_g is not None and text_l not in (None, "", text_g):
                self.fail(node, "invalid_input_type", "one prompt for both text encoders here: text_l must equal text_g (or be empty)", "text_l")
            return text_g
        return self.value(node, "text", str)

    def stages(self, chain: list[tuple[str, str]], checkpoint: str | None, texts: dict, control: tuple | None) -> list[dict] | None:
        """The plan the chain makes: one stage per sampler and upscale."""
        stages: list[dict] = []
        for index, (kind, node) in enumerate(chain):
            inputs = self.inputs(node)
            if kind in ("latent", "pixel"):
                methods = LATENT_METHODS if kind == "latent" else PIXEL_METHODS
                method = self.value(node, "upscale_method", str)
                if method is not None and method not in methods:
                    self.fail(node, "value_not_in_list", f"Value not in list: upscale_method: {method!r} not in {sorted(methods)}", "upscale_method")
                stage: dict[str, Any] = {"kind": "upscale", "space": kind, "upscaler": methods.get(method or "", None)}
                if self.graph[node]["class_type"] in ("LatentUpscaleBy", "ImageScaleBy"):
                    stage["scale"] = self.value(node, "scale_by", float)
                else:
                    stage["width"], stage["height"] = self.value(node, "width", int), self.value(node, "height", int)
                    if inputs.get("crop", "disabled") != "disabled":
                        self.fail(node, "value_not_in_list", "crop: only disabled here", "crop")
                stages.append(stage)
                continue
            advanced = self.graph[node]["class_type"] == "KSamplerAdvanced"
            stage = {"kind": "sample", "steps": self.value(node, "steps", int), "guidance": self.value(node, "cfg", float),
                     "scheduler": self.scheduler(node, inputs)}
            if index > 0:
                model_chain = self.chain(node, "model", output=0)
                if model_chain and checkpoint and model_chain[0] != checkpoint:
                    stage["model"] = "refiner"
                for role in ("positive", "negative"):
                    text_node, _ = self.conditioning(node, role)
                    if text_node is not None and self.text(text_node) not in (texts.get(role), None):
                        self.fail(node, "invalid_input_type", f"every sampler here takes the first one's {role} text", role)
            if advanced:
                steps = stage["steps"] or 0
                start, end = self.value(node, "start_at_step", int), self.value(node, "end_at_step", int)
                if index > 0 and start:
                    stage["start_step"] = start
                elif index == 0 and start:
                    self.fail(node, "value_not_in_list", "a first sampler starts at step 0 here", "start_at_step")
                if end is not None and end < steps:
                    stage["end_step"] = end
            elif index > 0:
                denoise = inputs.get("denoise", 1.0)
                if isinstance(denoise, (int, float)) and not isinstance(denoise, bool) and 0 < denoise <= 1:
                    stage["denoise"] = float(denoise)
                else:
                    self.fail(node, "value_smaller_than_min", f"denoise must be above 0 and at most 1, got {denoise!r}", "denoise")
            if index == 0 and control is not None:
                stage["controlnet"] = control[0]
            elif index > 0 and self.source_class(node, "positive") == "ControlNetApplyAdvanced":
                self.fail(node, "invalid_input_type", "a ControlNet here guides the first sampler only", "positive")
            stages.append({k: v for k, v in stage.items() if v is not None})
        return stages

    # -- one node at a time ----------------------------------------------------------------------

    def inputs(self, node: str) -> dict[str, Any]:
        return self.graph[node].get("inputs", {})

    def source_class(self, node: str, name: str) -> str | None:
        """The class of the node that input `name` links to, if it links to one the prompt has."""
        value = self.inputs(node).get(name)
        if isinstance(value, list) and len(value) == 2 and str(value[0]) in self.graph:
            return self.graph[str(value[0])]["class_type"]
        return None

    def fail(self, node: str, kind: str, message: str, input_name: str | None = None) -> None:
        self.problems.append(Problem(node, kind, message, input_name))

    def link(self, node: str, name: str, want: str | tuple[str, ...], *, output: int = 0) -> str | None:
        """The node that input `name` of `node` links to, when it is a `want` (its output `output`)."""
        value = self.inputs(node).get(name)
        if value is None:
            self.fail(node, "required_input_missing", "Required input is missing", name)
            return None
        if not (isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)):
            self.fail(node, "invalid_input_type", f"must link to a {want} node's output, as [node_id, output_index]", name)
            return None
        source = str(value[0])
        if source not in self.graph:
            self.fail(node, "invalid_input_type", f"links to node {source}, which the prompt does not have", name)
            return None
        kind = self.graph[source]["class_type"]
        wants = (want,) if isinstance(want, str) else want
        if kind not in wants or value[1] != output:
            self.fail(node, "invalid_input_type",
                      f"must link to output {output} of a {' or '.join(wants)} node here, not output {value[1]} of {kind} {source}", name)
            return None
        return source

    def chain(self, node: str, name: str, *, output: int) -> list[str] | None:
        """[checkpoint, LoraLoader, ...]: where input `name` (a MODEL at output 0, a CLIP at 1) comes from."""
        loaders: list[str] = []
        at, at_name = node, name
        for _ in range(len(self.graph) + 1):
            value = self.inputs(at).get(at_name)
            source = str(value[0]) if isinstance(value, list) and len(value) == 2 else None
            kind = self.graph.get(source, {}).get("class_type") if source is not None else None
            if kind == "LoraLoader" and value[1] == output:
                loaders.append(source)
                at, at_name = source, "model" if output == 0 else "clip"
                continue
            checkpoint = self.link(at, at_name, "CheckpointLoaderSimple", output=output)
            return [checkpoint, *reversed(loaders)] if checkpoint is not None else None
        self.fail(node, "invalid_input_type", "its LoraLoader nodes link in a circle", name)
        return None

    def value(self, node: str, name: str, kind: type) -> Any:
        value = self.inputs(node).get(name)
        if value is None:
            self.fail(node, "required_input_missing", "Required input is missing", name)
            return None
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if not isinstance(value, kind) or isinstance(value, bool):
            what = {int: "an integer", float: "a number", str: "a string"}[kind]
            self.fail(node, "invalid_input_type", f"must be {what} here, got {value!r}", name)
            return None
        return value

    def checkpoint_model(self, node: str) -> str | None:
        asked = self.value(node, "ckpt_name", str)
        if asked is None:
            return None
        for name in (asked, weights_name(asked)):
            if name in self.served:
                return name
        if not self.served:  # no worker yet: the name stands, and the jobs wait for a worker of it
            return weights_name(asked)
        self.fail(node, "value_not_in_list", f"Value not in list: ckpt_name: {asked!r} not in {self.served}", "ckpt_name")
        return None

    def lora(self, node: str) -> tuple[str | None, float]:
        name = self.value(node, "lora_name", str)
        model_weight = self.value(node, "strength_model", float)
        clip_weight = self.value(node, "strength_clip", float)
        if model_weight is not None and clip_weight is not None and model_weight != clip_weight:
            self.fail(node, "invalid_input_type", "one strength for the model and the text encoder here: strength_model must equal strength_clip",
                      "strength_clip")
        return (weights_name(name) if name else None), (model_weight if model_weight is not None else 1.0)

    def scheduler(self, node: str, inputs: dict[str, Any]) -> str | None:
        sampler, schedule = self.value(node, "sampler_name", str), self.value(node, "scheduler", str)
        if sampler is None or schedule is None:
            return None
        if sampler not in SAMPLERS:
            self.fail(node, "value_not_in_list", f"Value not in list: sampler_name: {sampler!r} not in {SAMPLERS}", "sampler_name")
            return None
        mine = SCHEDULES.get((sampler, schedule))
        if mine is None:
            offered = sorted(s for (sm, s) in SCHEDULES if sm == sampler)
            self.fail(node, "value_not_in_list", f"Value not in list: scheduler: {schedule!r} with {sampler} not in {offered}", "scheduler")
        return mine

    def invalid(self, outputs: dict[str, str]) -> GraphInvalid:
        return failed_validation(self.problems, {n: node["class_type"] for n, node in self.graph.items()}, outputs)


def failed_validation(problems: list[Problem], classes: dict[str, str], outputs: dict[str, str]) -> GraphInvalid:
    """ComfyUI's answer to a prompt whose nodes fail its checks: each problem under its node."""
    errors: dict[str, dict] = {}
    for problem in problems:
        entry = errors.setdefault(problem.node, {"errors": [], "dependent_outputs": sorted(outputs), "class_type": classes[problem.node]})
        entry["errors"].append({
            "type": problem.kind, "message": problem.message,
            "details": f"{problem.input_name}: {problem.message}" if problem.input_name else problem.message,
            "extra_info": {"input_name": problem.input_name} if problem.input_name else {},
        })
    return GraphInvalid("prompt_outputs_failed_validation", "Prompt outputs failed validation", "", errors)


def read_graph(graph: object, *, served_models: list[str]) -> ReadGraph:
    """The request a ComfyUI prompt asks for; raises GraphInvalid."""
    return GraphReader(graph, served_models=served_models).read()


def field_problem(read: ReadGraph, request_field: str, message: str) -> GraphInvalid:
    """A refusal by this service's own request checks, on the node and input the field came from."""
    node, input_name = read.node_of(request_field, message)
    kind = "value_not_in_list" if request_field in ("model", "loras", "scheduler") else "invalid_input_type"
    return failed_validation([Problem(node, kind, message, input_name)], read.classes, read.outputs)
