"""`univigu serve`: the web demo (T2V, V2T, joint) in the browser, on any model directory."""

from __future__ import annotations

import argparse
import atexit
import signal
import sys
from pathlib import Path

from .generate import CommandError

# Where `make demo` (`univigu demo`, default --out runs/demo) writes its unified model.
DEMO_MODEL = Path("runs/demo/capability_refinement/model")

EPILOG = """\
examples:
  univigu serve                                   # the model `make demo` made, else the shipped generator
  univigu serve --ckpt_dir runs/unified/model --port 8080
  univigu serve --host 0.0.0.0                    # reachable from other machines (no authentication!)

Open http://127.0.0.1:7860 (the default). Works without internet: nothing is fetched from outside,
no share link is made. Uploads go to a temporary folder, are deleted once read, and the folder is
removed when the server stops.
"""


def default_model_dir() -> Path:
    """The model `make demo` produced (in the current folder), or the shipped generator."""
    if (DEMO_MODEL / "model_index.json").is_file():
        return DEMO_MODEL
    from .demo import shipped_generator_dir

    return shipped_generator_dir()


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="web demo: T2V, captioning and joint generation in the browser",
        description="Serve a web page (Gradio) with three tabs: text-to-video, video-to-text and joint "
                    "generation, on one model directory. Needs the web extra: pip install -e \".[web]\".",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt_dir", default=None, metavar="DIR",
                        help=f"model directory (default: {DEMO_MODEL} when `make demo` made it, "
                             "else the shipped ShapesWorld generator)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                        help="compute dtype (default auto: bf16 on CUDA / AVX-512 CPUs, else fp32)")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="model jobs run at once (default 1); the others wait in the queue")
    parser.add_argument("--max_queue", type=int, default=16, help="requests waiting at most (default 16)")
    parser.add_argument("--max_upload_mb", type=float, default=50, help="largest upload in MB (default 50)")
    parser.add_argument("--max_seconds", type=float, default=60,
                        help="longest video to caption, in seconds (default 60)")
    parser.set_defaults(func=run)


def check_args(args) -> Path:
    if not 0 <= args.port <= 65535:
        raise CommandError(f"--port must be 0-65535, got {args.port}")
    for name in ("concurrency", "max_queue"):
        if getattr(args, name) < 1:
            raise CommandError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.max_upload_mb <= 0 or args.max_seconds <= 0:
        raise CommandError("--max_upload_mb and --max_seconds must be positive")
    directory = Path(args.ckpt_dir) if args.ckpt_dir else default_model_dir()
    if not directory.is_dir():
        raise CommandError(f"model directory not found: {directory}" if not directory.exists()
                           else f"--ckpt_dir must be a model directory, got a file: {directory}")
    return directory


def run(args: argparse.Namespace) -> int:
    directory = check_args(args)
    from ..web.app import prepare_upload_folder, remove_folder

    upload_dir = prepare_upload_folder()  # before Gradio is imported
    atexit.register(remove_folder, upload_dir)
    # A plain `kill` ends the server like Ctrl+C does: through the atexit hook that removes the folder.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    from ..pipeline import UniViGUPipeline
    from ..web.app import build_app, launch

    pipe = UniViGUPipeline.from_pretrained(directory, device=args.device, dtype=args.dtype)
    pipe.encode_prompts(["warm up"])  # load the prompt encoder now, not on the first request
    app = build_app(pipe, upload_dir, model_name=str(directory), concurrency=args.concurrency,
                    max_queue=args.max_queue, max_upload_mb=args.max_upload_mb, max_seconds=args.max_seconds)
    print(f"univigu serve: {directory} on http://{args.host}:{args.port} (Ctrl+C stops)", flush=True)
    launch(app, args.host, args.port, max_upload_mb=args.max_upload_mb)
    return 0
