"""Flags derived from the typed config, and the small argument helpers every command shares.

Flags that set configuration are not declared by the commands: :func:`add_config_flags`
derives them from the fields of :mod:`mspray.config` (name, type, choices, help), and
``--set KEY=VALUE`` sets any other field. Parsed values land in ``args`` under
``<prefix>:<dotted key>``; :func:`flag_values` collects them again.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from mspray.config import (
    DEVICE_HELP,
    ConfigError,
    Device,
    MSPrayConfig,
    PoolConfig,
    ServeConfig,
    field_info,
    validate,
    with_overrides,
)
from mspray.config.base import DEVICE_PATTERN
from mspray.model.scales import default_strides
from mspray.train.recipes import apply_recipe

SERVE_BUNDLE_HELP = (
    "model bundle (local path or s3://); repeat as --bundle NAME=URI to serve several "
    "bundles, picked per request with ?model=NAME [bundle_uri, models]"
)
SCORE_BUNDLE_HELP = (
    "model bundle (local path or s3://); repeat as --bundle NAME=URI to score each image "
    "with its own bundle (with --route or --manifest)"
)
ADDRESS_HELP = (
    "Ray cluster to join: its address, or 'auto' for the one `ray start` runs on this machine "
    "(default: $RAY_ADDRESS, as set by `ray job submit`; else a private local Ray with at "
    "least 4 logical CPUs, whatever else runs on the machine)"
)
POOL_KEYS = ("workers", "min_workers", "gpus_per_worker", "cpus_per_worker", "io_threads")
SCORE_POOL_KEYS = (*POOL_KEYS, "decode_cpus")


# ---------------------------------------------------------------------------- config flags
def add_config_flags(
    p: argparse.ArgumentParser | Any, prefix: str, root: type[BaseModel], keys: Iterable[str]
) -> None:
    """One flag per dotted config ``key`` of ``root``, derived from the field: its ``cli``
    name (else ``--<field-name>``), type, choices, ``metavar`` and description (a run
    object's :func:`~mspray.config.base.option` as written, a setting's with its key and
    default). A field without a default is a required flag. ``p`` may be a parser, an
    argument group or a mutually exclusive group. Parsed values land in ``args`` as
    ``<prefix>:<key>`` (``None`` when the flag is absent)."""
    for key in keys:
        info = field_info(root, key)
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        cli = extra.get("cli")
        name = cli if isinstance(cli, str) else "--" + key.rsplit(".", 1)[-1].replace("_", "-")
        kw: dict[str, Any] = {"dest": f"{prefix}:{key}", "default": None}
        if info.is_required():
            kw["required"] = True
        if extra.get("verbatim"):
            kw["help"] = info.description
        else:
            default = info.get_default(call_default_factory=True)
            shown = json.dumps(list(default) if isinstance(default, tuple) else default)
            kw["help"] = f"{info.description} [{key}; default: {shown}]"
        kw.update(_flag_type(info, key, name))
        if "metavar" in extra:
            kw["metavar"] = extra["metavar"]
        p.add_argument(name, **kw)


def _flag_type(info: Any, key: str, name: str) -> dict[str, Any]:
    """How argparse reads the field's value: type (or action), choices, metavar."""
    ann = _strip_optional(info.annotation)
    if any(getattr(m, "pattern", None) == DEVICE_PATTERN for m in info.metadata):
        return {"type": device_arg, "metavar": "DEVICE"}  # the one device type, checked now
    if ann is bool:
        # --no-x turns a default-on setting off; --x turns a default-off one on
        return {"action": "store_const", "const": not name.startswith("--no-")}
    if typing.get_origin(ann) is tuple:
        return {"type": _csv(typing.get_args(ann)[0]), "metavar": "A,B,..."}
    if typing.get_origin(ann) is typing.Literal:
        return {"choices": list(typing.get_args(ann))}
    metavar = key.rsplit(".", 1)[-1].upper()
    if ann is dt.date:
        return {"type": dt.date.fromisoformat, "metavar": metavar}
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        return {"metavar": metavar}  # e.g. str | datetime: the string, validated by the model
    return {"type": ann, "metavar": metavar}


def device_arg(text: str) -> str:
    """argparse type of every ``--device`` flag: the config's one :data:`Device` type."""
    try:
        return TypeAdapter(Device).validate_python(text)
    except ValidationError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected {DEVICE_HELP}") from None


def add_device_flag(p: argparse.ArgumentParser | Any, what: str) -> None:
    """``--device`` of a command that is not a config field (:data:`Device`, default auto)."""
    p.add_argument(
        "--device",
        default="auto",
        type=device_arg,
        metavar="DEVICE",
        help=f"{what}: {DEVICE_HELP} (default: auto)",
    )


def flag_values(args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    """The config flags given on the command line under ``prefix``: ``{dotted key: value}``."""
    head = prefix + ":"
    return {
        k[len(head) :]: v for k, v in vars(args).items() if k.startswith(head) and v is not None
    }


def _strip_optional(ann: Any) -> Any:
    """``X | None`` -> ``X``."""
    if typing.get_origin(ann) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return ann


def _csv(kind: Any) -> Callable[[str], tuple]:
    base = str if typing.get_origin(kind) is typing.Literal else kind

    def parse(text: str) -> tuple:
        return tuple(base(x.strip()) for x in text.split(",") if x.strip())

    return parse


def _set_value(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(raw)
    except json.JSONDecodeError:
        return key.strip(), raw  # a bare string


def add_model_config_args(p: argparse.ArgumentParser, keys: Iterable[str]) -> None:
    """``--config FILE``, ``--set KEY=VALUE`` and the flags of ``keys`` (MSPrayConfig)."""
    g = p.add_argument_group("configuration (mspray/config/__init__.py; flags override --config)")
    g.add_argument("--config", metavar="JSON", help="start from this config file (local or s3://)")
    g.add_argument(
        "--set",
        action="append",
        type=_set_value,
        default=[],
        metavar="KEY=VALUE",
        help="set any config field, e.g. --set train.lam=0.01 --set model.scales=[64,32]",
    )
    add_config_flags(g, "cfg", MSPrayConfig, keys)


def config_from_args(args: argparse.Namespace, base: MSPrayConfig | None = None) -> MSPrayConfig:
    """The config: ``base`` (or ``--config``, or the defaults), then ``train --recipe``, then
    ``--set``, then flags."""
    cfg = base or MSPrayConfig()
    if getattr(args, "config", None):
        from mspray import storage

        cfg = MSPrayConfig.from_json(storage.read_text(args.config))
    if getattr(args, "recipe", None):  # a preset: applied first, the flags override it
        cfg = apply_recipe(cfg, args.recipe)
    over = dict(getattr(args, "set", None) or [])
    over.update(flag_values(args, "cfg"))
    if "model.scales" in over and "model.strides" not in over:
        # the paper's stride of each chosen scale, so `--scales 64,32` alone is valid
        over["model.strides"] = default_strides(over["model.scales"])  # unknown: ValueError
    return with_overrides(cfg, over) if over else cfg


# ---------------------------------------------------------------------------- Ray
def add_address_flag(p: argparse.ArgumentParser | Any) -> None:
    """``--address``: which Ray to join (see :data:`ADDRESS_HELP`); the CLI's dispatch puts
    it in the run context (``mspray deploy``'s own ``--address``, a dashboard URL, is not)."""
    p.add_argument("--address", dest="ray_address", metavar="ADDRESS", help=ADDRESS_HELP)


def add_pool_args(p: argparse.ArgumentParser, keys: Iterable[str] = POOL_KEYS) -> None:
    """The actor-pool flags of ``keys`` (PoolConfig) and ``--address``."""
    g = p.add_argument_group("Ray (actor pool)")
    add_config_flags(g, "pool", PoolConfig, keys)
    add_address_flag(g)


def add_shared_fs_flag(p: argparse.ArgumentParser | Any) -> None:
    """``--shared-fs``: local paths are shared by every node (see :func:`refuse_node_local`)."""
    p.add_argument(
        "--shared-fs",
        action="store_true",
        help="the local paths given are on a filesystem every node of the cluster mounts at "
        "the same path (NFS, EFS): use them on a multi-node cluster (default: refused there)",
    )


def refuse_node_local(args: argparse.Namespace, paths: Iterable[tuple[str, str | None]]) -> None:
    """A :class:`ConfigError` when one of ``paths`` ((flag, URI) pairs) is on this machine's disk
    while the Ray cluster the command uses is not this machine alone, or can grow (its
    autoscaler has worker node types), unless ``--shared-fs``: workers elsewhere could not
    read it (every image would become an error row) or would write to their own disks (the
    driver would report the images missing)."""
    if getattr(args, "shared_fs", False):
        return
    from mspray import storage

    local = [f"{flag} {uri}" for flag, uri in paths if uri and storage.is_local(uri)]
    if not local:
        return
    from mspray.ray.runtime import node_local_refusal

    why = node_local_refusal()
    if why:
        raise ConfigError(
            f"{', '.join(local)}: on this machine's disk, but {why}. Use storage every node "
            "reaches (s3://...), or pass --shared-fs if it is on a filesystem every node "
            "mounts at the same path (NFS, EFS)."
        )


def dataset_root(spec: str) -> str:
    """The folder or prefix of a dataset spec (``mvtec:ROOT`` -> ``ROOT``)."""
    from mspray.data.datasets import parse_spec

    return parse_spec(spec).root


def pool_from_args(args: argparse.Namespace) -> PoolConfig:
    """The actor pool the flags ask for."""
    return validate(PoolConfig, flag_values(args, "pool"))


# ---------------------------------------------------------------------------- bundles
class _BundleAction(argparse.Action):
    """``--bundle URI`` sets ``<prefix>:bundle_uri``; ``--bundle NAME=URI`` (repeatable)
    adds to ``<prefix>:models``."""

    def __call__(self, parser: Any, namespace: Any, value: Any, option: Any = None) -> None:
        prefix = self.dest.split(":", 1)[0]
        name, uri = split_named_bundle(value)
        if name is None:
            if getattr(namespace, f"{prefix}:bundle_uri", None):
                parser.error("--bundle: give one bare URI, or name each one (NAME=URI)")
            setattr(namespace, f"{prefix}:bundle_uri", uri)
            return
        models = dict(getattr(namespace, f"{prefix}:models", None) or {})
        if name in models:
            parser.error(f"--bundle: model {name!r} given twice")
        models[name] = uri
        setattr(namespace, f"{prefix}:models", models)


def split_named_bundle(text: str) -> tuple[str | None, str]:
    """``"NAME=URI"`` -> ``(NAME, URI)``; a bare URI (also one with ``=`` in its path, as
    long as what precedes it is not a model name) -> ``(None, URI)``."""
    from mspray.config import MODEL_NAME

    name, sep, uri = text.partition("=")
    if sep and uri and MODEL_NAME.fullmatch(name):
        return name, uri
    return None, text


def add_bundle_flag(p: argparse.ArgumentParser | Any, prefix: str, help: str) -> None:
    """``--bundle [NAME=]URI``, repeatable (see :class:`_BundleAction`)."""
    p.add_argument(
        "--bundle", dest=f"{prefix}:bundle", action=_BundleAction, metavar="[NAME=]URI", help=help
    )


def add_serve_settings(p: argparse.ArgumentParser | Any) -> None:
    """Every :class:`ServeConfig` field as a flag, ``--bundle [NAME=]URI`` for the bundles."""
    # bundle_uri and models share the one repeatable --bundle [NAME=]URI flag
    derived = [f for f in ServeConfig.model_fields if f not in ("bundle_uri", "models")]
    add_config_flags(p, "serve", ServeConfig, derived)
    add_bundle_flag(p, "serve", SERVE_BUNDLE_HELP)


def serve_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`ServeConfig` fields given as flags (field -> value)."""
    values = flag_values(args, "serve")
    values.pop("bundle", None)  # the --bundle action's own dest
    return values


def serve_config_from_args(args: argparse.Namespace) -> ServeConfig:
    """The validated :class:`ServeConfig` of ``mspray serve``'s flags (a bundle required)."""
    cfg = validate(ServeConfig, serve_overrides(args))
    if not cfg.named_models():
        raise ConfigError("--bundle is required")
    return cfg


def print_json(data: dict) -> None:
    """A command's result on stdout, indented."""
    print(json.dumps(data, indent=2, default=str), flush=True)
