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
    build, shape = MERGE_ARCHS[arch]
    return _random(build, seed, shape)
