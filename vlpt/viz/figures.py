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
