"""``roclip eval``: flags, files found next to a run, the table, the JSON, clear errors."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from rich.console import Console

open_clip = pytest.importorskip("open_clip")
sklearn_datasets = pytest.importorskip("sklearn.datasets")

from roclip_kit.commands.eval import add_eval_command  # noqa: E402
from roclip_kit.files import MANIFEST_FORMAT  # noqa: E402

from ..tiny import MODEL_CFG, NAMES, Square, run_roclip  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An OpenCLIP-like run folder (params.txt, checkpoints/) and a digits dataset dir."""
    from PIL import Image

    root = tmp_path_factory.mktemp("kit-eval-cli")
    model_dir = root / "tiny"
    model_dir.mkdir()
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": MODEL_CFG}))
    checkpoints = root / "logs" / "tiny-run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints.parent / "params.txt").write_text(
        f"force_quick_gelu: False\nmodel: local-dir:{model_dir}\nname: tiny-run\n"
    )
    net = open_clip.create_model(f"local-dir:{model_dir}", load_weights=False)
    torch.save({"epoch": 2, "state_dict": net.state_dict()}, checkpoints / "epoch_2.pt")

    dataset = root / "digits"
    (dataset / "images").mkdir(parents=True)
    digits = sklearn_datasets.load_digits()
    captions = []
    for name, indices in (("train.csv", range(30)), ("test.csv", range(30, 50))):
        with (dataset / name).open("w", newline="") as fh:
            writer = csv.writer(fh, delimiter="\t")
            writer.writerow(["filepath", "title", "label"])
            for i in indices:
                path = dataset / "images" / f"{i}.png"
                pixels = (digits.images[i] * (255 / 16)).astype("uint8")
                Image.fromarray(pixels).resize((32, 32)).convert("RGB").save(path)
                label = int(digits.target[i])
                caption = f"the digit {NAMES[label]}"
                captions.append(caption)
                writer.writerow([str(path), caption, label])
    classes = {"classes": NAMES, "templates": ["a photo of the digit {}."]}
    (dataset / "classes.json").write_text(json.dumps(classes))

    manifest = root / "manifest.json"
    manifest.write_text(
        json.dumps(
            {
                "format": MANIFEST_FORMAT,
                "poisoned_csv": str(dataset / "train.csv"),
                "rows": [{"row": r, "attack": "backdoor", "target": 3} for r in (4, 9)],
                "targeted": None,
                "backdoor": {
                    "target_class": "three",
                    "target_label": 3,
                    "trigger": {"kind": "patch", "size": 0.25, "seed": 1},
                },
            }
        )
    )
    for epoch, order in ((1, [0, 1, 2]), (2, [9, 4, 0])):
        with (checkpoints / f"suspicious_epoch_{epoch}.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["index", "caption", "margin"])
            for rank, row in enumerate(order):
                writer.writerow([row, captions[row], f"{1 - rank / 10:.6f}"])
    return {
        "checkpoint": checkpoints / "epoch_2.pt",
        "dataset": dataset,
        "manifest": manifest,
        "model": model_dir,
    }


@pytest.fixture
def fake_triggers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kit's triggers when present, else a stand-in that stamps a square."""
    try:
        import roclip_kit.attack.triggers  # noqa: F401
    except ImportError:
        module = types.ModuleType("roclip_kit.attack.triggers")
        module.trigger_from_dict = lambda d: Square("patch")
        monkeypatch.setitem(sys.modules, "roclip_kit.attack.triggers", module)


def _eval(*argv: str) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="roclip")
    add_eval_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["eval", *argv])
    out = io.StringIO()
    code = args.run(args, Console(file=out, width=240))
    return code, out.getvalue()


def test_eval_finds_model_and_suspicious_files_from_the_run(run, fake_triggers, tmp_path) -> None:
    out_json = tmp_path / "out" / "eval.json"
    code, text = _eval(
        "--checkpoint", str(run["checkpoint"]),
        "--dataset", str(run["dataset"]),
        "--manifest", str(run["manifest"]),
        "--probe-limit", "100",
        "--json", str(out_json),
    )  # fmt: skip
    assert code == 0
    for row in ("zero-shot accuracy", "linear-probe accuracy", "backdoor attack success"):
        assert row in text
    assert "detection, epoch 2 precision@k" in text and "100.0%" in text
    result = json.loads(out_json.read_text())
    assert result["model"] == f"local-dir:{run['model']}" and result["epoch"] == 2
    [detection] = result["detection"]
    assert (detection["k"], detection["precision"], detection["recall"]) == (2, 1.0, 1.0)
    assert result["linear_probe"]["train_images"] == 28  # the 2 poisoned rows were left out
    assert result["backdoor"]["trigger"] == "patch"


def test_every_epoch_and_explicit_files_can_be_scored(run, fake_triggers, tmp_path) -> None:
    out_json = tmp_path / "eval.json"
    checkpoints = run["checkpoint"].parent
    code, text = _eval(
        "--checkpoint", str(run["checkpoint"]),
        "--model", f"local-dir:{run['model']}",
        "--test-csv", str(run["dataset"] / "test.csv"),
        "--classes", str(run["dataset"] / "classes.json"),
        "--manifest", str(run["manifest"]),
        "--run-dir", str(checkpoints.parent),
        "--suspicious-epoch", "all",
        "--suspicious", str(checkpoints / "suspicious_epoch_2.csv"),
        "--template", "digit {}",
        "--test-limit", "8",
        "--backdoor-limit", "5",
        "--json", str(out_json),
    )  # fmt: skip
    assert code == 0
    result = json.loads(out_json.read_text())
    assert [d["epoch"] for d in result["detection"]] == [2, 1, 2]
    assert result["detection"][1]["precision"] == 0.0
    assert result["templates"] == ["digit {}"] and result["linear_probe"] is None
    assert result["zero_shot"]["images"] == 8 and result["backdoor"]["images"] == 5
    assert "no training CSV" in text


def test_without_a_manifest_the_table_has_clean_accuracy_only(run) -> None:
    code, text = _eval(
        "--checkpoint", str(run["checkpoint"]),
        "--dataset", str(run["dataset"]),
        "--no-linear-probe",
    )  # fmt: skip
    assert code == 0 and "zero-shot accuracy" in text
    assert "backdoor attack success" not in text and "no manifest" in text


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "pass --dataset DIR, or both --test-csv and --classes"),
        (["--dataset", "/no/such/dir"], "dataset directory /no/such/dir does not exist"),
        (["--dataset", "{dataset}", "--test-limit", "0"], "--test-limit must be at least 1"),
        (
            ["--dataset", "{dataset}", "--manifest", "{manifest}", "--run-dir", "/nope"],
            "run folder /nope does not exist",
        ),
        (
            ["--dataset", "{dataset}", "--manifest", "{manifest}", "--suspicious-epoch", "x"],
            "--suspicious-epoch 'x'",
        ),
        (
            ["--dataset", "{dataset}", "--manifest", "{manifest}", "--suspicious-epoch", "7"],
            "no suspicious_epoch_7.csv",
        ),
        (["--dataset", "{dataset}", "--classes", "/no/classes.json"], "does not exist"),
    ],
)
def test_bad_input_raises_a_clear_value_error(run, extra, message) -> None:
    argv = [a.format(dataset=run["dataset"], manifest=run["manifest"]) for a in extra]
    with pytest.raises(ValueError, match=message):
        _eval("--checkpoint", str(run["checkpoint"]), *argv)


def test_a_checkpoint_outside_a_run_needs_model(run, tmp_path) -> None:
    lone = tmp_path / "lone.pt"
    lone.write_bytes(run["checkpoint"].read_bytes())
    with pytest.raises(ValueError, match="--model is needed"):
        _eval("--checkpoint", str(lone), "--dataset", str(run["dataset"]))


def test_a_test_csv_without_labels_names_the_column(run, tmp_path) -> None:
    test_csv = tmp_path / "test.csv"
    test_csv.write_text("filepath\ttitle\nimg.png\tsomething\n")
    with pytest.raises(ValueError, match=f"{test_csv} has no 'label' column"):
        _eval(
            "--checkpoint", str(run["checkpoint"]),
            "--test-csv", str(test_csv),
            "--classes", str(run["dataset"] / "classes.json"),
        )  # fmt: skip


def _roclip_eval(argv: list[str], capsys) -> tuple[int, str]:
    """``roclip eval ARGV`` through the real command: exit code and everything printed."""
    result = run_roclip(["eval", *argv])
    return result.code, result.output


def _must_not_load(*args, **kwargs):
    raise AssertionError("the checkpoint was loaded before the flags were checked")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--json", "{tmp}"], "--json {tmp} is a directory"),
        (["--device", "bogus"], "--device 'bogus' is not a torch device"),
        (["--probe-c", "0"], "--probe-c must be a finite number > 0, got 0.0"),
        (["--probe-c", "nan"], "--probe-c must be a finite number > 0, got nan"),
        (["--seed", "-2"], "--seed must be a non-negative integer, got -2"),
        (["--suspicious", "{tmp}/s.csv"], "--suspicious score poison detection, which needs"),
        (["--run-dir", "{tmp}"], "--run-dir score poison detection"),
        (["--k", "3"], "--k score poison detection"),
    ],
)
def test_flags_are_checked_before_the_checkpoint_is_loaded(
    run, tmp_path, capsys, monkeypatch, extra, message
) -> None:
    import roclip_kit.commands.eval
    import roclip_kit.train.models

    monkeypatch.setattr(roclip_kit.commands.eval, "evaluate_checkpoint", _must_not_load)
    monkeypatch.setattr(roclip_kit.train.models, "_torch_load", _must_not_load)
    argv = [a.format(tmp=tmp_path) for a in extra]
    code, out = _roclip_eval(
        ["--checkpoint", str(run["checkpoint"]), "--dataset", str(run["dataset"]), *argv], capsys
    )
    assert code == 2 and "Traceback" not in out
    assert message.format(tmp=tmp_path) in out


@pytest.mark.parametrize("target", ["checkpoint", "test.csv", "classes.json", "manifest"])
def test_json_that_would_overwrite_an_input_is_refused(run, capsys, monkeypatch, target) -> None:
    """``--json`` naming the checkpoint or a CSV replaced it with the report: data lost."""
    import roclip_kit.commands.eval

    monkeypatch.setattr(roclip_kit.commands.eval, "evaluate_checkpoint", _must_not_load)
    path = {
        "checkpoint": run["checkpoint"],
        "test.csv": run["dataset"] / "test.csv",
        "classes.json": run["dataset"] / "classes.json",
        "manifest": run["manifest"],
    }[target]
    before = path.read_bytes()
    code, out = _roclip_eval(
        [
            "--checkpoint", str(run["checkpoint"]), "--dataset", str(run["dataset"]),
            "--manifest", str(run["manifest"]), "--json", str(path),
        ],
        capsys,
    )  # fmt: skip
    assert code == 2 and "Traceback" not in out
    assert f"--json {path} is an input of this evaluation" in " ".join(out.split())
    assert path.read_bytes() == before


def test_duplicate_class_names_are_refused_before_loading(run, tmp_path, capsys, monkeypatch):
    import roclip_kit.commands.eval

    monkeypatch.setattr(roclip_kit.commands.eval, "evaluate_checkpoint", _must_not_load)
    classes = tmp_path / "classes.json"
    names = json.loads((run["dataset"] / "classes.json").read_text())
    names["classes"][1] = names["classes"][0]
    classes.write_text(json.dumps(names))
    code, out = _roclip_eval(
        [
            "--checkpoint", str(run["checkpoint"]), "--dataset", str(run["dataset"]),
            "--classes", str(classes),
        ],
        capsys,
    )  # fmt: skip
    assert code == 2 and "Traceback" not in out
    assert "twice" in out and "--classes" in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_a_gpu_is_refused_first(run, capsys) -> None:
    code, out = _roclip_eval(
        [
            "--checkpoint",
            str(run["checkpoint"]),
            "--dataset",
            str(run["dataset"]),
            "--device",
            "cuda",
        ],
        capsys,
    )
    assert code == 2 and "--device cuda: no CUDA device is visible" in out


def test_nan_weights_are_refused_naming_them(run, tmp_path, capsys) -> None:
    saved = torch.load(run["checkpoint"], weights_only=True)
    name = next(k for k, v in saved["state_dict"].items() if v.is_floating_point())
    saved["state_dict"][name] = torch.full_like(saved["state_dict"][name], float("nan"))
    broken = run["checkpoint"].parent / "epoch_9.pt"
    torch.save(saved, broken)
    try:
        code, out = _roclip_eval(
            ["--checkpoint", str(broken), "--dataset", str(run["dataset"])], capsys
        )
    finally:
        broken.unlink()
    assert code == 2 and "has NaN or inf weights in 1 tensor(s)" in out and name in out


def test_non_finite_features_are_refused(run, capsys, monkeypatch) -> None:
    import roclip_kit.evaluate.features
    from roclip_kit.train.models import load_openclip

    loaded = load_openclip(run["checkpoint"], f"local-dir:{run['model']}")
    real = loaded.model.encode_image

    def overflow(images):
        return real(images) * float("inf")

    monkeypatch.setattr(loaded.model, "encode_image", overflow)
    with pytest.raises(ValueError, match="produced NaN or inf image features"):
        roclip_kit.evaluate.features.encode_images(
            loaded, [str(next(run["dataset"].rglob("*.png")))]
        )


def test_corrupt_test_image_names_its_row(run, tmp_path, capsys) -> None:
    lines = (run["dataset"] / "test.csv").read_text().splitlines()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG but no more")
    fields = lines[3].split("\t")
    lines[3] = "\t".join([str(broken), *fields[1:]])
    test_csv = tmp_path / "test.csv"
    test_csv.write_text("\n".join(lines) + "\n")
    code, out = _roclip_eval(
        [
            "--checkpoint",
            str(run["checkpoint"]),
            "--test-csv",
            str(test_csv),
            "--classes",
            str(run["dataset"] / "classes.json"),
        ],
        capsys,
    )
    assert code == 2 and "Traceback" not in out
    assert f"image {broken} (row 2 of {test_csv}) cannot be read" in " ".join(out.split())


def test_a_roclip_state_file_as_checkpoint_says_what_it_is(run, tmp_path, capsys) -> None:
    state = tmp_path / "epoch_2.roclip"
    import numpy as np

    # a NumPy RNG state: what the safe loader refuses with a page of internals
    torch.save({"format": 1, "rng": [np.random.get_state()]}, state)
    code, out = _roclip_eval(["--checkpoint", str(state), "--dataset", str(run["dataset"])], capsys)
    assert code == 2 and "is a RoCLIP state file" in out and "epoch_2.pt" in out
    other = tmp_path / "weird.pt"
    other.write_bytes(state.read_bytes())
    code, out = _roclip_eval(
        [
            "--checkpoint",
            str(other),
            "--dataset",
            str(run["dataset"]),
            "--model",
            f"local-dir:{run['model']}",
        ],
        capsys,
    )
    assert code == 2 and "could not be read as a PyTorch file of tensors" in out
    error = next(line for line in out.splitlines() if line.startswith("error:"))
    assert len(error) < 600 and "WeightsUnpickler" not in out and "Traceback" not in out


def test_a_directory_as_checkpoint(run, tmp_path, capsys) -> None:
    code, out = _roclip_eval(
        ["--checkpoint", str(tmp_path), "--dataset", str(run["dataset"])], capsys
    )
    assert code == 2 and f"--checkpoint {tmp_path} is a directory; give a file" in out


def test_json_is_written_atomically(run, tmp_path) -> None:
    out_json = tmp_path / "deep" / "r.json"
    code, _ = _eval(
        "--checkpoint", str(run["checkpoint"]), "--dataset", str(run["dataset"]),
        "--no-linear-probe", "--json", str(out_json),
    )  # fmt: skip
    assert code == 0 and json.loads(out_json.read_text())["zero_shot"]["images"] == 20
    assert [p.name for p in out_json.parent.iterdir()] == ["r.json"]


def test_byte_order_mark_in_the_test_csv(run, tmp_path) -> None:
    test_csv = tmp_path / "bom.csv"
    test_csv.write_text("\ufeff" + (run["dataset"] / "test.csv").read_text(), encoding="utf-8")
    code, text = _eval(
        "--checkpoint", str(run["checkpoint"]), "--test-csv", str(test_csv),
        "--classes", str(run["dataset"] / "classes.json"),
    )  # fmt: skip
    assert code == 0 and "zero-shot accuracy" in text
