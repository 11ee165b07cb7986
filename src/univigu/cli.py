"""The `univigu` command. Each subcommand lives in `univigu.commands.<name>` and registers itself."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = ("data", "train", "generate", "caption", "joint", "eval", "convert", "demo", "serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="univigu",
        description="Unified video generation and understanding with one diffusion model (Uni-ViGU).",
        epilog="Run `univigu COMMAND --help` for the options and an example of each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"univigu.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"univigu.commands.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:  # our errors subclass ValueError: one clear line
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
