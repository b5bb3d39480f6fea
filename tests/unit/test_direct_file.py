"""DirectFile writes exactly the bytes given, whatever the chunking, past the page cache or through it."""
from __future__ import annotations

import os

import pytest

from kvstore.storage.direct_file import BUFFER_BYTES, DirectFile


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize("size", [0, 1, 4095, 4096, BUFFER_BYTES, BUFFER_BYTES + 3, 2 * BUFFER_BYTES + 5000])
def test_the_file_holds_exactly_what_was_written(tmp_path, size, direct):
    data = os.urandom(size)
    path = str(tmp_path / "image")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    out = DirectFile(fd, path, direct=direct)
    try:
        off, step = 0, 1
        while off < size:  # chunks of every size from 1 byte to several MiB, across buffer boundaries
            out.write(data[off:off + step])
            off += step
            step = step * 7 + 1
        out.finish()
        os.fsync(fd)
    finally:
        out.close()
        os.close(fd)
    with open(path, "rb") as f:
        assert f.read() == data
    assert out.size == size

