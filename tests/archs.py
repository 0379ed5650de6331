"""Architectures shared by the spec and matching tests (not a test module)."""
from __future__ import annotations

import torch
from torch import nn

from pleas.models import build_model


class DepthwiseNet(nn.Module):
    """A MobileNet-style block: pointwise -> depthwise 3x3 -> pointwise, with BN and a residual."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.expand = nn.Conv2d(16, 32, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.project = nn.Conv2d(32, 16, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(self.bn1(self.expand(x)))
        y = torch.relu(self.bn2(self.dw(y)))
        x = x + self.bn3(self.project(y))
        return self.fc(x.mean((2, 3)))


class GroupedNet(nn.Module):
    """A ResNeXt-style block with two grouped convs in a row (the second one widens each group
    by a channel multiplier): pointwise -> grouped 3x3 (4 groups) -> grouped 3x3 (4 groups,
    x2 channels) -> pointwise, with BN, a bias and a residual."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(16)
        self.reduce = nn.Conv2d(16, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.grouped = nn.Conv2d(24, 24, 3, padding=1, groups=4, bias=False)
        self.bn2 = nn.BatchNorm2d(24)
        self.multiply = nn.Conv2d(24, 48, 3, padding=1, groups=4, bias=True)
        self.bn3 = nn.BatchNorm2d(48)
        self.project = nn.Conv2d(48, 16, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(self.bn1(self.reduce(x)))
        y = torch.relu(self.bn2(self.grouped(y)))
        y = torch.relu(self.bn3(self.multiply(y)))
        x = x + self.bn4(self.project(y))
        return self.fc(x.mean((2, 3)))


class GroupNormNet(nn.Module):
    """Convs normalised by GroupNorm with several channels per group (statistics per block of
    channels), a residual add, and a grouped conv whose groups line up with the norms'."""

    def __init__(self, num_classes: int = 5):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.gn0 = nn.GroupNorm(4, 16)
        self.conv = nn.Conv2d(16, 24, 3, padding=1)
        self.gn1 = nn.GroupNorm(4, 24)
        self.grouped = nn.Conv2d(24, 16, 3, padding=1, groups=4)
        self.gn2 = nn.GroupNorm(4, 16)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = torch.relu(self.gn0(self.stem(x)))
        y = torch.relu(self.gn1(self.conv(x)))
        x = x + self.gn2(self.grouped(y))
        return self.fc(x.mean((2, 3)))


def digit_cnn() -> nn.Module:
    """digit-recognizer-py's CNN with its shipped, trained MNIST weights."""
    from digit_recognizer.model import CNN
    from digit_recognizer.recognizer import DEFAULT_MODEL_PATH

    model = CNN()
    model.load_state_dict(torch.load(DEFAULT_MODEL_PATH, map_location="cpu"))
    return model.eval()


# name -> (factory, input shape of one batch, expected hidden group sizes in spec order,
#          output (class) group size, expected input group sizes)
R18 = [64] * 3 + [128] * 3 + [256] * 3 + [512] * 3
R50 = ([64, 64, 64, 256, 64, 64, 64, 64, 128, 128, 512] + [128] * 6 + [256, 256, 1024]
       + [256] * 10 + [512, 512, 2048] + [512] * 4)
RX50 = ([64, 128, 128, 256] + [128] * 4 + [256, 256, 512] + [256] * 6 + [512, 512, 1024]
        + [512] * 10 + [1024, 1024, 2048] + [1024] * 4)
ARCHS = {
    "resnet20": (lambda: build_model("resnet20"), (2, 1, 28, 28),
                 [16] * 4 + [32] * 4 + [64] * 4, 10, []),
    "vgg_small": (lambda: build_model("vgg_small"), (2, 1, 28, 28), [32, 64, 128, 128], 10, []),
    # the MLP flattens a 1x28x28 image: the two 28-long spatial factors are input axes
    "mlp": (lambda: build_model("mlp"), (2, 1, 28, 28), [256, 128], 10, [28, 28]),
    "torchvision:resnet18": (lambda: build_model("torchvision:resnet18"), (2, 3, 32, 32),
                             R18, 1000, [3]),
    "torchvision:resnet50": (lambda: build_model("torchvision:resnet50"), (2, 3, 32, 32),
                             R50, 1000, [3]),
    "timm:resnet18": (lambda: build_model("timm:resnet18"), (2, 3, 32, 32), R18, 1000, [3]),
    "timm:resnet50": (lambda: build_model("timm:resnet50"), (2, 3, 32, 32), R50, 1000, [3]),
    "digit_recognizer.CNN": (digit_cnn, (2, 1, 28, 28), [32, 64, 128, 256], 10, []),
    "depthwise": (DepthwiseNet, (2, 3, 16, 16), [16, 32], 5, [3]),
    # grouped convolutions (1 < groups < channels): block-structured groups, tied block order
    "resnext29": (lambda: build_model("resnext29"), (2, 1, 28, 28),
                  [32] * 7 + [64] * 7 + [128] * 7, 10, []),
    "grouped": (GroupedNet, (2, 3, 16, 16), [16, 24, 24, 48], 5, [3]),
    "groupnorm": (GroupNormNet, (2, 3, 16, 16), [16, 24], 5, [3]),
    "torchvision:resnext50_32x4d": (lambda: build_model("torchvision:resnext50_32x4d"),
                                    (2, 3, 32, 32), RX50, 1000, [3]),
    "timm:regnetx_002": (lambda: build_model("timm:regnetx_002"), (2, 3, 32, 32),
                         [32] + [24] * 3 + [56] * 3 + [152] * 9 + [368] * 15, 1000, [3]),
}




# Architectures the merge invariants are checked on (tests/test_invariants.py): a factory of a
# model with random non-zero weights (seeded), and the shape of one input batch.  Small
# configurations, so that every registered method can be built on each of them.
def _random(build, seed: int, shape) -> nn.Module:
    from pleas.normalization import recalibrate_batchnorm
    from pleas.permute import randomise

    torch.manual_seed(seed)
    model = randomise(build(), seed).float().eval()
    gen = torch.Generator().manual_seed(100 + seed)
    recalibrate_batchnorm(model, [torch.randn(32, *shape[1:], generator=gen)], progress=False)
    return model.eval()


MERGE_ARCHS = {
    "resnet20": (lambda: build_model("resnet20", num_classes=5), (2, 1, 28, 28)),
    "resnext29": (lambda: build_model("resnext29", num_classes=5, width=1, cardinality=4),
                  (2, 1, 28, 28)),
    "vit_tiny28": (lambda: build_model("vit_tiny28", num_classes=5, depth=2), (2, 1, 28, 28)),
    "vgg_small": (lambda: build_model("vgg_small", num_classes=5), (2, 1, 28, 28)),
    "mlp": (lambda: build_model("mlp", num_classes=5), (2, 1, 28, 28)),
    "depthwise": (DepthwiseNet, (2, 3, 16, 16)),
    "grouped": (GroupedNet, (2, 3, 16, 16)),
    "groupnorm": (GroupNormNet, (2, 3, 16, 16)),
}


def random_model(arch: str, seed: int) -> nn.Module:
    """A model of MERGE_ARCHS or FAMILY_ARCHS with seeded random weights and BN statistics."""
    if arch in MERGE_ARCHS:
        build, shape = MERGE_ARCHS[arch]
    else:
        build, shape, _ = FAMILY_ARCHS[arch]
    return _random(build, seed, shape)


# The architecture families people bring (issue 15), in small random-init configurations at
# 32 px so that every check stays fast.  name -> (factory, input shape, (arch, config) that
# pleas.models.build_model rebuilds it from, for save/load).  They join MERGE_ARCHS (the merge
# invariants) and are checked in tests/test_families.py (spec, matching, partial merge); the
# README's list of tested architectures is generated from here (scripts/tested_archs.py).
def _timm(name: str, **config):
    return (lambda: build_model(f"timm:{name}", **config)), (f"timm:{name}", config)


_VIT = dict(num_classes=5, img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2)
_FAMILY_SPECS = {
    # DeiT: class token and position embedding on the residual stream
    "timm:deit_tiny_patch16_224": _timm("deit_tiny_patch16_224", **_VIT),
    # distilled DeiT: a distillation token and a second head (averaged with the first)
    "timm:deit_tiny_distilled_patch16_224": _timm("deit_tiny_distilled_patch16_224", **_VIT),
    # ConvNeXt: depthwise 7x7, LayerNorm2d, layer scale gamma, 1x1-conv inverted bottleneck
    "timm:convnext_atto": _timm("convnext_atto", num_classes=5, depths=(1, 1, 1, 1),
                                dims=(8, 16, 24, 32)),
    # ConvNeXt with the channels-last LayerNorm and Linear MLP (permutes around the norm)
    "timm:convnext_atto(conv_mlp=False)": _timm("convnext_atto", num_classes=5,
                                                depths=(1, 1, 1, 1), dims=(8, 16, 24, 32),
                                                conv_mlp=False),
    # EfficientNet: depthwise separable blocks, squeeze-excitation, SiLU, BN (timm's own
    # minimal EfficientNet: the classes of efficientnet_b0, fewer blocks)
    "timm:test_efficientnet": _timm("test_efficientnet", num_classes=5, channel_multiplier=0.5),
    # MobileNetV3: hard-swish, hard-sigmoid SE, conv_head after the pooling (half the blocks;
    # timm's create_model takes depth_multiplier, not channel_multiplier, for this name)
    "timm:mobilenetv3_small_050": _timm("mobilenetv3_small_050", num_classes=5,
                                        depth_multiplier=0.5),
    # RegNetY: SE on grouped convs; regnety_002's block settings in four narrow stages (the
    # RegNet config fields are create_model arguments)
    "timm:regnety_002": _timm("regnety_002", num_classes=5, depth=4, w0=16, wa=12, wm=1.5),
}
_TV_VIT = dict(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
               mlp_dim=64, num_classes=5)
# torchvision's ViT: nn.MultiheadAttention (fused in-projection, heads moved and merged
# whole, the out-projection), class token and position embedding on the residual stream
_FAMILY_SPECS["torchvision:VisionTransformer"] = (
    lambda: build_model("torchvision:VisionTransformer", **_TV_VIT),
    ("torchvision:VisionTransformer", _TV_VIT))
FAMILY_ARCHS = {name: (factory, (2, 3, 32, 32), source)
                for name, (factory, source) in _FAMILY_SPECS.items()}


def _timm_mobilenetv3_eighth() -> nn.Module:
    """mobilenetv3_small_050's layout at an eighth of its width and half its depth (timm's
    generator: create_model fixes this name's width at 0.5)."""
    from timm.models.mobilenetv3 import _gen_mobilenet_v3

    return _gen_mobilenet_v3("mobilenetv3_small_050", 0.125, depth_multiplier=0.5, num_classes=5)


# the merge invariants (every method, three widths, built twice) take the families as they
# are, except MobileNetV3, whose 0.5-width head (1,024 units) would add minutes to the suite:
# its same blocks at an eighth of the width stand in
MERGE_ARCHS.update({name: (factory, shape) for name, (factory, shape, _) in FAMILY_ARCHS.items()
                    if name != "timm:mobilenetv3_small_050"})
MERGE_ARCHS["timm:mobilenetv3_small_050(x0.125)"] = (_timm_mobilenetv3_eighth, (2, 3, 32, 32))
# architectures whose all-method checks take more than 15 s on a 2-core CPU: marked slow in
# tests/test_invariants.py
SLOW_MERGE_ARCHS = {"timm:mobilenetv3_small_050(x0.125)"}
