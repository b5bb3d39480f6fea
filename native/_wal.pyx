# cython: language_level=3, boundscheck=False, wraparound=False
# (wraparound is off: never index with negative numbers in this file)
"""The segmented write-ahead log under the Raft log (the hot append + fsync path).

Why native: a node persists every batch of entries before it may answer, so
the encode + write + fdatasync path runs once per group commit and must not
hold the GIL while the disk works. Everything else (reads, recovery, segment
management) lives here too so the record format has one owner.

Files
-----
``<dir>/<seq:016x>.wal`` segments, preallocated to ``segment_bytes`` with
posix_fallocate (so ENOSPC shows up when a segment is created, not halfway
through a batch). A new segment is written as ``.wal.tmp``, fsynced, renamed
and the directory fsynced, so a segment with its final name always starts with
a durable head. ``LOCK`` holds an flock while a Wal is open.

Record layout (all integers little-endian; a record is a 32-byte header then
``len`` payload bytes; records are packed back to back, unaligned)::

    off size field
      0   4  hcrc   CRC32C of header bytes [4, 32)   (guards len/kind/index)
      4   4  pcrc   CRC32C of the payload
      8   4  len    payload length
     12   1  kind   1 SEGHEAD 2 ENTRY 3 HARDSTATE 4 TRUNCATE 5 SNAPSHOT
     13   1  flags  ENTRY: entry type; SNAPSHOT: 1 = reset (log discarded)
     14   2  zero
     16   8  index
     24   8  term

    SEGHEAD   first record of every segment; index/term = last entry before
              it (the log's base if older segments are gone); payload MAGIC.
              Every new segment repeats the current HARDSTATE and SNAPSHOT
              right after its head, so dropping older segments loses nothing.
    ENTRY     index, term, flags = entry type, payload = entry data.
    HARDSTATE payload = term, vote, commit (3 x u64).
    TRUNCATE  entries >= index are void; term = term of index - 1. Conflicts
              are cut logically, in the same write as the replacing entries,
              so a crash can never leave the hard state or the log half cut.
    SNAPSHOT  index, term of a snapshot; payload = u32 n_voters, u32
              n_learners, u64 ids. With the reset flag the log restarts
              after index (a snapshot installed from the leader).

A zeroed 32-byte header marks the end of a segment's data (the preallocated
tail is zeros).

Recovery rules
--------------
Segments are scanned in order; entry indexes must run on without gaps, and a
segment head must continue where the previous segment ended.

* Non-last segment: any bad record (header or payload CRC, length past the
  end, unknown kind, index gap) raises WalCorruptionError(path, offset).
  Exception, when the caller passes applied_index (the state machine's):
  for ENTRY records at or below it only the header is checked at open (CRC,
  kind, length, index continuity); their payload CRC is checked when they
  are read, as every read from disk does, so a damaged applied entry is
  never served: it stops the reader (a leader sending it to a lagging
  follower) instead of the start. Those entries are already in the state
  machine and are only ever read to be sent, so the open does not have to
  read them: its cost follows the unapplied tail, not the whole log. Every
  other record, and the whole last segment, is checked as described here.
* Last segment: the scan stops at the first record that is incomplete or bad.
  It is cut (file truncated there and re-zeroed, fsynced, logged with the
  byte count) only if it looks like a torn write: it runs past the end of
  the file, or one of its 512-byte-sector pieces is all zeros (the part of a
  write that never reached the disk; kill -9 cuts a write at a page
  boundary). A bad record without a zero piece (a flipped bit) is corruption.
  Then the next 1 MiB after the stop point is probed: if a valid record is
  found there, a bad record is followed by good ones, which is corruption
  too (an acknowledged record was damaged) - we refuse to start rather than
  drop it. This also refuses the (harmless) case of a power loss that
  persisted later sectors of an unacknowledged write but not earlier ones;
  stopping for an operator is the price of never skipping silently.
  The operator's repair, ``kvstore wal repair --data-dir DIR``
  (``repair_tail=True``), cuts the last segment at that record and says
  what it dropped; it refuses when the log would then end below the commit
  index its hard state records (no torn write leaves that).

Failures
--------
A failed write, fallocate, fsync or directory fsync (segment creation,
compaction), and a failed rename or unlink of a segment, raises WalFsyncError
(an OSError naming the operation and the file) and poisons the Wal: every
later mutation raises it again. After a failed fsync
the page cache state is unknown (Linux may drop the dirty pages and report
success next time), so retrying would be a lie; the node must stop.

Test hooks (never for production): module globals ``_testing_fail_fsync``,
``_testing_skip_fsync`` and ``_testing_skip_crc`` seed the instance flags of
the same names (minus the underscore) at open; the environment variable
KVSTORE_WAL_TESTING_FAIL_FSYNC=1 sets testing_fail_fsync for child processes,
KVSTORE_WAL_TESTING_SKIP_FSYNC=1 testing_skip_fsync (the power-loss tests' teeth).
``_testing_read_segments`` makes recovery behave as on kernels without
MADV_POPULATE_READ: segment files are read into memory instead of mapped.
"""
import errno as _errno
import fcntl as _fcntl
import logging
import os
import re
import threading

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memmove, memset
from libc.errno cimport EINTR, EINVAL, EIO, ENOMEM, ENOSYS, errno
from posix.fcntl cimport posix_fallocate
from posix.mman cimport MAP_FAILED, MAP_SHARED, PROT_READ, madvise, mmap, munmap
from posix.types cimport off_t
from posix.unistd cimport fdatasync, fsync, ftruncate, pread, pwrite

cdef extern from *:
    """
    #include <sys/mman.h>
    #ifndef MADV_POPULATE_READ
    #define MADV_POPULATE_READ 22   /* Linux 5.14+; older kernels answer EINVAL */
    #endif
    """
    int MADV_POPULATE_READ

cdef extern from "crc32c.h" nogil:
    void kv_crc32c_init()
    uint32_t kv_crc32c(uint32_t crc, const void* buf, size_t n)
    uint32_t kv_crc32c_sw(uint32_t crc, const unsigned char* buf, size_t n)
    uint32_t kv_crc32c_hw(uint32_t crc, const unsigned char* buf, size_t n)
    int kv_crc32c_use_hw
    int KV_CRC32C_HAVE_HW

kv_crc32c_init()

log = logging.getLogger("kvstore.wal")

DEF HDR = 32
DEF SECTOR = 512
DEF PROBE_BYTES = 1 << 20

cdef enum:  # C constants: a module-global lookup per record would cost more than the CRC
    KIND_SEGHEAD = 1
    KIND_ENTRY = 2
    KIND_HARDSTATE = 3
    KIND_TRUNCATE = 4
    KIND_SNAPSHOT = 5
KINDS = {"SEGHEAD": KIND_SEGHEAD, "ENTRY": KIND_ENTRY, "HARDSTATE": KIND_HARDSTATE,
         "TRUNCATE": KIND_TRUNCATE, "SNAPSHOT": KIND_SNAPSHOT}
MAGIC = b"KVWAL\x00\x01\x00"
HEADER_SIZE = HDR

_testing_fail_fsync = False
_testing_skip_fsync = False
_testing_skip_crc = False
_testing_read_segments = False  # recover as if MADV_POPULATE_READ were missing: read segments, do not map

_SEGMENT_RE = re.compile(r"^([0-9a-f]{16})\.wal$")


class WalError(Exception):
    """Base class of WAL errors."""


class WalCorruptionError(WalError):
    """A record that should be intact is not; the node must not start."""

    def __init__(self, path, offset, reason):
        super().__init__(f"WAL corrupt: {path} at offset {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


class WalFsyncError(OSError):
    """Writing or syncing the log failed; the Wal is poisoned, the node must stop.

    It names the operation and the file: str() reads like
    ``fdatasync /data/wal/0000000000000001.wal: [Errno 5] Input/output error``.
    """

    def __init__(self, err, strerror, filename=None, operation="write"):
        super().__init__(err, strerror, filename)
        self.operation = operation

    def __str__(self):
        return f"{self.operation} {self.filename}: [Errno {self.errno}] {self.strerror}"


class WalCompactedError(WalError, LookupError):
    """The index is at or below the log's base (compacted into a snapshot)."""


class WalUnavailableError(WalError, LookupError):
    """The index is above the last entry."""


def crc32c(data, uint32_t crc=0):
    """CRC32C of a bytes-like object (the dispatching implementation)."""
    cdef const unsigned char[:] v = data
    if v.shape[0] == 0:
        return kv_crc32c(crc, b"", 0)
    return kv_crc32c(crc, &v[0], v.shape[0])


def _crc32c_impls(bytes data):
    """(software, hardware) CRC32C of data, so tests can check both agree."""
    cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
    cdef size_t n = PyBytes_GET_SIZE(data)
    return kv_crc32c_sw(0, p, n), (kv_crc32c_hw(0, p, n) if KV_CRC32C_HAVE_HW else None)


ctypedef struct Loc:
    uint64_t off
    uint64_t term
    uint32_t seg
    uint32_t len
    uint8_t etype


cdef inline void _put_header(unsigned char* p, uint8_t kind, uint8_t flags, uint64_t index,
                             uint64_t term, uint32_t n) noexcept nogil:
    """Fill a header whose payload already sits at p + HDR."""
    cdef uint32_t c = kv_crc32c(0, p + HDR, n)
    memcpy(p + 4, &c, 4)
    memcpy(p + 8, &n, 4)
    p[12] = kind
    p[13] = flags
    p[14] = 0
    p[15] = 0
    memcpy(p + 16, &index, 8)
    memcpy(p + 24, &term, 8)
    c = kv_crc32c(0, p + 4, HDR - 4)
    memcpy(p, &c, 4)


cdef bytes _record(uint8_t kind, uint8_t flags, uint64_t index, uint64_t term, bytes payload):
    """One encoded record as bytes (for the rare records: heads, hard state...)."""
    cdef Py_ssize_t n = len(payload)
    cdef bytes out = PyBytes_FromStringAndSize(NULL, HDR + n)
    cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(out)
    if n:
        memcpy(p + HDR, PyBytes_AS_STRING(payload), n)
    _put_header(p, kind, flags, index, term, <uint32_t>n)
    return out


cdef bytes _u64s(object values):
    cdef bytearray b = bytearray()
    for v in values:
        b += (<uint64_t>v).to_bytes(8, "little")
    return bytes(b)


cdef bytes _snapshot_payload(tuple snap):
    voters, learners = snap[2], snap[3]
    return len(voters).to_bytes(4, "little") + len(learners).to_bytes(4, "little") + _u64s(voters) + _u64s(learners)


cdef inline uint64_t _rd64(const unsigned char* p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)
    return v


cdef inline uint32_t _rd32(const unsigned char* p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return v


cdef int _check_header(const unsigned char* p, size_t avail, bint skip_crc, const char** why) noexcept nogil:
    """0 if a valid header starts at p and its payload fits in avail bytes, else -1 and why."""
    cdef uint32_t n
    if avail < HDR:
        why[0] = b"incomplete header"
        return -1
    if not skip_crc and kv_crc32c(0, p + 4, HDR - 4) != _rd32(p):
        why[0] = b"header checksum mismatch"
        return -1
    n = _rd32(p + 8)
    if p[12] < 1 or p[12] > 5:
        why[0] = b"unknown record kind"
        return -1
    if n > avail - HDR:
        why[0] = b"record runs past the end of the file"
        return -1
    return 0


cdef int _check_record(const unsigned char* p, size_t avail, bint skip_crc, const char** why) noexcept nogil:
    """0 if a whole valid record starts at p (avail bytes readable), else -1 and why."""
    if _check_header(p, avail, skip_crc, why) != 0:
        return -1
    if not skip_crc and kv_crc32c(0, p + HDR, _rd32(p + 8)) != _rd32(p + 4):
        why[0] = b"payload checksum mismatch"
        return -1
    return 0


cdef bint _all_zero(const unsigned char* p, size_t n) noexcept nogil:
    cdef size_t i
    for i in range(n):
        if p[i]:
            return False
    return True


cdef bint _looks_torn(const unsigned char* base, size_t off, size_t file_len, bint header_ok) noexcept nogil:
    """A bad record at off is a torn write if it runs past EOF or has an all-zero sector piece.

    With a bad header the length is not to be trusted, so only the header's
    own bytes are judged.
    """
    cdef size_t end, a, b
    if off + HDR > file_len:
        return True
    if header_ok:
        end = off + HDR + _rd32(base + off + 8)
        if end > file_len:
            return True
    else:
        end = off + HDR
    a = off
    while a < end:
        b = (a // SECTOR + 1) * SECTOR
        if b > end:
            b = end
        if _all_zero(base + a, b - a):
            return True
        a = b
    return False


cdef int _write_all(int fd, const unsigned char* p, size_t n, off_t off) noexcept nogil:
    """pwrite until done; 0 or an errno."""
    cdef Py_ssize_t w
    while n:
        w = pwrite(fd, p, n, off)
        if w < 0:
            if errno == EINTR:
                continue
            return errno
        if w == 0:
            return EIO
        p += w
        n -= w
        off += w
    return 0


cdef int _read_all(int fd, unsigned char* p, size_t n, off_t off) noexcept nogil:
    cdef Py_ssize_t r
    while n:
        r = pread(fd, p, n, off)
        if r < 0:
            if errno == EINTR:
                continue
            return errno
        if r == 0:
            return EIO
        p += r
        n -= r
        off += r
    return 0


cdef unsigned char _NOTHING[1]
DEF PAGE = 4096
DEF WINDOW = 64 << 10   # populated at a time when a segment is walked header by header


cdef class _FileImage:
    """A whole file as read-only memory for the recovery scan: mapped, or else read.

    Mapping avoids copying every segment into fresh memory (most of the cost
    of a restart). MADV_POPULATE_READ faults pages in before they are looked
    at, so a disk error is an OSError rather than a SIGBUS in the middle of
    the scan; where the kernel lacks it (< 5.14, EINVAL) the file is read
    instead. Either the whole file is populated at load, or (lazy) only what
    ensure() is asked for, a window at a time: the scan then reads only the
    headers of records it does not need to checksum.
    """
    cdef const unsigned char* data
    cdef size_t n
    cdef void* _mem
    cdef bint _mapped
    cdef bint _full             # every byte is readable
    cdef bint _no_populate      # test hook: act as a kernel without MADV_POPULATE_READ
    cdef size_t _win_lo, _win_hi  # the last populated window (lazy mode)

    def __cinit__(self):
        self.data = _NOTHING
        self.n = 0
        self._mem = NULL
        self._mapped = False
        self._full = True
        self._no_populate = False
        self._win_lo = self._win_hi = 0

    def __dealloc__(self):
        self.release()

    cdef int load(self, int fd, size_t n, str path, bint no_populate, bint lazy) except -1:
        """Map (or read) the file's n bytes; lazy: populate only what ensure() asks for.

        no_populate (a test hook): behave as on a kernel without MADV_POPULATE_READ.
        """
        cdef int err = 0
        cdef void* mem
        self.release()
        self.n = n
        self._full = True
        self._no_populate = no_populate
        if n == 0:
            return 0
        with nogil:
            mem = mmap(NULL, n, PROT_READ, MAP_SHARED, fd, 0)
            if mem == MAP_FAILED:
                err = errno
            else:
                self._mem = mem
                self._mapped = True
                self._full = not lazy
                self._win_hi = min(n, <size_t>WINDOW) if lazy else n
                if no_populate:
                    err = EINVAL
                elif madvise(mem, self._win_hi, MADV_POPULATE_READ) != 0:
                    err = errno
                if err:
                    munmap(mem, n)
                    self._mem = NULL
                    self._mapped = False
            if err == EINVAL or err == ENOSYS:
                err = 0
                self._full = True   # read whole: nothing left to populate
                self._mem = malloc(n)
                if self._mem == NULL:
                    err = ENOMEM
                else:
                    err = _read_all(fd, <unsigned char*>self._mem, n, 0)
        if err:
            self.release()
            raise OSError(err, f"reading a WAL segment: {os.strerror(err)}", path)
        self.data = <const unsigned char*>self._mem
        return 0

    cdef inline int ensure(self, size_t lo, size_t hi, str path) except -1:
        """Make bytes [lo, hi) readable (hi is clipped to the file)."""
        if self._full or (lo >= self._win_lo and hi <= self._win_hi):
            return 0
        return self._populate(lo, hi, path)

    cdef int _populate(self, size_t lo, size_t hi, str path) except -1:
        cdef size_t a = lo - lo % PAGE, b = min(self.n, max(hi, lo + WINDOW))
        cdef int err = 0
        if a >= b:
            return 0
        with nogil:
            if self._no_populate:
                err = EINVAL
            elif madvise(<unsigned char*>self._mem + a, b - a, MADV_POPULATE_READ) != 0:
                err = errno
        if err:
            raise OSError(err, f"reading a WAL segment: {os.strerror(err)}", path)
        self._win_lo = a
        self._win_hi = b
        return 0

    cdef void release(self) noexcept:
        if self._mapped:
            munmap(self._mem, self.n)
        elif self._mem != NULL:
            free(self._mem)
        self._mem = NULL
        self._mapped = False
        self._full = True
        self.data = _NOTHING


cdef class _Segment:
    cdef readonly uint32_t seq
    cdef readonly str path
    cdef int fd
    cdef int64_t size   # end of the records written so far
    cdef int64_t cap    # file size (preallocated)

    def __cinit__(self, uint32_t seq, str path, int fd, int64_t size, int64_t cap):
        self.seq = seq
        self.path = path
        self.fd = fd
        self.size = size
        self.cap = cap

    cdef close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


cdef class Wal:
    """A segmented, checksummed log of Raft entries, hard state and snapshot marks.

    Indexes: entries live in (base_index, last_index]; base_index/base_term is
    the entry just before the first retained one (0/0 for a fresh log, or the
    snapshot a follower installed). Mutators (append, write_snapshot, compact)
    are serialized by one mutex and do their disk I/O without the GIL and
    without the reader lock; readers (entries, term) take the reader lock only
    to look at published state, so they never wait for an fsync.
    """

    cdef readonly str path
    cdef readonly int64_t segment_bytes
    cdef readonly uint64_t base_index, base_term, last_index
    cdef readonly tuple hard_state      # (term, vote, commit)
    cdef readonly tuple snapshot        # (index, term, voters, learners) or None
    cdef public bint testing_fail_fsync, testing_skip_fsync, testing_skip_crc
    cdef dict _segs                     # seq -> _Segment
    cdef list _order                    # seqs ascending
    cdef _Segment _cur
    cdef Loc* _locs
    cdef size_t _loc_start, _loc_cap
    cdef Loc* _pend
    cdef size_t _pend_cap
    cdef unsigned char* _buf
    cdef size_t _buf_cap
    cdef object _lock, _mutex, _failed, _factory, _lockfd
    cdef list _cache
    cdef uint64_t _cache_first
    cdef int64_t _cache_bytes, _cache_max
    cdef bint _closed
    cdef uint64_t _applied_at_open
    cdef bint _repair_tail
    cdef readonly object repaired       # what repair_tail=True cut, or None (see Recovery rules)

    def __cinit__(self):
        self._locs = NULL
        self._pend = NULL
        self._buf = NULL
        self._closed = True

    def __dealloc__(self):
        free(self._locs)
        free(self._pend)
        free(self._buf)

    def __init__(self, str path, int64_t segment_bytes=64 << 20, entry_factory=None,
                 int64_t cache_bytes=32 << 20, uint64_t applied_index=0, bint repair_tail=False):
        """Open (or create) the log in directory `path` and recover it.

        entry_factory(index, term, type, data) builds what entries() returns
        for entries read from disk (default: a tuple); entries passed to
        append() are cached as given, up to cache_bytes of payload.
        applied_index: entries up to it are already in the state machine, so
        outside the last segment their payload checksums are verified when
        they are read (as every read does), not at open (see Recovery rules).
        repair_tail: the operator's repair (`kvstore wal repair`): cut the last
        segment at its first bad record even where it is refused otherwise;
        `repaired` then says what was dropped.
        """
        if segment_bytes < 4096:
            raise ValueError("segment_bytes must be at least 4096")
        self.path = os.path.abspath(path)
        self.segment_bytes = segment_bytes
        self._factory = entry_factory
        self._cache = []
        self._cache_first = 0
        self._cache_bytes = 0
        self._cache_max = cache_bytes
        self._segs = {}
        self._order = []
        self._lock = threading.Lock()
        self._mutex = threading.Lock()
        self._failed = None
        self.testing_fail_fsync = bool(_testing_fail_fsync) or os.environ.get("KVSTORE_WAL_TESTING_FAIL_FSYNC") == "1"
        self.testing_skip_fsync = bool(_testing_skip_fsync) or os.environ.get("KVSTORE_WAL_TESTING_SKIP_FSYNC") == "1"
        self.testing_skip_crc = bool(_testing_skip_crc)
        self.hard_state = (0, 0, 0)
        self.snapshot = None
        self._applied_at_open = applied_index
        self._repair_tail = repair_tail
        self.repaired = None
        os.makedirs(self.path, exist_ok=True)
        self._lockfd = os.open(os.path.join(self.path, "LOCK"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            _fcntl.flock(self._lockfd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lockfd)
            raise WalError(f"WAL {self.path} is open in another process") from None
        self._closed = False
        try:
            self._recover()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ locs

    cdef inline Loc* _loc(self, uint64_t index) noexcept nogil:
        return &self._locs[self._loc_start + (index - self.base_index - 1)]

    cdef void _reserve_locs(self, size_t extra) except *:
        cdef size_t count = self.last_index - self.base_index
        cdef size_t need = count + extra
        cdef Loc* p
        cdef size_t cap = max(need * 2, <size_t>1024)
        if self._loc_start + need <= self._loc_cap:
            return
        if self._loc_start:  # slide the live part down over compacted slots
            memmove(self._locs, self._locs + self._loc_start, count * sizeof(Loc))
            self._loc_start = 0
            if need <= self._loc_cap // 2:
                return
        p = <Loc*>realloc(self._locs, cap * sizeof(Loc))
        if p == NULL:
            raise MemoryError()
        self._locs = p
        self._loc_cap = cap

    cdef void _reserve_buf(self, size_t n) except *:
        cdef unsigned char* p
        if n <= self._buf_cap:
            return
        n = max(n, self._buf_cap * 2)
        p = <unsigned char*>realloc(self._buf, n)
        if p == NULL:
            raise MemoryError()
        self._buf = p
        self._buf_cap = n

    cdef void _reserve_pend(self, size_t n) except *:
        cdef Loc* p
        if n <= self._pend_cap:
            return
        n = max(n, self._pend_cap * 2)
        p = <Loc*>realloc(self._pend, n * sizeof(Loc))
        if p == NULL:
            raise MemoryError()
        self._pend = p
        self._pend_cap = n

    cdef uint64_t _term_of(self, uint64_t index) except? 0:
        if index == self.base_index:
            return self.base_term
        if index < self.base_index:
            raise WalCompactedError(index)
        if index > self.last_index:
            raise WalUnavailableError(index)
        return self._loc(index).term

    # -------------------------------------------------------------- recovery

    cdef _recover(self):
        names = sorted(os.listdir(self.path))
        for name in names:
            if name.endswith(".wal.tmp"):
                log.info("removing unfinished segment %s", name)
                os.unlink(os.path.join(self.path, name))
        seqs = [int(m.group(1), 16) for m in map(_SEGMENT_RE.match, names) if m]
        if not seqs:
            self.base_index = self.base_term = self.last_index = 0
            self._cur = None
            self._roll(0)
            return
        cdef int k
        cdef object reset_seq = None
        for k in range(len(seqs)):
            if self._scan_segment(seqs[k], k == 0, k == len(seqs) - 1):
                reset_seq = seqs[k]
        self._cur = self._segs[seqs[len(seqs) - 1]]
        if self._cur.cap < self.segment_bytes:
            self._preallocate(self._cur.fd, self.segment_bytes, self._cur.path)
            self._cur.cap = self.segment_bytes
        self._drop_dead_segments()

    cdef bint _scan_segment(self, uint32_t seq, bint first, bint last) except *:
        """Replay one segment into memory; True if it holds a snapshot reset."""
        cdef str path = os.path.join(self.path, f"{seq:016x}.wal")
        cdef int fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        cdef int64_t n
        try:
            n = os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise
        cdef _Segment seg = _Segment(seq, path, fd, 0, n)
        self._segs[seq] = seg   # registered first: close() closes fd whatever happens next
        self._order.append(seq)
        cdef _FileImage image = _FileImage()
        cdef bint reset = False
        cdef int64_t cut
        # The last segment is read whole (torn-tail judgement, probe); the others lazily if entries may be trusted.
        image.load(fd, n, path, _testing_read_segments, not last and self._applied_at_open > 0)
        try:
            cut = self._scan_records(seg, image, n, first, last, &reset)
        finally:
            image.release()
        if cut >= 0:  # after the unmap: no page of the mapping may outlive the truncation
            if ftruncate(fd, cut) != 0:
                self._fail(errno, "ftruncate", path)
            self._preallocate(fd, max(n, self.segment_bytes), path)
            try:
                os.fsync(fd)
            except OSError as e:
                self._fail(e.errno or EIO, "fsync", path)
            seg.cap = max(n, self.segment_bytes)
        return reset

    cdef int64_t _scan_records(self, _Segment seg, _FileImage image, size_t n, bint first, bint last,
                               bint* reset_out) except -2:
        """Check and index one segment's records (image: its n bytes); the offset to cut a torn tail at, or -1."""
        cdef const unsigned char* base = image.data
        cdef bint trusted
        cdef uint64_t applied = self._applied_at_open
        cdef str path = seg.path
        cdef uint32_t seq = seg.seq
        cdef size_t off = 0
        cdef const char* why = NULL
        cdef const unsigned char* p
        cdef uint32_t plen
        cdef uint64_t idx, term
        cdef uint8_t kind
        cdef bint skip_crc = self.testing_skip_crc
        cdef Loc* l
        cdef object bad = None
        while True:
            image.ensure(off, off + HDR, path)
            if _all_zero(base + off, min(<size_t>HDR, n - off)):
                break  # the zeroed tail (or the exact end of the file)
            # An applied entry outside the last segment: its header is checked here, its payload when read.
            trusted = not last and n - off >= HDR and base[off + 12] == KIND_ENTRY and _rd64(base + off + 16) <= applied
            if not trusted and n - off >= HDR:
                image.ensure(off, off + HDR + min(<size_t>_rd32(base + off + 8), n - off - HDR), path)
            if (_check_header(base + off, n - off, skip_crc, &why) if trusted
                    else _check_record(base + off, n - off, skip_crc, &why)) != 0:
                bad = why.decode()
                break
            p = base + off
            plen = _rd32(p + 8)
            kind = p[12]
            idx = _rd64(p + 16)
            term = _rd64(p + 24)
            if off == 0 and kind != KIND_SEGHEAD:
                raise WalCorruptionError(path, off, "segment does not start with a head record")
            if kind == KIND_SEGHEAD:
                if off != 0 or plen != len(MAGIC) or PyBytes_FromStringAndSize(<char*>p + HDR, plen) != MAGIC:
                    raise WalCorruptionError(path, off, "misplaced or foreign segment head")
                if first:
                    self.base_index = self.last_index = idx
                    self.base_term = term
                elif idx != self.last_index or (idx > self.base_index and self._term_of(idx) != term) \
                        or (idx == self.base_index and self.base_term != term):
                    raise WalCorruptionError(
                        path, off, f"segment head continues from index {idx} term {term}, "
                        f"but the log before it ends at index {self.last_index}")
            elif kind == KIND_ENTRY:
                if idx != self.last_index + 1:
                    raise WalCorruptionError(path, off, f"entry index {idx} does not follow {self.last_index}")
                self._reserve_locs(1)
                l = &self._locs[self._loc_start + (self.last_index - self.base_index)]
                l.off = off
                l.term = term
                l.seg = seq
                l.len = plen
                l.etype = p[13]
                self.last_index = idx
            elif kind == KIND_HARDSTATE:
                if plen != 24:
                    raise WalCorruptionError(path, off, "hard state record of wrong size")
                self.hard_state = (_rd64(p + HDR), _rd64(p + HDR + 8), _rd64(p + HDR + 16))
            elif kind == KIND_TRUNCATE:
                if idx == 0 or idx > self.last_index + 1:
                    raise WalCorruptionError(path, off, f"truncation at {idx} beyond the log end {self.last_index}")
                if idx - 1 < self.base_index:
                    self.base_index = idx - 1
                    self.base_term = term
                    self._loc_start = 0
                self.last_index = idx - 1
            elif kind == KIND_SNAPSHOT:
                self.snapshot = self._parse_snapshot(path, off, p, plen, idx, term)
                if p[13] & 1:
                    reset_out[0] = True
                    self.base_index = self.last_index = idx
                    self.base_term = term
                    self._loc_start = 0
            off += HDR + plen
        seg.size = off
        if off == 0:
            raise WalCorruptionError(path, 0, "segment has no head record" if bad is None else bad)
        if not last:
            if bad is not None:
                raise WalCorruptionError(path, off, bad)
            return -1
        header_ok = off + HDR <= <size_t>n and (skip_crc or kv_crc32c(0, base + off + 4, HDR - 4) == _rd32(base + off))
        cdef bint torn = bad is None or _looks_torn(base, off, n, header_ok)
        cdef size_t probe = self._probe(base, off, n, bad is not None)
        if self._repair_tail and (not torn or probe != <size_t>-1):
            self.repaired = self._cut_for_repair(path, base, off, n, bad or "end of records", probe)
            return off
        if not torn:
            raise WalCorruptionError(path, off, bad + " (not a torn write: no zeroed sector)")
        if probe != <size_t>-1:
            raise WalCorruptionError(
                path, off, f"{bad or 'end of records'}, but a valid record follows at offset {probe}")
        if bad is not None or off < <size_t>n and not _all_zero(base + off, n - off):
            nz = n - off
            log.warning("WAL %s: cut torn tail at offset %d (%s): discarded %d bytes",
                        path, off, bad or "garbage after the last record", nz)
            return off
        return -1

    cdef dict _cut_for_repair(self, str path, const unsigned char* base, size_t off, size_t n, str bad,
                              size_t probe):
        """What cutting the last segment at `off` drops (the intact records found after it, by probing).

        Refused when the log would end below the commit index of the hard
        state that survives: a batch writes its hard state after its entries,
        so a cut at a torn write never leaves that; the log is damaged elsewhere.
        """
        cdef const char* why = NULL
        cdef size_t pos = probe
        cdef uint64_t idx, top = 0
        cdef int entries = 0, others = 0
        while pos != <size_t>-1 and pos < n:
            while pos + HDR <= n and not _all_zero(base + pos, HDR) and _check_record(base + pos, n - pos, False, &why) == 0:
                if base[pos + 12] == KIND_ENTRY:
                    idx = _rd64(base + pos + 16)
                    top = max(top, idx)
                    entries += 1
                else:
                    others += 1
                pos += HDR + _rd32(base + pos + 8)
            pos = self._probe(base, pos, n, True) if pos < n else <size_t>-1
        commit = self.hard_state[2]
        if self.last_index < commit:
            raise WalCorruptionError(
                path, off, f"{bad}; not repaired: the log would end at entry {self.last_index}, below the "
                f"commit index {commit} its hard state records (not a torn last write; rebuild this member "
                f"from a healthy one)")
        dropped = {"path": path, "offset": off, "bytes": n - off, "reason": bad, "last_index": self.last_index,
                   "entries_after": entries, "other_records_after": others,
                   "dropped_through": top if top > self.last_index else None}
        log.warning("WAL %s: repair cut at offset %d (%s): dropped %d bytes, %d intact entries and %d other "
                    "records after it; the log ends at entry %d", path, off, bad, n - off, entries, others,
                    self.last_index)
        return dropped

    cdef size_t _probe(self, const unsigned char* base, size_t off, size_t n, bint torn):
        """Offset of a valid record within PROBE_BYTES after a stop point, or -1."""
        cdef const char* why = NULL
        cdef size_t start = off + 1 if torn else off
        cdef size_t end = min(n, off + PROBE_BYTES)
        cdef size_t i
        if not torn:
            # a clean end: skip the zero run, then look near the first non-zero byte
            while start < end and base[start] == 0:
                start += 1
            if start >= end:
                return <size_t>-1
            start = off if start < off + HDR else start - HDR
        for i in range(start, end):
            if i + HDR <= n and base[i + 12] >= 2 and base[i + 12] <= 5 \
                    and _check_record(base + i, n - i, False, &why) == 0:
                return i
        return <size_t>-1

    cdef tuple _parse_snapshot(self, str path, size_t off, const unsigned char* p, uint32_t plen,
                               uint64_t idx, uint64_t term):
        cdef uint32_t nv, nl, i
        if plen < 8:
            raise WalCorruptionError(path, off, "snapshot record too short")
        nv = _rd32(p + HDR)
        nl = _rd32(p + HDR + 4)
        if plen != 8 + 8 * (<uint64_t>nv + nl):
            raise WalCorruptionError(path, off, "snapshot record of wrong size")
        q = p + HDR + 8
        voters = tuple([_rd64(q + 8 * i) for i in range(nv)])
        learners = tuple([_rd64(q + 8 * (nv + i)) for i in range(nl)])
        return (idx, term, voters, learners)

    # ------------------------------------------------------------- segments

    cdef _preallocate(self, int fd, int64_t size, str path):
        cdef int r
        with nogil:
            r = posix_fallocate(fd, 0, size)
        if r != 0:
            self._fail(r, "fallocate", path)

    cdef _fail(self, int err, str what, str path, str detail=""):
        """Poison the Wal and raise: `what` (the syscall) failed on `path`."""
        exc = WalFsyncError(err, os.strerror(err) + detail, path, what)
        self._failed = exc
        raise exc

    cdef _fail_os(self, object e, str what):
        """Poison the Wal with an OSError from a file-system call (rename, unlink, open)."""
        if isinstance(e, WalFsyncError):
            self._failed = e
            raise e
        self._fail(e.errno or EIO, what, e.filename or self.path)

    cdef _sync(self, int fd, str path):
        """fdatasync (or the test hooks' idea of it); poisons the Wal on failure."""
        cdef int r = 0
        if self.testing_fail_fsync:
            self._fail(_errno.EIO, "fdatasync", path, " (injected)")
        if self.testing_skip_fsync:
            return
        with nogil:
            r = fdatasync(fd)
        if r != 0:
            self._fail(errno, "fdatasync", path)

    cdef _sync_dir(self):
        """fsync the log's directory (a segment created, renamed or removed); poisons the Wal on failure."""
        cdef int fd = -1
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            os.fsync(fd)
        except OSError as e:
            self._fail(e.errno or EIO, "fsync" if fd >= 0 else "open", self.path)
        finally:
            if fd >= 0:
                os.close(fd)

    cdef _roll(self, size_t needed):
        """Start a new segment big enough for `needed` more bytes; publish it."""
        cdef uint32_t seq = self._order[len(self._order) - 1] + 1 if self._order else 1
        cdef str final = os.path.join(self.path, f"{seq:016x}.wal")
        cdef str tmp = final + ".tmp"
        prev_term = self._term_of(self.last_index)
        head = _record(KIND_SEGHEAD, 0, self.last_index, prev_term, MAGIC)
        head += _record(KIND_HARDSTATE, 0, 0, 0, _u64s(self.hard_state))
        if self.snapshot is not None:
            head += _record(KIND_SNAPSHOT, 0, self.snapshot[0], self.snapshot[1], _snapshot_payload(self.snapshot))
        cdef int64_t cap = max(self.segment_bytes, <int64_t>(needed + len(head)))
        cdef int fd = -1
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as e:
            self._fail_os(e, "open")
        cdef int r
        cdef const unsigned char* hp = <const unsigned char*>PyBytes_AS_STRING(head)
        cdef size_t hn = len(head)
        try:
            self._preallocate(fd, cap, tmp)
            with nogil:
                r = _write_all(fd, hp, hn, 0)
            if r:
                self._fail(r, "write", tmp)
            self._sync(fd, tmp)
            try:
                os.rename(tmp, final)
            except OSError as e:
                self._fail_os(e, "rename")
            self._sync_dir()
        except BaseException:
            os.close(fd)
            raise
        seg = _Segment(seq, final, fd, hn, cap)
        with self._lock:
            self._segs[seq] = seg
            self._order.append(seq)
        self._cur = seg

    cdef _drop_dead_segments(self):
        """Delete whole segments that hold no live entry (never the current one)."""
        cdef uint32_t keep_from = self._cur.seq
        if self.last_index > self.base_index:
            keep_from = min(keep_from, self._loc(self.base_index + 1).seg)
        dead = []
        with self._lock:
            while self._order and self._order[0] < keep_from:
                seg = self._segs.pop(self._order.pop(0))
                (<_Segment>seg).close()
                dead.append(seg)
        for seg in dead:
            try:
                os.unlink((<_Segment>seg).path)
            except OSError as e:
                self._fail_os(e, "unlink")
            log.info("dropped WAL segment %s", (<_Segment>seg).path)
        if dead:
            self._sync_dir()

    # -------------------------------------------------------------- writing

    cdef _check_open(self):
        if self._failed is not None:
            raise WalFsyncError(self._failed.errno, f"WAL is unusable after an earlier failure: {self._failed}",
                                self.path, "write")
        if self._closed:
            raise WalError("WAL is closed")

    def append(self, list entries, hard_state=None):
        """Durably append entries (cutting a conflicting suffix first) and a hard state.

        Entries are objects with .index, .term, .type and .data (bytes); they
        must be consecutive. One write and one fdatasync, GIL released for both.
        """
        with self._mutex:
            self._check_open()
            self._write(entries, hard_state, None, False)

    def write_snapshot(self, uint64_t index, uint64_t term, voters=(), learners=(), bint reset=False):
        """Record snapshot metadata durably; with reset, discard the log and restart after index."""
        snap = (index, term, tuple(int(v) for v in voters), tuple(int(v) for v in learners))
        with self._mutex:
            self._check_open()
            self._write([], None, snap, reset)
            if reset:
                self._drop_dead_segments()

    cdef _write(self, list entries, object hard_state, tuple snap, bint reset):
        cdef Py_ssize_t count = len(entries), i
        cdef uint64_t first = 0, idx, term, prev_term = 0, trunc = 0
        cdef size_t total = 0, pos, n
        cdef object e, data
        cdef bytes pre = b"", post = b""
        cdef unsigned char* p
        cdef Loc* l
        cdef int r
        cdef uint32_t seq
        if count:
            first = entries[0].index
            if first <= self.base_index:
                raise ValueError(f"cannot replace entry {first}: at or below the log base {self.base_index}")
            if first > self.last_index + 1:
                raise ValueError(f"entry {first} would leave a gap after {self.last_index}")
            prev_term = self._term_of(first - 1)
            if first <= self.last_index:
                trunc = first
                pre = _record(KIND_TRUNCATE, 0, first, prev_term, b"")
        if snap is not None:
            post += _record(KIND_SNAPSHOT, 1 if reset else 0, snap[0], snap[1], _snapshot_payload(snap))
        if hard_state is not None:
            hard_state = (int(hard_state[0]), int(hard_state[1]), int(hard_state[2]))
            post += _record(KIND_HARDSTATE, 0, 0, 0, _u64s(hard_state))
        # size the batch, validating as we go
        for i in range(count):
            e = entries[i]
            data = e.data
            if type(data) is not bytes:
                raise TypeError(f"entry {e.index}: data must be bytes, not {type(data).__name__}")
            if e.index != first + i:
                raise ValueError(f"entries are not consecutive at position {i}: index {e.index}")
            total += HDR + PyBytes_GET_SIZE(data)
        total += len(pre) + len(post)
        if total == 0:
            return
        if self._cur.size + <int64_t>total > self._cur.cap:
            self._roll(total)
        self._reserve_buf(total)
        self._reserve_pend(count)
        p = self._buf
        memcpy(p, PyBytes_AS_STRING(pre), len(pre))
        pos = len(pre)
        seq = self._cur.seq
        for i in range(count):
            e = entries[i]
            data = e.data
            term = e.term
            if term < prev_term:
                raise ValueError(f"entry {first + i}: term {term} goes back from {prev_term}")
            prev_term = term
            n = PyBytes_GET_SIZE(data)
            memcpy(p + pos + HDR, PyBytes_AS_STRING(data), n)
            _put_header(p + pos, KIND_ENTRY, <uint8_t>(<int>e.type), first + i, term, <uint32_t>n)
            l = &self._pend[i]
            l.off = self._cur.size + pos
            l.term = term
            l.seg = seq
            l.len = <uint32_t>n
            l.etype = p[pos + 13]
            pos += HDR + n
        memcpy(p + pos, PyBytes_AS_STRING(post), len(post))
        cdef int fd = self._cur.fd
        cdef off_t at = self._cur.size
        cdef int64_t added = 0
        with nogil:
            r = _write_all(fd, p, total, at)
        if r:
            self._fail(r, "write", self._cur.path)
        self._sync(fd, self._cur.path)
        self._cur.size += total
        # publish
        with self._lock:
            if trunc:
                self.last_index = trunc - 1
                if self._cache and trunc <= self._cache_first + len(self._cache) - 1:
                    if trunc <= self._cache_first:
                        self._cache = []
                    else:
                        del self._cache[trunc - self._cache_first:]
            if count:
                self._reserve_locs(count)
                memcpy(self._loc(first), self._pend, count * sizeof(Loc))
                self.last_index = first + count - 1
                if not self._cache:
                    self._cache_first = first
                self._cache.extend(entries)
                for i in range(count):
                    added += self._pend[i].len + 64
                self._trim_cache(added)
            if snap is not None:
                self.snapshot = snap
                if reset:
                    self.base_index = self.last_index = snap[0]
                    self.base_term = snap[1]
                    self._loc_start = 0
                    self._cache = []
            if not self._cache:
                self._cache_bytes = 0
            if hard_state is not None:
                self.hard_state = hard_state

    cdef _trim_cache(self, int64_t added):
        """Keep the cache a suffix of the log within cache_bytes of payload (+64 B each).

        When over budget, cut back to 3/4 of it, so the O(n) list slice is
        paid once per quarter-budget of appends. The running total only ever
        overestimates (truncation and compaction do not subtract).
        """
        cdef uint64_t i
        cdef int64_t keep = 0, budget = self._cache_max * 3 // 4, sz
        self._cache_bytes += added
        if self._cache_bytes <= self._cache_max or not self._cache:
            return
        i = self.last_index
        while i >= self._cache_first:
            sz = self._loc(i).len + 64
            if keep + sz > budget:
                break
            keep += sz
            i -= 1
        del self._cache[:i + 1 - self._cache_first]
        self._cache_first = i + 1
        self._cache_bytes = keep

    def compact(self, uint64_t index):
        """Forget entries <= index (term(index) stays known) and delete dead segments."""
        with self._mutex:
            self._check_open()
            if index <= self.base_index:
                return
            if index > self.last_index:
                raise WalUnavailableError(f"cannot compact to {index}: last index is {self.last_index}")
            with self._lock:
                t = self._term_of(index)
                self._loc_start += index - self.base_index
                self.base_index = index
                self.base_term = t
                if self._cache and self._cache_first <= index:
                    if index + 1 - self._cache_first >= <uint64_t>len(self._cache):
                        self._cache = []
                    else:
                        del self._cache[:index + 1 - self._cache_first]
                        self._cache_first = index + 1
            self._drop_dead_segments()

    # -------------------------------------------------------------- reading

    def term(self, uint64_t index):
        """Term of the entry at index (base_term at base_index)."""
        with self._lock:
            return self._term_of(index)

    def entries(self, uint64_t lo, uint64_t hi, max_bytes=None):
        """Entries [lo, hi), at least one, then while the payload total stays <= max_bytes."""
        cdef int64_t limit = -1 if max_bytes is None else max_bytes
        cdef int64_t total = 0
        cdef uint64_t j, a, b, c
        cdef list out
        with self._lock:
            if self._closed:
                raise WalError("WAL is closed")
            if lo <= self.base_index:
                raise WalCompactedError(lo)
            if hi > self.last_index + 1:
                raise WalUnavailableError(hi - 1)
            if lo >= hi:
                return []
            j = lo
            while j < hi:
                total += self._loc(j).len
                if j > lo and limit >= 0 and total > limit:
                    break
                j += 1
            out = []
            a = lo
            c = min(j, self._cache_first) if self._cache else j
            while a < c:   # runs of the same segment read from disk
                b = a
                while b + 1 < c and self._loc(b + 1).seg == self._loc(a).seg:
                    b += 1
                self._read_run(a, b, out)
                a = b + 1
            if a < j:
                out.extend(self._cache[a - self._cache_first:j - self._cache_first])
            return out

    cdef _read_run(self, uint64_t a, uint64_t b, list out):
        cdef Loc* la = self._loc(a)
        cdef Loc* lb = self._loc(b)
        cdef _Segment seg = self._segs[la.seg]
        cdef uint64_t start = la.off
        cdef size_t span = lb.off + HDR + lb.len - start
        cdef bytes buf = PyBytes_FromStringAndSize(NULL, span)
        cdef unsigned char* p = <unsigned char*>PyBytes_AS_STRING(buf)
        cdef int fd = seg.fd, r
        cdef uint64_t i
        cdef const char* why = NULL
        cdef Loc* l
        cdef const unsigned char* q
        with nogil:
            r = _read_all(fd, p, span, start)
        if r:
            raise OSError(r, os.strerror(r), seg.path)
        factory = self._factory
        for i in range(a, b + 1):
            l = self._loc(i)
            q = p + (l.off - start)
            if _check_record(q, span - (l.off - start), self.testing_skip_crc, &why) != 0 \
                    or q[12] != KIND_ENTRY or _rd64(q + 16) != i:
                raise WalCorruptionError(seg.path, l.off, why.decode() if why != NULL else "not the expected entry")
            data = PyBytes_FromStringAndSize(<const char*>q + HDR, l.len)
            if factory is None:
                out.append((i, l.term, l.etype, data))
            else:
                out.append(factory(i, l.term, l.etype, data))

    # ---------------------------------------------------------------- misc

    def size_bytes(self):
        """Bytes the live segment files occupy on disk (preallocation included)."""
        with self._lock:
            return sum((<_Segment>s).cap for s in self._segs.values())

    def segment_paths(self):
        with self._lock:
            return [(<_Segment>self._segs[s]).path for s in self._order]

    def close(self):
        """Close the files; the Wal cannot be used afterwards."""
        with self._mutex:
            with self._lock:
                if self._closed:
                    return
                self._closed = True
                for s in self._segs.values():
                    (<_Segment>s).close()
                self._segs = {}
                self._order = []
                self._cache = []
                os.close(self._lockfd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
