"""Image transforms (torchvision): resize + normalise, or ALBEF's pre-training augmentation.

ALBEF's pre-training augmentation (its released Pretrain config and data code, which CODIS, CB-ViLA and SIMLA say
they follow): RandomResizedCrop(scale=(0.2, 1.0), bicubic), then RandomAugment(2, 7) restricted to geometric and
tone ops, `ALBEF_AUGMENT_OPS`. The ops that change colour (colour/saturation, contrast, hue, solarize, posterize,
invert) are left out because captions name colours ("a red circle"); SIMLA Sec. 2.5: "RandAugment ... with color
changes removed". ALBEF's horizontal flip is left out too (see `image_transform`).

Every random draw comes from torch: from the `torch.Generator` given to `image_transform`, or with none from torch's
global generator, so seeding torch (the sharded loader seeds it per sample) fixes the crop and the ops; Python's
`random` is never used.
"""
from __future__ import annotations

import math

import torch
from torchvision import transforms as T
from torchvision.transforms import functional as F

# CLIP's statistics, which ALBEF uses.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)

# ALBEF's Pretrain crop: RandomResizedCrop(image_res, scale=(0.2, 1.0), bicubic); torchvision's default aspect ratios.
CROP_SCALE = (0.2, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)

# ALBEF's RandomAugment(2, 7, augs=[Identity, AutoContrast, Equalize, Brightness, Sharpness, ShearX, ShearY,
# TranslateX, TranslateY, Rotate]): no op here changes hue or saturation.
ALBEF_AUGMENT_OPS = ("identity", "autocontrast", "equalize", "brightness", "sharpness",
                     "shear_x", "shear_y", "translate_x", "translate_y", "rotate")
NUM_OPS = 2  # ops drawn per image, uniformly from the list with replacement (as ALBEF)
MAGNITUDE = 7  # of MAX_MAGNITUDE: every op at 70 % of its largest setting below
MAX_MAGNITUDE = 10
OP_PROBABILITY = 0.5  # ALBEF applies each drawn op with probability 0.5

# Largest setting of each op (at magnitude 10), as ALBEF's RandomAugment maps its level to arguments:
# shear factor 0.3, rotation 30 degrees, translation 10 px at ALBEF's 256 px (here as a fraction of the side, so
# 7 px at 256 and 6 px at 224), each with a random sign; brightness and sharpness factor 0.1 + 1.8 * level / 10
# (1.36 at 7: ALBEF's enhance ops always brighten / sharpen). Uncovered pixels are filled with mid grey (128).
MAX_SHEAR = 0.3
MAX_ROTATE = 30.0
MAX_TRANSLATE = 10 / 256
FILL = 128


def _fill(img) -> list[float]:
    if isinstance(img, torch.Tensor) and img.is_floating_point():
        return [FILL / 255.0] * 3
    return [float(FILL)] * 3


def apply_op(img, name: str, level: float, sign: float = 1.0):
    """One op of `ALBEF_AUGMENT_OPS` at `level` in [0, 1] (magnitude / 10); `sign` (+-1) for the geometric ops.

    `img` is a PIL image (as the data sets load them) or a uint8 tensor (..., 3, H, W); public
    torchvision.transforms.functional ops only.
    """
    bilinear = T.InterpolationMode.BILINEAR
    if name == "identity":
        return img
    if name == "autocontrast":
        return F.autocontrast(img)
    if name == "equalize":
        return F.equalize(img)
    if name == "brightness":
        return F.adjust_brightness(img, 0.1 + 1.8 * level)
    if name == "sharpness":
        return F.adjust_sharpness(img, 0.1 + 1.8 * level)
    if name in ("shear_x", "shear_y"):  # x += s * y (or y += s * x) about the top-left corner, as PIL and ALBEF
        angle = math.degrees(math.atan(sign * MAX_SHEAR * level))
        shear = [angle, 0.0] if name == "shear_x" else [0.0, angle]
        return F.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=bilinear,
                        fill=_fill(img), center=[0, 0])
    if name in ("translate_x", "translate_y"):
        _, height, width = F.get_dimensions(img)
        side = width if name == "translate_x" else height
        shift = int(round(sign * MAX_TRANSLATE * level * side))
        move = [shift, 0] if name == "translate_x" else [0, shift]
        return F.affine(img, angle=0.0, translate=move, scale=1.0, shear=[0.0, 0.0], interpolation=bilinear,
                        fill=_fill(img))
    if name == "rotate":
        return F.rotate(img, sign * MAX_ROTATE * level, interpolation=bilinear, fill=_fill(img))
    raise ValueError(f"unknown augmentation op {name!r}; choose from {ALBEF_AUGMENT_OPS}")


class RandomAugment(torch.nn.Module):
    """ALBEF's RandomAugment(num_ops, magnitude): per image, `num_ops` ops drawn uniformly (with replacement) from
    `ops`, each applied with probability `prob` at level magnitude / 10, geometric ops with a random sign."""

    def __init__(self, num_ops: int = NUM_OPS, magnitude: int = MAGNITUDE, ops: tuple[str, ...] = ALBEF_AUGMENT_OPS,
                 prob: float = OP_PROBABILITY, generator: torch.Generator | None = None):
        super().__init__()
        unknown = set(ops) - set(ALBEF_AUGMENT_OPS)
        if unknown:
            raise ValueError(f"unknown augmentation ops {sorted(unknown)}; choose from {ALBEF_AUGMENT_OPS}")
        self.num_ops, self.magnitude, self.ops, self.prob = num_ops, magnitude, tuple(ops), prob
        self.generator = generator

    def draw(self) -> list[tuple[str, bool, float]]:
        """(op, applied, sign) for each of the `num_ops` ops, from torch's RNG (or the generator)."""
        picks = torch.randint(len(self.ops), (self.num_ops,), generator=self.generator).tolist()
        coins = torch.rand(self.num_ops, 2, generator=self.generator).tolist()
        return [(self.ops[i], apply < self.prob, -1.0 if flip < 0.5 else 1.0) for i, (apply, flip) in zip(picks, coins)]

    def forward(self, img):
        level = self.magnitude / MAX_MAGNITUDE
        for name, applied, sign in self.draw():
            if applied:
                img = apply_op(img, name, level, sign)
        return img

    def extra_repr(self) -> str:
        return f"num_ops={self.num_ops}, magnitude={self.magnitude}, prob={self.prob}, ops={self.ops}"


def crop_box(img, scale=CROP_SCALE, ratio=CROP_RATIO, generator: torch.Generator | None = None):
    """(top, left, height, width) of a random crop covering `scale` of the area with aspect ratio in `ratio`
    (log-uniform), the Inception-style crop; after 10 misses the largest centred crop within `ratio`."""
    _, height, width = F.get_dimensions(img)
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(2, generator=generator).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    aspect = width / height
    if aspect < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif aspect > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class RandomResizedCrop(T.RandomResizedCrop):
    """torchvision's RandomResizedCrop drawing its box from `generator` (or torch's global RNG)."""

    def __init__(self, size, scale=CROP_SCALE, ratio=CROP_RATIO, interpolation=T.InterpolationMode.BICUBIC,
                 generator: torch.Generator | None = None):
        super().__init__(size, scale=scale, ratio=ratio, interpolation=interpolation)
        self.generator = generator

    def forward(self, img):
        top, left, h, w = crop_box(img, self.scale, self.ratio, self.generator)
        return F.resized_crop(img, top, left, h, w, self.size, self.interpolation, antialias=self.antialias)


def image_transform(image_size: int, augment: bool = False, *, generator: torch.Generator | None = None) -> T.Compose:
    """No horizontal flip even with `augment`: it would contradict captions that say 'left' and 'right'.

    `augment`: ALBEF's pre-training crop (scale 0.2-1, bicubic) and RandomAugment(2, 7) over `ALBEF_AUGMENT_OPS`
    (no colour-changing op: captions name colours); draws from `generator`, else torch's global RNG.
    """
    if augment:
        steps = [RandomResizedCrop(image_size, generator=generator), RandomAugment(generator=generator)]
    else:
        steps = [T.Resize((image_size, image_size), interpolation=T.InterpolationMode.BICUBIC)]
    return T.Compose(steps + [T.ToTensor(), T.Normalize(MEAN, STD)])


def denormalize(x):
    """Inverse of the normalisation, for pictures: (..., 3, H, W) -> values in [0, 1]."""
    mean = x.new_tensor(MEAN)[:, None, None]
    std = x.new_tensor(STD)[:, None, None]
    return (x * std + mean).clamp(0, 1)


def transform_seeded(transform, image, seed: int):
    """`transform(image)` with torch's global RNG seeded to `seed` and restored after: an augmented sample is the same
    whichever process, rank or worker decodes it, and after a resume."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image)


def second_view(transform, image, seed: int, draw: int):
    """`image_view2` of sample `draw`: `transform` (the pretraining augmentation) seeded apart from the first view's
    stream, so the two views are independent draws and each the same in any process and after a resume."""
    from vlpt.engine import rng
    return transform_seeded(transform, image, rng.seed_of("augment_view2", seed, draw))
