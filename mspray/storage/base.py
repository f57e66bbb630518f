"""The interface every storage backend implements, with pyarrow-generic defaults.

A backend owns one URI scheme: how a URI maps to a path inside a pyarrow filesystem and
back, how paths are joined, and the few operations a plain pyarrow filesystem does not do
the way mspray needs (atomic whole-file writes, exclusive creation, folders).
"""

from __future__ import annotations

import posixpath

import pyarrow.fs as pafs


class Backend:
    """A storage backend for one URI scheme; the defaults suit any pyarrow filesystem."""

    #: URI scheme without ``://`` ("" for local paths)
    scheme: str = ""
    #: True when paths name this machine's disk (not visible to other nodes unless shared)
    local: bool = False

    # ------------------------------------------------------------------ naming
    def locate(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """The pyarrow filesystem holding ``uri`` and the path inside it."""
        raise NotImplementedError

    def uri_of(self, ref: str, path: str) -> str:
        """The URI of filesystem ``path``, of the same kind as ``ref`` (which
        :meth:`locate` mapped to the same filesystem)."""
        raise NotImplementedError

    def join(self, uri: str, *parts: str) -> str:
        """``uri`` extended by ``parts`` with ``/``; empty parts and extra slashes dropped."""
        out = uri.rstrip("/")
        for p in parts:
            p = p.strip("/")
            if p:
                out = f"{out}/{p}"
        return out

    def parent(self, uri: str) -> str:
        return uri.rstrip("/").rsplit("/", 1)[0]

    def relative(self, uri: str, base: str) -> str:
        """``uri`` relative to folder ``base``, with ``/`` separators."""
        return posixpath.relpath(self.locate(uri)[1], self.locate(base)[1])

    def separator(self) -> str:
        """The separator between a folder and its entries in this backend's URIs."""
        return "/"

    # ------------------------------------------------------------------ writing
    def write_bytes(self, uri: str, data: bytes) -> None:
        """Write a whole file; readers see the old or the new content, never a part (object
        stores only show an object once its upload completes)."""
        fs, path = self.locate(uri)
        folder = posixpath.dirname(path)
        if folder and fs.get_file_info(folder).type == pafs.FileType.NotFound:
            fs.create_dir(folder, recursive=True)  # file systems (not object stores) need it
        with fs.open_output_stream(path) as f:
            f.write(data)

    def create_exclusive(self, uri: str, data: bytes) -> bool:
        """Create ``uri`` only if absent (True if this call created it), atomically."""
        raise OSError(f"{self.scheme}:// has no atomic create-if-absent: {uri}")

    def replace_if(self, uri: str, data: bytes, expected: bytes | None) -> bool:
        """Write ``uri`` only if its content is still ``expected`` (None: only if absent);
        True if this call wrote it. Atomic among concurrent callers (compare-and-swap)."""
        raise OSError(f"{self.scheme}:// has no conditional write: {uri}")

    def makedirs(self, uri: str) -> None:
        fs, path = self.locate(uri)
        fs.create_dir(path, recursive=True)
