"""The test models: one ``make_model`` for detectors, one ``TinyNet`` for optimizer mechanics, one ``MixedConvNet`` for LoRA layer kinds."""

from __future__ import annotations

import torch
from torch import nn

from models import DetectionModel

IMGSZ = 128
NAMES = ["cup", "bottle", "phone", "book", "keyboard", "food_label"]  # training.data.synthetic.CLASS_NAMES


def make_model(cfg: str = "yolo11n", nc: int = 3, seed: int = 0, imgsz: int = IMGSZ, names=None) -> DetectionModel:
    """A freshly initialised detector (``names`` overrides ``nc``), seeded for reproducible weights."""
    torch.manual_seed(seed)
    if names is not None:
        return DetectionModel(cfg, names=names, imgsz=imgsz)
    return DetectionModel(cfg, nc=nc, imgsz=imgsz)


def firing_model(seed: int = 0, imgsz: int = IMGSZ) -> DetectionModel:
    """yolo11n over ``NAMES`` with random class biases, so an untrained model gives plenty of boxes above conf 0.25."""
    model = make_model(seed=seed, imgsz=imgsz, names=NAMES).eval()
    with torch.no_grad():
        for branch in model.model[-1].cv3:
            branch[-1].bias.normal_(0.0, 1.5)
    return model


class TinyNet(nn.Module):
    """A Linear (matrix layout), a 3×3 conv (Tucker layout), a 1×1 conv (matrix layout) and 1-D tensors; input (N, 6, 4, 4)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 8, 3, padding=1)
        self.point = nn.Conv2d(8, 5, 1, bias=False)
        self.fc = nn.Linear(5 * 4 * 4, 7)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = self.point(x)
        return self.fc(x.flatten(1))


class MixedConvNet(nn.Module):
    """Conv (strided, dilated, with bias) + grouped conv + BatchNorm + Linear: every layer kind LoRA meets; input (N, 3, H, W)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, stride=2, padding=2, dilation=2, bias=True)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.bn(self.dw(self.conv(x))).relu()
        return self.fc(x.mean(dim=(2, 3)))
