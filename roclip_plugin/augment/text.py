"""Text augmentation: EDA (Wei and Zou, 2019) and the removal of tokenizer special strings.

EDA applies one of four operations to a caption: synonym replacement (SR), random insertion
(RI) of a synonym of a caption word, random swap (RS) of two words, random deletion (RD). As in
RoCLIP's training, one operation is chosen at random per caption, with ``n = max(1, int(alpha *
words))`` words changed by SR, RI and RS and each word deleted with probability ``p`` by RD.

Deliberate differences from the reference EDA code:

- Captions are not lower-cased and characters outside a-z are not stripped: a word keeps its
  punctuation (``"dog,"`` becomes ``"hound,"``), its capitalisation is carried over to its
  synonym, and non-English text is left as it is apart from the operated words.
- Stop words are skipped by random insertion too (the reference skips them only in synonym
  replacement, which inserts ``indium`` for ``in`` and ``angstrom`` for ``a``).
- Random swap always swaps two different positions; insertion may also append at the end.
- Every random choice draws from the ``random.Random`` it is given, and every candidate list is
  in a deterministic order, so the result depends only on that generator's seed.
"""

from __future__ import annotations

import random
import re
import unicodedata
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

from roclip_plugin.augment.synonyms import SynonymSource, resolve_source

OPERATIONS = ("sr", "ri", "rs", "rd")
SYNONYM_OPERATIONS = ("sr", "ri")
SPECIAL_TOKENS = ("<start_of_text>", "<end_of_text>", "<|startoftext|>", "<|endoftext|>")
MAX_INSERT_TRIES = 10  # as EDA: words tried before giving up one insertion

# Common English function words: never replaced, never the source of an insertion.
STOP_WORDS = frozenset(
    """
    a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into is
    it its itself just me more most my myself no nor not now of off on once only or other our
    ours ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we
    were what when where which while who whom why will with would you your yours yourself
    yourselves
    """.split()
)

# -- special strings ------------------------------------------------------------------------

# Characters OpenCLIP's tokenizer (through ftfy) deletes before matching special tokens.
_IGNORED = frozenset(
    [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF]
    + list(range(0xFFF9, 0xFFFD))
)
# HTML character references for < and >, nested any number of times (&amp;lt;), since the
# tokenizer unescapes HTML (ftfy, then html.unescape twice).
_ENTITY = re.compile(r"&(?:amp;)*(?:(lt|#0*60|#x0*3c)|(gt|#0*62|#x0*3e));?", re.IGNORECASE)
_TOKENS_FOLDED = tuple(t.casefold() for t in SPECIAL_TOKENS)


def _shadow(text: str) -> tuple[str, list[tuple[int, int]]]:
    """What a tokenizer matches against, with each character's span in ``text``.

    Compatibility forms (fullwidth ``＜``, ligatures ``ﬆ``) are normalised (NFKC), case is
    folded, ignored control characters vanish and HTML references become ``<``/``>``.
    """
    chars: list[str] = []
    spans: list[tuple[int, int]] = []
    position = 0
    for entity in [*_ENTITY.finditer(text), None]:
        end = entity.start() if entity else len(text)
        for offset in range(position, end):
            c = text[offset]
            if ord(c) in _IGNORED:
                continue
            for n in unicodedata.normalize("NFKC", c).casefold():
                chars.append(n)
                spans.append((offset, offset + 1))
        if entity is not None:
            chars.append("<" if entity.group(1) else ">")
            spans.append(entity.span())
            position = entity.end()
    return "".join(chars), spans


def _may_hold_token(text: str) -> bool:
    """Cheap test that rules out most captions (no ``<`` or ``&`` even after NFKC)."""
    if "<" in text or "&" in text:
        return True
    if text.isascii():
        return False
    folded = unicodedata.normalize("NFKC", text)
    return "<" in folded or "&" in folded


def strip_special_tokens(text: str) -> str:
    """Remove tokenizer special strings (``<end_of_text>`` and the like) from a caption.

    OpenCLIP's tokenizer cuts a caption at a literal ``<end_of_text>``, also when written in
    another case, with fullwidth brackets, interleaved control characters or as HTML
    references. Each occurrence becomes a space and the whitespace is then normalised; a
    caption without one is returned unchanged (same object).
    """
    if not _may_hold_token(text):
        return text
    changed = False
    while True:
        shadow, spans = _shadow(text)
        cuts = []
        for token in _TOKENS_FOLDED:
            start = shadow.find(token)
            while start >= 0:
                cuts.append((spans[start][0], spans[start + len(token) - 1][1]))
                start = shadow.find(token, start + 1)
        if not cuts:
            break
        changed = True
        for begin, end in sorted(cuts, reverse=True):
            text = text[:begin] + " " + text[end:]
    return " ".join(text.split()) if changed else text


# -- word helpers -----------------------------------------------------------------------------


def split_affixes(word: str) -> tuple[str, str, str]:
    """Split a word into punctuation, core and punctuation: ``"(dog),"`` -> ``"(", "dog", "),"``.

    The core runs from the first to the last alphanumeric character.
    """
    start = 0
    while start < len(word) and not word[start].isalnum():
        start += 1
    end = len(word)
    while end > start and not word[end - 1].isalnum():
        end -= 1
    return word[:start], word[start:end], word[end:]


def match_case(model: str, synonym: str) -> str:
    """Carry ``model``'s capitalisation to a lower-case ``synonym`` (``Dog`` -> ``Hound``)."""
    if synonym != synonym.lower():
        return synonym  # a proper noun keeps its own case
    if len(model) > 1 and model.isupper():
        return synonym.upper()
    if model[:1].isupper():
        return synonym[:1].upper() + synonym[1:]
    return synonym


def _lookup_key(word: str) -> str:
    return split_affixes(word)[1].lower()


# -- the four operations --------------------------------------------------------------------


class Lookup:
    """Synonyms of caption words (``None`` source: no synonyms)."""

    def __init__(self, source: SynonymSource | None) -> None:
        self.source = source

    def __call__(self, key: str) -> tuple[str, ...]:
        """Synonyms of a lower-case core word, none for stop words and non-words."""
        if self.source is None or not key or key in STOP_WORDS:
            return ()
        return self.source.synonyms(key)


def synonym_replacement(
    words: Sequence[str], n: int, rng: random.Random, lookup: Lookup
) -> list[str]:
    """Replace up to ``n`` distinct words (every occurrence of each) by one of their synonyms."""
    out = list(words)
    candidates = list(dict.fromkeys(k for k in map(_lookup_key, words) if k))
    rng.shuffle(candidates)
    replaced = 0
    for key in candidates:
        synonyms = lookup(key)
        if not synonyms:
            continue
        synonym = rng.choice(synonyms)
        for position, word in enumerate(out):
            prefix, core, suffix = split_affixes(word)
            if core.lower() == key:
                out[position] = prefix + match_case(core, synonym) + suffix
        replaced += 1
        if replaced >= n:
            break
    return out


def random_insertion(words: Sequence[str], n: int, rng: random.Random, lookup: Lookup) -> list[str]:
    """Insert, ``n`` times, a synonym of a random word at a random position."""
    out = list(words)
    for _ in range(n):
        for _ in range(MAX_INSERT_TRIES):
            synonyms = lookup(_lookup_key(rng.choice(out)))
            if synonyms:
                out.insert(rng.randint(0, len(out)), rng.choice(synonyms))
                break
    return out


def random_swap(words: Sequence[str], n: int, rng: random.Random) -> list[str]:
    """Swap two different random positions, ``n`` times."""
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(n):
        i = rng.randrange(len(out))
        j = rng.randrange(len(out) - 1)
        j += j >= i
        out[i], out[j] = out[j], out[i]
    return out


def random_deletion(words: Sequence[str], p: float, rng: random.Random) -> list[str]:
    """Delete each word with probability ``p``; keep one random word if all would go."""
    if len(words) <= 1:
        return list(words)
    kept = [w for w in words if rng.random() >= p]
    return kept or [rng.choice(list(words))]


# -- EDA --------------------------------------------------------------------------------------

_warned_no_synonyms = False


def _warn_no_synonyms() -> None:
    global _warned_no_synonyms
    if not _warned_no_synonyms:
        _warned_no_synonyms = True
        warnings.warn(
            "roclip EDA: no WordNet synonym source found (NLTK's wordnet corpus, WordNet's "
            "database files such as Debian's wordnet-base in /usr/share/wordnet, or the table "
            "shipped in roclip_plugin/augment/data); synonym replacement and random insertion "
            "are disabled, random swap and random deletion still run",
            RuntimeWarning,
            stacklevel=3,
        )


@dataclass(frozen=True)
class Eda:
    """One EDA operation per caption, chosen at random among those that can run.

    Args:
        alpha: fraction of words changed by SR, RI and RS (``n = max(1, int(alpha * words))``).
        p: per-word deletion probability of RD.
        synonyms: the WordNet source; None disables SR and RI.
        operations: the operations to choose from.
    """

    alpha: float = 0.1
    p: float = 0.1
    synonyms: SynonymSource | None = None
    operations: tuple[str, ...] = OPERATIONS
    _lookup: Lookup = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        unknown = set(self.operations) - set(OPERATIONS)
        if unknown or not self.operations:
            raise ValueError(f"EDA operations must be among {OPERATIONS}, got {self.operations}")
        object.__setattr__(self, "_lookup", Lookup(self.synonyms))

    @property
    def active_operations(self) -> tuple[str, ...]:
        """The operations that can run (SR and RI need a synonym source)."""
        if self.synonyms is not None:
            return self.operations
        return tuple(op for op in self.operations if op not in SYNONYM_OPERATIONS) or ("rd",)

    def apply(self, words: Sequence[str], operation: str, rng: random.Random) -> list[str]:
        """Apply one named operation to a list of words."""
        n = max(1, int(self.alpha * len(words)))
        if operation == "sr":
            return synonym_replacement(words, n, rng, self._lookup)
        if operation == "ri":
            return random_insertion(words, n, rng, self._lookup)
        if operation == "rs":
            return random_swap(words, n, rng)
        if operation == "rd":
            return random_deletion(words, self.p, rng)
        raise ValueError(f"unknown EDA operation {operation!r}")

    def __call__(self, caption: str, rng: random.Random) -> str:
        """Augment one caption; words are whitespace-separated, joined back by one space."""
        words = caption.split()
        if not words:
            return caption
        operation = rng.choice(self.active_operations)
        return " ".join(self.apply(words, operation, rng))


def eda_factory(config: object) -> Eda:
    """The ``eda`` text augmentation for a :class:`~roclip_plugin.config.RoClipConfig`."""
    choice = getattr(config, "eda_synonyms", "auto")
    source = resolve_source(choice)
    if source is None and choice == "auto":
        _warn_no_synonyms()
    return Eda(
        alpha=getattr(config, "eda_alpha", 0.1),
        p=getattr(config, "eda_p", 0.1),
        synonyms=source,
    )
