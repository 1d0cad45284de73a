"""A ComfyUI prompt's graph read one node at a time: an input's value or link, the checkpoint and LoraLoader
chain behind a MODEL or CLIP, and the values of a checkpoint, LoRA, sampler, text or Canny node. Each
problem found is kept (`NodeProblem`) so that every one is told at once, as ComfyUI does."""

from __future__ import annotations

from typing import Any

from gateway.apis.comfy.graph_errors import GraphInvalid, NodeProblem, failed_validation
from gateway.apis.comfy.node_classes import SAMPLERS, SCHEDULES, weights_name


class NodeLinks:
    """The graph and the problems found in it so far."""

    def __init__(self, graph: object, *, served_models: list[str]):
        self.graph = graph
        self.served = served_models
        self.problems: list[NodeProblem] = []

    def inputs(self, node: str) -> dict[str, Any]:
        return self.graph[node].get("inputs", {})

    def source_class(self, node: str, name: str) -> str | None:
        """The class of the node that input `name` links to, if it links to one the prompt has."""
        value = self.inputs(node).get(name)
        if isinstance(value, list) and len(value) == 2 and str(value[0]) in self.graph:
            return self.graph[str(value[0])]["class_type"]
        return None

    def fail(self, node: str, kind: str, message: str, input_name: str | None = None) -> None:
        self.problems.append(NodeProblem(node, kind, message, input_name))

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
