"""ViT image encoder from timm, with pretrained weights loaded from a local file and position embeddings resampled."""
from __future__ import annotations

from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from vlpt.config import VisionConfig


def build_vit(cfg: VisionConfig) -> VisionTransformer:
    """A ViT returning all tokens (B, 1 + N, width) from `forward_features`; [CLS] first."""
    vit = VisionTransformer(img_size=cfg.image_size, patch_size=cfg.patch_size, embed_dim=cfg.width,
                            depth=cfg.depth, num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio,
                            drop_path_rate=cfg.drop_path, num_classes=0, global_pool="")
    if cfg.pretrained:
        load_vit_weights(vit, cfg.pretrained)
    return vit


def load_vit_weights(vit: VisionTransformer, path: str | Path) -> None:
    """Load timm ViT weights (.safetensors, .pth/.bin, or Google .npz), resampling position embeddings to the grid."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained ViT weights not found: {path}")
    if path.suffix == ".npz":
        from timm.models.vision_transformer import _load_weights
        _load_weights(vit, str(path))
        return
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state.get("state_dict", state))
    if "pos_embed" in state and state["pos_embed"].shape != vit.pos_embed.shape:
        state["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], list(vit.patch_embed.grid_size),
                                                    num_prefix_tokens=vit.num_prefix_tokens)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    missing, unexpected = vit.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: ViT weights do not match the configured model "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
