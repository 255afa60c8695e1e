"""The paper's ImageNet image transforms (the DeiT code base it trains with, Section 4.1), equal to torchvision's.

Training: ``RandomResizedCrop(size)`` (scale 0.08-1, aspect 3/4-4/3, bicubic) + ``RandomHorizontalFlip()``.
Evaluation: ``Resize(floor(size / crop_pct))`` (the short side; 256 for 224 at crop_pct 0.875, Table 3) +
``CenterCrop(size)``. Both end in ``ToTensor`` + ``Normalize`` with the ImageNet mean and std.

Each is written on Pillow and torch to give torchvision's output to the pixel, tested against reference outputs of
torchvision 0.29.1 (``tests/fixtures/imagenet_transforms/``, made by ``scripts/make_transform_fixture.py``):
- resize: the long side is ``int(short * long / short_side)``, truncated as torchvision (and timm) do;
- centre crop: the offset is ``round((side - size) / 2)``, Python's round, as torchvision;
- random resized crop: the same draws from torch's generator in the same order and the same float32 arithmetic, so
  that a seeded run crops the same boxes; crop, then resize (Pillow's ``box=`` would read pixels outside the box);
- tensor conversion and normalisation: the same float32 operations, bit for bit.
torchvision itself is not used because its CPU wheel does not import beside the torch 2.13.0 CPU build; the
authors' extra augmentations come from timm instead (``lra_soft.imagenet.recipes``). Randomness comes from torch's
generator, which DataLoader seeds per worker, so runs are reproducible.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def eval_resize(size: int, crop_pct: float) -> int:
    """Short side before the centre crop: ``floor(size / crop_pct)`` (timm's rule; 256 for 224 at 0.875)."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}: the crop cannot be larger than the image")
    return math.floor(size / crop_pct)


def resize_size(width: int, height: int, short: int) -> tuple[int, int]:
    """(width, height) after torchvision's ``Resize(short)``: the short side to ``short``, the long side scaled and
    truncated (640 x 427 at 256 gives 383 x 256, not 384 x 256)."""
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of torchvision's ``CenterCrop(size)``: offsets rounded half to even, as its
    ``int(round((side - size) / 2.0))``; the image must be at least ``size`` on each side."""
    if width < size or height < size:
        raise ValueError(f"image {width} x {height} is smaller than the crop {size}")
    left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
    return left, top, left + size, top + size


class RandomResizedCrop:
    """Crop a random area (``scale`` of the image) and aspect ratio, resized to size x size (Szegedy et al., 2015);
    torchvision's ``RandomResizedCrop.get_params`` draw for draw."""

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation=Image.BICUBIC):
        self.size, self.scale, self.ratio, self.interpolation = size, scale, ratio, interpolation
        self.log_ratio = torch.log(torch.tensor(ratio))  # float32, as torchvision's

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the crop."""
        area = height * width
        for _ in range(10):
            target = area * torch.empty(1).uniform_(self.scale[0], self.scale[1]).item()
            aspect = torch.exp(torch.empty(1).uniform_(self.log_ratio[0], self.log_ratio[1])).item()
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, size=(1,)).item())
                left = int(torch.randint(0, width - w + 1, size=(1,)).item())
                return left, top, left + w, top + h
        # fall back to the largest central crop within the aspect range
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            w, h = int(round(height * max(self.ratio))), height
        else:
            w, h = width, height
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.crop(self.box(*img.size)).resize((self.size, self.size), self.interpolation)


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.transpose(Image.FLIP_LEFT_RIGHT) if torch.rand(1).item() < self.p else img


class ResizeCenterCrop:
    """torchvision's ``Resize(floor(size / crop_pct))`` then ``CenterCrop(size)``."""

    def __init__(self, size: int, crop_pct: float = 0.875, interpolation=Image.BICUBIC):
        self.size, self.resize, self.interpolation = size, eval_resize(size, crop_pct), interpolation

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = resize_size(*img.size, self.resize)
        return img.resize((w, h), self.interpolation).crop(center_crop_box(w, h, self.size))


class ToNormalizedTensor:
    """PIL RGB -> float tensor (3, H, W) in [0, 1], normalised channel-wise by ``mean`` and ``std``."""

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.mean, self.std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]

    def __call__(self, img: Image.Image) -> Tensor:
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)  # (3, H, W)
        return (x - self.mean) / self.std


class Compose:
    def __init__(self, *steps):
        self.steps = steps

    def __call__(self, img):
        for step in self.steps:
            img = step(img)
        return img


def train_transform(size: int) -> Compose:
    return Compose(RandomResizedCrop(size), RandomHorizontalFlip(), ToNormalizedTensor())


def eval_transform(size: int, crop_pct: float = 0.875) -> Compose:
    return Compose(ResizeCenterCrop(size, crop_pct), ToNormalizedTensor())
