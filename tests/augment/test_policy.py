"""The augmentation policy: configuration, hooks, keys, tokenizer wrapper, DataLoader workers."""

from __future__ import annotations

import argparse
import pickle
import re
import subprocess
import sys
import zlib
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from roclip_plugin import hookimpl
from roclip_plugin.augment import (
    AugmentationPolicy,
    AugmentingTokenizer,
    accepted_kwargs,
    build_policy,
    identity,
)
from roclip_plugin.augment import keys as augment_keys
from roclip_plugin.augment import policy as augment_policy
from roclip_plugin.augment.keys import (
    EpochCell,
    IndexedDataset,
    KeyMaker,
    current_sample_index,
    mix32,
    mul32,
    python_seed,
    sample_index,
    sample_lanes,
    slot_bits,
    uniforms,
)
from roclip_plugin.augment.text import Eda
from roclip_plugin.config import (
    RoClipConfig,
    add_argparse_args,
    config_from_namespace,
    config_to_argv,
    flag_name,
)
from roclip_plugin.plugins import get_plugin_manager

CAPTION = "a red dog sits on the photo of a car near the cat"


# -- configuration ----------------------------------------------------------------------------


def test_augmentation_defaults_and_reference_preset() -> None:
    cfg = RoClipConfig()
    # the default augments images only; the paper's presets keep EDA on captions
    assert (cfg.image_aug, cfg.text_aug) == ("roclip", "none")
    for name in ("paper", "reference", "safeclip"):
        assert RoClipConfig.from_preset(name).text_aug == "eda"
    assert (cfg.image_aug_refresh, cfg.text_aug_refresh) == ("epoch", "epoch")
    assert (cfg.eda_alpha, cfg.eda_p, cfg.eda_synonyms) == (0.1, 0.1, "auto")
    ref = RoClipConfig.from_preset("reference")
    # the authors' code augments captions once per run and images on every load
    assert (ref.image_aug_refresh, ref.text_aug_refresh) == ("epoch", "run")


@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    [
        ("image_aug", "", "a non-empty registered name"),
        ("image_aug", "  ", "a non-empty registered name"),
        ("image_aug", None, "a non-empty registered name"),
        ("text_aug", 3, "a non-empty registered name"),
        ("image_aug_refresh", "step", "epoch, run"),
        ("text_aug_refresh", "per_run", "epoch, run"),
        ("image_aug_stop_epoch", -1, "integer in [0, "),
        ("eda_alpha", -0.1, "[0.0, 1.0]"),
        ("eda_alpha", 1.5, "[0.0, 1.0]"),
        ("eda_alpha", float("nan"), "[0.0, 1.0]"),
        ("eda_p", 2, "[0.0, 1.0]"),
        ("eda_p", True, "[0.0, 1.0]"),
        ("eda_synonyms", "wordnet31", "auto, nltk, wordnet, table, off"),
    ],
)
def test_bad_augmentation_values(name: str, value: Any, allowed: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"{name} ({flag_name(name)})")) as info:
        RoClipConfig(**{name: value})
    assert repr(value) in str(info.value)
    assert allowed in str(info.value)


def test_augmentation_flags_round_trip() -> None:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_argparse_args(parser)
    argv = ["--roclip-image-aug", "myplugin.crop", "--roclip-text-aug", "none"]
    argv += ["--roclip-text-aug-refresh", "run", "--roclip-eda-alpha", "0.2"]
    argv += ["--roclip-eda-synonyms", "table", "--roclip-image-aug-stop-epoch", "9"]
    cfg = config_from_namespace(parser.parse_args(argv))
    assert (cfg.image_aug, cfg.text_aug, cfg.text_aug_refresh) == ("myplugin.crop", "none", "run")
    assert cfg.image_aug_stop_epoch == 9
    assert (cfg.eda_alpha, cfg.eda_synonyms) == (0.2, "table")
    assert config_from_namespace(parser.parse_args(config_to_argv(cfg))) == cfg
    with pytest.raises(argparse.ArgumentError):
        parser.parse_args(["--roclip-image-aug-refresh", "always"])


# -- building through the hook ----------------------------------------------------------------


def test_build_policy_defaults() -> None:
    policy = build_policy(RoClipConfig(seed=4), get_plugin_manager())
    assert (policy.image_name, policy.text_name) == ("roclip", "none")
    assert policy.text_augment is identity  # captions train as written
    assert policy.image_keys.seed == 4


def test_build_policy_paper_preset_uses_eda() -> None:
    cfg = RoClipConfig.from_preset("paper", eda_synonyms="table", seed=4)
    policy = build_policy(cfg, get_plugin_manager())
    assert (policy.image_name, policy.text_name) == ("roclip", "eda")
    assert isinstance(policy.text_augment, Eda) and policy.text_augment.synonyms is not None
    assert policy.image_keys.seed == 4
    assert "roclip" in repr(policy)


def test_unknown_names_name_the_flag_and_the_registered_names() -> None:
    with pytest.raises(ValueError, match=r"--roclip-image-aug: .*'crop'.*registered: none, roclip"):
        build_policy(RoClipConfig(image_aug="crop"), get_plugin_manager())
    with pytest.raises(ValueError, match=r"--roclip-text-aug: .*'bt'.*registered: eda, none"):
        build_policy(RoClipConfig(text_aug="bt", image_aug="none"), get_plugin_manager())


def _rng_caption(caption: str, rng, key) -> str:
    return f"{caption} {rng.randrange(1000)} {key[2]}"


class _Plugin:
    @hookimpl
    def roclip_register_augmentations(self, register):
        register("text", "tagged", lambda config: _rng_caption)
        register("text", "eda", lambda config: str.upper, replace=True)
        register("image", "invert", lambda config: lambda image: 1.0 - image)


def test_plugins_add_and_replace_augmentations() -> None:
    pm = get_plugin_manager()
    pm.register(_Plugin())
    cfg = RoClipConfig(image_aug="invert", text_aug="tagged")
    policy = build_policy(cfg, pm)
    out = policy.text("a dog", epoch=0, index=7)
    assert re.fullmatch(r"a dog \d+ 7", out)
    assert out == policy.text("a dog", epoch=0, index=7)
    assert build_policy(cfg.replace(text_aug="eda"), pm).text("a dog", index=0) == "A DOG"
    images = torch.rand(3, 3, 8, 8)
    with pytest.warns(RuntimeWarning, match="no batch method"):
        out = policy.gpu_batch(images, 0, [0, 1, 2])
    assert torch.allclose(out, 1.0 - images)


@pytest.mark.filterwarnings("ignore:image augmentation 'invert' has no batch method")
@pytest.mark.parametrize("refresh", ["epoch", "run"])
def test_images_pass_unaugmented_from_the_stop_epoch(refresh: str) -> None:
    pm = get_plugin_manager()
    pm.register(_Plugin())
    cfg = RoClipConfig(image_aug="invert", image_aug_stop_epoch=2, image_aug_refresh=refresh)
    policy = build_policy(cfg, pm)
    images = torch.rand(2, 3, 8, 8)
    transform = policy.image_transform(None, size=8)
    for epoch, augmented in [(0, True), (1, True), (2, False), (5, False)]:
        expected = 1.0 - images if augmented else images
        assert policy.images_augmented(epoch) is augmented
        assert torch.allclose(policy.gpu_batch(images, epoch, [0, 1]), expected)
        # the CPU transform reads the policy's epoch, as DataLoader workers do
        policy.set_epoch(epoch)
        assert policy.images_augmented() is augmented
        assert torch.allclose(transform(images[0], index=0), expected[0])
    assert "image_stop_epoch=2" in repr(policy)
    # without a stop epoch every epoch is augmented, and the identity never is
    assert build_policy(cfg.replace(image_aug_stop_epoch=None), pm).images_augmented(99)
    assert not build_policy(cfg.replace(image_aug="none"), pm).images_augmented(0)


@pytest.mark.parametrize(
    ("fraction", "epochs", "stop"),
    [(2 / 3, 12, 8), (0.07, 100, 7), (0.5, 3, 2), (1.0, 12, 12), (0.01, 12, 1)],
)
def test_a_stop_fraction_resolves_against_the_run_length(
    fraction: float, epochs: int, stop: int
) -> None:
    cfg = RoClipConfig(image_aug_stop_fraction=fraction, image_aug_stop_epoch=3)
    assert cfg.resolved_image_aug_stop(epochs) == stop  # the fraction overrides the epoch
    policy = build_policy(cfg, get_plugin_manager(), epochs)
    assert policy.image_stop_epoch == stop
    assert policy.images_augmented(stop - 1) and not policy.images_augmented(stop)


def test_a_stop_fraction_without_the_run_length_augments_every_epoch_and_warns() -> None:
    cfg = RoClipConfig(image_aug_stop_fraction=0.5)
    assert cfg.resolved_image_aug_stop(None) is None
    augment_policy._warned.clear()
    with pytest.warns(RuntimeWarning, match="--roclip-image-aug-stop-fraction needs the run"):
        policy = build_policy(cfg, get_plugin_manager())
    assert policy.image_stop_epoch is None and policy.images_augmented(10**6)
    assert RoClipConfig(image_aug_stop_epoch=4).resolved_image_aug_stop(None) == 4


def test_accepted_kwargs() -> None:
    def both(x, rng=None, key=None):
        return x

    def anything(x, **kwargs):
        return x

    assert accepted_kwargs(both, ("key", "size", "rng")) == ("key", "rng")
    assert accepted_kwargs(anything, ("key", "rng")) == ("key", "rng")
    assert accepted_kwargs(str.upper, ("key", "rng")) == ()
    assert accepted_kwargs(identity, ("key",)) == ()


# -- keys -------------------------------------------------------------------------------------

u32 = st.integers(0, 2**32 - 1)


@given(u32, u32)
@settings(max_examples=300, deadline=None)
def test_mul32_is_multiplication_mod_2_32(x: int, c: int) -> None:
    assert mul32(x, c) == (x * c) % 2**32
    assert int(mul32(torch.tensor([x]), c)) == (x * c) % 2**32


@given(st.integers(0, 2**63 - 1), st.integers(0, 10**6), st.integers(0, 2**62), u32)
@settings(max_examples=200, deadline=None)
def test_int_and_tensor_hashes_agree(seed: int, epoch: int, index: int, stream: int) -> None:
    a, b = sample_lanes(seed, epoch, index, stream)
    ta, tb = sample_lanes(seed, epoch, torch.tensor([index]), stream)
    assert (a, b) == (int(ta), int(tb))
    u = uniforms(seed, epoch, torch.tensor([index]), stream, 5)[0]
    assert [int(v * 2**32) for v in u] == [slot_bits(a, b, s) for s in range(5)]
    assert (u >= 0).all() and (u < 1).all()
    assert 0 <= python_seed(seed, epoch, index, stream) < 2**64


def test_hash_separates_samples_and_is_uniform() -> None:
    indices = torch.cat([torch.arange(5000), torch.arange(5000) + 2**32])  # high bits count
    u = uniforms(0, 0, indices, 1, 2)
    assert u[:, 0].unique().numel() == 10000
    histogram = torch.histc(u.float(), bins=10, min=0, max=1) / u.numel()
    assert (histogram - 0.1).abs().max() < 0.01
    assert abs(torch.corrcoef(u.T)[0, 1]) < 0.03
    assert mix32(0) == 0 and mix32(1) != 1
    with pytest.raises(ValueError, match="non-negative"):
        uniforms(0, 0, torch.tensor([-1]), 1, 2)
    with pytest.raises(ValueError, match="non-negative"):
        python_seed(0, 0, -1, 1)


def test_key_maker_refresh_and_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    cell = EpochCell(2)
    keys = KeyMaker(7, "epoch", 11, cell)
    assert keys.key(5) == (7, 2, 5, 11)
    assert KeyMaker(7, "run", 11, cell).key(5, epoch=9) == (7, 0, 5, 11)
    with sample_index(42):
        assert current_sample_index() == 42
        assert keys.key() == (7, 2, 42, 11)
    assert current_sample_index() is None
    first, second = keys.key(), keys.key()
    assert (first[2], second[2]) == (0, 1) and first[3] != 11  # counter, salted stream
    cell.set(3)
    assert keys.key()[2] == 0  # the counter restarts each epoch
    monkeypatch.setattr(augment_keys, "_worker_and_rank", lambda: (1, 0))
    assert keys.key()[3] != first[3]  # another worker draws another stream
    assert keys.keys(2, [8, 9]) == [(7, 3, 8, 11), (7, 3, 9, 11)]
    with pytest.raises(ValueError, match="2 sample indices for 3 samples"):
        keys.keys(3, [8, 9])
    copy = pickle.loads(pickle.dumps(keys))
    assert copy._count == 0
    with pytest.raises(ValueError, match="refresh"):
        KeyMaker(0, "step", 1, cell)


def test_epoch_cell() -> None:
    cell = EpochCell()
    assert cell.get() == 0
    cell.set(12)
    assert cell.get() == 12
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="non-negative integer"):
            cell.set(bad)  # type: ignore[arg-type]


# -- the tokenizer wrapper --------------------------------------------------------------------


class ToyTokenizer:
    """Picklable stand-in with OpenCLIP's call signature: words -> crc32 ids, padded."""

    context_length = 16
    vocab_size = 2**20

    def __call__(self, texts, context_length=None):
        texts = [texts] if isinstance(texts, str) else texts
        length = context_length or self.context_length
        out = torch.zeros(len(texts), length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [zlib.crc32(w.encode()) % self.vocab_size for w in text.split()][:length]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


def _text_policy(**kwargs) -> AugmentationPolicy:
    config = RoClipConfig(image_aug="none", text_aug="eda", eda_synonyms="table", **kwargs)
    return build_policy(config, get_plugin_manager())


def test_tokenizer_wrapper_call_signature_and_attributes() -> None:
    policy = _text_policy()
    tokenizer = policy.tokenizer(ToyTokenizer())
    assert isinstance(tokenizer, AugmentingTokenizer)
    assert tokenizer(CAPTION).shape == (1, 16)
    assert tokenizer([CAPTION, CAPTION], context_length=8).shape == (2, 8)
    assert tokenizer.vocab_size == 2**20 and tokenizer.context_length == 16
    a = tokenizer([CAPTION, "a dog"], indices=[3, 4])
    assert torch.equal(a, tokenizer([CAPTION, "a dog"], indices=[3, 4]))
    expected = ToyTokenizer()([policy.text(CAPTION, index=3), policy.text("a dog", index=4)])
    assert torch.equal(a, expected)
    tokenizer.set_epoch(5)
    assert tokenizer.epoch == policy.epoch == 5
    with sample_index(9):
        assert torch.equal(tokenizer(CAPTION), ToyTokenizer()(policy.text(CAPTION, index=9)))
    counter_outputs = {tuple(tokenizer(CAPTION)[0].tolist()) for _ in range(20)}
    assert len(counter_outputs) > 3  # a per-call counter without indices
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert torch.equal(clone([CAPTION], indices=[3]), tokenizer([CAPTION], indices=[3]))


def test_tokenizer_wrapper_with_openclip() -> None:
    open_clip = pytest.importorskip("open_clip")
    base = open_clip.get_tokenizer("RN50")
    tokenizer = _text_policy().tokenizer(base)
    ids = tokenizer(["a photo <end_of_text> of a dog"], indices=[0])[0].tolist()
    assert ids.count(base.eot_token_id) == 1 and ids[0] == base.sot_token_id
    assert tokenizer(["a dog"], context_length=10).shape == (1, 10)
    assert pickle.loads(pickle.dumps(tokenizer))(["a dog"], indices=[1]).shape == (1, 77)


# -- DataLoader workers -----------------------------------------------------------------------


class PairDataset:
    """An image (from a real photo) and a caption per index; transforms know no index."""

    def __init__(self, image: Any, captions: list[str], transform: Any, tokenizer: Any) -> None:
        self.image = image
        self.captions = captions
        self.transform = transform
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.image), self.tokenizer([self.captions[index]])[0]


def _dataset(policy: AugmentationPolicy) -> IndexedDataset:
    datasets = pytest.importorskip("sklearn.datasets")
    T = pytest.importorskip("torchvision.transforms")  # noqa: N806
    from PIL import Image

    image = Image.fromarray(datasets.load_sample_images().images[1]).resize((64, 43))
    captions = [f"{CAPTION} number {i}" for i in range(8)]
    transform = policy.image_transform(T.Compose([T.ToTensor()]), size=24)
    return IndexedDataset(PairDataset(image, captions, transform, policy.tokenizer(ToyTokenizer())))


def _epochs(policy: AugmentationPolicy, loader: torch.utils.data.DataLoader) -> list:
    out = []
    for epoch in range(2):
        policy.set_epoch(epoch)  # before iterating, as with DistributedSampler.set_epoch
        images, tokens = zip(*[(x, y) for x, y in loader], strict=True)
        out.append((torch.cat(images), torch.cat(tokens)))
    return out


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_reproduce_the_single_process_result(context: str) -> None:
    config = RoClipConfig(text_aug="eda", eda_synonyms="table", seed=3)
    policy = build_policy(config, get_plugin_manager())
    dataset = _dataset(policy)
    single = _epochs(policy, torch.utils.data.DataLoader(dataset, batch_size=2))
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=2,
        num_workers=2,
        multiprocessing_context=context,
        persistent_workers=True,  # the epoch must reach workers that are not restarted
    )
    workers = _epochs(policy, loader)
    for (img_a, tok_a), (img_b, tok_b) in zip(single, workers, strict=True):
        assert torch.equal(tok_a, tok_b)
        assert torch.allclose(img_a, img_b, atol=1e-6)
    assert not torch.equal(single[0][0], single[1][0])  # a fresh draw in epoch 1
    assert not torch.equal(single[0][1], single[1][1])


def test_policy_pickles_and_shares_its_epoch() -> None:
    policy = _text_policy()
    policy.set_epoch(4)
    transform = policy.image_transform(None)
    clone = pickle.loads(pickle.dumps((policy, transform)))
    assert clone[0].epoch == 4 and clone[1].policy is clone[0]
    assert clone[0].text(CAPTION, index=2) == policy.text(CAPTION, index=2)


class IndexEcho(list):
    """A dataset whose items are the index its transforms would see."""

    name = "toy"

    def __getitem__(self, i):
        return current_sample_index()


def test_indexed_dataset_forwards_attributes() -> None:
    wrapped = IndexedDataset(IndexEcho([0, 0, 0]))
    assert [wrapped[i] for i in range(3)] == [0, 1, 2]
    assert len(wrapped) == 3 and wrapped.name == "toy"
    assert pickle.loads(pickle.dumps(wrapped))[2] == 2


# -- imports ----------------------------------------------------------------------------------


def test_core_imports_neither_openclip_nor_image_libraries() -> None:
    code = (
        "import sys, roclip_plugin\n"
        "from roclip_plugin import get_plugin_manager\n"
        "from roclip_plugin.augment import build_policy\n"
        "from roclip_plugin.config import RoClipConfig\n"
        "pm = get_plugin_manager()\n"
        "policy = build_policy(RoClipConfig(image_aug='none', eda_synonyms='table'), pm)\n"
        "policy.text('a dog', index=0)\n"
        "assert not {'open_clip', 'torchvision', 'PIL'} & set(sys.modules), sorted(sys.modules)\n"
        "build_policy(RoClipConfig(eda_synonyms='table'), pm)\n"
        "assert 'torchvision' in sys.modules and 'open_clip' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_image_transform_exposes_the_preprocessing_attributes() -> None:
    """Code that inspects its transform (OpenCLIP's synthetic data reads
    ``transforms[0].size``) sees the wrapped preprocessing, like the tokenizer wrapper does."""
    T = pytest.importorskip("torchvision.transforms")  # noqa: N806
    preprocess = T.Compose([T.RandomResizedCrop(32), T.ToTensor()])
    policy = build_policy(RoClipConfig(image_aug="none"), get_plugin_manager())
    transform = policy.image_transform(preprocess)
    assert transform.transforms is preprocess.transforms
    assert transform.transforms[0].size == (32, 32)
    assert transform.size == (32, 32)  # its own attributes stay its own
    clone = pickle.loads(pickle.dumps(transform))
    assert clone.transforms[0].size == (32, 32)
    with pytest.raises(AttributeError):
        _ = policy.image_transform(None).transforms
