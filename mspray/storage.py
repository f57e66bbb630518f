"""One filesystem layer for local paths and ``s3://`` URIs (pyarrow.fs).

S3 is configured only from environment variables (the standard AWS ones plus
``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` for S3-compatible stores), so a Ray worker
process rebuilds the same filesystem from its inherited environment. Local paths come back
absolute; S3 results keep the ``s3://`` scheme.
"""

from __future__ import annotations

import os
import posixpath
import tempfile
import threading
from urllib.parse import urlsplit

import pyarrow.fs as pafs

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

_S3_CACHE: dict[tuple, pafs.S3FileSystem] = {}
#: Attempts per S3 request (the SDK's standard retry mode: exponential backoff with jitter).
S3_ATTEMPTS = 5
_BOTO_CACHE: dict[tuple, object] = {}
_S3_LOCK = threading.Lock()
_LOCAL = pafs.LocalFileSystem()
# Read once: os.umask can only be read by setting it, which would race with other threads.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def is_remote(uri: str) -> bool:
    """True for ``s3://`` URIs."""
    return uri[:5].lower() == "s3://"


def _local_path(uri: str) -> str:
    if uri[:7].lower() == "file://":
        uri = uri[7:]
    elif "://" in uri:
        raise ValueError(f"unsupported URI scheme (use a local path or s3://): {uri}")
    return os.path.abspath(os.path.expanduser(uri))


def _s3_config() -> tuple:
    """Everything that distinguishes one S3 filesystem from another, read from the env."""
    env = os.environ.get
    endpoint = env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL") or ""
    region = env("AWS_REGION") or env("AWS_DEFAULT_REGION") or "us-east-1"
    return (
        endpoint,
        region,
        env("AWS_ACCESS_KEY_ID"),
        env("AWS_SECRET_ACCESS_KEY"),
        env("AWS_SESSION_TOKEN"),
    )


def _s3_filesystem() -> pafs.S3FileSystem:
    key = _s3_config()
    with _S3_LOCK:
        fs = _S3_CACHE.get(key)
        if fs is None:
            endpoint, region, access, secret, token = key
            kwargs: dict = {"region": region}
            if endpoint:
                parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
                kwargs["scheme"] = parts.scheme or "https"
                kwargs["endpoint_override"] = parts.netloc + parts.path.rstrip("/")
            if access and secret:
                kwargs.update(access_key=access, secret_key=secret, session_token=token)
            # else: pyarrow's own chain (config files, instance metadata) finds credentials
            # Throttling, timeouts and 5xx are retried with backoff by the AWS SDK itself.
            kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS)
            fs = _S3_CACHE[key] = pafs.S3FileSystem(**kwargs)
    return fs


def _boto_client():
    """A boto3 S3 client from the same environment as :func:`_s3_filesystem`; used only for
    what pyarrow.fs cannot do (conditional writes)."""
    key = _s3_config()
    with _S3_LOCK:
        client = _BOTO_CACHE.get(key)
        if client is None:
            import boto3

            endpoint, region, access, secret, token = key
            if endpoint and "://" not in endpoint:
                endpoint = f"https://{endpoint}"
            client = _BOTO_CACHE[key] = boto3.client(
                "s3",
                endpoint_url=endpoint or None,
                region_name=region,
                aws_access_key_id=access,
                aws_secret_access_key=secret,
                aws_session_token=token,
            )
    return client


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``uri`` and the path inside it (``bucket/key`` for S3)."""
    if is_remote(uri):
        path = uri[5:].strip("/")
        if not path:
            raise ValueError(f"S3 URI without a bucket: {uri}")
        return _s3_filesystem(), path
    return _LOCAL, _local_path(uri)


def normalize(uri: str) -> str:
    """Canonical form: an absolute local path, or ``s3://bucket/key`` without a trailing /."""
    _, path = filesystem(uri)
    return _uri_of(uri, path)


def join(uri: str, *parts: str) -> str:
    """Join path parts with ``/`` for S3 and the OS separator for local paths."""
    if is_remote(uri):
        out = uri.rstrip("/")
        for p in parts:
            p = p.strip("/")
            if p:
                out = f"{out}/{p}"
        return out
    return os.path.join(uri, *parts)


def _uri_of(uri: str, path: str) -> str:
    """Turn a filesystem path back into a URI of the same kind as ``uri``."""
    return f"s3://{path}" if is_remote(uri) else path


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
    """Write a whole file, creating parent folders.

    Local writes go to a temp file in the target folder and are renamed over the target, so
    a crash never leaves a half-written file. S3 objects only appear when the upload
    completes, which gives the same guarantee.
    """
    fs, path = filesystem(uri)
    if is_remote(uri):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    tmp = _complete_temp_file(path, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _complete_temp_file(path: str, data: bytes) -> str:
    """``data`` written in full to a new temp file next to local ``path`` (parent folders
    created), with the permissions a plain open() would give; the caller renames or links
    it into place, so readers never see a partly written file."""
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


def write_text(uri: str, text: str, encoding: str = "utf-8") -> None:
    write_bytes(uri, text.encode(encoding))


def create_exclusive(uri: str, data: bytes) -> bool:
    """Create file ``uri`` with ``data`` only if it does not exist yet; True if this call
    created it, False if it was already there. Atomic among concurrent callers on any
    machine: on S3 a conditional PUT (``If-None-Match: *``, which S3 answers with 412 when
    the key exists); locally a hard link of a complete temp file (the link fails if the
    name exists), so readers never see a partly written file either.

    The S3 store must honour ``If-None-Match`` on PUT (AWS S3 does since 2024); one that
    ignores it gives no exclusion.
    """
    fs, path = filesystem(uri)
    if is_remote(uri):
        from botocore.exceptions import ClientError

        bucket, _, key = path.partition("/")
        try:
            _boto_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except ClientError as e:
            err = e.response.get("Error", {})
            # 412: the key exists; 409: another conditional write to it is in flight
            if err.get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise OSError(f"conditional write of {uri} failed: {e}") from e
        return True
    tmp = _complete_temp_file(path, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    return True


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
    """Create a folder and its parents; no error if it exists.

    S3 has no folders, so there this only checks that the bucket exists (no marker objects,
    which other tools would list as empty files).
    """
    fs, path = filesystem(uri)
    if is_remote(uri):
        bucket = path.split("/", 1)[0]
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"no such bucket: s3://{bucket} (for {uri})")
        return
    fs.create_dir(path, recursive=True)


def size(uri: str) -> int:
    """Size of a file in bytes."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise _not_found(uri)
    return int(info.size)


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
    out = []
    for info in _listing(uri, recursive):
        if info.type != pafs.FileType.File:
            continue
        if wanted is None or info.base_name.lower().endswith(wanted):
            out.append(_uri_of(uri, info.path))
    return sorted(out)


def list_dirs(uri: str) -> list[str]:
    """Sorted URIs of the immediate sub-folders of folder ``uri``."""
    return sorted(
        _uri_of(uri, info.path)
        for info in _listing(uri, recursive=False)
        if info.type == pafs.FileType.Directory
    )


def parent(uri: str) -> str:
    """The folder holding ``uri`` (same kind of URI)."""
    if is_remote(uri):
        return uri.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(_local_path(uri))


def basename(uri: str) -> str:
    """The last path segment of ``uri``."""
    return uri.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def relative(uri: str, base: str) -> str:
    """``uri`` relative to folder ``base``, with ``/`` separators (both of the same kind)."""
    _, path = filesystem(uri)
    _, root = filesystem(base)
    if is_remote(uri):
        return posixpath.relpath(path, root)
    return os.path.relpath(path, root).replace(os.sep, "/")
