"""Captured activations are the values the module produced (or read), even where an in-place
op rewrites them later in the forward pass, and are not copied where nothing does."""
from __future__ import annotations

import torch
from torch import nn

from pleas.capture import run_models


class Record:
    """A consumer that keeps a copy of what it is handed, per model and batch."""

    def __init__(self, points):
        self.points = set(points)
        self.seen: list[list[dict]] = []

    def update(self, acts, batch_id=0):
        self.seen.append([{p: t.clone() for p, t in a.items()} for a in acts])

    def reduce(self, reduce):
        pass


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 4),
                         nn.ReLU(inplace=True)).eval()


def test_outputs_rewritten_in_place_later_are_the_module_outputs():
    net = _net()
    batches = [torch.randn(5, 6) for _ in range(3)]
    rec = Record({("0", "out"), ("1", "in"), ("2", "out")})
    run_models([net, net], batches, [rec], progress=False)
    assert len(rec.seen) == 3
    with torch.no_grad():
        for x, acts in zip(batches, rec.seen):
            pre = net[0](x)
            for a in acts:
                # ReLU(inplace=True) rewrites Linear 0's output (= ReLU 1's input) and Linear 2's
                assert torch.equal(a[("0", "out")], pre) and (pre < 0).any()
                assert torch.equal(a[("1", "in")], pre)
                assert torch.equal(a[("2", "out")], net[2](torch.relu(pre)))


def test_outputs_nobody_rewrites_are_not_copied():
    net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).eval()
    made = []
    net[0].register_forward_hook(lambda m, a, out: made.append(out.data_ptr()))
    stored = []

    class Pointers(Record):
        def update(self, acts, batch_id=0):
            stored.append(acts[0][("0", "out")].data_ptr())

    run_models([net], [torch.randn(5, 6) for _ in range(2)], [Pointers({("0", "out")})],
               progress=False)
    assert stored == made  # the module's own tensor, one forward per batch
