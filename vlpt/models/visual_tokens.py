"""Frozen image tokenizers: the discrete visual tokens that masked image modelling predicts (BEiT; SIMLA Eq. 6), one
token per ViT patch, from one of three sources (`method.simla.tokens.source`):

- `dvae`: DALL-E's discrete VAE encoder (8,192 codes; BEiT's and SIMLA's tokenizer), read from a local file: the
  released `encoder.pkl` (a pickled `dall_e.encoder.Encoder`, which needs the `dall-e` package to unpickle) or its
  state dict (.pt/.pth/.safetensors), loaded into `DVAEEncoder`, the same network under the same parameter names.
  The image is resized to 8 x the patch grid so its 8x-downsampled token grid is the ViT's patch grid (BEiT feeds
  112 px to the tokenizer for a 224 px, 14 x 14 ViT).
- `kmeans`: a small VQ tokenizer, the k-means codebook of the (normalised) pixels of image patches, read from a file
  written by `vlpt tokenizer train-image` or, without one, fitted on the first training batch (the global batch,
  seeded: every rank fits the same) and kept in the checkpoint.
- `cbvila`: a CB-ViLA checkpoint's learned codebook: the nearest codeword of each of its ViT's patch outputs.

No gradient reaches a tokenizer: its weights are frozen and it runs under `torch.no_grad`.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from vlpt.data.transforms import denormalize
from vlpt.errors import MissingFileError, VlptError
from vlpt.objectives.masked_image import patchify

LOGIT_LAPLACE_EPS = 0.1  # DALL-E's pixel map: x -> (1 - 2 eps) x + eps


# --- DALL-E's dVAE encoder ------------------------------------------------------------------------------------------
class _Conv(nn.Module):
    """A same-padded convolution whose parameters are named `w` and `b`, as in the dall_e package."""

    def __init__(self, n_in: int, n_out: int, kernel: int):
        super().__init__()
        self.w = nn.Parameter(torch.randn(n_out, n_in, kernel, kernel) / math.sqrt(n_in * kernel ** 2))
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x.float(), self.w, self.b, padding=(self.w.shape[-1] - 1) // 2)


class _Block(nn.Module):
    """Identity (or 1x1) path + (1 / layers^2) x a bottleneck of four ReLU-convolutions (3, 3, 3, 1)."""

    def __init__(self, n_in: int, n_out: int, n_layers: int):
        super().__init__()
        hid = n_out // 4
        self.post_gain = 1 / n_layers ** 2
        self.id_path = _Conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(OrderedDict([
            ("relu_1", nn.ReLU()), ("conv_1", _Conv(n_in, hid, 3)), ("relu_2", nn.ReLU()), ("conv_2", _Conv(hid, hid, 3)),
            ("relu_3", nn.ReLU()), ("conv_3", _Conv(hid, hid, 3)), ("relu_4", nn.ReLU()), ("conv_4", _Conv(hid, n_out, 1))]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DVAEEncoder(nn.Module):
    """DALL-E's dVAE encoder (Ramesh et al. 2021): a 7x7 input convolution, four groups of residual blocks at widths
    1, 2, 4, 8 x `hidden` with 2x max-pooling after the first three, and a 1x1 convolution to `vocab` logits per
    position of the 8x-downsampled grid. Parameter names are the dall_e package's, so its state dicts load as they are."""

    def __init__(self, hidden: int = 256, blocks_per_group: int = 2, vocab: int = 8192, channels: int = 3):
        super().__init__()
        n_layers = 4 * blocks_per_group
        widths = [hidden, hidden, 2 * hidden, 4 * hidden, 8 * hidden]
        layers: list[tuple[str, nn.Module]] = [("input", _Conv(channels, hidden, 7))]
        for g in range(1, 5):
            group = [(f"block_{i + 1}", _Block(widths[g - 1] if i == 0 else widths[g], widths[g], n_layers))
                     for i in range(blocks_per_group)]
            if g < 4:
                group.append(("pool", nn.MaxPool2d(kernel_size=2)))
            layers.append((f"group_{g}", nn.Sequential(OrderedDict(group))))
        layers.append(("output", nn.Sequential(OrderedDict([("relu", nn.ReLU()), ("conv", _Conv(8 * hidden, vocab, 1))]))))
        self.blocks = nn.Sequential(OrderedDict(layers))
        self.vocab = vocab
        self.requires_grad_(False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B,3,H,W) in [0, 1] -> code logits (B,vocab,H/8,W/8)."""
        return self.blocks((1 - 2 * LOGIT_LAPLACE_EPS) * pixels.float() + LOGIT_LAPLACE_EPS)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file: safetensors, a torch-saved state dict, or a torch-saved module (dall_e's
    `encoder.pkl`: unpickling it needs the dall_e package, and runs the file's code: use files you trust)."""
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except Exception as err:  # noqa: BLE001 - any unreadable file is the same one-line error
            raise VlptError(f"{path} is not a DALL-E dVAE encoder: not a readable safetensors file ({err})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - not plain tensors: a pickled module, or no torch file at all
        if "global" not in str(err).lower():  # weights_only names the classes a module's pickle needs
            raise VlptError(f"{path} is not a DALL-E dVAE encoder: not a torch weights file") from None
        try:
            import dall_e  # noqa: F401  (its classes unpickle the released encoder.pkl)
        except ImportError:
            raise VlptError(f"{path} is a pickled module: install the dall-e package to read it, or save its "
                            "state_dict()") from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # noqa: BLE001
            raise VlptError(f"{path} is not a DALL-E dVAE encoder: it does not unpickle ({type(err).__name__})") from None
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise VlptError(f"{path} is not a DALL-E dVAE encoder: it holds no state dict of tensors")
    return obj


def load_dvae_encoder(path: str | Path) -> DVAEEncoder:
    """The frozen DALL-E dVAE encoder in `path` (its sizes read from the weights); one VlptError line when the file
    is missing or holds something else."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"dVAE encoder weights not found: {path}")
    state = _read_state(path)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    for key in ("blocks.input.w", "blocks.output.conv.w", "blocks.group_1.block_1.res_path.conv_1.w"):
        if key not in state:
            raise VlptError(f"{path} is not a DALL-E dVAE encoder: it lacks {key}")
    hidden, channels = state["blocks.input.w"].shape[:2]
    per_group = sum(1 for k in state if k.startswith("blocks.group_1.block_") and k.endswith("res_path.conv_1.w"))
    encoder = DVAEEncoder(hidden, per_group, state["blocks.output.conv.w"].shape[0], channels)
    try:
        encoder.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).split("\n")[1].strip() if "\n" in str(err) else str(err)
        raise VlptError(f"{path} is not a DALL-E dVAE encoder of the expected layout: {first}") from None
    return encoder.eval()


# --- a k-means patch tokenizer -------------------------------------------------------------------------------------
class PatchKMeans(nn.Module):
    """A VQ image tokenizer: each patch's normalised pixels (patch*patch*3) -> the index of its nearest centroid
    (Euclidean) in `codebook` (K, P). `fit` runs Lloyd's k-means from K distinct samples drawn by a generator."""

    def __init__(self, codes: int, patch: int):
        super().__init__()
        self.patch = patch
        self.register_buffer("codebook", torch.zeros(codes, patch * patch * 3))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, patches: torch.Tensor, iterations: int = 20, generator: torch.Generator | None = None) -> None:
        """patches (M,P), M >= K: centroids from K distinct samples, then `iterations` Lloyd steps (an emptied
        centroid stays where it was)."""
        k = len(self.codebook)
        x = patches.float().reshape(-1, self.codebook.shape[1])
        if len(x) < k:
            raise VlptError(f"k-means of {k} codes needs at least {k} patches; got {len(x)}")
        gen_device = generator.device if generator is not None else x.device
        centroids = x[torch.randperm(len(x), generator=generator, device=gen_device).to(x.device)[:k]].clone()
        for _ in range(iterations):
            assign = torch.cdist(x, centroids).argmin(1)
            sums = torch.zeros_like(centroids).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=k).to(x.dtype)[:, None]
            centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids)
        self.codebook.copy_(centroids)
        self.fitted.fill_(True)

    @torch.no_grad()
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """image (B,3,H,W), normalised as the model sees it -> token indices (B,N)."""
        patches = patchify(image.float(), self.patch)
        return torch.cdist(patches, self.codebook[None].expand(len(patches), -1, -1)).argmin(-1)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"codebook": self.codebook.contiguous(), "patch": torch.tensor(self.patch)}, path)
        return path

    @torch.no_grad()
    def load(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"image tokenizer not found: {path}")
        try:
            state = load_file(path)
        except Exception:  # noqa: BLE001
            raise VlptError(f"{path} is not a vlpt image tokenizer (vlpt tokenizer train-image writes one)") from None
        if "codebook" not in state or "patch" not in state:
            raise VlptError(f"{path} is not a vlpt image tokenizer (vlpt tokenizer train-image writes one)")
        if int(state["patch"]) != self.patch or tuple(state["codebook"].shape) != tuple(self.codebook.shape):
            raise VlptError(f"{path}: a tokenizer of {len(state['codebook'])} codes over {int(state['patch'])} px "
                            f"patches; the model wants {len(self.codebook)} codes over {self.patch} px patches")
        self.codebook.copy_(state["codebook"])
        self.fitted.fill_(True)


def train_image_tokenizer(images, codes: int, patch: int, iterations: int = 20, seed: int = 0,
                          max_patches: int = 200_000) -> PatchKMeans:
    """A `PatchKMeans` fitted on the patches of `images` (an iterable of normalised (B,3,H,W) batches), at most
    `max_patches` of them drawn at random (seeded)."""
    patches = torch.cat([patchify(batch.float(), patch).flatten(0, 1) for batch in images])
    gen = torch.Generator().manual_seed(seed)
    if len(patches) > max_patches:
        patches = patches[torch.randperm(len(patches), generator=gen)[:max_patches]]
    tokenizer = PatchKMeans(codes, patch)
    tokenizer.fit(patches, iterations, gen)
    return tokenizer


# --- one frozen tokenizer, its source a config key ------------------------------------------------------------------
class VisualTokens(nn.Module):
    """image (B,3,H,W), normalised -> (B,N) token indices on the ViT's patch grid, from `source` (see the module
    doc). Only the k-means codebook is part of the state dict; a dVAE or CB-ViLA tokenizer is read from `path` at
    first use and kept out of checkpoints (it is frozen and can be read again)."""

    def __init__(self, source: str, path: str, codes: int, grid: tuple[int, int], patch: int, seed: int = 0):
        super().__init__()
        self.source, self.path, self.codes, self.grid, self.seed = source, path, codes, tuple(grid), seed
        self.kmeans = PatchKMeans(codes, patch) if source == "kmeans" else None
        self._external: list[nn.Module] = []  # a plain list: not registered, not saved

    def external(self, device) -> nn.Module:
        if not self._external:
            if not self.path:
                raise VlptError(f"method.simla.tokens.path is empty: the {self.source} tokenizer is read from a file")
            if self.source == "dvae":
                model = load_dvae_encoder(self.path)
                size = model.vocab
            else:
                from vlpt.engine.checkpoint import load_method
                model = load_method(self.path)[0]
                if not hasattr(model, "quantizer"):
                    raise VlptError(f"{self.path} is a {model.name} checkpoint, not CB-ViLA's: it has no codebook")
                if tuple(model.backbone.vision.grid) != self.grid:
                    raise VlptError(f"{self.path}: CB-ViLA's patch grid {tuple(model.backbone.vision.grid)} is not "
                                    f"this model's {self.grid}")
                size = len(model.quantizer.codewords)
                model.requires_grad_(False)
            if size != self.codes:
                raise VlptError(f"{self.path}: a tokenizer of {size} codes; method.simla.tokens.codes is {self.codes}")
            self._external.append(model.eval())
        return self._external[0].to(device)

    @torch.no_grad()
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.source == "kmeans":
            if not bool(self.kmeans.fitted):
                self.fit_kmeans(image)
            return self.kmeans(image)
        model = self.external(image.device)
        if self.source == "dvae":
            gh, gw = self.grid
            pixels = F.interpolate(denormalize(image.float()), size=(8 * gh, 8 * gw), mode="bilinear",
                                   antialias=True, align_corners=False).clamp(0, 1)
            return model(pixels).argmax(1).flatten(1)
        return model.quantize(model.encode_image(image)[0])[1].indices

    def fit_kmeans(self, image: torch.Tensor) -> None:
        """From `path` when set, else k-means on this (first) batch gathered from every rank, seeded alike."""
        if self.path:
            self.kmeans.load(self.path)
            return
        from vlpt.engine import distributed, rng
        images = distributed.gather(image.float())
        gen = rng.generator("image_tokenizer", self.seed, 0, device=image.device)
        self.kmeans.fit(patchify(images, self.kmeans.patch).flatten(0, 1), generator=gen)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def image_paths(source: str | Path, limit: int = 0) -> list[Path]:
    """The images of a folder (recursively, sorted) or of a JSON annotation file's records (`image`, or `images`
    pairs), at most `limit` (0: all)."""
    import json
    source = Path(source)
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    elif source.is_file():
        records = json.loads(source.read_text())
        names = [n for r in records for n in ([r["image"]] if "image" in r else r.get("images", []))]
        paths = [source.parent / n for n in dict.fromkeys(names)]
    else:
        raise MissingFileError(f"no image folder or annotation file at {source}")
    if not paths:
        raise VlptError(f"{source} holds no images")
    return paths[:limit] if limit else paths


def train_from_images(source: str | Path, out: str | Path, *, codes: int, patch: int, image_size: int,
                      iterations: int = 20, seed: int = 0, limit: int = 0, batch_size: int = 256,
                      num_workers: int = 0) -> tuple[Path, int]:
    """`vlpt tokenizer train-image`: a `PatchKMeans` of `codes` over the `patch` px patches of the images of `source`
    resized to `image_size` and normalised as models see them, written to `out` (safetensors). Returns the file and
    the number of images."""
    from torch.utils.data import DataLoader

    from vlpt.data.loader import ImageFiles
    from vlpt.data.transforms import image_transform
    if image_size % patch:
        raise VlptError(f"--patch {patch} does not divide --image-size {image_size}")
    paths = image_paths(source, limit)
    loader = DataLoader(ImageFiles(paths, image_transform(image_size)), batch_size=batch_size, num_workers=num_workers)
    tokenizer = train_image_tokenizer(loader, codes, patch, iterations, seed)
    return tokenizer.save(out), len(paths)
