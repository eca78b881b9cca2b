"""The tensor-resident training path: the same steps as roclip_torch.Trainer, and its audit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("open_clip")

from roclip_kit.train.audit import MatchAudit  # noqa: E402
from roclip_kit.train.tensor import (  # noqa: E402
    MEAN,
    STD,
    TensorTrainSettings,
    build_model,
    cosine_schedule,
    epoch_order,
    make_optimizer,
    make_tokenizer,
    model_cfg,
    train_tensor,
)
from roclip_torch import Trainer, TrainSettings  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from roclip_plugin import RoClipConfig  # noqa: E402
from roclip_plugin.pool import CaptionPool  # noqa: E402

from ..tiny import poisoned_digits  # noqa: E402

TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 16, "head_width": 8, "patch_size": 8},
    "text_cfg": {"context_length": 16, "width": 16, "heads": 2, "layers": 1},
}
PLAIN = {"image_aug": "none", "text_aug": "none"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory):
    return poisoned_digits(tmp_path_factory.mktemp("tensor-train"))


# The gradient norm of this run starts near 100 and ends near 1 (measured): a limit of 1 clips
# most of its steps. A decay of 0.5 at lr 2e-3 shrinks the weights by 0.1% a step, far beyond
# the comparison's tolerance. Either one missing from the tensor path fails the comparison.
EQUIVALENCE = {"grad_clip_norm": 1.0, "wd": 0.5}


def _settings(**changes) -> TensorTrainSettings:
    base = {"epochs": 3, "batch_size": 32, "lr": 2e-3, "warmup_steps": 3, "seed": 3}
    return TensorTrainSettings(preset=TINY, **{**base, **changes})


def _openclip_adamw(model: torch.nn.Module, lr: float, wd: float) -> torch.optim.AdamW:
    """AdamW with OpenCLIP's ``exclude`` rule (training/main.py), written out here.

    Not the kit's ``make_optimizer``: the reference must not share the code it checks, or a
    decay lost from the kit would be lost from both sides and the comparison still pass.
    """

    def exclude(name: str, p: torch.nn.Parameter) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": wd},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def _trainer_run(data, settings: TensorTrainSettings, config: RoClipConfig):
    """The same run through roclip_torch.Trainer, on a TensorDataset of the same inputs."""
    torch.manual_seed(settings.seed)
    tokenizer = make_tokenizer(data, TINY["text_cfg"]["context_length"])
    model = build_model(model_cfg(TINY, tokenizer.vocab_size))
    optimizer = _openclip_adamw(model, settings.lr, settings.wd)
    steps = len(data.train) // settings.batch_size
    scheduler = cosine_schedule(optimizer, settings.warmup_steps, steps * settings.epochs)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    images = (data.train.images.float().div_(255.0) - mean) / std
    dataset = TensorDataset(images, tokenizer(data.train.captions))
    train = TrainSettings(
        epochs=settings.epochs,
        batch_size=settings.batch_size,
        seed=settings.seed,
        grad_clip_norm=settings.grad_clip_norm,
        progress=False,
    )
    trainer = Trainer(model, optimizer, dataset, train, roclip=config, scheduler=scheduler)
    return model, trainer.fit(), trainer.adapter


def _differences(run, model: torch.nn.Module, losses: list[float], pool: torch.Tensor) -> list:
    """What differs between a tensor run and a reference beyond the comparison's tolerance."""
    found = [] if [r.loss for r in run.epochs] == pytest.approx(losses, rel=1e-6) else ["loss"]
    if not torch.allclose(run.roclip_state["pool"]["features"], pool, atol=1e-6):
        found.append("pool")
    for (name, a), b in zip(
        run.model.state_dict().items(), model.state_dict().values(), strict=True
    ):
        if not torch.allclose(a, b, atol=1e-6):
            found.append(name)
    return found


def test_same_losses_pool_and_weights_as_roclip_torch_trainer(data) -> None:
    """Clipping and decay included: the Trainer is given both, the tensor path must apply both."""
    settings = _settings(**EQUIVALENCE)
    config = RoClipConfig.from_preset(
        "paper", pool_size=48, first_defended_epoch=1, defend_every=1, **PLAIN
    )
    run = train_tensor(data, settings, config)
    model, history, adapter = _trainer_run(data, settings, config)
    assert [r.matching for r in run.epochs] == [s.matching for s in history] == [0, 1, 1]
    assert [r.matching_steps for r in run.epochs] == [s.matching_steps for s in history]
    losses, pool = [s.loss for s in history], adapter.pool.features()
    assert _differences(run, model, losses, pool) == []
    # The comparison can see each of them: without it, the same run is out of tolerance.
    for missing in ({"grad_clip_norm": None}, {"wd": 0.0}):
        without = train_tensor(data, _settings(**{**EQUIVALENCE, **missing}), config)
        assert "loss" in _differences(without, model, losses, pool), missing


def test_clip_loss_is_the_plain_step_of_roclip(data) -> None:
    settings = _settings(epochs=1)
    never = RoClipConfig.from_preset(
        "paper", pool_size=48, first_defended_epoch=None, defend_every=50, **PLAIN
    )
    clip = train_tensor(data, settings, None)
    with pytest.warns(RuntimeWarning, match="never defends"):
        plain = train_tensor(data, settings, never)
    assert clip.epochs[0].loss == pytest.approx(plain.epochs[0].loss, rel=1e-6)
    assert clip.roclip_state is None and plain.roclip_state is not None


def test_augmentation_alone_changes_the_batches_but_builds_no_pool(data) -> None:
    settings = _settings(epochs=1)
    config = RoClipConfig.from_preset(
        "paper", pool_size=48, image_aug="roclip-small", text_aug="eda"
    )
    clip = train_tensor(data, settings, None)
    augmented = train_tensor(data, settings, config, defend=False)
    assert augmented.roclip_state is None
    assert augmented.epochs[0].loss != pytest.approx(clip.epochs[0].loss, rel=1e-4)


def test_images_train_unaugmented_from_the_stop_epoch(data) -> None:
    settings = _settings(epochs=2)
    config = RoClipConfig(image_aug="roclip-small", text_aug="none")
    augmented = train_tensor(data, settings, config, defend=False)
    stopped = train_tensor(data, settings, config.replace(image_aug_stop_epoch=1), defend=False)
    never = train_tensor(data, settings, config.replace(image_aug_stop_epoch=0), defend=False)
    clip = train_tensor(data, settings, None)
    assert stopped.epochs[0].loss == augmented.epochs[0].loss  # epoch 0 still augmented
    assert stopped.epochs[1].loss != pytest.approx(augmented.epochs[1].loss, rel=1e-4)
    assert [e.loss for e in never.epochs] == pytest.approx([e.loss for e in clip.epochs], rel=1e-6)


def test_the_history_gives_every_row_its_own_slot(data) -> None:
    """The last incomplete batch is left out, but its rows' ids must not share the first's slots.

    Row ids run to ``len(data.train) - 1``; a table sized by the batches' pairs would be
    shorter and fold the tail's ids onto the head's (id mod slots).
    """
    settings = _settings(epochs=2, batch_size=48)
    assert len(data.train) % settings.batch_size  # a tail is left out of each epoch
    config = RoClipConfig.from_preset("robust", pool_size=48)
    run = train_tensor(data, settings, config)
    table = run.roclip_state["risk"]["scorer"]["table"]
    assert table["slots"] == len(data.train)


def test_data_order_is_distributed_samplers() -> None:
    sampler = torch.utils.data.DistributedSampler(range(50), num_replicas=1, rank=0, seed=4)
    sampler.set_epoch(2)
    assert epoch_order(50, 4, 2).tolist() == list(sampler)


def test_suspicious_files_are_written_for_matching_epochs(data, tmp_path: Path) -> None:
    config = RoClipConfig.from_preset(
        "paper", pool_size=48, first_defended_epoch=1, defend_every=2, **PLAIN
    )
    run = train_tensor(data, _settings(), config, run_dir=tmp_path)
    assert run.defended_epochs == [2] and sorted(run.suspicious) == [2]
    lines = run.suspicious[2].read_text().splitlines()
    assert lines[0] == "index,key,caption,margin"  # one format for every trainer (empty key)
    rows = [int(line.split(",")[0]) for line in lines[1:]]
    assert all(line.split(",")[1] == "" for line in lines[1:])
    assert len(rows) == len(set(rows)) == len(data.train) - len(data.train) % 32
    audit = run.epochs[1].audit
    assert audit["steps"] == len(data.train) // 32
    assert audit["images"] + audit["poisoned"] == 32 * audit["steps"]


def test_checkpoint_holds_weights_config_and_tokenizer(data, tmp_path: Path) -> None:
    run = train_tensor(data, _settings(epochs=1), None)
    saved = torch.load(run.save(tmp_path / "final.pt"), weights_only=False)
    assert saved["format"] == "roclip_kit.tensor/1" and saved["model_cfg"] == run.cfg
    assert saved["tokenizer"]["words"] == run.tokenizer.words
    assert saved["state_dict"].keys() == run.model.state_dict().keys()


def test_an_unknown_preset_and_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown model preset 'huge'"):
        TensorTrainSettings(preset="huge")
    with pytest.raises(ValueError, match="--batch-size"):
        TensorTrainSettings(batch_size=0)
    with pytest.raises(ValueError, match="grad_clip_norm: 0.0 must be None or > 0"):
        TensorTrainSettings(grad_clip_norm=0.0)


class _Stats:
    def __init__(self, matched: list[int]) -> None:
        self.matched_indices = torch.tensor(matched)
        self.margins = torch.zeros(len(matched))


def test_audit_mirrors_the_pool_through_wrap_around(data) -> None:
    """Captions of rows 0-2 then 3-5 in a pool of 4: slots hold rows 4, 5, 2, 3 (oldest 2)."""
    audit = MatchAudit(data)
    pool = CaptionPool(4)
    audit.pool = pool
    for rows in ([0, 1, 2], [3, 4, 5]):
        audit.batch_rows = torch.tensor(rows)
        added = pool.enqueue(torch.randn(3, 8))
        audit.roclip_pool_updated(pool, added)
    logical_to_row = audit.slot_rows[pool.physical_slots(torch.arange(4))].tolist()
    assert logical_to_row == [2, 3, 4, 5]
    # images of rows 10 and 11 matched to the oldest (row 2) and newest (row 5) captions
    audit.batch_rows = torch.tensor([10, 11])
    audit.roclip_after_match(_Stats([0, 3]))
    labels, images = data.train.labels, data.image_labels
    expected = int(labels[2] == images[10]) + int(labels[5] == images[11])
    summary = audit.summary()
    assert summary.steps == 1 and summary.images == 2
    assert summary.purity == expected / 2 and summary.self_matches == 0.0


def test_audit_counts_self_matches_and_poison_class(data) -> None:
    audit = MatchAudit(data)
    pool = CaptionPool(8)
    audit.pool = pool
    row = data.poisoned_rows[0]
    audit.batch_rows = torch.tensor([row, 0])
    audit.roclip_pool_updated(pool, pool.enqueue(torch.randn(2, 8)))
    audit.roclip_after_match(_Stats([0, 0]))  # both images matched to the poisoned caption
    summary = audit.summary()
    assert summary.poisoned == 1 and summary.poison_class == 1.0
    assert summary.self_matches == 0.5


def test_audit_counts_the_split_recall_of_each_attack(data) -> None:
    from roclip_kit.data.tensors import BACKDOOR, TARGETED

    from roclip_plugin.contrastive import RiskStats

    kinds = data.poison_kind
    targeted = torch.nonzero(kinds == TARGETED).flatten()[:3]
    backdoor = torch.nonzero(kinds == BACKDOOR).flatten()[:2]
    ids = torch.cat([targeted, backdoor, torch.tensor([0])])
    assert kinds[0] == 0 and len(targeted) == 3 and len(backdoor) == 2
    audit = MatchAudit(data)
    assert audit.summary().risk_recall_targeted is None  # nothing judged yet
    risky = torch.tensor([True, True, False, False, True, True])
    audit.roclip_after_risk(RiskStats(1, 0, ids, torch.zeros(6), risky, "drop"))
    audit.roclip_after_risk(RiskStats(1, 1, None, torch.zeros(6), risky, "drop"))  # no ids
    summary = audit.summary()
    assert summary.risk_recall_targeted == pytest.approx(2 / 3)
    assert summary.risk_recall_backdoor == pytest.approx(1 / 2)
    audit.reset()
    assert audit.summary().risk_recall_backdoor is None  # counts start afresh each epoch


def test_audit_stops_following_when_the_pool_refuses_rows(data) -> None:
    audit = MatchAudit(data)
    pool = CaptionPool(8)
    audit.batch_rows = torch.tensor([0, 1])
    rows = torch.randn(2, 8)
    rows[1] = float("nan")
    with pytest.warns(RuntimeWarning):
        added = pool.enqueue(rows)
    audit.roclip_pool_updated(pool, added)
    assert not audit.in_sync
    audit.pool = pool
    audit.slot_rows = torch.zeros(8, dtype=torch.long)
    audit.roclip_after_match(_Stats([0, 0]))
    assert audit.summary().steps == 0  # nothing counted against a mirror out of step


def test_roclip_eval_scores_a_tensor_checkpoint_as_the_run_did(data, tmp_path: Path) -> None:
    import json

    import roclip_kit.plugin
    from roclip_kit.evaluate.run import EvalData, EvalSettings, evaluate_model
    from roclip_kit.train.tensor import loaded_model

    from roclip_plugin import get_plugin_manager
    from roclip_plugin.cli import main

    run = train_tensor(data, _settings(epochs=1), None)
    path = run.save(tmp_path / "final.pt")
    settings = EvalSettings(linear_probe=False)
    eval_data = EvalData.from_dataset_dir(data.root, manifest=data.manifest)
    loaded = loaded_model(run.model, run.tokenizer, run.cfg, name="x", checkpoint=path, epoch=1)
    direct = evaluate_model(loaded, eval_data, settings)
    pm = get_plugin_manager(autoload=False)
    pm.register(roclip_kit.plugin)
    out = tmp_path / "eval.json"
    argv = ["eval", "--checkpoint", str(path), "--dataset", str(data.root), "--no-linear-probe",
            "--manifest", str(data.manifest), "--json", str(out)]  # fmt: skip
    assert main(argv, pm=pm) == 0
    scored = json.loads(out.read_text())
    assert scored["zero_shot"] == direct["zero_shot"]
    assert scored["targeted"]["success_rate"] == direct["targeted"]["success_rate"]
    assert scored["backdoor"]["success_rate"] == direct["backdoor"]["success_rate"]


def test_weight_decay_follows_openclips_rule_and_the_docs_say_so() -> None:
    """OpenCLIP exempts parameters with fewer than 2 dims and names holding bn, ln, bias or
    logit_scale; 2-D embeddings (token, positional) are decayed. The docs must say the same."""
    model = build_model(model_cfg(TINY, 50))
    optimizer = make_optimizer(model, 1e-3, 0.2)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        exempt = param.ndim < 2 or any(k in name for k in ("bn", "ln", "bias", "logit_scale"))
        assert decay[id(param)] == (0.0 if exempt else 0.2), name
    named = dict(model.named_parameters())
    for embedding in ("token_embedding.weight", "positional_embedding"):
        assert decay[id(named[embedding])] == 0.2, embedding
    assert decay[id(named["visual.class_embedding"])] == 0.0
    doc = " ".join((Path(__file__).parents[4] / "docs" / "kit-training.md").read_text().split())
    assert "token and positional embeddings (2-D) are decayed" in doc
