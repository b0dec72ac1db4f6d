from __future__ import annotations

import pytest

from msif_assets.demo.world import WorldConfig

from .tiny import TINY_TRAIN, TINY_WORLD


@pytest.fixture
def tiny_world_cfg() -> WorldConfig:
    return WorldConfig(**TINY_WORLD)


@pytest.fixture
def tiny_train_cfg():
    from msif_assets.demo.train import TrainConfig

    return TrainConfig(**TINY_TRAIN)
