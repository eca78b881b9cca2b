"""The tensor-resident training path: CLIP and RoCLIP on an in-memory dataset, fast on a CPU.

OpenCLIP's CSV path decodes, transforms and tokenises every sample (about 1 ms a pair on a
laptop core), which caps a small model at a few hundred pairs a second. Here the dataset is
decoded once (:mod:`roclip_kit.data.tensors`), each batch is gathered from a ``uint8`` tensor,
augmented batched on the tensors (the policy's ``gpu_batch``, on whatever device the data is),
and its captions are tokenised by a compact word tokenizer, so a step costs the model's
arithmetic. Nothing of the method is re-implemented: the model is OpenCLIP's own ``CLIP`` class
built from a preset, RoCLIP runs through :class:`roclip_torch.RoClipAdapter` (the generic-loop
integration, driving the core's pool, matcher, schedule and loss), the augmentation is the
configured :class:`~roclip_plugin.augment.AugmentationPolicy`, and every figure comes from
:func:`roclip_kit.evaluate.run.evaluate_model`, the code of ``roclip eval``.

What it adds is measurement: :class:`~roclip_kit.train.audit.MatchAudit`, a plugin on the
defense's hooks, knows which training row each pool caption came from, so a matching epoch
reports how often an image was matched to a caption of its own class (purity), how often a
poisoned image was matched to its poison's class, and how often to its own caption of an
earlier epoch; and it writes the ``suspicious_epoch_N.csv`` files that ``roclip eval`` scores
against the manifest.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from roclip_kit.data.tensors import PoisonedData, WordTokenizer
from roclip_kit.train.audit import MatchAudit
from roclip_plugin import RoClipConfig, get_plugin_manager
from roclip_plugin.augment import AugmentationPolicy, build_policy
from roclip_plugin.config_aliases import renamed_attribute
from roclip_plugin.loss import DistInfo, contrastive_loss
from roclip_plugin.stats import suspicious_name

# OpenCLIP's own normalisation constants (open_clip.constants), so a checkpoint of this path
# preprocesses like any OpenCLIP model.
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
CHECKPOINT_FORMAT = "roclip_kit.tensor/1"
SUSPICIOUS_MIN_ROWS = 1000
MAX_LOG_SCALE = math.log(100.0)  # CLIP's clamp of exp(logit_scale) at 100

# Model presets (OpenCLIP model_cfg; the text vocabulary size is the tokenizer's). Sizes were
# chosen by measurement on two CPU cores (docs/results.md): a small ResNet image tower (OpenCLIP's
# ModifiedResNet, the paper's kind of image tower) learned digits far faster than a ViT of
# the same speed.
TENSOR_PRESETS: dict[str, dict[str, Any]] = {
    "tensor-cpu": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8, "head_width": 32},
        "text_cfg": {"context_length": 20, "width": 64, "heads": 2, "layers": 2},
    },
    "tensor-gpu": {
        "embed_dim": 128,
        "vision_cfg": {
            "image_size": 32,
            "layers": 4,
            "width": 256,
            "head_width": 64,
            "patch_size": 4,
        },
        "text_cfg": {"context_length": 20, "width": 256, "heads": 4, "layers": 4},
    },
}


@dataclass(frozen=True)
class TensorTrainSettings:
    """How one run trains (OpenCLIP's recipe: AdamW, warm-up then cosine, logit-scale clamp).

    Attributes:
        epochs: passes over the training rows.
        batch_size: pairs per step (the last incomplete batch of an epoch is dropped).
        lr: peak learning rate.
        wd: weight decay of every parameter OpenCLIP decays: those with 2 or more dimensions,
            weight matrices and the token and positional embeddings included; gains, biases,
            the ViT class embedding (1-D) and the logit scale get none (OpenCLIP's rule, so
            runs compare with OpenCLIP's).
        warmup_steps: linear warm-up before the cosine decay.
        grad_clip_norm: clip the global gradient norm to this before each optimiser step
            (OpenCLIP's ``--grad-clip-norm``, ``roclip_torch.TrainSettings.grad_clip_norm``);
            None does not clip, OpenCLIP's default.
        seed: model initialisation and data order (epoch ``e`` is shuffled with ``seed + e``,
            as ``DistributedSampler`` does, so a run's batches are those of
            :class:`roclip_torch.Trainer` with the same seed).
        device: ``cpu`` or ``cuda[:N]``; the dataset is copied there once.
        preset: a key of :data:`TENSOR_PRESETS`, or a ``model_cfg`` mapping.
        amp: bf16 autocast for the forward pass; default: on for CUDA, off for the CPU.
        threads: torch CPU threads (default: torch's choice).
    """

    epochs: int = 15
    batch_size: int = 256
    lr: float = 1e-3
    wd: float = 0.1
    warmup_steps: int = 200
    grad_clip_norm: float | None = None
    seed: int = 0
    device: str = "cpu"
    preset: str | Mapping[str, Any] = "tensor-cpu"
    amp: bool | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')}: {value!r} must be an integer >= 1")
        if not self.lr > 0 or not self.wd >= 0 or self.warmup_steps < 0:
            raise ValueError(
                f"lr must be > 0, wd >= 0 and warmup_steps >= 0 (got {self.lr}, {self.wd}, "
                f"{self.warmup_steps})"
            )
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            raise ValueError(f"grad_clip_norm: {self.grad_clip_norm!r} must be None or > 0")
        model_cfg(self.preset, vocab_size=8)  # an unknown preset fails here

    @property
    def use_amp(self) -> bool:
        """Whether the forward pass runs under bf16 autocast."""
        return self.device.startswith("cuda") if self.amp is None else self.amp


def model_cfg(preset: str | Mapping[str, Any], vocab_size: int) -> dict[str, Any]:
    """The OpenCLIP ``model_cfg`` of a preset, with the tokenizer's vocabulary size."""
    if isinstance(preset, Mapping):
        base = dict(preset)
    elif preset in TENSOR_PRESETS:
        base = TENSOR_PRESETS[preset]
    else:
        raise ValueError(
            f"unknown model preset {preset!r} for the tensor path; known: "
            f"{', '.join(TENSOR_PRESETS)}"
        )
    if "vision_cfg" not in base or "text_cfg" not in base:
        raise ValueError("a custom preset is an OpenCLIP model_cfg with vision_cfg and text_cfg")
    cfg = {
        "embed_dim": base["embed_dim"],
        "vision_cfg": dict(base["vision_cfg"]),
        "text_cfg": dict(base["text_cfg"]),
    }
    cfg["text_cfg"]["vocab_size"] = vocab_size
    return cfg


def build_model(cfg: Mapping[str, Any]) -> torch.nn.Module:
    """OpenCLIP's ``CLIP`` from a ``model_cfg`` (random initialisation from torch's RNG)."""
    from roclip_kit.train.loaded import import_open_clip

    open_clip = import_open_clip()
    return open_clip.CLIP(
        embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"]
    )


def make_tokenizer(data: PoisonedData, context_length: int) -> WordTokenizer:
    """The words of the training captions and of the zero-shot prompts, nothing else."""
    prompts = [t.format(name) for name in data.classes for t in data.templates]
    return WordTokenizer.build([*data.train.captions, *prompts], context_length)


def make_optimizer(model: torch.nn.Module, lr: float, wd: float) -> torch.optim.Optimizer:
    """AdamW as OpenCLIP builds it (``training/main.py``'s ``exclude`` rule).

    No decay for parameters with fewer than 2 dimensions (gains, biases, the ViT class
    embedding) or whose name holds ``bn``, ``ln``, ``bias`` or ``logit_scale``; every other
    parameter, the token and positional embeddings included, gets ``wd``. OpenCLIP's rule and
    not a stricter one, so a run here compares with an OpenCLIP run of the same settings.
    """
    decay, rest = [], []
    for name, param in model.named_parameters():
        skip = param.ndim < 2 or "bn" in name or "ln" in name or "bias" in name
        (rest if skip or "logit_scale" in name else decay).append(param)
    groups = [{"params": rest, "weight_decay": 0.0}, {"params": decay, "weight_decay": wd}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup: int, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then cosine to 0 at ``total`` (OpenCLIP's)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        span = max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, span) / span))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def epoch_order(count: int, seed: int, epoch: int) -> torch.Tensor:
    """The rows of an epoch, in ``DistributedSampler``'s order for one process."""
    generator = torch.Generator()
    generator.manual_seed(seed + epoch)
    return torch.randperm(count, generator=generator)


# ---------------------------------------------------------------- what matching did


# ---------------------------------------------------------------- one run


@dataclass
class EpochRecord:
    """One epoch of a run: its loss, time, whether it matched, and what matching did."""

    epoch: int
    loss: float
    seconds: float
    matching: bool
    matching_steps: int = 0
    audit: dict[str, Any] = field(default_factory=dict)


@dataclass
class TensorRun:
    """A finished run: its model and tokenizer (in memory), its epochs, and its files."""

    name: str
    model: torch.nn.Module
    tokenizer: WordTokenizer
    cfg: dict[str, Any]
    epochs: list[EpochRecord]
    train_seconds: float
    pairs_per_second: float
    run_dir: Path | None
    suspicious: dict[int, Path]
    roclip_state: dict[str, Any] | None

    @property
    def defended_epochs(self) -> list[int]:
        """1-based epochs that started as defended epochs (as OpenCLIP names checkpoints)."""
        return [r.epoch + 1 for r in self.epochs if r.matching]

    matching_epochs = renamed_attribute("matching_epochs", "defended_epochs")

    def save(self, path: Path) -> Path:
        """A checkpoint ``roclip eval`` loads: weights, ``model_cfg``, tokenizer, RoCLIP state."""
        from roclip_plugin.io import atomic_torch_save

        state = {
            "format": CHECKPOINT_FORMAT,
            "name": self.name,
            "epoch": len(self.epochs),
            "model_cfg": self.cfg,
            "tokenizer": self.tokenizer.to_dict(),
            "state_dict": self.model.state_dict(),
            "roclip": self.roclip_state,
        }
        return atomic_torch_save(state, path)


OnEpoch = Callable[[EpochRecord, torch.nn.Module, WordTokenizer], None]


@dataclass
class _Batches:
    """The data of a run on its device, and how a batch is made from row indices."""

    images: torch.Tensor
    tokens: torch.Tensor | None
    captions: list[str]
    tokenizer: WordTokenizer
    policy: AugmentationPolicy | None
    mean: torch.Tensor
    std: torch.Tensor

    def make(self, rows: torch.Tensor, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.images.device
        x = self.images[rows.to(device)].float().div_(255.0)
        if self.policy is not None:  # it returns x as it is where images are not augmented
            x = self.policy.gpu_batch(x, epoch, indices=rows)
        x = (x - self.mean) / self.std
        if self.tokens is not None:
            return x, self.tokens[rows.to(device)]
        texts = self.policy.texts([self.captions[i] for i in rows.tolist()], epoch, rows.tolist())
        return x, self.tokenizer(texts).to(device)


def _batches(
    data: PoisonedData, tokenizer: WordTokenizer, policy: AugmentationPolicy | None, device: Any
) -> _Batches:
    captions = data.train.captions
    text_aug = policy is not None and policy.text_name != "none"
    tokens = None if text_aug else tokenizer(captions).to(device)
    return _Batches(
        images=data.train.images.to(device),
        tokens=tokens,
        captions=captions,
        tokenizer=tokenizer,
        policy=policy,
        mean=torch.tensor(MEAN, device=device).view(1, 3, 1, 1),
        std=torch.tensor(STD, device=device).view(1, 3, 1, 1),
    )


def train_tensor(
    data: PoisonedData,
    settings: TensorTrainSettings,
    roclip: RoClipConfig | None = None,
    *,
    defend: bool = True,
    name: str = "run",
    run_dir: Path | None = None,
    on_epoch: OnEpoch | None = None,
    on_step: Callable[[int], None] | None = None,
    on_weights: Callable[[int, torch.nn.Module], None] | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    keep_last: int | None = None,
    stop_after: int | None = None,
) -> TensorRun:
    """Train one CLIP model on ``data``; RoCLIP when ``roclip`` is given and ``defend``.

    Args:
        data: the (poisoned) dataset in memory.
        settings: sizes and the optimiser recipe.
        roclip: RoCLIP settings; their augmentation policy (``image_aug``, ``text_aug``) is
            applied whenever they are given. None trains plain CLIP with no augmentation.
        defend: with ``roclip``, run the defense (pool and matching); False applies only
            its augmentation (the "augmentation alone" ablation).
        name: the run's label.
        run_dir: where ``suspicious_epoch_N.csv`` files go (None: not written).
        on_epoch: called after each epoch with its record, the model and the tokenizer
            (evaluation); it must leave the model as it found it.
        on_step: called after each optimiser step with the steps done in the epoch.
        on_weights: called after each optimiser step with the run's steps done so far (a
            resumed run counts on from its checkpoint) and the model, to look at the weights
            between epoch ends (``benchmarks/bench_steps.py``); it must leave the model as it
            found it.
        checkpoint_dir: where ``epoch_<N>.pt`` goes after every epoch
            (:mod:`roclip_kit.train.checkpoint`); None writes none.
        resume: continue from the newest checkpoint of ``checkpoint_dir``, exactly (the same
            weights, pool and per-epoch records as a run that never stopped); the checkpoint
            must exist and belong to a run of the same settings, RoCLIP config and data.
        keep_last: keep only this many newest checkpoints; None keeps all.
        stop_after: stop once this many epochs are complete (a time-boxed job; the schedule
            is still that of ``settings.epochs``); resume to go on.
    """
    _check_run_options(checkpoint_dir, resume, stop_after)
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    torch.manual_seed(settings.seed)
    device = torch.device(settings.device)
    steps = len(data.train) // settings.batch_size
    if steps == 0:
        raise ValueError(
            f"--batch-size {settings.batch_size} exceeds the {len(data.train)} training rows"
        )
    probe = model_cfg(settings.preset, vocab_size=8)
    tokenizer = make_tokenizer(data, int(probe["text_cfg"]["context_length"]))
    cfg = model_cfg(settings.preset, tokenizer.vocab_size)
    model = build_model(cfg).to(device)
    optimizer = make_optimizer(model, settings.lr, settings.wd)
    scheduler = cosine_schedule(optimizer, settings.warmup_steps, steps * settings.epochs)
    pm = get_plugin_manager()
    policy = build_policy(roclip, pm, settings.epochs) if roclip is not None else None
    batches = _batches(data, tokenizer, policy, device)
    keep = max(SUSPICIOUS_MIN_ROWS, 2 * len(data.poisoned_rows))
    audit = (
        MatchAudit(data, keep)
        if roclip is None
        else MatchAudit(data, keep, roclip.suspicious_margin)
    )
    adapter = None
    if roclip is not None and defend:
        from roclip_torch import RoClipAdapter

        adapter = RoClipAdapter(
            roclip,
            model=model,
            total_epochs=settings.epochs,
            steps_per_epoch=steps,
            # the rows, not the batches' pairs: ids are row indices, and the tail that the
            # last incomplete batch leaves out must not share history slots with the head
            samples_per_epoch=len(data.train),
            plugin_manager=pm,
            plugins=[audit, audit.stats],
            device=device,
        )
        audit.pool = adapter.pool
    loop = _Loop(model, optimizer, scheduler, adapter, audit, settings)
    checkpoints = None
    if checkpoint_dir is not None:
        from roclip_kit.train.checkpoint import TensorCheckpoints, run_identity

        identity = run_identity(settings, roclip, defend, data.train.images, data.train.captions)
        checkpoints = TensorCheckpoints(checkpoint_dir, identity, keep_last)
    records = _resume(checkpoints, loop) if resume and checkpoints is not None else []
    suspicious = {
        r.epoch + 1: Path(r.audit["suspicious_file"])
        for r in records
        if r.audit.get("suspicious_file")  # None where the run wrote none (no run_dir)
    }
    end = settings.epochs if stop_after is None else min(stop_after, settings.epochs)
    for epoch in range(len(records), end):
        record = loop.epoch(
            epoch,
            batches,
            len(data.train),
            steps,
            _step_calls(on_step, on_weights, model, epoch * steps),
        )
        if record.matching and run_dir is not None:
            path = _write_suspicious(audit, run_dir, epoch)
            if path is not None:
                suspicious[epoch + 1] = path
                record.audit["suspicious_file"] = str(path)
        records.append(record)
        if on_epoch is not None:
            on_epoch(record, model, tokenizer)
        if checkpoints is not None:  # after on_epoch: the RNG states are the next epoch's
            checkpoints.save(epoch + 1, loop.state_dict(records))
    train_seconds = sum(r.seconds for r in records)
    return TensorRun(
        name=name,
        model=model,
        tokenizer=tokenizer,
        cfg=cfg,
        epochs=records,
        train_seconds=train_seconds,
        pairs_per_second=steps * settings.batch_size * len(records) / max(train_seconds, 1e-9),
        run_dir=run_dir,
        suspicious=suspicious,
        roclip_state=adapter.state_dict() if adapter is not None else None,
    )


def _step_calls(
    on_step: Callable[[int], None] | None,
    on_weights: Callable[[int, torch.nn.Module], None] | None,
    model: torch.nn.Module,
    done_before: int,
) -> Callable[[int], None] | None:
    """One per-step callback for the loop: ``on_step`` and ``on_weights`` (run-wide count)."""
    if on_weights is None:
        return on_step

    def both(step: int) -> None:
        if on_step is not None:
            on_step(step)
        on_weights(done_before + step, model)

    return both


def _check_run_options(checkpoint_dir: Path | None, resume: bool, stop_after: int | None) -> None:
    """Refuse, before any work, options that cannot go together."""
    if resume and checkpoint_dir is None:
        raise ValueError(
            "train_tensor: resume=True needs checkpoint_dir, the folder of the run to continue"
        )
    if stop_after is not None and (isinstance(stop_after, bool) or stop_after < 1):
        raise ValueError(f"train_tensor: stop_after={stop_after!r} must be None or >= 1")


def _resume(checkpoints: Any, loop: _Loop) -> list[EpochRecord]:
    """Restore the newest checkpoint into the run's objects; returns the epochs it completed.

    The RNG states go last: building the run drew from them, the resumed epochs must not.
    """
    from roclip_plugin.distributed import set_rng_state

    _, state = checkpoints.load_latest()
    loop.load_state_dict(state)
    set_rng_state(state["rng"])
    return [EpochRecord(**record) for record in state["records"]]


def _write_suspicious(audit: MatchAudit, run_dir: Path, epoch: int) -> Path | None:
    run_dir.mkdir(parents=True, exist_ok=True)
    return audit.write_suspicious(run_dir / suspicious_name(epoch + 1))


class _Loop:
    """The optimiser steps of a run (the same sequence as ``roclip_torch.Trainer.train_step``)."""

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        adapter: Any,
        audit: MatchAudit,
        settings: TensorTrainSettings,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.adapter = adapter
        self.audit = audit
        self.settings = settings
        self.device = torch.device(settings.device)

    def state_dict(self, records: list[EpochRecord]) -> dict[str, Any]:
        """What the next epoch depends on, besides the RNG states (see ``train.checkpoint``)."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "roclip": None if self.adapter is None else self.adapter.state_dict(),
            "audit": self.audit.state_dict(),
            "records": [asdict(record) for record in records],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (the checkpoint was checked to be this run's)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.adapter is not None:
            self.adapter.load_state_dict(state["roclip"])
        self.audit.load_state_dict(state["audit"])

    def epoch(
        self,
        epoch: int,
        batches: _Batches,
        count: int,
        steps: int,
        on_step: Callable[[int], None] | None,
    ) -> EpochRecord:
        start = time.perf_counter()
        self.model.train()
        matching = self.adapter.epoch_start(epoch) if self.adapter is not None else False
        if batches.policy is not None:
            batches.policy.set_epoch(epoch)
        self.audit.reset()
        order = epoch_order(count, self.settings.seed, epoch)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for step in range(steps):
            rows = order[step * self.settings.batch_size : (step + 1) * self.settings.batch_size]
            images, tokens = batches.make(rows, epoch)
            loss_sum += self.step(images, tokens, rows).detach().double()
            if on_step is not None:
                on_step(step + 1)
        loss = float(loss_sum) / steps
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"the training loss is {loss} in epoch {epoch}: lower --lr or check the data"
            )
        audit = self.audit.summary()
        return EpochRecord(
            epoch=epoch,
            loss=loss,
            seconds=time.perf_counter() - start,
            matching=matching,
            matching_steps=max(audit.steps, audit.risk_steps),
            audit=asdict(audit) if audit.steps or audit.risk_steps else {},
        )

    def step(self, images: torch.Tensor, tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.settings.use_amp):
            if self.adapter is not None:
                self.audit.batch_rows = rows
                loss = self.adapter.step(images, tokens, sample_ids=rows)
            else:
                loss = plain_clip_loss(self.model, images, tokens)
        loss.backward()
        if self.settings.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip_norm)
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0.0, MAX_LOG_SCALE)
        return loss


def plain_clip_loss(
    model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor
) -> torch.Tensor:
    """CLIP's loss as the adapter computes a plain step: float32, normalised, the core's loss.

    The same function (:func:`roclip_plugin.loss.contrastive_loss`) in the same precision, so
    CLIP and RoCLIP runs differ only by what RoCLIP does.
    """
    image_features = model.encode_image(images)
    text_features = model.encode_text(tokens)
    with torch.autocast(images.device.type, enabled=False):
        img = F.normalize(image_features.float(), dim=-1)
        txt = F.normalize(text_features.float(), dim=-1)
        scale = model.logit_scale.exp().float()
        loss, _ = contrastive_loss(img, txt, scale, DistInfo())
    return loss


# ---------------------------------------------------------------- evaluation


def eval_preprocess(image_size: int) -> Callable[[Any], torch.Tensor]:
    """PIL image -> normalised tensor, exactly the training input without augmentation."""
    from torchvision import transforms

    steps: list[Any] = [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
    return transforms.Compose([transforms.Resize((image_size, image_size)), *steps])


def loaded_model(
    model: torch.nn.Module,
    tokenizer: WordTokenizer,
    cfg: Mapping[str, Any],
    *,
    name: str,
    checkpoint: Path,
    epoch: int | None,
) -> Any:
    """A :class:`~roclip_kit.train.loaded.LoadedModel` of an in-memory model, to evaluate."""
    from roclip_kit.train.loaded import LoadedModel

    device = next(model.parameters()).device
    size = int(cfg["vision_cfg"]["image_size"])
    return LoadedModel(
        model.eval(), eval_preprocess(size), tokenizer, name, checkpoint, device, epoch
    )
