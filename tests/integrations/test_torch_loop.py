"""The generic PyTorch adapter and loop helper, on a plain two-tower model and real images.

Data: scikit-learn's handwritten digits (8x8, offline) with templated captions made of token ids
from a tiny word vocabulary. The model is plain PyTorch (no OpenCLIP). The helpers at the top
are shared by test_torch_loop_ddp.py and test_torch_loop_plugin.py.
"""

from __future__ import annotations

import io
import math
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from roclip_torch import RoClipAdapter, Trainer, TrainSettings
from roclip_torch.checkpoint import latest_checkpoint, list_checkpoints
from roclip_torch.features import parse_model_output
from torch import nn
from torch.utils.data import Dataset

from roclip_plugin import RoClipConfig, RoClipDefense, get_plugin_manager, hookimpl
from roclip_plugin.loss import DistInfo

sklearn_datasets = pytest.importorskip("sklearn.datasets")

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a photo of the digit {}", "a handwritten {}", "the number {} written by hand"]
CAPTION_LENGTH = 8


# -- shared helpers ------------------------------------------------------------------------


def vocabulary() -> dict[str, int]:
    """Every word of the templates and digit names; id 0 is padding."""
    words = sorted({w for t in TEMPLATES for w in t.format("").split()} | set(NAMES))
    return {word: i + 1 for i, word in enumerate(words)}


def tokenize(caption: str, vocab: dict[str, int]) -> torch.Tensor:
    ids = [vocab[w] for w in caption.split()][:CAPTION_LENGTH]
    return torch.tensor(ids + [0] * (CAPTION_LENGTH - len(ids)), dtype=torch.long)


class DigitCaptions(Dataset):
    """The first ``n`` digits as (64 pixel floats, caption token ids)."""

    def __init__(self, n: int = 256) -> None:
        digits = sklearn_datasets.load_digits()
        vocab = vocabulary()
        self.images = torch.tensor(digits.data[:n] / 16.0, dtype=torch.float32)
        self.labels = torch.tensor(digits.target[:n], dtype=torch.long)
        self.captions = [
            TEMPLATES[i % len(TEMPLATES)].format(NAMES[y])
            for i, y in enumerate(self.labels.tolist())
        ]
        self.tokens = torch.stack([tokenize(c, vocab) for c in self.captions])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.tokens[i]


class TwoTower(nn.Module):
    """A tiny CLIP: MLP image tower (with dropout, so RNG state matters) and bag-of-words text."""

    def __init__(self, dim: int = 32, width: int = 64) -> None:
        super().__init__()
        self.image = nn.Sequential(
            nn.Linear(64, width), nn.GELU(), nn.Dropout(0.1), nn.Linear(width, dim)
        )
        self.embed = nn.EmbeddingBag(len(vocabulary()) + 1, width, mode="mean", padding_idx=0)
        self.text = nn.Sequential(nn.GELU(), nn.Linear(width, dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image(images)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text(self.embed(tokens))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "image_features": F.normalize(self.encode_image(images), dim=-1),
            "text_features": F.normalize(self.encode_text(tokens), dim=-1),
            "logit_scale": self.logit_scale.exp(),
        }


def zero_shot_accuracy(model: TwoTower, data: DigitCaptions) -> float:
    """Accuracy of classifying every image by its most similar 'a photo of the digit <d>'."""
    vocab = vocabulary()
    prompts = torch.stack([tokenize(TEMPLATES[0].format(n), vocab) for n in NAMES])
    model.eval()
    with torch.no_grad():
        img = F.normalize(model.encode_image(data.images), dim=-1)
        txt = F.normalize(model.encode_text(prompts), dim=-1)
    model.train()
    return float(((img @ txt.T).argmax(dim=1) == data.labels).float().mean())


def make_run(
    tmp: Path | None,
    config: RoClipConfig | RoClipAdapter,
    *,
    epochs: int,
    seed: int = 0,
    n: int = 256,
    console: Console | None = None,
    plugin_manager=None,
    **settings,
) -> Trainer:
    """A Trainer over the digits with AdamW and a per-step cosine schedule."""
    torch.manual_seed(seed)
    model = TwoTower()
    data = DigitCaptions(n)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    batch = settings.pop("batch_size", 32)
    steps = epochs * (n // batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    return Trainer(
        model,
        opt,
        data,
        TrainSettings(
            epochs=epochs,
            batch_size=batch,
            checkpoint_dir=None if tmp is None else tmp,
            progress=console is not None,
            **settings,
        ),
        roclip=config,
        scheduler=sched,
        # an adapter brings its own plugin manager
        plugin_manager=plugin_manager
        or (None if isinstance(config, RoClipAdapter) else get_plugin_manager()),
        console=console,
    )


def rich_console() -> Console:
    return Console(file=io.StringIO(), width=140, force_terminal=False)


# -- the loop helper -----------------------------------------------------------------------


def test_matching_epochs_follow_the_schedule_under_bf16_autocast(tmp_path: Path) -> None:
    console = rich_console()
    config = RoClipConfig.from_preset(
        "paper", pool_size=128, first_defended_epoch=2, defend_every=2
    )
    trainer = make_run(tmp_path, config, epochs=4, console=console, amp=True, grad_clip_norm=1.0)
    seen_dtypes = set()
    loss = trainer.adapter.loss

    def spy(image_features, text_features, logit_scale=None, sample_ids=None):
        seen_dtypes.add(image_features.dtype)
        return loss(image_features, text_features, logit_scale, sample_ids=sample_ids)

    batches: list[torch.Tensor] = []
    step = trainer.adapter.step

    def record(images, texts, sample_ids=None):
        batches.append(images.clone())
        return step(images, texts, sample_ids=sample_ids)

    trainer.adapter.loss, trainer.adapter.step = spy, record
    history = trainer.fit()

    assert seen_dtypes == {torch.bfloat16}  # autocast reached the model...
    assert all(math.isfinite(h.loss) for h in history)  # ...and the float32 loss is finite
    assert [h.matching for h in history] == [False, False, True, False]
    assert [h.matching_steps for h in history] == [0, 0, 8, 0]
    matched = history[2]
    assert -1.0 <= matched.own_similarity <= 1.0 and -1.0 <= matched.matched_similarity <= 1.0
    assert 0 <= matched.suspicious <= 256
    assert all(math.isnan(h.matched_similarity) for h in history if not h.matching)
    assert [h.pool_fill for h in history] == [128] * 4  # 8 steps x 32 captions fill 128 slots
    assert [n for n, _ in list_checkpoints(tmp_path)] == [1, 2, 3, 4]
    # every epoch visits every sample once, in a new order
    epochs = [torch.cat(batches[e * 8 : (e + 1) * 8]) for e in range(4)]
    everything = trainer.loader.dataset.images
    assert all(torch.allclose(e.sum(0), everything.sum(0)) for e in epochs)
    assert not torch.equal(epochs[0], epochs[1])
    scale = trainer.module.logit_scale.detach()
    assert float(scale) <= math.log(100) + 1e-6

    out = console.file.getvalue()
    assert "RoCLIP epoch 2" in out and "RoCLIP run" in out
    epoch2 = [line for line in out.splitlines() if line.lstrip("│┃| ").startswith("2 ")]
    assert any("yes" in line and "128/128" in line for line in epoch2)


def test_training_learns_the_digits(tmp_path: Path) -> None:
    # Plain CLIP epochs first, then matching ones (the warm-up the method needs).
    config = RoClipConfig.from_preset(
        "paper", pool_size=256, first_defended_epoch=3, defend_every=1
    )
    trainer = make_run(None, config, epochs=5, n=512)
    before = zero_shot_accuracy(trainer.module, trainer.loader.dataset)
    history = trainer.fit()
    after = zero_shot_accuracy(trainer.module, trainer.loader.dataset)
    assert history[-1].loss < history[0].loss
    assert after > max(0.8, before + 0.3), (before, after)
    assert [h.matching for h in history] == [False, False, False, True, True]
    # Matched captions are pool captions of the same digits: closer to the image than chance.
    assert history[-1].matched_similarity > 0.3


def _plain(summary) -> dict:
    return {k: "nan" if v != v else v for k, v in summary.to_dict().items()}


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.module.state_dict().items()}


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.usefixtures("deterministic")
def test_resume_is_exact(tmp_path: Path) -> None:
    config = RoClipConfig.from_preset("paper", pool_size=96, first_defended_epoch=2, defend_every=1)
    straight = make_run(tmp_path / "straight", config, epochs=4, grad_clip_norm=1.0)
    want = straight.fit()

    first = make_run(tmp_path / "split", config, epochs=4, grad_clip_norm=1.0)
    assert len(first.fit(stop_after=2)) == 2
    assert latest_checkpoint(tmp_path / "split").name == "epoch_2.pt"
    # A new process would build everything afresh, from a different initialisation.
    resumed = make_run(tmp_path / "split", config, epochs=4, seed=123, grad_clip_norm=1.0)
    got = resumed.fit()

    # losses, matching, pool fill, statistics: every epoch identical (NaN compares as NaN)
    assert [_plain(h) for h in got] == [_plain(h) for h in want]
    assert [h.matching for h in got] == [False, False, True, True]
    want_params, got_params = _params(straight), _params(resumed)
    assert all(torch.equal(got_params[k], want_params[k]) for k in want_params)
    assert torch.equal(resumed.adapter.pool.features(), straight.adapter.pool.features())
    assert resumed.adapter.global_step == straight.adapter.global_step == 32
    assert resumed.scheduler.state_dict() == straight.scheduler.state_dict()
    opt_want, opt_got = straight.optimizer.state_dict(), resumed.optimizer.state_dict()
    for index, state in opt_want["state"].items():
        assert torch.equal(opt_got["state"][index]["exp_avg"], state["exp_avg"])


def test_resume_restores_rng_state(tmp_path: Path) -> None:
    """Without the saved RNG, dropout in epochs 3-4 would draw differently: prove it matters."""
    config = RoClipConfig.from_preset("paper", pool_size=64, first_defended_epoch=10)
    first = make_run(tmp_path, config, epochs=3)
    first.fit(stop_after=2)
    torch.manual_seed(999)
    resumed = make_run(tmp_path, config, epochs=3)
    resumed.resume()
    restored = torch.get_rng_state()
    checkpoint = torch.load(latest_checkpoint(tmp_path), weights_only=False)
    assert torch.equal(restored, checkpoint["rng"][0]["torch"])
    assert resumed.next_epoch == 2 and len(resumed.history) == 2


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="TrainSettings.batch_size: invalid value 0"):
        TrainSettings(epochs=1, batch_size=0)
    with pytest.raises(ValueError, match="max_logit_scale"):
        TrainSettings(epochs=1, batch_size=1, max_logit_scale=0.5)


def test_dataset_smaller_than_a_batch_is_an_error() -> None:
    with pytest.raises(ValueError, match="no full batch of 64"):
        make_run(
            None, RoClipConfig.from_preset("paper", pool_size=8), epochs=1, n=32, batch_size=64
        )


@pytest.mark.parametrize("where", ["under-a-file", "read-only"])
def test_a_checkpoint_dir_that_cannot_be_written_is_refused_before_the_first_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """It used to fail in the first save, after a full epoch of training."""
    if where == "under-a-file":
        (tmp_path / "file").write_text("x")
        target = tmp_path / "file" / "ckpt"
        reason = "is a file, not a directory"
    else:
        target = tmp_path / "ckpt"
        target.mkdir()
        real_access = os.access  # root may write anywhere: simulate the read-only folder
        monkeypatch.setattr(
            os, "access", lambda p, mode: False if Path(p) == target else real_access(p, mode)
        )
        reason = "is not writable"
    with pytest.raises(ValueError, match=f"TrainSettings.checkpoint_dir {target}.*{reason}"):
        make_run(target, RoClipConfig.from_preset("paper", pool_size=8), epochs=1, n=64)


# -- the adapter ---------------------------------------------------------------------------


def _plain_infonce(img: torch.Tensor, txt: torch.Tensor, scale: float) -> torch.Tensor:
    logits = scale * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T
    labels = torch.arange(len(img))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _adapter(**kw) -> RoClipAdapter:
    config = kw.pop(
        "config",
        RoClipConfig.from_preset("paper", pool_size=64, first_defended_epoch=1, defend_every=1),
    )
    return RoClipAdapter(config, plugin_manager=get_plugin_manager(), dist_info=DistInfo(), **kw)


def test_a_loss_without_epoch_start_warns_once_naming_the_call() -> None:
    """Without epoch_start the schedule is never asked: RoCLIP would silently never match."""
    adapter = _adapter()
    img, txt = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    with pytest.warns(RuntimeWarning, match=r"adapter\.epoch_start\(epoch\)") as caught:
        adapter.loss(img, txt, 10.0)
        adapter.loss(img, txt, 10.0)
    assert len([w for w in caught if "epoch_start" in str(w.message)]) == 1
    started = _adapter()
    started.epoch_start(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        started.loss(img, txt, 10.0)


def test_loss_is_clip_infonce_on_unnormalised_features() -> None:
    img, txt = torch.randn(8, 16) * 5, torch.randn(8, 16) * 3
    adapter = _adapter()
    adapter.epoch_start(0)
    got = adapter.loss(img, txt, 20.0)
    torch.testing.assert_close(got, _plain_infonce(img, txt, 20.0))


def test_a_siglip_model_trains_the_sigmoid_loss_and_its_bias() -> None:
    """siglip=True: SigLIP's loss with the model's logit_bias, in plain and matching epochs."""
    model = TwoTower()
    model.logit_bias = nn.Parameter(torch.tensor(-10.0))
    model.eval()  # no dropout: the reference sees the same features
    adapter = _adapter(model=model, siglip=True)
    data = DigitCaptions(16)
    assert adapter.epoch_start(0) is False
    loss = adapter.step(data.images, data.tokens)
    with torch.no_grad():
        img = F.normalize(model.encode_image(data.images), dim=-1)
        txt = F.normalize(model.encode_text(data.tokens), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T + model.logit_bias
        labels = 2 * torch.eye(16) - 1
        want = -F.logsigmoid(labels * logits).sum() / 16
    torch.testing.assert_close(loss.detach(), want)
    loss.backward()
    assert model.logit_bias.grad != 0  # the bias trains
    assert adapter.epoch_start(1) is True
    model.zero_grad()
    adapter.step(data.images, data.tokens).backward()
    assert model.logit_bias.grad != 0 and model.image[0].weight.grad.abs().sum() > 0
    assert torch.count_nonzero(model.text[1].weight.grad) == 0  # matched captions: constants


def test_bf16_features_under_autocast_give_a_float32_loss() -> None:
    img, txt = torch.randn(8, 16).bfloat16(), torch.randn(8, 16).bfloat16()
    fp32, mixed = _adapter(), _adapter()
    fp32.epoch_start(0)
    mixed.epoch_start(0)
    want = fp32.loss(img.float(), txt.float(), 30.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = mixed.loss(img, txt, 30.0)
    assert got.dtype == torch.float32
    assert torch.equal(got, want)  # autocast is off for the loss: no bf16 matmul inside
    # OpenCLIP's behaviour (logits in the ambient autocast, bf16) is one flag away, and differs.
    legacy = _adapter(loss_dtype=None)
    legacy.epoch_start(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not torch.equal(legacy.loss(img, txt, 30.0), want)


def test_every_way_of_getting_features_gives_the_same_loss() -> None:
    model = TwoTower()
    model.eval()  # no dropout: every path sees the same features
    data = DigitCaptions(16)
    images, tokens = data.images, data.tokens
    losses = {}
    sources = {
        "encoders": {"model": model},
        "forward": {"model": ForwardOnly(model)},
        "callables": {
            "encode_image": model.encode_image,
            "encode_text": model.encode_text,
            "logit_scale": model.logit_scale,
        },
        "exp scale": {
            "encode_image": model.encode_image,
            "encode_text": model.encode_text,
            "logit_scale": lambda: model.logit_scale.exp(),
            "logit_scale_is_log": False,
        },
    }
    for name, kw in sources.items():
        adapter = _adapter(**kw)
        adapter.epoch_start(0)
        losses[name] = adapter.step(images, tokens)
    assert torch.equal(losses["encoders"], losses["callables"])
    assert torch.equal(losses["exp scale"], losses["encoders"])
    # forward normalises already; normalising twice differs by rounding only
    torch.testing.assert_close(losses["forward"], losses["encoders"])
    want = _plain_infonce(model.encode_image(images), model.encode_text(tokens), 1 / 0.07)
    torch.testing.assert_close(losses["encoders"], want)
    losses["encoders"].backward()
    assert model.logit_scale.grad is not None  # the scale is trained through the loss


class ForwardOnly(nn.Module):
    """A model that exposes features only through forward (the logit scale comes with them)."""

    def __init__(self, inner: TwoTower) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.inner(images, tokens)
        return out["image_features"], out["text_features"], out["logit_scale"]


def test_model_output_forms() -> None:
    img, txt, scale = torch.ones(2, 3), torch.zeros(2, 3), torch.tensor(5.0)
    assert parse_model_output((img, txt, scale)).logit_scale is scale
    assert parse_model_output([img, txt]).logit_scale is None
    assert parse_model_output({"image_features": img, "text_features": txt}).text_features is txt
    with pytest.raises(TypeError, match="lacks 'image_features'"):
        parse_model_output({"logits": img})
    with pytest.raises(TypeError, match="of type Tensor"):
        parse_model_output(img)
    with pytest.raises(ValueError, match="both encode_image and encode_text"):
        _adapter(encode_image=lambda x: x)
    with pytest.raises(ValueError, match="no logit scale"):
        _adapter(encode_image=lambda x: x, encode_text=lambda x: x).step(img, img)


def test_checkpoint_helpers_round_trip(tmp_path: Path) -> None:
    def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)

    a = _adapter()
    for epoch in range(2):
        a.epoch_start(epoch)
        for step in range(3):
            a.loss(*batch(10 * epoch + step), 10.0)
    path = tmp_path / "model.pt"
    torch.save(a.put_in_checkpoint({"model": {"w": torch.ones(1)}}), path)
    checkpoint = torch.load(path, weights_only=False)
    assert set(checkpoint) == {"model", "roclip"}

    b = _adapter()
    assert b.load_from_checkpoint(checkpoint)
    assert torch.equal(b.pool.features(), a.pool.features()) and b.global_step == 6
    a.epoch_start(2)
    b.epoch_start(2)
    assert a.matching and b.matching
    assert torch.equal(a.loss(*batch(99), 10.0), b.loss(*batch(99), 10.0))

    c = _adapter()
    with pytest.raises(KeyError, match="not saved with adapter.put_in_checkpoint"):
        c.load_from_checkpoint({"model": {}})
    with pytest.warns(UserWarning, match="starting with an empty caption pool"):
        assert not c.load_from_checkpoint({"model": {}}, strict=False)


def test_epoch_start_adopts_or_checks_the_loop_step() -> None:
    config = RoClipConfig.from_preset(
        "paper", pool_size=16, first_defended_epoch=0, defend_every=2, period_steps=4
    )
    fresh = _adapter(config=config)
    # resumed from a checkpoint without RoCLIP state, at global step 4: block 1 (plain)
    assert fresh.epoch_start(3, step=4) is False
    assert fresh.global_step == 4
    fresh.loss(torch.randn(4, 6), torch.randn(4, 6), 10.0)
    with pytest.warns(RuntimeWarning, match="at global step 100 but the RoCLIP state counted 5"):
        fresh.epoch_start(4, step=100)
    assert fresh.global_step == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.epoch_start(5, step=5)  # agreeing counts: silent


@pytest.mark.parametrize("bad", [0, 0.5, -1.0, math.inf, math.nan, "100", True])
def test_clamp_bound_is_checked(bad) -> None:
    adapter = _adapter(model=TwoTower())
    with pytest.raises(ValueError, match=r"max_scale: invalid value .*a finite number >= 1"):
        adapter.clamp_logit_scale(bad)


def test_clamp_logit_scale_like_clip() -> None:
    model = TwoTower()
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert _adapter(model=model).clamp_logit_scale()
    assert float(model.logit_scale.detach()) == pytest.approx(math.log(100))
    raw = nn.Parameter(torch.tensor(500.0))
    assert _adapter(model=model, logit_scale=raw, logit_scale_is_log=False).clamp_logit_scale()
    assert float(raw.detach()) == 100.0
    assert not _adapter(model=model, logit_scale=14.0).clamp_logit_scale()


class _HookLog:
    """Records every observation hook, in order, as plain values."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    @hookimpl
    def roclip_configure(self, config):
        self.calls.append(("configure", config.pool_size))

    @hookimpl
    def roclip_epoch_start(self, epoch, matching, defense):
        self.calls.append(("epoch", epoch, matching, len(defense.pool)))

    @hookimpl
    def roclip_pool_updated(self, pool, added, epoch, step):
        self.calls.append(("pool", len(pool), added, epoch, step, pool.checksum()))

    @hookimpl
    def roclip_after_match(self, stats):
        self.calls.append(
            ("match", stats.epoch, stats.step, stats.pool_fill, stats.matched_similarity,
             stats.own_similarity, stats.margins.tolist(), stats.matched_indices.tolist())
        )  # fmt: skip


def test_the_same_hooks_fire_as_when_driving_the_core_directly() -> None:
    config = RoClipConfig.from_preset("paper", pool_size=20, first_defended_epoch=1, defend_every=1)
    g = torch.Generator().manual_seed(0)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        img = F.normalize(torch.randn(6, 5, generator=g), dim=-1)
        return img, F.normalize(img + 0.5 * torch.randn(6, 5, generator=g), dim=-1)

    batches = [[batch() for _ in range(3)] for _ in range(3)]
    core_log, adapter_log = _HookLog(), _HookLog()
    pm = get_plugin_manager()
    pm.register(core_log)
    core = RoClipDefense(config, plugin_manager=pm, dist_info=DistInfo())
    adapter = RoClipAdapter(
        config,
        plugins=[adapter_log],
        plugin_manager=get_plugin_manager(),
        dist_info=DistInfo(),
        normalize=False,
        loss_dtype=None,
    )
    for epoch, steps in enumerate(batches):
        core.start_epoch(epoch)
        adapter.epoch_start(epoch)
        for img, txt in steps:
            core.compute_loss(img, txt, torch.tensor(10.0))
            adapter.loss(img, txt, 10.0)
    assert adapter_log.calls == core_log.calls
    kinds = [c[0] for c in core_log.calls]
    assert kinds.count("match") == 6 and kinds.count("pool") == 9 and kinds.count("epoch") == 3
    assert adapter.match_summary().matching_steps == 3  # its collector saw the last epoch


@pytest.mark.gpu
def test_restored_pool_follows_the_features_to_the_gpu() -> None:
    adapter = _adapter()
    adapter.epoch_start(0)
    adapter.loss(torch.randn(4, 6), torch.randn(4, 6), 10.0)
    fresh = _adapter()  # no model, no device: the core restores the pool onto the CPU
    fresh.load_state_dict(adapter.state_dict())
    assert fresh.pool.device == torch.device("cpu")
    fresh.epoch_start(1)
    loss = fresh.loss(torch.randn(4, 6, device="cuda"), torch.randn(4, 6, device="cuda"), 10.0)
    assert fresh.pool.device.type == "cuda" and loss.device.type == "cuda"
    assert len(fresh.pool) == 8


@pytest.mark.gpu
def test_trainer_on_cuda_with_bf16(tmp_path: Path) -> None:
    config = RoClipConfig.from_preset("paper", pool_size=64, first_defended_epoch=1, defend_every=1)
    torch.manual_seed(0)
    model = TwoTower().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    settings = TrainSettings(epochs=2, batch_size=32, checkpoint_dir=tmp_path, amp=True)
    trainer = Trainer(model, opt, DigitCaptions(128), settings, roclip=config,
                      plugin_manager=get_plugin_manager(), console=rich_console())  # fmt: skip
    history = trainer.fit()
    assert trainer.adapter.pool.device.type == "cuda"
    assert [h.matching_steps for h in history] == [0, 4] and math.isfinite(history[-1].loss)
    again = TwoTower().cuda()
    resumed = Trainer(again, torch.optim.AdamW(again.parameters()), DigitCaptions(128), settings,
                      roclip=config, plugin_manager=get_plugin_manager())  # fmt: skip
    resumed.resume()
    assert resumed.adapter.pool.device.type == "cuda"
    assert torch.equal(resumed.adapter.pool.features(), trainer.adapter.pool.features())


def test_one_plugin_manager_serves_one_adapter() -> None:
    pm = get_plugin_manager()
    RoClipAdapter(plugin_manager=pm, dist_info=DistInfo())
    with pytest.raises(ValueError, match="already serves another adapter"):
        RoClipAdapter(plugin_manager=pm, dist_info=DistInfo())


def test_a_collector_given_in_plugins_is_the_adapter_s_one_collector() -> None:
    from roclip_plugin.stats import MatchStatsCollector

    pm, mine = get_plugin_manager(), MatchStatsCollector(0.2, keep=10)
    adapter = RoClipAdapter(plugin_manager=pm, dist_info=DistInfo(), plugins=[mine])
    assert adapter.stats is mine
    assert [p for p in pm.get_plugins() if isinstance(p, MatchStatsCollector)] == [mine]
    with pytest.raises(ValueError, match="more than one MatchStatsCollector"):
        RoClipAdapter(
            plugin_manager=get_plugin_manager(),
            dist_info=DistInfo(),
            plugins=[MatchStatsCollector(0.2), MatchStatsCollector(0.2)],
        )


DOC = Path(__file__).resolve().parents[2] / "docs" / "torch-loop.md"


def test_the_documentation_names_the_real_api() -> None:
    import dataclasses
    import importlib
    import re

    text = DOC.read_text()
    used = set(re.findall(r"adapter\.(\w+)", text))
    assert {"epoch_start", "step", "loss", "put_in_checkpoint"} <= used
    adapter = _adapter()
    assert [name for name in used if not hasattr(adapter, name)] == []
    documented = set(re.findall(r"^\| `(\w+)` \| (?:required|`)", text, flags=re.M))
    assert documented == {f.name for f in dataclasses.fields(TrainSettings)}
    module, attr = re.search(r'csv_stats = "([\w.]+):(\w+)"', text).groups()
    assert hasattr(importlib.import_module(module), attr)


def test_package_never_imports_open_clip() -> None:
    import subprocess

    code = "import roclip_torch, sys; print(sorted(m for m in sys.modules if 'open_clip' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_adapter_augmentation_policy_follows_the_epoch() -> None:
    adapter = _adapter(
        config=RoClipConfig.from_preset("paper", text_aug="eda", eda_synonyms="off", seed=3)
    )
    policy = adapter.augmentation
    assert adapter.augmentation is policy  # built once
    caption = "a small photo of the handwritten digit seven"
    adapter.epoch_start(0)
    first = [policy.text(caption, index=i) for i in range(20)]
    adapter.epoch_start(1)
    assert policy.epoch == 1
    second = [policy.text(caption, index=i) for i in range(20)]
    assert first != second  # fresh draws each epoch (text_aug_refresh=epoch)
    assert [policy.text(caption, epoch=0, index=i) for i in range(20)] == first


def test_adapter_image_stop_fraction_follows_the_run_length() -> None:
    config = RoClipConfig(image_aug="none", image_aug_stop_fraction=0.5)
    adapter = _adapter(config=config, total_epochs=10)
    assert adapter.augmentation.image_stop_epoch == 5
    adapter.set_run_length(4, 100)  # a length learnt later moves the stop with it
    assert adapter.augmentation.image_stop_epoch == 2


def test_adapter_warns_about_a_stop_fraction_only_if_training_starts_without_a_length() -> None:
    """A loop builds its transform (the policy) before it knows the run length: no warning then.

    The warning comes at ``epoch_start`` where no length was ever given, not before.
    """
    import warnings

    from roclip_plugin.augment import policy as augment_policy

    config = RoClipConfig(image_aug="none", image_aug_stop_fraction=0.5)
    augment_policy._warned.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        told = _adapter(config=config)
        assert told.augmentation.image_stop_epoch is None  # built before the length is known
        told.set_run_length(6, 10)
        told.epoch_start(0)
    assert told.augmentation.image_stop_epoch == 3
    never = _adapter(config=config)
    never.augmentation  # noqa: B018 - built without a length, as above
    with pytest.warns(RuntimeWarning, match="--roclip-image-aug-stop-fraction needs the run"):
        never.epoch_start(0)


def test_adapter_augmentation_none_leaves_captions_alone() -> None:
    adapter = _adapter(config=RoClipConfig.from_preset("paper", text_aug="none", image_aug="none"))
    assert adapter.augmentation.text("a cat", index=0) == "a cat"


def test_trainer_warns_when_the_defense_would_be_off_or_ineffective() -> None:
    """2 epochs with the default first matching epoch 5; a pool of half an epoch's pairs."""
    trainer = make_run(None, RoClipConfig.from_preset("paper", pool_size=128), epochs=2)
    with pytest.warns(RuntimeWarning) as record:
        history = trainer.fit()
    messages = [str(w.message) for w in record if w.category is RuntimeWarning]
    assert any("never defends" in m and "--roclip-first-defended-epoch" in m for m in messages)
    assert any("(--roclip-pool-size 128) holds 50% of an epoch's 256" in m for m in messages)
    assert [h.matching for h in history] == [False, False]


def test_the_trainer_gives_each_row_its_dataset_index_as_sample_id(tmp_path: Path) -> None:
    """The robust preset's per-sample history needs ids: the Trainer passes dataset indices."""
    trainer = make_run(None, RoClipConfig.from_preset("robust", pool_size=64), epochs=2)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    step = trainer.adapter.step

    def recording_step(images, texts, sample_ids=None):
        seen.append((images.detach().clone(), sample_ids))
        return step(images, texts, sample_ids=sample_ids)

    trainer.adapter.step = recording_step
    summaries = trainer.fit()
    data = DigitCaptions(256)
    assert len(seen) == 2 * (256 // 32) and summaries[1].matching
    for images, ids in seen:
        assert ids is not None and ids.dtype == torch.int64
        assert torch.equal(images, data.images[ids])
    epoch_one = torch.cat([ids for _, ids in seen[8:]])
    assert sorted(epoch_one.tolist()) == list(range(256))  # each row once, under its own id


def test_the_history_gives_every_row_its_own_slot_when_the_last_batch_is_dropped() -> None:
    """250 rows in batches of 32: drop_last trains 224 a epoch, but ids run to 249.

    Sized by the batches' pairs, the history would hand rows 224-249 the slots of rows 0-25
    (id mod slots), blending their records; sized by the dataset, each row keeps its own.
    """
    trainer = make_run(None, RoClipConfig.from_preset("robust", pool_size=64), epochs=2, n=250)
    assert trainer.settings.drop_last and len(trainer.loader) * 32 == 224
    trainer.fit()
    table = trainer.adapter.defense.risk.scorer.table
    assert table.slots == 250
    assert table.visited() > 224  # rows from the dropped tail of one epoch trained in another


def test_an_adapter_built_without_the_run_length_gets_a_slot_per_row_from_the_trainer() -> None:
    """The Trainer tells a user-built adapter the run length, rows included, before training:
    the history is sized by them as if the adapter had been built with them."""
    adapter = RoClipAdapter(
        RoClipConfig.from_preset("robust", pool_size=64),
        plugin_manager=get_plugin_manager(),
        dist_info=DistInfo(),
    )
    trainer = make_run(None, adapter, epochs=2, n=250)
    trainer.fit()
    assert trainer.adapter is adapter
    assert adapter.defense.risk.scorer.table.slots == 250
