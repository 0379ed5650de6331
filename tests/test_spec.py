"""Permutation specs derived by pleas.spec: groups, self-test, negative controls, errors, dump, CLI.

Every architecture is traced, its groups are checked against what the architecture must give
(group counts, sizes, kinds, every member axis really has the group's size), and the spec's
self-test (random permutation of every hidden group of a randomised float64 copy; outputs must
not move) must pass.  A spec with one member axis removed must FAIL the self-test, so the
self-test is shown to be able to fail.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from pleas.permute import self_test
from pleas.spec import PermSpec, SpecError, UnsupportedOpError, derive_spec

from archs import ARCHS

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def specs():
    """Each architecture traced once for the whole module: name -> (model, spec)."""
    cache: dict[str, tuple[nn.Module, PermSpec]] = {}

    def get(name: str) -> tuple[nn.Module, PermSpec]:
        if name not in cache:
            factory, shape, *_ = ARCHS[name]
            torch.manual_seed(0)
            model = factory().eval()
            cache[name] = (model, derive_spec(model, shape))
        return cache[name]

    return get


# ----------------------------------------------------------------------------- groups


@pytest.mark.parametrize("name", list(ARCHS))
def test_spec_groups_and_self_test(name, specs):
    model, spec = specs(name)
    _, shape, hidden_sizes, n_classes, input_sizes = ARCHS[name]
    state = model.state_dict()

    assert {g.kind for g in spec.groups} <= {"hidden", "input", "output"}
    assert [g.size for g in spec.hidden] == hidden_sizes
    out = spec.output_group
    assert out is not None and out.size == n_classes
    assert sorted(g.size for g in spec.groups if g.kind == "input") == sorted(input_sizes)
    assert len({g.name for g in spec.groups}) == len(spec.groups)  # unique names
    assert spec.input_shape == shape

    for g in spec.groups:
        assert g.axes, f"group {g.name} has no member axis"
        for ax in g.axes:
            # every member really is an axis (or slice) of that size of an existing tensor
            assert ax.key in state, ax.key
            assert ax.size == g.size, (g.name, ax)
            # (a grouped conv weight stores the diagonal blocks of its input axis only)
            stored = ax.length // ax.blocks
            assert ax.start + stored <= state[ax.key].shape[ax.dim], (g.name, ax)
            assert ax.role in ("in", "out")
    # every hidden group is produced by something and read by something (else it is not a
    # permutation symmetry of the network)
    for g in spec.hidden:
        roles = {ax.role for ax in g.axes}
        assert roles == {"in", "out"}, (g.name, roles)
        assert g.sites, f"hidden group {g.name} has no activation site"

    # every conv/linear weight appears: out-axis in exactly one group
    weights = [k for k, v in state.items() if k.endswith("weight") and v.ndim in (2, 4)]
    by_key = spec.axes_by_key()
    for k in weights:
        outs = [(g.name, ax) for g, ax in by_key.get(k, []) if ax.dim == 0]
        assert len(outs) == 1, (k, outs)
    assert len(spec.layers) == len(weights)
    assert spec.total_macs > 0

    result = self_test(model, spec)
    assert result.passed, str(result)
    # the check is a real one: outputs are non-trivial and agree to float64 precision
    assert result.max_abs_output > 0
    assert result.max_abs_diff <= 1e-9 * max(result.max_abs_output, 1.0)


def test_resnet20_groups_in_detail(specs):
    """ResNet-20: 3 residual-stream groups (one per stage; the stem joins stage 1) + 9 block groups."""
    _, spec = specs("resnet20")
    names = [g.name for g in spec.hidden]
    assert len(names) == 12
    stream1 = spec.group("conv1")
    keys1 = {ax.key for ax in stream1.axes}
    # stage 1's residual stream ties the stem, every block's output BN and every block's input
    for i in range(3):
        assert f"layer1.{i}.bn2.weight" in keys1
        assert f"layer1.{i}.conv1.weight" in keys1
    assert "layer2.0.shortcut.0.weight" in keys1  # read by the projection shortcut (as input)
    assert "fc.weight" not in keys1
    stream3 = spec.group("layer3.0.conv2")
    assert "fc.weight" in {ax.key for ax in stream3.axes}
    assert {(ax.key, ax.role) for ax in stream3.axes if ax.key == "fc.weight"} == {("fc.weight", "in")}
    assert spec.output_group.name == "classes"
    assert {(ax.key, ax.dim) for ax in spec.output_group.axes} == {("fc.weight", 0), ("fc.bias", 0)}
    # the depthwise rule ties input and output channels in one group
    _, dspec = specs("depthwise")
    dw = [l for l in dspec.layers if l.module == "dw"][0]
    assert dw.depthwise and dw.in_group is None
    assert dspec.group(dw.out_group).size == 32


# ----------------------------------------------------------------------------- negative control


def _without_axis(spec: PermSpec, group: str, index: int) -> PermSpec:
    groups = []
    for g in spec.groups:
        if g.name == group:
            g = dataclasses.replace(g, axes=g.axes[:index] + g.axes[index + 1:])
        groups.append(g)
    return PermSpec(groups, spec.layers, spec.unaligned, spec.input_shape)


def test_self_test_fails_for_every_axis_removed_from_a_group(specs):
    """Removing ANY one member axis of a resnet20 block group breaks the symmetry: self-test fails."""
    model, spec = specs("resnet20")
    g = spec.group("layer2.1.conv1")
    # conv1 rows, bn1 weight/bias/running_mean/running_var, conv2 columns
    assert len(g.axes) == 6
    for i in range(len(g.axes)):
        bad = _without_axis(spec, g.name, i)
        result = self_test(model, bad)
        assert not result.passed, f"self-test passed without {g.axes[i]}"
        # far above float64 noise (the passing spec moves outputs by ~1e-16 of their size);
        # measured: the smallest change, dropping one axis, is ~1e-3 of the output scale
        assert result.max_abs_diff > 1e-6 * result.max_abs_output


@pytest.mark.parametrize("name", ["vgg_small", "mlp", "timm:resnet18", "depthwise",
                                  "digit_recognizer.CNN"])
def test_self_test_fails_with_an_axis_removed(name, specs):
    model, spec = specs(name)
    g = spec.hidden[-1]
    # drop the group's reading ("in") axis: the next layer reads the units in the old order
    idx = next(i for i, ax in enumerate(g.axes) if ax.role == "in")
    result = self_test(model, _without_axis(spec, g.name, idx))
    assert not result.passed, str(result)


def test_self_test_fails_with_an_incomplete_stream_group(specs):
    """A residual-stream group missing one BN inside the stream (resnet50) fails too."""
    model, spec = specs("timm:resnet50")
    g = spec.group(next(h.name for h in spec.hidden if h.size == 2048))
    idx = next(i for i, ax in enumerate(g.axes) if ax.key.endswith("bn3.running_mean"))
    assert not self_test(model, _without_axis(spec, g.name, idx)).passed


# ----------------------------------------------------------------------------- unsupported ops


class _Sorter(nn.Module):
    def forward(self, x):
        return torch.sort(x, dim=1).values


class _FFT(nn.Module):
    def forward(self, x):
        return torch.fft.fft(x).real


class _Wrapped(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3)
        self.body = nn.Sequential(nn.ReLU(), inner)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.body(self.conv(x)).mean((2, 3)))


@pytest.mark.parametrize("inner, node, op, module", [
    (_Sorter(), "sort", "torch.sort", "body.1"),
    (_FFT(), "fft_fft", "fft", "body.1"),
    (nn.LocalResponseNorm(3), "body_1", "LocalResponseNorm", "body.1"),
])
def test_unsupported_op_names_node_op_and_module(inner, node, op, module):
    with pytest.raises(UnsupportedOpError) as info:
        derive_spec(_Wrapped(inner), (2, 1, 12, 12))
    err = info.value
    assert isinstance(err, SpecError)
    assert err.node == node and err.module == module and op in err.op
    msg = str(err)
    assert f"'{node}'" in msg and op in msg and f"'{module}'" in msg


# ----------------------------------------------------------------------------- grouped convs


def test_grouped_conv_groups_move_in_tied_blocks(specs):
    """Channels of a grouped conv move inside their conv group, and groups move as wholes with
    input and output blocks together: block-structured groups sharing one block order."""
    model, spec = specs("grouped")
    blocks = {g.name: (g.num_heads, g.head_dim, g.tie) for g in spec.hidden if g.head_dim}
    # reduce -> grouped (4 groups) -> multiply (4 groups, 6 -> 12 channels each): one tie chain
    assert blocks == {"reduce": (4, 6, "reduce"), "grouped": (4, 6, "reduce"),
                      "multiply": (4, 12, "reduce")}
    assert spec.group("stem").head_dim == 0  # the residual stream is not block-structured
    blocked = {(ax.key, g.name, ax.blocks) for g in spec.groups for ax in g.axes if ax.blocks > 1}
    assert blocked == {("grouped.weight", "reduce", 4), ("multiply.weight", "grouped", 4)}
    layers = {layer.module: layer for layer in spec.layers}
    # a grouped conv's cost grows with its number of groups, like a depthwise conv's
    assert layers["grouped"].depthwise and layers["multiply"].depthwise
    assert not layers["reduce"].depthwise
    assert layers["grouped"].macs == 16 * 16 * 24 * 6 * 9
    assert "blocks 4x6 (moved whole)" in spec.describe()
    assert "grouped.weight[dim 1] block-diagonal in 4 conv groups" in spec.describe()


@pytest.mark.parametrize("change", ["no blocks", "untied"])
def test_permutations_that_split_a_conv_group_are_refused(specs, change):
    """Drop the block structure (or the shared block order) and random permutations move
    channels across conv groups: permuting refuses, naming the problem, instead of silently
    dropping the weights that left the diagonal blocks."""
    from pleas.permute import permute_state_dict, random_permutations

    model, spec = specs("grouped")
    groups = []
    for g in spec.groups:
        if g.name == "grouped":
            g = (dataclasses.replace(g, head_dim=0, tie=None) if change == "no blocks"
                 else dataclasses.replace(g, tie="grouped"))
        groups.append(g)
    bad = PermSpec(groups, spec.layers, spec.unaligned, spec.input_shape)
    perms = random_permutations(bad, seed=3)
    with pytest.raises(ValueError, match="across convolution groups"):
        permute_state_dict(model.state_dict(), bad, perms)


class _TwoGroupings(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.g2 = nn.Conv2d(8, 8, 3, groups=2)
        self.g4 = nn.Conv2d(8, 8, 3, groups=4)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = self.conv(x)
        return self.fc((self.g2(x) + self.g4(x)).mean((2, 3)))


class _GroupedOnInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, groups=2)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.conv(x).mean((2, 3)))


def test_grouped_conv_structures_that_cannot_be_permuted_are_errors():
    # one axis read by convs with 2 and with 4 groups: blocks of 4 and of 2 channels
    with pytest.raises(SpecError, match="blocks of 4 .* and of 2"):
        derive_spec(_TwoGroupings(), (2, 3, 8, 8))
    # groups over the image channels: the input axis cannot move, so neither can the blocks
    with pytest.raises(SpecError, match="input axis .* blocks of 2"):
        derive_spec(_GroupedOnInput(), (2, 4, 8, 8))


def test_dense_view_of_grouped_weights_round_trips():
    from pleas.blocks import to_compact, to_dense

    w = torch.randn(12, 2, 3, 3)  # 3 groups of 4 output channels reading 2 channels each
    dense = to_dense(w, 3)
    assert dense.shape == (12, 6, 3, 3)
    conv = nn.Conv2d(6, 12, 3, groups=3, bias=False)
    full = nn.Conv2d(6, 12, 3, bias=False)
    conv.weight.data, full.weight.data = w.clone(), dense.clone()
    x = torch.randn(2, 6, 5, 5)
    assert torch.allclose(conv(x), full(x), atol=1e-5)  # the dense view is the same conv
    assert torch.equal(to_compact(dense, 2), w)
    dense[0, 5] += 1.0  # a weight outside the diagonal blocks
    with pytest.raises(ValueError, match="across convolution groups"):
        to_compact(dense, 2)


# ----------------------------------------------------------------------------- dump and CLI


def _describe_blocks(text: str) -> dict[str, list[str]]:
    blocks: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        if line.startswith("- "):
            current = line[2:].split(" [", 1)[0]
            blocks[current] = [line]
        elif current is not None and line.startswith("    "):
            blocks[current].append(line)
    return blocks


@pytest.mark.parametrize("name", ["resnet20", "vgg_small", "torchvision:resnet18"])
def test_describe_lists_every_group_and_member(name, specs):
    _, spec = specs(name)
    text = spec.describe()
    assert text.startswith(f"PermSpec: {len(spec.groups)} groups ({len(spec.hidden)} hidden)")
    blocks = _describe_blocks(text)
    assert list(blocks) == [g.name for g in spec.groups]
    for g in spec.groups:
        header, members = blocks[g.name][0], blocks[g.name][1:]
        assert header == f"- {g.name} [{g.kind}] size {g.size}"
        for ax in g.axes:
            assert any(f"{ax.role:>3} {ax.key}[dim {ax.dim}]" in m for m in members), (g.name, ax)
        axis_lines = [m for m in members if "[dim " in m and "site " not in m]
        assert len(axis_lines) == len(g.axes)


def test_cli_spec_resnet20(capsys):
    from pleas.cli import main

    assert main(["spec", "resnet20"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("PermSpec: 13 groups (12 hidden)")
    assert "- layer3.0.conv2 [hidden] size 64" in out
    assert "- classes [output] size 10" in out
    assert "in fc.weight[dim 1]" in out
    assert "spec self-test passed" in out


def test_cli_spec_unsupported_model_fails(capsys):
    from pleas.cli import main

    assert main(["spec", "no-such-architecture"]) == 2
    assert "no-such-architecture" in capsys.readouterr().err


def test_cli_spec_wrong_input_shape_is_one_clear_error(capsys):
    from pleas.cli import main

    assert main(["spec", "resnext29", "--input-shape", "3,28,28"]) == 2
    err = capsys.readouterr().err
    assert "does not run on an input of shape (2, 3, 28, 28)" in err and "1 channels" in err
    assert "Traceback" not in err
    # the zoo architectures default to one 28x28 channel
    assert main(["spec", "resnext29"]) == 0
    assert "blocks 4x32 (moved whole)" in capsys.readouterr().out
