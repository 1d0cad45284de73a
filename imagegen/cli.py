"""The `imagegen` command: up, gateway, worker, generate. Every flag has an IMAGEGEN_* variable."""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from gpu_worker.settings import WorkerSettings
from gpu_worker.engines.speedups import DEFAULT_BUCKETS
from imagegen import __version__, event_loop
from imagegen.logs import configure as configure_logging
from imagegen.paths import default_data_dir
from schemas.jetstream import Topology
from schemas.request import SCHEDULERS, Limits
from schemas.workers import DEFAULT_FAIRNESS

if TYPE_CHECKING:  # the gateway's modules load only for the commands that run one (not for `imagegen worker`)
    from gateway.settings import GatewaySettings

log = logging.getLogger("imagegen")


def env(name: str, default):
    value = os.environ.get(f"IMAGEGEN_{name}")
    if value is None:
        return default
    return type(default)(value) if default is not None and not isinstance(default, bool) else value


def env_list(name: str) -> list[str]:
    return [item.strip() for item in os.environ.get(f"IMAGEGEN_{name}", "").split(",") if item.strip()]


def env_flag(name: str) -> bool:
    return os.environ.get(f"IMAGEGEN_{name}", "").strip().lower() in ("1", "true", "yes", "on")


def at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is less than 1")
    return value


def proxy_list(text: str) -> tuple[str, ...]:
    from gateway.http.proxies import parse_trusted

    entries = tuple(t.strip() for t in text.split(",") if t.strip())
    try:
        parse_trusted(entries)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--trust-proxy: ")) from None
    return entries


SECTIONS = {  # the order --help lists them in, and what each holds
    "network": "where the service listens and which NATS it joins",
    "limits": "what one request may ask for; a request over a limit gets a 400 naming it",
    "engine": "the model and how the worker runs it",
    "safety": "who may call, what is refused or hidden, and the bounds on what a client may send",
    "operations": "logs, storage, retries, metrics and the GPU's temperature",
    "testing": "the simulated engine (--model simulated), for load and failure tests",
}
ENV_NOTE = re.compile(r" ?\((IMAGEGEN_[A-Z_]+)([^)]*)\)$")


def section(p: argparse.ArgumentParser, name: str) -> argparse._ArgumentGroup:
    """The parser's argument group of that name, made the first time (all of them at once, so that
    --help lists them in SECTIONS' order)."""
    groups = p.__dict__.setdefault("_imagegen_sections", {})
    if not groups:
        for title, about in SECTIONS.items():
            groups[title] = p.add_argument_group(title, about)
    return groups[name]


class DefaultsHelp(argparse.HelpFormatter):
    """--help with each flag's default beside its environment variable: "(default: 4030; IMAGEGEN_PORT)"."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=40)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default is None or default is False or default in ("", [], argparse.SUPPRESS) or not action.option_strings:
            return text
        shown = str(default).replace("%", "%%")
        found = ENV_NOTE.search(text)
        if found:
            return text[: found.start()] + f" (default: {shown}; {found.group(1)}{found.group(2)})"
        return f"{text} (default: {shown})"


def add_common(p: argparse.ArgumentParser) -> None:
    section(p, "network").add_argument("--nats", default=os.environ.get("IMAGEGEN_NATS"), help="NATS server URL(s), comma-separated (IMAGEGEN_NATS)")
    section(p, "operations").add_argument("--log-level", default=env("LOG_LEVEL", "INFO"), help="DEBUG, INFO, WARNING (IMAGEGEN_LOG_LEVEL)")
    section(p, "operations").add_argument("--log-format", default=env("LOG_FORMAT", "text"), choices=["text", "json"], help="text lines, or one JSON object per line with job_id on job lines (IMAGEGEN_LOG_FORMAT)")
    section(p, "operations").add_argument("--event-loop", default=env("EVENT_LOOP", "auto"), choices=list(event_loop.CHOICES), help="auto: uvloop where installed, else asyncio's own (IMAGEGEN_EVENT_LOOP)")
    section(p, "operations").add_argument("--replicas", type=int, default=env("REPLICAS", 1), help="JetStream replicas of every stream, 3 on a cluster (IMAGEGEN_REPLICAS)")
    section(p, "limits").add_argument("--max-pixels", type=int, default=env("MAX_PIXELS", Limits().max_pixels), help="pixel budget per image (IMAGEGEN_MAX_PIXELS)")
    section(p, "limits").add_argument("--max-steps", type=int, default=env("MAX_STEPS", Limits().max_steps), help="most steps per image (IMAGEGEN_MAX_STEPS)")
    section(p, "limits").add_argument("--max-prompt-chars", type=int, default=env("MAX_PROMPT_CHARS", Limits().max_prompt_chars), help="longest prompt (IMAGEGEN_MAX_PROMPT_CHARS)")
    section(p, "limits").add_argument("--max-stages", type=int, default=env("MAX_STAGES", Limits().max_stages), help="most stages in one job's plan (hires fix, refiner, ControlNet) (IMAGEGEN_MAX_STAGES)")
    section(p, "limits").add_argument("--max-images", type=int, default=env("MAX_IMAGES", Limits().max_images), help="most images (n) per request (IMAGEGEN_MAX_IMAGES)")
    section(p, "limits").add_argument("--max-upload-bytes", type=int, default=env("MAX_UPLOAD_BYTES", Limits().max_upload_bytes), help="largest init or mask image (IMAGEGEN_MAX_UPLOAD_BYTES)")
    section(p, "operations").add_argument("--job-ttl", type=float, default=env("JOB_TTL", Topology().job_ttl_s), help="seconds status records and images are kept (IMAGEGEN_JOB_TTL)")
    section(p, "operations").add_argument("--ack-wait", type=float, default=env("ACK_WAIT", Topology().ack_wait_s), help="seconds a silent worker keeps a job before it is redelivered; the same on every process (IMAGEGEN_ACK_WAIT)")
    section(p, "operations").add_argument("--max-deliver", type=int, default=env("MAX_DELIVER", Topology().max_deliver), help="tries of a job before it is dead-lettered; the same on every process (IMAGEGEN_MAX_DELIVER)")
    section(p, "operations").add_argument("--images-max-bytes", type=int, default=env("IMAGES_MAX_BYTES", Topology().images_max_bytes), help="most bytes of images kept; a job whose image does not fit fails (IMAGEGEN_IMAGES_MAX_BYTES)")
    section(p, "operations").add_argument("--uploads-max-bytes", type=int, default=env("UPLOADS_MAX_BYTES", Topology().uploads_max_bytes), help="most bytes of uploaded init and mask images kept; past it uploads get 507 (IMAGEGEN_UPLOADS_MAX_BYTES)")
    section(p, "operations").add_argument("--cache-max-bytes", type=int, default=env("CACHE_MAX_BYTES", Topology().cache_max_bytes), help="most bytes of the result cache (IMAGEGEN_CACHE_MAX_BYTES)")
    section(p, "operations").add_argument("--status-max-bytes", type=int, default=env("STATUS_MAX_BYTES", Topology().status_max_bytes), help="most bytes of job records, and of ComfyUI prompts; past it submits get 507 (IMAGEGEN_STATUS_MAX_BYTES)")
    section(p, "operations").add_argument("--kv-max-bytes", type=int, default=env("KV_MAX_BYTES", Topology().kv_max_bytes), help="most bytes of each small KV bucket: rate limits, quotas, workers, config (IMAGEGEN_KV_MAX_BYTES)")


def add_gateway(p: argparse.ArgumentParser) -> None:
    from gateway.settings import GatewaySettings

    section(p, "network").add_argument("--host", default=env("HOST", "127.0.0.1"), help="address the gateway listens on (IMAGEGEN_HOST)")
    section(p, "network").add_argument("--port", type=int, default=env("PORT", 4030), help="gateway port (IMAGEGEN_PORT)")
    section(p, "safety").add_argument("--api-keys", default=os.environ.get("IMAGEGEN_API_KEYS_FILE"), help="JSON file of API keys (hashes); auth is on when any key is configured; IMAGEGEN_API_KEYS may hold the JSON itself (IMAGEGEN_API_KEYS_FILE)")
    section(p, "safety").add_argument("--blocklist", default=env("BLOCKLIST", ""), help="comma-separated terms; prompts containing one are refused (IMAGEGEN_BLOCKLIST)")
    section(p, "safety").add_argument("--redact-prompts", action="store_true", default=env("REDACT_PROMPTS", "") not in ("", "0", "false"), help="audit records carry a hash instead of the prompt (IMAGEGEN_REDACT_PROMPTS)")
    section(p, "limits").add_argument("--default-timeout", type=float, default=env("DEFAULT_TIMEOUT", 0.0), help="seconds a job may wait in the queue when the request sets no timeout_s; 0: forever (IMAGEGEN_DEFAULT_TIMEOUT)")
    section(p, "limits").add_argument("--upload-bytes-per-key", type=int, default=env("UPLOAD_BYTES_PER_KEY", GatewaySettings().upload_bytes_per_key), help="bytes of uploaded images (ComfyUI's /upload/image) each API key may keep at once; past it 413 (IMAGEGEN_UPLOAD_BYTES_PER_KEY)")
    section(p, "operations").add_argument("--cache-ttl", type=float, default=env("CACHE_TTL", 24 * 3600.0), help="seconds an image answers identical requests (with a seed, or cache: true) from the result cache; 0: no cache (IMAGEGEN_CACHE_TTL)")
    section(p, "operations").add_argument("--webhook-secret", default=os.environ.get("IMAGEGEN_WEBHOOK_SECRET"), help="signs webhook calls (Standard Webhooks: whsec_ and base64, or any text); the same on every gateway (IMAGEGEN_WEBHOOK_SECRET)")
    section(p, "safety").add_argument("--webhook-allow-private", action="store_true", default=env("WEBHOOK_ALLOW_PRIVATE", "") not in ("", "0", "false"), help="webhooks may go to loopback, private and link-local addresses, for a closed network (IMAGEGEN_WEBHOOK_ALLOW_PRIVATE)")
    section(p, "network").add_argument("--trust-proxy", type=proxy_list, default=env("TRUST_PROXY", ""), metavar="ADDR[,ADDR]", help="addresses or networks (10.0.0.0/8) of the reverse proxies in front; only from them are X-Forwarded-Proto and X-Forwarded-Host believed (the scheme and host of image URLs); * for any peer; default none (IMAGEGEN_TRUST_PROXY)")
    section(p, "operations").add_argument("--comfy-previews", action="store_true", default=env("COMFY_PREVIEWS", "") not in ("", "0", "false"), help="ComfyUI's /ws sends live previews as binary frames for every prompt, as ComfyUI does with a preview method on; without it only for prompts whose extra_data asks (preview_method auto, latent2rgb or taesd), as ComfyUI's default (none) does (IMAGEGEN_COMFY_PREVIEWS)")
    section(p, "safety").add_argument("--max-body-bytes", type=at_least_one, default=env("MAX_BODY_BYTES", GatewaySettings().max_body_bytes), help="largest body of a route that takes images inline (/v1/jobs, /api/generate, img2img, uploads); at least what two uploads of --max-upload-bytes need as base64 (IMAGEGEN_MAX_BODY_BYTES)")
    section(p, "safety").add_argument("--max-json-bytes", type=at_least_one, default=env("MAX_JSON_BYTES", GatewaySettings().max_json_bytes), help="largest body of every other route (IMAGEGEN_MAX_JSON_BYTES)")
    section(p, "safety").add_argument("--max-json-items", type=at_least_one, default=env("MAX_JSON_ITEMS", GatewaySettings().max_json_items), help="most keys and items in a JSON body, counted as its ',' and ':' while it arrives (IMAGEGEN_MAX_JSON_ITEMS)")
    section(p, "safety").add_argument("--body-timeout", type=float, default=env("BODY_TIMEOUT", GatewaySettings().body_timeout_s), help="seconds a request body may take to arrive; 408 after (IMAGEGEN_BODY_TIMEOUT)")
    section(p, "safety").add_argument("--header-timeout", type=float, default=env("HEADER_TIMEOUT", GatewaySettings().header_timeout_s), help="seconds a request's headers may take to arrive (from the connection's start, or the last answer on it; also how long an idle keep-alive connection stays); the connection is closed after (IMAGEGEN_HEADER_TIMEOUT)")
    section(p, "safety").add_argument("--max-connections", type=at_least_one, default=env("MAX_CONNECTIONS", GatewaySettings().max_connections), help="open connections per gateway (HTTP, WebSocket); one more is answered 503 with Retry-After (IMAGEGEN_MAX_CONNECTIONS)")
    section(p, "operations").add_argument("--access-log", action="store_true", default=env_flag("ACCESS_LOG"), help="log a line per HTTP request: method, path, status, bytes, milliseconds (IMAGEGEN_ACCESS_LOG=1)")
    section(p, "operations").add_argument("--audit-log", action="store_true", default=env_flag("AUDIT_LOG"), help="also log each audit record (a JSON line per submission, with the prompt unless --redact-prompts); the records go to NATS subject imagegen.audit either way (IMAGEGEN_AUDIT_LOG=1)")
    section(p, "safety").add_argument("--cache-scope", default=env("CACHE_SCOPE", "key"), choices=["key", "global"], help="with API keys: key keeps each key's result-cache entries to itself; global shares them between keys (IMAGEGEN_CACHE_SCOPE)")
    section(p, "operations").add_argument("--submit-timeout", type=float, default=env("SUBMIT_TIMEOUT", GatewaySettings().submit_timeout_s), help="seconds a submit waits for the broker to take its job; unanswered (a cluster electing a leader): 503 with Retry-After, and submits are refused at once until the job stream has a leader (IMAGEGEN_SUBMIT_TIMEOUT)")


def add_worker(p: argparse.ArgumentParser) -> None:
    section(p, "engine").add_argument("--model", default=env("MODEL", "auto"), help="hub id, local folder, tiny-sdxl or simulated; auto: SDXL base with CUDA, tiny-sdxl without (IMAGEGEN_MODEL)")
    section(p, "engine").add_argument("--refiner", default=os.environ.get("IMAGEGEN_REFINER"), help="refiner hub id or folder (tiny-sdxl-refiner with tiny-sdxl) (IMAGEGEN_REFINER)")
    section(p, "engine").add_argument("--device", default=env("DEVICE", "auto"), help="cuda:N or cpu; one worker process per GPU (IMAGEGEN_DEVICE)")
    section(p, "engine").add_argument("--dtype", default=env("DTYPE", "auto"), choices=["auto", "fp32", "fp16", "bf16"], help="weights' dtype; auto: fp16 with CUDA, fp32 on a CPU (IMAGEGEN_DTYPE)")
    section(p, "engine").add_argument("--threads", type=int, default=env("THREADS", 1), help="torch CPU threads (IMAGEGEN_THREADS)")
    section(p, "engine").add_argument("--refiner-split", type=float, default=env("REFINER_SPLIT", 0.8), help="with the refiner: fraction of the noise schedule the base denoises before handing over (IMAGEGEN_REFINER_SPLIT)")
    section(p, "engine").add_argument("--controlnet", dest="controlnets", action="append", default=env_list("CONTROLNETS"), metavar="NAME=SOURCE", help="load an SDXL ControlNet at start, from a folder or a hub id (tiny-controlnet: a small one built from tiny-sdxl); repeatable; plans pick it by NAME (IMAGEGEN_CONTROLNETS, comma-separated)")
    section(p, "engine").add_argument("--lora", dest="loras", action="append", default=env_list("LORAS"), metavar="NAME=SOURCE", help="load a LoRA adapter at start, from a folder, a .safetensors file or a hub id (owner/repo[:file]); repeatable; requests pick it by NAME (IMAGEGEN_LORAS, comma-separated)")
    section(p, "engine").add_argument("--vae", default=os.environ.get("IMAGEGEN_VAE"), help="another VAE, hub id or folder, e.g. madebyollin/sdxl-vae-fp16-fix (IMAGEGEN_VAE)")
    section(p, "engine").add_argument("--vae-dtype", default=env("VAE_DTYPE", "auto"), choices=["auto", "fp32", "fp16", "bf16"], help="dtype of the VAE decode; auto: bf16 for an fp16 model whose VAE overflows in fp16 (IMAGEGEN_VAE_DTYPE)")
    section(p, "engine").add_argument("--vae-tiling", default=env("VAE_TILING", "auto"), choices=["auto", "on", "off"], help="tiled VAE decode; auto: above 1536x1536 pixels (IMAGEGEN_VAE_TILING)")
    section(p, "engine").add_argument("--offload", action="store_true", default=env_flag("OFFLOAD"), help="model CPU offload, only for GPUs too small for the pipeline; slower (IMAGEGEN_OFFLOAD=1)")
    section(p, "engine").add_argument("--compile", default=env("COMPILE", "auto"), choices=["auto", "on", "off"], help="torch.compile the UNets; auto: on with CUDA (IMAGEGEN_COMPILE)")
    section(p, "engine").add_argument("--compile-mode", default=env("COMPILE_MODE", "default"), choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"], help="torch.compile's mode (IMAGEGEN_COMPILE_MODE)")
    section(p, "engine").add_argument("--compile-buckets", default=env("COMPILE_BUCKETS", DEFAULT_BUCKETS), metavar="WxH,...", help="sizes compiled and warmed up at start; other sizes run uncompiled, never recompiling (IMAGEGEN_COMPILE_BUCKETS)")
    section(p, "engine").add_argument("--max-batch", type=at_least_one, default=os.environ.get("IMAGEGEN_MAX_BATCH", "1"), help="most images one engine call makes: up to this many compatible queued jobs (same size, steps, sampler, refiner, LoRAs; a request's n images are) run together; 1: one at a time (IMAGEGEN_MAX_BATCH)")
    section(p, "engine").add_argument("--quantize", default=env("QUANTIZE", "none"), choices=["none", "fp8"], help="fp8: the UNets' attention and feed-forward layers in float8 (torchao; GPUs of compute capability 8.9+, e.g. H100); refused elsewhere (IMAGEGEN_QUANTIZE)")
    section(p, "engine").add_argument("--compile-cache", default=env("COMPILE_CACHE", ""), metavar="DIR", help="folder for torch.compile's artifacts, reused at the next start; default: <data dir>/compile-cache (IMAGEGEN_COMPILE_CACHE)")
    section(p, "engine").add_argument("--channels-last", default=env("CHANNELS_LAST", "auto"), choices=["auto", "on", "off"], help="channels-last memory layout; auto: on with CUDA (IMAGEGEN_CHANNELS_LAST)")
    section(p, "engine").add_argument("--fuse-qkv", default=env("FUSE_QKV", "auto"), choices=["auto", "on", "off"], help="fused QKV attention projections; auto: on with CUDA unless LoRAs are loaded (IMAGEGEN_FUSE_QKV)")
    section(p, "operations").add_argument("--worker-id", default=os.environ.get("IMAGEGEN_WORKER_ID"), help="name in the worker registry (IMAGEGEN_WORKER_ID)")
    section(p, "operations").add_argument("--fairness", type=at_least_one, default=os.environ.get("IMAGEGEN_FAIRNESS", str(DEFAULT_FAIRNESS)), help="after this many jobs in a row taken from higher tiers while a lower one waited, the next comes from the lowest tier with work (IMAGEGEN_FAIRNESS)")
    section(p, "engine").add_argument("--preview-every", type=int, default=env("PREVIEW_EVERY", 5), help="a preview image every N steps, 0 for none (IMAGEGEN_PREVIEW_EVERY)")
    section(p, "operations").add_argument("--metrics-port", type=int, default=env("METRICS_PORT", 0), help="serve the worker's Prometheus /metrics on this port; 0: off (IMAGEGEN_METRICS_PORT)")
    section(p, "operations").add_argument("--metrics-host", default=env("METRICS_HOST", "127.0.0.1"), help="address the worker's metrics port listens on (IMAGEGEN_METRICS_HOST)")
    section(p, "safety").add_argument("--safety-checker", default=os.environ.get("IMAGEGEN_SAFETY_CHECKER"), metavar="PATH|HUB_ID|MODULE:FACTORY", help="NSFW check of every image: a StableDiffusionSafetyChecker folder or hub id (e.g. CompVis/stable-diffusion-safety-checker), or a plug-in factory; off when unset (IMAGEGEN_SAFETY_CHECKER)")
    section(p, "safety").add_argument("--nsfw-action", default=env("NSFW_ACTION", "blank"), choices=["blank", "reject"], help="a flagged image: blank (a black image, status nsfw: true) or reject (the job fails) (IMAGEGEN_NSFW_ACTION)")
    section(p, "operations").add_argument("--max-gpu-temp", type=float, default=env("MAX_GPU_TEMP", 85.0), help="degrees C at which the worker takes no new job (NVML); 0: no guard (IMAGEGEN_MAX_GPU_TEMP)")
    section(p, "operations").add_argument("--resume-gpu-temp", type=float, default=env("RESUME_GPU_TEMP", 75.0), help="degrees C at or below which a paused worker takes jobs again (IMAGEGEN_RESUME_GPU_TEMP)")
    section(p, "testing").add_argument("--sim-step-s", type=float, default=env("SIM_STEP_S", 0.05), help="simulated engine: seconds per step (IMAGEGEN_SIM_STEP_S)")
    section(p, "testing").add_argument("--sim-fail-marker", default=env("SIM_FAIL_MARKER", ""), help="simulated engine: a prompt containing this text crashes it, for testing retries (IMAGEGEN_SIM_FAIL_MARKER)")
    section(p, "operations").add_argument("--data-dir", default=str(default_data_dir()), help="where built models (and up's server store) live (IMAGEGEN_DATA_DIR)")


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: a mistyped flag is reported by the subcommand itself, on one line, with the
    nearest flag it knows (argparse alone leaves it to the top-level parser and its usage)."""

    def parse_known_args(self, args=None, namespace=None):
        parsed, extra = super().parse_known_args(args, namespace)
        if extra:
            self.error(self._unknown(extra))
        return parsed, extra

    def _unknown(self, extra: list[str]) -> str:
        flags = [option for action in self._actions for option in action.option_strings]
        word = extra[0].split("=", 1)[0]
        near = difflib.get_close_matches(word, flags, n=1, cutoff=0.75) if word.startswith("-") else []
        hint = f"; did you mean {near[0]}?" if near else ""
        return f"unrecognized argument{'s' if len(extra) > 1 else ''}: {' '.join(extra)}{hint}"

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def command_of(argv: list[str]) -> str | None:
    """The subcommand argv names (the top level takes no option with a value), None when it names none."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every subcommand with its flags; with `command`, only that one's flags (the others stay bare)."""
    parser = argparse.ArgumentParser(prog="imagegen", description="SDXL image generation over NATS JetStream")
    parser.add_argument("--version", action="version", version=f"imagegen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)
    up = sub.add_parser(
        "up", help="all in one: embedded nats-server (unless --nats), a gateway and a worker",
        description="All in one: an embedded nats-server (unless --nats is given), a gateway on --port and a "
        "worker. Every flag can also be set by the environment variable named beside it.",
        formatter_class=DefaultsHelp, usage="%(prog)s [flags]",
    )
    if command in (None, "up"):
        add_common(up), add_gateway(up), add_worker(up)
    section(up, "network").add_argument("--nats-port", type=int, default=int(os.environ["IMAGEGEN_NATS_PORT"]) if os.environ.get("IMAGEGEN_NATS_PORT") else None, help="port of the embedded nats-server; unset: 4222, or a free port when 4222 is busy (IMAGEGEN_NATS_PORT)")
    gw = sub.add_parser("gateway", help="run a gateway (HTTP and WebSocket) against NATS", formatter_class=DefaultsHelp, usage="%(prog)s [flags]")
    if command in (None, "gateway"):
        add_common(gw), add_gateway(gw)
    wk = sub.add_parser("worker", help="run one worker (one per GPU) against NATS", formatter_class=DefaultsHelp, usage="%(prog)s [flags]")
    add_common(wk), add_worker(wk)
    key = sub.add_parser("key", help="make a new API key and print its entry for the keys file", formatter_class=DefaultsHelp)
    key.add_argument("name", help="who the key is for")
    key.add_argument("--tiers", default="normal,low", help="tiers it may use, comma-separated")
    key.add_argument("--rate-per-minute", type=int, default=60, help="requests a minute it may make")
    key.add_argument("--max-concurrent", type=int, default=8, help="jobs it may have unfinished at once")
    gen = sub.add_parser(
        "generate", help="generate an image through a running gateway",
        description="Generate an image through a running gateway (`imagegen up`) and save it. Absent flags take "
        "the server's defaults. Errors are one line; exit status 2 for a bad flag, address or request, 1 when "
        "the job fails.",
        formatter_class=DefaultsHelp,
    )
    gen.add_argument("prompt", help="what to draw")
    gen.add_argument("-o", "--output", default=None, help="file to write; the format follows its extension (.png, .jpg, .webp); default out.png, or out.jpg / out.webp with --format")
    gen.add_argument("--url", default=env("URL", "http://127.0.0.1:4030"), help="the gateway's address, as `imagegen up` prints it; http:// is assumed (IMAGEGEN_URL)")
    gen.add_argument("--width", type=int, default=None, help="image width in pixels, a multiple of 8 (default 1024; with --init-image, the image's)")
    gen.add_argument("--height", type=int, default=None, help="image height in pixels, a multiple of 8 (default 1024; with --init-image, the image's)")
    gen.add_argument("--steps", type=int, default=None, help="denoising steps (default the model's: 30 for SDXL, 4 for tiny-sdxl)")
    gen.add_argument("--seed", default=None, help="a whole number for a repeatable image; -1 or absent: a random one (the job reports it)")
    gen.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale, 0..30: how closely to follow the prompt (default the model's, 5)")
    gen.add_argument("--scheduler", default=None, choices=SCHEDULERS, metavar="NAME", help=f"the sampler: {', '.join(SCHEDULERS)} (default the model's own)")
    gen.add_argument("--format", default=None, type=str.upper, choices=["PNG", "JPEG", "WEBP"], help="image encoding: png, jpeg or webp (default from the -o extension, else png)")
    gen.add_argument("--negative-prompt", default="", help="what not to draw")
    gen.add_argument("--init-image", default=None, help="image-to-image: the picture to start from (a file)")
    gen.add_argument("--mask-image", default=None, help="inpainting: a mask file, white where to redraw")
    gen.add_argument("--strength", type=float, default=None, help="image-to-image: how much to change it, 0..1 (default 0.4)")
    gen.add_argument("-n", type=int, default=1, help="how many images: OUTPUT, then OUTPUT-2, ... (seeds seed, seed+1, ...)")
    gen.add_argument("--model", default=None, help="one of the models the workers serve (GET /api/ls); the current one when absent")
    gen.add_argument("--tier", default=None, choices=["high", "normal", "low"], help="priority tier (your key must allow it)")
    gen.add_argument("--api-key", default=os.environ.get("IMAGEGEN_API_KEY"), help="sent as Authorization: Bearer KEY when the gateway has keys (IMAGEGEN_API_KEY)")
    return parser


def limits_of(args: argparse.Namespace) -> Limits:
    return Limits(
        max_pixels=args.max_pixels, max_steps=args.max_steps, max_prompt_chars=args.max_prompt_chars,
        max_images=args.max_images, max_upload_bytes=args.max_upload_bytes, max_stages=args.max_stages,
    )


def topology_of(args: argparse.Namespace) -> Topology:
    return Topology(
        replicas=args.replicas, job_ttl_s=args.job_ttl, ack_wait_s=args.ack_wait, max_deliver=args.max_deliver,
        images_max_bytes=args.images_max_bytes, uploads_max_bytes=args.uploads_max_bytes,
        cache_max_bytes=args.cache_max_bytes, status_max_bytes=args.status_max_bytes, kv_max_bytes=args.kv_max_bytes,
    )


def gateway_settings(args: argparse.Namespace, nats_url: str) -> GatewaySettings:
    from gateway.settings import GatewaySettings

    return GatewaySettings(
        nats_url=nats_url,
        host=args.host,
        port=args.port,
        limits=limits_of(args),
        topology=topology_of(args),
        api_keys_file=args.api_keys,
        api_keys=os.environ.get("IMAGEGEN_API_KEYS"),
        blocklist=tuple(t.strip() for t in args.blocklist.split(",") if t.strip()),
        redact_prompts=args.redact_prompts,
        default_timeout_s=args.default_timeout or None,
        cache_ttl_s=args.cache_ttl,
        upload_bytes_per_key=args.upload_bytes_per_key,
        cache_scope=args.cache_scope,
        webhook_secret=args.webhook_secret or None,
        webhook_allow_private=args.webhook_allow_private,
        trust_proxy=args.trust_proxy,
        comfy_previews=args.comfy_previews,
        max_body_bytes=args.max_body_bytes,
        max_json_bytes=args.max_json_bytes,
        max_json_items=args.max_json_items,
        body_timeout_s=args.body_timeout,
        header_timeout_s=args.header_timeout,
        max_connections=args.max_connections,
        submit_timeout_s=args.submit_timeout,
        access_log=args.access_log,
        audit_log=args.audit_log,
    )


def worker_settings(args: argparse.Namespace, nats_url: str) -> WorkerSettings:
    extra = {"worker_id": args.worker_id} if args.worker_id else {}
    return WorkerSettings(
        nats_url=nats_url,
        model=args.model,
        refiner=args.refiner,
        device=args.device,
        dtype=args.dtype,
        threads=args.threads,
        refiner_split=args.refiner_split,
        loras=tuple(args.loras or ()),
        controlnets=tuple(args.controlnets or ()),
        vae=args.vae,
        vae_dtype=args.vae_dtype,
        vae_tiling=args.vae_tiling,
        offload=args.offload,
        compile=args.compile,
        compile_mode=args.compile_mode,
        compile_buckets=args.compile_buckets,
        compile_cache=args.compile_cache,
        quantize=args.quantize,
        max_batch=args.max_batch,
        channels_last=args.channels_last,
        fuse_qkv=args.fuse_qkv,
        data_dir=args.data_dir,
        sim_step_s=args.sim_step_s,
        sim_fail_marker=args.sim_fail_marker,
        preview_every=args.preview_every,
        fairness=args.fairness,
        safety_checker=args.safety_checker,
        nsfw_action=args.nsfw_action,
        max_gpu_temp=args.max_gpu_temp,
        resume_gpu_temp=args.resume_gpu_temp,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
        limits=limits_of(args),
        topology=topology_of(args),
        **extra,
    )


def missing_worker_packages() -> list[str]:
    """What of the [worker] extra the engines need is not installed (a gateway's install has none of it)."""
    import importlib.util

    def absent(name: str) -> bool:
        try:
            return importlib.util.find_spec(name) is None
        except (ImportError, ValueError):  # a package blocked or half-installed
            return True

    return [name for name in ("torch", "diffusers", "transformers") if absent(name)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(command_of(argv))
    args = parser.parse_args(argv)
    if hasattr(args, "event_loop"):
        try:
            event_loop.resolve(args.event_loop)
        except (event_loop.EventLoopUnavailable, ValueError) as exc:
            parser.error(f"--event-loop (IMAGEGEN_EVENT_LOOP): {exc}")
    if args.command in ("worker", "up") and args.model != "simulated":
        missing = missing_worker_packages()
        if missing:
            parser.error(f"{args.command} runs SDXL, which needs {', '.join(missing)}: pip install 'imagegen[worker]'")
    if getattr(args, "quantize", "none") != "none":
        from gpu_worker.engines.load import resolve_device
        from gpu_worker.engines.quantize import refusal

        problem = refusal(args.quantize, resolve_device(args.device))
        if problem:
            parser.error(problem)
    configure_logging(level=getattr(args, "log_level", "INFO"), log_format=getattr(args, "log_format", "text"))
    from imagegen import runtime

    if args.command == "key":
        import json

        from gateway.http.auth import new_key_entry

        secret, entry = new_key_entry(
            args.name, tiers=args.tiers.split(","), rate_per_minute=args.rate_per_minute, max_concurrent=args.max_concurrent
        )
        print(f"key (give it to {args.name}; it is not stored): {secret}", file=sys.stderr)
        print(json.dumps(entry))
        return 0
    if args.command == "generate":
        from imagegen.client_cli import generate_command

        return generate_command(args)
    if args.command in ("up", "gateway"):
        from imagegen.port_check import http_port_problem

        problem = http_port_problem(args.host, args.port)
        if problem:
            print(f"imagegen {args.command}: error: {problem}", file=sys.stderr)
            return 2
    if args.command == "gateway":
        event_loop.run(runtime.serve(gateway=gateway_settings(args, args.nats or "nats://127.0.0.1:4222"), worker=None), loop=args.event_loop)
        return 0
    if args.command == "worker":
        event_loop.run(runtime.serve(gateway=None, worker=worker_settings(args, args.nats or "nats://127.0.0.1:4222")), loop=args.event_loop)
        return 0
    embedded = None
    nats_url = args.nats
    if not nats_url:
        from imagegen.embedded_nats import EmbeddedNats, PortBusy, StoreInUse

        port = {"port": args.nats_port, "other_port_if_busy": False} if args.nats_port is not None else {}
        try:
            embedded = EmbeddedNats(store_dir=Path(args.data_dir) / "nats", **port).start()
        except StoreInUse as exc:
            print(f"imagegen up: the data dir {args.data_dir} is in use: {exc}; stop that imagegen up, or give another --data-dir", file=sys.stderr)
            return 2
        except PortBusy:
            print(f"imagegen up: --nats-port {args.nats_port} is in use; give another, or leave it unset for 4222 or a free port", file=sys.stderr)
            return 2
        nats_url = embedded.url
    try:
        event_loop.run(runtime.serve(gateway=gateway_settings(args, nats_url), worker=worker_settings(args, nats_url)), loop=args.event_loop)
    finally:
        if embedded is not None:
            embedded.stop()
    return 0
