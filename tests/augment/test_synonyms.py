"""WordNet synonym sources: the database parser, the shipped table, NLTK, and resolution."""

from __future__ import annotations

import gzip
import importlib.util
import json
import pickle
import random
import shutil
import warnings
from pathlib import Path

import pytest

from roclip_plugin.augment import synonyms
from roclip_plugin.augment import text as augment_text
from roclip_plugin.augment.synonyms import (
    Lexicon,
    NltkLexicon,
    SynonymSource,
    clean_synonyms,
    find_wordnet_dir,
    read_table,
    read_wordnet_dir,
    resolve_source,
    table_path,
)
from roclip_plugin.config import RoClipConfig

ROOT = Path(__file__).resolve().parents[2]
HEADER = "".join(f"  {i} licence header line {i}  \n" for i in range(1, 30))
TINY = {
    "data.noun": [
        "00001740 03 n 02 dog 0 domestic_dog 0 000 | a domesticated canid  ",
        "00002000 05 n 02 dog 0 hound 0 001 @ 00001740 n 0000 | a hunting dog  ",
        "00003000 05 n 01 mouse 0 000 | a rodent  ",
        "00003100 06 n 02 mouse 0 computer_mouse 0 000 | a pointing device  ",
        "00004000 18 n 02 child 0 kid 0 000 | a young person  ",
        "00004100 18 n 02 Mass 0 mass 0 000 | a case variant pair  ",
    ],
    "data.verb": ["00005000 38 v 02 run 0 sprint 0 000 | move fast  "],
    "data.adj": [
        "00006000 00 s 02 abounding 0 galore(ip) 0 000 | in abundance  ",
        "00006100 00 a 02 big 0 large 0 000 | of great size  ",
    ],
    "data.adv": ["00007000 02 r 02 quickly 0 rapidly 0 000 | with speed  "],
    "noun.exc": ["mice mouse", "children child"],
    "verb.exc": ["ran run", "running run"],
    "adj.exc": ["bigger big"],
    "adv.exc": [],
    "cntlist.rev": [
        "dog%1:05:00:: 1 20",
        "hound%1:05:00:: 1 3",
        "domestic_dog%1:05:00:: 1 2",
        "kid%1:18:00:: 1 5",
        "child%1:18:00:: 1 7",
        "run%2:38:00:: 1 9",
        "sprint%2:38:00:: 1 1",
        "big%3:00:00:: 1 4",
        "large%3:00:00:: 1 3",
        "mouse%1:05:00:: 1 2",
    ],
}


@pytest.fixture
def tiny_wordnet(tmp_path: Path) -> Path:
    root = tmp_path / "wordnet"
    root.mkdir()
    for name, lines in TINY.items():
        header = HEADER if name.startswith("data.") else ""
        (root / name).write_text(header + "".join(line + "\n" for line in lines))
    return root


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "build_synonym_table", ROOT / "scripts" / "build_synonym_table.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- the rule ---------------------------------------------------------------------------------


def test_clean_synonyms_sorts_dedupes_and_drops_the_word() -> None:
    names = ["hound", "Dog", "domestic_dog", "Hound", "Mass", "mass", "Canis_familiaris", "dog"]
    assert clean_synonyms("dog", names) == ("Canis familiaris", "domestic dog", "hound", "mass")


def test_tiny_database_is_parsed_with_morphy(tiny_wordnet: Path) -> None:
    lexicon = read_wordnet_dir(tiny_wordnet)
    assert [len(lexicon.synsets[p]) for p in "nvar"] == [6, 1, 2, 1]  # header lines skipped
    assert lexicon.synonyms("dog") == ("domestic dog", "hound")
    assert lexicon.synonyms("DOGS") == ("dog", "domestic dog", "hound")  # suffix rule s -> ""
    assert lexicon.synonyms("mice") == ("computer mouse", "mouse")  # exception list
    assert lexicon.synonyms("running") == ("run", "sprint")  # exception, not "runn"
    assert lexicon.synonyms("bigger") == ("big", "large")  # adjective exception
    assert lexicon.synonyms("galore") == ("abounding",)  # adjective marker (ip) stripped
    assert lexicon.synonyms("quickly") == ("rapidly",)
    assert lexicon.synonyms("mass") == ()  # only itself, in two cases
    assert lexicon.synonyms("unknown") == ()
    assert lexicon.base_forms("children", "n") == ["child"]


def test_lexicon_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synonyms, "_CACHE_LIMIT", 3)
    lexicon = Lexicon({"n": [("a", "b")]})
    for word in "abcdefg":
        lexicon.synonyms(word)
    assert len(lexicon._cache) <= 3
    assert lexicon.synonyms("a") == ("b",)


# -- the shipped table ------------------------------------------------------------------------


def test_shipped_table_is_small_and_licensed() -> None:
    path = table_path()
    assert path.is_file()
    assert path.stat().st_size < 3 * 2**20
    licence = (path.parent / "WORDNET_LICENSE").read_text()
    assert "WordNet 3.0 Copyright 2006 by Princeton University" in licence
    assert "Permission to use, copy, modify and distribute" in licence
    data = json.loads(gzip.decompress(path.read_bytes()))
    assert data["format"] == synonyms.TABLE_FORMAT
    lemmas = [lemma for pos in data["synsets"].values() for s in pos for lemma in s]
    assert len(lemmas) > 10_000
    assert all(" " not in lemma and "_" not in lemma for lemma in lemmas)  # single words


def test_shipped_table_answers_common_words() -> None:
    table = read_table()
    assert "hound" in table.synonyms("dog")
    assert "photograph" in table.synonyms("photos")
    assert "child" in table.synonyms("children")
    assert all(" " not in s for s in table.synonyms("car"))


def test_build_script_filters_and_is_deterministic(tiny_wordnet: Path, tmp_path: Path) -> None:
    script = _load_script()
    table = script.build_table(tiny_wordnet, min_count=1)
    assert table["synsets"] == {
        "n": [["child", "kid"], ["dog", "hound"]],  # multi-word, rare and lone lemmas dropped
        "v": [["run", "sprint"]],
        "a": [["big", "large"]],
        "r": [],
    }
    assert table["exceptions"] == {
        "n": {"children": ["child"]},  # mice -> mouse dropped: mouse has no table synonym
        "v": {"ran": ["run"], "running": ["run"]},
        "a": {"bigger": ["big"]},
        "r": {},
    }
    first, second = tmp_path / "a.json.gz", tmp_path / "b.json.gz"
    script.write_table(table, first)
    script.write_table(table, second)
    assert first.read_bytes() == second.read_bytes()
    lexicon = read_table(first)
    assert lexicon.synonyms("kids") == ("child", "kid")
    assert lexicon.synonyms("ran") == ("run", "sprint")
    stricter = script.build_table(tiny_wordnet, min_count=4)
    assert stricter["synsets"]["n"] == [["child", "kid"]]


# -- the real WordNet database (Debian's wordnet-base), when installed --------------------------

needs_wordnet = pytest.mark.skipif(
    find_wordnet_dir() is None, reason="no WordNet database (apt-get install wordnet-base)"
)


@pytest.fixture(scope="module")
def full_wordnet() -> Lexicon:
    directory = find_wordnet_dir()
    assert directory is not None
    return read_wordnet_dir(directory)


@needs_wordnet
def test_full_database_has_wordnet_30_counts(full_wordnet: Lexicon) -> None:
    assert [len(full_wordnet.synsets[p]) for p in "nvar"] == [82115, 13767, 18156, 3621]
    assert {"domestic dog", "Canis familiaris", "hound"} <= set(full_wordnet.synonyms("dogs"))
    assert "mouse" in full_wordnet.synonyms("mice")


@needs_wordnet
def test_shipped_table_is_rebuilt_identically(tmp_path: Path) -> None:
    directory = find_wordnet_dir()
    assert directory is not None and (directory / "cntlist.rev").is_file()
    script = _load_script()
    out = tmp_path / "table.json.gz"
    script.write_table(script.build_table(directory, min_count=1), out)
    assert out.read_bytes() == table_path().read_bytes()


@needs_wordnet
def test_table_is_a_subset_of_wordnet(full_wordnet: Lexicon) -> None:
    table = read_table()
    words = sorted({lemma.lower() for pos in table.index.values() for lemma in pos})
    words += [w + suffix for w in words for suffix in ("s", "es", "ed", "ing", "er", "est")]
    for word in random.Random(0).sample(words, 3000):
        # case-folded: "Bible" in the table may be "bible" in full WordNet (a lower-case lemma
        # of another synset wins the case-insensitive de-duplication)
        folded = {s.lower() for s in full_wordnet.synonyms(word)}
        assert {s.lower() for s in table.synonyms(word)} <= folded, word


LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute "
    "noun.body noun.cognition noun.communication noun.event noun.feeling noun.food noun.group "
    "noun.location noun.motive noun.object noun.person noun.phenomenon noun.plant "
    "noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication "
    "verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()


@needs_wordnet
def test_parser_agrees_with_nltk(
    full_wordnet: Lexicon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nltk = pytest.importorskip("nltk")
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class Reader(WordNetCorpusReader):
        def map_wn(self, version: str = "wordnet") -> None:  # no OMW mapping needed
            return None

    # NLTK reads this layout only with a lexnames file and inside one of its data roots
    root = tmp_path / "wordnet"
    root.mkdir()
    source = find_wordnet_dir()
    assert source is not None
    for pattern in ("data.*", "index.*", "*.exc"):
        for file in source.glob(pattern):
            shutil.copyfile(file, root / file.name)
    kinds = {"adj": 3, "adv": 4, "noun": 1, "verb": 2}
    lines = [f"{i:02d}\t{n}\t{kinds[n.split('.')[0]]}\n" for i, n in enumerate(LEXNAMES)]
    (root / "lexnames").write_text("".join(lines))
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path), *nltk.data.path])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lexicon = NltkLexicon(Reader(str(root), None))
    words = sorted({lemma for pos in full_wordnet.index.values() for lemma in pos})
    sample = random.Random(0).sample(words, 1500)
    sample += ["dogs", "mice", "children", "running", "better", "galore", "went", "geese"]
    different = [w for w in sample if lexicon.synonyms(w) != full_wordnet.synonyms(w)]
    assert not different


# -- resolution -------------------------------------------------------------------------------


def test_resolve_named_sources(tiny_wordnet: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_source("off") is None
    table = resolve_source("table")
    assert table is not None and table.kind == "table"
    monkeypatch.setenv(synonyms.WORDNET_ENV, str(tiny_wordnet))
    source = resolve_source("wordnet")
    assert source is not None and (source.kind, source.path) == ("wordnet", str(tiny_wordnet))
    assert source.synonyms("kids") == ("child", "kid")


def test_auto_prefers_nltk_then_wordnet_then_table(
    tiny_wordnet: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(synonyms, "nltk_wordnet_available", lambda: True)
    assert resolve_source("auto").kind == "nltk"  # type: ignore[union-attr]
    monkeypatch.setattr(synonyms, "nltk_wordnet_available", lambda: False)
    monkeypatch.setattr(synonyms, "find_wordnet_dir", lambda: tiny_wordnet)
    assert resolve_source("auto").kind == "wordnet"  # type: ignore[union-attr]
    monkeypatch.setattr(synonyms, "find_wordnet_dir", lambda: None)
    assert resolve_source("auto").kind == "table"  # type: ignore[union-attr]


def test_missing_named_source_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(synonyms, "nltk_wordnet_available", lambda: False)
    with pytest.raises(ValueError, match=r"--roclip-eda-synonyms.*'nltk' is not available"):
        resolve_source("nltk")
    monkeypatch.setattr(synonyms, "find_wordnet_dir", lambda: None)
    with pytest.raises(ValueError, match="apt-get install wordnet-base"):
        resolve_source("wordnet")
    with pytest.raises(ValueError, match="allowed: auto, nltk, wordnet, table, off"):
        resolve_source("wordnet30")


def test_no_source_warns_once_and_disables_synonym_operations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(synonyms, "nltk_wordnet_available", lambda: False)
    monkeypatch.setattr(synonyms, "find_wordnet_dir", lambda: None)
    monkeypatch.setattr(synonyms, "table_path", lambda: tmp_path / "missing.json.gz")
    monkeypatch.setattr(augment_text, "_warned_no_synonyms", False)
    with pytest.warns(RuntimeWarning, match="no WordNet synonym source") as record:
        eda = augment_text.eda_factory(RoClipConfig())
        augment_text.eda_factory(RoClipConfig())
    assert len(record) == 1
    assert eda.synonyms is None
    assert eda.active_operations == ("rs", "rd")
    out = eda("a dog on a red couch", random.Random(0))
    assert sorted(out.split()) == sorted("a dog on a red couch".split()) or len(out.split()) < 6


def test_off_does_not_warn(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(augment_text, "_warned_no_synonyms", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert augment_text.eda_factory(RoClipConfig(eda_synonyms="off")).synonyms is None


def test_source_pickles_without_its_data(tiny_wordnet: Path) -> None:
    source = SynonymSource("wordnet", str(tiny_wordnet))
    assert source.synonyms("dog") == ("domestic dog", "hound")
    assert source._lexicon is not None
    copy = pickle.loads(pickle.dumps(source))
    assert copy._lexicon is None
    assert len(pickle.dumps(source)) < 300
    assert copy.synonyms("dog") == ("domestic dog", "hound")
    with pytest.raises(ValueError, match="allowed: nltk, wordnet, table"):
        SynonymSource("wordnet30")
