"""Writing the pictures: one place that titles, lays out, saves and closes a matplotlib figure."""
from __future__ import annotations

from pathlib import Path


def save_figure(fig, out: str | Path, title: str = "", dpi: int = 100, title_size: int = 10) -> Path:
    """`fig` with `title` above it (none when empty), laid out tightly, written to `out` (its folders made) and
    closed; returns the path."""
    import matplotlib.pyplot as plt

    if title:
        fig.suptitle(title, fontsize=title_size)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out


def png_bytes(fig, dpi: int = 100) -> bytes:
    """`fig` (a `matplotlib.figure.Figure`, no pyplot) as PNG bytes, for pictures that go inside a page."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def show(ax, image, title: str = "", below: str = "", size: int = 8) -> None:
    """`image` (a PIL image, an (H,W,3) array, or a (3,H,W) tensor in [0,1]) on `ax` without smoothing, each pixel
    a block however far it is enlarged; no ticks; `title` above it and `below` under it."""
    import numpy as np

    if hasattr(image, "permute"):
        image = image.detach().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
    ax.imshow(np.asarray(image), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=size)
    if below:
        ax.set_xlabel(below, fontsize=size)


def quoted(text: str, width: int = 40) -> str:
    """A caption in quotes, wrapped to lines of `width` characters."""
    import textwrap
    return textwrap.fill(f'"{text}"', width)
