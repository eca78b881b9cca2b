from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from roclip_plugin import RoClipConfig, RoClipDefense, get_plugin_manager, hookimpl
from roclip_plugin.loss import DistInfo


def _batch(epoch: int, step: int, batch: int = 6, dim: int = 5) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(100 * epoch + step)
    img = F.normalize(torch.randn(batch, dim, generator=g), dim=-1)
    txt = F.normalize(img + 0.4 * torch.randn(batch, dim, generator=g), dim=-1)
    return img, txt


def _make(config: RoClipConfig, **kw) -> RoClipDefense:
    return RoClipDefense(config, plugin_manager=get_plugin_manager(), dist_info=DistInfo(), **kw)


def _train(defense: RoClipDefense, epochs: range, steps: int = 4) -> list[float]:
    losses = []
    for epoch in epochs:
        defense.start_epoch(epoch)
        for step in range(steps):
            losses.append(float(defense.compute_loss(*_batch(epoch, step), torch.tensor(8.0))))
    return losses


@pytest.mark.parametrize(
    "config",
    [
        RoClipConfig.from_preset("paper", pool_size=10, first_defended_epoch=1, defend_every=2),
        RoClipConfig.from_preset("reference", pool_size=7),
        RoClipConfig.from_preset(
            "paper", pool_size=9, first_defended_epoch=0, period_steps=3, defend_every=2
        ),
        RoClipConfig.from_preset(
            "paper",
            pool_size=8,
            schedule="adaptive",
            adaptive_threshold=0.3,
            first_defended_epoch=1,
        ),
    ],
    ids=["periodic", "reference", "per-step", "adaptive"],
)
def test_resume_is_exact(tmp_path: Path, config: RoClipConfig) -> None:
    full = _make(config, total_epochs=5)
    want = _train(full, range(5))

    first = _make(config, total_epochs=5)
    got = _train(first, range(2))
    first.save(tmp_path / "roclip.pt")
    resumed = _make(config, total_epochs=5)
    resumed.load(tmp_path / "roclip.pt")
    got += _train(resumed, range(2, 5))

    assert got == want
    assert torch.equal(resumed.pool.features(), full.pool.features())
    assert resumed.schedule.alignment == full.schedule.alignment
    assert resumed.step == full.step == 20


def test_schedule_drives_matching_epochs() -> None:
    defense = _make(
        RoClipConfig.from_preset("paper", pool_size=16, first_defended_epoch=2, defend_every=2)
    )
    assert [defense.start_epoch(e) for e in range(7)] == [
        False,
        False,
        True,
        False,
        True,
        False,
        True,
    ]


def test_reference_preset_numbering_and_pool_policy() -> None:
    defense = _make(RoClipConfig.from_preset("reference", defend_every=3, pool_size=50))
    matching = []
    for epoch in range(6):
        matching.append(defense.start_epoch(epoch))
        before = len(defense.pool)
        defense.compute_loss(*_batch(epoch, 0), torch.tensor(5.0))
        assert (len(defense.pool) > before) == matching[-1]  # pool updated in matching epochs only
    # the authors: 1-based epochs, matching when epoch % K == 0
    assert matching == [(e + 1) % 3 == 0 for e in range(6)]


def test_per_step_schedule_switches_inside_an_epoch() -> None:
    defense = _make(
        RoClipConfig.from_preset(
            "paper", pool_size=64, period_steps=2, first_defended_epoch=1, defend_every=2
        )
    )
    defense.start_epoch(0)
    flags = []
    for step in range(8):
        defense.compute_loss(*_batch(0, step), torch.tensor(5.0))
        flags.append(defense.matching)
    # units of 2 steps: unit 0 plain, 1 matching, 2 plain, 3 matching
    assert flags == [False, False, True, True, False, False, True, True]


def test_adaptive_start_waits_for_alignment() -> None:
    config = RoClipConfig.from_preset(
        "paper",
        pool_size=32,
        schedule="adaptive",
        adaptive_threshold=0.99,
        first_defended_epoch=0,
        defend_every=1,
    )
    defense = _make(config)
    defense.start_epoch(0)
    for _step in range(3):  # random pairs: in-batch accuracy is low
        img = F.normalize(torch.randn(8, 5), dim=-1)
        defense.compute_loss(img, F.normalize(torch.randn(8, 5), dim=-1), torch.tensor(5.0))
    assert not defense.start_epoch(1)
    assert defense.schedule.alignment[0] < 0.99
    for _step in range(3):  # aligned pairs: accuracy 1
        img = F.normalize(torch.randn(8, 5), dim=-1)
        defense.compute_loss(img, img, torch.tensor(5.0))
    assert defense.start_epoch(2)  # epoch 1's accuracy is recorded as epoch 2 starts
    assert defense.schedule.alignment[1] == 1.0
    assert defense.start_epoch(3)


def test_warmup_fraction_uses_run_length() -> None:
    config = RoClipConfig.from_preset("paper", pool_size=8, warmup_fraction=0.5, defend_every=1)
    defense = _make(config, total_epochs=6)
    assert [defense.start_epoch(e) for e in range(6)] == [False] * 3 + [True] * 3
    with pytest.raises(ValueError, match="--roclip-warmup-fraction needs the run length"):
        _make(config).start_epoch(0)


def test_load_warns_on_changed_settings(tmp_path: Path) -> None:
    a = _make(RoClipConfig.from_preset("paper", pool_size=8, defend_every=2))
    a.save(tmp_path / "s.pt")
    b = _make(RoClipConfig.from_preset("paper", pool_size=8, defend_every=3))
    with pytest.warns(RuntimeWarning, match="defend_every: 2 -> 3"):
        b.load(tmp_path / "s.pt")


def test_load_errors_name_the_problem(tmp_path: Path) -> None:
    d = _make(RoClipConfig.from_preset("paper", pool_size=8))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        d.load(tmp_path / "missing.pt")
    state = d.state_dict()
    state["version"] = 99
    with pytest.raises(ValueError, match="state version 99 is not supported"):
        d.load_state_dict(state)
    other = _make(RoClipConfig.from_preset("paper", pool_size=9))
    with pytest.raises(ValueError, match="resume with the same --roclip-pool-size"):
        other.load_state_dict(d.state_dict())


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = _make(RoClipConfig.from_preset("paper", pool_size=8))
    path = d.save(tmp_path / "s.pt")
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        d.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.pt"]


def test_state_is_saved_on_cpu_and_loads_into_a_fresh_defense(tmp_path: Path) -> None:
    d = _make(RoClipConfig.from_preset("paper", pool_size=8))
    d.start_epoch(0)
    d.compute_loss(*_batch(0, 0), torch.tensor(5.0))
    state = d.state_dict()
    assert state["pool"]["features"].device.type == "cpu"
    e = RoClipDefense(
        RoClipConfig.from_preset("paper", pool_size=8),
        plugin_manager=get_plugin_manager(),
        device="cpu",
    )
    e.load_state_dict(state)
    assert torch.equal(e.pool.features(), d.pool.features())


@pytest.mark.gpu
def test_state_round_trip_cpu_to_cuda() -> None:
    d = _make(RoClipConfig.from_preset("paper", pool_size=8))
    d.start_epoch(0)
    d.compute_loss(*_batch(0, 0), torch.tensor(5.0))
    e = RoClipDefense(
        RoClipConfig.from_preset("paper", pool_size=8),
        plugin_manager=get_plugin_manager(),
        device="cuda",
    )
    e.load_state_dict(d.state_dict())
    assert e.pool.features().device.type == "cuda"
    assert torch.equal(e.pool.features().cpu(), d.pool.features())


@pytest.mark.gpu
def test_restored_pool_follows_the_features_to_cuda() -> None:
    d = _make(RoClipConfig.from_preset("paper", pool_size=8))
    d.start_epoch(0)
    d.compute_loss(*_batch(0, 0), torch.tensor(5.0))
    e = _make(RoClipConfig.from_preset("paper", pool_size=8))
    e.load_state_dict(d.state_dict())  # no device given: restored on the CPU
    e.start_epoch(0)
    img, txt = (t.cuda() for t in _batch(0, 1))
    e.compute_loss(img, txt, torch.tensor(5.0, device="cuda"))
    assert e.pool.features().device.type == "cuda"


def test_state_without_an_entry_names_it() -> None:
    from roclip_plugin.io import StateError

    d = _make(RoClipConfig.from_preset("paper", pool_size=8))
    state = d.state_dict()
    del state["pool"]
    with pytest.raises(StateError, match="RoCLIP state lacks 'pool'"):
        d.load_state_dict(state)
    with pytest.raises(StateError, match="RoCLIP state: expected a dict, got list"):
        d.load_state_dict([1, 2])  # type: ignore[arg-type]


@pytest.mark.parametrize("content", [b"", b"not a torch file", b"PK\x03\x04truncated zip"])
def test_corrupt_state_files_name_the_path(tmp_path: Path, content: bytes) -> None:
    from roclip_plugin.io import StateError

    path = tmp_path / "broken.roclip"
    path.write_bytes(content)
    with pytest.raises(StateError, match=r"RoCLIP state file .*broken\.roclip (is empty|cannot)"):
        _make(RoClipConfig.from_preset("paper", pool_size=8)).load(path)


def test_truncated_state_file_names_the_path(tmp_path: Path) -> None:
    from roclip_plugin.io import StateError

    d = _make(RoClipConfig.from_preset("paper", pool_size=8))
    path = d.save(tmp_path / "s.roclip")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(StateError, match=r"s\.roclip cannot be read .*truncated, corrupt"):
        d.load(path)


class EpochStarts:
    def __init__(self) -> None:
        self.seen: list[tuple[int, bool]] = []

    @hookimpl
    def roclip_epoch_start(self, epoch, matching):
        self.seen.append((epoch, matching))


def test_step_blocks_on_epoch_boundaries_start_each_epoch_with_its_own_block() -> None:
    """period_steps=5 and 5 steps an epoch: each epoch is one block; epochs 1 and 3 match."""
    pm = get_plugin_manager()
    starts = EpochStarts()
    pm.register(starts)
    config = RoClipConfig.from_preset(
        "paper", pool_size=64, period_steps=5, first_defended_epoch=1, defend_every=2
    )
    defense = RoClipDefense(
        config, plugin_manager=pm, dist_info=DistInfo(), total_epochs=4, steps_per_epoch=5
    )
    announced, per_step = [], []
    for epoch in range(4):
        announced.append(defense.start_epoch(epoch))
        for step in range(5):
            defense.compute_loss(*_batch(epoch, step), torch.tensor(5.0))
            per_step.append(defense.matching)
    assert announced == [False, True, False, True]
    assert starts.seen == [(e, m) for e, m in enumerate(announced)]
    assert per_step == [m for m in announced for _ in range(5)]


@pytest.mark.parametrize(
    ("config", "epochs", "steps", "flag"),
    [
        (RoClipConfig.from_preset("paper"), 5, None, "--roclip-first-defended-epoch"),
        (
            RoClipConfig.from_preset("paper", first_defended_epoch=50),
            10,
            None,
            "--roclip-first-defended-epoch",
        ),
        (
            RoClipConfig.from_preset("paper", first_defended_epoch=3, period_steps=10),
            2,
            10,
            "--roclip-period-steps",
        ),
        (RoClipConfig.from_preset("reference", defend_every=4), 3, None, "--roclip-defend-every"),
        (
            RoClipConfig.from_preset("paper", schedule="adaptive", first_defended_epoch=0),
            1,
            None,
            "adaptive",
        ),
        (
            RoClipConfig.from_preset("paper", schedule="ramp", first_defended_epoch=4),
            4,
            None,
            "ramp",
        ),
    ],
    ids=["default-5-epochs", "first-50", "step-blocks", "reference", "adaptive", "ramp"],
)
def test_a_run_without_a_matching_unit_warns_with_the_flag_to_change(
    config: RoClipConfig, epochs: int, steps: int | None, flag: str
) -> None:
    defense = _make(config, total_epochs=epochs, steps_per_epoch=steps)
    with pytest.warns(RuntimeWarning, match="never defends") as record:
        defense.start_epoch(0)
    assert flag in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        defense.start_epoch(1)  # said once per run, not every epoch


@pytest.mark.parametrize(
    "config",
    [
        RoClipConfig.from_preset("paper"),
        RoClipConfig.from_preset("paper", schedule="ramp"),
        RoClipConfig.from_preset("paper", schedule="adaptive", first_defended_epoch=0),
        RoClipConfig.from_preset("reference"),
        RoClipConfig.from_preset("paper", period_steps=10, first_defended_epoch=11),
    ],
)
def test_a_run_with_a_matching_unit_is_quiet(config: RoClipConfig) -> None:
    defense = _make(config, total_epochs=6, steps_per_epoch=20, samples_per_epoch=300_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        defense.start_epoch(0)


class AlwaysMatch:
    @hookimpl
    def roclip_should_match(self):
        return True


def test_a_plugin_schedule_is_not_second_guessed() -> None:
    pm = get_plugin_manager()
    pm.register(AlwaysMatch())
    defense = RoClipDefense(
        RoClipConfig.from_preset("paper"), plugin_manager=pm, dist_info=DistInfo(), total_epochs=2
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert defense.start_epoch(0)


def test_a_pool_larger_than_a_share_of_the_epoch_warns() -> None:
    defense = _make(
        RoClipConfig.from_preset("paper", pool_size=128), total_epochs=10, samples_per_epoch=256
    )
    with pytest.warns(RuntimeWarning, match=r"pool \(--roclip-pool-size 128\) holds 50%") as rec:
        defense.start_epoch(0)
    message = str(rec[0].message)
    assert "own caption" in message and "about 2%" in message and "at most 25" in message
    quiet = _make(
        RoClipConfig.from_preset("paper", pool_size=25), total_epochs=10, samples_per_epoch=256
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet.start_epoch(0)


# -- gradient accumulation ---------------------------------------------------------------------


def _half_accumulated_step() -> RoClipDefense:
    """A defense with accum_freq 2 after the first of its step's two loss calls."""
    defense = RoClipDefense(
        RoClipConfig.from_preset("paper", pool_size=16), accum_freq=2, dist_info=DistInfo()
    )
    defense.start_epoch(0)
    img = F.normalize(torch.randn(4, 8), dim=-1)
    defense.compute_loss(img, img.clone(), torch.tensor(10.0))
    return defense


def test_the_state_is_refused_between_the_calls_of_an_accumulated_step():
    defense = _half_accumulated_step()
    with pytest.raises(RuntimeError, match="after 1 of the 2 loss calls"):
        defense.state_dict()
    img = F.normalize(torch.randn(4, 8), dim=-1)
    defense.compute_loss(img, img.clone(), torch.tensor(10.0))
    assert defense.state_dict()["step"] == 1 and len(defense.pool) == 4


def test_an_epoch_starting_inside_an_accumulated_step_discards_it():
    defense = _half_accumulated_step()
    with pytest.warns(RuntimeWarning, match="starts after 1 of the 2 loss calls"):
        defense.start_epoch(1)
    assert defense.loss.call_in_step == 0 and len(defense.pool) == 0


def test_a_row_count_given_late_sizes_the_history_until_it_holds_memories() -> None:
    """``history_slots`` 0: a defense built without ``samples_per_epoch`` gets a slot per row
    when the count comes before training; once the history holds memories it keeps its size
    and says how to size it from the start."""
    from roclip_plugin.risk import DEFAULT_HISTORY_SLOTS

    config = RoClipConfig.from_preset("robust", pool_size=16)
    defense = _make(config, total_epochs=3)
    table = defense.risk.scorer.table
    assert table.slots == DEFAULT_HISTORY_SLOTS
    defense.set_samples_per_epoch(250)
    assert table.slots == 250 and defense.samples_per_epoch == 250
    defense.start_epoch(0)
    defense.set_sample_ids(torch.arange(6))
    defense.compute_loss(*_batch(0, 0), torch.tensor(8.0))
    assert table.visited() == 6
    with pytest.warns(RuntimeWarning, match="keeps its 250 slots.*--roclip-history-slots"):
        defense.set_samples_per_epoch(5000)
    assert table.slots == 250 and defense.samples_per_epoch == 5000


def test_a_late_row_count_leaves_history_slots_set_by_the_user_alone() -> None:
    config = RoClipConfig.from_preset("robust", pool_size=16, history_slots=100)
    defense = _make(config, total_epochs=3)
    defense.set_samples_per_epoch(250)
    assert defense.risk.scorer.table.slots == 100
    with pytest.raises(ValueError, match="samples_per_epoch"):
        defense.set_samples_per_epoch(-1)
