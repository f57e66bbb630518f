"""Vendor KubeRay's CRD schemas for tests/k8s: the ``ray.io/v1`` ``openAPIV3Schema`` of each
CRD file given, with its ``description`` texts dropped (nothing else changed), written as
``<crd name>.v1.json.gz`` beside this script.

    cd KUBERAY/ray-operator/config/crd/bases  # a KubeRay checkout at tag v1.7.0
    python tests/k8s/crds/vendor.py ray.io_{rayjobs,rayservices,raycronjobs}.yaml
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent


def strip_descriptions(node: Any) -> Any:
    """``node`` without the ``description`` of any schema in it (a property *named*
    ``description`` is kept: it sits under ``properties``, not as a schema keyword)."""
    if isinstance(node, list):
        return [strip_descriptions(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "description" and isinstance(value, str):
            continue
        if key == "properties":
            out[key] = {name: strip_descriptions(sub) for name, sub in value.items()}
        else:
            out[key] = strip_descriptions(value)
    return out


def main(paths: list[str]) -> None:
    for path in paths:
        crd = yaml.safe_load(Path(path).read_text())
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schema = strip_descriptions(v1["schema"]["openAPIV3Schema"])
        text = json.dumps(schema, sort_keys=True, separators=(",", ":"))
        out = HERE / f"{crd['metadata']['name']}.v1.json.gz"
        out.write_bytes(gzip.compress(text.encode(), mtime=0))
        print(f"{out.name}: {crd['spec']['names']['kind']}, {len(text)} bytes of schema")


if __name__ == "__main__":
    main(sys.argv[1:])
