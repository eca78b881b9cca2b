"""Risk scorers: what each one ranks first, on constructed embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from roclip_plugin import RoClipConfig, get_plugin_manager, hookimpl
from roclip_plugin.pool import CaptionPool
from roclip_plugin.risk import (
    CosineScorer,
    DensityScorer,
    HistoryScorer,
    MarginScorer,
    RiskBatch,
    collect_scorers,
    largest_margins,
    make_scorer,
)
from roclip_plugin.risk.scores import zscore


def _pairs(rows: int = 8, dim: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(rows, dim, generator=g), dim=-1)
    txt = F.normalize(img + 0.3 * torch.randn(rows, dim, generator=g), dim=-1)
    return img, txt


def test_margin_ranks_as_partial_matching_always_did() -> None:
    img, txt = _pairs()
    matched = F.normalize(torch.randn(8, 16, generator=torch.Generator().manual_seed(3)), dim=-1)
    margin = MarginScorer().local(RiskBatch(img, txt, matched=matched))
    want = largest_margins(img, txt, matched, 0.25)
    assert torch.equal(margin >= margin.topk(2).values[-1], want)


def test_cosine_makes_the_worst_fitting_pair_the_riskiest() -> None:
    img, txt = _pairs()
    txt[5] = -img[5]  # a caption that contradicts its image
    risk = CosineScorer().local(RiskBatch(img, txt))
    assert int(risk.argmax()) == 5


def test_zscore_does_not_move_with_the_scale_of_the_epoch() -> None:
    values = torch.tensor([0.2, 0.5, 0.9, 0.1])
    torch.testing.assert_close(zscore(values), zscore(3 * values + 0.4))


def test_history_remembers_a_pair_that_fitted_badly_before() -> None:
    """A poisoned pair the model learned later still looks riskier than a pair always fitted."""
    scorer = HistoryScorer(slots=16, decay=0.5)
    ids = torch.arange(11)
    clean = torch.linspace(0.80, 0.89, 10)
    early = torch.cat([clean, torch.tensor([-0.5])])  # row 10 fits badly
    late = torch.cat([clean.flip(0), torch.tensor([0.86])])  # now it fits better than most
    scorer.combine(early, ids)
    risk = scorer.combine(late, ids)
    assert int(CosineScorer().combine(-late, ids).argmax()) != 10  # the step alone misses it
    assert int(risk.argmax()) == 10


def test_history_needs_sample_ids() -> None:
    img, txt = _pairs()
    try:
        HistoryScorer(slots=4, decay=0.5).local(RiskBatch(img, txt))
    except ValueError as err:
        assert "sample_ids" in str(err)
    else:
        raise AssertionError("no error without ids")


def test_density_ranks_a_planted_dense_cluster_first() -> None:
    g = torch.Generator().manual_seed(0)
    bank = CaptionPool(256)
    spread = F.normalize(torch.randn(200, 16, generator=g), dim=-1)
    centre = F.normalize(torch.randn(1, 16, generator=g), dim=-1)
    cluster = F.normalize(centre + 0.02 * torch.randn(20, 16, generator=g), dim=-1)
    bank.enqueue(torch.cat([spread, cluster]))
    queries = torch.cat([spread[:6], cluster[:2]])
    risk = DensityScorer(k=8).local(RiskBatch(queries, queries, image_bank=bank))
    assert set(risk.topk(2).indices.tolist()) == {6, 7}
    empty = DensityScorer(k=8).local(RiskBatch(queries, queries, image_bank=CaptionPool(4)))
    assert torch.equal(empty, torch.zeros(8))


def test_scores_follow_the_rows_whatever_their_order() -> None:
    img, txt = _pairs(12)
    order = torch.randperm(12)
    for scorer in (CosineScorer(),):
        base = scorer.local(RiskBatch(img, txt))
        torch.testing.assert_close(scorer.local(RiskBatch(img[order], txt[order])), base[order])
    history, shuffled = HistoryScorer(slots=32, decay=0.5), HistoryScorer(slots=32, decay=0.5)
    ids = torch.arange(12)
    cos = (img * txt).sum(-1)
    torch.testing.assert_close(
        shuffled.combine(cos[order], ids[order]), history.combine(cos, ids)[order]
    )


class _ConstantScorer:
    needs: frozenset[str] = frozenset()
    stateful = False

    def local(self, batch: RiskBatch) -> torch.Tensor:
        return torch.arange(batch.image.shape[0], dtype=torch.float32)

    def combine(self, values: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        return values


class _Plugin:
    @hookimpl
    def roclip_register_risk_scorers(self, register):  # type: ignore[no-untyped-def]
        register("last-rows", lambda config: _ConstantScorer())


def test_a_plugin_adds_a_scorer_by_name() -> None:
    pm = get_plugin_manager(autoload=False)
    pm.register(_Plugin())
    assert {"margin", "cosine", "history", "density", "last-rows"} <= set(collect_scorers(pm))
    config = RoClipConfig(risk_score="last-rows", match_action="drop", match_fraction=0.25)
    assert isinstance(make_scorer(config, pm), _ConstantScorer)
    try:
        make_scorer(RoClipConfig(risk_score="nope"), get_plugin_manager(autoload=False))
    except ValueError as err:
        assert "--roclip-risk-score" in str(err) and "margin" in str(err)
    else:
        raise AssertionError("an unknown scorer was accepted")
