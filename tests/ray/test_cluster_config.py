"""cluster.yaml validates against the autoscaler schema that ships inside the ray package.

``ray up`` runs ``prepare_config`` (merge with the provider's defaults.yaml, docker checks,
per-type worker limits) and then ``validate_config`` (``jsonschema`` against
``ray/autoscaler/ray-schema.json`` plus cross-field checks). The tests run the same two calls
offline; only the AWS API steps (instance-type resource lookup, IAM/subnet bootstrap) are
left to a real ``ray up``.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    """cluster.yaml as written (parsed the way `ray up` parses it)."""
    with open(CLUSTER_YAML) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    """The autoscaler JSON schema shipped with the installed ray."""
    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


def test_raw_file_matches_schema(raw: dict[str, Any], schema: dict[str, Any]) -> None:
    # The schema forbids unknown keys at most levels, so a misspelt key fails here.
    jsonschema.validate(raw, schema)


def test_prepared_config_passes_ray_validation(raw: dict[str, Any]) -> None:
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)  # raises on any problem
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_validation_is_not_vacuous(raw: dict[str, Any]) -> None:
    """The same validator rejects a typo'd key and an inconsistent worker budget."""
    bad = copy.deepcopy(raw)
    bad["idle_timout_minutes"] = 5
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))
    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu_worker"]["min_workers"] = bad["max_workers"] + 1
    with pytest.raises(ValueError):
        validate_config(prepare_config(bad))


def test_node_types(raw: dict[str, Any]) -> None:
    types = raw["available_node_types"]
    head = types[raw["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    gpu = [t for n, t in types.items() if t.get("resources", {}).get("GPU", 0) > 0]
    cpu = [
        t
        for n, t in types.items()
        if n != raw["head_node_type"] and t.get("resources", {}).get("GPU", 0) == 0
    ]
    assert gpu and cpu, "needs a GPU worker type and a CPU worker type"
    assert any(t["node_config"]["InstanceType"].startswith(("g5", "g6", "p")) for t in gpu)
    for t in gpu + cpu:
        assert 0 <= t["min_workers"] <= t["max_workers"] <= raw["max_workers"]
    assert raw["idle_timeout_minutes"] > 0
    assert raw["provider"]["type"] == "aws"


def test_gpu_workers_run_the_gpu_image_and_require_cuda(raw: dict[str, Any]) -> None:
    types = raw["available_node_types"]
    for t in types.values():
        if t["resources"].get("GPU", 0) > 0:
            assert t["docker"]["worker_image"].endswith("-gpu")
            cmds = "\n".join(t["worker_setup_commands"])
            assert "assert torch.cuda.is_available()" in cmds  # fails the node without CUDA
            assert "faiss.get_num_gpus() > 0" in cmds
    # no node pip-installs mspray (or torch) at boot: the images hold it
    for cmds in [
        raw["setup_commands"],
        *(t.get("worker_setup_commands", []) for t in types.values()),
    ]:
        assert not any("pip install" in c for c in cmds)
    assert raw["file_mounts"], "the repository is synced to the nodes"


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.strip()] = version.strip()
    return pins


def test_nodes_run_the_images_of_the_pinned_versions(raw: dict[str, Any]) -> None:
    """Every node runs an mspray image of deploy/docker, whose Dockerfile builds on the Ray
    image of the ray pinned for its kind (constraints-cpu.txt / -gpu.txt, the releases the
    client and CI use), and boots a current GPU AMI, not Ray's end-of-life default."""
    ci = _pins(REPO / "constraints-cpu.txt")
    assert {"ray", "torch"} <= set(ci)
    images = {"cpu": raw["docker"]["image"]}
    for name, t in raw["available_node_types"].items():
        assert "ubuntu-24.04" in t["node_config"]["ImageId"], name
        if t["resources"].get("GPU", 0) > 0:
            images["gpu"] = t["docker"]["worker_image"]
    for kind, image in images.items():
        assert image.endswith(f"-{kind}"), image
        dockerfile = (REPO / "deploy" / "docker" / f"Dockerfile.{kind}").read_text()
        assert f"-t {image} ." in dockerfile  # the tag its build command gives
        pins = _pins(REPO / f"constraints-{kind}.txt")
        assert pins["ray"] == ci["ray"] and pins["torch"] == ci["torch"]
        assert f"FROM rayproject/ray:{ci['ray']}-" in dockerfile


def test_s3_access_by_instance_profile_not_keys(raw: dict[str, Any]) -> None:
    for name, t in raw["available_node_types"].items():
        assert "IamInstanceProfile" in t["node_config"], f"{name} has no instance profile"
    text = CLUSTER_YAML.read_text()
    # No credentials of any kind in the file.
    for pattern in (
        r"AKIA[0-9A-Z]{16}",
        r"aws_secret_access_key",
        r"AWS_SECRET_ACCESS_KEY",
        r"aws_access_key_id\s*[:=]",
        r"AWS_ACCESS_KEY_ID\s*=",
    ):
        assert not re.search(pattern, text), pattern
