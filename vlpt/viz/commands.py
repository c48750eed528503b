"""The built-in pictures as `vlpt visualize` sub-commands."""
from __future__ import annotations

from pathlib import Path

from vlpt.viz.registry import Visualization, register


@register("reconstruction")
class Reconstruction(Visualization):
    capability = "reconstruction"
    help = "MaskVLM masked image reconstruction: original | masked | reconstructed"
    out = "recon.png"

    def arguments(self, p) -> None:
        p.add_argument("--annotation", default="", help="pretraining annotation file in it (default: data.train)")
        p.add_argument("--n", type=int, default=8, help="image-text pairs (rows)")
        p.add_argument("--seed", type=int, default=0, help="seed of the image mask")
        p.add_argument("--l1", default="", help="also report the masked-pixel L1 over this annotation file (e.g. "
                       "retrieval_test.json) against predicting each image's mean visible colour")

    def draw(self, model, cfg, tokenizer, args, device) -> str:
        from vlpt.viz.reconstruction import masked_l1, save_reconstructions
        data = Path(args.data or cfg.data.root)
        size, max_len = cfg.model.vision.image_size, cfg.model.text.max_len
        out, rows = save_reconstructions(model, tokenizer, data / (args.annotation or cfg.data.train), data,
                                         args.out, image_size=size, max_len=max_len, n=args.n, seed=args.seed,
                                         device=device)
        line = "\n".join([f"wrote {out} (columns: original, masked, reconstructed)"]
                          + [f'  "{r["caption"]}": {r["masked"]} of {r["patches"]} patches masked, masked-pixel '
                             f'L1 {r["l1"]:.4f}' for r in rows])
        if args.l1:
            l1 = masked_l1(model, tokenizer, data / args.l1, data, image_size=size, max_len=max_len, seed=args.seed,
                           device=device)
            line += (f"\nmasked-pixel L1 on {args.l1}: reconstruction {l1['model']:.4f}, "
                     f"each image's mean visible colour {l1['mean_colour']:.4f}")
        return line


@register("codebook")
class Codebook(Visualization):
    capability = "codebook"
    help = "CB-ViLA visual codebook: image patches assigned to sampled codewords (Fig. 3)"
    out = "codebook.png"

    def arguments(self, p) -> None:
        p.add_argument("--split", default="test", help="reads the images of retrieval_<split>.json")
        p.add_argument("--codewords", type=int, default=8, help="codewords drawn at random among those in use (rows)")
        p.add_argument("--patches", type=int, default=10, help="patches drawn per codeword (columns)")
        p.add_argument("--seed", type=int, default=0)

    def draw(self, model, cfg, tokenizer, args, device) -> str:
        from vlpt.tasks.retrieval import read_split
        from vlpt.viz.codebook import save_codebook_grid
        data = Path(args.data or cfg.data.root)
        images = [data / p for p in read_split(data / f"retrieval_{args.split}.json")[0]]
        out, rows, used = save_codebook_grid(model, images, args.out, image_size=cfg.model.vision.image_size,
                                             codewords=args.codewords, patches=args.patches, seed=args.seed,
                                             device=device)
        return (f"wrote {out}: one row per codeword ({', '.join(map(str, rows))}), patches of the {args.split} "
                f"images quantised to it; {used['codebook_used']} of {len(model.quantizer.codewords)} codewords in use")


@register("gradcam")
class GradCAM(Visualization):
    help = "Grad-CAM of a text on an image: the ITM match's cross-attention map per word and averaged"
    out = "gradcam.png"

    def arguments(self, p) -> None:
        p.add_argument("--image", required=True, help="image file")
        p.add_argument("--text", required=True, help="the text whose words are located")
        p.add_argument("--layer", type=int, default=-1,
                       help="fusion layer whose cross-attention is read (Python indexing; ALBEF: 2)")

    def draw(self, model, cfg, tokenizer, args, device) -> str:
        import torch

        from vlpt.data.annotations import load_image
        from vlpt.data.transforms import image_transform
        from vlpt.errors import VlptError
        from vlpt.viz.gradcam import caption_map, gradcam, save_gradcam

        if not args.text.strip():
            raise VlptError("--text is empty: give the words to locate")
        picture = load_image(args.image)
        pixels = image_transform(cfg.model.vision.image_size)(picture)[None].to(device)
        ids, mask = tokenizer([args.text], cfg.model.text.max_len)
        if int(tokenizer([args.text], 512)[1].sum()) > cfg.model.text.max_len:
            print(f"note: the text is cut to its first {cfg.model.text.max_len} tokens (model.text.max_len)")
        ids, mask = ids.to(device), mask.to(device)
        with torch.no_grad():
            tokens, hidden = model.backbone.encode_image(pixels), model.backbone.encode_text(ids, mask)
            match = model.itm_logits(tokens, hidden, mask).softmax(-1)[0, 1].item()
        cams = gradcam(model, tokens, hidden, mask, args.layer)
        n = int(mask.sum())
        words = [tokenizer.decode([i]) for i in ids[0, 1:n - 1].tolist()]  # [CLS] and [SEP] not drawn
        out = save_gradcam(picture, words, cams[0, 1:n - 1], caption_map(cams, mask)[0], args.out,
                           title=f'Grad-CAM on fusion layer {args.layer}\'s cross-attention, per word and averaged: '
                           f'"{args.text}", ITM match {match:.3f}')
        return f"wrote {out}: the map of each word and their average; ITM match probability {match:.3f}"
