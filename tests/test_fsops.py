"""File operations deliveries are built from: no-clobber names, copies that keep holes."""

from __future__ import annotations

import os
from pathlib import Path

from watcher.fsops import copy_to_new_file, noclobber_names


def test_noclobber_names_keep_extension_and_255_bytes() -> None:
    nth = noclobber_names("photo.jpg")
    assert [nth(0), nth(1), nth(12)] == ["photo.jpg", "photo (1).jpg", "photo (12).jpg"]
    long = noclobber_names("é" * 125 + ".txt")
    assert all(len(os.fsencode(long(n))) <= 255 for n in range(0, 200, 7))
    assert noclobber_names(".bashrc")(1) == ".bashrc (1)"


def test_a_copy_keeps_the_holes_of_a_sparse_file(tmp_path: Path) -> None:
    """Issue 11.6: a copy (between mounts, or a private copy) never fills an upload's holes."""
    source = tmp_path / "sparse.bin"
    with open(source, "wb") as f:
        f.truncate(8 << 30)
        f.seek(4 << 30)
        f.write(b"middle")
    src = os.open(source, os.O_RDONLY)
    out_dir = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        copy_to_new_file(src, out_dir, "copy.bin", 0o640)
    finally:
        os.close(src)
        os.close(out_dir)
    copy = tmp_path / "copy.bin"
    assert copy.stat().st_size == 8 << 30 and copy.stat().st_blocks * 512 < 1 << 20
    assert copy.stat().st_mode & 0o777 == 0o640
    with open(copy, "rb") as f:
        f.seek(4 << 30)
        assert f.read(6) == b"middle"
