"""Self-contained HTML reports of a dgdlens run.

:func:`build_report` writes the standard report (training, latent space, mixture vs labels, SAE
quality, annotated features, feature activity, steering) from whatever pieces the caller has.
:class:`Report` and :class:`Section` build custom pages with the same look; sections can also be
appended to the standard report through ``build_report(..., extra_sections=[...])``;
:func:`multiome_sections` makes those of a model of several modalities (RNA + ATAC).
"""

from __future__ import annotations

from .builder import SAE_METRIC_DESCRIPTIONS, build_report, rank_features
from .html import Report, Section, escape, figure_to_data_uri, format_value, table_html
from .multiome import multiome_sections

__all__ = [
    "build_report", "rank_features", "SAE_METRIC_DESCRIPTIONS",
    "Report", "Section", "escape", "format_value", "table_html", "figure_to_data_uri",
    "multiome_sections",
]
