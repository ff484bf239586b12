"""Pictures of a run: attention heatmaps over slide thumbnails, cross-validation figures, the HTML report.

Library modules (no config, no run folders): ``overlay`` (values drawn over a view), ``relevance`` (per-tile
relevance of each MIL model), ``slide`` (one slide's heatmap figure), ``cv`` (cross-validation figures),
``figures`` (data and tiling figures), ``html`` (the self-contained page). Entry points that read a run
through ``ubc_ocean.layout``: ``heatmaps`` (``scripts/heatmaps.py``) and ``report`` (``scripts/report.py``).
"""

from ubc_ocean.viz.overlay import attention_heatmap
from ubc_ocean.viz.relevance import Relevance, ensemble_relevance, instance_relevance

__all__ = ["Relevance", "attention_heatmap", "ensemble_relevance", "instance_relevance"]
