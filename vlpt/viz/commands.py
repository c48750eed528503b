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
        out = save_reconstructions(model, tokenizer, data / (args.annotation or cfg.data.train), data, args.out,
                                   image_size=size, max_len=max_len, n=args.n, seed=args.seed, device=device)
        line = f"wrote {out} (columns: original, masked, reconstructed)"
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
