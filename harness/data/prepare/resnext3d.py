"""ResNeXt-101 3D (32x4d, shortcut B) of Hara et al.'s 3D-ResNets, the motion network of HCRN and
DualVGR (their ``preprocess/models/resnext.py`` with ``last_fc=False``). Module names match the
``resnext-101-kinetics.pth`` checkpoint's keys (after its ``module.`` prefix). The final average
pool is adaptive: the reference's fixed (1, 4, 4) window is the whole map for 16 frames at
112 x 112 (identical there), and other sizes still give one 2048-d vector per clip."""
from __future__ import annotations

from torch import nn


class Block(nn.Module):
    expansion = 2

    def __init__(self, inplanes: int, planes: int, cardinality: int, stride: int = 1,
                 downsample: nn.Module | None = None):
        super().__init__()
        mid = cardinality * (planes // 32)
        self.conv1 = nn.Conv3d(inplanes, mid, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm3d(mid)
        self.conv2 = nn.Conv3d(mid, mid, kernel_size=3, stride=stride, padding=1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm3d(mid)
        self.conv3 = nn.Conv3d(mid, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNeXt3D(nn.Module):
    def __init__(self, layers=(3, 4, 23, 3), cardinality: int = 32):
        super().__init__()
        self.conv1 = nn.Conv3d(3, 64, kernel_size=7, stride=(1, 2, 2), padding=(3, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=(3, 3, 3), stride=2, padding=1)
        self.inplanes = 64
        self.layer1 = self._layer(128, layers[0], cardinality, 1)
        self.layer2 = self._layer(256, layers[1], cardinality, 2)
        self.layer3 = self._layer(512, layers[2], cardinality, 2)
        self.layer4 = self._layer(1024, layers[3], cardinality, 2)
        self.avgpool = nn.AdaptiveAvgPool3d(1)

    def _layer(self, planes: int, blocks: int, cardinality: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Block.expansion:
            downsample = nn.Sequential(
                nn.Conv3d(self.inplanes, planes * Block.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm3d(planes * Block.expansion))
        mods = [Block(self.inplanes, planes, cardinality, stride, downsample)]
        self.inplanes = planes * Block.expansion
        mods += [Block(self.inplanes, planes, cardinality) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def forward(self, x):  # (B, 3, T, H, W), 0..255 -> (B, 2048)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x).flatten(1)
