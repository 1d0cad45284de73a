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

from dataclasses import dataclass
from typing import Any

from gateway.apis.comfy.graph import ReadGraph
from gateway.apis.comfy.graph_errors import GraphInvalid
from gateway.apis.comfy.graph_links import NodeLinks
from gateway.apis.comfy.node_classes import (LATENT_METHODS, LATENTS, NODES, OUTPUTS, PIXEL_METHODS, SAMPLER_NODES, TEXT_NODES,
                                             weights_name)


@dataclass
class LatentStart:
    """Where a first sampler's latents come from: the latent node (EmptyLatentImage, VAEEncode or
    SetLatentNoiseMask) and a RepeatLatentBatch before it; for image to image the LoadImage, and for
    inpainting the SetLatentNoiseMask and the LoadImage of its mask."""

    latent: str | None = None
    batch: str | None = None
    image: str | None = None
    masked: str | None = None
    mask_source: str | None = None


class GraphReader(NodeLinks):
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
        """The request the image of VAEDecode `decode` asks for; None when a check fails (its problems kept)."""
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
        start = self.latent_start(sampler)
        texts = self.prompt_texts({"positive": positive, "negative": negative}, model_chain)
        checkpoint = model_chain[0] if model_chain else None
        model = self.checkpoint_model(checkpoint) if checkpoint else None
        loras, weights = self.lora_weights(model_chain or [])
        scheduler = self.scheduler(sampler, inputs)
        denoise = 1.0 if advanced else inputs.get("denoise", 1.0)
        self.check_denoise(sampler, denoise, start.image)
        size = self.size(start)
        numbers = {name: self.value(sampler, key, kind)
                   for name, key, kind in (("seed", "noise_seed" if advanced else "seed", int), ("steps", "steps", int), ("cfg", "cfg", float))}
        picture = self.value(start.image, "image", str) if start.image is not None else None
        mask_picture = self.value(start.mask_source, "image", str) if start.masked is not None and start.mask_source is not None else None
        stages = self.stages(chain, checkpoint, texts, control) if len(chain) > 1 or advanced or control else None
        if self.problems or None in (positive, negative, start.latent, checkpoint, vae_source):
            return None
        fields: dict[str, Any] = {
            "prompt": texts.get("positive"),
            "negative_prompt": texts.get("negative") or None,
            "width": size.get("width"),  # from an image: its own size
            "height": size.get("height"),
            "n": size.get("batch_size"),
            "strength": float(denoise) if start.image is not None else None,
            "seed": numbers["seed"],
            "steps": numbers["steps"],
            "guidance": numbers["cfg"],
            "scheduler": scheduler,
            "model": model,
            "format": "PNG",
            "stages": stages,
            "loras": weights or None,
        }
        control_node = control[1] if control else None
        return ReadGraph(fields={k: v for k, v in fields.items() if v is not None}, sampler=sampler, decode=decode, latent=start.latent,
                         positive=positive, negative=negative, checkpoint=checkpoint, outputs=outputs, loras=loras,
                         classes={n: node["class_type"] for n, node in self.graph.items()}, image=start.image, image_name=picture,
                         mask=start.masked, mask_name=mask_picture, control=control_node, stage_nodes=[node for _, node in chain],
                         control_loader=control[2] if control else None,
                         control_name=self.value(control_node, "image", str) if control_node else None)

    # -- the first sampler's inputs --------------------------------------------------------------

    def latent_start(self, sampler: str) -> LatentStart:
        """Where the first sampler's latents come from, through a RepeatLatentBatch when there is one."""
        start = LatentStart()
        latent_kind = self.source_class(sampler, "latent_image")
        latent_from = sampler
        if latent_kind == "RepeatLatentBatch":
            start.batch = self.link(sampler, "latent_image", "RepeatLatentBatch")
            latent_from, latent_kind = start.batch, self.source_class(start.batch, "samples") if start.batch else None
        latent_input = "samples" if latent_from == start.batch else "latent_image"
        start.latent = self.link(latent_from, latent_input, latent_kind if latent_kind in LATENTS else "EmptyLatentImage") if latent_from else None
        encoded = None
        if start.latent is not None and latent_kind == "SetLatentNoiseMask":  # inpainting: the mask of a LoadImage
            start.masked, encoded = start.latent, self.link(start.latent, "samples", "VAEEncode")
            start.mask_source = self.link(start.latent, "mask", "LoadImage", output=1)
        elif start.latent is not None and latent_kind == "VAEEncode":
            encoded = start.latent
        if encoded is not None:  # image to image
            start.image = self.link(encoded, "pixels", "LoadImage")
        return start

    def prompt_texts(self, nodes: dict[str, str | None], model_chain: list[str] | None) -> dict[str, str | None]:
        """The positive and negative texts, each text node's clip checked to come the model's way."""
        texts = {}
        for role, node in nodes.items():
            if node is None:
                continue
            texts[role] = self.text(node)
            clip_chain = self.chain(node, "clip", output=1)
            if model_chain is not None and clip_chain is not None and clip_chain != model_chain:
                self.fail(node, "invalid_input_type",
                          "its clip must come through the same checkpoint and LoraLoader nodes as the KSampler's model", "clip")
        return texts

    def lora_weights(self, model_chain: list[str]) -> tuple[dict[str, str], dict[str, float]]:
        """({adapter: its LoraLoader node}, {adapter: weight}) of the LoraLoader nodes after the checkpoint."""
        loras: dict[str, str] = {}
        weights: dict[str, float] = {}
        for loader in model_chain[1:]:
            name, weight = self.lora(loader)
            if name is None:
                continue
            if name in loras:
                self.fail(loader, "invalid_input_type", f"the LoRA {name!r} is loaded twice", "lora_name")
            loras[name], weights[name] = loader, weight
        return loras, weights

    def check_denoise(self, sampler: str, denoise: object, image: str | None) -> None:
        """denoise 1 from an empty latent; from an image, its strength (0.01 to 1)."""
        if image is None and denoise != 1:
            self.fail(sampler, "value_not_in_list", "denoise below 1 needs an image to start from: a VAEEncode of a LoadImage as latent_image",
                      "denoise")
        elif image is not None and not (isinstance(denoise, (int, float)) and not isinstance(denoise, bool) and 0.01 <= denoise <= 1):
            self.fail(sampler, "value_smaller_than_min", f"denoise must be between 0.01 and 1 here, got {denoise!r}", "denoise")

    def size(self, start: LatentStart) -> dict[str, int | None]:
        """width, height and batch_size of an empty latent (times a RepeatLatentBatch's amount); none from an image."""
        size = {name: self.value(start.latent, name, int) for name in ("width", "height", "batch_size")} if start.latent and start.image is None else {}
        if start.batch is not None:
            amount = self.value(start.batch, "amount", int)
            if amount is not None and size.get("batch_size") is not None:
                size["batch_size"] = size["batch_size"] * amount
        return size

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


def read_graph(graph: object, *, served_models: list[str]) -> ReadGraph:
    """The request a ComfyUI prompt asks for; raises GraphInvalid."""
    return GraphReader(graph, served_models=served_models).read()
