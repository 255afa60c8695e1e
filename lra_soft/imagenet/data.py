"""ImageNet data in the standard ImageFolder layout, decoded with Pillow, and the paper's image transforms.

    DIR/train/<class>/<image>     DIR/val/<class>/<image>      (any class names; labels = sorted train classes)

Transforms (the DeiT code base the paper trains with, Section 4.1): training = random resized crop (scale 0.08-1,
aspect 3/4-4/3, bicubic) + horizontal flip; evaluation = resize the short side to size / 0.875 (256 for 224) +
center crop (Table 3: "224x224 pixels center cropped from resized images with 256x256 pixels"); both normalise with
the ImageNet mean and std. They are written on Pillow and torch: torchvision's wheel does not import beside this
torch build, and albumentations would pull OpenCV and SciPy (~100 MB) for four transforms. Randomness comes from
torch's generator, which DataLoader seeds per worker, so runs are reproducible.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def find_classes(root: Path) -> list[str]:
    """Sorted sub-directory names of ``root``: the class names; label i = classes[i]."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist; expected DIR/train/<class>/*.jpg and "
                                "DIR/val/<class>/*.jpg (the ImageFolder layout)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise FileNotFoundError(f"{root} has no class sub-directories; put each class's images in {root}/<class>/")
    return classes


class ImageFolder(Dataset):
    """(image tensor, label) pairs from ``root/<class>/*``; ``classes`` fixes the label order (the train split's)."""

    def __init__(self, root: str | Path, transform, classes: list[str] | None = None):
        self.root, self.transform = Path(root), transform
        found = find_classes(self.root)
        self.classes = list(classes) if classes is not None else found
        extra = sorted(set(found) - set(self.classes))
        if extra:
            raise ValueError(f"{self.root} has classes {extra[:5]} that the training split lacks; "
                             "the splits must use the same class directories")
        index = {c: i for i, c in enumerate(self.classes)}
        self.samples = [(p, index[c]) for c in found for p in sorted((self.root / c).iterdir())
                        if p.suffix.lower() in IMG_EXTENSIONS and not p.name.startswith(".")]
        if not self.samples:
            raise FileNotFoundError(f"no images ({', '.join(IMG_EXTENSIONS)}) under {self.root}/<class>/")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except OSError as e:
            raise OSError(f"cannot decode image {path} ({e}); remove or replace the file") from e
        return self.transform(img), label


class RandomResizedCrop:
    """Crop a random area (``scale`` of the image) and aspect ratio, resized to size x size (Szegedy et al., 2015)."""

    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation=Image.BICUBIC):
        self.size, self.scale, self.interpolation = size, scale, interpolation
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        area = width * height
        for _ in range(10):
            target = area * _uniform(*self.scale)
            aspect = math.exp(_uniform(*self.log_ratio))
            w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                left = int(torch.randint(0, width - w + 1, ()).item())
                top = int(torch.randint(0, height - h + 1, ()).item())
                return left, top, left + w, top + h
        # fall back to the largest central crop within the aspect range
        aspect = min(max(width / height, math.exp(self.log_ratio[0])), math.exp(self.log_ratio[1]))
        w, h = (width, round(width / aspect)) if width / height < aspect else (round(height * aspect), height)
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.resize((self.size, self.size), self.interpolation, box=self.box(*img.size))


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.transpose(Image.FLIP_LEFT_RIGHT) if _uniform(0.0, 1.0) < self.p else img


class ResizeCenterCrop:
    """Resize the short side to size / crop_pct, then take the central size x size crop."""

    def __init__(self, size: int, crop_pct: float = 0.875, interpolation=Image.BICUBIC):
        self.size, self.resize, self.interpolation = size, math.floor(size / crop_pct), interpolation

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        scale = self.resize / min(w, h)
        w, h = max(self.size, round(w * scale)), max(self.size, round(h * scale))
        img = img.resize((w, h), self.interpolation)
        left, top = (w - self.size) // 2, (h - self.size) // 2
        return img.crop((left, top, left + self.size, top + self.size))


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


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()).item())
