"""Reports on what the compiler did: SVG pictures (``svg``) and the one-page HTML report."""

from .html import render_html
from .svg import graph_svg, memory_svg

__all__ = ["render_html", "graph_svg", "memory_svg"]
