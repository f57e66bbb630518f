"""The container build files of deploy/docker install what the repository pins: the Ray image
of the pinned Ray release, mspray with the constraints file of its kind, the README's GPU
steps (faiss-gpu providing ``faiss``), as a non-root user, and the GPU image checks its
CUDA build. No image is built here (no container engine): the files are read."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "deploy" / "docker"
KINDS = ("cpu", "gpu")


def _pins(kind: str) -> dict[str, str]:
    pins = {}
    for line in (REPO / f"constraints-{kind}.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    return pins


def _dockerfile(kind: str) -> str:
    return (DOCKER / f"Dockerfile.{kind}").read_text()


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    kept = "\n".join(row for row in text.splitlines() if not row.startswith("#"))
    joined = re.sub(r"\\\n\s*", " ", kept)
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in joined.splitlines()
        if line.strip()
    ]


def _readme_commands() -> list[str]:
    """The shell lines of the README's bash blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    rows = [row.strip() for b in blocks for row in b.splitlines()]
    return [row for row in rows if row and not row.startswith("#")]


def _gpu_extra() -> str:
    text = (REPO / "pyproject.toml").read_text()
    return re.search(r'^gpu = \["([^"]+)"\]', text, re.M)[1]


@pytest.mark.parametrize("kind", KINDS)
def test_image_is_rays_image_of_the_pinned_release(kind):
    steps = _instructions(_dockerfile(kind))
    (base,) = [args for ins, args in steps if ins == "FROM"]
    assert base == f"rayproject/ray:{_pins(kind)['ray']}-py311-{kind}"


@pytest.mark.parametrize("kind", KINDS)
def test_image_installs_mspray_with_its_constraints_as_a_non_root_user(kind):
    steps = _instructions(_dockerfile(kind))
    users = [args for ins, args in steps if ins == "USER"]
    assert users and users[-1] not in ("root", "0")
    first_run = next(i for i, (ins, _) in enumerate(steps) if ins == "RUN")
    assert any(ins == "USER" for ins, _ in steps[:first_run])  # installed by that user too
    copied = " ".join(args for ins, args in steps if ins == "COPY")
    for path in (f"constraints-{kind}.txt", "pyproject.toml", "mspray", "ray_jobs"):
        assert path in copied and (REPO / path).exists()
    installs = [
        cmd.strip()
        for ins, args in steps
        if ins == "RUN"
        for cmd in args.split("&&")
        if "pip install" in cmd and "--no-deps" not in cmd
    ]
    assert installs and all(f"-c constraints-{kind}.txt" in cmd for cmd in installs)
    # nothing pinned here that the constraints file pins otherwise
    for name, version in re.findall(r"([A-Za-z0-9_.-]+)==([0-9][^\s\"']*)", _dockerfile(kind)):
        assert _pins(kind).get(name.lower(), version) == version, name


def test_cpu_image_installs_like_the_readme():
    readme = [c for c in _readme_commands() if "pip install" in c and "constraints-cpu" in c]
    assert readme, "the README's CPU install line"
    run = " ".join(a for i, a in _instructions(_dockerfile("cpu")) if i == "RUN")
    assert "-c constraints-cpu.txt" in run
    assert "faiss-gpu" not in run


def test_gpu_image_makes_faiss_gpu_provide_faiss_like_the_readme():
    run = " ".join(a for i, a in _instructions(_dockerfile("gpu")) if i == "RUN")
    readme = _readme_commands()
    assert '".[gpu]"' in run
    for step in ("pip uninstall -y faiss-cpu", f'--force-reinstall --no-deps "{_gpu_extra()}"'):
        assert any(step in c for c in readme), f"README lacks {step}"
        assert step in run
    # the order the README gives: extra, then uninstall, then the reinstall on top
    assert run.index('".[gpu]"') < run.index("uninstall -y faiss-cpu") < run.index("--no-deps")


def test_gpu_image_checks_cuda_and_faiss_gpu_at_build_time():
    run = " ".join(a for i, a in _instructions(_dockerfile("gpu")) if i == "RUN")
    assert "assert torch.version.cuda" in run
    assert "StandardGpuResources" in run


def test_both_constraints_pin_the_same_releases():
    assert _pins("cpu") == _pins("gpu")


@pytest.mark.parametrize("kind", KINDS)
def test_build_command_tags_the_image_the_manifests_run(kind):
    version = re.search(r'^version = "(.+)"', (REPO / "pyproject.toml").read_text(), re.M)[1]
    image = f"registry.example.com/mspray:{version}-{kind}"
    assert f"-f deploy/docker/Dockerfile.{kind} -t {image} ." in _dockerfile(kind)
    used = set()
    for path in [*(REPO / "deploy" / "kubernetes").glob("*.yaml"), REPO / "cluster.yaml"]:
        used |= set(re.findall(r"registry\.example\.com/mspray:[\w.-]+", path.read_text()))
    assert image in used
    assert used <= {f"registry.example.com/mspray:{version}-{k}" for k in KINDS}
