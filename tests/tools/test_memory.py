"""WorkspaceMemory: a small, bounded, deduplicated file of audit lines later runs read."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.tools.memory import MAX_LINE_CHARS, WorkspaceMemory


def test_missing_file_reads_as_empty_and_add_creates_it(tmp_path: Path) -> None:
    path = tmp_path / "not" / "there" / "memory.txt"
    memory = WorkspaceMemory(path, max_lines=5)
    assert memory.read() == []
    assert memory.add("first entry") == 1
    assert path.read_text() == "first entry\n"
    assert memory.read() == ["first entry"]


def test_file_deleted_between_uses(tmp_path: Path) -> None:
    memory = WorkspaceMemory(tmp_path / "memory.txt", max_lines=5)
    memory.add("one")
    (tmp_path / "memory.txt").unlink()
    assert memory.read() == []
    assert memory.add("two") == 1
    assert memory.read() == ["two"]


def test_bounded_to_max_lines_newest_last(tmp_path: Path) -> None:
    memory = WorkspaceMemory(tmp_path / "memory.txt", max_lines=3)
    counts = [memory.add(f"entry {i}") for i in range(6)]
    assert counts == [1, 2, 3, 3, 3, 3]
    assert memory.read() == ["entry 3", "entry 4", "entry 5"]


def test_an_entry_is_appended_and_the_file_rewritten_only_past_twice_its_bound(
    tmp_path: Path,
) -> None:
    """Below twice `max_lines` lines an entry is appended to the same file; past it, the file
    is rewritten to what is kept, so it never holds more than twice `max_lines` lines."""
    path = tmp_path / "memory.txt"
    memory = WorkspaceMemory(path, max_lines=3)
    memory.add("entry 0")
    inode = path.stat().st_ino
    for i in range(1, 6):
        memory.add(f"entry {i}")
    assert path.stat().st_ino == inode  # appended: six lines, twice the bound
    memory.add("entry 6")
    assert path.read_text() == "entry 4\nentry 5\nentry 6\n"
    for i in range(7, 100):
        memory.add(f"entry {i % 5}")
        assert len(path.read_text().splitlines()) <= 6
    assert memory.read() == ["entry 2", "entry 3", "entry 4"]


def test_a_line_being_written_is_left_for_the_next_look(tmp_path: Path) -> None:
    """A last line without its line break (an append in progress) is not read yet; one a
    person wrote that way stays a line of its own when the next entry is added."""
    path = tmp_path / "memory.txt"
    path.write_text("first\nsecond, still being writ")
    memory = WorkspaceMemory(path, max_lines=5)
    assert memory.read() == ["first"]
    assert memory.add("third") == 3
    assert memory.read() == ["first", "second, still being writ", "third"]


def test_re_adding_moves_the_entry_to_the_end(tmp_path: Path) -> None:
    memory = WorkspaceMemory(tmp_path / "memory.txt", max_lines=5)
    for entry in ["a", "b", "c"]:
        memory.add(entry)
    assert memory.add("a") == 3
    assert memory.read() == ["b", "c", "a"]
    memory.add("  a \n")  # the same line once folded
    assert memory.read() == ["b", "c", "a"]


def test_multi_line_entries_are_folded_into_one_line(tmp_path: Path) -> None:
    memory = WorkspaceMemory(tmp_path / "memory.txt", max_lines=5)
    memory.add("inc-1: runbook done\n  steps:\tpods, top\r\n\nscale-out approved\u2028end")
    assert memory.read() == ["inc-1: runbook done steps: pods, top scale-out approved end"]


def test_long_entries_are_capped(tmp_path: Path) -> None:
    memory = WorkspaceMemory(tmp_path / "memory.txt", max_lines=5)
    memory.add("x" * (MAX_LINE_CHARS * 3))
    assert memory.read() == ["x" * MAX_LINE_CHARS]


def test_blank_entries_are_not_remembered(tmp_path: Path) -> None:
    memory = WorkspaceMemory(tmp_path / "memory.txt", max_lines=5)
    assert memory.add(" \n\t ") == 0
    assert not (tmp_path / "memory.txt").exists()
    memory.add("kept")
    assert memory.add("\n") == 1
    assert memory.read() == ["kept"]


def test_read_honours_max_lines_of_a_longer_file(tmp_path: Path) -> None:
    path = tmp_path / "memory.txt"
    path.write_text("".join(f"line {i}\n\n" for i in range(10)))
    memory = WorkspaceMemory(path, max_lines=4)
    assert memory.read() == ["line 6", "line 7", "line 8", "line 9"]
    memory.add("new")
    assert path.read_text() == "line 7\nline 8\nline 9\nnew\n"


def test_no_temporary_files_are_left_behind(tmp_path: Path) -> None:
    memory = WorkspaceMemory(tmp_path / "memory.txt", max_lines=2)
    for i in range(5):
        memory.add(f"entry {i}")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".memory-")]


def _fold(entry: str) -> str:
    """What WorkspaceMemory is documented to store for one entry."""
    return " ".join(entry.split())[:MAX_LINE_CHARS]


@settings(max_examples=100, deadline=None)
@given(
    st.integers(min_value=1, max_value=6),
    st.lists(
        st.one_of(
            st.sampled_from(["a", "b", "c", " a ", "b\nb", ""]),
            st.text(max_size=2 * MAX_LINE_CHARS // 3),
        ),
        max_size=20,
    ),
)
def test_memory_behaves_like_a_bounded_deduplicated_list(
    max_lines: int, entries: list[str]
) -> None:
    model: list[str] = []
    with tempfile.TemporaryDirectory() as directory:
        memory = WorkspaceMemory(Path(directory) / "memory.txt", max_lines)
        for entry in entries:
            line = _fold(entry)
            if line:
                model = [*(m for m in model if m != line), line][-max_lines:]
            assert memory.add(entry) == len(model)
        lines = memory.read()
    assert lines == model
    assert len(lines) <= max_lines
    assert len(set(lines)) == len(lines)
    assert all(len(line) <= MAX_LINE_CHARS and len(line.splitlines()) == 1 for line in lines)
