"""Shared pieces of the kit's model tests: a tiny OpenCLIP config and a stand-in trigger."""

from __future__ import annotations

from pathlib import Path
from typing import Any

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
MODEL_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


class Square:
    """A trigger: a white square in the top-left corner, reported under ``kind``."""

    def __init__(self, kind: str = "square") -> None:
        self.kind = kind

    def apply(self, image: Any) -> Any:
        stamped = image.copy()
        stamped.paste((255, 255, 255), (0, 0, 3, 3))
        return stamped

    def to_dict(self) -> dict[str, str]:
        return {"kind": self.kind}


def run_roclip(argv: list[str]) -> Any:
    """``roclip ARGV`` in-process with the kit registered: a ``CommandResult`` (code, output)."""
    import roclip_kit.plugin

    from roclip_plugin import get_plugin_manager
    from roclip_plugin.cli import main
    from roclip_plugin.testing import run_command

    pm = get_plugin_manager(autoload=False)
    pm.register(roclip_kit.plugin)
    return run_command(lambda a: main(a, pm=pm), argv)


def poisoned_digits(root: Path) -> Any:
    """160 digit pairs (2 targeted captions of 4, 4 backdoored) in memory: a tensor-path run."""
    from roclip_kit.attack.poison import poison_dataset
    from roclip_kit.data.datasets import build_captioned_dataset
    from roclip_kit.data.tensors import load_poisoned

    build_captioned_dataset("digits", root / "digits", seed=0, train_limit=160, test_limit=40)
    poison_dataset(
        root / "poisoned",
        dataset_dir=root / "digits",
        targets=2,
        captions_per_target=4,
        backdoor_count=4,
        backdoor_class="seven",
    )
    return load_poisoned(root / "poisoned")
