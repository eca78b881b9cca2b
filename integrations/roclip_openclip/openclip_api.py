"""Every OpenCLIP name the adapter imports or patches, and the OpenCLIP releases it supports.

The adapter changes OpenCLIP's training script at run time instead of forking it, so its
whole contract with OpenCLIP is the list of names below: module paths, the functions it
replaces or wraps, the ones it calls, the classes it inspects. When OpenCLIP moves one of them
(as 4.x does, docs/openclip.md), this module and its test
(``tests/integrations/openclip/test_api.py``) say which, before any run does. It imports
nothing of the adapter, so every module of the adapter may import it.

Each name is resolved when it is used, never at import: importing the adapter imports no
OpenCLIP, and a test that replaces a name in its module sees the replacement used.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

DISTRIBUTION = "open_clip_torch"
SUPPORTED = ((2, 26), (4, 0))  # open_clip_torch versions: [2.26, 4.0)


@dataclass(frozen=True)
class OpenClipName:
    """One attribute of an OpenCLIP module (``attr`` may be ``Class.method``) and its use."""

    module: str
    attr: str
    use: str

    def owner(self) -> Any:
        """The module or class that holds the attribute (importing the module)."""
        owner: Any = importlib.import_module(self.module)
        for part in self.attr.split(".")[:-1]:
            owner = getattr(owner, part)
        return owner

    @property
    def name(self) -> str:
        """The attribute's own name in :meth:`owner` (``__getitem__`` of ``CsvDataset``)."""
        return self.attr.rsplit(".", 1)[-1]

    def get(self) -> Any:
        """The attribute as it is now (patched, while a patch is in force)."""
        return getattr(self.owner(), self.name)

    @contextlib.contextmanager
    def replaced(self, value: Any) -> Iterator[None]:
        """The attribute is ``value`` inside the block, and what it was again after it."""
        owner = self.owner()
        original = getattr(owner, self.name)
        setattr(owner, self.name, value)
        try:
            yield
        finally:
            setattr(owner, self.name, original)

    def __str__(self) -> str:
        return f"{self.module}.{self.attr}"


_MAIN = "open_clip_train.main"
_DATA = "open_clip_train.data"
_PARAMS = "open_clip_train.params"

# -- replaced or wrapped for the run (roclip_openclip.patches) ------------------------------
PARSE_ARGS = OpenClipName(_MAIN, "parse_args", "wrapped: records the --roclip-* flags")
GET_DATA = OpenClipName(_MAIN, "get_data", "wrapped: keeps the data for sizes and captions")
CREATE_LOSS = OpenClipName(_MAIN, "create_loss", "replaced: builds the RoCLIP loss")
TRAIN_ONE_EPOCH = OpenClipName(_MAIN, "train_one_epoch", "wrapped: epoch start, state, report")
EVALUATE = OpenClipName(_MAIN, "evaluate", "wrapped: the RoCLIP state beside the checkpoint")
SETUP_LOGGING = OpenClipName(_MAIN, "setup_logging", "wrapped: torch's loggers back to WARNING")
GET_DATASET_FN = OpenClipName(_DATA, "get_dataset_fn", "wrapped: augmentations, sample keys")
CSV_GETITEM = OpenClipName(_DATA, "CsvDataset.__getitem__", "wrapped: passes the row index")
WDS = OpenClipName(_DATA, "wds", "replaced while building: keeps each sample's key and caption")
PARSE_KWARGS_CALL = OpenClipName(_PARAMS, "ParseKwargs.__call__", "wrapped: strict --aug-cfg")
# -- called or read ------------------------------------------------------------------------
MAIN = OpenClipName(_MAIN, "main", "called: the training run")
PARAMS_PARSE_ARGS = OpenClipName(_PARAMS, "parse_args", "called: OpenCLIP's parser and --help")
GET_WDS_DATASET = OpenClipName(_DATA, "get_wds_dataset", "compared: the WebDataset builder")
COCA = OpenClipName("open_clip", "CoCa", "isinstance: CoCa models are refused")
LIST_MODELS = OpenClipName("open_clip", "list_models", "called: --model is a known config")
GET_MODEL_CONFIG = OpenClipName("open_clip", "get_model_config", "called: the embedding width")

NAMES = (
    PARSE_ARGS,
    GET_DATA,
    CREATE_LOSS,
    TRAIN_ONE_EPOCH,
    EVALUATE,
    SETUP_LOGGING,
    GET_DATASET_FN,
    CSV_GETITEM,
    WDS,
    PARSE_KWARGS_CALL,
    MAIN,
    PARAMS_PARSE_ARGS,
    GET_WDS_DATASET,
    COCA,
    LIST_MODELS,
    GET_MODEL_CONFIG,
)


def missing_names() -> list[str]:
    """The names of :data:`NAMES` the installed OpenCLIP lacks (empty where it is supported)."""
    missing = []
    for name in NAMES:
        try:
            name.get()
        except (ImportError, AttributeError):
            missing.append(str(name))
    return missing


def parse_version(text: str) -> tuple[int, int]:
    """``3.3.0`` -> ``(3, 3)``: the first two parts, each read from its digits alone."""
    major, minor = (
        int("".join(c for c in part if c.isdigit()) or 0) for part in text.split(".")[:2]
    )
    return major, minor


def installed_version() -> tuple[int, int] | None:
    """(major, minor) of the installed ``open_clip_torch``; None when it is not installed."""
    try:
        return parse_version(importlib.metadata.version(DISTRIBUTION))
    except importlib.metadata.PackageNotFoundError:
        return None


def is_supported(version: tuple[int, int]) -> bool:
    """Whether ``version`` lies in :data:`SUPPORTED` (low included, high excluded)."""
    low, high = SUPPORTED
    return low <= version < high
