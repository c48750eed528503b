"""Image transforms (torchvision): resize + normalise, or ALBEF's RandomResizedCrop + RandAugment for training."""
from __future__ import annotations

from torchvision import transforms as T

# CLIP's statistics, which ALBEF uses.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def image_transform(image_size: int, augment: bool = False) -> T.Compose:
    """No horizontal flip even with `augment`: it would contradict captions that say 'left' and 'right'."""
    if augment:
        steps = [T.RandomResizedCrop(image_size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                 T.RandAugment(2, 7)]
    else:
        steps = [T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(MEAN, STD)])


def denormalize(x):
    """Inverse of the normalisation, for pictures: (..., 3, H, W) -> values in [0, 1]."""
    mean = x.new_tensor(MEAN)[:, None, None]
    std = x.new_tensor(STD)[:, None, None]
    return (x * std + mean).clamp(0, 1)
