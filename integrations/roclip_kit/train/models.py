"""Load an OpenCLIP training checkpoint for evaluation, with errors that say what to fix.

OpenCLIP's own loaders either download weights or fail deep inside ``load_state_dict``; the kit
evaluates local runs only, so it builds the architecture without any weights and then loads the
checkpoint strictly, naming the checkpoint and the model when they do not fit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from roclip_kit.train.loaded import LoadedModel, import_open_clip
from roclip_plugin.io import require_file

LOCAL_DIR = "local-dir:"
PARAMS_FILE = "params.txt"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile
ROCLIP_STATE_SUFFIX = ".roclip"  # what roclip-openclip-train saves beside epoch_N.pt


def load_openclip(
    checkpoint: Path | str,
    model: str,
    device: str | torch.device = "cpu",
    *,
    force_quick_gelu: bool = False,
) -> LoadedModel:
    """Build ``model`` (an OpenCLIP name or ``local-dir:<dir>``) and load ``checkpoint`` into it.

    ``checkpoint`` is what OpenCLIP's training saves (a dict with ``state_dict``, keys possibly
    prefixed ``module.``) or a bare state dict (``.pt``/``.pth``/``.bin`` or ``.safetensors``).
    ``force_quick_gelu`` must match the training run: it changes no weight names, so a mismatch
    would not fail, only give wrong numbers.
    """
    checkpoint = Path(checkpoint)
    saved = read_tensor_checkpoint(checkpoint)
    if saved is not None:
        return load_tensor_checkpoint(checkpoint, saved, device)
    open_clip = import_open_clip()
    _check_model_name(open_clip, model)
    state, epoch = read_state_dict(checkpoint)
    device = torch.device(device)
    with _quiet_warnings():  # "initialized randomly": true, until the checkpoint is loaded
        net, _, preprocess = open_clip.create_model_and_transforms(
            model,
            pretrained=None,
            load_weights=False,
            pretrained_image=False,
            pretrained_text=False,
            device="cpu",
            force_quick_gelu=force_quick_gelu,
        )
        tokenizer = open_clip.get_tokenizer(model)
    try:
        _load_into(net, state, checkpoint, model)
    except ValueError as err:
        if not is_trainer_checkpoint(checkpoint):
            raise
        raise ValueError(f"{err}. {TRAINER_MODEL_HINT}") from None
    net.to(device).eval()
    return LoadedModel(net, preprocess, tokenizer, model, checkpoint, device, epoch)


def read_tensor_checkpoint(checkpoint: Path) -> dict[str, Any] | None:
    """A checkpoint of the kit's tensor-resident path (``final.pt``), or None for any other file.

    Those checkpoints carry their model config and word tokenizer, so no ``--model`` is needed.
    """
    from roclip_kit.train.tensor import CHECKPOINT_FORMAT

    if not checkpoint.is_file() or checkpoint.suffix == ".safetensors":
        return None
    try:
        raw = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception:  # not a torch file of plain data: the OpenCLIP path reports it
        return None
    if isinstance(raw, dict) and raw.get("format") == CHECKPOINT_FORMAT:
        return raw
    return None


def load_tensor_checkpoint(
    checkpoint: Path, saved: dict[str, Any], device: str | torch.device = "cpu"
) -> LoadedModel:
    """Rebuild a tensor-path model (OpenCLIP's ``CLIP``) with its weights and tokenizer."""
    from roclip_kit.data.tensors import WordTokenizer
    from roclip_kit.train.tensor import build_model, loaded_model

    net = build_model(saved["model_cfg"])
    _load_into(net, strip_prefixes(saved["state_dict"]), checkpoint, str(saved.get("name")))
    net.to(torch.device(device))
    tokenizer = WordTokenizer.from_dict(saved["tokenizer"])
    name = f"tensor path ({saved.get('name', 'run')})"
    epoch = saved.get("epoch") if isinstance(saved.get("epoch"), int) else None
    return loaded_model(
        net, tokenizer, saved["model_cfg"], name=name, checkpoint=checkpoint, epoch=epoch
    )


def reload_checkpoint(loaded: LoadedModel, checkpoint: Path | str) -> LoadedModel:
    """The same model with another checkpoint of the same run loaded into it.

    Building an OpenCLIP model costs seconds (the text tower's 49,408-token embedding alone);
    evaluating every epoch of a run needs only new weights.
    """
    checkpoint = Path(checkpoint)
    state, epoch = read_state_dict(checkpoint)
    net = loaded.model.to("cpu")
    _load_into(net, state, checkpoint, loaded.name)
    net.to(loaded.device).eval()
    return replace(loaded, model=net, checkpoint=checkpoint, epoch=epoch)


def check_model_name(model: str) -> None:
    """Refuse, before any loading, a ``--model`` OpenCLIP would not build offline."""
    _check_model_name(import_open_clip(), model)


@contextmanager
def _quiet_warnings() -> Iterator[None]:
    """Silence log records up to WARNING (OpenCLIP logs to the root logger) for a moment."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _check_model_name(open_clip: Any, model: str) -> None:
    """Fail early, and briefly, on a name OpenCLIP would reject with a list of 400 models."""
    if model.startswith(LOCAL_DIR):
        folder = Path(model[len(LOCAL_DIR) :])
        if not (folder / "open_clip_config.json").is_file():
            raise ValueError(
                f"--model {model}: {folder / 'open_clip_config.json'} does not exist; a "
                "local-dir model needs a folder holding open_clip_config.json with a "
                '"model_cfg" entry'
            )
        return
    if model.startswith("hf-hub:"):
        raise ValueError(
            f"--model {model}: hf-hub models would be downloaded; evaluation works offline. "
            "Save the config as <dir>/open_clip_config.json and pass --model local-dir:<dir>"
        )
    if model.replace("/", "-") not in open_clip.list_models():
        raise ValueError(
            f"--model {model!r} is not an OpenCLIP model name; use the --model the run was "
            "trained with (see 'model:' in the run's params.txt), e.g. ViT-B-32, or "
            "local-dir:<dir> for a folder with open_clip_config.json"
        )


def check_checkpoint_path(checkpoint: Path | str) -> Path:
    """An existing model checkpoint file, not a directory or a RoCLIP state file."""
    path = require_file(checkpoint, "--checkpoint")
    if path.suffix == ROCLIP_STATE_SUFFIX:
        raise ValueError(
            f"--checkpoint {path} is a RoCLIP state file (pool, schedule and RNG state), not "
            f"model weights: pass the checkpoint beside it, {path.with_suffix('.pt').name}"
        )
    return path


def read_state_dict(checkpoint: Path) -> tuple[dict[str, torch.Tensor], int | None]:
    """The model weights in ``checkpoint`` without wrapper prefixes, and its epoch if saved.

    ``checkpoint``: OpenCLIP's ``epoch_N.pt``, a bare state dict, or a ``roclip_torch``
    Trainer checkpoint (its ``"model"`` entry: the weights of whatever model it trained).
    """
    checkpoint = check_checkpoint_path(checkpoint)
    raw = _torch_load(checkpoint)
    epoch = None
    if isinstance(raw, dict) and raw.get("format") == trainer_format():
        epoch = (
            raw.get("completed_epochs") if isinstance(raw.get("completed_epochs"), int) else None
        )
        raw = raw.get("model")
    if isinstance(raw, dict) and isinstance(raw.get("state_dict"), dict):
        epoch = raw.get("epoch") if isinstance(raw.get("epoch"), int) else None
        raw = raw["state_dict"]
    if (
        not isinstance(raw, dict)
        or not raw
        or not all(isinstance(v, torch.Tensor) for v in raw.values())
    ):
        raise ValueError(
            f"checkpoint {checkpoint} holds neither an OpenCLIP training checkpoint (a dict "
            "with 'state_dict') nor a state dict of tensors"
        )
    return strip_prefixes(raw), epoch


TRAINER_MODEL_HINT = (
    "A roclip_torch Trainer checkpoint holds the weights of the model it trained, not its "
    "architecture: pass --model NAME, the OpenCLIP architecture those weights are of (e.g. "
    "ViT-B-32, or local-dir:<dir> for a folder with open_clip_config.json). A model that is "
    "no OpenCLIP architecture cannot be rebuilt here: embed the pairs with it into a "
    "roclip_plugin.scan.EmbeddingStore and score them with score_embeddings (docs/scan.md)"
)


def trainer_format() -> str:
    """The ``"format"`` of a ``roclip_torch`` Trainer checkpoint (``roclip_torch.loop``)."""
    from roclip_torch.loop import CHECKPOINT_FORMAT

    return CHECKPOINT_FORMAT


def is_trainer_checkpoint(checkpoint: Path | str) -> bool:
    """Whether ``checkpoint`` is a ``roclip_torch`` Trainer checkpoint (False if unreadable)."""
    path = Path(checkpoint)
    if not path.is_file() or path.suffix == ".safetensors":
        return False
    return _trainer_or_none(path) is not None


def _trainer_or_none(checkpoint: Path) -> dict[str, Any] | None:
    """The Trainer checkpoint in ``checkpoint``, or None for any other (or unreadable) file."""
    try:
        raw = _load_trainer(checkpoint)
    except Exception:  # not one: the caller reports the first loader's error
        return None
    return raw if isinstance(raw, dict) and raw.get("format") == trainer_format() else None


def _load_trainer(checkpoint: Path) -> Any:
    """``torch.load`` with the safe loader, allowing the NumPy pieces of saved RNG states.

    A Trainer checkpoint keeps NumPy's RNG state (an array and its dtype) for exact resumes,
    which the plain safe loader refuses; these few classes rebuild arrays, nothing else.
    """
    import numpy as np

    allowed = [np.ndarray, np.dtype, type(np.dtype(np.uint32)), _numpy_reconstruct()]
    with torch.serialization.safe_globals(allowed):
        return torch.load(checkpoint, map_location="cpu", weights_only=True)


def _numpy_reconstruct() -> Any:
    """NumPy's array unpickler (``numpy._core`` from NumPy 2, ``numpy.core`` before)."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # NumPy 1
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _torch_load(checkpoint: Path) -> Any:
    if checkpoint.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(checkpoint), device="cpu")
    try:
        return torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors have no common base class across versions
        trainer = _trainer_or_none(checkpoint)
        if trainer is not None:
            return trainer
        # the first line only: torch's weights_only errors run to a page of internals
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(
            f"checkpoint {checkpoint} could not be read as a PyTorch file of tensors "
            f"({reason[:200]}); pass a checkpoint saved by OpenCLIP training (epoch_N.pt)"
        ) from None


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) when every key has them."""
    for prefix in _WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in state):
            state = {key[len(prefix) :]: value for key, value in state.items()}
    return state


def _load_into(
    net: torch.nn.Module, state: dict[str, torch.Tensor], checkpoint: Path, model: str
) -> None:
    """Strict load; a mismatch names the checkpoint, the model and a few offending keys."""
    own = net.state_dict()
    logit_scale = state.get("logit_scale")
    if logit_scale is not None and "logit_scale" in own:
        state = {**state, "logit_scale": logit_scale.reshape(own["logit_scale"].shape)}
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    shapes = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        raise ValueError(
            f"checkpoint {checkpoint} does not fit --model {model}: "
            + "; ".join(
                f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})"
                for what, keys in (
                    ("weights missing from the checkpoint", missing),
                    ("unexpected weights", unexpected),
                    ("weights of another shape", shapes),
                )
                if keys
            )
            + ". Pass the --model the run was trained with ('model:' in its params.txt)"
        )
    _check_finite(state, checkpoint)
    net.load_state_dict(state, strict=True)


def _check_finite(state: dict[str, torch.Tensor], checkpoint: Path) -> None:
    """Refuse weights holding NaN or inf: the model would score as chance, silently."""
    broken = [
        name
        for name, value in state.items()
        if value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]
    if broken:
        raise ValueError(
            f"checkpoint {checkpoint} has NaN or inf weights in {len(broken)} tensor(s) (e.g. "
            f"{', '.join(broken[:3])}): the training run diverged; evaluate an earlier epoch"
        )


def run_params(checkpoint: Path | str) -> dict[str, str]:
    """OpenCLIP's ``params.txt`` of the run that saved ``checkpoint`` (empty if not found).

    OpenCLIP saves ``<logs>/<name>/checkpoints/epoch_N.pt`` and ``<logs>/<name>/params.txt``
    (``name: value`` lines), so the model name and its flags need not be typed again.
    """
    path = Path(checkpoint).resolve().parent.parent / PARAMS_FILE
    if not path.is_file():
        return {}
    params = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            params[key.strip()] = value.strip()
    return params
