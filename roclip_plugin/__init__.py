"""roclip-plugin: RoCLIP's defense against poisoned image-caption pairs, for any CLIP trainer.

The core never imports OpenCLIP; integrations under ``integrations/`` import the core.
"""

from roclip_plugin.config import RoClipConfig
from roclip_plugin.defense import RoClipDefense
from roclip_plugin.hookspecs import hookimpl
from roclip_plugin.loss import DistInfo, MatchStats, RoClipLoss
from roclip_plugin.matching import nearest_captions
from roclip_plugin.plugins import get_plugin_manager
from roclip_plugin.pool import CaptionPool
from roclip_plugin.siglip import RoClipSigLipLoss

__version__ = "0.1.0"

__all__ = [
    "CaptionPool",
    "DistInfo",
    "MatchStats",
    "RoClipConfig",
    "RoClipDefense",
    "RoClipLoss",
    "RoClipSigLipLoss",
    "__version__",
    "get_plugin_manager",
    "hookimpl",
    "nearest_captions",
]
