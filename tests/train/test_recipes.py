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
