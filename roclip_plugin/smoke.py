"""A short CPU run that shows the defense at work on a synthetic captioned world.

Nothing is downloaded: "images" are feature vectors drawn around class centres plus a style
component, and captions are token bags such as "a dark photo of a cat". A targeted poisoning
attack pairs a few held-out target images with many captions of another class. Two tiny
two-tower models train on the same poisoned data, one with the CLIP loss and one with RoCLIP
(driven through :class:`~roclip_plugin.defense.RoClipDefense` and its hooks, as any trainer
would), and the run reports clean zero-shot accuracy, targeted attack success, and how well the
defense's margins single out the poisoned pairs. It is a synthetic smoke demonstration of the
mechanism, not evidence on real images: the attack kit and real-data benchmark live elsewhere.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from roclip_plugin.config import RoClipConfig
from roclip_plugin.config_aliases import renamed_attribute
from roclip_plugin.defense import RoClipDefense
from roclip_plugin.plugins import get_plugin_manager
from roclip_plugin.stats import MatchStatsCollector
from roclip_plugin.validation import as_integer, check_device, check_real

MAX_TRAIN = 1_000_000  # beyond this the synthetic world only costs memory
# Settings the ``roclip smoke`` command sets by flag: field -> flag, for messages.
SMOKE_FLAGS = {"train": "--train", "epochs": "--epochs", "seed": "--seed", "device": "--device"}

CLASSES = {
    "airplane": ["airplane", "plane", "jet"],
    "bird": ["bird", "sparrow", "finch"],
    "car": ["car", "automobile", "sedan"],
    "cat": ["cat", "kitten", "kitty"],
    "deer": ["deer", "doe", "stag"],
    "dog": ["dog", "puppy", "hound"],
    "frog": ["frog", "toad", "tadpole"],
    "horse": ["horse", "pony", "stallion"],
    "ship": ["ship", "boat", "vessel"],
    "truck": ["truck", "lorry", "pickup"],
}
STYLES = ["bright", "dark", "blurry", "sharp"]
FILLER = ["a", "photo", "of", "small", "large", "old", "new", "nice", "the", "in", "wild"]


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the synthetic world and of the training runs."""

    train: int = 20000
    test: int = 1000
    targets: int = 8
    poison_captions: int = 30
    epochs: int = 10
    batch: int = 256
    lr: float = 3e-3
    image_dim: int = 48
    embed_dim: int = 32
    seed: int = 0
    device: str = "cpu"
    image_noise: float = 1.0  # augmentation: Gaussian noise added to each image draw
    word_dropout: float = 0.2  # augmentation: chance that a caption word is replaced by "a"

    def __post_init__(self) -> None:
        """Refuse sizes that would train nothing, or crash deep in torch, with the flag named."""
        limits = {
            "train": (1, MAX_TRAIN),
            "test": (1, MAX_TRAIN),
            "targets": (1, 1000),
            "poison_captions": (1, 10_000),
            "epochs": (1, 10_000),
            "batch": (1, MAX_TRAIN),
            "image_dim": (1, 4096),
            "embed_dim": (1, 4096),
            "seed": (0, 2**63 - 1),
        }
        for name, (low, high) in limits.items():
            value = getattr(self, name)
            number = as_integer(value)
            if number is None or not low <= number <= high:
                flag = f" ({SMOKE_FLAGS[name]})" if name in SMOKE_FLAGS else ""
                raise ValueError(
                    f"{name}{flag}: invalid value {value!r}; allowed: an integer in [{low}, {high}]"
                )
            object.__setattr__(self, name, number)
        for name, low, high in (("lr", 0.0, 10.0), ("image_noise", 0.0, 100.0)):
            check_real(name, getattr(self, name), low, high, low_open=name == "lr")
        check_real("word_dropout", self.word_dropout, 0.0, 1.0)
        check_device(self.device)

    @property
    def pairs(self) -> int:
        """Training pairs an epoch: the clean ones and the poisoned ones."""
        return self.train + self.targets * self.poison_captions


@dataclass
class World:
    """Tensors of one synthetic dataset with its poison."""

    images: torch.Tensor
    captions: torch.Tensor
    labels: torch.Tensor
    poisoned: torch.Tensor  # bool per training row
    test_images: torch.Tensor
    test_labels: torch.Tensor
    target_images: torch.Tensor
    target_labels: torch.Tensor
    adversarial: torch.Tensor
    prompts: torch.Tensor
    vocab: list[str] = field(default_factory=list)


def _vocab() -> dict[str, int]:
    words = [w for syns in CLASSES.values() for w in syns] + STYLES + FILLER
    return {w: i for i, w in enumerate(dict.fromkeys(words))}


def _caption(cls: int, style: int, vocab: dict[str, int], g: torch.Generator) -> list[int]:
    name = list(CLASSES.values())[cls]
    syn = name[int(torch.randint(len(name), (1,), generator=g))]
    extra = [FILLER[int(i)] for i in torch.randint(3, len(FILLER), (2,), generator=g)]
    return [vocab[w] for w in ["a", STYLES[style], "photo", "of", "a", syn, *extra]]


def build_world(s: DemoSettings) -> World:
    """Clean pairs, held-out test and target images, and the poison pairs (deterministic)."""
    g = torch.Generator().manual_seed(s.seed)
    vocab = _vocab()
    centres = F.normalize(torch.randn(len(CLASSES), s.image_dim, generator=g), dim=-1) * 3.0
    styles = F.normalize(torch.randn(len(STYLES), s.image_dim, generator=g), dim=-1) * 1.5

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        labels = torch.randint(len(CLASSES), (n,), generator=g)
        style = torch.randint(len(STYLES), (n,), generator=g)
        noise = torch.randn(n, s.image_dim, generator=g)
        return centres[labels] + styles[style] + noise, labels, style

    images, labels, style = draw(s.train)
    captions = [_caption(int(c), int(st), vocab, g) for c, st in zip(labels, style, strict=False)]
    test_images, test_labels, _ = draw(s.test)
    target_images, target_labels, target_style = draw(s.targets)
    shift = torch.randint(1, len(CLASSES), (s.targets,), generator=g)
    adversarial = (target_labels + shift) % len(CLASSES)
    poison_img, poison_cap = [], []
    for t in range(s.targets):
        for _ in range(s.poison_captions):
            poison_img.append(target_images[t])
            poison_cap.append(_caption(int(adversarial[t]), int(target_style[t]), vocab, g))
    all_images = torch.cat([images, torch.stack(poison_img)])
    all_caps = torch.tensor(captions + poison_cap)
    poisoned = torch.zeros(all_images.shape[0], dtype=torch.bool)
    poisoned[s.train :] = True
    prompts = torch.tensor(
        [[vocab[w] for w in ["a", "photo", "of", "a", syns[0]]] for syns in CLASSES.values()]
    )
    return World(
        all_images,
        all_caps,
        torch.cat([labels, adversarial.repeat_interleave(s.poison_captions)]),
        poisoned,
        test_images,
        test_labels,
        target_images,
        target_labels,
        adversarial,
        prompts,
        list(vocab),
    )


class TinyClip(nn.Module):
    """Two small towers and CLIP's learnable temperature."""

    def __init__(self, image_dim: int, vocab: int, embed_dim: int) -> None:
        super().__init__()
        self.image = nn.Sequential(nn.Linear(image_dim, 128), nn.ReLU(), nn.Linear(128, embed_dim))
        self.words = nn.EmbeddingBag(vocab, 64, mode="mean")
        self.text = nn.Sequential(nn.ReLU(), nn.Linear(64, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings."""
        return F.normalize(self.image(x), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised caption embeddings."""
        return F.normalize(self.text(self.words(tokens)), dim=-1)


@dataclass
class RunResult:
    """What one training run measured."""

    name: str
    zero_shot: float
    targeted_asr: float
    detection_precision: float | None
    defended_epochs: list[int]
    seconds: float

    matching_epochs = renamed_attribute("matching_epochs", "defended_epochs")


def _classify(model: TinyClip, images: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (model.encode_image(images) @ model.encode_text(prompts).T).argmax(dim=1)


def augment(
    images: torch.Tensor, captions: torch.Tensor, s: DemoSettings, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh per-draw augmentation: feature noise for images, word dropout for captions."""
    noise = torch.randn(images.shape, generator=g).to(images.device) * s.image_noise
    drop = torch.rand(captions.shape, generator=g).to(captions.device) < s.word_dropout
    return images + noise, torch.where(drop, torch.zeros_like(captions), captions)


def train(
    world: World, s: DemoSettings, config: RoClipConfig | None, *, augmented: bool | None = None
) -> RunResult:
    """Train one model (CLIP when ``config`` is None) and evaluate it.

    ``augmented`` defaults to the paper's comparison: RoCLIP augments, CLIP does not.
    """
    augmented = config is not None if augmented is None else augmented
    if config is not None and augmented:
        s = stand_ins(s, config)
        augmented = bool(s.image_noise or s.word_dropout)
    torch.manual_seed(s.seed)
    device = torch.device(s.device)
    model = TinyClip(world.images.shape[1], len(world.vocab), s.embed_dim).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=s.lr)
    # the margins of the last matching epoch, as many rows as there are poisons
    recorder = MatchStatsCollector(math.inf, keep=int(world.poisoned.sum()))
    defense = None
    if config is not None:
        pm = get_plugin_manager()
        pm.register(recorder)
        defense = RoClipDefense(
            config, plugin_manager=pm, total_epochs=s.epochs, samples_per_epoch=s.pairs
        )
    images, captions = world.images.to(device), world.captions.to(device)
    order_g = torch.Generator().manual_seed(s.seed + 1)
    aug_g = torch.Generator().manual_seed(s.seed + 2)
    defended_epochs: list[int] = []
    start = time.perf_counter()
    for epoch in range(s.epochs):
        if defense is not None and defense.start_epoch(epoch):
            defended_epochs.append(epoch)
            recorder.reset()
        order = torch.randperm(images.shape[0], generator=order_g)
        for i in range(0, len(order), s.batch):
            idx = order[i : i + s.batch].to(device)
            x, y = images[idx], captions[idx]
            if augmented:
                x, y = augment(x, y, s, aug_g)
            img, txt = model.encode_image(x), model.encode_text(y)
            scale = model.logit_scale.exp()
            if defense is None:
                labels = torch.arange(len(idx), device=device)
                logits = scale * img @ txt.T
                loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
            else:
                loss = defense.compute_loss(img, txt, scale, sample_ids=idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
    seconds = time.perf_counter() - start
    model = model.cpu()
    zero_shot = float(
        (_classify(model, world.test_images, world.prompts) == world.test_labels).float().mean()
    )
    asr = float(
        (_classify(model, world.target_images, world.prompts) == world.adversarial).float().mean()
    )
    precision = _detection_precision(recorder, world.poisoned) if defense else None
    name = ("CLIP" if config is None else "RoCLIP") + (" + aug" if augmented else "")
    return RunResult(name, zero_shot, asr, precision, defended_epochs, seconds)


def stand_ins(s: DemoSettings, config: RoClipConfig) -> DemoSettings:
    """The synthetic stand-ins of the configured augmentations for the RoCLIP run.

    The world's "images" are vectors and its captions token bags, so no real augmentation
    applies: any image augmentation but ``none`` becomes feature noise, any text augmentation
    but ``none`` word dropout, and ``none`` turns its stand-in off.
    """
    return replace(
        s,
        image_noise=0.0 if config.image_aug == "none" else s.image_noise,
        word_dropout=0.0 if config.text_aug == "none" else s.word_dropout,
    )


def _detection_precision(recorder: MatchStatsCollector, poisoned: torch.Tensor) -> float | None:
    """Of the rows with the largest margins (as many as there are poisons), the poisoned share."""
    if not recorder.steps:
        return None
    flagged = torch.tensor([row for _, row, _ in recorder.margins.ranked()], dtype=torch.long)
    return float(poisoned[flagged].float().mean())


def run_demo(s: DemoSettings, config: RoClipConfig) -> list[RunResult]:
    """Build the poisoned world; train CLIP, CLIP with augmentation, and RoCLIP on it.

    The middle row separates what augmentation alone does from what matching adds. The models
    are tiny (a 48-128-32 MLP), so torch runs on one CPU thread: on two, the threads spent 16x
    the CPU time synchronising (measured: 154 against 9.3 CPU-seconds at the default size, the
    same figures to the last digit).
    """
    world = build_world(s)
    with one_cpu_thread(s.device):
        return [
            train(world, s, None),
            train(world, s, None, augmented=True),
            train(world, s, config),
        ]


@contextmanager
def one_cpu_thread(device: str) -> Iterator[None]:
    """Run torch's CPU operations on one thread for a block (nothing changes on a GPU)."""
    if not str(device).startswith("cpu"):
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
