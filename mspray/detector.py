"""Detector: trained encoders + per-scale banks + calibration -> anomaly maps and scores.

This is the object a model bundle loads into, and what batch scoring and Serve call. Each
scale's patch score is the distance to the nearest training patch embedding (eq. 6), spread
to pixels by averaging over covering patches (eq. 7); scale maps are fused (eq. 8) and the
image score is the maximum 8×8 window mean of the fused map (eq. 9).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from mspray import maps as M
from mspray.bank import PatchBank
from mspray.config import BankConfig, MSPrayConfig
from mspray.config.run import progress_bar
from mspray.model.multiscale import MultiScaleEncoder, normalize


def cpu_has_native_bf16() -> bool:
    """True when oneDNN has native bf16 kernels on this CPU (AVX512-BF16 or AMX); without
    them bf16 is emulated and slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``score.precision`` -> the mode actually used: "fp32", "bf16" or "fp16".

    "auto" is fp16 on CUDA, bf16 on a CPU with native bf16, else fp32. An explicit
    reduced mode is honoured (CPU fp16 is refused: torch has no fast CPU fp16 convolutions).
    """
    if precision == "auto":
        if device.type == "cuda":
            return "fp16"
        return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("score.precision='fp16' needs a GPU; use 'bf16' or 'auto' on CPU")
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"score.precision={precision!r}: expected auto, fp32, bf16 or fp16")
    return precision


def resolve_search_precision(precision: str, device: torch.device) -> str:
    """``bank.search_precision`` -> the torch search's pre-selection precision.

    "auto" is fp16 on CUDA, bf16 on a CPU with native bf16 (AMX/AVX512-BF16 products, a few
    candidates re-ranked in fp32), else fp32 (see benchmarks/README.md)."""
    if precision == "auto":
        if device.type == "cuda":
            return "fp16"
        return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("bank.search_precision='fp16' needs a GPU; use 'bf16' or 'fp32' on CPU")
    return precision


def resolve_search_cells(cells: str, device: torch.device) -> bool:
    """``bank.search_cells`` -> whether the torch search scores bank cells (see
    :class:`mspray.bank.search.CellSearch`): "auto" is on CPU, where it is several times faster
    than dense products on large banks, and off on CUDA, where dense fp16 products are."""
    if cells not in ("auto", "on", "off"):
        raise ValueError(f"bank.search_cells={cells!r}: expected auto, on or off")
    return device.type == "cpu" if cells == "auto" else cells == "on"


def resolve_memory_format(channels_last: bool, device: torch.device | str) -> torch.memory_format:
    """``score.channels_last`` -> the encoders' layout: NHWC (same values; oneDNN's
    convolutions are faster in it) unless off or on MPS."""
    on = channels_last and torch.device(device).type != "mps"
    return torch.channels_last if on else torch.contiguous_format


def search_bank(
    bank: PatchBank, queries: torch.Tensor, cfg: BankConfig, device: torch.device | str
) -> torch.Tensor:
    """Min distance of each query (``M×D``) to ``bank`` as inference searches it: float32
    on ``device`` for the torch search (``bank.search``; the cell search on CPU), on CPU
    for faiss (always for an IVF bank)."""
    device = torch.device(device)
    if cfg.search == "torch" and cfg.index == "flat":
        searcher = bank.searcher(
            device,
            resolve_search_precision(cfg.search_precision, device),
            cfg.search_candidates,
            resolve_search_cells(cfg.search_cells, device),
        )
        return searcher.search(queries)
    return torch.from_numpy(bank.search(queries))


def stage_order(scales: tuple[int, ...]) -> list[str]:
    """The scoring stages in pipeline order, as :meth:`Detector.predict` (and ``decode``, the
    image loading its callers time) name them; ``stem`` only where the encoders share one."""
    per_scale = [f"{stage}_{s}" for stage in ("encoder", "search") for s in scales]
    return ["decode", "stem", *per_scale, "maps", "score"]


def stage_seconds_per_image(
    timings: dict[str, float], n_images: int, scales: tuple[int, ...]
) -> dict[str, float]:
    """Summed stage ``timings`` as seconds per image, in pipeline order (the table that
    ``mspray evaluate --json`` and the scoring run summary record)."""
    order = [k for k in stage_order(scales) if k in timings]
    order += sorted(set(timings) - set(order))
    return {k: timings[k] / max(n_images, 1) for k in order}


class _Timer:
    """Adds wall seconds per stage into ``timings`` (a no-op when it is None)."""

    def __init__(self, timings: dict[str, float] | None, device: torch.device | None = None):
        self.timings = timings
        # CUDA kernels run asynchronously: a stage ends when the device has finished it
        self.cuda = device is not None and device.type == "cuda"

    @contextlib.contextmanager
    def __call__(self, stage: str):
        if self.timings is None:
            yield
            return
        t0 = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - t0


@dataclass
class Prediction:
    """Scores for a batch of ``B`` images of size ``H×W`` (the config's image size)."""

    image_scores: torch.Tensor  # B
    maps: torch.Tensor  # B×H×W fused (and smoothed) anomaly map
    scale_scores: dict[int, torch.Tensor] = field(default_factory=dict)  # scale -> B
    scale_maps: dict[int, torch.Tensor] = field(default_factory=dict)  # scale -> B×H×W raw
    is_anomalous: torch.Tensor | None = None  # B bool, when a threshold is set


class Detector:
    """Scores images against the banks of normal patch embeddings of every scale."""

    def __init__(
        self,
        cfg: MSPrayConfig,
        model: MultiScaleEncoder,
        banks: dict[int, PatchBank] | None = None,
        stats: dict[int, tuple[float, float]] | None = None,
        threshold: float | None = None,
        meta: dict | None = None,
        device: str | torch.device = "cpu",
    ):
        self.cfg = cfg
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.banks: dict[int, PatchBank] = dict(banks or {})
        self.stats = dict(stats or {})
        self.threshold = threshold
        self.meta: dict = dict(meta or {})
        self.precision = resolve_precision(cfg.score.precision, self.device)
        layout = resolve_memory_format(cfg.score.channels_last, self.device)
        self.channels_last = layout == torch.channels_last
        if self.channels_last:
            self.model.to(memory_format=layout)
        self.search_precision = resolve_search_precision(cfg.bank.search_precision, self.device)
        self.search_cells = resolve_search_cells(cfg.bank.search_cells, self.device)
        self.runtime = cfg.score.runtime
        self._onnx = None
        if self.runtime == "onnx":
            if self.device.type != "cpu":
                raise ValueError("score.runtime='onnx' runs on CPU; use runtime 'torch' on GPU")
            from mspray.onnx.convert import OnnxEncoders  # optional dependency

            self._onnx = OnnxEncoders(self.model, self.scales)
            self.precision = "fp32"

    @property
    def inference_mode(self) -> dict[str, str | bool]:
        """How the encoders run (recorded in metrics and batch outputs)."""
        return {
            "runtime": self.runtime,
            "precision": self.precision,
            "channels_last": bool(self.channels_last and self.runtime == "torch"),
        }

    @property
    def scales(self) -> tuple[int, ...]:
        return tuple(self.cfg.model.scales)

    @property
    def version(self) -> str:
        return str(self.meta.get("version", "unversioned"))

    # ------------------------------------------------------------------ banks
    def bank_stride(self, scale: int) -> int:
        return self.cfg.bank.bank_stride or self.model.encoder(scale).stride

    def embed_scales(
        self,
        images: torch.Tensor,
        strides: dict[int, int],
        timings: dict[str, float] | None = None,
    ) -> dict[int, torch.Tensor]:
        """``B×3×H×W`` images in [0, 1] -> ``{scale: B×h×w×D}`` float32 grids at the given
        stride per scale, with this detector's runtime, precision and layout. A stem the
        encoders share runs once (seconds under ``stem`` in ``timings``, each scale's
        remaining layers under ``encoder_<scale>``)."""
        timer = _Timer(timings, self.device)
        if self._onnx is not None:
            grids = {}
            x = normalize(images.to(torch.float32)).numpy()
            for scale, step in self.model.grid_steps(strides).items():
                with timer(f"encoder_{scale}"):
                    grid = torch.from_numpy(self._onnx[scale](x))[:, :, ::step, ::step]
                    grids[scale] = grid.permute(0, 2, 3, 1).contiguous()
            return grids
        images = images.to(self.device, torch.float32)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        autocast = (
            torch.autocast(self.device.type, dtype=dtype)
            if dtype is not None
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            grids = self.model.embed_scales(images, strides, timer)
        return {s: g.float() for s, g in grids.items()}

    def embed(self, images: torch.Tensor, scale: int, stride: int | None = None) -> torch.Tensor:
        """One scale of :meth:`embed_scales` (default stride: the inference stride)."""
        return self.embed_scales(images, {scale: stride or self.cfg.stride_for(scale)})[scale]

    def bank_embeddings(self, images: torch.Tensor, scale: int) -> np.ndarray:
        """All training patch embeddings of ``images`` at the bank stride, ``N×D`` float32."""
        return self.bank_embeddings_scales(images, (scale,))[scale]

    def bank_embeddings_scales(
        self, images: torch.Tensor, scales: Iterable[int] | None = None
    ) -> dict[int, np.ndarray]:
        """:meth:`bank_embeddings` of several scales (default: all), the stem run once."""
        strides = {s: self.bank_stride(s) for s in (scales or self.scales)}
        grids = self.embed_scales(images, strides)
        return {s: g.reshape(-1, g.shape[-1]).cpu().numpy() for s, g in grids.items()}

    def bank_embeddings_batched(
        self,
        images: torch.Tensor,
        scales: Iterable[int] | None = None,
        batch_size: int | None = None,
    ) -> dict[int, np.ndarray]:
        """:meth:`bank_embeddings_scales` of ``images`` embedded ``batch_size`` at a time
        (default ``score.batch_size``), the rows of each scale concatenated in image order."""
        scales = tuple(scales or self.scales)
        bs = batch_size or self.cfg.score.batch_size
        parts: dict[int, list[np.ndarray]] = {s: [] for s in scales}
        for i in progress_bar(range(0, images.shape[0], bs), desc="bank embeddings"):
            for s, emb in self.bank_embeddings_scales(images[i : i + bs], scales).items():
                parts[s].append(emb)
        return {s: np.concatenate(parts.pop(s)) for s in scales}

    def build_banks(self, images: torch.Tensor, batch_size: int | None = None) -> None:
        """Banks of every scale from normal ``images`` (``N×3×H×W`` in [0, 1])."""
        embeddings = self.bank_embeddings_batched(images, None, batch_size)
        for s in self.scales:
            emb = embeddings.pop(s)
            self.banks[s] = PatchBank.build(emb, self.cfg.bank, seed=self.cfg.train.seed)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def all_patch_scores(
        self,
        images: torch.Tensor,
        timings: dict[str, float] | None = None,
        banks: dict[int, PatchBank] | None = None,
    ) -> dict[int, torch.Tensor]:
        """Nearest-neighbour distance of every patch, per scale (``B×h×w`` each, on CPU),
        against ``banks`` (default: the detector's). The encoders' shared stem runs once.
        With ``timings``, adds seconds under ``stem``, ``encoder_<scale>``, ``search_<scale>``.
        """
        banks = self.banks if banks is None else banks
        missing = [s for s in self.scales if s not in banks]
        if missing:
            raise RuntimeError(f"no bank for scale(s) {missing}; build or load banks first")
        strides = {s: self.cfg.stride_for(s) for s in self.scales}
        timer = _Timer(timings, self.device)
        scores = {}
        for s, grid in self.embed_scales(images, strides, timings).items():
            b, h, w, d = grid.shape
            with timer(f"search_{s}"):
                scores[s] = self.search(banks[s], grid.reshape(-1, d)).view(b, h, w).cpu()
        return scores

    def search(self, bank: PatchBank, queries: torch.Tensor) -> torch.Tensor:
        """Min distance of each query (``M×D``) to ``bank`` (:func:`search_bank`)."""
        return search_bank(bank, queries, self.cfg.bank, self.device)

    def raw_scale_maps(
        self,
        images: torch.Tensor,
        timings: dict[str, float] | None = None,
        banks: dict[int, PatchBank] | None = None,
    ) -> dict[int, torch.Tensor]:
        """Per-scale pixel maps of nearest-neighbour distances (``B×H×W`` each, on CPU);
        ``timings`` as in :meth:`all_patch_scores`, plus ``maps``."""
        size = tuple(images.shape[-2:])
        grids = self.all_patch_scores(images, timings, banks)
        with _Timer(timings, self.device)("maps"):
            return {
                s: M.patch_scores_to_map(g, s, self.cfg.stride_for(s), size)
                for s, g in grids.items()
            }

    def smooth(self, m: torch.Tensor) -> torch.Tensor:
        """A raw map smoothed as every map is before fusion (eq. 8's input)."""
        return M.gaussian_smooth(m, self.cfg.model.smoothing_sigma)

    def predict(self, images: torch.Tensor, timings: dict[str, float] | None = None) -> Prediction:
        """Maps and scores of ``B×3×H×W`` images in [0, 1] (already at the config's size).

        With ``timings``, per-stage seconds are added to it (see :meth:`all_patch_scores`; the
        pixel maps, smoothing and fusion count under ``maps``, the image scores under
        ``score``)."""
        grids = self.all_patch_scores(images, timings)
        timer = _Timer(timings, self.device)
        with timer("maps"):
            size, sigma = tuple(images.shape[-2:]), self.cfg.model.smoothing_sigma
            raw, smoothed = {}, {}
            for s, g in grids.items():
                stride = self.cfg.stride_for(s)
                raw[s] = M.patch_scores_to_map(g, s, stride, size)
                smoothed[s] = M.smoothed_patch_map(g, s, stride, size, sigma)
            stats = self.stats if self.cfg.model.fusion == "zscore" and self.stats else None
            # smoothing is linear and keeps constants (its rows sum to one), so the smoothed
            # fusion is the fusion of the smoothed maps
            fused = M.fuse_maps(smoothed, stats)
        with timer("score"):
            win, st = self.cfg.model.score_window, self.cfg.model.score_window_stride
            scores = M.image_scores(fused, win, st)
            scale_scores = {s: M.image_scores(m, win, st) for s, m in smoothed.items()}
        flags = None if self.threshold is None else scores > self.threshold
        return Prediction(scores, fused, scale_scores, raw, flags)
