"""Storage layer on local disk and on a real local S3 server (moto server mode)."""

import os
import stat

import pyarrow.fs as pafs
import pytest

from mspray import storage


def _tree(base: str) -> list[str]:
    files = ["a.png", "b.JPG", "notes.txt", "sub/c.jpeg", "sub/deeper/d.tif", "sub/e.bmp"]
    for f in files:
        storage.write_bytes(storage.join(base, *f.split("/")), f.encode())
    return files


def test_local_round_trip_creates_parents(tmp_path):
    uri = str(tmp_path / "x" / "y" / "f.bin")
    storage.write_bytes(uri, b"\x00\x01abc")
    assert storage.read_bytes(uri) == b"\x00\x01abc"
    assert storage.exists(uri) and not storage.is_dir(uri) and storage.size(uri) == 5
    assert storage.is_dir(str(tmp_path / "x")) and storage.exists(str(tmp_path / "x"))
    storage.write_text(uri, "héllo")
    assert storage.read_text(uri) == "héllo"
    assert storage.read_bytes("file://" + uri) == "héllo".encode()
    storage.delete(str(tmp_path / "x"))
    assert not storage.exists(uri) and not storage.exists(str(tmp_path / "x"))


def test_local_write_is_atomic_and_leaves_no_temp_files(tmp_path):
    uri = str(tmp_path / "f.txt")
    storage.write_bytes(uri, b"old")
    with pytest.raises(TypeError):
        storage.write_bytes(uri, "not bytes")  # type: ignore[arg-type]  # fails mid-write
    assert storage.read_bytes(uri) == b"old"
    storage.write_bytes(uri, b"new")
    assert storage.read_bytes(uri) == b"new"
    assert os.listdir(tmp_path) == ["f.txt"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(uri).st_mode) == 0o666 & ~umask


def test_local_missing_paths_name_the_uri(tmp_path):
    missing = str(tmp_path / "nope.png")
    for fn in (storage.read_bytes, storage.size, storage.delete):
        with pytest.raises(FileNotFoundError, match="nope.png"):
            fn(missing)
    with pytest.raises(FileNotFoundError, match="nodir"):
        storage.list_files(str(tmp_path / "nodir"))
    assert not storage.exists(missing) and not storage.is_dir(missing)


def test_local_list_files(tmp_path):
    _tree(str(tmp_path))
    base = str(tmp_path)
    got = storage.list_files(base)
    assert got == sorted(got)
    assert [storage.relative(p, base) for p in got] == [
        "a.png",
        "b.JPG",
        "sub/c.jpeg",
        "sub/deeper/d.tif",
        "sub/e.bmp",
    ]
    assert all(os.path.isabs(p) for p in got)
    flat = storage.list_files(base, recursive=False)
    assert [os.path.basename(p) for p in flat] == ["a.png", "b.JPG"]
    everything = storage.list_files(base, suffixes=None)
    assert len(everything) == 6 and storage.join(base, "notes.txt") in everything
    assert storage.list_files(base, suffixes=(".TXT",)) == [storage.join(base, "notes.txt")]
    assert storage.list_dirs(base) == [storage.join(base, "sub")]
    # relative input paths come back absolute
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert storage.list_files("sub", recursive=False) == [
            str(tmp_path / "sub" / "c.jpeg"),
            str(tmp_path / "sub" / "e.bmp"),
        ]
    finally:
        os.chdir(cwd)


def test_join_and_is_remote():
    assert storage.join("s3://b/p/", "x", "/y/") == "s3://b/p/x/y"
    assert storage.join("s3://b", "k.png") == "s3://b/k.png"
    assert storage.join("/a", "b", "c") == os.path.join("/a", "b", "c")
    assert storage.is_remote("s3://b/k") and storage.is_remote("S3://b/k")
    assert not storage.is_remote("/tmp/x") and not storage.is_remote("file:///tmp/x")
    assert (
        storage.is_local("/tmp/x") and storage.is_local("rel/x") and storage.is_local("file:///x")
    )
    assert not storage.is_local("s3://b/k") and not storage.is_local("gs://b/k")
    assert storage.separator("s3://b") == "/" and storage.separator("/tmp") == os.sep
    assert storage.is_under("s3://b/p/x.png", "s3://b/p/") and not storage.is_under(
        "s3://b/px.png", "s3://b/p"
    )
    assert storage.is_under(os.path.join("/a", "b"), "/a") and not storage.is_under(
        "/a/b", "s3://a"
    )
    with pytest.raises(ValueError, match="nope://"):
        storage.filesystem("nope://bucket/x")
    with pytest.raises(ValueError, match="bucket"):
        storage.filesystem("s3://")


def test_other_schemes_go_through_pyarrow_filesystems():
    """A scheme with no backend of its own (here pyarrow's in-memory ``mock://``) gets the
    generic one: the same calls work and listings keep the scheme."""
    base = "mock:///data"
    assert storage.is_remote(base) and storage.separator(base) == "/"
    files = _tree(base)
    assert storage.read_bytes(storage.join(base, "sub", "c.jpeg")) == b"sub/c.jpeg"
    got = storage.list_files(base)
    assert got[0] == "mock:///data/a.png" and len(got) == 5
    assert [storage.relative(p, base) for p in storage.list_files(base, suffixes=None)] == sorted(
        files
    )
    assert storage.list_dirs(base) == ["mock:///data/sub"]
    assert storage.normalize("mock:///data/sub/") == "mock:///data/sub"
    with pytest.raises(OSError, match="create-if-absent"):
        storage.create_exclusive(storage.join(base, "lock"), b"x")


def test_modified_time_is_the_storage_clock(tmp_path, s3_bucket):
    import time

    for base in (str(tmp_path), s3_bucket):
        uri = storage.join(base, "t.txt")
        storage.write_bytes(uri, b"x")
        assert abs(storage.modified_time(uri) - time.time()) < 60


def test_s3_round_trip(s3_bucket):
    uri = storage.join(s3_bucket, "dir", "f.bin")
    storage.makedirs(storage.join(s3_bucket, "dir"))
    storage.write_bytes(uri, b"payload")
    assert storage.read_bytes(uri) == b"payload"
    assert storage.exists(uri) and storage.size(uri) == 7
    assert storage.is_dir(storage.join(s3_bucket, "dir")) and not storage.is_dir(uri)
    storage.write_text(storage.join(s3_bucket, "t.json"), '{"a": 1}')
    assert storage.read_text(storage.join(s3_bucket, "t.json")) == '{"a": 1}'
    missing = storage.join(s3_bucket, "missing.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        storage.read_bytes(missing)
    assert not storage.exists(missing)
    storage.delete(storage.join(s3_bucket, "dir"))
    assert not storage.exists(uri)


def test_s3_list_files(s3_bucket):
    _tree(s3_bucket)
    got = storage.list_files(s3_bucket)
    assert got == sorted(got) and all(p.startswith(s3_bucket + "/") for p in got)
    assert [storage.relative(p, s3_bucket) for p in got] == [
        "a.png",
        "b.JPG",
        "sub/c.jpeg",
        "sub/deeper/d.tif",
        "sub/e.bmp",
    ]
    assert storage.list_files(storage.join(s3_bucket, "sub"), recursive=False) == [
        f"{s3_bucket}/sub/c.jpeg",
        f"{s3_bucket}/sub/e.bmp",
    ]
    assert storage.list_dirs(s3_bucket) == [f"{s3_bucket}/sub"]
    assert len(storage.list_files(s3_bucket + "/", suffixes=None)) == 6
    with pytest.raises(FileNotFoundError, match="nodir"):
        storage.list_files(storage.join(s3_bucket, "nodir"))


def test_s3_makedirs_needs_an_existing_bucket(s3_server):
    with pytest.raises(FileNotFoundError, match="no-such-bucket-here"):
        storage.makedirs("s3://no-such-bucket-here/prefix")


def test_s3_filesystem_is_cached_per_environment(s3_server, monkeypatch):
    fs1, path = storage.filesystem("s3://bucket/key")
    fs2, _ = storage.filesystem("s3://bucket/other")
    assert fs1 is fs2 and path == "bucket/key" and isinstance(fs1, pafs.S3FileSystem)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    fs3, _ = storage.filesystem("s3://bucket/key")
    assert fs3 is not fs1 and fs3.region == "eu-west-1"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_create_exclusive_has_exactly_one_winner(where, tmp_path, request):
    """Many threads race to create one file: exactly one succeeds, its content is whole."""
    from concurrent.futures import ThreadPoolExecutor

    base = str(tmp_path) if where == "local" else request.getfixturevalue("s3_bucket")
    uri = storage.join(base, "locks", "one.json")
    with ThreadPoolExecutor(8) as pool:
        won = list(
            pool.map(lambda i: storage.create_exclusive(uri, f"{i}".encode() * 100), range(8))
        )
    assert won.count(True) == 1
    winner = won.index(True)
    assert storage.read_bytes(uri) == f"{winner}".encode() * 100
    assert storage.create_exclusive(uri, b"again") is False
    if where == "local":
        assert os.listdir(tmp_path / "locks") == ["one.json"]  # no temp files left
