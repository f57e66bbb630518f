"""The KubeRay manifests of deploy/kubernetes, checked without a Kubernetes cluster:

- against KubeRay's own CRD schemas (``ray.io/v1``, vendored from KubeRay v1.7.0 in
  ``crds/``), with ``jsonschema``, plus what ``kubectl apply --validate=strict`` adds: no
  field the schema does not declare (Kubernetes would prune it silently);
- against the operator's own checks that the schemas cannot express (mirrored by hand from
  ``ray-operator/controllers/ray/utils/validation.go``, v1.7.0): name lengths, autoscaler v2
  restart policy, token auth's Ray version, TTL and deadlines;
- for the shape every mspray cluster has (0-CPU head, GPU group, autoscaling from 0, S3 from
  the service account, the images of deploy/docker);
- every job entrypoint runs an existing ``ray_jobs/`` script with flags mspray's own parser
  accepts (expanded by bash, as KubeRay's submitter runs it);
- the RayService's ``serveConfigV2`` is what ``mspray deploy --rayservice`` writes from
  serve_config.yaml.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "deploy" / "kubernetes"
CRDS = Path(__file__).resolve().parent / "crds"
SCHEMAS = {
    "RayJob": "rayjobs.ray.io",
    "RayCronJob": "raycronjobs.ray.io",
    "RayService": "rayservices.ray.io",
}
#: validation.go: RayCluster names <= 53; a RayJob's or RayService's leaves room for a suffix,
#: a RayCronJob's also for its RayJobs' timestamps.
MAX_NAME = {"RayJob": 47, "RayService": 47, "RayCronJob": 36}
#: What a root ``metadata`` may hold (ObjectMeta fields a manifest sets).
OBJECT_META = {"name", "namespace", "labels", "annotations", "generateName"}
#: The service account of serviceaccount.yaml.
SERVICE_ACCOUNT = "mspray"


def _schema(kind: str) -> dict[str, Any]:
    return json.loads(gzip.decompress((CRDS / f"{SCHEMAS[kind]}.v1.json.gz").read_bytes()))


def _manifests() -> dict[str, dict[str, Any]]:
    docs = {}
    for path in sorted(MANIFESTS.glob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if doc.get("apiVersion") == "ray.io/v1":
            docs[path.name] = doc
    return docs


MANIFEST_FILES = sorted(_manifests())


# ---------------------------------------------------------------------- strict fields
def unknown_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Paths in ``value`` that ``schema`` (a structural CRD schema) does not declare: what the
    API server prunes, and reports under strict field validation. ``properties`` name the
    known fields, ``additionalProperties`` a map's values, and
    ``x-kubernetes-preserve-unknown-fields`` keeps anything below it."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found: list[str] = []
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key, sub in value.items():
            where = f"{path}.{key}"
            if key in props:
                found += unknown_fields(sub, props[key], where)
            elif isinstance(extra, dict):
                found += unknown_fields(sub, extra, where)
            elif extra is not True:
                found.append(where)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return found


def validate(doc: dict[str, Any]) -> list[str]:
    """Every schema error and unknown field of one manifest (root ``metadata`` is
    ObjectMeta, which the API server checks itself: only its usual fields are allowed)."""
    schema = _schema(doc["kind"])
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft4Validator(schema).iter_errors(doc)
    ]
    body = {k: v for k, v in doc.items() if k != "metadata"}
    errors += [f"unknown field {p}" for p in unknown_fields(body, schema)]
    errors += [f"unknown field .metadata.{k}" for k in set(doc.get("metadata", {})) - OBJECT_META]
    return errors


def test_the_strict_check_finds_unknown_and_misplaced_fields():
    doc = yaml.safe_load((MANIFESTS / "rayjob-train.yaml").read_text())
    cluster = doc["spec"]["rayClusterSpec"]
    cluster["shutdownAfterJobFinishes"] = True  # a RayJob field, misplaced
    cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resource"] = {}  # typo
    cluster["workerGroupSpecs"][0]["minReplicas"] = "0"  # wrong type
    errors = validate(doc)
    assert "unknown field .spec.rayClusterSpec.shutdownAfterJobFinishes" in errors
    assert (
        "unknown field .spec.rayClusterSpec.headGroupSpec.template.spec.containers[0].resource"
        in errors
    )
    assert any("minReplicas: '0' is not of type 'integer'" in e for e in errors), errors
    # a map's keys are its own; below x-kubernetes-preserve-unknown-fields anything goes
    assert not unknown_fields({"a": "x"}, {"additionalProperties": {"type": "string"}})
    assert not unknown_fields({"a": {"b": 1}}, {"x-kubernetes-preserve-unknown-fields": True})
    assert unknown_fields({"a": {"b": 1}}, {"additionalProperties": {"type": "object"}})


@pytest.mark.parametrize("name", MANIFEST_FILES)
def test_manifest_passes_kuberays_crd_schema_strictly(name):
    assert validate(_manifests()[name]) == []


def test_every_kind_is_there():
    kinds = sorted(d["kind"] for d in _manifests().values())
    assert kinds == ["RayCronJob", "RayJob", "RayJob", "RayService"]


# ---------------------------------------------------------------------- the operator's checks
def _job_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc["kind"] == "RayJob":
        return doc["spec"]
    if doc["kind"] == "RayCronJob":
        return doc["spec"]["jobTemplate"]
    return None


def _cluster(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "RayService":
        return doc["spec"]["rayClusterConfig"]
    return _job_spec(doc)["rayClusterSpec"]


def _pods(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Group name ("head" for the head) -> pod spec."""
    pods = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    for group in cluster["workerGroupSpecs"]:
        pods[group["groupName"]] = group["template"]["spec"]
    return pods


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split("."))


@pytest.mark.parametrize("name", MANIFEST_FILES)
def test_manifest_passes_the_operators_own_checks(name):
    doc = _manifests()[name]
    meta_name = doc["metadata"]["name"]
    assert len(meta_name) <= MAX_NAME[doc["kind"]]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", meta_name)  # DNS-1035 label
    cluster = _cluster(doc)
    if (cluster.get("authOptions") or {}).get("mode") == "token":
        assert _version(cluster["rayVersion"]) >= (2, 52, 0)
    if cluster.get("enableInTreeAutoscaling") and cluster["autoscalerOptions"]["version"] == "v2":
        for pod in _pods(cluster).values():
            assert pod.get("restartPolicy", "Never") == "Never"
    assert cluster["autoscalerOptions"].get("idleTimeoutSeconds", 0) >= 0
    for group in cluster["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        params = group.get("rayStartParams") or {}
        assert not (group.get("resources") and {"num-cpus", "num-gpus", "memory"} & set(params))
        assert "labels" not in params
    job = _job_spec(doc)
    if job is not None:
        assert job.get("ttlSecondsAfterFinished", 0) >= 0
        assert job.get("activeDeadlineSeconds", 1) > 0
        assert job.get("submissionMode", "K8sJobMode") == "K8sJobMode"  # submitterPodTemplate


# ---------------------------------------------------------------------- mspray's shape
def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints-cpu.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip()] = version.strip()
    return pins


def _images() -> dict[str, str]:
    version = re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), re.M)[1]
    return {k: f"registry.example.com/mspray:{version}-{k}" for k in ("cpu", "gpu")}


@pytest.mark.parametrize("name", MANIFEST_FILES)
def test_manifest_has_msprays_cluster_shape(name):
    doc = _manifests()[name]
    cluster = _cluster(doc)
    images = _images()
    assert cluster["rayVersion"] == _pins()["ray"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["authOptions"] == {"mode": "token"}
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    pods = _pods(cluster)
    assert pods["head"]["containers"][0]["image"] == images["cpu"]
    gpu = next(g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu")
    container = gpu["template"]["spec"]["containers"][0]
    assert container["image"] == images["gpu"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert all(g["minReplicas"] == 0 for g in cluster["workerGroupSpecs"])
    for group, pod in pods.items():
        assert pod["serviceAccountName"] == SERVICE_ACCOUNT, group
        for c in pod["containers"]:
            assert c["resources"]["requests"] and c["resources"]["limits"], group
    text = (MANIFESTS / name).read_text()
    assert not re.search(r"AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY|SESSION_TOKEN)", text)
    job = _job_spec(doc)
    if job is not None:
        assert job["shutdownAfterJobFinishes"] is True
        assert job["ttlSecondsAfterFinished"] > 0
        submitter = job["submitterPodTemplate"]["spec"]
        assert submitter["serviceAccountName"] == SERVICE_ACCOUNT
        (c,) = submitter["containers"]
        assert c["image"] == images["cpu"]
        assert c["resources"]["requests"] and c["resources"]["limits"]


def test_service_account_carries_the_s3_role_and_no_keys():
    sa = yaml.safe_load((MANIFESTS / "serviceaccount.yaml").read_text())
    assert sa["kind"] == "ServiceAccount" and sa["metadata"]["name"] == SERVICE_ACCOUNT
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
    namespaces = {d["metadata"]["namespace"] for d in _manifests().values()}
    assert namespaces == {sa["metadata"]["namespace"]}


# ---------------------------------------------------------------------- entrypoints
def _job_argv(script: Path, argv: list[str]) -> list[str]:
    """The ``mspray`` arguments ``script`` (a ray_jobs/ entrypoint) runs ``main`` with."""
    sys.path.insert(0, str(REPO / "ray_jobs"))
    try:
        if script.name == "train.py":
            import train  # ray_jobs/train.py: its own --workers default

            return train.job_args(argv)
    finally:
        sys.path.remove(str(REPO / "ray_jobs"))
    command = {"build_bank.py": "build-bank", "score.py": "score"}[script.name]
    return [command, *argv]


def _expand(entrypoint: str) -> list[str]:
    """The words bash makes of ``entrypoint`` (KubeRay's submitter runs it through bash)."""
    out = subprocess.run(
        ["bash", "-c", f"printf '%s\\0' {entrypoint}"], capture_output=True, text=True, check=True
    ).stdout
    return out.split("\0")[:-1]


@pytest.mark.parametrize(
    "name", [n for n in MANIFEST_FILES if _job_spec(_manifests()[n]) is not None]
)
def test_entrypoint_runs_a_ray_jobs_script_with_flags_mspray_accepts(name):
    from mspray.cli import build_parser
    from mspray.cli.flags import flag_values

    entrypoint = _job_spec(_manifests()[name])["entrypoint"]
    assert shutil.which("bash")
    python, script, *argv = _expand(entrypoint)
    assert python == "python"
    assert script.startswith("/home/ray/mspray/ray_jobs/")  # WORKDIR of deploy/docker
    local = REPO / "ray_jobs" / Path(script).name
    assert local.is_file(), script
    args = build_parser().parse_args(_job_argv(local, argv))  # SystemExit(2) on a bad flag
    assert callable(args.func)
    if local.name == "score.py":  # the nightly run scores the previous day (UTC)
        run = flag_values(args, "score")  # the ScoreRun's fields
        today = dt.datetime.now(dt.timezone.utc).date()
        assert run["date"] in (today - dt.timedelta(days=1), today - dt.timedelta(days=2))
        assert "{date}" in run["input"] and "{date}" in run["output"]
    if local.name == "train.py":
        flags = vars(args)
        assert flags["cfg:train.use_gpu"] and flags["cfg:train.workers"] >= 1


# ---------------------------------------------------------------------- serveConfigV2
def test_serve_config_v2_is_generated_from_serve_config_yaml(tmp_path):
    """The committed RayService is byte for byte what `mspray deploy --rayservice` writes
    from serve_config.yaml (with the flags its header names), so they cannot drift."""
    from mspray.cli import main

    committed = MANIFESTS / "rayservice.yaml"
    header = committed.read_text()
    assert "--num-gpus 1" in header and "--no-bundle-check" in header
    copy = tmp_path / "rayservice.yaml"
    copy.write_text(re.sub(r"(serveConfigV2: \|\n)(    .*\n)+", r"\1    {}\n", header))
    assert copy.read_text() != header
    flags = ["--num-gpus", "1", "--no-bundle-check", "--rayservice", str(copy)]
    assert main(["deploy", "--config", str(REPO / "serve_config.yaml"), *flags]) == 0
    assert copy.read_text() == header
    v2 = yaml.safe_load(yaml.safe_load(header)["spec"]["serveConfigV2"])
    source = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    assert [a["import_path"] for a in v2["applications"]] == [
        a["import_path"] for a in source["applications"]
    ]


def test_job_entrypoints_are_quoted_for_bash():
    """Each entrypoint is one shell command line (no `;`, `&&` or redirections)."""
    for name in MANIFEST_FILES:
        job = _job_spec(_manifests()[name])
        if job is not None:
            words = shlex.split(job["entrypoint"])
            assert not {";", "&&", "||", "|", ">", "<"} & set(words), name


def test_deploy_rayservice_pins_the_version_a_root_names_now(tmp_path):
    """`mspray deploy --rayservice` writes the version URI the root's `latest` names, for
    `kubectl apply`, and changes nothing else in the file."""
    from mspray.cli import main

    root = tmp_path / "screw"
    for version in ("v1", "v2"):
        (root / "versions" / version).mkdir(parents=True)
        (root / "versions" / version / "meta.json").write_text("{}")
    (root / "latest").write_text("v2\n")
    committed = (MANIFESTS / "rayservice.yaml").read_text()
    copy = tmp_path / "rayservice.yaml"
    copy.write_text(committed)
    flags = ["--num-gpus", "1", "--bundle", str(root), "--rayservice", str(copy)]
    assert main(["deploy", "--config", str(REPO / "serve_config.yaml"), *flags]) == 0
    written = yaml.safe_load(copy.read_text())
    v2 = yaml.safe_load(written["spec"]["serveConfigV2"])
    (detector,) = v2["applications"][0]["deployments"]
    assert detector["user_config"]["bundle_uri"] == str(root / "versions" / "v2")
    before = yaml.safe_load(committed)
    assert {k: v for k, v in written["spec"].items() if k != "serveConfigV2"} == {
        k: v for k, v in before["spec"].items() if k != "serveConfigV2"
    }
    assert committed.split("serveConfigV2")[0] == copy.read_text().split("serveConfigV2")[0]
    # not a RayService: a clear error, the file untouched
    job = tmp_path / "job.yaml"
    job.write_text((MANIFESTS / "rayjob-train.yaml").read_text())
    flags[-1] = str(job)
    assert main(["deploy", "--config", str(REPO / "serve_config.yaml"), *flags]) == 2
    assert job.read_text() == (MANIFESTS / "rayjob-train.yaml").read_text()
