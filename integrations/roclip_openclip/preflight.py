"""Checks of OpenCLIP's own flags that ``--roclip`` runs make before OpenCLIP starts.

OpenCLIP trusts its flags: a missing ``--train-data`` file ends in a ``FileNotFoundError``
traceback after the model is built, ``--epochs 0`` or a batch larger than the data set trains
nothing and says nothing, ``--lr -1`` trains backwards. These checks read only the parsed
flags, the file system and OpenCLIP's model registry (nothing is downloaded), so a bad value
fails in a second with one line naming the flag; every function raises ``ValueError``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import difflib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from roclip_openclip.openclip_api import GET_MODEL_CONFIG, LIST_MODELS, PARSE_KWARGS_CALL
from roclip_plugin.distributed import launch_world_size
from roclip_plugin.validation import check_device

REMOTE_PREFIXES = ("hf-hub:",)
LOCAL_PREFIX = "local-dir:"


def check_openclip_values(args: Any) -> None:
    """Every check of this module, in flag order; the first failure raises ``ValueError``."""
    check_device_flag(args)
    check_counts(args)
    check_learning_rate(args)
    check_model_name(args)
    check_train_data(args)


def check_device_flag(args: Any) -> None:
    """``--device`` must be a torch device this machine has (OpenCLIP's default is cuda).

    OpenCLIP hands the text to ``torch.device``: ``--device 0`` or ``--device gpu`` ended in
    torch's ``RuntimeError`` traceback, and ``cuda`` without a GPU fell back to the CPU with a
    warning lost in the log. Refused here, with the fix (``--device cpu``).
    """
    check_device(str(getattr(args, "device", "cuda")), "--device")


def check_finite_numbers(parser: argparse.ArgumentParser, args: Any) -> None:
    """Every number flag of OpenCLIP's ``parser`` must be finite (``--wd nan`` trained on NaN).

    Read from the parser, so a float flag OpenCLIP adds later is checked too.
    """
    for action in parser._actions:
        if action.type is not float or not action.option_strings:
            continue
        value = getattr(args, action.dest, None)
        values = value if isinstance(value, list | tuple) else [value]
        for number in values:
            if isinstance(number, float) and not math.isfinite(number):
                flag = action.option_strings[-1]
                raise ValueError(f"{flag} {number}: must be a finite number")


@contextlib.contextmanager
def strict_aug_cfg() -> Iterator[None]:
    """While OpenCLIP parses, refuse ``--aug-cfg`` words that are not ``KEY=VALUE``.

    OpenCLIP's ``ParseKwargs`` unpacks ``value.split('=')`` into two names, so ``--aug-cfg
    word`` (or ``a=b=c``) ended in a ``ValueError`` traceback from inside argparse. An
    ``argparse.ArgumentError`` raised there instead becomes argparse's own one-line usage
    error naming the flag (exit 2).
    """
    original = PARSE_KWARGS_CALL.get()

    def checked(
        self: argparse.Action,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        for word in values or ():
            key, sep, rest = str(word).partition("=")
            if not sep or not key or "=" in rest:
                raise argparse.ArgumentError(
                    self,
                    f"expected KEY=VALUE words (e.g. --aug-cfg scale='(0.9,1.0)'), got {word!r}",
                )
        original(self, parser, namespace, values, option_string)

    with PARSE_KWARGS_CALL.replaced(checked):
        yield


def check_counts(args: Any) -> None:
    """Integer flags OpenCLIP accepts at any value although only some make a run."""
    limits = (
        ("--epochs", "epochs", 1),
        ("--batch-size", "batch_size", 1),
        ("--workers", "workers", 0),
        ("--warmup", "warmup", 0),
        ("--accum-freq", "accum_freq", 1),
        ("--train-num-samples", "train_num_samples", 1),
        ("--val-num-samples", "val_num_samples", 1),
    )
    for flag, dest, low in limits:
        value = getattr(args, dest, None)
        if value is not None and value < low:
            raise ValueError(f"{flag} {value}: must be an integer >= {low}")


def check_learning_rate(args: Any) -> None:
    """``--lr`` must be a finite number > 0 (None: OpenCLIP's default for the model)."""
    lr = getattr(args, "lr", None)
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"--lr {lr}: must be a finite number > 0 (e.g. --lr 5e-4)")


def check_model_name(args: Any) -> None:
    """``--model`` must name a built-in config or an existing ``local-dir:`` folder.

    ``hf-hub:`` names are left to OpenCLIP (checking them would need the network).
    """
    name = str(getattr(args, "model", "") or "")
    if name.startswith(REMOTE_PREFIXES):
        return
    if name.startswith(LOCAL_PREFIX):
        folder = Path(name[len(LOCAL_PREFIX) :])
        if not (folder / "open_clip_config.json").is_file():
            raise ValueError(
                f"--model {name}: {folder} holds no open_clip_config.json; give the folder of "
                "a model saved for OpenCLIP"
            )
        return
    known = LIST_MODELS.get()()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(
            f"--model {name!r} is not an OpenCLIP model{hint}; open_clip.list_models() lists them"
        )


def embed_dim(args: Any) -> int | None:
    """The embedding width of ``--model`` from its config (None when it cannot be read)."""
    name = str(getattr(args, "model", "") or "")
    config: dict[str, Any] | None = None
    if name.startswith(LOCAL_PREFIX):
        path = Path(name[len(LOCAL_PREFIX) :]) / "open_clip_config.json"
        try:
            config = json.loads(path.read_text()).get("model_cfg")
        except (OSError, ValueError, AttributeError):
            return None
    elif not name.startswith(REMOTE_PREFIXES):
        config = GET_MODEL_CONFIG.get()(name)
    dim = (config or {}).get("embed_dim")
    return int(dim) if isinstance(dim, int) and dim > 0 else None


def is_csv(args: Any) -> bool:
    """Whether OpenCLIP reads ``--train-data`` as a CSV (its ``auto`` rule: the extension)."""
    kind = getattr(args, "dataset_type", "auto")
    data = str(getattr(args, "train_data", "") or "")
    return kind == "csv" or (kind == "auto" and data.rsplit(".", 1)[-1] in ("csv", "tsv"))


def check_train_data(args: Any) -> None:
    """A CSV ``--train-data`` must be a readable file with at least one batch of rows.

    OpenCLIP drops the last incomplete batch of training data, so fewer rows than
    ``--batch-size`` per process train nothing. Rows are counted as lines (cheap; a caption
    with a quoted line break would count twice, which errs towards accepting).
    """
    if not getattr(args, "train_data", None) or not is_csv(args):
        return
    path = Path(args.train_data)
    if path.is_dir():
        raise ValueError(f"--train-data {path} is a directory; give the CSV file")
    if not path.is_file():
        raise ValueError(f"--train-data {path} does not exist; give the training CSV")
    try:
        with path.open("rb") as fh:
            rows = max(sum(1 for line in fh if line.strip()) - 1, 0)
    except OSError as err:
        raise ValueError(
            f"--train-data {path} cannot be read ({err.strerror or err}); check its permissions"
        ) from None
    check_columns(args, path)
    world = launch_world_size()
    per_process = rows // world
    if per_process < args.batch_size:
        where = f" per process ({world} processes)" if world > 1 else ""
        raise ValueError(
            f"--batch-size {args.batch_size} is larger than the {per_process} rows of "
            f"--train-data {path}{where}: OpenCLIP drops the incomplete batch and would train "
            f"on nothing; lower --batch-size to at most {max(per_process, 1)}"
        )


def check_columns(args: Any, path: Path) -> None:
    """The CSV's header must hold ``--csv-img-key`` and ``--csv-caption-key``.

    OpenCLIP finds out only when its loader is built, in a ``KeyError`` traceback that names
    neither flag. Read with ``--csv-separator`` as OpenCLIP reads it, so a wrong separator
    (one column holding the whole header) is caught here too, and named.
    """
    separator = str(getattr(args, "csv_separator", "\t"))
    try:
        with path.open(encoding="utf-8", errors="replace", newline="") as fh:
            header = next((line for line in fh if line.strip()), "").rstrip("\r\n")
    except OSError:
        return  # unreadable: the row count above says so
    if len(separator) == 1:
        columns = next(csv.reader([header], delimiter=separator), [])
    else:
        columns = header.split(separator)
    columns = [column.strip() for column in columns]
    for flag, dest, default in (
        ("--csv-img-key", "csv_img_key", "filepath"),
        ("--csv-caption-key", "csv_caption_key", "title"),
    ):
        key = str(getattr(args, dest, default))
        if key not in columns:
            shown = ", ".join(repr(c) for c in columns[:8]) or "none"
            raise ValueError(
                f"{flag} {key}: --train-data {path} has no column {key!r} (its columns: "
                f"{shown}); set {flag} to the right column, and check --csv-separator "
                f"{separator!r}"
            )
