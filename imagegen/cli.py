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
from imagegen import __version__, event_loop
from imagegen.flags import add_settings, build_settings
from imagegen.logs import configure as configure_logging
from imagegen.paths import default_data_dir
from schemas.request import SCHEDULERS

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
        if default is None or default is False or default in ("", [], (), argparse.SUPPRESS) or not action.option_strings:
            return text
        shown = str(default).replace("%", "%%")
        found = ENV_NOTE.search(text)
        if found:
            return text[: found.start()] + f" (default: {shown}; {found.group(1)}{found.group(2)})"
        return f"{text} (default: {shown})"


def add_common(p: argparse.ArgumentParser) -> None:
    """The flags of the process itself (not settings of a part): its log and its event loop."""
    section(p, "operations").add_argument("--log-level", default=env("LOG_LEVEL", "INFO"), help="DEBUG, INFO, WARNING (IMAGEGEN_LOG_LEVEL)")
    section(p, "operations").add_argument("--log-format", default=env("LOG_FORMAT", "text"), choices=["text", "json"], help="text lines, or one JSON object per line with job_id on job lines (IMAGEGEN_LOG_FORMAT)")
    section(p, "operations").add_argument("--event-loop", default=env("EVENT_LOOP", "auto"), choices=list(event_loop.CHOICES), help="auto: uvloop where installed, else asyncio's own (IMAGEGEN_EVENT_LOOP)")


def add_gateway(p: argparse.ArgumentParser) -> None:
    from gateway.settings import GatewaySettings

    add_settings(lambda name: section(p, name), p, GatewaySettings)


def add_worker(p: argparse.ArgumentParser) -> None:
    add_settings(lambda name: section(p, name), p, WorkerSettings, defaults={"data_dir": str(default_data_dir())})


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


def gateway_settings(args: argparse.Namespace, nats_url: str) -> GatewaySettings:
    from gateway.settings import GatewaySettings

    return build_settings(GatewaySettings, args, nats_url=nats_url)


def worker_settings(args: argparse.Namespace, nats_url: str) -> WorkerSettings:
    return build_settings(WorkerSettings, args, nats_url=nats_url)


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
