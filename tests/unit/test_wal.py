"""The native WAL: record format, torn-tail recovery, corruption refusal, failure poisoning.

The layout constants below restate the format documented in native/_wal.pyx
on purpose: if the format changes, these tests must be read again.
"""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import textwrap

import pytest

import kvstore._wal as native
from kvstore.raft.types import Entry
from kvstore.storage.wal import HEADER_SIZE, Wal, WalCorruptionError, WalError, WalFsyncError, crc32c

HEAD_BYTES = (HEADER_SIZE + 8) + (HEADER_SIZE + 24)  # SEGHEAD(magic) + HARDSTATE at the start of a segment
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def payload(index: int, term: int, size: int = 300) -> bytes:
    """Deterministic, non-zero bytes, so a torn or flipped entry is recognisable."""
    seed = f"{index}/{term}|".encode()
    return (seed * (size // len(seed) + 1))[:size]


def ents(lo: int, hi: int, term: int = 1, size: int = 300) -> list[Entry]:
    return [Entry(term, i, data=payload(i, term, size)) for i in range(lo, hi)]


def seg_files(path) -> list[str]:
    return sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".wal"))


@pytest.fixture(autouse=True)
def _reset_switches():
    yield
    native._testing_fail_fsync = native._testing_skip_crc = native._testing_skip_fsync = False


# --------------------------------------------------------------------- format


def test_crc32c_known_vectors_and_both_implementations_agree():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    assert crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4 test vector
    rng = random.Random(7)
    for n in list(range(0, 70)) + [255, 256, 4096, 65537]:
        data = rng.randbytes(n)
        sw, hw = native._crc32c_impls(data)
        assert sw == crc32c(data)
        assert hw is None or hw == sw
        if n > 9:  # unaligned starts take the byte-at-a-time prologue
            assert native._crc32c_impls(data[3:])[0] == crc32c(memoryview(data)[3:])


def test_record_layout_matches_the_documented_header(tmp_path):
    with Wal(str(tmp_path), 1 << 16) as w:
        w.append([Entry(7, 1, data=b"hello")])
    raw = open(seg_files(tmp_path)[0], "rb").read()
    rec = raw[HEAD_BYTES:HEAD_BYTES + HEADER_SIZE + 5]
    hcrc, pcrc, n, kind, flags = (int.from_bytes(rec[0:4], "little"), int.from_bytes(rec[4:8], "little"),
                                  int.from_bytes(rec[8:12], "little"), rec[12], rec[13])
    assert (n, kind, flags) == (5, native.KINDS["ENTRY"], 0)
    assert int.from_bytes(rec[16:24], "little") == 1 and int.from_bytes(rec[24:32], "little") == 7
    assert pcrc == crc32c(b"hello") and hcrc == crc32c(rec[4:32]) and rec[32:] == b"hello"
    assert os.path.getsize(seg_files(tmp_path)[0]) == 1 << 16  # preallocated


def test_round_trip_across_reopen_and_segments(tmp_path):
    with Wal(str(tmp_path), 8192) as w:
        for b in range(30):
            w.append(ents(b * 5 + 1, b * 5 + 6, term=1 + b // 10), (1 + b // 10, 3, b * 5))
        assert len(w.segment_paths()) > 3
        expect = [(i, 1 + (i - 1) // 50, 0, payload(i, 1 + (i - 1) // 50)) for i in range(1, 151)]
    with Wal(str(tmp_path), 8192) as w:
        assert (w.base_index, w.last_index, w.hard_state) == (0, 150, (3, 3, 145))
        got = w.entries(1, 151)
        assert got == expect
        assert w.term(50) == 1 and w.term(51) == 2


def test_a_batch_is_one_write_and_one_fdatasync(tmp_path):
    """strace the append: exactly one pwrite64 and one fdatasync (and none with the skip switch)."""
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {ROOT!r})
        import kvstore._wal as native
        from kvstore.raft.types import Entry
        w = native.Wal(sys.argv[1], 1 << 22)
        w.testing_skip_fsync = sys.argv[2] == "skip"
        batch = [Entry(1, i, data=b"x" * 256) for i in range(1, 257)]
        os.write(2, b"MARK\\n")
        w.append(batch, (1, 1, 0))
        os.write(2, b"MARK\\n")
    """)
    counts = {}
    for mode in ("real", "skip"):
        d = tmp_path / mode
        r = subprocess.run(["strace", "-f", "-e", "trace=pwrite64,write,fdatasync,fsync", sys.executable, "-c", script,
                            str(d), mode], capture_output=True, text=True)
        if r.returncode != 0 and "ptrace" in r.stderr:
            pytest.skip("strace not permitted here")
        assert r.returncode == 0, r.stderr
        window = r.stderr.split('write(2, "MARK')[1]  # the syscalls between the two markers
        counts[mode] = (window.count("pwrite64("), window.count("fdatasync(") + window.count("fsync("))
    assert counts["real"] == (1, 1)
    assert counts["skip"] == (1, 0)  # teeth: the same check notices a missing fsync


# ------------------------------------------------------------------- recovery


def _log_with_tail(path, n=5):
    """Entries 1..n-1 then entry n, each in its own append; returns (segment file, start, end of entry n)."""
    with Wal(str(path), 1 << 14) as w:
        for i in range(1, n + 1):
            w.append(ents(i, i + 1))
    sizes = [HEADER_SIZE + len(payload(i, 1)) for i in range(1, n + 1)]
    start = HEAD_BYTES + sum(sizes[:-1])
    seg = seg_files(path)[0]
    raw = open(seg, "rb").read()
    assert raw[start + 12] == native.KINDS["ENTRY"] and int.from_bytes(raw[start + 16:start + 24], "little") == n
    return seg, start, start + sizes[-1]


def _check_recovered(path, last, pristine_tail=None):
    with Wal(str(path), 1 << 14) as w:
        assert w.last_index == last
        assert [d for *_, d in w.entries(1, last + 1)] == [payload(i, 1) for i in range(1, last + 1)]
        w.append(ents(last + 1, last + 2, term=2))  # the cut log takes appends again
    with Wal(str(path), 1 << 14) as w:
        assert w.last_index == last + 1 and w.term(last + 1) == 2


def test_cut_the_last_record_at_every_byte_offset_by_truncating_the_file(tmp_path, caplog):
    pristine = tmp_path / "pristine"
    seg, start, end = _log_with_tail(pristine)
    raw = open(seg, "rb").read()
    for cut in range(start, end + 1):
        d = tmp_path / "cut"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(pristine, d)
        with open(os.path.join(d, os.path.basename(seg)), "r+b") as f:
            f.truncate(cut)
        _check_recovered(d, 5 if cut == end else 4)
        assert open(os.path.join(d, os.path.basename(seg)), "rb").read(start) == raw[:start]
    assert "cut torn tail" in caplog.text


def test_a_torn_write_that_never_reached_some_sectors_is_cut(tmp_path):
    """A write cut at any sector boundary (what kill -9 or a power loss leaves) loses only the torn records."""
    pristine = tmp_path / "pristine"
    with Wal(str(pristine), 1 << 16) as w:
        w.append(ents(1, 4))
        w.append(ents(4, 40))  # one batch of 36 records, ~12 KiB
    seg = seg_files(pristine)[0]
    raw = open(seg, "rb").read()
    starts = [HEAD_BYTES]
    for _ in range(1, 40):
        starts.append(starts[-1] + HEADER_SIZE + 300)
    batch_end = starts[-1]
    for cut in range(((starts[3] + 511) // 512) * 512, batch_end, 512):
        d = tmp_path / "torn"
        shutil.rmtree(d, ignore_errors=True)
        shutil.copytree(pristine, d)
        with open(os.path.join(d, os.path.basename(seg)), "r+b") as f:
            f.seek(cut)
            f.write(bytes(batch_end - cut))
        complete = sum(1 for s in starts[1:] if s <= cut)  # records ending at or before the cut
        with Wal(str(d), 1 << 16) as w:
            assert w.last_index == complete, cut
            assert [x[3] for x in w.entries(1, complete + 1)] == [payload(i, 1) for i in range(1, complete + 1)]
        assert open(os.path.join(d, os.path.basename(seg)), "rb").read(batch_end)[starts[complete]:] == \
            bytes(batch_end - starts[complete])  # the cut region was re-zeroed durably
    assert raw  # pristine untouched


@pytest.mark.parametrize("where", ["payload", "len", "index", "hcrc", "pcrc"])
def test_a_flipped_byte_in_the_middle_is_refused_naming_file_and_offset(tmp_path, where):
    with Wal(str(tmp_path), 1 << 16) as w:
        for b in range(10):
            w.append(ents(b * 5 + 1, b * 5 + 6))
    seg = seg_files(tmp_path)[0]
    rec = HEAD_BYTES + 20 * (HEADER_SIZE + 300)  # entry 21
    at = {"payload": rec + HEADER_SIZE + 150, "len": rec + 9, "index": rec + 16, "hcrc": rec, "pcrc": rec + 5}[where]
    with open(seg, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0x40]))
    with pytest.raises(WalCorruptionError) as err:
        Wal(str(tmp_path), 1 << 16)
    assert err.value.path == seg and err.value.offset == rec
    assert seg in str(err.value) and f"offset {rec}" in str(err.value)


def test_a_flipped_byte_in_the_very_last_record_is_refused_too(tmp_path):
    """No zeroed sector, so it cannot be a torn write: it is damage to an acknowledged record."""
    seg, start, end = _log_with_tail(tmp_path)
    with open(seg, "r+b") as f:
        f.seek(start + HEADER_SIZE + 10)
        f.write(b"\xff")
    with pytest.raises(WalCorruptionError, match="not a torn write"):
        Wal(str(tmp_path), 1 << 14)


def test_a_zeroed_sector_followed_by_good_records_is_refused(tmp_path):
    """A hole in the middle looks like a torn tail, but valid records after it give it away."""
    with Wal(str(tmp_path), 1 << 16) as w:
        w.append(ents(1, 40))
    seg = seg_files(tmp_path)[0]
    with open(seg, "r+b") as f:
        f.seek(2048)
        f.write(bytes(512))
    with pytest.raises(WalCorruptionError, match="valid record follows"):
        Wal(str(tmp_path), 1 << 16)


def test_corruption_in_an_earlier_segment_is_refused(tmp_path):
    with Wal(str(tmp_path), 8192) as w:
        for b in range(20):
            w.append(ents(b * 4 + 1, b * 4 + 5))
    first = seg_files(tmp_path)[0]
    with open(first, "r+b") as f:
        f.seek(HEAD_BYTES + 2 * (HEADER_SIZE + 300) + HEADER_SIZE + 3)
        f.write(b"\x00")
    with pytest.raises(WalCorruptionError) as err:
        Wal(str(tmp_path), 8192)
    assert err.value.path == first and err.value.offset == HEAD_BYTES + 2 * (HEADER_SIZE + 300)


def test_a_missing_middle_segment_is_refused(tmp_path):
    with Wal(str(tmp_path), 8192) as w:
        for b in range(20):
            w.append(ents(b * 4 + 1, b * 4 + 5))
    segs = seg_files(tmp_path)
    os.unlink(segs[1])
    with pytest.raises(WalCorruptionError, match="segment head continues from index"):
        Wal(str(tmp_path), 8192)


def test_unfinished_segment_files_are_removed(tmp_path):
    with Wal(str(tmp_path), 8192) as w:
        w.append(ents(1, 3))
    open(tmp_path / "0000000000000002.wal.tmp", "wb").write(b"half a segment")
    with Wal(str(tmp_path), 8192) as w:
        assert w.last_index == 2
    assert not (tmp_path / "0000000000000002.wal.tmp").exists()


def test_teeth_with_crc_checking_off_a_flipped_byte_goes_unnoticed(tmp_path):
    """The test switch really disables the check, so the tests above depend on it."""
    with Wal(str(tmp_path), 1 << 16) as w:
        w.append(ents(1, 30))
    seg = seg_files(tmp_path)[0]
    at = HEAD_BYTES + 10 * (HEADER_SIZE + 300) + HEADER_SIZE + 7  # inside entry 11's payload
    with open(seg, "r+b") as f:
        f.seek(at)
        f.write(b"#")
    native._testing_skip_crc = True
    with Wal(str(tmp_path), 1 << 16) as w:  # opens fine, serves damaged data
        assert w.last_index == 29
        damaged = w.entries(11, 12)[0][3]
    assert damaged != payload(11, 1)  # ...which only an end-to-end comparison catches
    native._testing_skip_crc = False
    with pytest.raises(WalCorruptionError):
        Wal(str(tmp_path), 1 << 16)


def test_a_log_is_opened_by_one_process_at_a_time(tmp_path):
    with Wal(str(tmp_path), 8192):
        code = f"import sys; sys.path.insert(0, {ROOT!r}); import kvstore._wal as w; w.Wal({str(tmp_path)!r}, 8192)"
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.returncode != 0 and "open in another process" in r.stderr


# ------------------------------------------------------------------- failures


def test_injected_fsync_failure_raises_and_poisons_the_wal(tmp_path):
    w = Wal(str(tmp_path), 1 << 16)
    w.append(ents(1, 3))
    w.testing_fail_fsync = True
    with pytest.raises(WalFsyncError) as err:
        w.append(ents(3, 5), (1, 1, 2))
    assert isinstance(err.value, OSError) and err.value.errno == 5
    assert w.last_index == 2 and w.hard_state == (0, 0, 0)  # nothing published
    w.testing_fail_fsync = False
    with pytest.raises(WalFsyncError, match="unusable after an earlier failure"):
        w.append(ents(3, 5))  # never retried, even once the disk "recovers"
    with pytest.raises(WalFsyncError):
        w.write_snapshot(2, 1, [1])
    with pytest.raises(WalFsyncError):
        w.compact(1)
    assert len(w.entries(1, 3)) == 2  # reads keep working for diagnostics
    w.close()


def test_module_switch_and_environment_variable_inject_fsync_failures(tmp_path):
    native._testing_fail_fsync = True
    with pytest.raises(WalFsyncError):
        Wal(str(tmp_path / "a"), 8192)  # creating the first segment fsyncs
    native._testing_fail_fsync = False
    Wal(str(tmp_path / "b"), 8192).close()
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {ROOT!r})
        from kvstore.storage.raft_log import RaftLog
        from kvstore.raft.types import Entry
        log = RaftLog.open(sys.argv[1], 8192)
        log.append([Entry(1, 1, data=b"x")])
    """)
    env = dict(os.environ, KVSTORE_WAL_TESTING_FAIL_FSYNC="1")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "b")], capture_output=True, text=True, env=env)
    assert r.returncode != 0 and "WalFsyncError" in r.stderr and "injected" in r.stderr


def test_running_out_of_space_raises_and_poisons(tmp_path):
    """A real allocation failure (a file size limit, standing in for ENOSPC) surfaces as WalFsyncError.

    The 400 KB batch needs a segment bigger than the limit, so preallocating it fails.
    """
    code = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {ROOT!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))
        from kvstore.storage.wal import Wal, WalFsyncError
        from kvstore.raft.types import Entry
        w = Wal(sys.argv[1], 65536)
        w.append([Entry(1, j, data=b"y" * 1000) for j in range(1, 11)])
        try:
            w.append([Entry(1, j, data=b"y" * 1000) for j in range(11, 411)])
        except WalFsyncError as e:
            print("failed", e.errno, w.last_index, flush=True)
        try:
            w.append([Entry(1, 11, data=b"z")])
        except WalFsyncError as e:
            print("refused", flush=True)
    """)
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.stdout.split() == ["failed", "27", "10", "refused"], r.stdout + r.stderr
    with Wal(str(tmp_path), 65536) as w:
        assert w.last_index == 10


def test_bad_batches_are_rejected_before_anything_is_written(tmp_path):
    with Wal(str(tmp_path), 8192) as w:
        w.append(ents(1, 5, term=2))
        with pytest.raises(ValueError, match="gap"):
            w.append(ents(7, 8, term=2))
        with pytest.raises(ValueError, match="not consecutive"):
            w.append([Entry(2, 5, data=b""), Entry(2, 7, data=b"")])
        with pytest.raises(ValueError, match="goes back"):
            w.append([Entry(1, 5, data=b"")])
        with pytest.raises(TypeError):
            w.append([Entry(2, 5, data="text")])
        assert w.last_index == 4
    with Wal(str(tmp_path), 8192) as w:
        assert w.last_index == 4
    with pytest.raises(WalError, match="closed"):
        w.entries(1, 2)
