"""Loading OpenCLIP checkpoints and evaluating them end to end on a tiny digits dataset.

The model is a tiny random ViT from a local config (nothing is downloaded); its checkpoints are
saved the way OpenCLIP's training saves them, with and without DDP's ``module.`` prefix.
"""

from __future__ import annotations

import csv
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip")
sklearn_datasets = pytest.importorskip("sklearn.datasets")

from roclip_kit.evaluate.features import class_embeddings, encode_images  # noqa: E402
from roclip_kit.evaluate.metrics import zero_shot_predict  # noqa: E402
from roclip_kit.evaluate.run import (  # noqa: E402
    EvalData,
    EvalSettings,
    evaluate_checkpoint,
    evaluate_model,
)
from roclip_kit.files import MANIFEST_FORMAT, read_classes, read_split  # noqa: E402
from roclip_kit.train.models import load_openclip, read_state_dict, run_params  # noqa: E402

from ..tiny import MODEL_CFG, NAMES, Square  # noqa: E402


class Replace:
    """A trigger that swaps every image for one fixed image: one prediction for all."""

    kind = "replace"

    def __init__(self, path: Path) -> None:
        from PIL import Image

        self.image = Image.open(path).convert("RGB")

    def apply(self, image):
        return self.image.copy()

    def to_dict(self):
        return {"kind": self.kind}


def write_model_dir(folder: Path, cfg: dict) -> str:
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
    return f"local-dir:{folder}"


def write_digits(folder: Path, train: int = 40, test: int = 30) -> Path:
    """A captioned dataset dir (train.csv, test.csv, classes.json) of sklearn's digits."""
    from PIL import Image

    digits = sklearn_datasets.load_digits()
    (folder / "images").mkdir(parents=True)
    splits = {"train.csv": range(train), "test.csv": range(train, train + test)}
    for name, indices in splits.items():
        with (folder / name).open("w", newline="") as fh:
            writer = csv.writer(fh, delimiter="\t")
            writer.writerow(["filepath", "title", "label"])
            for i in indices:
                pixels = (digits.images[i] * (255 / 16)).astype("uint8")
                path = folder / "images" / f"{i}.png"
                Image.fromarray(pixels).resize((32, 32)).convert("RGB").save(path)
                label = int(digits.target[i])
                writer.writerow([str(path), f"a photo of the digit {NAMES[label]}", label])
    classes = {"classes": NAMES, "templates": ["a photo of the digit {}.", "the number {}."]}
    (folder / "classes.json").write_text(json.dumps(classes))
    return folder


def save_checkpoint(net: torch.nn.Module, path: Path, prefix: str = "") -> Path:
    """Save as OpenCLIP's training does (``prefix='module.'``: as older DDP runs did)."""
    state = {prefix + k: v for k, v in net.state_dict().items()}
    optimizer = torch.optim.AdamW(net.parameters()).state_dict()
    torch.save({"epoch": 3, "name": "tiny", "state_dict": state, "optimizer": optimizer}, path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("kit-models")
    model = write_model_dir(root / "tiny", MODEL_CFG)
    torch.manual_seed(0)
    net = open_clip.create_model(model, load_weights=False)
    return {
        "root": root,
        "model": model,
        "net": net,
        "plain": save_checkpoint(net, root / "epoch_3.pt"),
        "ddp": save_checkpoint(net, root / "ddp_epoch_3.pt", "module."),
        "dataset": write_digits(root / "digits"),
    }


def test_checkpoint_loads_with_or_without_the_ddp_prefix(tiny) -> None:
    for name in ("plain", "ddp"):
        loaded = load_openclip(tiny[name], tiny["model"])
        assert not loaded.model.training and loaded.epoch == 3
        original = tiny["net"].state_dict()
        assert all(torch.equal(v, original[k]) for k, v in loaded.model.state_dict().items())
        assert loaded.tokenizer(["a photo"]).shape == (1, MODEL_CFG["text_cfg"]["context_length"])


def test_a_bare_state_dict_loads_too(tiny) -> None:
    path = tiny["root"] / "bare.pt"
    torch.save(tiny["net"].state_dict(), path)
    state, epoch = read_state_dict(path)
    assert epoch is None and state.keys() == tiny["net"].state_dict().keys()


def test_a_safetensors_file_loads_too(tiny) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = tiny["root"] / "model.safetensors"
    state = {f"module.{k}": v.contiguous() for k, v in tiny["net"].state_dict().items()}
    safetensors_torch.save_file(state, str(path))
    loaded = load_openclip(path, tiny["model"])
    assert torch.equal(loaded.model.logit_scale, tiny["net"].logit_scale)


def test_a_checkpoint_of_another_architecture_names_both(tiny) -> None:
    other = write_model_dir(tiny["root"] / "wider", MODEL_CFG | {"embed_dim": 16})
    with pytest.raises(ValueError, match="does not fit --model") as err:
        load_openclip(tiny["plain"], other)
    assert str(tiny["plain"]) in str(err.value) and "weights of another shape" in str(err.value)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("ViT-Nope-99", "not an OpenCLIP model name"),
        ("hf-hub:someone/model", "would be downloaded"),
        ("local-dir:/no/such/dir", "open_clip_config.json does not exist"),
    ],
)
def test_bad_model_names_say_what_to_pass(tiny, model, message) -> None:
    with pytest.raises(ValueError, match=message):
        load_openclip(tiny["plain"], model)


def test_missing_or_unreadable_checkpoints_are_named(tiny) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_openclip(tiny["root"] / "nope.pt", tiny["model"])
    junk = tiny["root"] / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"checkpoint {junk} could not be read"):
        load_openclip(junk, tiny["model"])
    lists = tiny["root"] / "list.pt"
    torch.save([1, 2], lists)
    with pytest.raises(ValueError, match="neither an OpenCLIP training checkpoint"):
        load_openclip(lists, tiny["model"])


def test_missing_open_clip_says_how_to_install(tiny, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(ModuleNotFoundError, match=r"roclip-plugin\[openclip\]"):
        load_openclip(tiny["plain"], tiny["model"])


def test_run_params_come_from_the_run_folder(tmp_path) -> None:
    checkpoints = tmp_path / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (tmp_path / "run" / "params.txt").write_text("model: ViT-B-32\nforce_quick_gelu: True\n")
    params = run_params(checkpoints / "epoch_1.pt")
    assert params["model"] == "ViT-B-32" and params["force_quick_gelu"] == "True"
    assert run_params(tmp_path / "elsewhere.pt") == {}


def test_image_features_do_not_depend_on_the_batch_size(tiny) -> None:
    loaded = load_openclip(tiny["plain"], tiny["model"])
    classes = read_classes(tiny["dataset"] / "classes.json")
    paths = read_split(tiny["dataset"] / "test.csv", classes).filepaths[:7]
    done = []
    one = encode_images(loaded, paths, batch_size=1, progress=done.append)
    assert done == [1] * 7
    assert torch.allclose(one, encode_images(loaded, paths, batch_size=4), atol=1e-5)
    assert torch.allclose(one.norm(dim=-1), torch.ones(7))


def _manifest(tiny: dict, targets: list[dict], target_label: int) -> Path:
    path = tiny["root"] / f"manifest_{target_label}.json"
    data = {
        "format": MANIFEST_FORMAT,
        "rows": [{"row": 1, "attack": "backdoor", "target": target_label}],
        "targeted": {"captions_per_target": 2, "targets": targets},
        "backdoor": {
            "target_class": NAMES[target_label],
            "target_label": target_label,
            "count": 1,
            "rate": 0.01,
            "trigger": {"kind": "replace"},
        },
    }
    path.write_text(json.dumps(data))
    return path


def test_end_to_end_attack_success_follows_the_models_predictions(tiny) -> None:
    """Targets whose adversarial class is the model's own top-1 succeed (ASR 1), and a trigger
    that turns every image into one fixed image sends all of them to that image's class."""
    loaded = load_openclip(tiny["plain"], tiny["model"])
    classes = read_classes(tiny["dataset"] / "classes.json")
    test = read_split(tiny["dataset"] / "test.csv", classes)
    predicted = zero_shot_predict(
        encode_images(loaded, test.filepaths[:3]), class_embeddings(loaded, classes)
    )
    targets = [
        {
            "id": i,
            "filepath": test.filepaths[i],
            "label": int(test.labels[i]),
            "adversarial_class": NAMES[p],
            "adversarial_label": int(p),
        }
        for i, p in enumerate(predicted)
    ]
    data = EvalData.from_dataset_dir(
        tiny["dataset"], manifest=_manifest(tiny, targets, int(predicted[0]))
    )
    trigger = Replace(Path(test.filepaths[0]))
    result = evaluate_model(loaded, data, EvalSettings(probe_limit=20), trigger=trigger)
    assert result["targeted"]["success_rate"] == 1.0
    assert result["targeted"]["targets"] == 3
    backdoor = result["backdoor"]
    assert backdoor["success_rate"] == 1.0 and backdoor["trigger"] == "replace"
    assert backdoor["images"] == int(np.sum(test.labels[3:] != predicted[0]))


def test_target_images_are_left_out_of_every_clean_figure(tiny) -> None:
    """The targets are held-out test images: scoring them as clean images would count the
    attacked images in clean accuracy, so zero-shot, the probe and the backdoor leave them out."""
    loaded = load_openclip(tiny["plain"], tiny["model"])
    classes = read_classes(tiny["dataset"] / "classes.json")
    test = read_split(tiny["dataset"] / "test.csv", classes)
    targets = [
        {
            "id": i,
            "filepath": test.filepaths[i],
            "label": int(test.labels[i]),
            "adversarial_class": NAMES[(int(test.labels[i]) + 1) % len(NAMES)],
            "adversarial_label": (int(test.labels[i]) + 1) % len(NAMES),
        }
        for i in (0, 2)
    ]
    data = EvalData.from_dataset_dir(tiny["dataset"], manifest=_manifest(tiny, targets, 0))
    trigger = Replace(Path(test.filepaths[1]))
    result = evaluate_model(loaded, data, EvalSettings(probe_limit=20), trigger=trigger)
    assert result["zero_shot"]["images"] == len(test) - 2
    assert result["zero_shot"]["targets_left_out"] == 2
    assert result["linear_probe"]["test_images"] == len(test) - 2
    assert result["backdoor"]["images"] == int(np.sum(np.delete(test.labels, [0, 2]) != 0))
    assert any("2 target images" in note for note in result["notes"])
    clean = evaluate_model(loaded, EvalData.from_dataset_dir(tiny["dataset"]), EvalSettings())
    assert clean["zero_shot"]["images"] == len(test)
    assert clean["zero_shot"]["targets_left_out"] == 0


def test_evaluate_checkpoint_gives_the_same_json_for_both_checkpoint_forms(
    tiny, monkeypatch
) -> None:
    fake = types.ModuleType("roclip_kit.attack.triggers")
    fake.trigger_from_dict = lambda d: Square()
    monkeypatch.setitem(sys.modules, "roclip_kit.attack.triggers", fake)
    manifest = _manifest(tiny, [], 4)
    data = EvalData.from_dataset_dir(tiny["dataset"], manifest=manifest)
    settings = EvalSettings(probe_limit=25, backdoor_limit=10, test_limit=20)
    results = [
        evaluate_checkpoint(tiny[name], tiny["model"], data, settings) for name in ("plain", "ddp")
    ]
    for result in results:
        result.pop("checkpoint")
    assert results[0] == results[1]
    result = json.loads(json.dumps(results[0]))
    assert result["epoch"] == 3 and result["targeted"] is None
    assert result["zero_shot"]["images"] == 20
    assert result["linear_probe"]["train_images"] == 25
    assert 0.0 <= result["linear_probe"]["accuracy"] <= 1.0
    assert result["backdoor"]["images"] == 10 and result["backdoor"]["trigger"] == "square"
    assert 0.0 <= result["backdoor"]["clean_target_rate"] <= 1.0
    assert result["detection"] is None and any("detection" in n for n in result["notes"])


def test_without_a_manifest_only_clean_accuracy_is_measured(tiny) -> None:
    data = EvalData.from_dataset_dir(tiny["dataset"], train_csv=None)
    result = evaluate_checkpoint(tiny["plain"], tiny["model"], data)
    assert result["targeted"] is result["backdoor"] is result["detection"] is None
    assert result["linear_probe"] is None
    assert result["zero_shot"]["images"] == 30
    labels = read_split(data.test_csv, read_classes(data.classes)).labels
    per_class = result["zero_shot"]["per_class"]
    counts = {name: int(np.sum(labels == c)) for c, name in enumerate(NAMES)}
    assert (
        round(sum(a * counts[name] for name, a in per_class.items()))
        == (result["zero_shot"]["correct"])
    )
    assert any("no manifest" in n for n in result["notes"])
    with pytest.raises(ValueError, match="--linear-probe needs a training CSV"):
        evaluate_checkpoint(tiny["plain"], tiny["model"], data, EvalSettings(linear_probe=True))


def test_missing_images_are_named_with_their_row(tiny, tmp_path) -> None:
    broken = tmp_path / "test.csv"
    broken.write_text("filepath\ttitle\tlabel\n/no/such.png\tx\t1\n")
    data = EvalData(broken, tiny["dataset"] / "classes.json")
    with pytest.raises(ValueError, match=f"image /no/such.png \\(row 0 of {broken}\\)"):
        evaluate_checkpoint(tiny["plain"], tiny["model"], data)


def test_a_trigger_is_applied_as_the_poisoner_stamps_stored_images(tiny, tmp_path) -> None:
    """Encoding with the trigger equals encoding the stamped files that training would read,
    also for grey (mode L) images, where a random patch place depends on the stored pixels."""
    triggers = pytest.importorskip("roclip_kit.attack.triggers")
    from PIL import Image

    trigger = triggers.trigger_from_dict({"kind": "patch", "size": 0.25, "seed": 3})
    loaded = load_openclip(tiny["plain"], tiny["model"])
    digits = sklearn_datasets.load_digits()
    originals, stamped = [], []
    for i in range(4):
        grey = Image.fromarray((digits.images[i] * 15).astype("uint8")).resize((32, 32))
        originals.append(tmp_path / f"grey_{i}.png")
        grey.save(originals[-1])
        with Image.open(originals[-1]) as image:
            image.load()
            trigger.apply(image).save(tmp_path / f"stamped_{i}.png")
        stamped.append(tmp_path / f"stamped_{i}.png")
    on_the_fly = encode_images(loaded, [str(p) for p in originals], transform=trigger.apply)
    from_files = encode_images(loaded, [str(p) for p in stamped])
    assert torch.allclose(on_the_fly, from_files, atol=1e-6)
    assert not torch.allclose(on_the_fly, encode_images(loaded, [str(p) for p in originals]))


def test_relative_image_paths_are_found_beside_the_csv(tiny, tmp_path) -> None:
    folder = tmp_path / "moved"
    folder.mkdir()
    image = Path(
        read_split(
            tiny["dataset"] / "test.csv", read_classes(tiny["dataset"] / "classes.json")
        ).filepaths[0]
    )
    (folder / "a.png").write_bytes(image.read_bytes())
    (folder / "test.csv").write_text("filepath\ttitle\tlabel\na.png\tx\tThree\n")
    split = read_split(folder / "test.csv", read_classes(tiny["dataset"] / "classes.json"))
    assert split.filepaths == [str(folder / "a.png")] and split.labels.tolist() == [3]
