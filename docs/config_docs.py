"""Reference tables rendered from the code: the configuration (docs/configuration.md) and
the table of scales (docs/concepts.md).

Every section and field of :mod:`mspray.config` becomes a table row with its default, the
command-line flag that sets it (and which commands take it) and its description, so the
reference cannot drift from the code. Which commands take which flag is known only to the
CLI; ``docs/generate.py`` (beside this module, its one user) collects it from the parser
and passes it in. The table of scales is rendered from
:data:`mspray.model.scales.SCALES`, the one place a scale is defined.
"""

from __future__ import annotations

import json
import re
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from mspray.config import MSPrayConfig, PoolConfig, ServeConfig
from mspray.model.backbone import VGG16_CFG
from mspray.model.scales import SCALES, ScaleSpec

#: Flags of one dotted field key: ``[(flag, [command, ...]), ...]``.
FlagUses = Sequence[tuple[str, Sequence[str]]]

#: Top-level config models and the dotted prefix their fields get in the reference.
ROOTS: tuple[tuple[str, type[BaseModel]], ...] = (
    ("", MSPrayConfig),
    ("pool", PoolConfig),
    ("serve", ServeConfig),
)

INTRO = """\
# Configuration reference

<!-- Generated from mspray/config/__init__.py by `python docs/generate.py`; do not edit.
tests/test_docs.py fails when this file is out of date. -->

One typed config (`mspray/config/__init__.py`) is used by the CLI, the jobs and Serve, and stored as
`config.json` in every bundle. Pass a JSON file with `--config FILE` (any subset of the
sections and fields below); command-line flags override it, and `--set KEY=VALUE` sets any
field, also one without a flag (e.g. `--set train.lam=0.01`). Invalid values are rejected
with the field's name (e.g. `train.lr=-1.0: must be > 0`).

```json
{"model": {"image_size": 256, "scales": [64, 32, 16]}, "train": {"epochs": 20, "workers": 4}}
```

The sections `model`, `train`, `bank` and `score` are the bundle's config (`MSPrayConfig`);
`pool` sizes the Ray Data actor pools (`PoolConfig`) and `serve` is the Serve application
(`ServeConfig`: `args:` of `serve_config.yaml`; the fields marked *reloadable* are its
`user_config`, applied to running replicas without a restart).
"""


def sections() -> list[tuple[str, type[BaseModel]]]:
    """Every config section as ``(dotted name, model)``, in reference order."""
    out: list[tuple[str, type[BaseModel]]] = []
    for prefix, root in ROOTS:
        if prefix:
            out.append((prefix, root))
            continue
        for name, info in root.model_fields.items():
            out.append((name, typing.cast(type[BaseModel], info.annotation)))
    return out


def default_text(value: Any) -> str:
    """A default as JSON (``null``, ``true``, lists for tuples), as in ``config.json``."""
    if isinstance(value, tuple):
        value = list(value)
    return json.dumps(value, ensure_ascii=False)


def constraint_text(info: FieldInfo) -> str:
    """The field's bounds and choices in words, e.g. ``≥ 16`` or ``one of: sum, zscore``."""
    parts = []
    symbols = ((at.Ge, "ge", "≥"), (at.Gt, "gt", ">"), (at.Le, "le", "≤"), (at.Lt, "lt", "<"))
    for meta in info.metadata:
        for kind, attr, sign in symbols:
            if isinstance(meta, kind):
                parts.append(f"{sign} {getattr(meta, attr)}")
    ann = info.annotation
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        ann = next(a for a in typing.get_args(ann) if a is not type(None))
    if typing.get_origin(ann) is typing.Literal:
        parts.append("one of: " + ", ".join(map(str, typing.get_args(ann))))
    return "; ".join(parts)


def _markdown(text: str) -> str:
    """A docstring's reST roles and double backquotes as Markdown code."""
    return re.sub(r":\w+:`([^`]+)`", r"`\1`", text).replace("``", "`")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _flag_cell(uses: FlagUses) -> str:
    return "<br>".join(f"`{flag}` ({', '.join(commands)})" for flag, commands in uses)


def render(flags: Mapping[str, FlagUses] | None = None) -> str:
    """The whole reference as Markdown. ``flags`` maps a dotted key (``train.epochs``,
    ``pool.workers``, ``serve.max_batch_size``) to the flags that set it and the commands
    that take them; a field without an entry has no flag."""
    flags = flags or {}
    out = [INTRO]
    for name, model in sections():
        out.append(f"### `{name}`\n")
        doc = (model.__doc__ or "").strip().split("\n\n")[0]
        if doc:
            out.append(_markdown(" ".join(line.strip() for line in doc.splitlines())) + "\n")
        out.append("| field | default | flag | meaning |")
        out.append("| --- | --- | --- | --- |")
        reloadable = set(getattr(model, "RELOADABLE", ()))
        for field, info in model.model_fields.items():
            default = default_text(info.get_default(call_default_factory=True))
            meaning = info.description or ""
            bounds = constraint_text(info)
            if bounds:
                meaning += f" ({bounds})"
            if field in reloadable:
                meaning += "; *reloadable*"
            row = (f"`{field}`", f"`{default}`", _flag_cell(flags.get(f"{name}.{field}", ())))
            out.append(f"| {' | '.join(row)} | {_cell(meaning)} |")
        out.append("")
    return "\n".join(out)


def vgg16_layer_names() -> list[str]:
    """Names of the modules of VGG16's ``features`` in order (conv1_1, relu, ..., pool1, ...)."""
    names, block, conv = [], 1, 0
    for v in VGG16_CFG:
        if v == "M":
            names.append(f"pool{block}")
            block, conv = block + 1, 0
        else:
            conv += 1
            names += [f"conv{block}_{conv}", "relu"]
    return names


def _trunk_text(spec: ScaleSpec) -> str:
    last = vgg16_layer_names()[spec.prefix_layers - 1]
    if last == "relu":
        last = vgg16_layer_names()[spec.prefix_layers - 2] + " + ReLU"
    return f"conv1_1 … {last} ({spec.prefix_layers} modules)"


def _head_text(spec: ScaleSpec) -> str:
    h = spec.head
    first = f"conv {h.kernel1}×{h.kernel1}" + (f" / {h.stride1}" if h.stride1 > 1 else "")
    return f"{first} → {h.hidden}, LReLU, conv {h.kernel2}×{h.kernel2} → D"


def render_scales() -> str:
    """The table of supported scales (one row per :class:`ScaleSpec`) as Markdown."""
    out = [
        "| patch θ | VGG16 trunk | trunk channels | head | network stride "
        "| SVDD / Cos neighbour offset | inference stride (default) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for spec in SCALES.values():
        row = (
            f"{spec.patch_size} px",
            _trunk_text(spec),
            str(spec.channels),
            _head_text(spec),
            str(spec.network_stride),
            f"±{spec.neighbour_radius} px",
            str(spec.default_stride),
        )
        out.append(f"| {' | '.join(row)} |")
    return "\n".join(out) + "\n"
