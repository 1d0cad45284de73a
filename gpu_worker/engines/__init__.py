"""The engines a worker runs, behind one small interface (`base.Engine`), chosen by `--model` (`load`): the
real SDXL pipeline (`sdxl`, with `decode`, `lora`, `schedulers`, `speedups`, `quantize`), `tiny_sdxl` and the
simulated engine for load tests."""
