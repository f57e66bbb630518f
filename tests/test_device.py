"""One device setting and one ``auto`` rule: every ``--device`` flag takes the config's one
:data:`~mspray.config.Device` type and rejects anything else at parse time with the same
message, and :mod:`mspray.device` decides ``auto`` for local work, Ray actors, Serve
replicas and the cluster alike (what "a GPU is there" means is the caller's input)."""

from __future__ import annotations

import pytest
import torch

from mspray.cli import build_parser
from mspray.config import ConfigError, MSPrayConfig, ServeConfig, validate
from mspray.device import pick_device, resolve_device, wants_gpu

#: Every command with a --device flag, with the arguments it needs besides.
COMMANDS = {
    "train": ["train", "--data", "folder:x", "--out", "o"],
    "evaluate": ["evaluate", "--bundle", "b", "--data", "folder:x", "--json", "m.json"],
    "score": ["score", "--bundle", "b", "--input", "i", "--output", "o"],
    "calibrate": ["calibrate", "--bundle", "b", "--input", "i", "--normal"],
    "serve": ["serve", "--bundle", "b"],
    "deploy": ["deploy", "--config", "c.yaml"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_device_flag_is_the_one_validated_type(command, capsys) -> None:
    parser = build_parser()
    with pytest.raises(SystemExit) as e:
        parser.parse_args([*COMMANDS[command], "--device", "tpu"])
    assert e.value.code == 2
    assert "'tpu': expected auto (CUDA when a GPU is there" in capsys.readouterr().err
    for good in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        args = parser.parse_args([*COMMANDS[command], "--device", good])
        assert good in {v for v in vars(args).values() if isinstance(v, str)}


def test_every_device_setting_of_the_config_is_the_same_type() -> None:
    for where, make in {
        "train.device": lambda d: MSPrayConfig().replace(**{"train.device": d}),
        "score.device": lambda d: MSPrayConfig().replace(**{"score.device": d}),
        "device": lambda d: validate(ServeConfig, {"device": d}),
    }.items():
        assert make("cuda:1").model_dump()  # accepted everywhere, also where it was not
        with pytest.raises(ConfigError, match=where):
            make("tpu")


def test_the_auto_rule() -> None:
    assert pick_device("auto", gpu=True) == "cuda"
    assert pick_device("auto", gpu=False) == "cpu"
    assert pick_device("cuda:1", gpu=False) == "cuda:1"  # asked for: kept
    assert wants_gpu("auto", gpu=True) and wants_gpu("cuda", gpu=False)
    assert not wants_gpu("cpu", gpu=True) and not wants_gpu("mps", gpu=True)
    # a Serve replica or Ray actor without a reserved GPU stays on the CPU under auto
    assert resolve_device("auto", gpu=False) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected  # local work: what this process sees
