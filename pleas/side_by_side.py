"""Width K with nothing merged: the K original networks, each run whole, outputs joined.

Why a module of its own: the block-structured form of a width-K model is one network whose
every layer is K diagonal blocks (a grouped convolution, or K matrix products whose outputs are
concatenated).  It computes the same function, but it is not as fast as the K networks run one
after the other: measured on one CPU thread (experiments/results/latency.md), two timm
resnet50 fused this way cost 2.6x one model and two 28 px ViTs 2.7x, against 2.0x for the two
networks run in turn.  Grouped convolutions with large channel counts and the concatenation
after every split layer are what the fused form pays for.  So the merge builds this module
instead, and ``--width K`` costs what K models cost.

Outputs: one head per model -> the models' logits concatenated in model order (the heads read
consecutive slices, as in the fused model); one shared head -> the mean of the models' logits
(what the fused model's shared head computes with nothing merged).
"""
from __future__ import annotations

import torch
from torch import nn

COMBINES = ("concat", "mean")


class SideBySide(nn.Module):
    """K networks on the same input; their outputs concatenated (``"concat"``) along the last
    dim or averaged (``"mean"``).  Plain modules, a loop and one cat or sum: it traces with
    torch.fx and exports to ONNX / TorchScript / torch.export like the members do."""

    def __init__(self, members: list[nn.Module], combine: str):
        super().__init__()
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {', '.join(COMBINES)}, got {combine!r}")
        if len(members) < 2:
            raise ValueError("side by side needs at least two networks")
        self.members = nn.ModuleList(members)
        self.combine = combine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [member(x) for member in self.members]
        if self.combine == "concat":
            return torch.cat(outs, -1)
        total = outs[0]
        for y in outs[1:]:
            total = total + y
        return total / len(outs)

    def extra_repr(self) -> str:
        return f"{len(self.members)} networks, outputs {self.combine}"


def member_states(state: dict[str, torch.Tensor], members: int
                  ) -> tuple[list[dict[str, torch.Tensor]], set[str]]:
    """A saved SideBySide state split into its members' states (``members.{i}.`` prefixes
    removed), and the keys that belong to no member."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in range(members)]
    stray = set()
    for key, t in state.items():
        head, _, rest = key.partition(".")
        index, _, name = rest.partition(".")
        if head == "members" and index.isdigit() and int(index) < members and name:
            out[int(index)][name] = t
        else:
            stray.add(key)
    return out, stray
