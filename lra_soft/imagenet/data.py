"""ImageNet data in the standard ImageFolder layout, decoded with Pillow.

    DIR/train/<class>/<image>     DIR/val/<class>/<image>      (any class names; labels = sorted train classes)

The image transforms (the paper's, equal to torchvision's) are in ``lra_soft.imagenet.transforms``; the recipes that
choose them in ``lra_soft.imagenet.recipes``.
"""
from __future__ import annotations

from pathlib import Path

from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


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
        except Exception as e:  # a damaged file makes Pillow's decoders raise nearly any type
            raise ValueError(f"{path}: cannot decode this image ({e.__class__.__name__}: {e}); remove or replace "
                             f"the file") from None
        return self.transform(img), label
