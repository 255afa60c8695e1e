"""Reference outputs of torchvision's ImageNet transforms, for ``tests/test_imagenet_transforms.py``.

    python scripts/make_transform_fixture.py [OUT]      # OUT = tests/fixtures/imagenet_transforms

Run once, in an environment with torchvision (the project's tests need none; torchvision's CPU wheel does not import
beside the torch 2.13.0 CPU build, torch 2.14.1 with torchvision 0.29.1 does). It writes four tiny PNGs and
``reference.json``:
- ``eval_geometry``: for 330 image sizes and two crops (224 from 256 and 224 from 248), the size after
  ``Resize(short)`` and the offset of ``CenterCrop(224)``, read from torchvision's output (the offset from an image
  whose pixels hold their coordinates);
- ``eval_pixels``: sha256 of the uint8 crop and of the float32 tensor of
  ``Resize + CenterCrop + ToTensor + Normalize`` on each PNG at three sizes and crops;
- ``train``: for seeds 0-7, the box of ``RandomResizedCrop`` (bicubic), the draw of ``RandomHorizontalFlip`` and the
  sha256 of their uint8 output on each PNG; ``train_geometry``: boxes on large and extreme sizes (the fallback).
With timm installed it also checks that timm's evaluation transform gives torchvision's sizes and offsets.
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
from PIL import Image
from torchvision import transforms as T

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGES = {"landscape.png": (37, 23), "portrait.png": (23, 37), "square.png": (30, 30), "odd.png": (41, 29)}
EVAL_PIXELS = [(16, 0.875), (20, 0.9), (12, 1.0)]  # (crop size, crop_pct)
CROPS = [(224, 0.875), (224, 0.9)]
BICUBIC = T.InterpolationMode.BICUBIC


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tiny_image(seed: int, size: tuple[int, int]) -> Image.Image:
    """A smooth colour ramp plus noise, so that resampling has edges and gradients to work on."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    ramp = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], axis=-1)
    return Image.fromarray(np.clip(ramp + rng.normal(0, 40, ramp.shape), 0, 255).astype(np.uint8))


def image_sizes() -> list[tuple[int, int]]:
    """Common ImageNet sizes, squares, extremes, and 300 random (width, height) pairs."""
    rng = np.random.default_rng(0)
    sizes = [(500, 375), (375, 500), (640, 427), (427, 640), (500, 333), (333, 500), (500, 500), (256, 256),
             (257, 256), (256, 257), (300, 225), (1024, 768), (4000, 3000), (2000, 260), (260, 2000), (800, 600),
             (224, 224), (225, 224), (256, 1000), (999, 257)]
    while len(sizes) < 330:
        w, h = (int(v) for v in rng.integers(256, 1500, 2))
        if (w, h) not in sizes:
            sizes.append((w, h))
    return sizes


def geometry_of(resize, crop, w: int, h: int) -> tuple[int, int, int, int]:
    """(resized width, resized height, left, top) of a Resize and a CenterCrop transform on a w x h image; the offset
    is read from an image whose pixels hold their coordinates."""
    ow, oh = resize(Image.new("L", (w, h))).size
    coords = np.arange(oh, dtype=np.int32)[:, None] * 65536 + np.arange(ow, dtype=np.int32)[None, :]
    top, left = divmod(int(np.asarray(crop(Image.fromarray(coords, mode="I")))[0, 0]), 65536)
    return ow, oh, left, top


def timm_eval(size: int, crop_pct: float):
    """timm's evaluation Resize and CenterCrop, or None without timm."""
    try:
        from timm.data import create_transform
    except ImportError:
        return None
    steps = create_transform(size, is_training=False, crop_pct=crop_pct, interpolation="bicubic").transforms
    return next(t for t in steps if isinstance(t, T.Resize)), next(t for t in steps if isinstance(t, T.CenterCrop))


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    images = {}
    for seed, (name, size) in enumerate(IMAGES.items()):
        tiny_image(seed, size).save(out / name)
        images[name] = Image.open(out / name).convert("RGB")

    geometry = []
    for size, crop_pct in CROPS:
        short = math.floor(size / crop_pct)
        ours = T.Resize(short, interpolation=BICUBIC), T.CenterCrop(size)
        timm = timm_eval(size, crop_pct)
        for w, h in image_sizes():
            found = geometry_of(*ours, w, h)
            assert timm is None or geometry_of(*timm, w, h) == found, (w, h, size, crop_pct)
            geometry.append([w, h, size, short, *found])

    pixels = []
    for name, img in images.items():
        for size, crop_pct in EVAL_PIXELS:
            crop = T.Compose([T.Resize(math.floor(size / crop_pct), interpolation=BICUBIC), T.CenterCrop(size)])(img)
            tensor = T.Normalize(MEAN, STD)(T.ToTensor()(crop)).contiguous()
            pixels.append({"image": name, "size": size, "crop_pct": crop_pct, "uint8_sha256": sha256(crop.tobytes()),
                           "tensor_sha256": sha256(tensor.numpy().tobytes())})

    train, crop, flip = [], T.RandomResizedCrop(16, interpolation=BICUBIC), T.RandomHorizontalFlip()
    for name, img in images.items():
        for seed in range(8):
            torch.manual_seed(seed)
            box = T.RandomResizedCrop.get_params(img, crop.scale, crop.ratio)
            flipped = bool(torch.rand(1) < 0.5)
            torch.manual_seed(seed)
            result = T.Compose([crop, flip])(img)
            train.append({"image": name, "seed": seed, "box": list(box), "flip": flipped,
                          "uint8_sha256": sha256(result.tobytes())})
    train_geometry = []
    for w, h in [(500, 375), (640, 427), (2000, 100), (100, 2000), (5, 3), (1, 1)]:
        for seed in range(8):
            torch.manual_seed(seed)
            train_geometry.append([w, h, seed, *T.RandomResizedCrop.get_params(Image.new("L", (w, h)), crop.scale,
                                                                               crop.ratio)])

    made_with = {"torch": torch.__version__, "torchvision": torchvision.__version__, "pillow": PIL.__version__}
    try:
        import timm
        made_with["timm"] = f"{timm.__version__} (evaluation sizes and offsets equal torchvision's)"
    except ImportError:
        pass
    reference = {"made_with": made_with, "mean": MEAN, "std": STD,
                 "eval_geometry_columns": ["width", "height", "size", "short", "resized_width", "resized_height",
                                           "left", "top"],
                 "eval_geometry": geometry, "eval_pixels": pixels,
                 "train_geometry_columns": ["width", "height", "seed", "top", "left", "height", "width"],
                 "train": train, "train_geometry": train_geometry}
    text = json.dumps(reference, indent=None, separators=(",", ":"))
    (out / "reference.json").write_text(text.replace("],[", "],\n[").replace("},{", "},\n{") + "\n")
    print(f"wrote {out}: {len(geometry)} evaluation sizes, {len(pixels)} pixel checks, {len(train)} training draws "
          f"({made_with})")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "tests" / "fixtures" / "imagenet_transforms")
