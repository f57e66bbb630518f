"""Any other scheme pyarrow knows (``gs://``, ``hdfs://``, ``mock://``, ...)."""

from __future__ import annotations

import threading

import pyarrow.fs as pafs

from mspray.storage.base import Backend


class ArrowBackend(Backend):
    """A scheme served by :func:`pyarrow.fs.FileSystem.from_uri` (configured by the URI and
    the environment), one filesystem per ``scheme://authority``. Only URIs that end in
    their filesystem path are supported (``gs://bucket/key``, ``hdfs://host/path``)."""

    local = False

    def __init__(self, scheme: str) -> None:
        self.scheme = scheme
        self._fs: dict[str, tuple[pafs.FileSystem, str]] = {}
        self._lock = threading.Lock()

    def locate(self, uri: str) -> tuple[pafs.FileSystem, str]:
        authority = uri.split("://", 1)[1].split("/", 1)[0]
        with self._lock:
            if authority not in self._fs:
                fs, root = pafs.FileSystem.from_uri(f"{self.scheme}://{authority}/")
                self._fs[authority] = (fs, root)
        fs, _ = self._fs[authority]
        _, path = pafs.FileSystem.from_uri(uri.rstrip("/") or uri)
        if not uri.rstrip("/").endswith(path.rstrip("/")):
            raise ValueError(
                f"unsupported {self.scheme}:// URI form (use scheme://.../path): {uri}"
            )
        return fs, path

    def uri_of(self, ref: str, path: str) -> str:
        _, ref_path = self.locate(ref)
        ref = ref.rstrip("/")
        prefix = ref[: len(ref) - len(ref_path.rstrip("/"))]
        return prefix + path
