"""Dataset specs and layouts: MVTec AD, BTAD and plain folders, local or in S3.

Layouts (``ROOT`` may be a local path or an ``s3://`` URI):

- ``mvtec:ROOT``: ``ROOT/<cat>/train/good/*``, ``ROOT/<cat>/test/<defect>/*`` (``good`` is
  normal), ``ROOT/<cat>/ground_truth/<defect>/<stem>_mask.png`` (may be missing).
- ``btad:ROOT``: ``ROOT/<cat>/train/ok/*``, ``ROOT/<cat>/test/{ok,ko}/*``,
  ``ROOT/<cat>/ground_truth/ko/<stem>.{png,bmp}``.
- ``folder:PATH``: every image under PATH (recursively), all normal.
- a bare ``s3://bucket/prefix`` (or local path): the layout is inferred.

Each folder is listed once; files are never stat'ed one by one, so S3 prefixes with many
objects cost a few paginated list calls.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass
from typing import Literal

from mspray import storage

Kind = Literal["mvtec", "btad", "folder"]
KINDS: tuple[str, ...] = ("mvtec", "btad", "folder")
# name of the folder of normal images, in train/ and test/
_NORMAL = {"mvtec": "good", "btad": "ok"}
# folders looked at when inferring a layout; a dataset root has few, an archive may have many
_INFER_MAX_DIRS = 16


@dataclass(frozen=True)
class Sample:
    """One test image: label 0 normal, 1 anomalous; mask_path None when no mask exists."""

    path: str
    label: int
    mask_path: str | None
    defect: str


@dataclass(frozen=True)
class DatasetSpec:
    kind: Kind
    root: str


def parse_spec(spec: str | DatasetSpec) -> DatasetSpec:
    """Parse ``mvtec:ROOT``, ``btad:ROOT``, ``folder:PATH`` or a bare ``s3://``/local path
    (layout inferred). ValueError for an unknown kind or a root that does not exist."""
    if isinstance(spec, DatasetSpec):
        return spec
    text = spec.strip()
    prefix, sep, rest = text.partition(":")
    bare = storage.has_scheme(text) or not sep
    if bare:
        kind, root = None, text
    elif prefix.lower() in KINDS:
        kind, root = prefix.lower(), rest.strip()
    else:
        raise ValueError(
            f"unknown dataset kind {prefix!r} in {spec!r}; use mvtec:ROOT, "
            "btad:ROOT, folder:PATH or s3://bucket/prefix"
        )
    if not root:
        raise ValueError(f"dataset spec {spec!r} has no root path")
    root = storage.normalize(root)
    if not storage.is_dir(root):
        raise ValueError(f"dataset folder not found: {root}")
    return DatasetSpec(kind or _infer_kind(root), root)


def _infer_kind(root: str) -> str:
    """mvtec if a category has train/good, btad if train/ok, else a plain folder."""
    candidates = [root] + storage.list_dirs(root)[:_INFER_MAX_DIRS]
    for d in candidates:
        for kind, normal in _NORMAL.items():
            if storage.is_dir(storage.join(d, "train", normal)):
                return kind
    return "folder"


def _is_category(d: str) -> bool:
    return storage.is_dir(storage.join(d, "train")) or storage.is_dir(storage.join(d, "test"))


def _basename(uri: str) -> str:
    return posixpath.basename(storage.normalize(uri).replace("\\", "/"))


def categories(spec: str | DatasetSpec) -> list[str]:
    """Category names of an mvtec/btad dataset (sub-folders with train/ or test/); [] for a
    plain folder. A root that is itself one category gives its own name."""
    spec = parse_spec(spec)
    if spec.kind == "folder":
        return []
    if _is_category(spec.root):
        return [_basename(spec.root)]
    return [_basename(d) for d in storage.list_dirs(spec.root) if _is_category(d)]


def _category_dir(spec: DatasetSpec, category: str | None) -> str:
    root = spec.root
    if category:
        d = storage.join(root, category)
        if storage.is_dir(d):
            return d
        if _basename(root) == category and _is_category(root):
            return root
        raise ValueError(
            f"category {category!r} not found in {root}; available: "
            f"{', '.join(categories(spec)) or 'none'}"
        )
    if _is_category(root):
        return root
    cats = categories(spec)
    if len(cats) == 1:
        return storage.join(root, cats[0])
    if not cats:
        raise ValueError(f"no categories in {root} (expected {root}/<category>/train/...)")
    raise ValueError(f"{root} holds several categories; choose one of: {', '.join(cats)}")


def _images(folder: str) -> list[str]:
    """Images under ``folder``; ValueError naming it when it is missing or empty."""
    try:
        files = storage.list_files(folder)
    except (FileNotFoundError, NotADirectoryError):
        raise ValueError(f"folder not found: {folder}") from None
    if not files:
        raise ValueError(f"no images ({', '.join(storage.IMAGE_SUFFIXES)}) found in {folder}")
    return files


def _folder(spec: DatasetSpec, category: str | None) -> str:
    """A plain folder dataset; a category, if given, is a sub-folder."""
    return storage.join(spec.root, category) if category else spec.root


def train_paths(spec: str | DatasetSpec, category: str | None = None) -> list[str]:
    """URIs of the normal training images, sorted."""
    spec = parse_spec(spec)
    if spec.kind == "folder":
        return _images(_folder(spec, category))
    return _images(storage.join(_category_dir(spec, category), "train", _NORMAL[spec.kind]))


def _key(rel: str) -> str:
    """Match key of an image or mask: relative path without extension or ``_mask``."""
    stem = posixpath.splitext(rel)[0]
    return stem[: -len("_mask")] if stem.endswith("_mask") else stem


def _mask_index(gt_dir: str) -> dict[str, str] | None:
    """Mask URIs by match key (one listing); None when the ground_truth folder is missing."""
    try:
        masks = storage.list_files(gt_dir)
    except (FileNotFoundError, NotADirectoryError):
        return None
    index: dict[str, str] = {}
    for m in masks:
        key = _key(storage.relative(m, gt_dir))
        # BTAD has .png and .bmp masks; prefer .png if both exist
        if key not in index or m.lower().endswith(".png"):
            index[key] = m
    return index


def test_samples(spec: str | DatasetSpec, category: str | None = None) -> list[Sample]:
    """Labelled test images (sorted by path) with their masks where they exist."""
    spec = parse_spec(spec)
    if spec.kind == "folder":
        return [Sample(p, 0, None, "good") for p in _images(_folder(spec, category))]
    cat = _category_dir(spec, category)
    test_dir = storage.join(cat, "test")
    masks = _mask_index(storage.join(cat, "ground_truth"))
    normal = _NORMAL[spec.kind]
    out = []
    for p in _images(test_dir):
        rel = storage.relative(p, test_dir)
        if "/" not in rel:
            continue  # a file directly in test/ has no defect folder, hence no label
        defect = rel.split("/", 1)[0]
        label = int(defect != normal)
        mask = masks.get(_key(rel)) if (label and masks is not None) else None
        out.append(Sample(p, label, mask, defect))
    if not out:
        raise ValueError(f"no labelled images in {test_dir} (expected {test_dir}/<defect>/*)")
    return out


# The name starts with "test_": keep pytest from collecting it where tests import it.
test_samples.__test__ = False  # type: ignore[attr-defined]
