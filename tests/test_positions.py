"""How many positions per image the least-squares moments sample, layer by layer.

The rule (:func:`pleas.lstsq.layer_positions`): ``positions`` per image, fewer where a layer's
Gram products would cost more than ``GRAM_COST`` times its own forward pass, never fewer than
``MIN_POSITIONS``; every position where the layer has no more than that.  Checked here from
the layer shapes by hand, and on the demo ResNet-20's Gram pass by the rows it counted.
"""
from __future__ import annotations

import torch
from torch import nn

from pleas import zoo
from pleas.capture import run_pair
from pleas.data import load_task
from pleas.lstsq import GRAM_COST, MIN_POSITIONS, GramStats, layer_positions, sample_index
from pleas.spec import derive_spec


def test_the_last_stage_of_a_cnn_is_capped_by_its_gram_cost():
    # 3x3 conv, 64 -> 64 channels, 7x7 map: a row's Gram costs 576^2 against 576 * 64 for one
    # output position, so 3x its forward pass buys 3 * 49 * 64 / 576 = 16.3 positions
    assert (GRAM_COST, MIN_POSITIONS) == (3.0, 16)
    assert layer_positions(nn.Conv2d(64, 64, 3), 49, 64) == 16
    # the first conv of that stage reads 32 channels: 3 * 49 * 64 / 288 = 32.7
    assert layer_positions(nn.Conv2d(32, 64, 3, stride=2), 49, 64) == 32
    # stage 2 (14x14, 32 channels) affords 3 * 196 * 32 / 288 = 65 >= 64: unchanged
    assert layer_positions(nn.Conv2d(32, 32, 3), 196, 64) == 64
    # a 1x1 shortcut is cheap: every one of its 49 positions
    assert layer_positions(nn.Conv2d(32, 64, 1), 49, 64) is None


def test_the_floor_the_users_count_and_all_positions():
    # a wide conv on a 2x2 map affords 1.3 positions: the floor (16) takes all 4
    assert layer_positions(nn.Conv2d(512, 512, 3), 4, 64) is None
    # the zoo ViT's fc2 (256 -> 64 over 17 tokens) affords 12.75: the floor, 16 of 17
    assert layer_positions(nn.Linear(256, 64), 17, 64) == 16
    assert layer_positions(nn.Linear(64, 192), 17, 64) is None  # cheap: every token
    # a smaller count than the floor, asked for, is kept; 0 (None) still means every position
    assert layer_positions(nn.Conv2d(64, 64, 3), 49, 8) == 8
    assert layer_positions(nn.Conv2d(64, 64, 3), 49, None) is None


def test_sample_index_draws_that_many_distinct_positions_per_image():
    conv = nn.Conv2d(64, 64, 3, padding=1)
    x = torch.zeros(5, 64, 7, 7)
    index = sample_index(conv, x, 64, torch.Generator().manual_seed(0))
    assert index.numel() == 5 * 16
    per_image = index.view(5, 16)
    for i, row in enumerate(per_image):  # each image's own, distinct, in its own range
        assert row.unique().numel() == 16
        assert bool(((row >= i * 49) & (row < (i + 1) * 49)).all())


def test_the_gram_pass_counts_the_capped_rows_on_the_demo_resnet():
    (a, _), (b, _) = zoo.load("resnet_a"), zoo.load("resnet_b")
    x = load_task("fashion_mnist", "train").subset(64, seed=1).images
    spec = derive_spec(a, (2, 1, 28, 28))
    grams = GramStats(spec, a, positions=64, seed=0)
    run_pair(a, b, list(x.split(32)), [grams], progress=False)
    count = grams.count
    assert count["layer1.0.conv1"] == 64 * 64  # 28x28 map: 64 of 784 (the usual cap)
    assert count["layer2.1.conv1"] == 64 * 64  # 14x14: 64 of 196
    assert count["layer3.1.conv1"] == 64 * 16  # 7x7, 64 channels: capped by the Gram cost
    assert count["layer3.0.conv1"] == 64 * 32  # 7x7 from 32 channels
