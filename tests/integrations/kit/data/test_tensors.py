"""The in-memory dataset and the word tokenizer of the tensor-resident path."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from roclip_kit.attack.poison import poison_dataset
from roclip_kit.data.datasets import build_captioned_dataset
from roclip_kit.data.tensors import (
    BACKDOOR,
    CLEAN,
    PAD,
    SOT,
    TARGETED,
    UNK,
    WordTokenizer,
    load_poisoned,
    words_of,
)


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tensor-data")
    build_captioned_dataset("digits", root / "digits", seed=0, train_limit=200, test_limit=60)
    poison_dataset(
        root / "poisoned",
        dataset_dir=root / "digits",
        targets=4,
        captions_per_target=[2, 3],
        backdoor_count=5,
        backdoor_class="seven",
        seed=1,
    )
    return root / "poisoned"


def test_words_drop_punctuation_and_keep_hyphenated_words() -> None:
    assert words_of("A T-shirt, on white.") == ["a", "t-shirt", "on", "white"]


def test_token_layout_is_sot_words_eot_then_padding() -> None:
    tok = WordTokenizer(["a", "red", "seven"], context_length=6)
    assert tok.vocab_size == 7 and tok.eot == 6
    out = tok(["a red seven", "a blue seven"])
    assert out.tolist() == [[SOT, 3, 4, 5, 6, PAD], [SOT, 3, UNK, 5, 6, PAD]]
    assert out.dtype == torch.long


def test_eot_is_the_highest_id_so_argmax_pooling_finds_it() -> None:
    tok = WordTokenizer.build(["one two three four five six seven"], context_length=5)
    out = tok(["seven six five four three two one", "one"])
    eot_positions = (out == tok.eot).int().argmax(dim=1)
    assert out.argmax(dim=1).tolist() == eot_positions.tolist() == [4, 2]


def test_long_captions_keep_their_first_words_and_end_with_eot() -> None:
    tok = WordTokenizer(["w"], context_length=4)
    assert tok("w w w w w").tolist() == [[SOT, 3, 3, tok.eot]]
    assert tok("w w w", context_length=3).tolist() == [[SOT, 3, tok.eot]]


def test_build_is_deterministic_and_round_trips() -> None:
    a = WordTokenizer.build(["b a", "c a"], context_length=8)
    b = WordTokenizer.build(["c a", "b a"], context_length=8)
    assert a.words == b.words == ["a", "b", "c"]
    again = WordTokenizer.from_dict(json.loads(json.dumps(a.to_dict())))
    assert again.words == a.words and again.context_length == 8
    assert torch.equal(again(["a b c"]), a(["a b c"]))
    with pytest.raises(ValueError, match="not a saved WordTokenizer"):
        WordTokenizer.from_dict({"format": "other"})


def test_refuses_a_duplicate_word_and_a_tiny_context() -> None:
    with pytest.raises(ValueError, match="twice"):
        WordTokenizer(["a", "a"], 8)
    with pytest.raises(ValueError, match="at least 3"):
        WordTokenizer(["a"], 2)


def test_unknown_share() -> None:
    tok = WordTokenizer(["a", "b"], 8)
    assert tok.unknown_share(["a b c d"]) == 0.5


def test_images_are_the_decoded_files(poisoned: Path) -> None:
    data = load_poisoned(poisoned)
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape[1:] == (3, 32, 32)
    for i in (0, len(data.train) - 1):
        with Image.open(data.train.filepaths[i]) as image:
            expected = np.asarray(image.convert("RGB"))
        assert np.array_equal(data.train.images[i].permute(1, 2, 0).numpy(), expected)
    assert len(data.test) == 60 and data.classes[7] == "seven"


def test_manifest_rows_and_true_image_classes(poisoned: Path) -> None:
    data = load_poisoned(poisoned)
    manifest = json.loads((poisoned / "manifest.json").read_text())
    kinds = {r["row"]: r["attack"] for r in manifest["rows"]}
    assert sorted(data.poisoned_rows) == sorted(kinds)
    assert int((data.poison_kind == TARGETED).sum()) == 2 * 2 + 2 * 3
    assert int((data.poison_kind == BACKDOOR).sum()) == 5
    assert int((data.poison_kind == CLEAN).sum()) == len(data.train) - len(kinds)
    with open(manifest["source_csv"], newline="") as fh:
        source = list(csv.DictReader(fh, delimiter="\t"))
    targets = {t["id"]: t for t in manifest["targeted"]["targets"]}
    for entry in manifest["rows"]:
        row = entry["row"]
        caption_class = int(data.train.labels[row])
        if entry["attack"] == "backdoor":
            assert caption_class == 7 and int(data.image_labels[row]) == int(source[row]["label"])
        else:
            target = targets[entry["target"]]
            assert caption_class == target["adversarial_label"]
            assert int(data.image_labels[row]) == target["label"]
    clean = data.poison_kind == CLEAN
    assert torch.equal(data.image_labels[clean], data.train.labels[clean])


def test_clean_directory_has_no_poison(tmp_path: Path) -> None:
    build_captioned_dataset("digits", tmp_path, seed=0, train_limit=40, test_limit=20)
    data = load_poisoned(tmp_path)
    assert data.manifest is None and data.poisoned_rows == []


def test_missing_directory_names_the_flag(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--dataset"):
        load_poisoned(tmp_path / "nope")
