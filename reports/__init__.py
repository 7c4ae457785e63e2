"""The self-contained HTML report of an analysis run (``RUN/report.html``): CKA heatmaps and curves,
PCA maps, the recommended ViT-Split configuration and its evidence, and linked training runs; and the
report of ``cka-split compare`` (``OUT/report.html``, :mod:`.compare`)."""

from .compare import build_compare_report, render_compare_report
from .html import build_report, render_report

__all__ = ["build_compare_report", "build_report", "render_compare_report", "render_report"]
