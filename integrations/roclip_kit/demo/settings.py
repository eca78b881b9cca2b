"""What ``roclip demo`` runs: :class:`DemoSettings`, the scales that size it, and their checks.

A scale (``cpu`` or ``gpu``, per trainer) fills every size the user did not give;
:meth:`DemoSettings.check` refuses a bad flag before anything is built, naming it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from roclip_plugin.config import RoClipConfig, preset_name
from roclip_plugin.config_aliases import renamed_keys

RESULTS_FILE = "results.json"
PLOT_FILE = "attack_success.png"
TRAINERS = ("tensor", "openclip")


# Sizes per scale of the tensor-resident path (the default trainer; docs/demo.md). "cpu" is
# the faithful scale-down of the paper's attacks on the full dataset, sized to train CLIP and
# RoCLIP side by side in under 10 minutes on two CPU cores; "gpu" is the same on a CUDA device
# with a larger ViT (the attacks and ratios unchanged).
SCALES: dict[str, dict[str, Any]] = {
    "cpu": {
        "train_limit": None,
        "attribute_rate": 0.5,
        "test_limit": None,
        "epochs": 12,
        "batch_size": 256,
        "lr": 2e-3,
        "model": "tensor-cpu",
        "targets": 32,
        "captions_per_target": [10, 50],
        "backdoor_rate": 0.001,
        "trigger": "blend",
        "pool_size": 4096,
        "first_defended_epoch": 4,
        "defend_every": 2,
        "image_aug": "roclip-small",
        "eval_limit": 1000,
        "jobs": 2,
    },
    "gpu": {
        "train_limit": None,
        "attribute_rate": 0.5,
        "test_limit": None,
        "epochs": 12,
        "batch_size": 256,
        "lr": 2e-3,
        "model": "tensor-gpu",
        "targets": 32,
        "captions_per_target": [10, 50],
        "backdoor_rate": 0.001,
        "trigger": "blend",
        "pool_size": 4096,
        "first_defended_epoch": 4,
        "defend_every": 2,
        "image_aug": "roclip-small",
        "eval_limit": None,
        "jobs": 1,
    },
}


# Sizes of the OpenCLIP path (``--trainer openclip``: ``roclip-openclip-train``, the flag users
# run). "cpu" is sized to finish in under 10 minutes on two CPU cores (measured figures in
# docs/demo.md); "gpu" is the full dataset with a larger ViT.
OPENCLIP_SCALES: dict[str, dict[str, Any]] = {
    "cpu": {
        "train_limit": 5000,
        "attribute_rate": 0.25,
        "test_limit": 1000,
        "epochs": 10,
        "batch_size": 128,
        "lr": 1e-3,
        "model": "tiny-cpu",
        "targets": 8,
        "captions_per_target": 25,
        "backdoor_rate": 0.01,
        "trigger": "patch",
        # A tenth of the 5,200 pairs: a pool holding more of them hands images back their own
        # captions of an earlier epoch (docs/config.md).
        "pool_size": 512,
        "first_defended_epoch": 6,
        "defend_every": 2,
        # Measured (docs/demo.md): the authors' image augmentation, made for 224 px photos,
        # halved this tiny model's progress on 32 px digits in 7 epochs and RoCLIP then
        # collapsed; captions keep EDA. The gpu scale keeps the default augmentation.
        "image_aug": "none",
        "eval_limit": 500,
    },
    "gpu": {
        "train_limit": None,
        "attribute_rate": 0.5,
        "test_limit": None,
        "epochs": 30,
        "batch_size": 256,
        "lr": 1e-3,
        "model": "small-gpu",
        "targets": 16,
        "captions_per_target": 100,
        "backdoor_rate": 0.001,
        "trigger": "patch",
        "pool_size": 16384,
        "first_defended_epoch": 5,
        "defend_every": 2,
        "eval_limit": None,
    },
}


SCALED_FLAGS = ("pool_size", "first_defended_epoch", "defend_every", "image_aug")


def scaled_flags(preset: str | None) -> tuple[str, ...]:
    """The RoCLIP flags a scale sets for ``preset`` (None: the default preset).

    The scale's schedule suits the paper's preset at the scale's run length; the other presets
    keep their own schedule, and only the pool size and the augmentation are scaled.
    """
    return SCALED_FLAGS if preset_name(preset) == "paper" else ("pool_size", "image_aug")


# What a demo run writes into --out besides the dataset cache (data/): a rerun replaces these
# together, and a failed rerun puts the previous ones back (see roclip_kit.outputs.keeping).
RESULT_ENTRIES = ("poisoned", "runs", RESULTS_FILE, PLOT_FILE)
OUT_ENTRIES = ("data", *RESULT_ENTRIES)
DATASETS = ("mnist", "fashion-mnist", "digits")
TRIGGER_KINDS = ("patch", "blend", "wanet")


def scale_text(key: str, default: Any = None) -> str:
    """A size's value at every scale, as the help shows it, read from the scale tables.

    ``cpu 4096, gpu 4096; --trainer openclip: cpu 2048, gpu 16384``. A table without ``key``
    leaves ``default`` (the value that runs then), or omits the scale when there is none.
    """

    def one(table: Mapping[str, Any]) -> str | None:
        value = table.get(key, default)
        if value is None and key not in table:
            return None
        if isinstance(value, list):
            value = ",".join(map(str, value))
        return "all" if value is None else str(value)

    parts = []
    for label, tables in (("", SCALES), ("--trainer openclip: ", OPENCLIP_SCALES)):
        cells = [f"{scale} {text}" for scale, t in tables.items() if (text := one(t)) is not None]
        if cells:
            parts.append(label + ", ".join(cells))
    return "; ".join(parts)


@dataclass
class DemoSettings:
    """Everything the demo does; ``scale`` (of the ``trainer``) fills the fields left as None."""

    out: Path = Path("roclip-demo")
    dataset: str = "mnist"
    scale: str = "cpu"
    trainer: str = "tensor"
    device: str = "cpu"
    seed: int = 0
    train_limit: int | None = None
    test_limit: int | None = None
    attribute_rate: float | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    model: str | None = None
    targets: int | None = None
    captions_per_target: int | list[int] | None = None
    backdoor_rate: float | None = None
    backdoor_class: str | None = None
    trigger: str | None = None
    eval_limit: int | None = None
    jobs: int | None = None
    roclip_flags: dict[str, Any] = field(default_factory=dict)

    def scale_table(self) -> dict[str, Any]:
        """The sizes of ``scale`` for ``trainer``."""
        if self.trainer not in TRAINERS:
            raise ValueError(f"--trainer {self.trainer!r}: choose one of {', '.join(TRAINERS)}")
        scales = SCALES if self.trainer == "tensor" else OPENCLIP_SCALES
        if self.scale not in scales:
            raise ValueError(f"--scale {self.scale!r}: choose one of {', '.join(scales)}")
        return scales[self.scale]

    def check(self) -> DemoSettings:
        """Refuse any bad setting, naming its flag, before anything is written; returns self.

        Sizes are refused, not rewritten: ``--epochs 0`` trained one epoch and
        ``--batch-size 0`` trained at batch size 1 before.
        """
        from roclip_plugin.io import check_output_dir
        from roclip_plugin.validation import check_count, check_device, check_real

        self.scale_table()
        check_output_dir(self.out, "--out")
        _check_choice("--dataset", self.dataset, DATASETS)
        if self.trigger is not None:  # None: the scale's
            _check_choice("--trigger", self.trigger, TRIGGER_KINDS)
        check_device(self.device)
        check_count("--seed", self.seed, low=0, optional=False)
        for flag, low in (
            ("--train-limit", 1),
            ("--test-limit", 1),
            ("--epochs", 1),
            ("--batch-size", 1),
            ("--targets", 0),
            ("--eval-limit", 1),
            ("--jobs", 1),
        ):
            check_count(flag, getattr(self, flag[2:].replace("-", "_")), low=low)
        check_real("--lr", self.lr, 0.0, 10.0, low_open=True, optional=True)
        check_real("--attribute-rate", self.attribute_rate, 0.0, 1.0, optional=True)
        check_real("--backdoor-rate", self.backdoor_rate, 0.0, 1.0, high_open=True, optional=True)
        counts = self.captions_per_target
        if counts is not None:
            listed = counts if isinstance(counts, list) else [counts]
            if not listed or any(
                isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in listed
            ):
                raise ValueError(
                    f"--captions-per-target {counts!r}: every count must be an integer >= 1"
                )
        if self.backdoor_class is not None:
            _check_choice("--backdoor-class", self.backdoor_class, _class_names(self.dataset))
        if self.model is not None:
            _check_model(self.model, self.trainer)
        if self.jobs is not None and self.jobs > 1 and self.trainer != "tensor":
            raise ValueError(  # it was ignored: the OpenCLIP runs go one after another
                f"--jobs {self.jobs}: --trainer {self.trainer} trains one run at a time; drop "
                "--jobs, or use --trainer tensor to train the runs side by side"
            )
        if self.scale == "gpu" and not str(self.device).startswith("cuda"):
            raise ValueError(
                f"--scale gpu trains a larger ViT sized for a GPU, hours on --device "
                f"{self.device}; add --device cuda, or use --scale cpu"
            )
        return self

    def train_settings(self, threads: int | None = None) -> Any:
        """The tensor path's training settings of these (resolved) settings.

        The one place a demo, benchmark or scan run gets its recipe (epochs, batch, learning
        rate, seed, device, model), so the three cannot drift apart.
        """
        from roclip_kit.train.tensor import TensorTrainSettings

        return TensorTrainSettings(
            epochs=int(self.epochs or 1),
            batch_size=int(self.batch_size or 1),
            lr=float(self.lr or 1e-3),
            seed=self.seed,
            device=self.device,
            preset=str(self.model),
            threads=threads,
        )

    def resolved(self) -> DemoSettings:
        """A copy with every size taken from the scale where not given."""
        defaults = self.scale_table()
        values = {
            key: defaults[key]
            for key in defaults
            if key in self.__dataclass_fields__ and getattr(self, key) is None
        }
        own = renamed_keys(self.roclip_flags)  # old names warn, and meet the scaled new ones
        scaled = scaled_flags(own.get("preset"))
        flags = {key: defaults[key] for key in scaled if key in defaults and key not in own}
        return replace(self, **values, roclip_flags={**flags, **own})


def _check_choice(flag: str, value: Any, choices: Any) -> None:
    if value not in choices:
        raise ValueError(f"{flag} {value!r}: choose one of {', '.join(choices)}")


def _class_names(dataset: str) -> list[str]:
    """Class names of a source without loading its images (the backdoor class is one)."""
    from roclip_kit.data.captions import _digit_vocabulary, _fashion_vocabulary

    vocabulary = _fashion_vocabulary() if dataset == "fashion-mnist" else _digit_vocabulary()
    return vocabulary.classes


def _check_model(model: str, trainer: str) -> None:
    """A model preset of the trainer (the tensor path's or roclip_kit.train.openclip's)."""
    if trainer == "tensor":
        from roclip_kit.train.tensor import TENSOR_PRESETS as presets
    else:
        from roclip_kit.train.openclip import PRESETS as presets
    if model not in presets:
        raise ValueError(
            f"--model {model!r} is not a model preset of --trainer {trainer}; choose one of "
            f"{', '.join(presets)}"
        )


def defense_verb(roclip_flags: Mapping[str, Any] | None) -> str:
    """What RoCLIP did in its defended epochs, as the table and the plot say it.

    ``matched`` for the paper's matching (risky pairs re-paired with pool captions), ``defended``
    for every other action (the default drops the risky pairs): a reader of the robust default's
    output must not be told its images were matched.
    """
    flags = dict(roclip_flags or {})
    try:
        action = RoClipConfig.from_preset(flags.pop("preset", "default"), **flags).match_action
    except (TypeError, ValueError):  # a results file of another version: say what it did
        return "defended"
    return "matched" if action == "match" else "defended"
