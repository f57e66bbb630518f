import json

import pytest

from mspray.config import ConfigError, MSPrayConfig


def test_defaults_follow_the_paper():
    cfg = MSPrayConfig()
    assert cfg.model.scales == (64, 32, 16)
    assert cfg.model.strides == (16, 4, 4)
    assert cfg.model.embed_dim == 64 and cfg.model.image_size == 256
    assert cfg.train.lam == 1e-3 and cfg.train.lr == 1e-5 and cfg.train.batch_size == 64
    assert cfg.train.samples_per_image == 100 and cfg.train.n_centers == 50
    assert cfg.train.center_update_every == 5


def test_json_round_trip_keeps_every_field():
    cfg = MSPrayConfig().replace(
        **{
            "train.epochs": 7,
            "model.scales": (64, 16),
            "model.strides": (16, 4),
            "bank.index": "ivf",
        }
    )
    back = MSPrayConfig.from_json(cfg.to_json())
    assert back == cfg
    assert isinstance(back.model.scales, tuple)


@pytest.mark.parametrize(
    "override, field",
    [
        ({"train.lr": -1.0}, "train.lr"),
        ({"train.epochs": -1}, "train.epochs"),
        ({"model.scales": (64, 48)}, "model.scales"),
        ({"model.strides": (16, 4, 6)}, "model.strides"),
        ({"model.image_size": 250}, "model.image_size"),
        ({"bank.coreset_ratio": 0.0}, "bank.coreset_ratio"),
        ({"train.losses": ("svdd", "nope")}, "train.losses"),
        ({"train.device": "tpu"}, "train.device"),
    ],
)
def test_invalid_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        MSPrayConfig().replace(**override)


def test_wrong_types_and_unknown_fields_in_json_name_the_field():
    data = MSPrayConfig().to_dict()
    data["train"]["epochs"] = "ten"
    with pytest.raises(ConfigError, match=r"train\.epochs"):
        MSPrayConfig.from_dict(data)
    data = MSPrayConfig().to_dict()
    data["model"]["embed_dims"] = 3
    with pytest.raises(ConfigError, match=r"model\.embed_dims"):
        MSPrayConfig.from_dict(data)
    with pytest.raises(ConfigError, match="not valid JSON"):
        MSPrayConfig.from_json("{")
    assert json.loads(MSPrayConfig().to_json())["bank"]["index"] == "flat"


def test_recipes_preset_training_and_the_cli_flag_applies_them():
    from mspray.cli import build_parser
    from mspray.cli.flags import config_from_args
    from mspray.train.recipes import apply_recipe

    paper = apply_recipe(MSPrayConfig(), "paper")
    assert paper == MSPrayConfig() and paper.train.lr == 1e-5 and paper.model.pretrained
    scratch = apply_recipe(MSPrayConfig(), "random-init")
    assert scratch.train.lr == 1e-3 and not scratch.model.pretrained
    with pytest.raises(ConfigError, match="recipe"):
        apply_recipe(MSPrayConfig(), "fast")
    # The recipe comes first; explicit options override it.
    train = ["train", "--data", "folder:x", "--out", "b", "--recipe", "random-init"]
    cfg = config_from_args(build_parser().parse_args([*train, "--lr", "5e-4"]))
    assert cfg.train.lr == 5e-4 and cfg.model.image_size == 128
    cfg = config_from_args(build_parser().parse_args([*train, "--set", "train.lr=2e-4"]))
    assert cfg.train.lr == 2e-4 and not cfg.model.pretrained
    with pytest.raises(SystemExit):  # argparse: an unknown recipe is a usage error
        build_parser().parse_args([*train[:-1], "fast"])


def test_max_steps_is_a_derived_train_flag():
    from mspray.cli import build_parser
    from mspray.cli.flags import config_from_args

    argv = ["train", "--data", "folder:x", "--out", "b", "--max-steps", "7"]
    assert config_from_args(build_parser().parse_args(argv)).train.max_steps == 7
    assert MSPrayConfig().train.max_steps == 0  # no budget by default
    with pytest.raises(ConfigError, match="train.max_steps"):
        MSPrayConfig().replace(**{"train.max_steps": -1})


def test_scale_table_is_the_one_source_of_per_scale_facts():
    from mspray.model.encoder import PatchEncoder
    from mspray.model.scales import SCALES, SUPPORTED_SCALES, default_strides, scale_spec
    from mspray.train.sampling import NEIGHBOUR_RADIUS

    cfg = MSPrayConfig()
    assert cfg.model.scales == SUPPORTED_SCALES == (64, 32, 16)
    assert cfg.model.strides == default_strides(cfg.model.scales) == (16, 4, 4)
    assert NEIGHBOUR_RADIUS == {64: 4, 32: 2, 16: 1}
    for p, spec in SCALES.items():
        enc = PatchEncoder(p, embed_dim=8)
        assert enc.stride == spec.network_stride
        assert enc.features[-1].__class__.__name__ in ("ReLU", "MaxPool2d")
        assert len(enc.features) == spec.prefix_layers
        assert enc.head[0].in_channels == spec.channels
    with pytest.raises(ValueError, match=r"unsupported patch size 48; choose from \[64, 32, 16\]"):
        scale_spec(48)
    with pytest.raises(ValueError, match="unsupported patch size"):
        default_strides((64, 48))


def test_tiny_config_is_one_definition_with_overrides():
    from mspray.config import TINY, tiny_config

    cfg = tiny_config()
    assert cfg.model.scales == (32, 16) and cfg.model.image_size == 64
    assert not cfg.model.pretrained and cfg.train.epochs == 1
    assert tiny_config(**{"train.epochs": 0}).train.epochs == 0
    assert TINY["model.embed_dim"] == 16 and cfg.model.embed_dim == 16


def test_scales_flag_takes_each_scales_default_stride_and_names_an_unknown_scale(capsys):
    from mspray.cli import build_parser, main
    from mspray.cli.flags import config_from_args
    from mspray.model.scales import SCALES

    argv = ["train", "--data", "folder:x", "--out", "b", "--scales", "64,16"]
    cfg = config_from_args(build_parser().parse_args(argv))
    assert cfg.model.strides == (SCALES[64].default_stride, SCALES[16].default_stride)
    # an unknown scale is a clear usage error, not a stride silently equal to the patch size
    assert main([*argv[:-1], "64,48"]) == 2
    assert "unsupported patch size 48" in capsys.readouterr().err
