"""The words of the captioned datasets: class vocabularies, drawn attributes, caption sentences.

Each image is rendered with a stroke colour, background, size and position drawn from the
build's seed (:func:`draw_attributes`); its caption (:func:`make_caption`) names those
attributes together with one synonym of its class, in one of several sentence templates, so
image-text matching cannot collapse into classification. :mod:`roclip_kit.data.datasets`
renders and writes what is drawn here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Stroke colours and backgrounds (RGB). A pair is used only if its luminance differs enough
# for the object to stay clearly visible (no yellow or white strokes on white).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 255),
    "yellow": (250, 220, 30),
    "cyan": (30, 220, 230),
    "magenta": (220, 50, 220),
    "orange": (255, 140, 0),
    "white": (255, 255, 255),
}


BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (0, 0, 0), "white": (255, 255, 255)}


MIN_LUMINANCE_GAP = 60.0


# Side of the object's box as a fraction of the canvas; "large" fills it (always centred).
SIZES: dict[str, float] = {"small": 0.55, "medium": 0.75, "large": 1.0}


POSITIONS = ("top left", "top right", "bottom left", "bottom right", "center")


WHERE = {
    "top left": "in the top left corner",
    "top right": "in the top right corner",
    "bottom left": "in the bottom left corner",
    "bottom right": "in the bottom right corner",
    "center": "in the center",
}


# {a} is the article for the word after it; every template names colour and class.
CAPTION_TEMPLATES = (
    "{a} {size} {color} {name} on a {bg} background, {where}.",
    "a photo of {a} {color} {name} {where}, on {bg}.",
    "{color} {name}, {size}, {where}, {bg} background.",
    "a {bg} picture with {a} {size} {color} {name} {where}.",
    "there is {a} {color} {name} {where}.",
    "{a} {color} {name} on a {bg} background.",
)


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


DIGIT_TEMPLATES = (
    "a photo of the digit {}.",
    "a drawing of the number {}.",
    "the handwritten digit {}.",
    "an image of the number {}.",
)


FASHION_SYNONYMS: dict[str, list[str]] = {
    "t-shirt": ["t-shirt", "tee", "top", "tee shirt"],
    "trouser": ["trouser", "pair of trousers", "pair of pants", "pair of slacks"],
    "pullover": ["pullover", "sweater", "jumper"],
    "dress": ["dress", "gown", "frock"],
    "coat": ["coat", "jacket", "overcoat"],
    "sandal": ["sandal", "open shoe", "summer sandal"],
    "shirt": ["shirt", "button-up shirt", "blouse"],
    "sneaker": ["sneaker", "trainer", "running shoe"],
    "bag": ["bag", "handbag", "purse"],
    "ankle boot": ["ankle boot", "boot", "bootie"],
}


FASHION_TEMPLATES = (
    "a photo of the {}.",
    "a picture of the {}, a type of clothing.",
    "an image of the {}, a fashion item.",
    "the {} on a plain background.",
)


@dataclass(frozen=True)
class Vocabulary:
    """The words of a source: class names by label, their synonyms, zero-shot templates."""

    classes: list[str]
    synonyms: dict[str, list[str]]
    templates: list[str]


def _digit_vocabulary() -> Vocabulary:
    synonyms = {
        word: [word, str(d), f"number {word}", f"digit {d}"] for d, word in enumerate(DIGIT_WORDS)
    }
    return Vocabulary(list(DIGIT_WORDS), synonyms, list(DIGIT_TEMPLATES))


def _fashion_vocabulary() -> Vocabulary:
    return Vocabulary(list(FASHION_SYNONYMS), FASHION_SYNONYMS, list(FASHION_TEMPLATES))


def _luminance(rgb: tuple[int, int, int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def color_pairs() -> list[tuple[str, str]]:
    """(stroke, background) names whose luminance gap keeps the object clearly visible."""
    return [
        (stroke, bg)
        for bg, bg_rgb in BACKGROUNDS.items()
        for stroke, rgb in COLORS.items()
        if abs(_luminance(rgb) - _luminance(bg_rgb)) >= MIN_LUMINANCE_GAP
    ]


PAIRS = color_pairs()


SIZE_NAMES = tuple(SIZES)


@dataclass(frozen=True)
class Attributes:
    """Per-image draws (index arrays of equal length) of one split."""

    pair: np.ndarray
    size: np.ndarray
    position: np.ndarray
    template: np.ndarray
    synonym: np.ndarray
    plain: np.ndarray


PLAIN_PAIR = PAIRS.index(("white", "black"))


def draw_attributes(n: int, rng: np.random.Generator, attribute_rate: float = 1.0) -> Attributes:
    """Colour pair, size, position, caption template and synonym slot for ``n`` images.

    A share ``1 - attribute_rate`` of the images is *plain*: a large white object centred on
    black, captioned by a plain template ("a photo of the digit seven.") that names no attribute.
    """
    pair = rng.integers(len(PAIRS), size=n)
    size = rng.integers(len(SIZES), size=n)
    position = rng.integers(len(POSITIONS), size=n)
    position[size == SIZE_NAMES.index("large")] = POSITIONS.index("center")
    template = rng.integers(len(CAPTION_TEMPLATES), size=n)
    synonym = rng.integers(1 << 30, size=n)  # modulo the class's synonym count later
    plain = rng.random(n) >= attribute_rate
    pair[plain] = PLAIN_PAIR
    size[plain] = SIZE_NAMES.index("large")
    position[plain] = POSITIONS.index("center")
    return Attributes(pair, size, position, template, synonym, plain)


def _article(word: str) -> str:
    """'a' or 'an' for the words the captions use ('an orange', 'an 8', 'a one')."""
    first = word.split()[0].lower()
    return "an" if first[0] in "aeio8" and first != "one" else "a"


def make_caption(attrs: Attributes, i: int, class_name: str, vocabulary: Vocabulary) -> str:
    """The caption of image ``i``: a synonym of its class and the attributes it was drawn with."""
    names = vocabulary.synonyms.get(class_name) or [class_name]
    if attrs.plain[i]:
        plain = vocabulary.templates[attrs.template[i] % len(vocabulary.templates)]
        return plain.format(names[attrs.synonym[i] % len(names)])
    stroke, bg = PAIRS[attrs.pair[i]]
    size = SIZE_NAMES[attrs.size[i]]
    template = CAPTION_TEMPLATES[attrs.template[i]]
    return template.format(
        a=_article(size if "{a} {size}" in template else stroke),
        size=size,
        color=stroke,
        name=names[attrs.synonym[i] % len(names)],
        bg=bg,
        where=WHERE[POSITIONS[attrs.position[i]]],
    )
