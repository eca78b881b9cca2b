"""WordNet 3.0 synonyms for EDA, from whatever source is on the machine, never downloaded.

EDA's synonym replacement and random insertion need WordNet. Nothing here downloads anything at
run time (no ``nltk.download``); the sources, in the order ``auto`` tries them, are:

1. ``nltk``: NLTK's WordNet reader, when ``nltk`` imports and its ``wordnet`` corpus is already
   installed.
2. ``wordnet``: WordNet's own database files (``data.noun``, ``data.verb``, ``data.adj``,
   ``data.adv`` and the ``*.exc`` exception lists), as Debian's ``wordnet-base`` package
   installs them in ``/usr/share/wordnet``. NLTK cannot read that layout (it lacks the
   ``lexnames`` file), so :func:`read_wordnet_dir` parses it.
3. ``table``: a reduced WordNet shipped in ``roclip_plugin/augment/data`` (common single-word
   lemmas only), built by ``scripts/build_synonym_table.py``; WordNet's licence is next to it.

The three give the same answer for a word the table covers (``tests/augment/test_synonyms.py``
checks the first two against each other). A word's synonyms are, as in EDA, the lemmas of every
synset of every base form of the word (WordNet's ``morphy``: exception lists, then suffix rules),
minus the word itself; underscores become spaces; case is kept (EDA lower-cases, we do not).
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

SOURCES = ("auto", "nltk", "wordnet", "table", "off")
POS = ("n", "v", "a", "r")
POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
TABLE_NAME = "wordnet_synonyms.json.gz"
TABLE_FORMAT = 1
WORDNET_ENV = "ROCLIP_WORDNET_DIR"
# WordNet's own variable first, then where distributions install the database.
WORDNET_DIRS = (
    "/usr/share/wordnet",
    "/usr/local/share/wordnet",
    "/usr/local/WordNet-3.0/dict",
    "/opt/homebrew/share/wordnet",
)

# WordNet's morphological detachment rules (morphy(7WN)): suffix -> replacement, per POS.
SUFFIX_RULES: dict[str, tuple[tuple[str, str], ...]] = {
    "n": (
        ("s", ""),
        ("ses", "s"),
        ("ves", "f"),
        ("xes", "x"),
        ("zes", "z"),
        ("ches", "ch"),
        ("shes", "sh"),
        ("men", "man"),
        ("ies", "y"),
    ),
    "v": (
        ("s", ""),
        ("ies", "y"),
        ("es", "e"),
        ("es", ""),
        ("ed", "e"),
        ("ed", ""),
        ("ing", "e"),
        ("ing", ""),
    ),
    "a": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "r": (),
}
_MARKER = re.compile(r"\((?:a|p|ip)\)$")  # adjective syntactic markers: galore(ip)
_CACHE_LIMIT = 200_000


class Lexicon:
    """Synsets per part of speech with a lemma index and morphy's exception lists.

    Both the full WordNet database and the shipped table load into this one class, so that
    the synonym rule is written once.

    Args:
        synsets: per POS, each synset as its lemma names (underscores, original case).
        exceptions: per POS, inflected form -> base forms (from the ``*.exc`` files).
    """

    def __init__(
        self,
        synsets: Mapping[str, Sequence[Sequence[str]]],
        exceptions: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    ) -> None:
        self.synsets = {pos: [tuple(s) for s in synsets.get(pos, ())] for pos in POS}
        self.exceptions = {pos: dict((exceptions or {}).get(pos, {})) for pos in POS}
        self.index: dict[str, dict[str, list[int]]] = {pos: {} for pos in POS}
        for pos, entries in self.synsets.items():
            index = self.index[pos]
            for number, lemmas in enumerate(entries):
                for lemma in lemmas:
                    ids = index.setdefault(lemma.lower(), [])
                    if not ids or ids[-1] != number:
                        ids.append(number)
        self._cache: dict[str, tuple[str, ...]] = {}

    def base_forms(self, word: str, pos: str) -> list[str]:
        """WordNet's morphy: the word and its base forms that exist as ``pos`` lemmas."""
        index = self.index[pos]
        word = word.lower()
        if word in self.exceptions[pos]:
            candidates = [word, *self.exceptions[pos][word]]
        else:
            candidates = [word] + [
                word[: -len(old)] + new for old, new in SUFFIX_RULES[pos] if word.endswith(old)
            ]
        return list(dict.fromkeys(c for c in candidates if c in index))

    def synonyms(self, word: str) -> tuple[str, ...]:
        """Every lemma of every synset of every base form of ``word``, without ``word``."""
        key = word.lower()
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        names: list[str] = []
        for pos in POS:
            for form in self.base_forms(key, pos):
                for number in self.index[pos][form]:
                    names.extend(self.synsets[pos][number])
        result = clean_synonyms(key, names)
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()  # bounded: web captions have an unbounded vocabulary
        self._cache[key] = result
        return result


def clean_synonyms(word: str, names: Iterable[str]) -> tuple[str, ...]:
    """Lemma names -> sorted synonyms: spaces for underscores, the word itself removed.

    Variants that differ only in case collapse to one (the lower-case one when there is one).
    The result is sorted: a set's order depends on the process's hash seed, and DataLoader
    workers started with ``spawn`` have different seeds, so an unsorted choice would not be
    reproducible.
    """
    best: dict[str, str] = {}
    for name in names:
        text = name.replace("_", " ")
        folded = text.lower()
        if folded == word.lower():
            continue
        current = best.get(folded)
        if (
            current is None
            or (text == folded) > (current == folded)
            or ((text == folded) == (current == folded) and text < current)
        ):
            best[folded] = text
    return tuple(best[k] for k in sorted(best))


# -- WordNet database files ---------------------------------------------------------------------


def read_data_file(path: Path) -> list[tuple[str, ...]]:
    """Synsets of one ``data.*`` file, each as its lemma names.

    A data line is ``offset lex_filenum ss_type w_cnt word lex_id [word lex_id...] ...``
    with ``w_cnt`` in hexadecimal; the licence header lines start with two spaces.
    """
    synsets: list[tuple[str, ...]] = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.startswith("  "):
                continue
            _offset, _lex_file, _type, count, rest = line.split(" ", 4)
            words = rest.split(" ", 2 * int(count, 16))[: 2 * int(count, 16) : 2]
            synsets.append(tuple(_MARKER.sub("", w) for w in words))
    return synsets


def read_exceptions(path: Path) -> dict[str, list[str]]:
    """An ``*.exc`` file: ``inflected base [base...]`` per line."""
    table: dict[str, list[str]] = {}
    if not path.exists():
        return table
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            parts = line.split()
            if len(parts) >= 2:
                table.setdefault(parts[0], []).extend(parts[1:])
    return table


def read_wordnet_dir(directory: str | os.PathLike[str]) -> Lexicon:
    """Parse a WordNet 3.0 database directory (Debian ``wordnet-base`` layout)."""
    root = Path(directory)
    synsets = {pos: read_data_file(root / f"data.{name}") for pos, name in POS_FILES.items()}
    exceptions = {pos: read_exceptions(root / f"{name}.exc") for pos, name in POS_FILES.items()}
    return Lexicon(synsets, exceptions)


def is_wordnet_dir(directory: str | os.PathLike[str]) -> bool:
    """Whether ``directory`` holds the four ``data.*`` files."""
    root = Path(directory)
    return all((root / f"data.{name}").is_file() for name in POS_FILES.values())


def find_wordnet_dir() -> Path | None:
    """The first WordNet database directory found.

    Looked up in ``$ROCLIP_WORDNET_DIR``, ``$WNSEARCHDIR``, then the usual install locations.
    """
    candidates = [os.environ.get(WORDNET_ENV), os.environ.get("WNSEARCHDIR"), *WORDNET_DIRS]
    for candidate in candidates:
        if candidate and is_wordnet_dir(candidate):
            return Path(candidate)
    return None


# -- the shipped table --------------------------------------------------------------------------


def table_path() -> Path:
    """Path of the synonym table shipped with the package."""
    return Path(str(resources.files("roclip_plugin.augment") / "data" / TABLE_NAME))


def read_table(path: str | os.PathLike[str] | None = None) -> Lexicon:
    """Load the shipped (or another) gzip JSON table written by ``build_synonym_table.py``."""
    with gzip.open(path or table_path(), "rt", encoding="utf-8") as handle:
        data = json.load(handle)
    if data.get("format") != TABLE_FORMAT:
        raise ValueError(f"synonym table format {data.get('format')!r}; expected {TABLE_FORMAT}")
    return Lexicon(data["synsets"], data.get("exceptions"))


# -- NLTK ---------------------------------------------------------------------------------------


def nltk_wordnet_available() -> bool:
    """Whether ``nltk`` imports and its ``wordnet`` corpus is installed (nothing downloads)."""
    try:
        from nltk.corpus import wordnet
    except Exception:  # noqa: BLE001 - any import failure means "not available"
        return False
    try:
        wordnet.ensure_loaded()
    except Exception:  # noqa: BLE001 - LookupError when absent; a broken corpus is absent too
        return False
    return True


class NltkLexicon:
    """Synonyms through NLTK's WordNet reader, with the same cleaning as :class:`Lexicon`.

    Args:
        reader: a ``WordNetCorpusReader``; default: ``nltk.corpus.wordnet``.
    """

    def __init__(self, reader: Any = None) -> None:
        if reader is None:
            from nltk.corpus import wordnet as reader

        self._wordnet = reader
        self._cache: dict[str, tuple[str, ...]] = {}

    def synonyms(self, word: str) -> tuple[str, ...]:
        """Every lemma of every synset NLTK finds for ``word``, without ``word``."""
        key = word.lower()
        cached = self._cache.get(key)
        if cached is None:
            names = [name for s in self._wordnet.synsets(key) for name in s.lemma_names()]
            cached = clean_synonyms(key, names)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = cached
        return cached


# -- the picklable handle -------------------------------------------------------------------


class SynonymSource:
    """A resolved synonym source that loads its data lazily, once per process.

    Pickling keeps only the source's kind and path, so a DataLoader worker started with
    ``spawn`` parses the database itself on first use instead of receiving megabytes of
    dictionaries through a pipe; with ``fork`` a lexicon already loaded is inherited.

    Args:
        kind: ``nltk``, ``wordnet`` or ``table``.
        path: the database directory (``wordnet``) or table file (``table``).
    """

    def __init__(self, kind: str, path: str | None = None) -> None:
        if kind not in ("nltk", "wordnet", "table"):
            raise ValueError(f"synonym source kind {kind!r}; allowed: nltk, wordnet, table")
        self.kind = kind
        self.path = path
        self._lexicon: Any = None

    def __repr__(self) -> str:
        where = f", {self.path!r}" if self.path else ""
        return f"SynonymSource({self.kind!r}{where})"

    def __getstate__(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "_lexicon": None}

    @property
    def lexicon(self) -> Lexicon | NltkLexicon:
        """The loaded data (loaded on first access in this process)."""
        if self._lexicon is None:
            self._lexicon = _load(self.kind, self.path)
        return self._lexicon

    def synonyms(self, word: str) -> tuple[str, ...]:
        """Sorted synonyms of ``word`` (empty when WordNet has none)."""
        return self.lexicon.synonyms(word)


_LOADED: dict[tuple[str, str | None], Lexicon | NltkLexicon] = {}


def _load(kind: str, path: str | None) -> Lexicon | NltkLexicon:
    """Load once per process and source, shared by every :class:`SynonymSource`."""
    key = (kind, path)
    if key not in _LOADED:
        if kind == "nltk":
            _LOADED[key] = NltkLexicon()
        elif kind == "wordnet":
            _LOADED[key] = read_wordnet_dir(path or "")
        else:
            _LOADED[key] = read_table(path)
    return _LOADED[key]


def resolve_source(choice: str = "auto") -> SynonymSource | None:
    """The synonym source ``choice`` names; ``auto`` takes the first available one.

    Returns None for ``off``, or for ``auto`` when no source exists. A named source that is
    missing raises ``ValueError`` naming the flag, so a cluster whose nodes differ fails at
    start rather than augmenting differently per node.
    """
    if choice not in SOURCES:
        raise ValueError(
            f"eda_synonyms (--roclip-eda-synonyms): invalid value {choice!r}; allowed: "
            f"{', '.join(SOURCES)}"
        )
    if choice == "off":
        return None
    if choice in ("auto", "nltk") and nltk_wordnet_available():
        return SynonymSource("nltk")
    if choice in ("auto", "wordnet"):
        directory = find_wordnet_dir()
        if directory is not None:
            return SynonymSource("wordnet", str(directory))
    if choice in ("auto", "table") and table_path().is_file():
        return SynonymSource("table", str(table_path()))
    if choice == "auto":
        return None
    hints = {
        "nltk": "install nltk and its wordnet corpus (python -m nltk.downloader wordnet)",
        "wordnet": f"install WordNet's database (apt-get install wordnet-base) or set "
        f"{WORDNET_ENV} to its directory",
        "table": f"the package data file {TABLE_NAME} is missing: reinstall roclip-plugin",
    }
    raise ValueError(
        f"eda_synonyms (--roclip-eda-synonyms): synonym source {choice!r} is not available: "
        f"{hints[choice]}"
    )
