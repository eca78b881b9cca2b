"""``python -m roclip_openclip``: same as ``roclip-openclip-train``."""

import sys

from roclip_openclip.cli import main

sys.exit(main())
