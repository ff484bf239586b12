"""A self-contained HTML page: figures embedded as base64 PNG, tables inline, no file or network fetched."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ubc_ocean.io_utils import atomic_write_text

STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1400px; color: #222; background: #fff; }
h1 { border-bottom: 3px solid #3465a4; padding-bottom: .3em; }
h2 { margin-top: 2em; color: #3465a4; }
img { max-width: 100%; border: 1px solid #ddd; margin: .5em 0; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: .3em .7em; text-align: right; }
th { background: #eef2f8; }
p.note { color: #555; }
"""


def figure_png(fig, dpi: int = 90) -> bytes:  # type: ignore[no-untyped-def]
    """A matplotlib figure as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    plt.close(fig)
    return buffer.getvalue()


def png_tag(png: bytes, alt: str) -> str:
    """An ``<img>`` whose source is the PNG itself (a data URI)."""
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


@dataclass
class Section:
    """A heading, then paragraphs, tables and images, in that order."""

    title: str
    notes: Sequence[str] = ()
    tables: Sequence[pd.DataFrame] = ()
    images: Sequence[tuple[str, bytes]] = field(default_factory=list)  # (alt text, PNG bytes)

    def to_html(self) -> str:
        parts = [f"<h2>{html.escape(self.title)}</h2>"]
        parts += [f'<p class="note">{html.escape(note)}</p>' for note in self.notes]
        parts += [table.to_html(float_format=lambda v: f"{v:.3f}", na_rep="n/a", border=0) for table in self.tables]
        parts += [png_tag(png, alt) for alt, png in self.images]
        return "\n".join(parts)


def render_report(title: str, sections: Sequence[Section]) -> str:
    """The whole page as one string."""
    body = "\n".join(section.to_html() for section in sections)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")


def write_report(path: Path, title: str, sections: Sequence[Section]) -> Path:
    """Write the page atomically; returns ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write_text(path, render_report(title, sections))
