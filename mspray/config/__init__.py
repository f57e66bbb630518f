"""One typed configuration: the single source of every setting.

:class:`MSPrayConfig` (model, training, bank, scoring) is stored as ``config.json`` in every
bundle. :class:`PoolConfig` sizes the Ray Data actor pools and :class:`ServeConfig` (in
:mod:`mspray.config.serve`, importable from here) is the Serve application's arguments and
``user_config``. They are pydantic models: values are
validated and coerced once, here, and an invalid value raises :class:`ConfigError` naming the
field (``train.lr=-1.0: ...``). Command-line flags (``mspray``, ``ray_jobs/``) are derived
from the fields (see :func:`flag`) by the CLI package :mod:`mspray.cli`; nothing else
re-declares them. Per-scale facts come from :mod:`mspray.model.scales`. What one run works
on is a run object (:mod:`mspray.config.runs`); how it shows itself and which Ray it joins
is the run context (:mod:`mspray.config.run`).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from mspray.config.base import (  # noqa: F401  (re-exported: the config's public helpers)
    DEVICE_HELP,
    ConfigError,
    Device,
    Section,
    describe,
    field_info,
    flag,
    setting,
    validate,
    with_overrides,
)
from mspray.config.base import check as _check
from mspray.config.serve import BATCH_WAIT_S, MODEL_NAME, ServeConfig  # noqa: F401
from mspray.model.scales import (
    SUPPORTED_SCALES,
    check_bank_stride,
    check_geometry,
    default_strides,
)

LOSS_NAMES = ("svdd", "cos", "ssl", "kmeans")


class ModelConfig(Section):
    """Encoders and anomaly-map construction."""

    image_size: int = flag(
        256, "images are resized to this square size (BTAD: 512)", ge=16, cli="--image-size"
    )
    scales: tuple[int, ...] = flag(
        SUPPORTED_SCALES,
        f"patch sizes, each of {', '.join(map(str, SUPPORTED_SCALES))} (comma-separated on the "
        "command line)",
    )
    embed_dim: int = setting(64, "embedding dimension D", ge=1)
    strides: tuple[int, ...] = flag(
        default_strides(SUPPORTED_SCALES),
        "inference stride per scale (same order as scales; paper: 16/4/4)",
    )
    pretrained: bool = flag(
        True, "load ImageNet VGG16 weights (--no-pretrained: random init)", cli="--no-pretrained"
    )
    pretrained_fallback: bool = setting(
        True, "weights not found: random init with a warning instead of an error"
    )
    weights_path: str | None = flag(
        None,
        "local or s3:// VGG16 weight file (default: the torch hub cache, downloading if needed)",
        cli="--weights",
    )
    fusion: Literal["sum", "zscore"] = flag(
        "zscore",
        "sum: the paper's sum of scale maps; zscore: standardise each scale with held-out "
        "normal stats first, so no scale dominates by its distance magnitude alone",
    )
    smoothing_sigma: float = setting(
        4.0, "Gaussian smoothing of the fused map, pixels (0 = off)", ge=0
    )
    score_window: int = setting(8, "window size of the image score (eq. 9)", ge=1)
    output_tanh: bool = setting(
        False, "tanh on the encoder output (the authors' code); changes the embeddings"
    )
    angle_input: Literal["concat", "diff"] = setting(
        "concat", "what the angle classifier reads: cat(h1, h2), or h1 − h2 (authors' code)"
    )
    score_window_stride: int = setting(4, "window stride of the image score", ge=1)
    shared_stem: bool = setting(
        True,
        "one VGG16 stem (conv1_1..pool2) for every scale: the smallest scale trains it, the "
        "others keep it frozen, and inference computes it once per image instead of once "
        "per scale (about half the encoder work); off by default for a random-init trunk",
    )

    @model_validator(mode="after")
    def _scales_tile_the_image(self) -> ModelConfig:
        check_geometry(self.image_size, self.scales, self.strides)
        return self


class TrainConfig(Section):
    """Per-scale encoder training (paper section 3.2-3.3)."""

    epochs: int = flag(
        20, "epochs per scale; 0 skips training (banks from the initial encoders)", ge=0
    )
    # A step count, never wall-clock time, so the same seed and config give the same weights
    # on any machine; a resumed run counts the steps it already took.
    max_steps: int = flag(
        0,
        "optimiser-step budget per scale over the whole run, resumes included (0 = no limit)",
        ge=0,
    )
    batch_size: int = flag(
        64, "samples per loss per optimiser step (global, over all workers)", ge=1
    )
    lr: float = flag(1e-5, "Adam learning rate", gt=0)
    lam: float = setting(1e-3, "λ in L = λ(L_SVDD + L_Cos) + L_SSL + L_Kmeans", ge=0)
    samples_per_image: int = flag(
        100, "samples (pairs / triplets / patches) per image per loss per epoch", ge=1
    )
    n_centers: int = setting(50, "K of the K-means loss", ge=1)
    center_update_every: int = setting(5, "recompute the K-means centers every N epochs", ge=1)
    kmeans_iters: int = setting(20, "Lloyd iterations per center update", ge=1)
    kmeans_warmup: int = setting(
        0, "epochs trained before the K-means term is added (its centers fit then)", ge=0
    )
    kmeans_relative: bool = setting(
        False,
        "divide the K-means term by the embeddings' spread, so that collapsing them to one "
        "point does not lower it (the paper's term is absolute)",
    )
    ssl_augment: bool = setting(
        False, "random RGB shift and Gaussian noise on SSL patches (the authors' code)"
    )
    selection: Literal["synthetic", "loss", "last"] = setting(
        "synthetic",
        "checkpoint selection: synthetic anomalies in held-out images (epoch 0 a candidate), "
        "the loss-based validation score, or the last epoch",
    )
    # selection costs about a third of a default epoch at scale 16 (benchmarks/
    # bench_selection.py): every 4th epoch keeps it under a quarter of the training time
    select_every: int = setting(
        4,
        "synthetic selection scores epoch 0, every N-th epoch and the last one (N=1: every epoch)",
        ge=1,
    )
    losses: tuple[Literal["svdd", "cos", "ssl", "kmeans"], ...] = flag(
        LOSS_NAMES, "loss terms used, a subset of svdd,cos,ssl,kmeans (drop some for an ablation)"
    )
    val_fraction: float = setting(
        0.1,
        "fraction of normal training images held out for checkpoint selection and threshold "
        "calibration (never test labels)",
        ge=0,
        lt=1,
    )
    stage_one: bool = setting(
        False,
        "self-supervised stage one before the per-scale encoders: train the VGG16 trunk to "
        "tell normal images from synthetic anomalies (mspray/train/stage_one.py)",
    )
    stage_one_steps: int = setting(100, "optimiser steps of stage one", ge=1)
    stage_one_batch: int = setting(32, "images per stage-one step (half get an anomaly)", ge=2)
    stage_one_lr: float = setting(1e-3, "Adam learning rate of stage one", gt=0)
    stage_one_kinds: tuple[Literal["cutpaste", "scar", "noise", "colour"], ...] = setting(
        ("cutpaste", "scar"),
        "anomaly kinds stage one trains on; selection pastes only the other kinds",
    )
    seed: int = flag(0, "seed of the split, sampling and initialisation")
    device: Device = flag("auto", f"training device: {DEVICE_HELP}")
    workers: int = flag(0, "Ray Train DDP workers (0 = plain single-process training)", ge=0)
    use_gpu: bool = flag(False, "one GPU per Ray Train worker", cli="--use-gpu")
    storage: str | None = flag(
        None,
        "Ray Train checkpoint storage, local path or s3:// (default: OUT.ray_runs next to "
        "the bundle)",
    )
    max_failures: int = setting(
        2, "Ray Train restarts of the worker group after failures (-1 = unlimited)", ge=-1
    )
    parallel_scales: bool = setting(
        False, "train the scales side by side on the cluster instead of one after another"
    )

    @model_validator(mode="after")
    def _losses_not_empty(self) -> TrainConfig:
        _check(len(self.losses) >= 1, "train.losses", self.losses, f"a subset of {LOSS_NAMES}")
        _check(
            len(set(self.stage_one_kinds)) in range(1, 4),
            "train.stage_one_kinds",
            self.stage_one_kinds,
            "one to three kinds: selection keeps the others",
        )
        return self


class BankConfig(Section):
    """Per-scale nearest-neighbour bank of training patch embeddings."""

    coreset_ratio: float = flag(
        0.1, "fraction of training patches kept by the greedy coreset (1.0 keeps all)", gt=0, le=1
    )
    coreset_max_candidates: int = flag(
        200_000,
        "random subsample before the greedy coreset, bounding its O(N·M) cost",
        ge=1,
        cli="--max-candidates",
    )
    coreset_max_size: int = setting(
        20_000, "upper bound on the coreset size per scale (bounds build and search time)", ge=1
    )
    index: Literal["flat", "ivf"] = flag(
        "flat", "flat (exact IndexFlatL2) or ivf (approximate IndexIVFFlat, for big banks)"
    )
    ivf_nlist: int = setting(1024, "IVF lists", ge=1)
    ivf_nprobe: int = setting(16, "IVF lists probed per query", ge=1)
    search_chunk: int = setting(16384, "queries per faiss search call (bounds memory)", ge=1)
    search: Literal["torch", "faiss"] = setting(
        "torch",
        "scoring search of a flat bank: torch (exact, tiled matrix products on the scoring "
        "device; see mspray/bank/search.py) or faiss (the index; an ivf bank always uses faiss)",
    )
    search_precision: Literal["auto", "fp32", "bf16", "fp16"] = setting(
        "auto",
        "pre-selection precision of the torch search (results stay exact fp32): auto is fp16 "
        "on CUDA, bf16 on a CPU with native bf16, else fp32",
    )
    search_candidates: int = setting(
        8, "candidates per query the torch search re-ranks exactly", ge=1
    )
    search_cells: Literal["auto", "on", "off"] = setting(
        "auto",
        "torch search that scores only the k-means cells of the bank that can hold a query's "
        "nearest row (exact, fp32; a few percent of a large bank): auto is on on CPU, off on "
        "CUDA (a dense fp16 product is faster there); search_precision and search_candidates "
        "apply when off",
    )
    use_gpu: bool = flag(
        False, "faiss search on GPU when one is present (needs the gpu extra)", cli="--bank-gpu"
    )
    bank_stride: int = setting(
        0, "stride of the training patches put in the bank (0 = network stride)", ge=0
    )


class ScoreConfig(Section):
    """Scoring, thresholding and input limits."""

    batch_size: int = flag(8, "images per forward pass when scoring", ge=1)
    target_fpr: float = flag(
        0.01,
        "wanted false-alarm rate on new normal images: the threshold is the order statistic "
        "of the calibration scores that promises it (see mspray/decisions/threshold.py)",
        gt=0,
        lt=1,
    )
    fpr_confidence: float = setting(
        0.95, "confidence of the promised false-alarm-rate interval", gt=0, lt=1
    )
    threshold_quantile: float | None = setting(
        None,
        "legacy rule, wins over target_fpr when set: threshold = this quantile of the "
        "calibration scores (bundles saved before target_fpr carry 0.99)",
        gt=0,
        le=1,
    )
    threshold_margin: float = setting(1.0, "the threshold is widened by this factor", gt=0)
    calibration: Literal["crossfit", "holdout"] = flag(
        "crossfit",
        "where calibration scores come from: crossfit scores every normal training image "
        "against a bank built without its fold (contiguous blocks of sorted file names) and "
        "calibration_gap images either side; holdout scores the held-out split against the "
        "full bank (cheap; too low a threshold when held-out images have near-duplicates)",
    )
    calibration_folds: int = setting(5, "folds of the cross-calibration", ge=2)
    calibration_gap: int | None = setting(
        None,
        "images left out of a fold's bank on each side (null: measured, how far apart in "
        "name order images still look like near-duplicates)",
        ge=0,
    )
    max_image_pixels: int = setting(
        40_000_000, "decompression-bomb guard: larger images are rejected (error row)", gt=0
    )
    max_image_bytes: int = setting(
        50_000_000, "larger files are rejected without being read whole (error row)", gt=0
    )
    # inference speed: none of these change what is computed beyond rounding
    precision: Literal["auto", "fp32", "bf16", "fp16"] = flag(
        "auto",
        "encoder precision: auto picks bf16 autocast on CPUs with native bf16 (AVX512-BF16 / "
        "AMX), fp16 autocast on CUDA, else fp32; the mode used is recorded in the metrics "
        "and the scoring run summary",
    )
    channels_last: bool = setting(
        True, "run the torch encoders in channels_last (NHWC) layout, faster for oneDNN"
    )
    runtime: Literal["torch", "onnx"] = flag(
        "torch", "encoder runtime: torch, or onnx (ONNX Runtime on CPU, needs the export extra)"
    )
    device: Device = flag(
        "auto",
        "where Ray scoring actors run the model, whatever the bundle was trained on: cuda "
        "reserves a GPU per actor (waits for GPU nodes), cpu never does, auto does when the "
        "cluster has GPU nodes or GPU node types its autoscaler can launch",
    )


class MSPrayConfig(Section):
    """Top-level configuration; JSON round-trip via :meth:`to_json` / :meth:`from_json`."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    bank: BankConfig = Field(default_factory=BankConfig)
    score: ScoreConfig = Field(default_factory=ScoreConfig)

    def __init__(self, **data: Any) -> None:
        try:
            super().__init__(**data)
        except ValidationError as e:
            raise ConfigError(describe(e)) from None

    @model_validator(mode="after")
    def _bank_stride_fits_the_scales(self) -> MSPrayConfig:
        check_bank_stride(self.bank.bank_stride, self.model.scales)
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_json(self, indent: int = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any) -> MSPrayConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"config: expected a JSON object, got {type(data).__name__}")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> MSPrayConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config: not valid JSON: {e}") from e
        return cls.from_dict(data)

    def replace(self, **overrides: Any) -> MSPrayConfig:
        """Copy with dotted overrides, e.g. ``cfg.replace(**{"train.epochs": 3})``."""
        return with_overrides(self, overrides)

    def stride_for(self, scale: int) -> int:
        """Inference stride of ``scale``."""
        return self.model.strides[self.model.scales.index(scale)]


#: A tiny-but-complete detector (two scales, all losses, random init, 64 px) that trains in
#: seconds on a few images: what tests, benchmark smoke runs and the report screenshot use.
TINY = {
    **{"model.image_size": 64, "model.scales": (32, 16), "model.strides": (4, 4)},
    **{"model.embed_dim": 16, "model.pretrained": False, "train.epochs": 1},
    **{"train.samples_per_image": 4, "train.batch_size": 16, "train.n_centers": 4},
    **{"train.val_fraction": 0.25, "bank.coreset_ratio": 0.5, "score.batch_size": 4},
}


def tiny_config(**overrides: Any) -> MSPrayConfig:
    """:data:`TINY` with dotted ``overrides``, e.g. ``tiny_config(**{"train.epochs": 0})``."""
    return MSPrayConfig().replace(**{**TINY, **overrides})


class PoolConfig(Section):
    """A Ray Data actor pool: its size bounds and what each actor reserves."""

    workers: int | None = flag(
        None,
        "upper bound of the autoscaling actor pool, each actor loads the model once "
        "(default: as many as the cluster can hold)",
        ge=1,
    )
    min_workers: int = flag(1, "actors kept while the pool is idle", ge=1)
    gpus_per_worker: float | None = flag(
        None, "GPUs per actor (default: from score.device, 1 or 0)", ge=0
    )
    cpus_per_worker: float = flag(
        1.0,
        "CPUs per actor, also its torch threads; a GPU actor takes at least half of its "
        "node's CPUs per GPU (up to 8), for the threads that feed the GPU",
        gt=0,
    )
    io_threads: int = flag(
        4, "reader threads per decode task (or actor), overlapping S3 latency", ge=1
    )
    decode_cpus: float = flag(1.0, "CPUs per decode task of batch scoring", gt=0)
