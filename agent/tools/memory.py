"""The workspace memory: a small, bounded, deduplicated file of audit lines later runs read."""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path

MAX_LINE_CHARS = 300


class WorkspaceMemory:
    """At most `max_lines` distinct one-line entries, newest last; older ones fall off."""

    def __init__(self, path: Path, max_lines: int) -> None:
        self.path = path
        self.max_lines = max_lines

    def read(self) -> list[str]:
        """The remembered lines, oldest first (empty when there is no file yet)."""
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return []
        return [line for line in text.splitlines() if line.strip()][-self.max_lines :]

    def add(self, entry: str) -> int:
        """Remember one entry (folded to one short line); returns the number of lines kept."""
        line = " ".join(entry.split())[:MAX_LINE_CHARS]
        if not line:
            return len(self.read())
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_suffix(self.path.suffix + ".lock")
        # The lock keeps two processes from losing each other's lines; the rename keeps a
        # reader from ever seeing half a file.
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            lines = [existing for existing in self.read() if existing != line]
            lines.append(line)
            lines = lines[-self.max_lines :]
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".memory-")
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write("\n".join(lines) + "\n")
            os.replace(tmp, self.path)
        return len(lines)
