"""Node-local paths on a multi-node cluster: a local --input/--output/--data/--maps/--bundle
is refused while more than one node is alive (the other nodes' workers cannot see this
machine's folders), unless --shared-fs says every node mounts it at the same path; `serve`
and `deploy` check their bundles too. (A lone head whose autoscaler has worker node types
refuses them as well: tests/ray/test_cold_cluster.py.)"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pytest

from mspray.artifacts.output import read_results
from mspray.cli import main
from mspray.cli.flags import refuse_node_local

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_local_paths_are_refused_on_several_nodes_unless_shared(
    sim_cluster, tiny_bundle, tmp_path, capsys
):
    bundle, spec = tiny_bundle
    images = os.path.join(spec.split(":", 1)[1], "synthetic", "test")
    out = tmp_path / "scores"
    score = ["-q", "score", "--bundle", bundle, "--input", images, "--output", str(out)]
    assert main(score) == 2
    err = capsys.readouterr().err
    assert f"--input {images}" in err and f"--output {out}" in err
    assert "3 nodes" in err and "--shared-fs" in err and "s3://" in err
    assert not out.exists()  # refused before anything was written

    maps = tmp_path / "maps"
    metrics = str(tmp_path / "m.json")
    evaluate = ["-q", "evaluate", "--bundle", bundle, "--data", spec, "--category",
                "synthetic", "--json", metrics, "--ray", "--maps", str(maps)]  # fmt: skip
    assert main(evaluate) == 2
    assert f"--maps {maps}" in capsys.readouterr().err
    bank = ["-q", "build-bank", "--bundle", bundle, "--data", spec, "--category", "synthetic"]
    assert main(bank) == 2
    assert "--data" in capsys.readouterr().err
    # serve: its replicas may start on any node
    assert main(["-q", "serve", "--bundle", bundle]) == 2
    assert f"--bundle {bundle}: on this machine's disk" in capsys.readouterr().err

    # storage every node reaches needs no flag (nothing is asked of the cluster for it)
    refuse_node_local(argparse.Namespace(), [("--input", "s3://bucket/in")])

    # the user says the folders are shared (true here: the nodes share this machine's disk)
    assert main([*score, "--shared-fs", "--workers", "1"]) == 0
    n_images = sum(len(files) for _, _, files in os.walk(images))
    assert len(read_results(str(out), ["path"])) == n_images


def test_deploy_refuses_a_local_bundle_for_a_cluster_on_another_machine(tiny_bundle, capsys):
    config = Path(__file__).resolve().parents[2] / "serve_config.yaml"
    bundle = tiny_bundle[0]
    deploy = [
        "-q",
        "deploy",
        "--config",
        str(config),
        "--bundle",
        bundle,
        "--no-wait",
        "--address",
        "http://192.0.2.1:8265",
    ]  # fmt: skip  (TEST-NET-1: not here)
    assert main(deploy) == 2  # refused before anything is sent
    err = capsys.readouterr().err
    assert f"--bundle {bundle}" in err and "on this machine's disk" in err, err
    assert "cluster at http://192.0.2.1:8265 is another machine" in err, err
