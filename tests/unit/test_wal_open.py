"""WAL recovery reads segments two ways (mapped, or read on kernels without MADV_POPULATE_READ).

The mapped path is the default and is what test_wal.py exercises; here the
recovery tests of test_wal.py run again through the read path, and strace
shows that each switch position really takes its own path.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import kvstore._wal as native
import test_wal as base

RECOVERY_TESTS = [
    base.test_round_trip_across_reopen_and_segments,
    base.test_cut_the_last_record_at_every_byte_offset_by_truncating_the_file,
    base.test_a_torn_write_that_never_reached_some_sectors_is_cut,
    base.test_a_flipped_byte_in_the_very_last_record_is_refused_too,
    base.test_a_zeroed_sector_followed_by_good_records_is_refused,
    base.test_corruption_in_an_earlier_segment_is_refused,
    base.test_a_missing_middle_segment_is_refused,
    base.test_teeth_with_crc_checking_off_a_flipped_byte_goes_unnoticed,
]


@pytest.fixture
def read_segments():
    native._testing_read_segments = True
    yield
    native._testing_read_segments = False


@pytest.mark.parametrize("test", RECOVERY_TESTS, ids=lambda t: t.__name__)
def test_recovery_through_the_read_path(test, tmp_path, caplog, read_segments):
    kwargs = {"tmp_path": tmp_path}
    if "caplog" in test.__code__.co_varnames[:test.__code__.co_argcount]:
        kwargs["caplog"] = caplog
    test(**kwargs)


@pytest.mark.parametrize("where", ["payload", "len", "index", "hcrc", "pcrc"])
def test_a_flipped_byte_is_refused_through_the_read_path(tmp_path, where, read_segments):
    base.test_a_flipped_byte_in_the_middle_is_refused_naming_file_and_offset(tmp_path, where)


def test_each_switch_position_takes_its_own_path(tmp_path):
    """Mapped: mmap + madvise(MADV_POPULATE_READ), no pread of the segment; read: one pread, no mmap of it."""
    seg_bytes = 1 << 20
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {base.ROOT!r})
        import kvstore._wal as native
        native.Wal(sys.argv[1], {seg_bytes}).close()
        native._testing_read_segments = sys.argv[2] == "read"
        os.write(2, b"MARK\\n")
        native.Wal(sys.argv[1], {seg_bytes}).close()
        os.write(2, b"MARK\\n")
    """)
    seen = {}
    for mode in ("map", "read"):
        d = tmp_path / mode
        r = subprocess.run(["strace", "-f", "-e", "trace=mmap,madvise,pread64,write", sys.executable, "-c", script,
                            str(d), mode], capture_output=True, text=True)
        if r.returncode != 0 and "ptrace" in r.stderr:
            pytest.skip("strace not permitted here")
        assert r.returncode == 0, r.stderr
        window = r.stderr.split('write(2, "MARK')[1]
        seen[mode] = (f"mmap(NULL, {seg_bytes}, PROT_READ, MAP_SHARED" in window,
                      "MADV_POPULATE_READ" in window or ", 22)" in window,
                      f", {seg_bytes}, 0) = {seg_bytes}" in window)  # pread64(fd, buf, n, 0) = n
    assert seen["map"] == (True, True, False)
    assert seen["read"] == (False, False, True)


def test_crc32c_three_streams_agree_with_the_table_at_every_block_boundary():
    """The hardware path splits a buffer into 3 x 8 KiB and 3 x 256 B blocks; every split must join exactly."""
    import random

    rng = random.Random(11)
    data = rng.randbytes(3 * 8192 * 3 + 3 * 256 * 3 + 64)
    sizes = {0, 1, 767, 768, 769, 24575, 24576, 24577, 24576 + 768, 24576 + 767, 2 * 24576 + 768 + 9}
    sizes |= {rng.randrange(0, len(data) - 16) for _ in range(40)}
    checked = 0
    for n in sorted(sizes):
        for off in (0, 1, 3, 7, 8):
            piece = data[off:off + n]
            sw, hw = native._crc32c_impls(piece)
            if hw is None:
                pytest.skip("no hardware CRC32C on this CPU")
            assert hw == sw, (n, off)
            assert base.crc32c(memoryview(data)[off:off + n]) == sw  # unaligned start, as the WAL passes it
            checked += 1
    assert checked == 5 * len(sizes)
