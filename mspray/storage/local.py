"""Local disk (plain paths and ``file://``): absolute paths in the OS's own form."""

from __future__ import annotations

import fcntl
import os
import tempfile

import pyarrow.fs as pafs

from mspray.storage.base import Backend

# Read once: os.umask can only be read by setting it, which would race with other threads.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


class LocalBackend(Backend):
    """Files on this machine's disk; writes go through a temp file and a rename or link."""

    scheme = "file"
    local = True

    def __init__(self) -> None:
        self._fs = pafs.LocalFileSystem()

    def locate(self, uri: str) -> tuple[pafs.FileSystem, str]:
        return self._fs, local_path(uri)

    def uri_of(self, ref: str, path: str) -> str:
        return path

    def join(self, uri: str, *parts: str) -> str:
        return os.path.join(uri, *parts)

    def parent(self, uri: str) -> str:
        return os.path.dirname(local_path(uri))

    def relative(self, uri: str, base: str) -> str:
        return os.path.relpath(local_path(uri), local_path(base)).replace(os.sep, "/")

    def separator(self) -> str:
        return os.sep

    def write_bytes(self, uri: str, data: bytes) -> None:
        path = local_path(uri)
        tmp = _complete_temp_file(path, data)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    def create_exclusive(self, uri: str, data: bytes) -> bool:
        # a hard link of a complete temp file fails if the name exists, so readers never
        # see a partly written file either
        path = local_path(uri)
        tmp = _complete_temp_file(path, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True

    def replace_if(self, uri: str, data: bytes, expected: bytes | None) -> bool:
        # compare and rename under an exclusive lock of the folder (released if the
        # process dies), so two writers cannot both see the old content
        path = local_path(uri)
        folder = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            fcntl.flock(folder, fcntl.LOCK_EX)
            try:
                with open(path, "rb") as f:
                    current: bytes | None = f.read()
            except FileNotFoundError:
                current = None
            if current != expected:
                return False
            self.write_bytes(uri, data)
            return True
        finally:
            os.close(folder)  # and its lock


def local_path(uri: str) -> str:
    """The absolute path a plain path or ``file://`` URI names."""
    if uri[:7].lower() == "file://":
        uri = uri[7:]
    elif "://" in uri:
        raise ValueError(f"not a local path: {uri}")
    return os.path.abspath(os.path.expanduser(uri))


def _complete_temp_file(path: str, data: bytes) -> str:
    """``data`` written in full to a new temp file next to ``path`` (parent folders
    created), with the permissions a plain open() would give; the caller renames or links
    it into place."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600 files
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp
