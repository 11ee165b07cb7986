"""Frame sizes on the command line: `--size W*H` (also `WxH`), width first as in Wan's CLI."""

from __future__ import annotations

import re


class SizeError(ValueError):
    """A --size value that is not W*H."""


def parse_frame_size(text: str | None) -> tuple[int | None, int | None]:
    """'32*32' or '48x32' -> (width, height); None -> (None, None)."""
    if text is None:
        return None, None
    match = re.fullmatch(r"\s*(\d+)\s*[*xX]\s*(\d+)\s*", text)
    if not match:
        raise SizeError(f"--size must look like W*H (width*height, e.g. 32*32), got {text!r}")
    return int(match.group(1)), int(match.group(2))
