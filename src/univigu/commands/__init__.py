"""Subcommands of the `univigu` CLI: each module exposes `register(subparsers)`."""
