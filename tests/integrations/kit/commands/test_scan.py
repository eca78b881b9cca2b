"""``roclip scan`` end to end on a small poisoned CSV built by the kit's own data tools.

A tiny OpenCLIP model with random weights embeds the pairs: its figures say nothing of a
trained model's, but identical images embed identically under any weights, so the targeted
rows (one held-out image repeated with captions of another class) must come out on top of the
targeted score; a misaligned row, manifest or filter would break that.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("faiss")

from roclip_kit.evaluate.scan import read_pairs  # noqa: E402

from roclip_plugin.scan import DETECTORS, EmbeddingStore  # noqa: E402
from roclip_plugin.testing import assert_refused  # noqa: E402

from ..tiny import MODEL_CFG, run_roclip  # noqa: E402


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A poisoned digits dataset (2 targets x 6 captions, 4 backdoored rows) and a run folder."""
    from roclip_kit.attack.poison import poison_dataset
    from roclip_kit.data.datasets import build_captioned_dataset

    root = tmp_path_factory.mktemp("kit-scan")
    build_captioned_dataset("digits", root / "digits", seed=0, train_limit=200, test_limit=40)
    poison_dataset(
        root / "poisoned",
        dataset_dir=root / "digits",
        targets=2,
        captions_per_target=6,
        backdoor_count=4,
        backdoor_class="seven",
    )
    model_dir = root / "tiny"
    model_dir.mkdir()
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": MODEL_CFG}))
    checkpoints = root / "logs" / "run" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints.parent / "params.txt").write_text(f"model: local-dir:{model_dir}\n")
    torch.manual_seed(0)
    net = open_clip.create_model(f"local-dir:{model_dir}", load_weights=False)
    torch.save({"epoch": 1, "state_dict": net.state_dict()}, checkpoints / "epoch_1.pt")
    return {
        "root": root,
        "dataset": root / "poisoned",
        "manifest": root / "poisoned" / "manifest.json",
        "checkpoint": checkpoints / "epoch_1.pt",
    }


def _scan(setup, out: Path, *extra: str):
    argv = ["scan", "--checkpoint", str(setup["checkpoint"]), "--dataset", str(setup["dataset"])]
    return run_roclip([*argv, "--out", str(out), "--chunk-size", "64", "--k", "8", *extra])


def _ranking(out: Path) -> list[tuple[str, str]]:
    with (out / "scores.csv").open(newline="") as fh:
        return [(r["row"], r["combined"]) for r in csv.DictReader(fh, delimiter="\t")]


def test_scan_with_a_manifest_reports_detection_and_filters(setup, tmp_path) -> None:
    out = tmp_path / "scan"
    result = _scan(setup, out, "--manifest", str(setup["manifest"]), "--drop-count", "20")
    assert result.code == 0, result.output
    pairs = read_pairs(setup["dataset"] / "train.csv")
    n = len(pairs)

    with (out / "scores.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert [r["rank"] for r in rows] == [str(i) for i in range(1, n + 1)]
    assert sorted(int(r["row"]) for r in rows) == list(range(n))
    assert all(r["caption"] == pairs.captions[int(r["row"])] for r in rows)
    combined = [float(r["combined"]) for r in rows]
    assert combined == sorted(combined, reverse=True)

    report = json.loads((out / "report.json").read_text())
    assert report["rows"] == n and set(report["detection"]) == set(DETECTORS)
    for figures in report["detection"].values():
        assert set(figures) == {"all", "backdoor", "targeted"}
        assert figures["targeted"]["k"] == 12 and figures["backdoor"]["k"] == 4
    assert report["detection"]["targeted"]["targeted"]["auroc"] > 0.9
    assert "| targeted |" in (out / "report.md").read_text()
    assert "poison detection" in result.output and "pairs/s" in result.output
    assert "most suspicious pairs by combined" in result.output
    assert rows[0]["caption"][:20] in result.output

    kept = read_pairs(out / "train_filtered.csv")
    dropped = {int(r["row"]) for r in rows[:20]}
    assert len(kept) == n - 20
    assert kept.captions == [c for i, c in enumerate(pairs.captions) if i not in dropped]
    header = (setup["dataset"] / "train.csv").read_text().splitlines()[0]
    assert (out / "train_filtered.csv").read_text().splitlines()[0] == header
    assert not (out / "histograms.png").exists()


def test_without_a_manifest_the_report_has_histograms(setup, tmp_path) -> None:
    out = tmp_path / "plain"
    result = _scan(setup, out, "--drop-fraction", "0.1")
    assert result.code == 0, result.output
    assert (out / "histograms.png").stat().st_size > 10_000
    assert json.loads((out / "report.json").read_text())["detection"] is None
    n = len(read_pairs(setup["dataset"] / "train.csv"))
    assert len(read_pairs(out / "train_filtered.csv")) == n - int(np.ceil(0.1 * n))


def test_the_kept_keys_list_the_rows_the_filter_kept(setup, tmp_path) -> None:
    out = tmp_path / "keys"
    assert _scan(setup, out, "--drop-count", "7").code == 0
    with (out / "scores.csv").open(newline="") as fh:
        dropped = {r["row"] for r in list(csv.DictReader(fh, delimiter="\t"))[:7]}
    n = len(read_pairs(setup["dataset"] / "train.csv"))
    kept = (out / "kept_keys.txt").read_text().splitlines()
    assert kept == [str(row) for row in range(n) if str(row) not in dropped]  # no __key__: rows


def _shards(setup, folder: Path, per_shard: int = 150) -> tuple[str, list[str]]:
    """The poisoned CSV's pairs as WebDataset shards (png + txt, keyed by row), in row order."""
    import webdataset as wds

    pairs = read_pairs(setup["dataset"] / "train.csv")
    folder.mkdir()
    keys = [f"sample{row:05d}" for row in range(len(pairs))]
    for shard, start in enumerate(range(0, len(pairs), per_shard)):
        with wds.TarWriter(str(folder / f"part-{shard}.tar")) as sink:
            for row in range(start, min(start + per_shard, len(pairs))):
                image = Path(pairs.filepaths[row]).read_bytes()
                sink.write({"__key__": keys[row], "png": image, "txt": pairs.captions[row]})
    last = -(-len(pairs) // per_shard) - 1
    return str(folder / f"part-{{0..{last}}}.tar"), keys


def test_shards_scan_to_the_csvs_scores_and_keep_keys(setup, tmp_path, monkeypatch) -> None:
    """The same pairs as shards embed to the same scores; the filter writes kept keys only."""
    spec, keys = _shards(setup, tmp_path / "shards")
    from_csv = tmp_path / "csv"
    assert _scan(setup, from_csv).code == 0
    base = ["scan", "--checkpoint", str(setup["checkpoint"]), "--shards", spec]
    manifest = json.loads(setup["manifest"].read_text())
    for entry in manifest["rows"]:  # name the poisoned rows by key, as a shards manifest does
        entry["key"] = keys[entry.pop("row")]
    (tmp_path / "keyed.json").write_text(json.dumps(manifest))
    extra = ["--chunk-size", "64", "--k", "8", "--drop-count", "12"]
    out = tmp_path / "from-shards"
    _stop_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        run_roclip([*base, "--out", str(out), *extra])
    monkeypatch.undo()
    argv = [
        *base,
        "--out",
        str(out),
        *extra,
        "--resume",
        "--manifest",
        str(tmp_path / "keyed.json"),
    ]
    result = run_roclip(argv)
    assert result.code == 0, result.output
    assert "resumed: 64 of" in result.output

    with (out / "scores.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert all(r["key"] == keys[int(r["row"])] for r in rows)
    assert _ranking(out) == _ranking(from_csv)
    report = json.loads((out / "report.json").read_text())
    assert report["detection"]["targeted"]["targeted"]["k"] == 12
    assert not (out / "train_filtered.csv").exists()
    dropped = {r["key"] for r in rows[:12]}
    assert (out / "kept_keys.txt").read_text().splitlines() == [k for k in keys if k not in dropped]


def test_bad_shards_are_refused_naming_the_flag(setup, tmp_path) -> None:
    spec, _ = _shards(setup, tmp_path / "shards")
    base = ["scan", "--checkpoint", str(setup["checkpoint"]), "--out", str(tmp_path / "o")]
    missing = spec.replace("part-{0", "part-{5")
    assert_refused(run_roclip([*base, "--shards", missing]), "--shards")
    both = [*base, "--shards", spec, "--dataset", str(setup["dataset"])]
    assert_refused(run_roclip(both), "--shards")
    (tmp_path / "junk.tar").write_bytes(b"not a tar file at all" * 40)
    assert_refused(run_roclip([*base, "--shards", str(tmp_path / "junk.tar")]), "--shards")
    assert not (tmp_path / "o" / "embeddings").exists()


def _stop_after(monkeypatch: pytest.MonkeyPatch, chunks: int) -> None:
    """Interrupt the scan (KeyboardInterrupt) once ``chunks`` chunks are on disk."""
    real_write = EmbeddingStore.write

    def stop(self, chunk, images, captions):
        if len(self.done) == chunks:
            raise KeyboardInterrupt
        real_write(self, chunk, images, captions)

    monkeypatch.setattr(EmbeddingStore, "write", stop)


def test_a_stopped_scan_resumes_to_the_same_ranking(setup, tmp_path, monkeypatch) -> None:
    whole = tmp_path / "whole"
    assert _scan(setup, whole).code == 0
    stopped = tmp_path / "stopped"
    _stop_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        _scan(setup, stopped)
    monkeypatch.undo()
    assert_refused(_scan(setup, stopped), "--resume")
    result = _scan(setup, stopped, "--resume")
    assert result.code == 0, result.output
    assert "resumed: 128 of" in result.output
    assert _ranking(stopped) == _ranking(whole)


def test_resume_refuses_another_checkpoint(setup, tmp_path) -> None:
    out = tmp_path / "scan"
    assert _scan(setup, out).code == 0
    other = setup["checkpoint"].with_name("epoch_2.pt")
    other.write_bytes(setup["checkpoint"].read_bytes() + b"")
    argv = ["scan", "--checkpoint", str(other), "--dataset", str(setup["dataset"])]
    result = run_roclip([*argv, "--out", str(out), "--chunk-size", "64", "--resume"])
    assert_refused(result, "--resume")


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        (["--k", "0"], "--k"),
        (["--reference-size", "8"], "--reference-size"),
        (["--peer-reference-size", "8"], "--peer-reference-size"),
        (["--drop-fraction", "1.5"], "--drop-fraction"),
        (["--drop-fraction", "0.1", "--drop-count", "3"], "--drop-count"),
        (["--csv", "missing.csv"], "--csv"),
        (["--manifest", "missing.json"], "--manifest"),
        (["--device", "nonsense"], "--device"),
        (["--batch-size", "0"], "--batch-size"),
        (["--drop-count", "100000"], "--drop-count"),
    ],
)
def test_bad_input_is_one_line_naming_the_flag(setup, tmp_path, extra, flag) -> None:
    result = _scan(setup, tmp_path / "out", *extra)
    assert_refused(result, flag)
    assert not (tmp_path / "out" / "embeddings").exists()


def test_a_missing_checkpoint_or_train_csv_is_named(setup, tmp_path) -> None:
    argv = ["scan", "--checkpoint", str(tmp_path / "none.pt"), "--dataset", str(tmp_path)]
    assert_refused(run_roclip([*argv, "--out", str(tmp_path / "o")]), "--checkpoint")
    argv = ["scan", "--checkpoint", str(setup["checkpoint"]), "--dataset", str(tmp_path)]
    assert_refused(run_roclip([*argv, "--out", str(tmp_path / "o")]), "--dataset")


def test_a_manifest_of_another_csv_is_refused(setup, tmp_path) -> None:
    manifest = json.loads(setup["manifest"].read_text())
    manifest["rows"].append({"row": 10_000, "attack": "backdoor"})
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(manifest))
    result = _scan(setup, tmp_path / "out", "--manifest", str(path))
    assert_refused(result, "--manifest")


def test_the_api_reports_progress_per_batch_and_the_scoring_step(setup, tmp_path) -> None:
    from roclip_kit.evaluate.scan import scan_pairs
    from roclip_kit.train.models import load_openclip

    loaded = load_openclip(setup["checkpoint"], f"local-dir:{setup['root'] / 'tiny'}")
    pairs = read_pairs(setup["dataset"] / "train.csv")
    seen: dict[str, list[int]] = {}

    def progress(description: str, total: int):
        seen[description] = [total]
        return seen[description].append

    result = scan_pairs(
        loaded, pairs, tmp_path / "emb", chunk_size=100, batch_size=32, progress=progress
    )
    embedding = seen["embedding pairs"]
    assert embedding[0] == len(pairs) == sum(embedding[1:])
    assert max(embedding[1:]) == 32  # per batch, not per chunk
    assert seen["scoring (neighbour search)"] == [1, 1]
    assert result.embedded == len(pairs) and result.pairs_per_second > 0
    assert set(result.scores) == set(DETECTORS)


def test_each_distinct_caption_is_encoded_once_and_lands_on_every_row(setup, monkeypatch) -> None:
    import roclip_kit.evaluate.scan as kit_scan
    from roclip_kit.evaluate.features import encode_texts
    from roclip_kit.train.models import load_openclip

    loaded = load_openclip(setup["checkpoint"], f"local-dir:{setup['root'] / 'tiny'}")
    captions = ["a seven", "a two", "a seven", "a one", "a two", "a seven"]
    encoded: list[str] = []

    def counting(model, texts, **kwargs):
        encoded.extend(texts)
        return encode_texts(model, texts, **kwargs)

    monkeypatch.setattr(kit_scan, "encode_texts", counting)
    features = kit_scan.encode_distinct(loaded, captions)
    assert sorted(encoded) == ["a one", "a seven", "a two"]
    expected = encode_texts(loaded, captions).numpy()
    assert np.allclose(features, expected, atol=1e-6)


def test_a_trainer_checkpoint_scans_with_the_model_named(setup, tmp_path) -> None:
    """A roclip_torch Trainer checkpoint of the tiny model's weights scans as its OpenCLIP
    checkpoint does, given --model; without it, the refusal names --model and the fix."""
    from roclip_torch import Trainer, TrainSettings

    model = f"local-dir:{setup['root'] / 'tiny'}"
    net = open_clip.create_model(model, load_weights=False)
    net.load_state_dict(torch.load(setup["checkpoint"], weights_only=True)["state_dict"])
    tokens = open_clip.get_tokenizer(model)(["a seven"] * 16)
    data = list(zip(torch.zeros(16, 3, 32, 32), tokens, strict=True))
    settings = TrainSettings(epochs=1, batch_size=16, checkpoint_dir=tmp_path / "ck")
    trainer = Trainer(net, torch.optim.SGD(net.parameters(), lr=0.0), data, settings)
    checkpoint = trainer.save_checkpoint()  # epoch_0.pt: the weights as they are
    assert checkpoint is not None and checkpoint.name == "epoch_0.pt"

    argv = ["scan", "--checkpoint", str(checkpoint), "--dataset", str(setup["dataset"])]
    argv += ["--chunk-size", "64", "--k", "8"]
    refused = run_roclip([*argv, "--out", str(tmp_path / "no-model")])
    assert_refused(refused, "--model")
    assert "roclip_torch Trainer checkpoint" in refused.output
    assert_refused(run_roclip([*argv, "--model", "RN50", "--out", str(tmp_path / "rn")]), "--model")

    result = run_roclip([*argv, "--model", model, "--out", str(tmp_path / "trainer")])
    assert result.code == 0, result.output
    assert _scan(setup, tmp_path / "openclip").code == 0
    assert _ranking(tmp_path / "trainer") == _ranking(tmp_path / "openclip")
