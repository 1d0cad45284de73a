"""The `imagegen` command: up, gateway, worker, generate. Every flag has an IMAGEGEN_* variable."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from gateway.http.proxies import parse_trusted
from gateway.settings import GatewaySettings
from gpu_worker.settings import WorkerSettings
from gpu_worker.engines.speedups import DEFAULT_BUCKETS
from imagegen import __version__, event_loop
from imagegen.logs import configure as configure_logging
from imagegen.paths import default_data_dir
from schemas.jetstream import Topology
from schemas.request import Limits
from schemas.workers import DEFAULT_FAIRNESS

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
    entries = tuple(t.strip() for t in text.split(",") if t.strip())
    try:
        parse_trusted(entries)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--trust-proxy: ")) from None
    return entries


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--nats", default=os.environ.get("IMAGEGEN_NATS"), help="NATS server URL(s), comma-separated (IMAGEGEN_NATS)")
    p.add_argument("--log-level", default=env("LOG_LEVEL", "INFO"), help="DEBUG, INFO, WARNING (IMAGEGEN_LOG_LEVEL)")
    p.add_argument("--log-format", default=env("LOG_FORMAT", "text"), choices=["text", "json"], help="text lines, or one JSON object per line with job_id on job lines (IMAGEGEN_LOG_FORMAT)")
    p.add_argument("--event-loop", default=env("EVENT_LOOP", "auto"), choices=list(event_loop.CHOICES), help="auto: uvloop where installed, else asyncio's own (IMAGEGEN_EVENT_LOOP)")
    p.add_argument("--replicas", type=int, default=env("REPLICAS", 1), help="JetStream replicas of every stream, 3 on a cluster (IMAGEGEN_REPLICAS)")
    p.add_argument("--max-pixels", type=int, default=env("MAX_PIXELS", Limits().max_pixels), help="pixel budget per image (IMAGEGEN_MAX_PIXELS)")
    p.add_argument("--max-steps", type=int, default=env("MAX_STEPS", Limits().max_steps), help="most steps per image (IMAGEGEN_MAX_STEPS)")
    p.add_argument("--max-prompt-chars", type=int, default=env("MAX_PROMPT_CHARS", Limits().max_prompt_chars), help="longest prompt (IMAGEGEN_MAX_PROMPT_CHARS)")
    p.add_argument("--max-images", type=int, default=env("MAX_IMAGES", Limits().max_images), help="most images (n) per request (IMAGEGEN_MAX_IMAGES)")
    p.add_argument("--max-upload-bytes", type=int, default=env("MAX_UPLOAD_BYTES", Limits().max_upload_bytes), help="largest init or mask image (IMAGEGEN_MAX_UPLOAD_BYTES)")
    p.add_argument("--job-ttl", type=float, default=env("JOB_TTL", Topology().job_ttl_s), help="seconds status records and images are kept (IMAGEGEN_JOB_TTL)")
    p.add_argument("--ack-wait", type=float, default=env("ACK_WAIT", Topology().ack_wait_s), help="seconds a silent worker keeps a job before it is redelivered; the same on every process (IMAGEGEN_ACK_WAIT)")
    p.add_argument("--max-deliver", type=int, default=env("MAX_DELIVER", Topology().max_deliver), help="tries of a job before it is dead-lettered; the same on every process (IMAGEGEN_MAX_DELIVER)")
    p.add_argument("--images-max-bytes", type=int, default=env("IMAGES_MAX_BYTES", Topology().images_max_bytes), help="most bytes of images kept; a job whose image does not fit fails (IMAGEGEN_IMAGES_MAX_BYTES)")
    p.add_argument("--uploads-max-bytes", type=int, default=env("UPLOADS_MAX_BYTES", Topology().uploads_max_bytes), help="most bytes of uploaded init and mask images kept; past it uploads get 507 (IMAGEGEN_UPLOADS_MAX_BYTES)")
    p.add_argument("--cache-max-bytes", type=int, default=env("CACHE_MAX_BYTES", Topology().cache_max_bytes), help="most bytes of the result cache (IMAGEGEN_CACHE_MAX_BYTES)")
    p.add_argument("--status-max-bytes", type=int, default=env("STATUS_MAX_BYTES", Topology().status_max_bytes), help="most bytes of job records, and of ComfyUI prompts; past it submits get 507 (IMAGEGEN_STATUS_MAX_BYTES)")
    p.add_argument("--kv-max-bytes", type=int, default=env("KV_MAX_BYTES", Topology().kv_max_bytes), help="most bytes of each small KV bucket: rate limits, quotas, workers, config (IMAGEGEN_KV_MAX_BYTES)")


def add_gateway(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=env("HOST", "127.0.0.1"), help="address the gateway listens on (IMAGEGEN_HOST)")
    p.add_argument("--port", type=int, default=env("PORT", 4030), help="gateway port (IMAGEGEN_PORT)")
    p.add_argument("--api-keys", default=os.environ.get("IMAGEGEN_API_KEYS_FILE"), help="JSON file of API keys (hashes); auth is on when any key is configured; IMAGEGEN_API_KEYS may hold the JSON itself (IMAGEGEN_API_KEYS_FILE)")
    p.add_argument("--blocklist", default=env("BLOCKLIST", ""), help="comma-separated terms; prompts containing one are refused (IMAGEGEN_BLOCKLIST)")
    p.add_argument("--redact-prompts", action="store_true", default=env("REDACT_PROMPTS", "") not in ("", "0", "false"), help="audit records carry a hash instead of the prompt (IMAGEGEN_REDACT_PROMPTS)")
    p.add_argument("--default-timeout", type=float, default=env("DEFAULT_TIMEOUT", 0.0), help="seconds a job may wait in the queue when the request sets no timeout_s; 0: forever (IMAGEGEN_DEFAULT_TIMEOUT)")
    p.add_argument("--upload-bytes-per-key", type=int, default=env("UPLOAD_BYTES_PER_KEY", GatewaySettings().upload_bytes_per_key), help="bytes of uploaded images (ComfyUI's /upload/image) each API key may keep at once; past it 413 (IMAGEGEN_UPLOAD_BYTES_PER_KEY)")
    p.add_argument("--cache-ttl", type=float, default=env("CACHE_TTL", 24 * 3600.0), help="seconds an image answers identical requests (with a seed, or cache: true) from the result cache; 0: no cache (IMAGEGEN_CACHE_TTL)")
    p.add_argument("--webhook-secret", default=os.environ.get("IMAGEGEN_WEBHOOK_SECRET"), help="signs webhook calls (Standard Webhooks: whsec_ and base64, or any text); the same on every gateway (IMAGEGEN_WEBHOOK_SECRET)")
    p.add_argument("--webhook-allow-private", action="store_true", default=env("WEBHOOK_ALLOW_PRIVATE", "") not in ("", "0", "false"), help="webhooks may go to loopback, private and link-local addresses, for a closed network (IMAGEGEN_WEBHOOK_ALLOW_PRIVATE)")
    p.add_argument("--trust-proxy", type=proxy_list, default=env("TRUST_PROXY", ""), metavar="ADDR[,ADDR]", help="addresses or networks (10.0.0.0/8) of the reverse proxies in front; only from them are X-Forwarded-Proto and X-Forwarded-Host believed (the scheme and host of image URLs); * for any peer; default none (IMAGEGEN_TRUST_PROXY)")
    p.add_argument("--comfy-previews", action="store_true", default=env("COMFY_PREVIEWS", "") not in ("", "0", "false"), help="ComfyUI's /ws sends live previews as binary frames for every prompt, as ComfyUI does with a preview method on; without it only for prompts whose extra_data asks (preview_method auto, latent2rgb or taesd), as ComfyUI's default (none) does (IMAGEGEN_COMFY_PREVIEWS)")
    p.add_argument("--max-body-bytes", type=at_least_one, default=env("MAX_BODY_BYTES", GatewaySettings().max_body_bytes), help="largest body of a route that takes images inline (/v1/jobs, /api/generate, img2img, uploads); at least what two uploads of --max-upload-bytes need as base64 (IMAGEGEN_MAX_BODY_BYTES)")
    p.add_argument("--max-json-bytes", type=at_least_one, default=env("MAX_JSON_BYTES", GatewaySettings().max_json_bytes), help="largest body of every other route (IMAGEGEN_MAX_JSON_BYTES)")
    p.add_argument("--max-json-items", type=at_least_one, default=env("MAX_JSON_ITEMS", GatewaySettings().max_json_items), help="most keys and items in a JSON body, counted as its ',' and ':' while it arrives (IMAGEGEN_MAX_JSON_ITEMS)")
    p.add_argument("--body-timeout", type=float, default=env("BODY_TIMEOUT", GatewaySettings().body_timeout_s), help="seconds a request body may take to arrive; 408 after (IMAGEGEN_BODY_TIMEOUT)")
    p.add_argument("--header-timeout", type=float, default=env("HEADER_TIMEOUT", GatewaySettings().header_timeout_s), help="seconds a request's headers may take to arrive (from the connection's start, or the last answer on it; also how long an idle keep-alive connection stays); the connection is closed after (IMAGEGEN_HEADER_TIMEOUT)")
    p.add_argument("--max-connections", type=at_least_one, default=env("MAX_CONNECTIONS", GatewaySettings().max_connections), help="open connections per gateway (HTTP, WebSocket); one more is answered 503 with Retry-After (IMAGEGEN_MAX_CONNECTIONS)")
    p.add_argument("--cache-scope", default=env("CACHE_SCOPE", "key"), choices=["key", "global"], help="with API keys: key keeps each key's result-cache entries to itself; global shares them between keys (IMAGEGEN_CACHE_SCOPE)")
    p.add_argument("--submit-timeout", type=float, default=env("SUBMIT_TIMEOUT", GatewaySettings().submit_timeout_s), help="seconds a submit waits for the broker to take its job; unanswered (a cluster electing a leader): 503 with Retry-After, and submits are refused at once until the job stream has a leader (IMAGEGEN_SUBMIT_TIMEOUT)")


def add_worker(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=env("MODEL", "auto"), help="hub id, local folder, tiny-sdxl or simulated; auto: SDXL base with CUDA, tiny-sdxl without (IMAGEGEN_MODEL)")
    p.add_argument("--refiner", default=os.environ.get("IMAGEGEN_REFINER"), help="refiner hub id or folder (tiny-sdxl-refiner with tiny-sdxl) (IMAGEGEN_REFINER)")
    p.add_argument("--device", default=env("DEVICE", "auto"), help="cuda:N or cpu; one worker process per GPU (IMAGEGEN_DEVICE)")
    p.add_argument("--dtype", default=env("DTYPE", "auto"), choices=["auto", "fp32", "fp16", "bf16"], help="(IMAGEGEN_DTYPE)")
    p.add_argument("--threads", type=int, default=env("THREADS", 1), help="torch CPU threads (IMAGEGEN_THREADS)")
    p.add_argument("--refiner-split", type=float, default=env("REFINER_SPLIT", 0.8), help="with the refiner: fraction of the noise schedule the base denoises before handing over (IMAGEGEN_REFINER_SPLIT)")
    p.add_argument("--lora", dest="loras", action="append", default=env_list("LORAS"), metavar="NAME=SOURCE", help="load a LoRA adapter at start, from a folder, a .safetensors file or a hub id (owner/repo[:file]); repeatable; requests pick it by NAME (IMAGEGEN_LORAS, comma-separated)")
    p.add_argument("--vae", default=os.environ.get("IMAGEGEN_VAE"), help="another VAE, hub id or folder, e.g. madebyollin/sdxl-vae-fp16-fix (IMAGEGEN_VAE)")
    p.add_argument("--vae-dtype", default=env("VAE_DTYPE", "auto"), choices=["auto", "fp32", "fp16", "bf16"], help="dtype of the VAE decode; auto: bf16 for an fp16 model whose VAE overflows in fp16 (IMAGEGEN_VAE_DTYPE)")
    p.add_argument("--vae-tiling", default=env("VAE_TILING", "auto"), choices=["auto", "on", "off"], help="tiled VAE decode; auto: above 1536x1536 pixels (IMAGEGEN_VAE_TILING)")
    p.add_argument("--offload", action="store_true", default=env_flag("OFFLOAD"), help="model CPU offload, only for GPUs too small for the pipeline; slower (IMAGEGEN_OFFLOAD=1)")
    p.add_argument("--compile", default=env("COMPILE", "auto"), choices=["auto", "on", "off"], help="torch.compile the UNets; auto: on with CUDA (IMAGEGEN_COMPILE)")
    p.add_argument("--compile-mode", default=env("COMPILE_MODE", "default"), choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"], help="(IMAGEGEN_COMPILE_MODE)")
    p.add_argument("--compile-buckets", default=env("COMPILE_BUCKETS", DEFAULT_BUCKETS), metavar="WxH,...", help="sizes compiled and warmed up at start; other sizes run uncompiled, never recompiling (IMAGEGEN_COMPILE_BUCKETS)")
    p.add_argument("--max-batch", type=at_least_one, default=os.environ.get("IMAGEGEN_MAX_BATCH", "1"), help="most images one engine call makes: up to this many compatible queued jobs (same size, steps, sampler, refiner, LoRAs; a request's n images are) run together; 1: one at a time (IMAGEGEN_MAX_BATCH)")
    p.add_argument("--quantize", default=env("QUANTIZE", "none"), choices=["none", "fp8"], help="fp8: the UNets' attention and feed-forward layers in float8 (torchao; GPUs of compute capability 8.9+, e.g. H100); refused elsewhere (IMAGEGEN_QUANTIZE)")
    p.add_argument("--compile-cache", default=env("COMPILE_CACHE", ""), metavar="DIR", help="folder for torch.compile's artifacts, reused at the next start; default: <data dir>/compile-cache (IMAGEGEN_COMPILE_CACHE)")
    p.add_argument("--channels-last", default=env("CHANNELS_LAST", "auto"), choices=["auto", "on", "off"], help="channels-last memory layout; auto: on with CUDA (IMAGEGEN_CHANNELS_LAST)")
    p.add_argument("--fuse-qkv", default=env("FUSE_QKV", "auto"), choices=["auto", "on", "off"], help="fused QKV attention projections; auto: on with CUDA unless LoRAs are loaded (IMAGEGEN_FUSE_QKV)")
    p.add_argument("--worker-id", default=os.environ.get("IMAGEGEN_WORKER_ID"), help="name in the worker registry (IMAGEGEN_WORKER_ID)")
    p.add_argument("--fairness", type=at_least_one, default=os.environ.get("IMAGEGEN_FAIRNESS", str(DEFAULT_FAIRNESS)), help="after this many jobs in a row taken from higher tiers while a lower one waited, the next comes from the lowest tier with work (IMAGEGEN_FAIRNESS)")
    p.add_argument("--preview-every", type=int, default=env("PREVIEW_EVERY", 5), help="a preview image every N steps, 0 for none (IMAGEGEN_PREVIEW_EVERY)")
    p.add_argument("--metrics-port", type=int, default=env("METRICS_PORT", 0), help="serve the worker's Prometheus /metrics on this port; 0: off (IMAGEGEN_METRICS_PORT)")
    p.add_argument("--metrics-host", default=env("METRICS_HOST", "127.0.0.1"), help="address the worker's metrics port listens on (IMAGEGEN_METRICS_HOST)")
    p.add_argument("--safety-checker", default=os.environ.get("IMAGEGEN_SAFETY_CHECKER"), metavar="PATH|HUB_ID|MODULE:FACTORY", help="NSFW check of every image: a StableDiffusionSafetyChecker folder or hub id (e.g. CompVis/stable-diffusion-safety-checker), or a plug-in factory; off when unset (IMAGEGEN_SAFETY_CHECKER)")
    p.add_argument("--nsfw-action", default=env("NSFW_ACTION", "blank"), choices=["blank", "reject"], help="a flagged image: blank (a black image, status nsfw: true) or reject (the job fails) (IMAGEGEN_NSFW_ACTION)")
    p.add_argument("--max-gpu-temp", type=float, default=env("MAX_GPU_TEMP", 85.0), help="degrees C at which the worker takes no new job (NVML); 0: no guard (IMAGEGEN_MAX_GPU_TEMP)")
    p.add_argument("--resume-gpu-temp", type=float, default=env("RESUME_GPU_TEMP", 75.0), help="degrees C at or below which a paused worker takes jobs again (IMAGEGEN_RESUME_GPU_TEMP)")
    p.add_argument("--sim-step-s", type=float, default=env("SIM_STEP_S", 0.05), help="simulated engine: seconds per step (IMAGEGEN_SIM_STEP_S)")
    p.add_argument("--sim-fail-marker", default=env("SIM_FAIL_MARKER", ""), help="simulated engine: a prompt containing this text crashes it, for testing retries (IMAGEGEN_SIM_FAIL_MARKER)")
    p.add_argument("--data-dir", default=str(default_data_dir()), help="where built models (and up's server store) live (IMAGEGEN_DATA_DIR)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagegen", description="SDXL image generation over NATS JetStream")
    parser.add_argument("--version", action="version", version=f"imagegen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="all in one: embedded nats-server (unless --nats), a gateway and a worker")
    add_common(up), add_gateway(up), add_worker(up)
    up.add_argument("--nats-port", type=int, default=int(os.environ["IMAGEGEN_NATS_PORT"]) if os.environ.get("IMAGEGEN_NATS_PORT") else None, help="port of the embedded nats-server; unset: 4222, or a free port when 4222 is busy (IMAGEGEN_NATS_PORT)")
    gw = sub.add_parser("gateway", help="run a gateway (HTTP and WebSocket) against NATS")
    add_common(gw), add_gateway(gw)
    wk = sub.add_parser("worker", help="run one worker (one per GPU) against NATS")
    add_common(wk), add_worker(wk)
    key = sub.add_parser("key", help="make a new API key and print its entry for the keys file")
    key.add_argument("name", help="who the key is for")
    key.add_argument("--tiers", default="normal,low", help="tiers it may use, comma-separated")
    key.add_argument("--rate-per-minute", type=int, default=60)
    key.add_argument("--max-concurrent", type=int, default=8)
    gen = sub.add_parser("generate", help="generate an image through a running gateway")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", default="out.png", help="file to write; the format follows its extension")
    gen.add_argument("--url", default=env("URL", "http://127.0.0.1:4030"), help="gateway URL (IMAGEGEN_URL)")
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--steps", type=int, default=None)
    gen.add_argument("--seed", default=None)
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--init-image", default=None, help="image-to-image: the picture to start from (a file)")
    gen.add_argument("--mask-image", default=None, help="inpainting: a mask file, white where to redraw")
    gen.add_argument("--strength", type=float, default=None, help="image-to-image: how much to change it, 0..1 (0.4)")
    gen.add_argument("-n", type=int, default=1, help="how many images: OUTPUT, then OUTPUT-2, ... (seeds seed, seed+1, ...)")
    gen.add_argument("--model", default=None, help="one of the models the workers serve (GET /api/ls); the current one when absent")
    gen.add_argument("--tier", default=None, choices=["high", "normal", "low"], help="priority tier (your key must allow it)")
    gen.add_argument("--api-key", default=os.environ.get("IMAGEGEN_API_KEY"), help="(IMAGEGEN_API_KEY)")
    return parser


def limits_of(args: argparse.Namespace) -> Limits:
    return Limits(
        max_pixels=args.max_pixels, max_steps=args.max_steps, max_prompt_chars=args.max_prompt_chars,
        max_images=args.max_images, max_upload_bytes=args.max_upload_bytes,
    )


def topology_of(args: argparse.Namespace) -> Topology:
    return Topology(
        replicas=args.replicas, job_ttl_s=args.job_ttl, ack_wait_s=args.ack_wait, max_deliver=args.max_deliver,
        images_max_bytes=args.images_max_bytes, uploads_max_bytes=args.uploads_max_bytes,
        cache_max_bytes=args.cache_max_bytes, status_max_bytes=args.status_max_bytes, kv_max_bytes=args.kv_max_bytes,
    )


def gateway_settings(args: argparse.Namespace, nats_url: str) -> GatewaySettings:
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(args, "event_loop"):
        try:
            event_loop.resolve(args.event_loop)
        except (event_loop.EventLoopUnavailable, ValueError) as exc:
            parser.error(f"--event-loop (IMAGEGEN_EVENT_LOOP): {exc}")
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
