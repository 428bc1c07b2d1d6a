"""Archives built on the fly for the archive tests: the forms clamd 1.4 answers `OK` for.

EICAR always sits in a *deflated* member, so its raw bytes never match by accident; the clean
controls carry text instead. Info-ZIP's `zip` and p7zip's `7z` are the real tools (Debian
packages `zip` and `p7zip-full`); pyzipper writes WinZip AES.
"""

from __future__ import annotations

import io
import lzma
import subprocess
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pyzipper

from harness import EICAR

PASSWORD = "correct horse"
INFECTED = (("eicar.com", EICAR + b"\n" * 64),)
CLEAN = (("readme.txt", b"quarterly figures, nothing to see\n" * 64),)
Members = tuple[tuple[str, bytes], ...]
Form = Callable[[Members], bytes]  # members in, the archive's bytes out


def python_zip(members: Members, zip64: bool = False) -> bytes:
    """The standard library's writer; `force_zip64` is what streaming writers do."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members:
            with archive.open(name, "w", force_zip64=zip64) as member:
                member.write(data)
    return buffer.getvalue()


def _tool(argv: list[str], members: Members, out: str) -> bytes:
    with tempfile.TemporaryDirectory() as work:
        for name, data in members:
            (Path(work) / name).write_bytes(data)
        subprocess.run(
            [*argv, out, *(name for name, _ in members)], cwd=work, check=True, capture_output=True
        )
        return (Path(work) / out).read_bytes()


def infozip(members: Members, *options: str) -> bytes:
    """Info-ZIP `zip`: ``-fz`` forces ZIP64, ``-P`` ZipCrypto."""
    return _tool(["zip", "-q", "-X", *options], members, "out.zip")


def sevenzip(members: Members, *options: str) -> bytes:
    """p7zip `7z a`: ``-p`` encrypts contents, ``-mhe=on`` the header too."""
    return _tool(["7z", "a", "-bd", "-y", *options], members, "out.7z")


def aes_zip(members: Members) -> bytes:
    buffer = io.BytesIO()
    with pyzipper.AESZipFile(
        buffer, "w", compression=zipfile.ZIP_DEFLATED, encryption=pyzipper.WZ_AES
    ) as archive:
        archive.setpassword(PASSWORD.encode())
        for name, data in members:
            archive.writestr(name, data)
    return buffer.getvalue()


def inside(name: str, data: bytes) -> bytes:
    """`data` as the one member of an ordinary zip."""
    return python_zip(((name, data),))


def tar_gz(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def nest(levels: int, members: Members) -> bytes:
    """`levels` zips, each the only member of the next."""
    data = python_zip(members)
    for level in range(levels - 1):
        data = inside(f"level-{level}.zip", data)
    return data


# Each form clamd 1.4.6 answers OK for, built from given members.
BLIND_FORMS: dict[str, Form] = {
    "infozip-zip64": lambda m: infozip(m, "-fz"),
    "python-zip64": lambda m: python_zip(m, zip64=True),
    "infozip-zip64-nested": lambda m: inside("inner.zip", infozip(m, "-fz")),
    "python-zip64-nested": lambda m: inside("inner.zip", python_zip(m, zip64=True)),
    "python-zip64-in-tar.gz": lambda m: tar_gz("inner.zip", python_zip(m, zip64=True)),
    "infozip-zip64-in-xz": lambda m: lzma.compress(infozip(m, "-fz")),
    "two-zips-infected-first": lambda m: python_zip(m) + python_zip(CLEAN),
    "two-zips-infected-last": lambda m: python_zip(CLEAN) + python_zip(m),
}
ENCRYPTED_FORMS: dict[str, Form] = {
    "zip-zipcrypto": lambda m: infozip(m, "-P", PASSWORD),
    "zip-aes": aes_zip,
    "7z": lambda m: sevenzip(m, f"-p{PASSWORD}"),
    "7z-encrypted-header": lambda m: sevenzip(m, f"-p{PASSWORD}", "-mhe=on"),
}
PLAIN_FORMS: dict[str, Form] = {  # the encrypted forms' plain twins: clamd reads these itself
    "zip-zipcrypto": lambda m: infozip(m),
    "zip-aes": python_zip,
    "7z": sevenzip,
    "7z-encrypted-header": sevenzip,
}
