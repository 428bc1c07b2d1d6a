"""Looking into the archives clamd answers ``OK`` for without having looked inside.

Invariant: a file clamd called clean keeps that verdict only if watcher found, in every ZIP or 7z
in it (nested ones included), nothing clamd 1.4 mis-reads; where it found such a form, every
member was sent to clamd over INSTREAM; anything it could not look into makes the file
unscannable, with a `Cause`. Measured blind spots of clamd 1.4.6 (docs/archives.md):

- ZIP64 (Info-ZIP ``zip -fz``, Python's ``force_zip64``, every archive over 4 GiB), also nested;
- several zips in one file (clamd reads one central directory), or a zip after other data;
- encrypted ZIP and 7z (``OK`` unless AlertEncrypted): refused here, whatever clamd says,
  unless `ArchiveLimits.accept_encrypted`.

Two passes. The survey parses every container (central directories, local headers, the first
bytes of each member) and enforces the limits, without clamd; only when it met a blind form does
the second pass extract every member as a stream (never to disk) and scan it. Nested archives are
held in memory, at most `max_file_bytes` in all at once, and walked with an explicit stack of
generators: an uploader chooses the depth, never our call stack.

Parser: the standard library's `zipfile`, over a seekable view of the file (``os.pread`` on the
open fd, never the path). It reads the central directory as clamd does, with ZIP64 records;
data descriptors cost nothing (sizes come from the central directory); it opens single
members lazily, so a member's first bytes tell whether it is an archive without inflating the
rest; and its reads stop at the declared size, with the CRC checked. What it does not do, done
here: several archives in one file (each earlier one is found by opening the bytes before the
start of the last), and local entries outside the central directory (a zip-hiding trick, and
what a streaming parser such as stream-unzip would read instead: it stops at the first central
directory and does not look back). 7z: py7zr reads the (possibly compressed) header to tell
whether contents or header are encrypted; clamd itself reads unencrypted 7z, and its members
are not walked here. tar (``tarfile`` in stream mode) and gzip, bzip2 and xz streams are read
front to back, so that a ZIP64 inside a .tar.gz is found; a stream is never held whole.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import struct
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Literal, Protocol, cast

from watcher.logs import emit
from watcher.verdict import Cause, Clean, Infected, NotScanned, Verdict

if TYPE_CHECKING:
    from watcher.settings import Settings

ZIP_LOCAL = b"PK\x03\x04"
ZIP_END = b"PK\x05\x06"
ZIP64_LOCATOR = b"PK\x06\x07"
SEVENZ_MAGIC = b"7z\xbc\xaf\x27\x1c"
_ZIP_HEADS = (ZIP_LOCAL, ZIP_END, b"PK\x07\x08")  # PK78: a spanned archive's marker
_BZ2_BLOCKS = (b"1AY&SY", b"\x17\x72\x45\x38\x50\x90")  # a block, or the end of the stream
_DECOMPRESSORS: dict[str, Callable[[IO[bytes]], _Reader]] = {
    "gz": lambda f: gzip.GzipFile(fileobj=f, mode="rb"),
    "bz2": lambda f: bz2.BZ2File(f, "rb"),
    "xz": lambda f: lzma.LZMAFile(f, "rb"),  # noqa: SIM115 - closed by the walk
}
_HEAD_BYTES = 512  # enough for every magic number, tar's ("ustar" at 257) included
_TAIL_BYTES = 22 + 20 + 56 + 0xFFFF  # EOCD + ZIP64 locator + ZIP64 EOCD + longest comment
_LOCAL = struct.Struct("<4s5H3I2H")
_READ_BYTES = 1024 * 1024
_SUPPORTED_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
_RATIO_FLOOR_BYTES = 1024 * 1024  # small members may compress by any ratio: they cost nothing
_NAME_CHARS = 160
# What zipfile and its decompressors raise on damaged or hostile input.
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    EOFError,
    OSError,
    ValueError,
    struct.error,
    zlib.error,
    lzma.LZMAError,
    NotImplementedError,
    RuntimeError,
    tarfile.TarError,
)

Kind = Literal["zip", "7z", "tar", "gz", "bz2", "xz"]


class _Reader(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class ArchiveLimits:
    """Match clamd's own (MaxFileSize, MaxScanSize, MaxFiles, MaxRecursion) plus a ratio cap."""

    max_file_bytes: int = 100 * 1024 * 1024  # one member; also all nested archives held at once
    max_scan_bytes: int = 400 * 1024 * 1024  # all members of one upload together
    max_files: int = 10_000  # members of one upload, nested ones included
    max_depth: int = 17  # archives inside archives: this many is refused (clamd: MaxRecursion)
    max_ratio: int = 250  # uncompressed : compressed, for members over 1 MiB
    accept_encrypted: bool = False


class StreamScanner(Protocol):
    def scan_stream(self, chunks: Iterable[bytes]) -> Verdict: ...


class _Refused(Exception):
    def __init__(self, cause: Cause, reason: str) -> None:
        super().__init__(reason)
        self.cause: Cause = cause
        self.reason = reason


class _Detected(Exception):
    def __init__(self, verdict: Infected | NotScanned, member: str) -> None:
        super().__init__(member)
        self.verdict = verdict
        self.member = member


# -- seekable views over the upload's fd, or over a nested archive held in memory -----------


class _Source(Protocol):
    @property
    def size(self) -> int: ...

    def pread(self, size: int, offset: int) -> bytes: ...


@dataclass(frozen=True)
class FdSource:
    fd: int
    size: int

    def pread(self, size: int, offset: int) -> bytes:
        return os.pread(self.fd, size, offset)


@dataclass(frozen=True)
class _BytesSource:
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    def pread(self, size: int, offset: int) -> bytes:
        return self.data[offset : offset + size]


class _Window(io.RawIOBase):
    """The first `end` bytes of a source, as a seekable read-only file (what zipfile needs)."""

    def __init__(self, source: _Source, end: int) -> None:
        self._source = source
        self._end = end
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._end}[whence]
        if base + offset < 0:
            raise OSError(22, "negative seek position")
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        size = max(0, min(len(buffer), self._end - self._pos))
        data = self._source.pread(size, self._pos) if size else b""
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


def _open_window(source: _Source, end: int) -> io.BufferedReader:
    return io.BufferedReader(_Window(source, end), buffer_size=64 * 1024)


# -- the walk ---------------------------------------------------------------------------------


@dataclass
class _Container:
    source: _Source
    kind: Kind
    depth: int
    path: str  # where it is, for reasons: "inner.zip/deeper.zip"


@dataclass
class _Walk:
    """One pass over an upload's archive tree. With `scan`, every member goes to clamd."""

    limits: ArchiveLimits
    scan: Callable[[Iterable[bytes]], Verdict] | None = None
    blind: set[str] = field(default_factory=set)  # forms clamd mis-reads, met on the way
    members: int = 0
    scanned: int = 0
    encrypted_accepted: int = 0
    _bytes: int = 0
    _held_bytes: int = 0  # nested archives held in memory right now

    def run(self, root: _Container) -> None:
        stack: list[Iterator[_Container]] = [self._visit(root)]
        while stack:
            child = next(stack[-1], None)
            if child is None:
                stack.pop()
            else:
                stack.append(self._visit(child))

    def _visit(self, container: _Container) -> Iterator[_Container]:
        if container.depth >= self.limits.max_depth:
            raise _Refused("limits", f"archives nested {container.depth} deep: {container.path}")
        try:
            if container.kind == "7z":
                _check_7z(container, self)
            elif container.kind == "zip":
                yield from self._visit_zip(container)
            elif container.kind == "tar":
                window = _open_window(container.source, container.source.size)
                yield from self._visit_tar(container, window, container.depth)
            else:
                yield from self._visit_stream(container)
        except _ZIP_ERRORS as err:
            reason = f"unreadable {container.kind}: {_name(container)}: {err}"
            raise _Refused("malformed", reason) from err
        finally:
            if isinstance(container.source, _BytesSource):
                self._held_bytes -= container.source.size

    def _visit_zip(self, container: _Container) -> Iterator[_Container]:
        for archive in _zip_archives(container, self.blind):
            with archive:
                for info in archive.infolist():
                    yield from self._member(container, archive, info)

    def _member(
        self, container: _Container, archive: zipfile.ZipFile, info: zipfile.ZipInfo
    ) -> Iterator[_Container]:
        where = _where(container, info.filename)
        self.members += 1
        if self.members > self.limits.max_files:
            raise _Refused("limits", f"more than {self.limits.max_files} archive members")
        if info.flag_bits & 0x1 or info.compress_type == 99:  # 99: WinZip AES
            if not self.limits.accept_encrypted:
                raise _Refused("encrypted", f"encrypted archive member: {where}")
            self.encrypted_accepted += 1
            return
        if info.compress_type not in _SUPPORTED_METHODS:
            raise _Refused(
                "unsupported", f"compression method {info.compress_type} not readable: {where}"
            )
        if info.file_size == 0:
            return
        self._count(info.file_size, info.compress_size, where)
        try:
            with archive.open(info) as member:
                yield from self._content(container.depth, member, where)
        except _ZIP_ERRORS as err:
            raise _Refused("malformed", f"unreadable archive member {where}: {err}") from err

    def _visit_tar(
        self, container: _Container, stream: _Reader, depth: int
    ) -> Iterator[_Container]:
        """A tar read front to back (`r|`: a compressed one is never held whole)."""
        with tarfile.open(fileobj=cast(IO[bytes], stream), mode="r|") as archive:
            for info in archive:
                if not info.isfile() or info.size == 0:
                    continue  # directories, links, devices: no content of their own
                where = _where(container, info.name)
                self.members += 1
                if self.members > self.limits.max_files:
                    raise _Refused("limits", f"more than {self.limits.max_files} archive members")
                self._count(info.size, info.size, where)
                member = archive.extractfile(info)
                assert member is not None  # a regular file
                yield from self._content(depth, member, where)

    def _visit_stream(self, container: _Container) -> Iterator[_Container]:
        """gzip, bzip2, xz: one compressed stream, sniffed, then walked as what it holds."""
        source, decompress = container.source, _DECOMPRESSORS[container.kind]
        sniffing = decompress(_open_window(source, source.size))
        try:
            kind = _kind_of(sniffing.read(_HEAD_BYTES))
        finally:
            sniffing.close()
        capped = _Capped(decompress(_open_window(source, source.size)), self.limits, container)
        try:
            if kind == "tar":
                yield from self._visit_tar(container, capped, container.depth + 1)
            else:
                yield from self._content(container.depth, capped, _name(container))
        finally:
            capped.close()

    def _content(self, depth: int, member: _Reader, where: str) -> Iterator[_Container]:
        """A member: a nested container (read into memory) or a leaf (scanned in the 2nd pass)."""
        head = member.read(_HEAD_BYTES)
        kind = _kind_of(head)
        if kind is not None:
            rest = member.read(self.limits.max_file_bytes + 1 - len(head))
            self._hold(len(head) + len(rest))
            yield self._nested(depth, kind, head + rest, where)
        elif self.scan is not None:
            self._scan(_chunks(head, member), where)

    def _count(self, size: int, packed_size: int, where: str) -> None:
        lim = self.limits
        ratio_cap = lim.max_ratio * max(packed_size, 1)
        if size > _RATIO_FLOOR_BYTES and size > ratio_cap:
            raise _Refused("limits", f"compression ratio over {lim.max_ratio}: {where}")
        if size > lim.max_file_bytes:
            raise _Refused("limits", f"member larger than {lim.max_file_bytes} bytes: {where}")
        self._bytes += size
        if self._bytes > lim.max_scan_bytes:
            raise _Refused("limits", f"archive members over {lim.max_scan_bytes} bytes in all")

    def _hold(self, size: int) -> None:
        """A nested archive is read into memory: all those on the stack within the cap."""
        if self._held_bytes + size > self.limits.max_file_bytes:
            raise _Refused("limits", f"nested archives over {self.limits.max_file_bytes} bytes")
        self._held_bytes += size

    def _nested(self, depth: int, kind: Kind, data: bytes, where: str) -> _Container:
        child = _Container(_BytesSource(data), kind, depth + 1, where)
        if kind == "7z" and self.scan is not None:
            self._scan([data], where)  # clamd reads 7z itself: only its encryption is checked
        return child

    def _scan(self, chunks: Iterable[bytes], where: str) -> None:
        assert self.scan is not None
        verdict = self.scan(chunks)
        self.scanned += 1
        if isinstance(verdict, Infected):
            raise _Detected(verdict, where)
        if isinstance(verdict, NotScanned):
            if verdict.cause == "encrypted" and self.limits.accept_encrypted:
                self.encrypted_accepted += 1
                return
            raise _Detected(verdict, where)


def _chunks(head: bytes, member: _Reader) -> Iterator[bytes]:
    yield head
    while chunk := member.read(_READ_BYTES):
        yield chunk


def _kind_of(head: bytes) -> Kind | None:
    if head.startswith(SEVENZ_MAGIC):
        return "7z"
    if head[:4] in _ZIP_HEADS:
        return "zip"
    if head[257:262] == b"ustar":
        return "tar"
    if head.startswith(b"\x1f\x8b\x08"):  # gzip, deflate
        return "gz"
    if head[:3] == b"BZh" and head[3:4].isdigit() and head[4:10] in _BZ2_BLOCKS:
        return "bz2"
    if head.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    return None


def _name(container: _Container) -> str:
    return container.path or "upload"


class _Capped:
    """A decompressing stream that refuses to give more than `max_file_bytes` (bombs)."""

    def __init__(self, stream: _Reader, limits: ArchiveLimits, container: _Container) -> None:
        self._stream = stream
        self._left = limits.max_file_bytes
        self._container = container

    def read(self, size: int = -1, /) -> bytes:
        data = self._stream.read(size if size >= 0 else self._left + 1)
        self._left -= len(data)
        if self._left < 0:
            limit = f"decompresses past the member limit: {_name(self._container)}"
            raise _Refused("limits", limit)
        return data

    def close(self) -> None:
        self._stream.close()


def _where(container: _Container, name: str) -> str:
    path = f"{container.path}/{name}" if container.path else name
    return path if len(path) <= _NAME_CHARS else "..." + path[-_NAME_CHARS:]


# -- ZIP structure ----------------------------------------------------------------------------


def _zip_archives(container: _Container, blind: set[str]) -> list[zipfile.ZipFile]:
    """Every zip in the container, last first: each earlier one ends where a later one starts.

    Adds to `blind` what clamd would not read: ZIP64 records, several archives, data before
    the first one. Raises `_Refused` for entries outside every central directory.
    """
    source = container.source
    found: list[zipfile.ZipFile] = []
    end = source.size
    while end > 0:
        try:
            archive = zipfile.ZipFile(_open_window(source, end))
        except _ZIP_ERRORS as err:
            _check_prefix(container, end, found, err)
            break
        found.append(archive)
        start = _check_entries(container, archive, end, blind)
        if start >= end:
            raise _Refused(
                "malformed", f"zip central directory points past itself: {container.path}"
            )
        end = start
    if len(found) > 1:
        blind.add("several zips in one file")
    elif end > 0:
        blind.add("zip after other data")
    return found


def _check_prefix(
    container: _Container, end: int, found: list[zipfile.ZipFile], err: Exception
) -> None:
    """Bytes before the first archive found (or the whole file) hold no zip entries."""
    if not found:
        if container.depth > 1 or container.source.pread(4, 0) in _ZIP_HEADS:
            raise _Refused("malformed", f"not a readable zip: {container.path or 'upload'}: {err}")
        return  # only its tail looked like a zip (an end-of-directory signature by chance)
    if _contains(container.source, ZIP_LOCAL, 0, end):
        raise _Refused("malformed", f"zip entries outside any central directory: {container.path}")


def _check_entries(
    container: _Container, archive: zipfile.ZipFile, end: int, blind: set[str]
) -> int:
    """Local headers agree with the central directory and cover the archive: its start."""
    source = container.source
    infos = sorted(archive.infolist(), key=lambda i: i.header_offset)
    start_dir: int = archive.start_dir
    if _contains(source, ZIP64_LOCATOR, max(0, end - _TAIL_BYTES), end):
        blind.add("zip64")
    covered = infos[0].header_offset if infos else start_dir
    for info in infos:
        header = source.pread(_LOCAL.size, info.header_offset)
        if len(header) < _LOCAL.size or header[:4] != ZIP_LOCAL:
            raise _Refused("malformed", f"bad local header: {_where(container, info.filename)}")
        fields = _LOCAL.unpack(header)
        name_len, extra_len = fields[9], fields[10]
        extra = source.pread(extra_len, info.header_offset + _LOCAL.size + name_len)
        if 0xFFFFFFFF in (fields[7], fields[8]) or _has_zip64(extra) or _has_zip64(info.extra):
            blind.add("zip64")
        if info.header_offset < covered:
            raise _Refused(
                "malformed", f"overlapping zip entries: {_where(container, info.filename)}"
            )
        _check_gap(container, covered, info.header_offset)  # data descriptors are read too
        covered = info.header_offset + _LOCAL.size + name_len + extra_len + info.compress_size
    _check_gap(container, covered, start_dir)
    return infos[0].header_offset if infos else start_dir


def _check_gap(container: _Container, start: int, end: int) -> None:
    if end > start and _contains(container.source, ZIP_LOCAL, start, end):
        raise _Refused("malformed", f"zip entries outside the central directory: {container.path}")


def _has_zip64(extra: bytes) -> bool:
    offset = 0
    while offset + 4 <= len(extra):
        tag, size = struct.unpack_from("<HH", extra, offset)
        if tag == 0x0001:
            return True
        offset += 4 + size
    return False


def _contains(source: _Source, needle: bytes, start: int, end: int) -> bool:
    """`needle` somewhere in source[start:end], read a chunk at a time."""
    overlap = len(needle) - 1
    offset = start
    while offset < end:
        chunk = source.pread(min(_READ_BYTES, end - offset), offset)
        if not chunk:
            return False
        if needle in chunk:
            return True
        if offset + len(chunk) >= end:
            return False
        offset += max(1, len(chunk) - overlap)
    return False


# -- 7z -----------------------------------------------------------------------------------------


def _check_7z(container: _Container, walk: _Walk) -> None:
    import py7zr  # imported on first use: most uploads are no 7z

    walk.members += 1
    try:
        with py7zr.SevenZipFile(_open_window(container.source, container.source.size)) as archive:
            encrypted = archive.needs_password()
    except py7zr.PasswordRequired:
        encrypted = True  # the header itself is encrypted (7z -mhe=on)
    except Exception as err:  # py7zr raises many kinds on hostile input; none is a verdict
        raise _Refused("malformed", f"not a readable 7z: {container.path}: {err!r}") from err
    if encrypted:
        if not walk.limits.accept_encrypted:
            raise _Refused("encrypted", f"encrypted 7z: {container.path or 'upload'}")
        walk.encrypted_accepted += 1


# -- the entry point --------------------------------------------------------------------------


def sniff(source: _Source) -> Kind | None:
    """An archive or compressed stream by its first bytes, or a zip by its end record."""
    kind = _kind_of(source.pread(_HEAD_BYTES, 0))
    if kind is not None:
        return kind
    tail_start = max(0, source.size - _TAIL_BYTES)
    if ZIP_END in source.pread(source.size - tail_start, tail_start):
        return "zip"
    return None


class Inspector:
    """`check` turns clamd's verdict on a whole upload into the final one."""

    def __init__(self, limits: ArchiveLimits, scanner: StreamScanner | None) -> None:
        self.limits = limits
        self._scan = scanner.scan_stream if scanner is not None else None

    def check(self, fd: int, verdict: Verdict) -> Verdict:
        """Called after clamd answered for the file's fd; reads the same fd with pread."""
        if self._accepted_encrypted(verdict):
            verdict = Clean()
        if not isinstance(verdict, Clean):
            return verdict
        source = FdSource(fd, os.fstat(fd).st_size)
        kind = sniff(source)
        if kind is None:
            return verdict
        return self.inspect(source, kind)

    def inspect(self, source: _Source, kind: Kind) -> Verdict:
        started = time.perf_counter()
        root = _Container(source, kind, depth=1, path="")
        survey = _Walk(self.limits)
        try:
            survey.run(root)
            if not survey.blind:
                return Clean()
            if self._scan is None:
                return NotScanned(
                    "no stream scanner to look into the archive", False, "unsupported"
                )
            scan = _Walk(self.limits, scan=self._scan)
            scan.run(root)
        except _Refused as refused:
            return NotScanned(refused.reason, transient=False, cause=refused.cause)
        except _Detected as found:
            return self._found(found, sorted(survey.blind))
        emit(
            "archive.inspected",
            forms=sorted(survey.blind),
            members=scan.members,
            scanned=scan.scanned,
            encrypted_accepted=scan.encrypted_accepted,
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
        )
        return Clean()

    def _found(self, found: _Detected, forms: list[str]) -> Verdict:
        verdict = found.verdict
        if isinstance(verdict, Infected):
            emit("archive.detected", forms=forms, member=found.member, signature=verdict.signature)
            return verdict
        reason = f"{verdict.reason} (archive member {found.member})"
        return NotScanned(reason, verdict.transient, verdict.cause)

    def _accepted_encrypted(self, verdict: Verdict) -> bool:
        return (
            self.limits.accept_encrypted
            and isinstance(verdict, NotScanned)
            and verdict.cause == "encrypted"
        )


def _as_clamd_said(fd: int, verdict: Verdict) -> Verdict:
    return verdict


def look_inside_from_settings(
    settings: Settings, scanner: object
) -> Callable[[int, Verdict], Verdict]:
    """What the daemon, the rescan and `watcher scan` call after clamd's verdict for an fd:
    the inspector's check, or clamd's verdict as it is with WATCHER_ARCHIVE_INSPECTION=false.
    A scanner without `scan_stream` (a test's scripted one) gets a survey-only inspector."""
    if not settings.archive_inspection:
        return _as_clamd_said
    limits = ArchiveLimits(
        max_file_bytes=settings.archive_max_member_bytes,
        max_scan_bytes=settings.archive_max_scan_bytes,
        max_files=settings.archive_max_files,
        max_depth=settings.archive_max_depth,
        max_ratio=settings.archive_max_ratio,
        accept_encrypted=settings.accept_encrypted,
    )
    streams = cast(StreamScanner, scanner) if hasattr(scanner, "scan_stream") else None
    return Inspector(limits, streams).check
