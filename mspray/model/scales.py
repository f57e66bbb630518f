"""The table of supported scales: everything that differs between Enc64, Enc32 and Enc16.

Config validation, the encoders, the SVDD/Cos samplers, the CLI's default strides and the
documentation all read this table; adding a scale means adding one row here (and checking
the receptive field, see ``tests/model``). Imports nothing heavy, so :mod:`mspray.config`
can use it.

How each scale was chosen (receptive field *exactly* the patch, network stride dividing the
paper's inference stride):

====  ============================  ============  ===============================  ======
θ     VGG16 prefix (layers)         feature size  head                             stride
====  ============================  ============  ===============================  ======
64    conv1_1 .. conv3_3+ReLU (16)  7×7×256       conv7×7/2→128, LReLU, conv1×1→D  8
32    conv1_1 .. pool2 (10)         5×5×128       conv3×3→128, LReLU, conv3×3→D    4
16    conv1_1 .. pool2 (10)         1×1×128       conv1×1→128, LReLU, conv1×1→D    4
====  ============================  ============  ===============================  ======
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HeadSpec:
    """The encoder head: ``conv(k1, stride) → LReLU → conv(k2)`` from the prefix features."""

    kernel1: int
    stride1: int
    kernel2: int
    hidden: int = 128


@dataclass(frozen=True)
class ScaleSpec:
    """One patch size θ and all that depends on it."""

    patch_size: int
    #: number of VGG16 ``features`` modules used as the trunk
    prefix_layers: int
    #: channels out of the trunk
    channels: int
    #: pixel stride between neighbouring embeddings of a dense grid
    network_stride: int
    head: HeadSpec
    #: SVDD/Cos neighbour offset bound in pixels (paper: ±4 / ±2 / ±1)
    neighbour_radius: int
    #: inference stride of the paper (a multiple of ``network_stride``)
    default_stride: int


SCALES: dict[int, ScaleSpec] = {
    s.patch_size: s
    for s in (
        ScaleSpec(64, 16, 256, 8, HeadSpec(7, 2, 1), neighbour_radius=4, default_stride=16),
        ScaleSpec(32, 10, 128, 4, HeadSpec(3, 1, 3), neighbour_radius=2, default_stride=4),
        ScaleSpec(16, 10, 128, 4, HeadSpec(1, 1, 1), neighbour_radius=1, default_stride=4),
    )
}
#: Supported patch sizes, largest first (the paper's order).
SUPPORTED_SCALES: tuple[int, ...] = tuple(SCALES)


#: VGG16 ``features`` modules every scale's trunk starts with (conv1_1 .. pool2): the stem
#: that ``model.shared_stem`` keeps frozen and identical across scales, so that inference
#: computes it once per image for all scales (about half of the three encoders' work).
STEM_LAYERS: int = min(s.prefix_layers for s in SCALES.values())


def scale_spec(patch_size: int) -> ScaleSpec:
    """The row of ``patch_size``; a clear ``ValueError`` for an unsupported one."""
    try:
        return SCALES[int(patch_size)]
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"unsupported patch size {patch_size!r}; choose from {list(SUPPORTED_SCALES)}"
        ) from None


def default_strides(scales: tuple[int, ...] | list[int]) -> tuple[int, ...]:
    """The paper's inference stride of each of ``scales`` (raises for an unknown scale)."""
    return tuple(scale_spec(s).default_stride for s in scales)


def _check(ok: bool, name: str, value: object, why: str) -> None:
    if not ok:
        raise ValueError(f"{name}={value!r}: {why}")


def check_geometry(image_size: int, scales: tuple[int, ...], strides: tuple[int, ...]) -> None:
    """ValueError naming the config field unless every scale is supported, fits the image,
    appears once, and has a stride that is a multiple of its network stride and tiles
    the image."""
    _check(len(scales) >= 1, "model.scales", scales, "needs at least one scale")
    for p in scales:
        _check(p in SCALES, "model.scales", scales, f"each in {SUPPORTED_SCALES}")
        _check(p <= image_size, "model.scales", scales, "patch larger than image")
    _check(len(set(scales)) == len(scales), "model.scales", scales, "repeats")
    _check(len(strides) == len(scales), "model.strides", strides, "one a scale")
    for p, st in zip(scales, strides, strict=True):
        ns = SCALES[p].network_stride
        _check(
            st > 0 and st % ns == 0,
            "model.strides",
            strides,
            f"stride for patch {p} must be a positive multiple of {ns}",
        )
        _check(
            (image_size - p) % st == 0,
            "model.image_size",
            image_size,
            f"(image_size - {p}) must be a multiple of the stride {st} so patches tile it",
        )


def check_bank_stride(bank_stride: int, scales: tuple[int, ...]) -> None:
    """ValueError unless ``bank_stride`` is 0 or a multiple of every scale's network stride."""
    for p in scales:
        ns = scale_spec(p).network_stride
        _check(
            bank_stride % ns == 0,
            "bank.bank_stride",
            bank_stride,
            f"must be 0 or a multiple of {ns} (patch {p})",
        )
