"""ImageNet training of the SOFT backbones: ImageFolder data (Pillow), transforms, mixup/CutMix, EMA, DDP loop."""
from lra_soft.imagenet.augment import MixupCutmix, smooth_one_hot, soft_target_cross_entropy
from lra_soft.imagenet.data import ImageFolder
from lra_soft.imagenet.transforms import eval_transform, train_transform
from lra_soft.imagenet.train import ImageNetConfig, evaluate, evaluate_checkpoint, train

__all__ = ["ImageFolder", "ImageNetConfig", "MixupCutmix", "eval_transform", "evaluate", "evaluate_checkpoint",
           "smooth_one_hot", "soft_target_cross_entropy", "train", "train_transform"]
