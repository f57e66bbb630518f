"""The machinery of :mod:`mspray.config`: config sections, flag-carrying fields, dotted
overrides, and validation errors that name the field. Holds no settings itself."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

#: The one type of every ``device`` setting and ``--device`` flag; :mod:`mspray.device`
#: holds the rule that turns it into a torch device (``auto``: CUDA when a GPU is there).
DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:\d+)?)$"
Device = Annotated[str, Field(pattern=DEVICE_PATTERN)]
DEVICE_HELP = "auto (CUDA when a GPU is there for the work, else the CPU), cpu, cuda[:N] or mps"


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def flag(default: Any, help: str, cli: str | None = None, **constraints: Any) -> Any:
    """A config field exposed as a command-line flag (``cli``: its name when not derived
    from the field name, e.g. ``--weights``; ``--no-x`` makes a bool flag that sets False)."""
    extra = {"cli": cli or True}
    return Field(default, description=help, json_schema_extra=extra, **constraints)


def setting(default: Any, help: str, **constraints: Any) -> Any:
    """A config field without a dedicated flag (set it with ``--config`` or ``--set``)."""
    return Field(default, description=help, **constraints)


def option(default: Any, help: str, cli: str | None = None, metavar: str | None = None,
           **constraints: Any) -> Any:  # fmt: skip
    """A field of a run object (:mod:`mspray.config.runs`): a flag whose ``help`` is shown as
    written (it states its own default), not a stored setting. ``default=...``: required."""
    extra: dict[str, Any] = {"cli": cli or True, "verbatim": True}
    if metavar:
        extra["metavar"] = metavar
    return Field(default, description=help, json_schema_extra=extra, **constraints)


class Section(BaseModel):
    """Base of every config model: unknown fields are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    def replace(self, **changes: Any) -> Any:
        """A validated copy with ``changes`` applied (field names of this section)."""
        return type(self).model_validate({**self.model_dump(), **changes})


def validate(model: type[BaseModel], data: Any, where: str = "") -> Any:
    """``model.model_validate(data)`` with errors as :class:`ConfigError` naming the field."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(describe(e, where)) from None


def with_overrides(cfg: BaseModel, overrides: dict[str, Any]) -> Any:
    """A validated copy of ``cfg`` with dotted overrides (``{"train.epochs": 3}``).

    Only fields set before or by ``overrides`` count as set in the copy (pydantic's
    ``model_fields_set``), so defaults that depend on the run (e.g. the no-ImageNet training
    settings) can tell a value the user chose from a default that happens to be equal."""
    data = cfg.model_dump(exclude_unset=True)
    for key, value in overrides.items():
        *path, name = key.split(".")
        node: Any = data
        model: Any = type(cfg)
        for part in path:
            sub = model.model_fields.get(part) if isinstance(model, type) else None
            model = sub.annotation if sub is not None else None
            if not (isinstance(model, type) and issubclass(model, BaseModel)):
                raise ConfigError(f"{key}: unknown config field")
            node = node.setdefault(part, {})
        if name not in model.model_fields:
            raise ConfigError(f"{key}: unknown config field")
        node[name] = value
    return validate(type(cfg), data)


def field_info(root: type[BaseModel], key: str) -> Any:
    """The pydantic ``FieldInfo`` of a dotted ``key`` under ``root``."""
    model: Any = root
    *path, name = key.split(".")
    for part in path:
        model = model.model_fields[part].annotation
    return model.model_fields[name]


def check(ok: bool, name: str, value: Any, why: str) -> None:
    """A validator's test: ``ValueError("name=value: why")`` unless ``ok``."""
    if not ok:
        raise ValueError(f"{name}={value!r}: {why}")


def describe(e: ValidationError, where: str = "") -> str:
    """One line per error, led by the dotted field name (``train.lr=-1.0: ...``)."""
    lines = []
    for err in e.errors(include_url=False):
        msg = str(err.get("msg", "")).removeprefix("Value error, ")
        loc = ".".join(str(p) for p in err.get("loc", ()) if not isinstance(p, int))
        loc = ".".join(p for p in (where, loc) if p)
        if not loc and err.get("type") == "value_error":
            lines.append(msg)  # a rule between fields (model validator) says it all
        elif err.get("type") == "extra_forbidden":
            lines.append(f"{loc}: unknown config field")
        elif err.get("type") == "value_error" and "=" in msg.split(":")[0]:
            lines.append(msg)  # our own checks already name the field
        else:
            lines.append(f"{loc}={err.get('input')!r}: {msg}")
    return "; ".join(lines)
