"""WAL recovery reads segments two ways (mapped, or read on kernels without MADV_POPULATE_READ).

The mapped path is the default and is what test_wal.py exercises; here the
recovery tests of test_wal.py run again through the read path, and strace
shows that each switch position really takes its own path.
"""
from __future__ import annotations

import os
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
    """Mapped: mmap + madvise(MADV_POPULATE_READ), no pread of the segment; read (as on a kernel without
    MADV_POPULATE_READ): the mapping is dropped unpopulated and the segment is read with one pread."""
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
    assert seen["read"] == (True, False, True)


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


# ------------------------------------------------- applied entries: checked when read, not at open


def _three_segments(path):
    """Entries 1..80 over several 8 KiB segments; (first segment file, offset of entry 3 in it)."""
    with base.Wal(str(path), 8192) as w:
        for b in range(20):
            w.append(base.ents(b * 4 + 1, b * 4 + 5))
        assert len(w.segment_paths()) >= 3
    return base.seg_files(path)[0], base.HEAD_BYTES + 2 * (base.HEADER_SIZE + 300)


def _flip(path, at):
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x40]))


@pytest.mark.parametrize("mode", ["map", "read"])
def test_a_damaged_applied_entry_opens_but_is_refused_when_read(tmp_path, mode, monkeypatch):
    monkeypatch.setattr(native, "_testing_read_segments", mode == "read")
    seg, rec = _three_segments(tmp_path)
    _flip(seg, rec + base.HEADER_SIZE + 100)  # entry 3's payload
    with pytest.raises(base.WalCorruptionError):  # teeth: a full check at open sees it
        base.Wal(str(tmp_path), 8192)
    with base.Wal(str(tmp_path), 8192, applied_index=80) as w:
        assert w.last_index == 80
        assert [e[3] for e in w.entries(4, 81)] == [base.payload(i, 1) for i in range(4, 81)]
        with pytest.raises(base.WalCorruptionError) as err:
            w.entries(1, 4)  # never served: the read checks the payload
        assert err.value.path == seg and err.value.offset == rec


def test_an_unapplied_entry_is_still_checked_at_open(tmp_path):
    seg, rec = _three_segments(tmp_path)
    _flip(seg, rec + base.HEADER_SIZE + 100)  # entry 3
    with pytest.raises(base.WalCorruptionError) as err:
        base.Wal(str(tmp_path), 8192, applied_index=2)
    assert err.value.offset == rec


@pytest.mark.parametrize("where", ["len", "index", "hcrc"])
def test_a_damaged_header_of_an_applied_entry_is_refused_at_open(tmp_path, where):
    seg, rec = _three_segments(tmp_path)
    _flip(seg, rec + {"len": 9, "index": 16, "hcrc": 0}[where])
    with pytest.raises(base.WalCorruptionError) as err:
        base.Wal(str(tmp_path), 8192, applied_index=80)
    assert err.value.path == seg and err.value.offset == rec


def test_hard_state_records_are_checked_at_open_whatever_the_applied_index(tmp_path):
    with base.Wal(str(tmp_path), 8192) as w:
        for b in range(20):
            w.append(base.ents(b * 4 + 1, b * 4 + 5), (1, 1, b * 4))
    seg = base.seg_files(tmp_path)[0]
    hs = base.HEAD_BYTES + 4 * (base.HEADER_SIZE + 300)  # the hard state after the first batch
    raw = open(seg, "rb").read(hs + base.HEADER_SIZE)
    assert raw[hs + 12] == native.KINDS["HARDSTATE"]
    _flip(seg, hs + base.HEADER_SIZE + 3)
    with pytest.raises(base.WalCorruptionError, match="payload checksum") as err:
        base.Wal(str(tmp_path), 8192, applied_index=80)
    assert err.value.offset == hs


def test_the_last_segment_is_checked_whole_whatever_the_applied_index(tmp_path):
    seg, start, end = base._log_with_tail(tmp_path)  # one segment: it is the last
    _flip(seg, start + base.HEADER_SIZE + 10)
    with pytest.raises(base.WalCorruptionError, match="not a torn write"):
        base.Wal(str(tmp_path), 1 << 14, applied_index=5)


def test_a_torn_tail_is_cut_whatever_the_applied_index(tmp_path):
    pristine = tmp_path / "pristine"
    seg, start, end = base._log_with_tail(pristine)
    for cut in (start + 1, start + base.HEADER_SIZE + 7, end - 1):
        d = tmp_path / f"cut{cut}"
        import shutil

        shutil.copytree(pristine, d)
        with open(d / os.path.basename(seg), "r+b") as f:
            f.truncate(cut)
        with base.Wal(str(d), 1 << 14, applied_index=5) as w:
            assert w.last_index == 4


def test_a_restart_reads_little_of_an_applied_log(tmp_path):
    """The point of applied_index: of older segments only windows around headers are read (strace counts)."""
    seg_bytes = 4 << 20
    with base.Wal(str(tmp_path), seg_bytes) as w:
        for i in range(1, 100):
            w.append(base.ents(i, i + 1, size=200_000))
        n_segs = len(w.segment_paths())
    assert n_segs >= 4
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {base.ROOT!r})
        import kvstore._wal as native
        os.write(2, b"MARK\\n")
        native.Wal(sys.argv[1], {seg_bytes}, applied_index=int(sys.argv[2])).close()
        os.write(2, b"MARK\\n")
    """)
    populated = {}
    for applied in (0, 99):
        r = subprocess.run(["strace", "-e", "trace=madvise,write", sys.executable, "-c", script, str(tmp_path),
                            str(applied)], capture_output=True, text=True)
        if r.returncode != 0 and "ptrace" in r.stderr:
            pytest.skip("strace not permitted here")
        assert r.returncode == 0, r.stderr
        window = r.stderr.split('write(2, "MARK')[1]
        populated[applied] = sum(int(line.split(",")[1]) for line in window.splitlines() if line.startswith("madvise("))
    assert populated[0] >= n_segs * seg_bytes  # everything, checked at open
    assert populated[99] < seg_bytes + (n_segs - 1) * seg_bytes // 2, populated  # the last segment + header windows


@pytest.mark.parametrize("mode", ["map", "read"])
def test_segments_larger_than_a_window_are_walked_header_by_header(tmp_path, mode, monkeypatch):
    """Segments of 256 KiB (several 64 KiB population windows), in both ways of reading them."""
    monkeypatch.setattr(native, "_testing_read_segments", mode == "read")
    with base.Wal(str(tmp_path), 256 << 10) as w:
        for b in range(40):
            w.append(base.ents(b * 10 + 1, b * 10 + 11, size=2000))
        assert len(w.segment_paths()) >= 3
    seg = base.seg_files(tmp_path)[0]
    rec = base.HEAD_BYTES + 2 * (base.HEADER_SIZE + 2000)  # entry 3
    _flip(seg, rec + base.HEADER_SIZE + 1500)
    with base.Wal(str(tmp_path), 256 << 10, applied_index=400) as w:
        assert w.last_index == 400
        assert [e[3] for e in w.entries(4, 401)] == [base.payload(i, 1, 2000) for i in range(4, 401)]
        with pytest.raises(base.WalCorruptionError):
            w.entries(3, 4)
    with pytest.raises(base.WalCorruptionError):
        base.Wal(str(tmp_path), 256 << 10, applied_index=2)
