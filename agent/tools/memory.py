"""The workspace memory: a small, bounded, deduplicated file of audit lines later runs read.

Invariant: `read()` is the file's distinct lines, each where it last appears, the newest
`max_lines` of them. `add` appends its line in one write, under a lock other writers take too,
and rewrites the file to just what `read()` returns (a new file renamed over it) once it holds
more than twice `max_lines` lines: a rewrite costs the file system a flush of the new file, an
append a few microseconds. A reader never sees half a file; an append in progress is at most
a last line without its line break, which `read()` leaves for the next look.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from itertools import islice
from pathlib import Path

MAX_LINE_CHARS = 300


class WorkspaceMemory:
    """At most `max_lines` distinct one-line entries, newest last; older ones fall off."""

    def __init__(self, path: Path, max_lines: int) -> None:
        self.path = path
        self.max_lines = max_lines

    def read(self) -> list[str]:
        """The remembered lines, oldest first (empty when there is no file yet)."""
        text = self._text()
        return _latest(text[: text.rfind("\n") + 1].splitlines(), self.max_lines)

    def add(self, entry: str) -> int:
        """Remember one entry (folded to one short line); returns the number of lines kept."""
        line = " ".join(entry.split())[:MAX_LINE_CHARS]
        if not line:
            return len(self.read())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_suffix(self.path.suffix + ".lock")
        # The lock keeps two processes from losing each other's lines.
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            text = self._text()
            # A line someone wrote without its line break stays a line of its own.
            appended = ("\n" if text and not text.endswith("\n") else "") + line + "\n"
            lines = (text + appended).splitlines()
            kept = _latest(lines, self.max_lines)
            if len(lines) > 2 * self.max_lines:
                self._rewrite(kept)
            else:
                descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(descriptor, appended.encode("utf-8"))
                finally:
                    os.close(descriptor)
        return len(kept)

    def _text(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def _rewrite(self, lines: list[str]) -> None:
        # The rename keeps a reader from ever seeing half a file.
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".memory-")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write("".join(f"{line}\n" for line in lines))
        os.replace(tmp, self.path)


def _latest(lines: list[str], count: int) -> list[str]:
    """The distinct non-blank `lines`, each where it last appears, the newest `count`."""
    newest_first = dict.fromkeys(filter(str.strip, reversed(lines)))
    return list(islice(newest_first, count))[::-1]
