"""End to end: OpenCLIP's real training script with ``--roclip`` on a tiny model, on the CPU."""
