"""RoCLIP configuration: one validated dataclass whose fields map one-to-one to CLI flags.

Every integration (OpenCLIP, a generic loop, the ``roclip`` command) exposes the same options,
so a field ``pool_size`` is always the flag ``--roclip-pool-size``. Two presets exist:
``default`` fixes the flaws of the authors' code (see docs/config.md), ``reference``
reproduces their semantics exactly so the two can be compared.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from roclip_plugin import config_aliases as aliases
from roclip_plugin.validation import as_integer, check_real

FLAG_PREFIX = "--roclip-"
PRESETS = ("default", "paper", "reference", "safeclip", "robust")
SCHEDULES = ("periodic", "ramp", "adaptive")
POOL_UPDATES = ("every_step", "defended_epochs")
PRECISIONS = ("fp32", "bf16")
MATCHERS = ("torch", "faiss", "faiss-ivf")
MATCH_ACTIONS = ("match", "drop", "unimodal", "weight")
RISK_SPLITS = ("fixed", "gmm")
DUPLICATE_MATCHES = ("mask", "keep")
# drop and unimodal: whether a risky pair leaves the batch or stays a negative of the others
RISKY_NEGATIVES = ("out", "keep")
AUG_REFRESH = ("epoch", "run")
SYNONYM_SOURCES = ("auto", "nltk", "wordnet", "table", "off")
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class Ints:
    """A field's integer range ``[low, high]``; ``high`` may name the field that bounds it."""

    low: int
    high: int | str = _INT32_MAX

    def bounds(self, config: Any) -> tuple[int, int]:
        """``(low, high)`` for ``config`` (a named ``high`` read from it)."""
        high = getattr(config, self.high) if isinstance(self.high, str) else self.high
        return self.low, high


@dataclass(frozen=True)
class Reals:
    """A field's interval of finite numbers, each end closed unless said open."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False


@dataclass(frozen=True)
class Registered:
    """A field naming something a registry holds (checked when the registry is built)."""


Allowed = Ints | Reals | Registered


def _meta(
    help_text: str, choices: Sequence[str] | None = None, allowed: Allowed | None = None
) -> dict[str, Any]:
    """A field's help and what values it allows: ``choices``, or a range or registered name.

    Declared beside the field, once: :meth:`RoClipConfig.__post_init__` checks what it says,
    the flags offer the choices, and the bad-input strategies draw outside it.
    """
    if (choices is None) == (allowed is None):
        raise TypeError("a RoClipConfig field declares either its choices or what it allows")
    return {"help": help_text, "choices": tuple(choices) if choices else None, "allowed": allowed}


@aliases.takes_old_names  # first_defended_epoch=... and the like, with a warning
@dataclass(frozen=True)
class RoClipConfig:
    """All RoCLIP settings; invalid values raise ``ValueError`` at construction.

    Epochs are 0-based everywhere (as in OpenCLIP): epoch 0 is the first epoch of training.
    """

    pool_size: int = field(
        default=21845,
        metadata=_meta(
            "Caption pool capacity in embeddings (the authors' default is 21845).", allowed=Ints(1)
        ),
    )
    defend_every: int = field(
        default=1,
        metadata=_meta(
            "Period K: a defended epoch every K epochs (or step blocks).", allowed=Ints(1)
        ),
    )
    first_defended_epoch: int | None = field(
        default=1,
        metadata=_meta(
            "0-based index of the first defended epoch; 'none' uses the authors' numbering "
            "(1-based epochs defended when epoch % K == 0, i.e. first = K-1).",
            allowed=Ints(0),
        ),
    )
    warmup_fraction: float | None = field(
        default=None,
        metadata=_meta(
            "If set, the first defended epoch is ceil(fraction * total epochs); overrides "
            "first_defended_epoch and needs the run length.",
            allowed=Reals(0.0, 1.0, high_open=True),
        ),
    )
    schedule: str = field(
        default="periodic",
        metadata=_meta(
            "periodic: every K after the warm-up; ramp: the period shrinks from K to "
            "ramp_final_every over the run; adaptive: start once in-batch retrieval accuracy "
            "reaches adaptive_threshold.",
            SCHEDULES,
        ),
    )
    ramp_final_every: int = field(
        default=1,
        metadata=_meta(
            "Defense period reached at the end of a ramp schedule.",
            allowed=Ints(1, "defend_every"),
        ),
    )
    adaptive_threshold: float = field(
        default=0.5,
        metadata=_meta(
            "Adaptive schedule: epoch-mean in-batch image-to-text retrieval accuracy that "
            "starts the defense.",
            allowed=Reals(0.0, 1.0, low_open=True),
        ),
    )
    period_steps: int = field(
        default=0,
        metadata=_meta(
            "0: the schedule counts epochs; N > 0: it counts blocks of N optimiser steps "
            "(for runs with few long epochs).",
            allowed=Ints(0),
        ),
    )
    pool_update: str = field(
        default="every_step",
        metadata=_meta(
            "every_step keeps the pool fresh; defended_epochs reproduces the authors' code.",
            POOL_UPDATES,
        ),
    )
    match_fraction: float = field(
        default=0.1,
        metadata=_meta(
            "Share of a defended step's pairs judged risky and acted on "
            "(match_action): 1 with match (the paper) re-pairs every image with its nearest "
            "pool caption; below 1, the riskiest pairs of the global batch by risk_score, the "
            "rest keep their own caption. With the gmm split: the largest risky share.",
            allowed=Reals(0.0, 1.0, low_open=True),
        ),
    )
    match_action: str = field(
        default="drop",
        metadata=_meta(
            "What a defended step does with the pairs judged risky: match pairs their images "
            "with their nearest pool caption (RoCLIP); drop leaves them out of the step's "
            "CLIP loss; unimodal trains them with image-image and caption-caption "
            "nearest-neighbour terms only (SafeCLIP); weight scales their CLIP terms by "
            "risk_weight.",
            MATCH_ACTIONS,
        ),
    )
    risk_score: str = field(
        default="history",
        metadata=_meta(
            "How risky each pair is, by registered name: margin (nearest pool caption's fit "
            "minus the own caption's), cosine (the pair's own cosine, low is risky), history "
            "(per-sample memory of the within-batch z-scored own cosine, needs sample ids), "
            "density (closeness of the image to its k-th nearest recent image), or a "
            "plugin's.",
            allowed=Registered(),
        ),
    )
    risk_split: str = field(
        default="fixed",
        metadata=_meta(
            "Which pairs are risky: fixed (the match_fraction riskiest of the global batch) "
            "or gmm (a two-component Gaussian mixture over the running risks: risky where "
            "the posterior of the low-risk component is below gmm_threshold; at most "
            "match_fraction of a batch).",
            RISK_SPLITS,
        ),
    )
    risky_negatives: str = field(
        default="out",
        metadata=_meta(
            "match_action drop and unimodal: out leaves a risky pair out of the step's CLIP "
            "loss altogether, as if it were not in the batch; keep leaves out only its own "
            "image-caption link, and its image and caption stay negatives of the other "
            "pairs.",
            RISKY_NEGATIVES,
        ),
    )
    risk_weight: float = field(
        default=0.1,
        metadata=_meta(
            "match_action weight: the weight of a risky pair's CLIP terms.",
            allowed=Reals(0.0, 1.0, high_open=True),
        ),
    )
    history_slots: int = field(
        default=0,
        metadata=_meta(
            "Per-sample history table size (2 bytes a slot, slot = sample id mod slots); 0: "
            "one per training row where the trainer says how many, else 1048576.",
            allowed=Ints(0, 2**40),
        ),
    )
    history_decay: float = field(
        default=0.5,
        metadata=_meta(
            "Per-sample history: weight of the newest visit in the moving average.",
            allowed=Reals(0.0, 1.0, low_open=True),
        ),
    )
    density_k: int = field(
        default=16,
        metadata=_meta("density risk score: the neighbour whose distance counts.", allowed=Ints(1)),
    )
    image_bank_size: int = field(
        default=4096,
        metadata=_meta(
            "Recent image embeddings kept for the density score and the unimodal terms.",
            allowed=Ints(1),
        ),
    )
    gmm_threshold: float = field(
        default=0.9,
        metadata=_meta(
            "gmm split: posterior of the low-risk component from which a pair is safe.",
            allowed=Reals(0.0, 1.0, low_open=True),
        ),
    )
    gmm_window: int = field(
        default=16384,
        metadata=_meta(
            "gmm split: the latest risks (pairs) the mixture is fitted to.", allowed=Ints(4)
        ),
    )
    safe_share_start: float = field(
        default=0.0,
        metadata=_meta(
            "gmm split: smallest safe share of a batch in the first defended epoch.",
            allowed=Reals(0.0, 1.0),
        ),
    )
    safe_share_growth: float = field(
        default=0.0,
        metadata=_meta(
            "gmm split: added to the smallest safe share each defended epoch.",
            allowed=Reals(0.0, 1.0),
        ),
    )
    unimodal_warmup_epochs: int = field(
        default=0,
        metadata=_meta(
            "Epochs at the start trained with the unimodal terms only (SafeCLIP's warm-up): "
            "nothing is linked across modalities before risk can be judged.",
            allowed=Ints(0),
        ),
    )
    duplicate_matches: str = field(
        default="keep",
        metadata=_meta(
            "Images of one defended step matched to the same pool caption: keep (the authors' "
            "code, and what the robustness benchmark measured) leaves it a negative of the "
            "others too, so under the sigmoid loss the pair is labelled both ways; mask makes "
            "it the positive of each of them and a negative of none (advised with --siglip).",
            DUPLICATE_MATCHES,
        ),
    )
    precision: str = field(
        default="fp32",
        metadata=_meta(
            "Similarity search precision, whatever the trainer's autocast: fp32, or a bf16 "
            "scan with fp32 re-scoring of every candidate an error bound keeps. Either returns "
            "a row within float32 rounding of the best score; rows closer than that may "
            "come back in either order.",
            PRECISIONS,
        ),
    )
    matcher: str = field(
        default="torch",
        metadata=_meta(
            "Nearest-caption backend: torch (exact, on the pool's device), faiss (exact, "
            "CPU), faiss-ivf (approximate, CPU, for pools beyond device memory).",
            MATCHERS,
        ),
    )
    match_chunk_size: int = field(
        default=0,
        metadata=_meta(
            "Pool rows scored per chunk; 0 picks a size bounded by ~256 MiB.", allowed=Ints(0)
        ),
    )
    ivf_nlist: int = field(
        default=1024, metadata=_meta("faiss-ivf: number of inverted lists.", allowed=Ints(1))
    )
    ivf_nprobe: int = field(
        default=32, metadata=_meta("faiss-ivf: lists visited per query.", allowed=Ints(1))
    )
    seed: int = field(
        default=0,
        metadata=_meta("Seed for the defense's own randomness.", allowed=Ints(0, 2**63 - 1)),
    )
    suspicious_margin: float = field(
        default=0.2,
        metadata=_meta(
            "Reports: a pair is a poison candidate when its matched caption is this much more "
            "similar (cosine) to the image than its own caption.",
            allowed=Reals(0.0, 2.0),
        ),
    )
    image_aug: str = field(
        default="roclip",
        metadata=_meta(
            "Image augmentation, by registered name: roclip (the authors' resized crop, flip, "
            "colour jitter, grayscale and blur, before the model's preprocessing), none, or a "
            "plugin's.",
            allowed=Registered(),
        ),
    )
    text_aug: str = field(
        default="none",
        metadata=_meta(
            "Text augmentation, by registered name: none (the default: on short captions EDA "
            "often edits the class word itself, docs/results.md), eda (one of synonym "
            "replacement, random insertion, swap or deletion per caption; the paper and "
            "safeclip presets), or a plugin's.",
            allowed=Registered(),
        ),
    )
    image_aug_refresh: str = field(
        default="epoch",
        metadata=_meta(
            "epoch: a sample's image augmentation is drawn anew each epoch (as in the authors' "
            "code); run: the same all run. Reproducible per (seed, epoch, sample) either way.",
            AUG_REFRESH,
        ),
    )
    image_aug_stop_epoch: int | None = field(
        default=None,
        metadata=_meta(
            "0-based epoch from which images are no longer augmented; none: every epoch. The "
            "last epochs then train on images as the test sees them, while the defense goes on "
            "judging every pair (the augmentation's clean-accuracy cost, docs/augmentation.md).",
            allowed=Ints(0),
        ),
    )
    image_aug_stop_fraction: float | None = field(
        default=None,
        metadata=_meta(
            "If set, images are no longer augmented from epoch ceil(fraction * total epochs); "
            "overrides image_aug_stop_epoch and needs the run length (without it every epoch "
            "is augmented, with a warning).",
            allowed=Reals(0.0, 1.0, low_open=True),
        ),
    )
    text_aug_refresh: str = field(
        default="epoch",
        metadata=_meta(
            "epoch: a caption's augmentation is drawn anew each epoch; run: the same all run "
            "(the authors' code augments captions once).",
            AUG_REFRESH,
        ),
    )
    eda_alpha: float = field(
        default=0.1,
        metadata=_meta(
            "EDA: synonym replacement, insertion and swap change max(1, int(alpha * words)) "
            "of the caption's words.",
            allowed=Reals(0.0, 1.0),
        ),
    )
    eda_p: float = field(
        default=0.1,
        metadata=_meta(
            "EDA: random deletion drops each word with this probability.", allowed=Reals(0.0, 1.0)
        ),
    )
    eda_synonyms: str = field(
        default="auto",
        metadata=_meta(
            "EDA's WordNet source: auto (nltk, else wordnet, else table), nltk (NLTK's corpus), "
            "wordnet (database files, e.g. Debian's wordnet-base), table (the reduced table "
            "shipped), off (no synonym operations).",
            SYNONYM_SOURCES,
        ),
    )

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_field(self, f)
        _check_together(self)

    # -- presets ---------------------------------------------------------------------------

    @classmethod
    def from_preset(cls, name: str = "default", **overrides: Any) -> RoClipConfig:
        """Build a preset (:data:`PRESET_FIELDS`), then apply ``overrides`` (field -> value)."""
        if name not in PRESETS:
            raise ValueError(
                f"--roclip-preset / preset: unknown value {name!r}; allowed: {', '.join(PRESETS)}"
            )
        overrides = aliases.renamed_keys(overrides, known=field_names())  # old names warn
        return cls(**{**PRESET_FIELDS[name], **overrides})

    def replace(self, **changes: Any) -> RoClipConfig:
        """Return a copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **aliases.renamed_keys(changes))

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, for checkpoints and logs."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoClipConfig:
        """Inverse of :meth:`to_dict` (old keys too, with a warning); unknown keys are an error."""
        return cls.from_preset("default", **dict(data))

    # -- schedule helpers that need only the config ----------------------------------------

    def resolved_first_epoch(self, total_epochs: int | None = None) -> int:
        """Index of the first defended epoch (or step block) for a run of ``total_epochs``."""
        if self.warmup_fraction is not None:
            if total_epochs is None:
                raise ValueError(
                    "--roclip-warmup-fraction needs the run length: pass total_epochs "
                    "(or use --roclip-first-defended-epoch instead)"
                )
            return epoch_at_fraction(self.warmup_fraction, total_epochs)
        if self.first_defended_epoch is None:
            return self.defend_every - 1
        return self.first_defended_epoch

    def resolved_image_aug_stop(self, total_epochs: int | None = None) -> int | None:
        """The epoch from which images pass unaugmented (None: never), for ``total_epochs``.

        A fraction without the run length resolves to None (augment every epoch): the caller
        warns, rather than refusing a run that only loses the clean-accuracy gain.
        """
        if self.image_aug_stop_fraction is None:
            return self.image_aug_stop_epoch
        if total_epochs is None:
            return None
        return epoch_at_fraction(self.image_aug_stop_fraction, total_epochs)


def epoch_at_fraction(fraction: float, total_epochs: int) -> int:
    """``ceil(fraction * total_epochs)``, the first epoch at or past that share of the run.

    Rounded first: 0.07 * 100 is 7.000000000000001 in binary floating point, which a bare
    ``ceil`` would make epoch 8.
    """
    return math.ceil(round(fraction * total_epochs, 9))


# -- presets ----------------------------------------------------------------------------------

# The paper's method (RoCLIP, NeurIPS 2023) with this project's fixes: full matching every 2
# epochs after a warm-up, the pool updated every step (docs/config.md).
PAPER: dict[str, Any] = {
    "text_aug": "eda",
    "first_defended_epoch": 5,
    "defend_every": 2,
    "schedule": "periodic",
    "pool_update": "every_step",
    "match_fraction": 1.0,
    "match_action": "match",
    "risk_score": "margin",
    "risk_split": "fixed",
    "unimodal_warmup_epochs": 0,
}
# The authors' code exactly: 1-based epochs matching when epoch % K == 0, the pool updated in
# defended (here: matching) epochs only, captions augmented once.
REFERENCE: dict[str, Any] = {
    **PAPER,
    "first_defended_epoch": None,
    "warmup_fraction": None,
    "pool_update": "defended_epochs",
    "duplicate_matches": "keep",
    "text_aug_refresh": "run",
}
# SafeCLIP (Yang et al., ICML 2024) as its code runs it: a unimodal warm-up (5 epochs of 32),
# then every epoch a Gaussian mixture over the pairs' own cosine; the risky pairs train with
# the unimodal terms only; the safe share grows by 1% an epoch from its floor.
SAFECLIP: dict[str, Any] = {
    **PAPER,
    "first_defended_epoch": 0,
    "defend_every": 1,
    "unimodal_warmup_epochs": 5,
    "risk_score": "cosine",
    "risk_split": "gmm",
    "gmm_threshold": 0.9,
    "match_action": "unimodal",
    "match_fraction": 1.0,
    "safe_share_start": 0.1,
    "safe_share_growth": 0.01,
}
# What the robustness benchmark picked (docs/results.md): from the second epoch on, leave out
# of each step's loss the tenth of the batch with the worst per-sample history of fit; images
# augmented, captions not (EDA removed or replaced the class word of 8-9% of the benchmark's
# captions per draw, and measured no better on any attack, docs/results.md).
ROBUST: dict[str, Any] = {
    **PAPER,
    "text_aug": "none",
    "first_defended_epoch": 1,
    "defend_every": 1,
    "risk_score": "history",
    "risk_split": "fixed",
    "match_action": "drop",
    "match_fraction": 0.1,
}
DEFAULT_PRESET = "robust"
PRESET_FIELDS: dict[str, dict[str, Any]] = {
    "paper": PAPER,
    "reference": REFERENCE,
    "safeclip": SAFECLIP,
    "robust": ROBUST,
}
PRESET_FIELDS["default"] = PRESET_FIELDS[DEFAULT_PRESET]


def preset_name(name: str | None) -> str:
    """The preset a name stands for: ``default`` (or None) is :data:`DEFAULT_PRESET`."""
    return DEFAULT_PRESET if name in (None, "default") else str(name)


# -- validation helpers ---------------------------------------------------------------------


def _fail(name: str, value: Any, allowed: str) -> None:
    flag = flag_name(name)
    raise ValueError(f"{name} ({flag}): invalid value {value!r}; allowed: {allowed}")


def _check_field(cfg: RoClipConfig, f: dataclasses.Field[Any]) -> None:
    """The check the field's metadata declares (``None`` passes where the type allows it)."""
    if getattr(cfg, f.name) is None and "None" in str(f.type):
        return
    allowed = f.metadata["allowed"]
    if f.metadata["choices"]:
        _check_choice(cfg, f.name, f.metadata["choices"])
    elif isinstance(allowed, Ints):
        low, high = allowed.bounds(cfg)
        _check_int(cfg, f.name, low=low, high=high)
    elif isinstance(allowed, Reals):
        bounds = {"low_open": allowed.low_open, "high_open": allowed.high_open}
        _check_float(cfg, f.name, low=allowed.low, high=allowed.high, **bounds)
    else:
        _check_name(cfg, f.name)


def _check_together(cfg: RoClipConfig) -> None:
    """The rules that tie fields together (each field's own range is checked before)."""
    if cfg.match_action != "match" and cfg.risk_split == "fixed" and cfg.match_fraction >= 1:
        raise ValueError(
            f"match_action (--roclip-match-action) {cfg.match_action} with the fixed split "
            "acts on the match_fraction riskiest pairs: with match_fraction 1 every pair "
            "would be risky; set --roclip-match-fraction below 1"
        )
    if cfg.risk_score == "density" and cfg.density_k > cfg.image_bank_size:
        _fail("density_k", cfg.density_k, f"at most image_bank_size ({cfg.image_bank_size})")


def _check_int(cfg: RoClipConfig, name: str, *, low: int, high: int) -> None:
    """An integer of any kind (NumPy, 0-d tensor) in range, stored as a Python ``int``."""
    value = getattr(cfg, name)
    number = as_integer(value)
    if number is None or not low <= number <= high:
        _fail(name, value, f"an integer in [{low}, {high}]")
    object.__setattr__(cfg, name, number)  # plain Python in to_dict(), flags and checkpoints


def _check_float(
    cfg: RoClipConfig,
    name: str,
    *,
    low: float,
    high: float,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    label = f"{name} ({flag_name(name)})"  # the message _fail gives every other field
    bounds = {"low_open": low_open, "high_open": high_open}
    number = check_real(label, getattr(cfg, name), low, high, **bounds)
    object.__setattr__(cfg, name, number)


def _check_choice(cfg: RoClipConfig, name: str, choices: Sequence[str]) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        _fail(name, value, ", ".join(choices))


def _check_name(cfg: RoClipConfig, name: str) -> None:
    """A registry name; whether it is registered is checked when the policy is built."""
    value = getattr(cfg, name)
    if not isinstance(value, str) or not value.strip():
        _fail(name, value, "a non-empty registered name (see docs/augmentation.md)")


# -- CLI mapping ------------------------------------------------------------------------------


def field_names() -> list[str]:
    """Names of all configuration fields, in declaration order."""
    return [f.name for f in fields(RoClipConfig)]


def flag_name(field_name: str) -> str:
    """``pool_size`` -> ``--roclip-pool-size``."""
    return FLAG_PREFIX + field_name.replace("_", "-")


def field_from_flag(flag: str) -> str:
    """``--roclip-pool-size`` -> ``pool_size``; raises ``ValueError`` for foreign flags."""
    if not flag.startswith(FLAG_PREFIX):
        raise ValueError(f"{flag!r} is not a RoCLIP flag (they start with {FLAG_PREFIX!r})")
    name = flag[len(FLAG_PREFIX) :].replace("-", "_")
    name = aliases.renamed_flag_field(name, flag)
    if name not in field_names():
        raise ValueError(f"unknown RoCLIP flag {flag!r}; known: {', '.join(all_flags())}")
    return name


def all_flags() -> list[str]:
    """Every configuration flag, in field order."""
    return [flag_name(n) for n in field_names()]


def _optional(convert: Any, what: str) -> Any:
    """The argparse type of ``int | None`` or ``float | None`` fields: ``none`` or a number.

    Its message is the end of argparse's error line, so it says what was expected instead of
    argparse's "invalid <function name> value".
    """

    def parse(text: str) -> Any:
        if text.strip().lower() == "none":
            return None
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what} or 'none', got {text!r}") from None

    return parse


_optional_int = _optional(int, "an integer")
_optional_float = _optional(float, "a number")


def _argparse_type(f: dataclasses.Field[Any]) -> Any:
    kind = str(f.type)
    if "None" in kind:
        return _optional_int if kind.startswith("int") else _optional_float
    return {"int": int, "float": float, "str": str}[kind]


def add_argparse_args(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    defaults: Mapping[str, Any] | None = None,
    default_text: Mapping[str, str] | None = None,
) -> None:
    """Add ``--roclip-preset`` and one flag per field to ``parser``.

    Flags that are not given leave no attribute (``argparse.SUPPRESS``), so that
    :func:`config_from_namespace` applies the preset first and only the explicit flags on top
    (``--roclip-first-defended-epoch none`` is an explicit ``None``).

    Args:
        parser: the parser or argument group to add the flags to.
        defaults: a command's own defaults (field -> value), shown in the help; pass the same
            mapping to :func:`config_from_namespace` so the help shows what runs.
        default_text: what the help says instead for fields whose default is decided later
            (e.g. by the demo's ``--scale``).
    """
    parser.add_argument(
        FLAG_PREFIX + "preset",
        dest="roclip_preset",
        default="default",
        choices=PRESETS,
        help="Starting point for the settings below (default: default).",
    )
    base = RoClipConfig()
    for f in fields(RoClipConfig):
        meta = f.metadata
        shown = default_help(f.name, base, defaults, default_text)
        parser.add_argument(
            flag_name(f.name),
            dest="roclip_" + f.name,
            type=aliases.value_type(f.name, _argparse_type(f)),
            choices=meta.get("choices"),
            default=argparse.SUPPRESS,
            help=f"{meta['help']} (default: {shown})".replace("%", "%%"),  # argparse formats %
        )
    aliases.add_old_flags(parser, {f.name: _argparse_type(f) for f in fields(RoClipConfig)})


def default_help(
    name: str,
    base: RoClipConfig | None = None,
    defaults: Mapping[str, Any] | None = None,
    default_text: Mapping[str, str] | None = None,
) -> str:
    """The default of field ``name`` as a flag's help shows it (see :func:`add_argparse_args`)."""
    if default_text and name in default_text:
        return default_text[name]
    if defaults and name in defaults:
        return _shown(defaults[name])
    return _shown(getattr(base or RoClipConfig(), name))


def _shown(value: Any) -> str:
    return "none" if value is None else str(value)


def config_from_namespace(
    namespace: argparse.Namespace, defaults: Mapping[str, Any] | None = None
) -> RoClipConfig:
    """Build the config from parsed flags.

    The preset first, then the command's own ``defaults`` (those its help shows), then every
    flag that was given.
    """
    preset = getattr(namespace, "roclip_preset", "default") or "default"
    given = {
        name: getattr(namespace, "roclip_" + name)
        for name in field_names()
        if hasattr(namespace, "roclip_" + name)
    }
    return RoClipConfig.from_preset(preset, **{**aliases.renamed_keys(defaults or {}), **given})


def config_to_argv(config: RoClipConfig) -> list[str]:
    """Flags that rebuild ``config`` from the default preset (for launching subprocesses)."""
    argv: list[str] = []
    for name, value in config.to_dict().items():
        argv += [flag_name(name), "none" if value is None else str(value)]
    return argv
