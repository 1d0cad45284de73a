"""What a ComfyUI prompt asks for once read (`gateway.apis.comfy.graph_reader`): this service's request
fields and the node that played each part, so that the request's own checks are refused on the node and
input a field came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gateway.apis.comfy.graph_errors import GraphInvalid, NodeProblem, failed_validation


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


def field_problem(read: ReadGraph, request_field: str, message: str) -> GraphInvalid:
    """A refusal by this service's own request checks, on the node and input the field came from."""
    node, input_name = read.node_of(request_field, message)
    kind = "value_not_in_list" if request_field in ("model", "loras", "scheduler") else "invalid_input_type"
    return failed_validation([NodeProblem(node, kind, message, input_name)], read.classes, read.outputs)
