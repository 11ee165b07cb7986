"""The `univigu` command. Each subcommand lives in `univigu.commands.<name>` and registers itself."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

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


TRACEBACK_ENV = "UNIVIGU_TRACEBACK"  # set to 1 to see the traceback of an unexpected error


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {_one_line(message)}\n"


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded at run time
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    shown = warnings.formatwarning
    warnings.formatwarning = _format_warning  # warnings are one line too
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:  # our errors subclass ValueError: one clear line
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except OSError as err:  # the system refused something (a full disk, a read-only place, ...)
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug: still one line, the traceback on request
        if os.environ.get(TRACEBACK_ENV):
            raise
        print(f"error: unexpected {type(err).__name__}: {_one_line(err)} (set {TRACEBACK_ENV}=1 for the "
              "traceback)", file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = shown


if __name__ == "__main__":
    sys.exit(main())
