"""Measured accuracy of the committed zoo pairs against absolute floors.

Each merge is run exactly as README's results were (``pleas.run`` with the CLI defaults: 16 x
64 merge images from both tasks' training splits, 64 sampled positions, seed 0; 1,000 test
images per Fashion-MNIST half, the full digit test splits), and the mean accuracy over the two
tasks must stay within a few points of the number README reports (from
``experiments/results/<pair>/results.json``): the floor is the README value minus 3 points
(about two binomial standard errors of a cell).  PLeaS-free merges on the pair's proxy images.
"""
from __future__ import annotations

import pytest
import torch

import pleas

torch.set_num_threads(1)
pytestmark = [pytest.mark.slow, pytest.mark.zoo]

# (models, method, width, extra options, README mean accuracy)
CASES = {
    "resnet pleas 1.5": (("resnet_a", "resnet_b"), "pleas", 1.5, {}, 95.9),
    "digits pleas 1.5": (("digits_a", "digits_b"), "pleas", 1.5, {}, 93.23),
    "vit pleas 1.5": (("vit_a", "vit_b"), "pleas", 1.5, {}, 89.2),
    "resnext pleas 1.5": (("resnext_a", "resnext_b"), "pleas", 1.5, {}, 96.0),
    "resnet pleas-free 1.5": (("resnet_a", "resnet_b"), "pleas_free_closed", 1.5,
                              {"proxy_data": "animal_mnist"}, 84.0),
}


def mean_accuracy(report: dict) -> float:
    accs = [row["merged"] for row in report["accuracy"].values()]
    return sum(accs) / len(accs)


@pytest.mark.parametrize("case", list(CASES))
def test_merged_accuracy_stays_near_the_readme(case, tmp_path):
    models, method, width, extra, readme = CASES[case]
    result = pleas.run(models=list(models), method=method, width=width, eval_limit=1000,
                       quiet=True, out=str(tmp_path / "m"), **extra)
    got = mean_accuracy(result.report)
    assert got >= readme - 3.0, (case, got, readme)
