"""A KubeRay RayService manifest whose ``serveConfigV2`` is a Serve config file, for
``kubectl apply``.

On KubeRay the RayService spec is the source of truth: the operator applies its
``serveConfigV2`` and reverts any change made through the dashboard's REST API. So
``mspray deploy --rayservice FILE`` does not deploy: it writes the final config (the file's
overrides applied, every bundle root pinned to the version URI its ``latest`` names now) as
FILE's ``serveConfigV2``, and leaves every other line of FILE, comments included, as it was.
Applying FILE rolls the version out; applying an earlier FILE rolls it back.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

KEY = "serveConfigV2"
#: First line of the generated block: where it comes from, so nobody edits it by hand.
HEADER = "# Generated from {source} by `mspray deploy --rayservice`: change that file instead."


class RayServiceError(ValueError):
    """The file is not a RayService manifest with a ``serveConfigV2: |`` block."""


def serve_config_v2(config: dict[str, Any], source: str) -> str:
    """``config`` as the text of ``serveConfigV2`` (YAML, in the config file's key order)."""
    body = yaml.safe_dump(config, sort_keys=False, default_flow_style=False, width=100)
    return HEADER.format(source=source) + "\n" + body


def replace_block(text: str, key: str, content: str) -> str:
    """``text`` (YAML) with the literal block scalar of ``key`` (``key: |``) replaced by
    ``content``; every other line is kept as it is."""
    lines = text.splitlines(keepends=True)
    pattern = re.compile(rf"^(\s*){re.escape(key)}:\s*\|[-+]?\s*(#.*)?$")
    for i, line in enumerate(lines):
        m = pattern.match(line.rstrip("\n"))
        if not m:
            continue
        indent = len(m.group(1))
        end = i + 1
        # the block: blank lines and lines indented deeper than its key
        while end < len(lines) and (
            not lines[end].strip() or len(lines[end]) - len(lines[end].lstrip()) > indent
        ):
            end += 1
        while end > i + 1 and not lines[end - 1].strip():
            end -= 1  # trailing blank lines belong to what follows
        pad = " " * (indent + 2)
        block = [f"{pad}{row}\n" if row else "\n" for row in content.rstrip("\n").split("\n")]
        return "".join(lines[: i + 1] + block + lines[end:])
    raise RayServiceError(f"no `{key}: |` block")


def write_rayservice(path: str, config: dict[str, Any], source: str) -> dict[str, Any]:
    """Write ``config`` as the ``spec.serveConfigV2`` of the RayService manifest at
    ``path`` (in place, atomically); ``source`` names the config file in the block's
    header. Returns the manifest as parsed back."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise RayServiceError(f"{path}: {e.strerror}") from None
    try:
        new = replace_block(text, KEY, serve_config_v2(config, source))
        manifest = yaml.safe_load(new)
    except (RayServiceError, yaml.YAMLError) as e:
        raise RayServiceError(f"{path}: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("kind") != "RayService":
        raise RayServiceError(f"{path}: not a RayService manifest")
    if yaml.safe_load((manifest.get("spec") or {}).get(KEY) or "") != config:
        raise RayServiceError(f"{path}: the `{KEY}: |` block is not spec.{KEY}")
    tmp = f"{path}.tmp"
    Path(tmp).write_text(new)
    os.replace(tmp, path)
    return manifest
