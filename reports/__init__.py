"""The self-contained HTML report of an analysis run (``RUN/report.html``): CKA heatmaps and curves,
PCA maps, the recommended ViT-Split configuration and its evidence, and linked training runs."""

from .html import build_report, render_report

__all__ = ["build_report", "render_report"]
