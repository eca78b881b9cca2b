"""``roclip_kit.evaluate.scan`` without a model: reading pairs, the manifest, report, filter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss")

from roclip_kit.evaluate.scan import (  # noqa: E402
    ScanResult,
    dataset_csv,
    detection_report,
    drop_size,
    markdown_report,
    poisoned_by_attack,
    read_pairs,
    report_dict,
    write_filtered_csv,
    write_scores_csv,
)
from roclip_kit.files import MANIFEST_FORMAT  # noqa: E402

from roclip_plugin.scan import DETECTORS, ScanSettings  # noqa: E402


def _csv(path: Path, rows: list[list[str]], header=("filepath", "title", "label")) -> Path:
    path.write_text("\n".join("\t".join(r) for r in [list(header), *rows]) + "\n")
    return path


def _manifest(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps({"format": MANIFEST_FORMAT, "rows": rows}))
    return path


def test_read_pairs_resolves_images_beside_the_csv_and_keeps_keys(tmp_path) -> None:
    (tmp_path / "a.png").write_bytes(b"")
    header = ("__key__", "filepath", "title")
    pairs = read_pairs(_csv(tmp_path / "t.csv", [["k0", "a.png", "a cat"]], header))
    assert pairs.filepaths == [str(tmp_path / "a.png")]
    assert pairs.captions == ["a cat"] and pairs.keys == ["k0"]
    with pytest.raises(ValueError, match="has no 'title' column"):
        read_pairs(_csv(tmp_path / "u.csv", [["a.png", "0"]], ("filepath", "label")))
    with pytest.raises(ValueError, match="--csv .* has a header but no rows"):
        read_pairs(_csv(tmp_path / "v.csv", []))
    with pytest.raises(ValueError, match="--dataset .* train.csv .* does not exist"):
        dataset_csv(tmp_path, None)


def test_manifest_rows_and_keys_become_masks_per_attack(tmp_path) -> None:
    header = ("__key__", "filepath", "title")
    pairs = read_pairs(
        _csv(tmp_path / "t.csv", [[f"k{i}", "x.png", "c"] for i in range(5)], header)
    )
    entries = [{"row": 1, "attack": "targeted"}, {"key": "k3", "attack": "backdoor"}]
    masks = poisoned_by_attack(_manifest(tmp_path / "m.json", entries), pairs)
    assert masks["targeted"].tolist() == [False, True, False, False, False]
    assert masks["backdoor"].tolist() == [False, False, False, True, False]
    bad = _manifest(tmp_path / "b.json", [{"key": "nope", "attack": "backdoor"}])
    with pytest.raises(ValueError, match="--manifest .* not a row of"):
        poisoned_by_attack(bad, pairs)


def test_detection_report_judges_each_attack_against_clean_rows_only() -> None:
    scores = {name: np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0]) for name in DETECTORS}
    backdoor = np.array([0, 0, 0, 0, 1, 1], dtype=bool)
    targeted = np.array([0, 0, 1, 0, 0, 0], dtype=bool)
    report = detection_report(scores, {"backdoor": backdoor, "targeted": targeted})
    figures = report["combined"]
    assert figures["backdoor"] == {"auroc": 1.0, "precision_at_k": 1.0, "k": 2}
    # row 3 (clean) beats the targeted row 2: one of three clean rows above it
    assert figures["targeted"]["auroc"] == pytest.approx(2 / 3)
    assert figures["targeted"]["precision_at_k"] == 0.0
    assert figures["all"]["k"] == 3
    text = markdown_report({"csv": "t.csv", "rows": 6, "detection": report, "notes": ["n"]})
    assert "| combined | 0.8889 | 0.6667 | 1.0000 | 1.0000 | 0.6667 | 0.0000 |" in text


def test_the_filtered_csv_drops_exactly_the_rows_and_keeps_every_column(tmp_path) -> None:
    rows = [[f"img{i}.png", f"caption {i}", str(i % 3)] for i in range(6)]
    source = _csv(tmp_path / "train.csv", rows)
    target = write_filtered_csv(source, tmp_path / "out" / "f.csv", np.array([4, 0]))
    lines = target.read_text().splitlines()
    assert lines == source.read_text().splitlines()[:1] + ["\t".join(r) for r in rows[1:4]] + [
        "\t".join(rows[5])
    ]
    assert drop_size(10, 0.15, None) == 2 and drop_size(10, None, 30) == 10
    assert drop_size(10, None, None) == 0


def test_scores_csv_is_ranked_and_the_report_is_json(tmp_path) -> None:
    (tmp_path / "x.png").write_bytes(b"")
    pairs = read_pairs(_csv(tmp_path / "t.csv", [["x.png", f"c{i}", "0"] for i in range(3)]))
    scores = {name: np.array([0.2, 0.9, 0.5]) for name in DETECTORS}
    result = ScanResult(pairs, scores, ScanSettings(), 1.0, 0.5, 3)
    path = write_scores_csv(tmp_path / "scores.csv", result)
    lines = path.read_text().splitlines()
    assert lines[0].split("\t")[:4] == ["rank", "row", "key", "caption"]
    assert [line.split("\t")[1] for line in lines[1:]] == ["1", "2", "0"]
    report = report_dict(result, None)
    assert report["pairs_per_second"] == pytest.approx(2.0)
    assert json.loads(json.dumps(report))["settings"]["k"] == 16


def test_threads_are_set_for_torch_and_faiss_and_zero_keeps_the_defaults() -> None:
    import faiss
    import torch
    from roclip_kit.evaluate.scan import use_threads

    before = torch.get_num_threads(), faiss.omp_get_max_threads()
    try:
        use_threads(0)
        assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == before
        use_threads(1)
        assert (torch.get_num_threads(), faiss.omp_get_max_threads()) == (1, 1)
    finally:
        torch.set_num_threads(before[0])
        faiss.omp_set_num_threads(before[1])
