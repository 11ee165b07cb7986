"""No block of 6 or more lines is repeated in src/ (beyond a short, reviewed list): copies of the
same code drift apart, so a policy written twice should have one home instead.

Like pylint's similarity checker, lines are compared stripped, and blank lines, comments,
docstrings and imports are left out; a repeated block is reported once with every place it occurs.
"""

from __future__ import annotations

import ast
import io
import tokenize
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "univigu"
MIN_LINES = 6
# Reviewed repeats: (file, first line's text) of blocks allowed to stay. generate and joint end
# their argument registration and start `run` alike (seed, outputs, loading): flag wiring, no policy.
ALLOWED: set[tuple[str, str]] = {
    ("univigu/commands/generate.py", "parser.set_defaults(func=run)"),
    ("univigu/commands/joint.py", "parser.set_defaults(func=run)"),
}


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, stripped text) of the lines that count."""
    source = path.read_text()
    skip: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            skip.update(range(node.lineno, node.end_lineno + 1))
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            skip.update(range(body[0].lineno, body[0].end_lineno + 1))  # a docstring
    comments = {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                if tok.type == tokenize.COMMENT}
    out = []
    for number, line in enumerate(source.splitlines(), start=1):
        text = line.strip()
        if number in skip or not text or (text.startswith("#") and number in comments):
            continue
        if number in comments:  # code with a trailing comment: compare the code
            text = text.split("#", 1)[0].rstrip()
        out.append((number, text))
    return out


def repeated_blocks(root: Path = SRC, size: int = MIN_LINES) -> list[list[tuple[str, int]]]:
    """Every run of `size` counted lines that occurs more than once: [(file, first line), ...]."""
    where: dict[tuple[str, ...], list[tuple[str, int]]] = defaultdict(list)
    for path in sorted(root.rglob("*.py")):
        lines = _code_lines(path)
        name = str(path.relative_to(root.parent))
        for i in range(len(lines) - size + 1):
            window = tuple(text for _, text in lines[i:i + size])
            if sum(len(t) > 3 for t in window) < size // 2:  # mostly brackets: not a real block
                continue
            where[window].append((name, lines[i][0]))
    repeats = [places for places in where.values() if len({p for p in places}) > 1]
    # Overlapping windows of one long copy are one repeat: keep the first window of each run.
    starts = {p for places in repeats for p in places}
    firsts = []
    for places in sorted(repeats):
        if not all(any(f == file and 0 < line - g <= size for f, g in starts) for file, line in places):
            firsts.append(places)
    return firsts


def _first_line(place: tuple[str, int]) -> str:
    file, line = place
    return (SRC.parent / file).read_text().splitlines()[line - 1].strip()


def test_no_repeated_blocks_in_src():
    repeats = [places for places in repeated_blocks()
               if not all((file, _first_line((file, line))) in ALLOWED for file, line in places)]
    report = "\n".join(" = ".join(f"{f}:{n}" for f, n in places) for places in repeats)
    assert not repeats, f"{len(repeats)} repeated block(s) of {MIN_LINES}+ lines:\n{report}"


def test_the_check_finds_a_copied_block(tmp_path):
    block = "\n".join(f"    value_{i} = compute(value_{i - 1}, {i})" for i in range(1, 8))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text(f"def f():\n{block}\n")
    (tmp_path / "pkg" / "b.py").write_text(f'def g():\n    """doc"""\n    # a comment\n{block}\n')
    found = repeated_blocks(tmp_path / "pkg")
    assert [sorted(f for f, _ in places) for places in found] == [["pkg/a.py", "pkg/b.py"]]
