"""``autoexit evaluator serve|probe``: run the device evaluator, or check one.

``register`` is imported by ``autoexit.cli`` and must stay cheap: fastapi,
uvicorn and torch are imported by the handlers only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import AutoExitError
from .protocol import DEFAULT_HOST, DEFAULT_PORT, TOKEN_ENV


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default=DEFAULT_HOST,
                   help=f"address to listen on (default {DEFAULT_HOST}; anything but loopback needs --token-file)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT})")
    p.add_argument("--token-file", metavar="FILE",
                   help="file holding the bearer token clients must send (required unless on loopback)")
    p.add_argument("--device-key", default="local", metavar="KEY",
                   help="name of this device in results and registries, e.g. rpi4, jetson-nano (default local)")
    p.add_argument("--max-upload-mb", type=float, default=256.0, metavar="MB",
                   help="refuse request bodies larger than this with 413 (default 256)")
    p.add_argument("--max-timeout-s", type=float, default=900.0, metavar="S",
                   help="largest settings.timeout_s a request may ask for (default 900)")
    p.add_argument("--max-input-elements", type=int, default=None, metavar="N",
                   help="largest input tensor (elements, batch included) a request may ask for (default 2^26)")
    p.add_argument("--max-queue", type=int, default=32, metavar="N",
                   help="measurements allowed to wait for the device before 429 (default 32)")
    p.add_argument("--cache-file", metavar="FILE",
                   help="results cache, JSON lines (default $AUTOEXIT_CACHE or ~/.cache/autoexit, "
                   "then evaluator/<device-key>.jsonl)")
    p.add_argument("--no-cache", action="store_true", help="keep results in memory only")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="default intra-op threads for measurements (requests may override; default: all cores)")
    p.add_argument("--no-isolate", action="store_true",
                   help="measure inside the server process (no worker process; a hung model hangs the server)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def register(subparsers) -> None:
    ev = subparsers.add_parser(
        "evaluator",
        help="device latency evaluator: serve on a device, or probe one",
        description="Measure model latency on a real device (Raspberry Pi, Jetson). See docs/evaluator.md.",
    )
    sub = ev.add_subparsers(dest="evaluator_command", metavar="ACTION")

    serve = sub.add_parser("serve", help="run the evaluator server on this device",
                           description="Run the evaluator server (needs: pip install 'autoexit[device]').")
    add_serve_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    probe = sub.add_parser("probe", help="check an evaluator: device info and a tiny timing",
                           description="Call GET /info on an evaluator and time a tiny model there.")
    probe.add_argument("url", help=f"evaluator URL, e.g. http://raspberrypi.local:{DEFAULT_PORT}")
    probe.add_argument("--token-file", metavar="FILE", help=f"bearer token file (or set ${TOKEN_ENV})")
    probe.add_argument("--no-timing", action="store_true", help="only call /info")
    probe.add_argument("--json", action="store_true", help="print JSON instead of text")
    probe.set_defaults(func=cmd_probe)

    def _help(args) -> int:
        ev.print_help()
        return 2

    ev.set_defaults(func=_help)


def config_from_args(args: argparse.Namespace):
    from .protocol import DEFAULT_MAX_INPUT_ELEMENTS
    from .server import ServerConfig, default_cache_file, read_token_file

    token = read_token_file(args.token_file) if args.token_file else None
    if args.max_upload_mb <= 0:
        raise AutoExitError("--max-upload-mb must be positive")
    if args.max_timeout_s <= 0:
        raise AutoExitError("--max-timeout-s must be positive")
    if args.max_queue < 1:
        raise AutoExitError("--max-queue must be at least 1")
    if args.threads is not None and args.threads < 1:
        raise AutoExitError("--threads must be at least 1")
    max_elems = args.max_input_elements or DEFAULT_MAX_INPUT_ELEMENTS
    if max_elems < 1:
        raise AutoExitError("--max-input-elements must be positive")
    cache_file = None
    if not args.no_cache:
        cache_file = Path(args.cache_file).expanduser() if args.cache_file else default_cache_file(args.device_key)
    return ServerConfig(
        host=args.host,
        port=args.port,
        token=token,
        device_key=args.device_key,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        max_timeout_s=args.max_timeout_s,
        max_input_elements=max_elems,
        max_queue=args.max_queue,
        cache_file=cache_file,
        isolate=not args.no_isolate,
        threads=args.threads,
        log_level=args.log_level,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from ..errors import require

    require("fastapi", "device", "the evaluator server")
    require("uvicorn", "device", "the evaluator server")
    from .server import serve

    serve(config_from_args(args))
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from .client import RemoteEvaluator
    from .protocol import MeasureSettings

    ev = RemoteEvaluator(args.url, token_file=args.token_file, retries=1)
    info = ev.server_info(refresh=True)
    out: dict = {"url": ev.url, "info": info}
    if not args.no_timing:
        import warnings

        import torch

        warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit deprecation notices
        tiny = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)))
        res = ev.measure(tiny, input_shapes=(64,), batch_sizes=(1, 8),
                         settings=MeasureSettings(warmup=3, repeat=10, min_repeat_ms=20, timeout_s=60))
        out["timing"] = res.to_dict()
        summary = res.summary()
    if args.json:
        json.dump(out, sys.stdout, indent=2)
        print()
        return 0
    dev = ev.info()
    print(f"{ev.url}: {dev.describe()}")
    print(f"  formats: {', '.join(info.get('formats', []))}; token required: {info.get('auth_required')}; "
          f"cached results: {info.get('cache_entries')}; worker: {info.get('worker')}")
    if not args.no_timing:
        print(f"  tiny MLP: {summary}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m autoexit.evaluator``: the serve command on its own."""
    parser = argparse.ArgumentParser(prog="python -m autoexit.evaluator",
                                     description="Run the autoexit device evaluator server.")
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_serve(args)
    except AutoExitError as exc:
        print(f"autoexit: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
