from mspray.config import MSPrayConfig
from mspray.train.recipes import RECIPES, apply_recipe, no_imagenet_defaults


def test_a_random_init_trunk_gets_the_no_imagenet_training_defaults():
    cfg = no_imagenet_defaults(MSPrayConfig(), imagenet=False)
    scratch = RECIPES["random-init"]
    assert cfg.train.lr == scratch["train.lr"] != MSPrayConfig().train.lr
    assert cfg.train.center_update_every == scratch["train.center_update_every"]
    # the K-means term waits one epoch, and random stems stay one per scale
    assert cfg.train.kmeans_warmup == 1 != MSPrayConfig().train.kmeans_warmup
    assert cfg.model.shared_stem is False and MSPrayConfig().model.shared_stem is True
    # image size and the amount of work stay the user's
    assert cfg.model.image_size == MSPrayConfig().model.image_size
    assert cfg.train.epochs == MSPrayConfig().train.epochs


def test_values_the_user_set_and_imagenet_runs_are_left_alone():
    mine = MSPrayConfig().replace(**{"train.lr": 2e-4})
    assert no_imagenet_defaults(mine, imagenet=False).train.lr == 2e-4
    assert no_imagenet_defaults(MSPrayConfig(), imagenet=True) == MSPrayConfig()
    assert apply_recipe(MSPrayConfig(), "paper") == MSPrayConfig()


def test_a_value_the_user_set_is_kept_even_when_it_equals_the_paper_default():
    from mspray.cli import build_parser
    from mspray.cli.flags import config_from_args

    train = ["train", "--data", "folder:x", "--out", "b"]
    argv = [*train, "--set", "train.lr=1e-5", "--set", "model.shared_stem=true"]
    cfg = no_imagenet_defaults(config_from_args(build_parser().parse_args(argv)), False)
    assert cfg.train.lr == 1e-5 and cfg.model.shared_stem is True
    # ... while the fields left alone still switch, also after other overrides
    assert cfg.train.kmeans_warmup == RECIPES["random-init"]["train.kmeans_warmup"]
    flag = no_imagenet_defaults(config_from_args(build_parser().parse_args(train)), False)
    assert flag.train.lr == RECIPES["random-init"]["train.lr"]
    assert flag.model.shared_stem is False
    # the library path too: replace() marks exactly what it was given as set
    mine = MSPrayConfig().replace(**{"train.lr": 1e-5}).replace(**{"train.epochs": 2})
    kept = no_imagenet_defaults(mine, imagenet=False)
    assert kept.train.lr == 1e-5 and kept.model.shared_stem is False
