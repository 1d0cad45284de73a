"""Canny's thresholds: asked for in each API's own words, checked, and used by the worker's edge finder."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from gateway.apis.a1111.plans import controlnet_of
from gateway.apis.comfy.graph_errors import GraphInvalid
from gateway.apis.comfy.graph_reader import read_graph
from gpu_worker.engines.controlnet import canny
from schemas.plan import ControlNetUnit
from tests.helpers.comfy import workflow


def soft_square() -> Image.Image:
    """A square in a square: a step of 60 outside, of 195 inside."""
    image = Image.new("L", (64, 64), 0)
    for inset, level in ((12, 60), (16, 255)):
        image.paste(level, (inset, inset, 64 - inset, 64 - inset))
    return image.convert("RGB")


def edge_pixels(image: Image.Image) -> int:
    return int((np.asarray(image.convert("L")) > 0).sum())


def test_the_thresholds_decide_which_edges_are_kept():
    counts = [edge_pixels(canny(soft_square(), low=low, high=high)) for low, high in ((250, 255), (100, 200), (100, 150), (30, 50))]
    assert counts[0] == 0 and counts[1] < counts[2] < counts[3], counts  # the inner step, then the outer one too


def test_a_unit_checks_its_thresholds():
    unit = ControlNetUnit(model="edges", preprocessor="canny", low_threshold=50, high_threshold=150)
    assert (unit.low_threshold, unit.high_threshold) == (50, 150)
    assert (ControlNetUnit(model="edges").low_threshold, ControlNetUnit(model="edges").high_threshold) == (100, 200)
    for bad, words in (
        ({"preprocessor": "canny", "low_threshold": 180, "high_threshold": 120}, "must not be above high_threshold"),
        ({"preprocessor": "none", "low_threshold": 50}, "for preprocessor canny"),
        ({"preprocessor": "canny", "high_threshold": 300}, "high_threshold"),
    ):
        with pytest.raises(ValidationError, match=words):
            ControlNetUnit(model="edges", **bad)


class Refused(Exception):
    pass


def a1111_unit(**changes) -> dict:
    unit = {"enabled": True, "module": "canny", "model": "edges", "image": "aGk=", **changes}
    field, _ = controlnet_of({"controlnet": {"args": [unit]}}, lambda name, message: Refused(f"{name}: {message}"))
    return field


def test_a1111_units_take_threshold_a_and_b():
    assert {k: a1111_unit(threshold_a=64, threshold_b=128.0)[k] for k in ("low_threshold", "high_threshold")} == {
        "low_threshold": 64, "high_threshold": 128}
    assert "low_threshold" not in a1111_unit(threshold_a=-1, threshold_b=-1)
    assert "low_threshold" not in a1111_unit(module="none", threshold_a=64)
    with pytest.raises(Refused, match="threshold_a must be a whole number"):
        a1111_unit(threshold_a=10.5)


def comfy_canny(low, high) -> dict:
    graph = workflow(**{"3": {"positive": ["31", 0], "negative": ["31", 1]}})
    graph["30"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "edges.safetensors"}}
    graph["32"] = {"class_type": "LoadImage", "inputs": {"image": "square.png"}}
    graph["33"] = {"class_type": "Canny", "inputs": {"image": ["32", 0], "low_threshold": low, "high_threshold": high}}
    graph["31"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
        "positive": ["6", 0], "negative": ["7", 0], "control_net": ["30", 0], "image": ["33", 0],
        "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
    return graph


def test_comfy_canny_nodes_bring_their_thresholds():
    read = read_graph(comfy_canny(0.2, 0.6), served_models=["tiny-sdxl"])
    unit = read.fields["stages"][0]["controlnet"] if "stages" in read.fields else read.fields["controlnet"]
    assert (unit["preprocessor"], unit["low_threshold"], unit["high_threshold"]) == ("canny", 51, 153)
    with pytest.raises(GraphInvalid) as refused:
        read_graph(comfy_canny(0.4, 1.5), served_models=["tiny-sdxl"])
    assert refused.value.node_errors["33"]["errors"][0]["extra_info"]["input_name"] == "high_threshold"
