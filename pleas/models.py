"""Architectures of the project's model zoo, and one factory for every architecture name.

The zoo trains its own small models (no pretrained weights exist offline), so the architectures
here are the small, fast ones the experiments need: a CIFAR-style ResNet-20 with BatchNorm, a
CIFAR-style ResNeXt-29 (grouped convolutions), a small timm VisionTransformer for 28x28 inputs, a VGG-style net and an MLP.  Any timm or
torchvision classifier can be named as well (``timm:resnet18``, ``torchvision:resnet50``); they
are always built with random weights (``pretrained=False``) because nothing downloads here.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn


def _shortcut(in_planes: int, planes: int, stride: int) -> nn.Sequential:
    """Identity, or a 1x1 conv + BN where the shape changes (option B)."""
    if stride == 1 and in_planes == planes:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                         nn.BatchNorm2d(planes))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BN and a residual."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNeXtBlock(nn.Module):
    """ResNeXt bottleneck: 1x1 reduce, 3x3 grouped conv (``cardinality`` groups), 1x1 expand."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, cardinality: int = 4):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut(x))


class _CifarNet(nn.Module):
    """3x3 stem, three stages of three residual blocks (the first of stages 2-3 strided),
    global average pooling and a linear head: the CIFAR layout shared by ResNet-20 and
    ResNeXt-29 (same module names, so checkpoints keep their keys)."""

    def __init__(self, block: Callable[[int, int, int], nn.Module], widths: list[int],
                 num_classes: int, in_chans: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, in_planes = [], widths[0]
        for stage, planes in enumerate(widths):
            blocks = []
            for i in range(3):
                blocks.append(block(in_planes, planes, 2 if (stage > 0 and i == 0) else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class ResNet20(_CifarNet):
    """CIFAR-style ResNet-20 (3 stages of 3 basic blocks, widths 16/32/64 times ``width``)."""

    def __init__(self, num_classes: int = 10, width: int = 1, in_chans: int = 1):
        super().__init__(BasicBlock, [16 * width, 32 * width, 64 * width], num_classes,
                         in_chans)


class ResNeXt29(_CifarNet):
    """CIFAR-style ResNeXt-29: 3 stages of 3 bottlenecks with grouped 3x3 convs (widths
    32/64/128 times ``width``, ``cardinality`` groups): the zoo's grouped-convolution model."""

    def __init__(self, num_classes: int = 10, width: int = 1, in_chans: int = 1,
                 cardinality: int = 4):
        super().__init__(lambda i, p, s: ResNeXtBlock(i, p, s, cardinality),
                         [32 * width, 64 * width, 128 * width], num_classes, in_chans)


class VGGSmall(nn.Module):
    """VGG-style net: conv-BN-ReLU stacks with max-pooling, flattened into a 2-layer classifier.

    The classifier reads the *flattened* C x H x W map, so its spec needs the flatten rule.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, widths=(32, 64, 128)):
        super().__init__()
        layers, c = [], in_chans
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c * 3 * 3, 128), nn.ReLU(), nn.Dropout(0.0),
            nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """Plain multilayer perceptron on flattened images."""

    def __init__(self, num_classes: int = 10, in_features: int = 784, hidden=(256, 128)):
        super().__init__()
        dims = [in_features, *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.GELU()]
        layers.append(nn.Linear(dims[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def vit_tiny28(num_classes: int = 10, in_chans: int = 1, embed_dim: int = 96, depth: int = 4,
               num_heads: int = 3, mlp_ratio: float = 2.0, class_token: bool = True,
               img_size: int = 28, patch_size: int = 7) -> nn.Module:
    """A small timm VisionTransformer for 28x28 images (patch 7: 16 tokens plus the cls token)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
        embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
        class_token=class_token, global_pool="token" if class_token else "avg")


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "resnet20": ResNet20,
    "resnext29": ResNeXt29,
    "vgg_small": VGGSmall,
    "mlp": MLP,
    "vit_tiny28": vit_tiny28,
}


def build_model(arch: str, **config: Any) -> nn.Module:
    """Build an architecture by name with random weights.

    ``arch`` is one of :data:`ARCHITECTURES`, ``timm:<name>`` or ``torchvision:<name>``; a
    torchvision name may also be a model class of ``torchvision.models``
    (``torchvision:VisionTransformer``), built from ``config`` as its arguments.
    """
    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch](**config)
    if arch.startswith("timm:"):
        import timm

        name = arch.split(":", 1)[1]
        if name not in timm.list_models():
            raise ValueError(f"unknown timm architecture {name!r}")
        return timm.create_model(name, pretrained=False, **config)
    if arch.startswith("torchvision:"):
        import torchvision

        name = arch.split(":", 1)[1]
        cls = getattr(torchvision.models, name, None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            # a model class by name (torchvision:VisionTransformer with image_size=32, ...):
            # layouts no registered builder makes; its __init__ gets the config
            return cls(**config)
        try:
            return torchvision.models.get_model(name, weights=None, **config)
        except ValueError as err:
            raise ValueError(f"unknown torchvision architecture {name!r}") from err
    known = ", ".join(sorted(ARCHITECTURES))
    raise ValueError(
        f"unknown architecture {arch!r}; expected one of {known}, 'timm:<name>' or "
        "'torchvision:<name>'")
