"""One storage layer for local paths, ``s3://`` and the other schemes pyarrow knows.

Every function takes URIs and picks the backend by the URI's scheme (:func:`backend`):
:mod:`~mspray.storage.local` for plain paths and ``file://``, :mod:`~mspray.storage.s3` for
``s3://`` (configured from the AWS environment variables plus ``AWS_ENDPOINT_URL``), and
:mod:`~mspray.storage.arrow` for the rest (``gs://``, ``hdfs://``, ...). Nothing outside this
package looks at a scheme: ask :func:`is_local`, :func:`join`, :func:`separator` or
:func:`is_under`. Local paths come back absolute; remote results keep their scheme.
"""

from __future__ import annotations

import threading

import pyarrow.fs as pafs

from mspray.storage.arrow import ArrowBackend
from mspray.storage.base import Backend
from mspray.storage.local import LocalBackend
from mspray.storage.s3 import S3_ATTEMPTS, S3Backend

__all__ = [
    "IMAGE_SUFFIXES",
    "S3_ATTEMPTS",
    "Backend",
    "backend",
    "basename",
    "create_exclusive",
    "replace_if",
    "delete",
    "exists",
    "filesystem",
    "is_dir",
    "is_file",
    "is_local",
    "is_remote",
    "is_under",
    "join",
    "list_dirs",
    "list_files",
    "makedirs",
    "modified_time",
    "normalize",
    "parent",
    "read_bytes",
    "read_text",
    "relative",
    "separator",
    "size",
    "write_bytes",
    "write_text",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

_LOCAL = LocalBackend()
_BACKENDS: dict[str, Backend] = {"": _LOCAL, "file": _LOCAL, "s3": S3Backend()}
_LOCK = threading.Lock()


def _scheme(uri: str) -> str:
    head, sep, _ = uri.partition("://")
    # a scheme is letters, digits, + - . (RFC 3986); anything else is a local path
    if not sep or not head or not all(c.isalnum() or c in "+-." for c in head):
        return ""
    return head.lower()


def backend(uri: str) -> Backend:
    """The backend for ``uri``'s scheme; ValueError for a scheme nothing serves."""
    scheme = _scheme(uri)
    found = _BACKENDS.get(scheme)
    if found is not None:
        return found
    try:
        pafs.FileSystem.from_uri(uri)
    except ValueError as e:  # pyarrow's ArrowInvalid: no filesystem for the scheme
        raise ValueError(f"unsupported URI scheme {scheme}:// ({e}): {uri}") from None
    except OSError:
        pass  # a known scheme whose client is not usable here; fail on first use instead
    with _LOCK:
        return _BACKENDS.setdefault(scheme, ArrowBackend(scheme))


def has_scheme(uri: str) -> bool:
    """True when ``uri`` names its storage scheme (``s3://``, ``file://``, ...), so a colon in
    it is not a ``kind:ROOT`` separator."""
    return bool(_scheme(uri))


def is_local(uri: str) -> bool:
    """True for paths on this machine's disk (plain paths and ``file://``), which other nodes
    of a cluster see only when the folder is shared."""
    return backend(uri).local


def is_remote(uri: str) -> bool:
    """True for URIs of a storage service (``s3://`` and other non-local schemes)."""
    return not is_local(uri)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``uri`` and the path inside it (``bucket/key`` for S3)."""
    return backend(uri).locate(uri)


def normalize(uri: str) -> str:
    """Canonical form: an absolute local path, or ``scheme://bucket/key`` without a trailing /."""
    b = backend(uri)
    return b.uri_of(uri, b.locate(uri)[1])


def join(uri: str, *parts: str) -> str:
    """Join path parts with ``/`` for remote URIs and the OS separator for local paths."""
    return backend(uri).join(uri, *parts)


def separator(uri: str) -> str:
    """The separator between a folder and its entries in URIs like ``uri``."""
    return backend(uri).separator()


def is_under(uri: str, folder: str) -> bool:
    """True if ``uri`` lies inside ``folder`` (both as given: same backend, prefix match)."""
    if backend(uri) is not backend(folder):
        return False
    sep = separator(folder)
    return uri.startswith(folder.rstrip(sep) + sep)


def _not_found(uri: str, e: BaseException | None = None) -> FileNotFoundError:
    return FileNotFoundError(f"no such file: {uri}" + (f" ({e})" if e else ""))


def read_bytes(uri: str) -> bytes:
    """The whole content of a file; FileNotFoundError names ``uri`` when it is missing."""
    fs, path = filesystem(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError as e:
        raise _not_found(uri, e) from None


def read_text(uri: str, encoding: str = "utf-8") -> str:
    return read_bytes(uri).decode(encoding)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole file, creating parent folders. A crash never leaves a half-written
    file: local writes go to a temp file renamed over the target, and object stores only
    show an object once its upload completes."""
    backend(uri).write_bytes(uri, data)


def write_text(uri: str, text: str, encoding: str = "utf-8") -> None:
    write_bytes(uri, text.encode(encoding))


def create_exclusive(uri: str, data: bytes) -> bool:
    """Create file ``uri`` with ``data`` only if it does not exist yet; True if this call
    created it, False if it was already there. Atomic among concurrent callers on any
    machine: on S3 a conditional PUT (``If-None-Match: *``); locally a hard link of a
    complete temp file. Other schemes raise OSError."""
    return backend(uri).create_exclusive(uri, data)


def replace_if(uri: str, data: bytes, expected: bytes | None) -> bool:
    """Compare-and-swap: write ``data`` to ``uri`` only if its content is still ``expected``
    (None: only if there is no file); True if this call wrote it. Atomic among concurrent
    callers on any machine: on S3 a PUT conditional on the ETag read (``If-Match``, or
    ``If-None-Match: *``); locally a rename under a lock of the folder."""
    return backend(uri).replace_if(uri, data, expected)


def exists(uri: str) -> bool:
    """True if ``uri`` is a file or a folder (an S3 prefix with objects under it)."""
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


def is_dir(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def makedirs(uri: str) -> None:
    """Create a folder and its parents; no error if it exists. On S3 (no folders) this only
    checks that the bucket exists."""
    backend(uri).makedirs(uri)


def _file_info(uri: str) -> pafs.FileInfo:
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise _not_found(uri)
    return info


def size(uri: str) -> int:
    """Size of a file in bytes."""
    return int(_file_info(uri).size)


def modified_time(uri: str) -> float:
    """When the file was last written, in seconds since the epoch by the *storage's* clock
    (S3's ``LastModified``, the file system's mtime), not this machine's."""
    return _file_info(uri).mtime.timestamp()


def delete(uri: str) -> None:
    """Delete a file, or a folder with everything under it."""
    fs, path = filesystem(uri)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.NotFound:
        raise _not_found(uri)
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    else:
        fs.delete_file(path)


def _listing(uri: str, recursive: bool) -> list[pafs.FileInfo]:
    fs, path = filesystem(uri)
    try:
        # one listing call (paginated on S3) instead of a stat per file
        return fs.get_file_info(pafs.FileSelector(path, recursive=recursive))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"no such folder: {uri} ({e})") from None
    except NotADirectoryError as e:
        raise NotADirectoryError(f"not a folder: {uri} ({e})") from None


def list_files(
    uri: str, suffixes: tuple[str, ...] | None = IMAGE_SUFFIXES, recursive: bool = True
) -> list[str]:
    """Sorted URIs of the files under folder ``uri`` whose name ends with one of
    ``suffixes`` (case-insensitive; None = all files). FileNotFoundError if the folder is
    missing."""
    wanted = tuple(s.lower() for s in suffixes) if suffixes is not None else None
    b = backend(uri)
    out = []
    for info in _listing(uri, recursive):
        if info.type != pafs.FileType.File:
            continue
        if wanted is None or info.base_name.lower().endswith(wanted):
            out.append(b.uri_of(uri, info.path))
    return sorted(out)


def list_dirs(uri: str) -> list[str]:
    """Sorted URIs of the immediate sub-folders of folder ``uri``."""
    b = backend(uri)
    return sorted(
        b.uri_of(uri, info.path)
        for info in _listing(uri, recursive=False)
        if info.type == pafs.FileType.Directory
    )


def parent(uri: str) -> str:
    """The folder holding ``uri`` (same kind of URI)."""
    return backend(uri).parent(uri)


def basename(uri: str) -> str:
    """The last path segment of ``uri``."""
    return uri.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def relative(uri: str, base: str) -> str:
    """``uri`` relative to folder ``base``, with ``/`` separators (both of the same kind)."""
    return backend(uri).relative(uri, base)
