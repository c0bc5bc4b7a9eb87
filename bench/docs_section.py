"""Let several benchmarks share docs/PERFORMANCE.md: each owns a marked section.

A section is the text between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`. `replace_section`
rewrites only that text, appends the section (markers included) at the end if it is not there yet,
and creates the file with a `# Performance` title if it does not exist. The write is atomic
(temp file + rename), so a benchmark that fails half-way never leaves a truncated document.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

TITLE = "# Performance\n"


def markers(name: str) -> tuple[str, str]:
    """The opening and closing marker lines of section `name`."""
    return f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"


def replace_section(path: Path, name: str, markdown: str) -> None:
    """Put `markdown` into section `name` of the file at `path` (see module docstring)."""
    path = Path(path)
    start, end = markers(name)
    block = f"{start}\n{markdown.strip(chr(10))}\n{end}"
    text = path.read_text() if path.exists() else TITLE
    i = text.find(start)
    if i >= 0:
        j = text.find(end, i + len(start))
        if j < 0:
            raise ValueError(f"{path}: {start} has no matching {end}; fix the file by hand")
        text = text[:i] + block + text[j + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
