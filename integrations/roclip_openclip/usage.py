"""Refusals of the ``roclip-openclip-train`` command: the error and the check of the model.

Both the command line (:mod:`roclip_openclip.cli`) and the patches of OpenCLIP's script
(:mod:`roclip_openclip.patches`, which meet the built model) refuse with :class:`UsageError`;
it lives here, below both, so that neither imports the other for it.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("roclip")


class UsageError(Exception):
    """A flag combination RoCLIP cannot run; the message says which and what to do."""


def check_model(model: Any, args: Any) -> None:
    """Stop on a model kind RoCLIP cannot train, judged from the model itself, not its name.

    OpenCLIP picks its CoCa loss by the word "coca" in ``--model``: a CoCa model under another
    name (``local-dir:...``, a renamed config) would reach the loss with captioning outputs.
    A SigLIP architecture (a ``logit_bias``) without ``--siglip`` trains as OpenCLIP's
    ``ClipLoss`` trains it: the bias is added to every logit and changes nothing; say so.
    With ``--siglip`` the sigmoid loss trains the bias.
    """
    from roclip_openclip.openclip_api import COCA

    inner = _unwrap(model)
    if isinstance(inner, COCA.get()) or hasattr(inner, "text_decoder"):
        raise UsageError(
            f"RoCLIP cannot run with: --model {args.model} is a CoCa model (open_clip.CoCa): "
            "its captioning loss is not supported; choose a CLIP model"
        )
    if getattr(inner, "logit_bias", None) is not None and not getattr(args, "siglip", False):
        log.warning(
            f"RoCLIP: --model {args.model} has a logit_bias (a SigLIP architecture) and "
            "--siglip is not given: like OpenCLIP's ClipLoss, RoCLIP trains the softmax CLIP "
            "loss and adds the bias to every logit, which changes neither the loss nor the "
            "other gradients (the bias does not train). Pass --siglip for the sigmoid loss."
        )


def _unwrap(model: Any) -> Any:
    """The model inside DistributedDataParallel (``module``) and torch.compile (``_orig_mod``)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner
