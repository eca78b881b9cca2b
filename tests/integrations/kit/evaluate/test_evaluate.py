"""The evaluation metrics on hand-made features, rankings and files (no model)."""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from roclip_kit.evaluate.metrics import (
    average_templates,
    detection_scores,
    find_suspicious,
    hit_rate,
    linear_probe_accuracy,
    read_suspicious,
    select_rows,
    zero_shot_predict,
)
from roclip_kit.evaluate.run import poison_detection, without_targets
from roclip_kit.files import MANIFEST_FORMAT, Split, read_classes, read_manifest, read_split

NAMES = ["zero", "one", "two", "three"]


def _classes_file(folder: Path, **extra) -> Path:
    path = folder / "classes.json"
    data = {"classes": NAMES, "templates": ["a photo of {}.", "the digit {}."]} | extra
    path.write_text(json.dumps(data))
    return path


def _write_tsv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh, delimiter="\t")
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _write_suspicious(path: Path, rows: list[tuple[int, str, float]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["index", "caption", "margin"])
        for index, caption, margin in rows:
            writer.writerow([index, caption, f"{margin:.6f}"])
    return path


def _manifest(folder: Path, rows: dict[int, str], **extra) -> Path:
    path = folder / "manifest.json"
    data = {
        "format": MANIFEST_FORMAT,
        "rows": [{"row": r, "attack": a, "target": None} for r, a in rows.items()],
        "targeted": None,
        "backdoor": None,
    } | extra
    path.write_text(json.dumps(data))
    return path


# ---------------------------------------------------------------- zero-shot and attacks


def test_class_embedding_is_the_renormalised_mean_of_normalised_templates() -> None:
    features = torch.tensor([[[3.0, 0.0], [0.0, 0.5]], [[0.0, -2.0], [0.0, -7.0]]])
    classes = average_templates(features)
    expected = torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    assert torch.allclose(classes, F.normalize(expected, dim=-1))


def test_images_equal_to_class_embeddings_are_all_classified_correctly() -> None:
    classes = F.normalize(torch.randn(4, 16), dim=-1)
    labels = np.array([2, 0, 3, 1, 1, 2])
    images = 5.0 * classes[labels]  # any positive scale: cosine similarity ignores it
    assert hit_rate(zero_shot_predict(images, classes), labels) == 1.0
    assert hit_rate(zero_shot_predict(images, classes), (labels + 1) % 4) == 0.0


def test_targets_on_their_adversarial_class_embedding_give_full_attack_success() -> None:
    classes = F.normalize(torch.randn(4, 16), dim=-1)
    adversarial = np.array([3, 3, 0, 1])
    half = torch.cat([classes[adversarial[:2]], classes[[1, 2]]])  # last two miss
    assert hit_rate(zero_shot_predict(classes[adversarial], classes), adversarial) == 1.0
    assert hit_rate(zero_shot_predict(half, classes), adversarial) == 0.5


def test_backdoor_success_counts_predictions_of_the_target_class() -> None:
    classes = F.normalize(torch.eye(3), dim=-1)
    triggered = torch.tensor([[0.1, 0.0, 1.0], [0.0, 0.2, 0.9], [1.0, 0.0, 0.2], [0, 0, 1.0]])
    assert hit_rate(zero_shot_predict(triggered, classes), 2) == 0.75


def test_features_of_another_model_are_refused() -> None:
    with pytest.raises(ValueError, match="different models"):
        zero_shot_predict(torch.randn(2, 8), torch.randn(3, 16))


def test_no_predictions_cannot_be_scored() -> None:
    with pytest.raises(ValueError, match="empty"):
        hit_rate(np.array([]), 1)


# ---------------------------------------------------------------- linear probe


def _clusters(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    centres = np.eye(3, 8) * 4
    return centres[labels] + rng.normal(scale=0.3, size=(n, 8)), labels


def test_linear_probe_separates_clusters_and_is_deterministic() -> None:
    train_x, train_y = _clusters(60, 0)
    test_x, test_y = _clusters(30, 1)
    first = linear_probe_accuracy(train_x, train_y, test_x, test_y)
    assert first == 1.0
    assert linear_probe_accuracy(train_x, train_y, test_x, test_y) == first


def test_linear_probe_with_one_class_says_how_to_fix_it() -> None:
    with pytest.raises(ValueError, match="at least two classes"):
        linear_probe_accuracy(np.ones((4, 3)), np.zeros(4), np.ones((2, 3)), np.zeros(2))


def test_row_subsets_are_seeded_sorted_and_complete_without_a_limit() -> None:
    assert np.array_equal(select_rows(5, None, 0), np.arange(5))
    assert np.array_equal(select_rows(5, 9, 0), np.arange(5))
    a, b = select_rows(100, 10, 3), select_rows(100, 10, 3)
    assert np.array_equal(a, b) and len(set(a)) == 10 and np.all(np.diff(a) > 0)
    with pytest.raises(ValueError, match="at least 1"):
        select_rows(5, 0, 0)


# ---------------------------------------------------------------- detection


def test_detection_scores_of_a_hand_made_ranking() -> None:
    scores = detection_scores([5, 2, 9, 1], poisoned={2, 1, 7})
    assert (scores.k, scores.hits, scores.poisoned, scores.listed) == (3, 1, 3, 4)
    assert scores.precision == pytest.approx(1 / 3)
    assert scores.recall == pytest.approx(1 / 3)
    assert scores.average_precision == pytest.approx((1 / 2 + 2 / 4) / 3)


def test_detection_k_is_capped_at_the_rows_listed_and_unknown_rows_never_hit() -> None:
    scores = detection_scores([-1, 4], poisoned={4, 6, 8})
    assert (scores.k, scores.hits, scores.precision) == (2, 1, 0.5)
    assert detection_scores([4, 6], poisoned={4, 6}, k=1).precision == 1.0
    with pytest.raises(ValueError, match="nothing to detect"):
        detection_scores([1], poisoned=set())
    with pytest.raises(ValueError, match="k must be"):
        detection_scores([1], poisoned={1}, k=0)


def test_a_file_that_flags_no_row_finds_nothing() -> None:
    scores = detection_scores([], poisoned={4, 6})
    assert (scores.k, scores.hits, scores.listed, scores.poisoned) == (0, 0, 0, 2)
    assert (scores.precision, scores.recall, scores.average_precision) == (0.0, 0.0, 0.0)


def test_a_perfect_ranking_scores_one() -> None:
    scores = detection_scores([3, 1, 8, 0, 2], poisoned={1, 3, 8})
    assert (scores.precision, scores.recall, scores.average_precision) == (1.0, 1.0, 1.0)


@settings(max_examples=60, deadline=None)
@given(
    ranked=st.lists(st.integers(0, 40), max_size=30, unique=True).filter(bool),
    poisoned=st.sets(st.integers(0, 40), min_size=1, max_size=20),
    k=st.one_of(st.none(), st.integers(1, 50)),
)
def test_detection_scores_are_shares(ranked, poisoned, k) -> None:
    scores = detection_scores(ranked, poisoned, k)
    for value in (scores.precision, scores.recall, scores.average_precision):
        assert 0.0 <= value <= 1.0
    assert scores.hits <= min(scores.k, scores.poisoned)
    full_recall = detection_scores(ranked, poisoned, k=len(ranked)).recall
    assert scores.average_precision <= full_recall + 1e-12  # each term's precision is <= 1


@settings(max_examples=25, deadline=None)
@given(
    margins=st.lists(st.integers(-1000, 1000), min_size=1, max_size=25, unique=True),
    order=st.randoms(use_true_random=False),
    poisoned=st.sets(st.integers(0, 30), min_size=1, max_size=10),
)
def test_scores_do_not_depend_on_the_order_of_lines_in_the_file(margins, order, poisoned) -> None:
    entries = [(i, f"caption {i}", m / 100) for i, m in enumerate(margins)]
    shuffled = list(entries)
    order.shuffle(shuffled)
    with tempfile.TemporaryDirectory() as folder:
        a = read_suspicious(_write_suspicious(Path(folder) / "a.csv", entries))
        b = read_suspicious(_write_suspicious(Path(folder) / "b.csv", shuffled))
    assert a.rows == b.rows
    assert detection_scores(a.rows, poisoned) == detection_scores(b.rows, poisoned)


def test_suspicious_rows_are_ranked_by_margin_and_repeats_keep_their_best(tmp_path) -> None:
    path = _write_suspicious(
        tmp_path / "suspicious_epoch_4.csv",
        [(7, "c7", 0.1), (3, "c3", 0.9), (7, "c7", 0.95), (-1, "", 0.5), (-1, "", 0.4)],
    )
    ranking = read_suspicious(path)
    assert ranking.rows == [7, 3, -1, -1]
    assert ranking.epoch == 4


def test_suspicious_files_without_row_indices_or_columns_are_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="no dataset row indices .all -1. and no keys"):
        read_suspicious(_write_suspicious(tmp_path / "s.csv", [(-1, "", 0.3)]))
    bad = tmp_path / "bad.csv"
    bad.write_text("row,score\n1,0.5\n")
    with pytest.raises(ValueError, match="no 'index' column"):
        read_suspicious(bad)
    with pytest.raises(ValueError, match="does not exist"):
        read_suspicious(tmp_path / "missing.csv")


def test_suspicious_files_of_a_run_folder_by_epoch(tmp_path) -> None:
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    for epoch in (2, 10, 4):
        _write_suspicious(checkpoints / f"suspicious_epoch_{epoch}.csv", [(0, "", 1.0)])
    names = [p.name for p in find_suspicious(tmp_path, "all")]
    assert names == [f"suspicious_epoch_{n}.csv" for n in (2, 4, 10)]
    assert find_suspicious(checkpoints)[0].name == "suspicious_epoch_10.csv"
    assert find_suspicious(tmp_path, 4)[0].name == "suspicious_epoch_4.csv"
    with pytest.raises(ValueError, match="epochs with a file: 2, 4, 10"):
        find_suspicious(tmp_path, 3)
    assert find_suspicious(tmp_path / "checkpoints" / "..", "latest")  # any path form works
    empty = tmp_path / "empty"
    empty.mkdir()
    assert find_suspicious(empty) == []


def test_poison_detection_scores_a_file_against_the_manifest(tmp_path) -> None:
    classes = read_classes(_classes_file(tmp_path))
    captions = [f"caption {i}" for i in range(10)]
    poisoned_csv = _write_tsv(
        tmp_path / "poisoned.csv",
        ["filepath", "title", "label"],
        [[f"{i}.png", c, 0] for i, c in enumerate(captions)],
    )
    rows = {8: "targeted", 9: "targeted", 4: "backdoor"}
    manifest = read_manifest(_manifest(tmp_path, rows, poisoned_csv=str(poisoned_csv)), classes)
    ranked = [(9, 0.9), (1, 0.8), (4, 0.7), (8, 0.1)]
    path = _write_suspicious(
        tmp_path / "suspicious_epoch_3.csv", [(i, captions[i], m) for i, m in ranked]
    )
    [result] = poison_detection([path], manifest)
    assert (result["k"], result["hits"], result["epoch"]) == (3, 2, 3)
    assert result["precision"] == pytest.approx(2 / 3)
    assert result["recall_by_attack"] == {"backdoor": 1.0, "targeted": 0.5}
    assert result["average_precision"] == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    json.dumps(result)


def test_detection_refuses_a_file_from_a_run_on_another_csv(tmp_path) -> None:
    classes = read_classes(_classes_file(tmp_path))
    poisoned_csv = _write_tsv(
        tmp_path / "poisoned.csv", ["filepath", "title", "label"], [["a.png", "a red one", 1]]
    )
    manifest = read_manifest(
        _manifest(tmp_path, {0: "backdoor"}, poisoned_csv=str(poisoned_csv)), classes
    )
    path = _write_suspicious(tmp_path / "s.csv", [(0, "something else", 0.5)])
    with pytest.raises(ValueError, match="not trained on the poisoned CSV"):
        poison_detection([path], manifest)


def test_webdataset_runs_are_scored_against_a_manifest_of_keys(tmp_path) -> None:
    """A WebDataset run's suspicious rows have no index (-1) but a ``__key__``: a manifest
    that names its poisoned samples by key scores them; repeats of a key keep their best."""
    classes = read_classes(_classes_file(tmp_path))
    path = tmp_path / "manifest.json"
    entries = [{"key": "s0/007", "attack": "backdoor"}, {"key": "s1/002", "attack": "targeted"}]
    path.write_text(json.dumps({"format": MANIFEST_FORMAT, "rows": entries}))
    manifest = read_manifest(path, classes)
    assert manifest.keys == {"s0/007": "backdoor", "s1/002": "targeted"} and not manifest.rows
    suspicious = tmp_path / "suspicious_epoch_2.csv"
    with suspicious.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["index", "key", "caption", "margin"])
        for key, margin in [("s1/002", 0.2), ("s0/007", 0.9), ("s0/001", 0.5), ("s0/007", 0.1)]:
            writer.writerow([-1, key, "a caption", margin])
    ranking = read_suspicious(suspicious)
    assert ranking.keys == ["s0/007", "s0/001", "s1/002"] and ranking.rows == [-1, -1, -1]
    [result] = poison_detection([suspicious], manifest)
    assert (result["k"], result["hits"]) == (2, 1)
    assert result["recall_by_attack"] == {"backdoor": 1.0, "targeted": 0.0}
    csv_run = _write_suspicious(tmp_path / "suspicious_epoch_3.csv", [(4, "a caption", 0.5)])
    with pytest.raises(ValueError, match="names poisoned samples by key"):
        poison_detection([csv_run], manifest)


def _split(paths: list[str]) -> Split:
    return Split(Path("test.csv"), paths, np.zeros(len(paths), np.int64), np.arange(len(paths)))


def test_target_images_leave_the_clean_split_and_foreign_targets_are_refused(tmp_path) -> None:
    images = []
    for i in range(4):
        images.append(tmp_path / f"{i}.png")
        images[-1].write_bytes(b"")
    test = _split([str(p) for p in images])
    target = {"filepath": str(images[2]), "label": 0, "adversarial_label": 1}
    path = _manifest(tmp_path, {}, targeted={"targets": [{"id": 2, **target}]})
    manifest = read_manifest(path, read_classes(_classes_file(tmp_path)))
    assert without_targets(test, manifest).filepaths == [str(images[i]) for i in (0, 1, 3)]
    assert without_targets(test, None) is test
    foreign = _split([str(images[0]), str(images[1])])  # a test CSV without the target image
    with pytest.raises(ValueError, match="1 of its 1 target images .* other data"):
        without_targets(foreign, manifest)


# ---------------------------------------------------------------- input files


def test_labels_may_be_indices_or_class_names(tmp_path) -> None:
    classes = read_classes(_classes_file(tmp_path))
    path = _write_tsv(
        tmp_path / "test.csv",
        ["filepath", "title", "label"],
        [["a.png", "x", 2], ["b", "y", "one"]],
    )
    split = read_split(path, classes)
    assert split.labels.tolist() == [2, 1] and split.rows.tolist() == [0, 1]
    assert split.take(np.array([1])).filepaths == ["b"]


@pytest.mark.parametrize(
    ("header", "rows", "message"),
    [
        (["filepath", "title"], [["a.png", "x"]], "no 'label' column"),
        (["filepath", "title", "label"], [["a.png", "x", 4]], "row 0: unknown class '4'"),
        (["filepath", "title", "label"], [["a.png", "x", "cat"]], "unknown class 'cat'"),
        (["filepath", "title", "label"], [], "no rows"),
    ],
)
def test_bad_csvs_name_the_file_and_the_problem(tmp_path, header, rows, message) -> None:
    classes = read_classes(_classes_file(tmp_path))
    path = _write_tsv(tmp_path / "test.csv", header, rows)
    with pytest.raises(ValueError, match=message) as err:
        read_split(path, classes)
    assert str(path) in str(err.value)


def test_a_comma_separated_csv_is_recognised(tmp_path) -> None:
    classes = read_classes(_classes_file(tmp_path))
    path = tmp_path / "test.csv"
    path.write_text("filepath,title,label\na.png,x,1\n")
    with pytest.raises(ValueError, match="not tab-separated"):
        read_split(path, classes)


def test_classes_file_problems_say_what_to_add(tmp_path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        read_classes(tmp_path / "nope.json")
    (tmp_path / "c.json").write_text(json.dumps({"classes": NAMES}))
    with pytest.raises(ValueError, match="--template"):
        read_classes(tmp_path / "c.json")
    assert read_classes(tmp_path / "c.json", ["a {}"]).templates == ["a {}"]
    with pytest.raises(ValueError, match="exactly one"):
        read_classes(tmp_path / "c.json", ["no placeholder"])
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_classes(tmp_path / "bad.json")


def test_manifest_classes_are_checked_against_the_dataset(tmp_path) -> None:
    classes = read_classes(_classes_file(tmp_path))
    targeted = {
        "captions_per_target": 5,
        "targets": [
            {
                "id": 0,
                "filepath": "t.png",
                "label": 1,
                "adversarial_class": "three",
                "adversarial_label": 3,
            }
        ],
    }
    manifest = read_manifest(_manifest(tmp_path, {}, targeted=targeted), classes)
    assert manifest.targets[0].adversarial_label == 3 and manifest.backdoor is None
    targeted["targets"][0]["adversarial_class"] = "cat"
    with pytest.raises(ValueError, match="'three' in .* but 'cat' in the manifest"):
        read_manifest(_manifest(tmp_path, {}, targeted=targeted), classes)
    backdoor = {"target_class": "two", "target_label": 7, "trigger": {"kind": "patch"}}
    with pytest.raises(ValueError, match="unknown class '7'"):
        read_manifest(_manifest(tmp_path, {}, backdoor=backdoor), classes)
    (tmp_path / "other.json").write_text(json.dumps({"format": "something/2"}))
    with pytest.raises(ValueError, match="expected 'roclip-poison/1'"):
        read_manifest(tmp_path / "other.json", classes)
