"""`--quantize fp8` where float8 cannot run (this CPU): a refusal in one line naming the reason, from the
command before anything starts, and from the engine before any weight is loaded."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from gpu_worker.engines.quantize import in_transformer_block, refusal
from gpu_worker.engines.sdxl import SdxlEngine, SdxlSettings


@pytest.mark.processes  # runs the imagegen command
def test_worker_command_refuses_fp8_without_a_float8_gpu_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "imagegen", "worker", "--quantize", "fp8", "--device", "cpu", "--nats", "nats://127.0.0.1:1"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "--quantize fp8 needs a CUDA GPU with float8 tensor cores" in result.stderr
    assert "H100" in result.stderr and "device is cpu" in result.stderr


def test_engine_refuses_fp8_on_cpu_before_loading_anything(tmp_path):
    with pytest.raises(ValueError, match=r"^--quantize fp8 needs a CUDA GPU .* this worker's device is cpu$"):
        SdxlEngine.load(SdxlSettings(model=str(tmp_path / "no-such-model"), device="cpu", quantize="fp8"))
    assert refusal("none", "cpu") is None
    assert "expected one of none, fp8" in refusal("int4", "cuda:0")


def test_only_transformer_block_linears_with_sides_of_16_are_converted():
    linear, odd, conv = torch.nn.Linear(64, 32), torch.nn.Linear(60, 32), torch.nn.Conv2d(4, 4, 1)
    assert in_transformer_block(linear, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    assert not in_transformer_block(linear, "time_embedding.linear_1")
    assert not in_transformer_block(odd, "mid_block.attentions.0.transformer_blocks.0.ff.net.2")
    assert not in_transformer_block(conv, "mid_block.attentions.0.transformer_blocks.0.attn1.to_q")
