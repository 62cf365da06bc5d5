"""Review findings in ``TrainConfig.validate``: settings it accepted that then crashed inside ``train``."""

from __future__ import annotations

import pytest

from models.errors import ConfigError
from tests.helpers.recipe import tiny_config, tiny_dataset


@pytest.mark.parametrize("fraction", [0.875, 0.9, 0.99])
def test_a_replay_fraction_that_leaves_no_training_image_per_step_is_refused(tmp_path, fraction):
    """round(0.9 x 4) = 4 replay images of a 4-image step: validate passed it and the plan divided by zero."""
    config = tiny_config(tmp_path, replay=str(tiny_dataset()), replay_fraction=fraction, batch=4)
    with pytest.raises(ConfigError, match="replay_fraction"):
        config.validate()


def test_the_largest_replay_fraction_that_keeps_a_training_image_is_accepted(tmp_path):
    config = tiny_config(tmp_path, replay=str(tiny_dataset()), replay_fraction=0.85, batch=4).validate()
    assert config.replay_images_per_step() == 3
