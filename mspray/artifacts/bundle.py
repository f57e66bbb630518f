"""Model bundle: immutable, verified versions under one root (local or ``s3://``).

Layout::

    ROOT/
      latest                     pointer: the id of the current version (one line)
      versions/<version>/
        config.json              MSPrayConfig
        model.safetensors        encoder + angle-head weights of every scale
        bank_<scale>.faiss       serialised faiss index of the scale's normal patches
        meta.json                threshold, per-scale normalisation stats, ImageNet
                                 normalisation, provenance and the sha256 and size of every
                                 other file; written last and only once, so its presence
                                 marks a fully written version

A version is never rewritten: its id is a hash of its content (files, threshold, fusion
stats), so saving the same model again names the same version, and every other save
(``build-bank``, ``--append``) makes a new one and then moves ``latest``, which is written
in one atomic step after the version is complete. Only a *complete* version (encoders, a
bank and fusion statistics for every scale, and a threshold; :func:`missing_parts`) ever
becomes ``latest``: an encoders-only version (``train --no-banks``, or training on Ray
before its banks are built) is saved beside it and named by its version URI, so every
consumer of the root keeps the previous complete version until the banks are built.

Loading resolves a root (or the ``latest`` object itself) to a version with
:func:`resolve_bundle` and checks every file it reads against meta.json, so a corrupted,
truncated or half-written bundle fails with a :class:`BundleError` naming the file. A folder
with ``meta.json`` directly in it (a bundle of the earlier flat layout, or a version folder)
is itself a version.

Loading reads JSON, safetensors and faiss buffers only: no pickled code is ever executed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from mspray import storage
from mspray.bank import PatchBank
from mspray.config import MSPrayConfig
from mspray.detector import Detector
from mspray.model.backbone import IMAGENET_MEAN, IMAGENET_STD
from mspray.model.multiscale import MultiScaleEncoder

log = logging.getLogger(__name__)

#: 3: the 64-px encoder's head reads conv3_3 (7×7 kernel, stride 2) instead of pool3, so
#: every pixel of the patch reaches its embedding; layout as in 2. 2: versioned layout with
#: per-file sha256 in meta.json.
#: 1: flat, unverified.
FORMAT = 3
READABLE_FORMATS = (1, 2, 3)
#: Formats before this one hold the old Enc64 head: their scale-64 weights no longer fit
#: (see :func:`_check_encoder_layout`). Their 32/16-px encoders are unchanged.
ENC64_HEAD_FORMAT = 3
VERSIONS_DIR = "versions"
POINTER = "latest"
#: Compare-and-swap attempts at moving the pointer while other saves move it too.
POINTER_ATTEMPTS = 20
META = "meta.json"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
_VERSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class BundleError(ValueError):
    """A bundle is missing, incomplete, corrupted or inconsistent."""


def bank_name(scale: int) -> str:
    return f"bank_{scale}.faiss"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------- resolving
def _follow_pointer(root: str) -> str:
    pointer = storage.join(root, POINTER)
    try:
        version = storage.read_text(pointer).strip()
    except FileNotFoundError:
        raise BundleError(f"{root}: no bundle pointer ({POINTER})") from None
    if not _VERSION_ID.match(version):
        raise BundleError(f"{pointer}: not a version id: {version[:80]!r}")
    uri = storage.join(root, VERSIONS_DIR, version)
    if not storage.is_file(storage.join(uri, META)):
        raise BundleError(f"{pointer} names version {version}, which is not complete ({uri})")
    return uri


def resolve_bundle(uri: str) -> str:
    """The version URI that bundle URI ``uri`` stands for.

    ``uri`` may be a bundle root (follows its ``latest`` pointer), the pointer object
    itself (``ROOT/latest``), or a version: ``ROOT/versions/<id>`` or a flat bundle folder
    of the earlier layout (``meta.json`` directly in it). A root's pointer wins over a flat
    bundle in the same folder (a flat bundle that got new versions saved into it).
    Raises :class:`BundleError` when there is no complete version there.
    """
    uri = storage.normalize(uri)
    if storage.basename(uri) == POINTER and storage.is_file(uri):
        return _follow_pointer(storage.parent(uri))
    if storage.is_file(storage.join(uri, POINTER)):
        return _follow_pointer(uri)
    if storage.is_file(storage.join(uri, META)):
        return uri
    if storage.basename(storage.parent(uri)) == VERSIONS_DIR and storage.exists(uri):
        raise BundleError(
            f"{uri}: incomplete bundle version (no {META}): its save never finished; "
            f"load the bundle root or another version"
        )
    if storage.is_dir(storage.join(uri, VERSIONS_DIR)):
        raise BundleError(
            f"{uri}: no complete version yet (no {POINTER} pointer: it names only versions "
            f"with banks, fusion statistics and a threshold); build the banks of a version "
            f"(build-bank --bundle {storage.join(uri, VERSIONS_DIR)}/<id>) or load it by its URI"
        )
    if storage.exists(uri):
        raise BundleError(f"{uri}: not an mspray bundle (no {POINTER} pointer, no {META})")
    raise BundleError(f"{uri}: no such bundle")


def bundle_root(uri: str) -> str:
    """The root a new version of the bundle at ``uri`` is saved under: the folder of a
    ``latest`` pointer, ``ROOT`` for ``ROOT/versions/<id>``, else ``uri`` itself."""
    uri = storage.normalize(uri)
    if storage.basename(uri) == POINTER and storage.is_file(uri):
        return storage.parent(uri)
    parent = storage.parent(uri)
    if storage.basename(parent) == VERSIONS_DIR:
        return storage.parent(parent)
    return uri


def version_uri(root: str, version: str) -> str:
    """Where version ``version`` of the bundle at ``root`` lives."""
    return storage.join(storage.normalize(root), VERSIONS_DIR, version)


def read_meta(uri: str) -> dict:
    """The meta.json of the version ``uri`` resolves to (see :func:`resolve_bundle`)."""
    return _read_meta(resolve_bundle(uri))


def _read_meta(version_uri: str) -> dict:
    path = storage.join(version_uri, META)
    try:
        meta = json.loads(storage.read_text(path))
    except FileNotFoundError:
        raise BundleError(f"{version_uri}: not a complete mspray bundle (no {META})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: corrupted ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") not in READABLE_FORMATS:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise BundleError(f"{version_uri}: unsupported bundle format {fmt!r}")
    if meta["format"] >= 2 and not isinstance(meta.get("files"), dict):
        raise BundleError(f"{path}: corrupted (no file checksums)")
    return meta


def _read_verified(version_uri: str, meta: dict, name: str) -> bytes:
    """A file of the version, checked against the size and sha256 recorded in meta.json
    (format 1 bundles recorded none)."""
    path = storage.join(version_uri, name)
    try:
        data = storage.read_bytes(path)
    except FileNotFoundError:
        raise BundleError(f"{version_uri}: missing {name} ({path})") from None
    files = meta.get("files")
    if files is None:
        return data
    rec = files.get(name)
    if rec is None:
        raise BundleError(f"{path}: not listed in {META}")
    if len(data) != rec.get("bytes") or _sha256(data) != rec.get("sha256"):
        raise BundleError(
            f"{path}: corrupted: {len(data)} bytes with sha256 {_sha256(data)[:16]}..., "
            f"{META} recorded {rec.get('bytes')} bytes with sha256 "
            f"{str(rec.get('sha256'))[:16]}..."
        )
    return data


def read_config(uri: str) -> MSPrayConfig:
    """The (verified) config.json of the version ``uri`` resolves to."""
    version_uri = resolve_bundle(uri)
    meta = _read_meta(version_uri)
    return MSPrayConfig.from_json(_read_verified(version_uri, meta, CONFIG).decode("utf-8"))


def load_config(uri: str, overrides: dict | None = None) -> MSPrayConfig:
    """The bundle's own config with dotted runtime ``overrides`` (e.g. ``score.runtime``,
    ``bank.use_gpu``) applied; overrides whose value is ``None`` are left out."""
    cfg = read_config(uri)
    over = {k: v for k, v in (overrides or {}).items() if v is not None}
    return cfg.replace(**over) if over else cfg


# ---------------------------------------------------------------------- saving
def _version_id(hashes: dict[str, str], meta: dict) -> str:
    """Content id: the files' hashes and the scoring state stored only in meta.json."""
    content = {
        "format": FORMAT,
        "files": hashes,
        "threshold": meta.get("threshold"),
        "scale_stats": meta.get("scale_stats"),
    }
    return _sha256(json.dumps(content, sort_keys=True).encode())[:12]


def missing_parts(det: Detector) -> list[str]:
    """What ``det`` lacks to score on its own: a bank or fusion statistics of a scale, or
    the threshold (empty when complete)."""
    missing = [bank_name(s) for s in det.scales if s not in det.banks]
    missing += [f"stats of scale {s}" for s in det.scales if s not in det.stats]
    if det.threshold is None:
        missing.append("threshold")
    return missing


def save_bundle(det: Detector, uri: str) -> str:
    """Save ``det`` as a new version under bundle root ``uri``; returns the version URI
    (``uri/versions/<id>``; ``det.version`` is the id). ``latest`` is pointed at it only if
    the version is complete (see :func:`missing_parts`); an incomplete one is reachable by
    its version URI alone.

    Files go first, meta.json (with their checksums) last and only if absent, then the
    pointer: a crash at any point leaves the previous version current and intact. If the
    same content was saved before, its version is reused, not rewritten.
    """
    root = storage.normalize(uri)
    if storage.basename(storage.parent(root)) == VERSIONS_DIR:
        raise BundleError(
            f"{root} is a version folder, which is never rewritten: save to the bundle root "
            f"{storage.parent(storage.parent(root))}"
        )
    files = {
        CONFIG: det.cfg.to_json().encode("utf-8"),
        WEIGHTS: st_save(
            {k: v.detach().cpu().contiguous() for k, v in det.model.state_dict().items()}
        ),
    }
    for s in det.scales:
        if s in det.banks:
            files[bank_name(s)] = det.banks[s].to_bytes()
    hashes = {name: _sha256(data) for name, data in files.items()}
    meta = dict(det.meta)
    parent = meta.get("version")
    meta.update(
        format=FORMAT,
        threshold=det.threshold,
        scale_stats={str(s): list(v) for s, v in det.stats.items()},
        bank_sizes={str(s): det.banks[s].ntotal for s in det.scales if s in det.banks},
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )
    version = _version_id(hashes, meta)
    meta.update(
        version=version,
        parent_version=parent if parent != version else meta.get("parent_version"),
        saved_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        files={n: {"bytes": len(d), "sha256": hashes[n]} for n, d in files.items()},
    )
    out = version_uri(root, version)
    meta_uri = storage.join(out, META)
    wrote = False
    if storage.is_file(meta_uri):
        log.info("version %s is already saved in %s; not rewritten", version, root)
    else:
        storage.makedirs(out)
        for name, data in files.items():
            storage.write_bytes(storage.join(out, name), data)
        wrote = storage.create_exclusive(meta_uri, json.dumps(meta, indent=2).encode("utf-8"))
        if not wrote:
            log.info("version %s was completed by another writer at the same time", version)
    det.meta = meta if wrote else _read_meta(out)
    missing = missing_parts(det)
    if missing:
        log.info(
            "version %s is incomplete (no %s): saved as %s, %s not moved",
            version,
            ", ".join(missing),
            out,
            POINTER,
        )
    else:
        _move_pointer(root, version, parent)
    return out


def _move_pointer(root: str, version: str, parent: str | None) -> None:
    """Point ``root/latest`` at ``version`` (after the version is complete) with a
    compare-and-swap (:func:`mspray.storage.replace_if`), so a save that moves it at the same
    time is never overwritten unseen; warn when another save moved it since ``parent`` was
    loaded."""
    pointer = storage.join(root, POINTER)
    for _ in range(POINTER_ATTEMPTS):
        try:
            seen: bytes | None = storage.read_bytes(pointer)
        except FileNotFoundError:
            seen = None
        current = seen.decode().strip() if seen is not None else None
        if current == version:
            return  # moved already (a retried write whose reply was lost)
        if storage.replace_if(pointer, (version + "\n").encode(), seen):
            if current is not None and parent is not None and current != parent:
                log.warning(
                    "%s named %s, not %s that this version was built from; it now names %s",
                    pointer,
                    current,
                    parent,
                    version,
                )
            return
        log.info("%s moved while %s was being saved: reading it again", pointer, version)
    raise BundleError(f"{pointer}: kept moving, {version} saved but not pointed at")


# ---------------------------------------------------------------------- loading
def _check_encoder_layout(version_uri: str, meta: dict, cfg: MSPrayConfig) -> None:
    """Refuse weights written for an encoder layout this code no longer builds.

    Format 1 and the checksummed format 2 were written while Enc64's head read pool3
    (a 3×3 kernel on 256 channels); the current head reads conv3_3 with a 7×7 kernel, so
    those scale-64 weights cannot be loaded (and must not be reinterpreted). Bundles without
    a 64-px scale hold only Enc32/Enc16, which did not change, so they still load.
    """
    fmt = meta["format"]
    if fmt < ENC64_HEAD_FORMAT and 64 in cfg.model.scales:
        raise BundleError(
            f"{version_uri}: bundle format {fmt} holds the old 64-px encoder (head on pool3); "
            f"re-train: Enc64 changed in format {ENC64_HEAD_FORMAT} (its head now reads "
            f"conv3_3 with a 7x7 kernel, so every patch pixel reaches the embedding)"
        )


def load_bundle(
    uri: str,
    device: str | torch.device = "cpu",
    with_banks: bool = True,
    config: MSPrayConfig | None = None,
) -> Detector:
    """Load the bundle version ``uri`` resolves to (see :func:`resolve_bundle`), checking
    every file read against meta.json.

    ``config`` overrides runtime-only settings (e.g. ``bank.use_gpu``) while the model
    shape comes from the bundle's own config.
    """
    version_uri = resolve_bundle(uri)
    meta = _read_meta(version_uri)
    cfg = MSPrayConfig.from_json(_read_verified(version_uri, meta, CONFIG).decode("utf-8"))
    if config is not None:
        cfg = MSPrayConfig.from_dict(
            {**cfg.to_dict(), "bank": config.to_dict()["bank"], "score": config.to_dict()["score"]}
        )
    _check_encoder_layout(version_uri, meta, cfg)
    model = MultiScaleEncoder(cfg)
    state = st_load(_read_verified(version_uri, meta, WEIGHTS))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise BundleError(f"{version_uri}: weights do not match config.json: {e}") from e
    banks = {}
    if with_banks:
        for s in cfg.model.scales:
            data = _read_verified(version_uri, meta, bank_name(s))
            banks[s] = PatchBank.from_bytes(data, cfg.bank)
    stats = {int(s): (float(v[0]), float(v[1])) for s, v in meta.get("scale_stats", {}).items()}
    return Detector(cfg, model, banks, stats, meta.get("threshold"), meta, device=device)
