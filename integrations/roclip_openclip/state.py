"""RoCLIP state files beside OpenCLIP's checkpoints: names, writing, finding and pruning.

OpenCLIP writes ``epoch_N.pt`` (and, with ``--save-most-recent``, replaces
``epoch_latest.pt``) after its evaluation. The adapter writes ``epoch_N.roclip``, the state after
epoch N (its number is recorded inside), just before that: after the evaluation, so the RNG
states it holds are those the next epoch starts from, and before OpenCLIP's files, so a crash
at any point leaves, for whichever checkpoint survived, the state of the same epoch. A resume
looks for the state of the epoch the checkpoint holds (``epoch_latest.pt`` at epoch N reads
``epoch_N.roclip``), never for a file that might be one epoch ahead or behind, and refuses a
state whose recorded epoch differs. The state of the previous epoch is deleted only once
OpenCLIP's next checkpoint exists and no ``epoch_N.pt`` needs it.

Remote checkpoints (``--resume s3://...``; OpenCLIP opens them with fsspec) are read through
the same file system.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from roclip_plugin.distributed import all_gather_objects, rng_state, set_rng_state
from roclip_plugin.io import atomic_torch_save, load_versioned
from roclip_plugin.validation import check_defense_state, check_state_keys

if TYPE_CHECKING:
    from roclip_plugin.defense import RoClipDefense

log = logging.getLogger("roclip")

STATE_SUFFIX = ".roclip"  # not ".pt": OpenCLIP's resume-latest globs every *.pt file
STATE_FORMAT = 2  # 2: records completed_epochs and step, written after OpenCLIP's evaluation
WHAT = "roclip-openclip state file"
SAVED_KEYS = ("completed_epochs", "step", "roclip", "rng")  # what restore reads


def state_name(completed: int) -> str:
    """File name of the state after ``completed`` epochs."""
    return f"epoch_{completed}{STATE_SUFFIX}"


def state_path_for(checkpoint: str | Path) -> Path:
    """``.../checkpoints/epoch_3.pt`` -> ``.../checkpoints/epoch_3.roclip``."""
    path = Path(checkpoint)
    return path.with_name(path.stem + STATE_SUFFIX)


def is_remote(location: str) -> bool:
    """Whether ``location`` is a URL (``s3://``, ``gs://``, ``memory://`` ...)."""
    return "://" in location


def sibling(location: str, name: str) -> str:
    """The file ``name`` in the folder of ``location`` (a local path or a URL)."""
    if is_remote(location):
        return f"{location.rsplit('/', 1)[0]}/{name}"
    return str(Path(location).with_name(name))


def state_candidates(checkpoint: str, completed: int) -> list[str]:
    """Where the state of a checkpoint at epoch ``completed`` may be, best first.

    ``epoch_<completed>.roclip`` beside it (what the adapter writes, also for
    ``epoch_latest.pt``), then ``<stem>.roclip`` (a renamed pair such as ``best.pt`` /
    ``best.roclip``).
    """
    stem = checkpoint.rsplit("/", 1)[-1].rsplit(".", 1)[0]
    found = [sibling(checkpoint, state_name(completed)), sibling(checkpoint, stem + STATE_SUFFIX)]
    return list(dict.fromkeys(found))


def read_state(location: str) -> dict[str, Any] | None:
    """The state file at ``location``, or None when there is none.

    Local paths are read directly; URLs through fsspec, as OpenCLIP reads ``--resume``.

    Raises:
        StateError: the file is empty, truncated, not a state file of this format, or lacks an
            entry (a ``ValueError``; names the file).
    """
    if not is_remote(location):
        if not Path(location).is_file():
            return None
        saved = load_versioned(location, STATE_FORMAT, WHAT)
    else:
        import fsspec

        fs, path = fsspec.core.url_to_fs(location)
        if not fs.exists(path):
            return None
        with fs.open(path, "rb") as fh:
            saved = load_versioned(fh, STATE_FORMAT, WHAT, name=location)
    return dict(check_state_keys(saved, SAVED_KEYS, f"{WHAT} {location}"))


def check_state_file(location: str, pool_size: int) -> None:
    """Refuse, before a model is built, a state file that :meth:`StateKeeper.restore` would.

    Everything restore checks but the recorded epoch (that needs the checkpoint loaded): the
    file can be read, holds every entry, and its pool fits ``--roclip-pool-size``. No file
    there passes (a checkpoint trained without ``--roclip``).

    Raises:
        StateError: with the file named and what to do.
    """
    from roclip_plugin.defense import STATE_VERSION
    from roclip_plugin.pool import check_pool_state

    saved = read_state(location)
    if saved is not None:
        state = check_defense_state(saved["roclip"], STATE_VERSION)
        check_pool_state(state["pool"], pool_size)


def write_state(folder: str | Path, completed: int, state: dict[str, Any]) -> Path:
    """Write the state after ``completed`` epochs atomically into ``folder``."""
    record = {"format": STATE_FORMAT, "completed_epochs": completed, **state}
    return atomic_torch_save(record, Path(folder) / state_name(completed))


def prune_previous(folder: str | Path, completed: int) -> None:
    """Delete the state of epoch ``completed - 1`` once nothing can resume from it.

    Called after OpenCLIP wrote its checkpoint of epoch ``completed``: from then on
    ``epoch_latest.pt`` no longer points at the previous epoch, so its state is kept only if
    OpenCLIP kept ``epoch_<completed - 1>.pt`` (``--save-frequency``, no
    ``--delete-previous-checkpoint``).
    """
    previous = completed - 1
    if previous < 1 or (Path(folder) / f"epoch_{previous}.pt").exists():
        return
    (Path(folder) / state_name(previous)).unlink(missing_ok=True)


def saves_checkpoint(completed: int, args: Any) -> bool:
    """Whether OpenCLIP writes a checkpoint after epoch ``completed`` (numbered or latest)."""
    numbered = completed == args.epochs or (
        args.save_frequency > 0 and completed % args.save_frequency == 0
    )
    return bool(numbered or args.save_most_recent)


def evaluates(data: dict[str, Any] | None) -> bool:
    """Whether OpenCLIP's ``main`` calls ``evaluate`` after each epoch (its own condition)."""
    return data is not None and any(k in data for k in ("val", "imagenet-val", "imagenet-v2"))


class StateKeeper:
    """Writes the RoCLIP state at the point OpenCLIP's next epoch would start, and resumes it.

    The point is after ``evaluate`` (which draws from the global RNG: its loaders' seeds) when
    OpenCLIP evaluates, else right after the epoch; in both cases before OpenCLIP's checkpoint.
    """

    def __init__(self) -> None:
        self.pending: int | None = None  # epochs completed, state not yet written
        self.completed: int | None = None

    def epoch_done(self, completed: int, defense: RoClipDefense, args: Any, *, later: bool) -> None:
        """Epoch ``completed - 1`` finished; write now, or after the evaluation if ``later``."""
        self.pending = self.completed = completed
        if not later:
            self.flush(defense, args)

    def flush(self, defense: RoClipDefense, args: Any) -> None:
        """Write the pending state with every rank's RNG (a collective: all ranks call it)."""
        if self.pending is None:
            return
        completed, self.pending = self.pending, None
        rng = all_gather_objects(rng_state())
        if args.save_logs and saves_checkpoint(completed, args):
            state = {"step": defense.step, "roclip": defense.state_dict(), "rng": rng}
            write_state(args.checkpoint_path, completed, state)

    def checkpoint_written(self, completed: int, args: Any) -> None:
        """OpenCLIP's checkpoint of epoch ``completed`` exists now: drop what it superseded."""
        if args.save_logs and completed > 0:
            prune_previous(args.checkpoint_path, completed)

    def restore(self, defense: RoClipDefense, args: Any, epoch: int) -> str | None:
        """Load the state of the checkpoint ``args.resume`` (at epoch ``epoch``); its location.

        Returns None when no state lies beside the checkpoint (trained without ``--roclip``).

        Raises:
            ValueError: the state found records another epoch than the checkpoint's (names
                both files), or is not a state file of this format.
        """
        location, saved = self._find(args.resume, epoch)
        if saved is None:
            return None
        recorded = int(saved["completed_epochs"])
        if recorded != epoch:
            raise ValueError(
                f"the RoCLIP state {location} holds the state after epoch {recorded} (step "
                f"{saved['step']}), but the checkpoint {args.resume} is at epoch {epoch}: the "
                "two come from different points of the run. Resume from the checkpoint of "
                f"epoch {recorded} (epoch_{recorded}.pt), or move {location} away to resume "
                "with an empty caption pool"
            )
        defense.load_state_dict(saved["roclip"])
        if args.rank < len(saved["rng"]):
            set_rng_state(saved["rng"][args.rank])
        else:
            log.warning(
                "RoCLIP: no saved RNG state for rank %d (world size changed?); the resumed "
                "run will not repeat the original data order",
                args.rank,
            )
        return location

    @staticmethod
    def _find(checkpoint: str, epoch: int) -> tuple[str, dict[str, Any] | None]:
        candidates = state_candidates(str(checkpoint), epoch)
        for location in candidates:
            saved = read_state(location)
            if saved is not None:
                return location, saved
        return " or ".join(candidates), None
