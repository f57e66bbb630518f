"""One typed configuration for the model, training, bank and scoring.

The same :class:`MSPrayConfig` is used by the CLI, the Ray jobs and the Serve deployment, and
it is stored as ``config.json`` inside every model bundle. Invalid values raise
:class:`ConfigError` naming the offending field (e.g. ``train.lr``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal, get_args, get_origin, get_type_hints

#: Receptive-field-aligned network stride of each supported patch size (see model/encoder.py).
SUPPORTED_SCALES = (64, 32, 16)
LOSS_NAMES = ("svdd", "cos", "ssl", "kmeans")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


@dataclass
class ModelConfig:
    """Encoders and anomaly-map construction."""

    image_size: int = 256
    scales: tuple[int, ...] = (64, 32, 16)
    embed_dim: int = 64
    #: Inference stride per scale, same order as ``scales`` (paper: 16/4/4).
    strides: tuple[int, ...] = (16, 4, 4)
    #: Load ImageNet VGG16 weights (from ``weights_path`` or the torch hub cache / download).
    pretrained: bool = True
    #: If pretrained weights cannot be found, fall back to random init (with a warning)
    #: instead of failing. The bundle records whether weights were actually loaded.
    pretrained_fallback: bool = True
    weights_path: str | None = None
    #: "sum": paper's plain sum of per-scale maps. "zscore": each scale's map is first
    #: standardised with statistics of held-out normal images, so no scale dominates by its
    #: distance magnitude alone.
    fusion: Literal["sum", "zscore"] = "zscore"
    #: Gaussian smoothing of the fused map (sigma in pixels, 0 disables).
    smoothing_sigma: float = 4.0
    score_window: int = 8
    score_window_stride: int = 4


@dataclass
class TrainConfig:
    """Per-scale encoder training (paper section 3.2-3.3)."""

    #: 0 skips training: banks are built from the initial (ImageNet or random) encoders.
    epochs: int = 20
    #: Wall-clock budget per scale in minutes (0 = none). Training stops after the step that
    #: passes it and keeps the best model by validation loss, so a CPU-only machine still
    #: finishes in predictable time; on a GPU the epochs usually end first.
    max_minutes: float = 5.0
    batch_size: int = 64
    lr: float = 1e-5
    #: λ in L = λ(L_SVDD + L_Cos) + L_SSL + L_Kmeans.
    lam: float = 1e-3
    #: Samples (pairs / triplets / patches) per image per loss per epoch.
    samples_per_image: int = 100
    n_centers: int = 50
    center_update_every: int = 5
    kmeans_iters: int = 20
    #: Losses to use; removing one is how the ablation is run.
    losses: tuple[str, ...] = LOSS_NAMES
    #: Fraction of the normal training images held out for validation loss, checkpoint
    #: selection and threshold calibration (never test labels).
    val_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"
    #: Ray Train: number of DDP workers (0 = plain single-process training).
    workers: int = 0
    use_gpu: bool = False
    #: Ray Train storage (local path or s3://); None = a temp dir next to the bundle.
    storage: str | None = None
    max_failures: int = 2
    #: Train the scales side by side on the cluster (True) or one after another.
    parallel_scales: bool = False


@dataclass
class BankConfig:
    """Per-scale nearest-neighbour bank of training patch embeddings."""

    #: Fraction of training patches kept by greedy (PatchCore) coreset; 1.0 keeps all.
    coreset_ratio: float = 0.1
    #: Random subsample before the greedy coreset to bound its O(N*M) cost.
    coreset_max_candidates: int = 200_000
    #: Upper bound on the coreset size per scale (bounds build and search time on big sets).
    coreset_max_size: int = 20_000
    #: "flat" (exact IndexFlatL2) or "ivf" (IndexIVFFlat, approximate, for big banks).
    index: Literal["flat", "ivf"] = "flat"
    ivf_nlist: int = 1024
    ivf_nprobe: int = 16
    #: Queries per faiss search call; bounds the distance-matrix memory.
    search_chunk: int = 16384
    use_gpu: bool = False
    #: Stride (pixels) at which training patches are put in the bank; 0 = network stride.
    bank_stride: int = 0


@dataclass
class ScoreConfig:
    """Scoring, thresholding and input limits."""

    batch_size: int = 8
    #: Wanted false-alarm rate on new normal images: the threshold is the order statistic
    #: of the calibration scores that promises it (see mspray/threshold.py).
    target_fpr: float = 0.01
    #: Confidence of the promised false-alarm-rate interval reported with the threshold.
    fpr_confidence: float = 0.95
    #: Legacy rule, wins over ``target_fpr`` when set: threshold = this quantile of the
    #: calibration scores. Bundles saved before ``target_fpr`` existed carry 0.99 here.
    threshold_quantile: float | None = None
    #: The threshold is widened by this factor (1 = none).
    threshold_margin: float = 1.0
    #: Where calibration scores come from. "crossfit": every normal training image is scored
    #: against a bank built without its fold (contiguous blocks of the sorted file names, so
    #: consecutive frames share a fold) and without ``calibration_gap`` images either side;
    #: costs ``calibration_folds`` extra bank builds. "holdout": the held-out split only,
    #: scored against the full bank (cheap; too low a threshold when held-out images have
    #: near-duplicates in the bank).
    calibration: Literal["crossfit", "holdout"] = "crossfit"
    calibration_folds: int = 5
    #: Images left out of a fold's bank on each side of it; None = measured: how far apart
    #: in name order images still look like near-duplicates (see calibration.py).
    calibration_gap: int | None = None
    #: Decompression-bomb guard: images with more pixels are rejected.
    max_image_pixels: int = 40_000_000
    max_image_bytes: int = 50_000_000


@dataclass
class MSPrayConfig:
    """Top-level configuration; JSON round-trip via :meth:`to_json` / :meth:`from_json`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MSPrayConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"config: expected a JSON object, got {type(data).__name__}")
        sections = {}
        for f in dataclasses.fields(cls):
            sections[f.name] = _build(f.default_factory, data.get(f.name, {}), f.name)  # type: ignore[misc]
        unknown = set(data) - set(sections)
        if unknown:
            raise ConfigError(f"config: unknown section(s) {sorted(unknown)}")
        return cls(**sections)

    @classmethod
    def from_json(cls, text: str) -> MSPrayConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config: not valid JSON: {e}") from e
        return cls.from_dict(data)

    def replace(self, **overrides: Any) -> MSPrayConfig:
        """Copy with dotted overrides, e.g. ``cfg.replace(**{"train.epochs": 3})``."""
        data = self.to_dict()
        for key, value in overrides.items():
            section, _, name = key.partition(".")
            if section not in data or name not in data[section]:
                raise ConfigError(f"{key}: unknown config field")
            data[section][name] = value
        return MSPrayConfig.from_dict(data)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        m, t, b, s = self.model, self.train, self.bank, self.score
        _check(m.image_size >= 16, "model.image_size", m.image_size, "must be >= 16")
        _check(len(m.scales) >= 1, "model.scales", m.scales, "needs at least one scale")
        for p in m.scales:
            _check(p in SUPPORTED_SCALES, "model.scales", m.scales, f"each in {SUPPORTED_SCALES}")
            _check(p <= m.image_size, "model.scales", m.scales, "patch larger than image_size")
        _check(len(set(m.scales)) == len(m.scales), "model.scales", m.scales, "duplicates")
        _check(len(m.strides) == len(m.scales), "model.strides", m.strides, "one per scale")
        from mspray.model.encoder import network_stride  # local: avoid import cycle

        for p, st in zip(m.scales, m.strides, strict=True):
            ns = network_stride(p)
            _check(
                st > 0 and st % ns == 0,
                "model.strides",
                m.strides,
                f"stride for patch {p} must be a positive multiple of {ns}",
            )
            _check(
                (m.image_size - p) % st == 0,
                "model.image_size",
                m.image_size,
                f"(image_size - {p}) must be a multiple of the stride {st} so patches "
                "tile the image",
            )
        _check(m.embed_dim >= 1, "model.embed_dim", m.embed_dim, "must be >= 1")
        _check(m.fusion in ("sum", "zscore"), "model.fusion", m.fusion, "'sum' or 'zscore'")
        _check(m.smoothing_sigma >= 0, "model.smoothing_sigma", m.smoothing_sigma, ">= 0")
        _check(m.score_window >= 1, "model.score_window", m.score_window, ">= 1")
        _check(
            m.score_window_stride >= 1, "model.score_window_stride", m.score_window_stride, ">= 1"
        )
        _check(t.epochs >= 0, "train.epochs", t.epochs, "must be >= 0 (0 = no training)")
        _check(t.max_minutes >= 0, "train.max_minutes", t.max_minutes, "must be >= 0")
        _check(t.batch_size >= 1, "train.batch_size", t.batch_size, "must be >= 1")
        _check(t.lr > 0, "train.lr", t.lr, "must be > 0")
        _check(t.lam >= 0, "train.lam", t.lam, "must be >= 0")
        _check(t.samples_per_image >= 1, "train.samples_per_image", t.samples_per_image, ">= 1")
        _check(t.n_centers >= 1, "train.n_centers", t.n_centers, "must be >= 1")
        _check(
            t.center_update_every >= 1, "train.center_update_every", t.center_update_every, ">= 1"
        )
        _check(t.kmeans_iters >= 1, "train.kmeans_iters", t.kmeans_iters, ">= 1")
        _check(
            len(t.losses) >= 1 and set(t.losses) <= set(LOSS_NAMES),
            "train.losses",
            t.losses,
            f"a non-empty subset of {LOSS_NAMES}",
        )
        _check(0 <= t.val_fraction < 1, "train.val_fraction", t.val_fraction, "in [0, 1)")
        _check(
            t.device == "auto" or t.device.split(":")[0] in ("cpu", "cuda", "mps"),
            "train.device",
            t.device,
            "'auto', 'cpu', 'cuda[:N]' or 'mps'",
        )
        _check(t.workers >= 0, "train.workers", t.workers, "must be >= 0")
        _check(t.max_failures >= -1, "train.max_failures", t.max_failures, ">= -1")
        _check(0 < b.coreset_ratio <= 1, "bank.coreset_ratio", b.coreset_ratio, "in (0, 1]")
        _check(
            b.coreset_max_candidates >= 1,
            "bank.coreset_max_candidates",
            b.coreset_max_candidates,
            ">= 1",
        )
        _check(b.index in ("flat", "ivf"), "bank.index", b.index, "'flat' or 'ivf'")
        _check(b.ivf_nlist >= 1, "bank.ivf_nlist", b.ivf_nlist, ">= 1")
        _check(b.ivf_nprobe >= 1, "bank.ivf_nprobe", b.ivf_nprobe, ">= 1")
        _check(b.search_chunk >= 1, "bank.search_chunk", b.search_chunk, ">= 1")
        _check(b.bank_stride >= 0, "bank.bank_stride", b.bank_stride, ">= 0")
        for p in m.scales:
            ns = network_stride(p)
            _check(
                b.bank_stride % ns == 0,
                "bank.bank_stride",
                b.bank_stride,
                f"must be 0 or a multiple of {ns} (patch {p})",
            )
        _check(s.batch_size >= 1, "score.batch_size", s.batch_size, ">= 1")
        _check(
            s.threshold_quantile is None or 0 < s.threshold_quantile <= 1,
            "score.threshold_quantile",
            s.threshold_quantile,
            "null or in (0, 1]",
        )
        _check(0 < s.target_fpr < 1, "score.target_fpr", s.target_fpr, "in (0, 1)")
        _check(0 < s.fpr_confidence < 1, "score.fpr_confidence", s.fpr_confidence, "in (0, 1)")
        _check(
            s.calibration in ("crossfit", "holdout"),
            "score.calibration",
            s.calibration,
            "'crossfit' or 'holdout'",
        )
        _check(s.calibration_folds >= 2, "score.calibration_folds", s.calibration_folds, ">= 2")
        _check(
            s.calibration_gap is None or s.calibration_gap >= 0,
            "score.calibration_gap",
            s.calibration_gap,
            "null (measured) or >= 0",
        )
        _check(s.threshold_margin > 0, "score.threshold_margin", s.threshold_margin, "> 0")
        _check(s.max_image_pixels > 0, "score.max_image_pixels", s.max_image_pixels, "> 0")
        _check(s.max_image_bytes > 0, "score.max_image_bytes", s.max_image_bytes, "> 0")

    def stride_for(self, scale: int) -> int:
        """Inference stride of ``scale``."""
        return self.model.strides[self.model.scales.index(scale)]


def _check(ok: bool, name: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"{name}={value!r}: {why}")


def _build(factory: type, values: Any, section: str) -> Any:
    """Build one section dataclass from a dict, coercing JSON lists to tuples and checking
    every field's type so a typo or a wrong type names the field."""
    if not isinstance(values, dict):
        raise ConfigError(f"{section}: expected an object, got {type(values).__name__}")
    hints = get_type_hints(factory)
    known = {f.name for f in dataclasses.fields(factory)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"{section}.{sorted(unknown)[0]}: unknown config field")
    kwargs = {k: _coerce(v, hints[k], f"{section}.{k}") for k, v in values.items()}
    return factory(**kwargs)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    origin = get_origin(hint)
    args = get_args(hint)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name}={value!r}: expected a list")
        return tuple(_coerce(v, args[0], name) for v in value)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{name}={value!r}: expected one of {list(args)}")
        return value
    if args and type(None) in args:  # Optional[X]
        if value is None:
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), name)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}={value!r}: expected true/false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}={value!r}: expected an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name}={value!r}: expected a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}={value!r}: expected a string")
        return value
    return value
