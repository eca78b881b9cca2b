"""roclip_torch: RoCLIP in any PyTorch training loop, without OpenCLIP.

- :class:`RoClipAdapter`: a few calls an existing loop adds (epoch start, loss, checkpoint).
- :class:`Trainer` with :class:`TrainSettings`: a minimal loop for projects without one.
- :class:`~roclip_torch.csv_stats.CsvMatchStats`: an example plugin writing match statistics.

It imports the core (:mod:`roclip_plugin`) and never OpenCLIP. See docs/torch-loop.md.
"""

from roclip_plugin.stats import MatchStatsCollector, MatchSummary
from roclip_torch.adapter import CHECKPOINT_KEY, RoClipAdapter, add_arguments
from roclip_torch.loop import EpochSummary, Trainer, TrainSettings

__all__ = [
    "CHECKPOINT_KEY",
    "EpochSummary",
    "MatchStatsCollector",
    "MatchSummary",
    "RoClipAdapter",
    "TrainSettings",
    "Trainer",
    "add_arguments",
]
