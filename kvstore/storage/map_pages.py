"""Give back the LMDB map's pages that this process holds resident, once they are on disk.

With MDB_WRITEMAP (the node's default, see StateMachine._open_env) LMDB writes
every page through its shared file mapping, so every page it ever wrote stays
mapped, and counted in the process's resident set, until the process ends:
the history, appended to on every write and rarely read again, grows the
resident set by what the node has written (GiBs after a long write load),
although the kernel could drop those pages from memory at any time.

`release` drops the process's page table entries for the whole mapping
(madvise MADV_DONTNEED). On a shared file mapping that loses nothing: the
pages stay in the page cache (a dirty page is handed back to it dirty), and
the next touch maps them again with a minor fault. So the caller does it
after a sync, when they are clean, and not too often: the pages a node keeps
using (the branch pages, the hot keys) are faulted back in after each call.
"""
from __future__ import annotations

import ctypes
import os

__all__ = ["mappings", "release", "resident_bytes"]

_MADV_DONTNEED = 4  # <sys/mman.h> on Linux
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_libc.madvise.restype = ctypes.c_int


def _is_file(line: str, dev_ino: tuple[int, int]) -> bool:
    """Whether a /proc/self/maps line maps the file with (st_dev, st_ino) shared."""
    fields = line.split(maxsplit=5)
    if len(fields) < 5 or fields[1][3] != "s":
        return False
    major, minor = (int(x, 16) for x in fields[3].split(":"))
    return int(fields[4]) == dev_ino[1] and os.makedev(major, minor) == dev_ino[0]


def mappings(path: str) -> list[tuple[int, int]]:
    """(start, end) of every shared mapping of the file `path` in this process."""
    st = os.stat(path)
    dev_ino = (st.st_dev, st.st_ino)
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            if _is_file(line, dev_ino):
                start, end = line.split(maxsplit=1)[0].split("-")
                out.append((int(start, 16), int(end, 16)))
    return out


def release(path: str) -> int:
    """Unmap from this process every resident page of its shared mappings of `path`.

    The mappings must stay mapped during the call (the caller holds what
    keeps the LMDB environment open): dropping an address range that was
    reused for anonymous memory would zero it. Returns the bytes covered.
    """
    total = 0
    for start, end in mappings(path):
        if _libc.madvise(start, end - start, _MADV_DONTNEED) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"madvise(MADV_DONTNEED): {os.strerror(err)}", path)
        total += end - start
    return total


def resident_bytes(path: str) -> int:
    """How much of `path`'s shared mappings is resident in this process (from /proc/self/smaps)."""
    st = os.stat(path)
    dev_ino = (st.st_dev, st.st_ino)
    total = 0
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            if line[0] in "0123456789abcdef" and "-" in line.split(maxsplit=1)[0]:
                inside = _is_file(line, dev_ino)
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total
