"""OpenCLIP integration: ``roclip-openclip-train`` = OpenCLIP's training script + ``--roclip``.

Patches OpenCLIP at run time (no fork, no copied code); see docs/openclip.md.
"""

from roclip_openclip.cli import main

__all__ = ["main"]
