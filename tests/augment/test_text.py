"""EDA and special-string removal: property tests on arbitrary unicode captions."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from roclip_plugin.augment import AugmentationPolicy
from roclip_plugin.augment.text import (
    OPERATIONS,
    SPECIAL_TOKENS,
    STOP_WORDS,
    Eda,
    Lookup,
    eda_factory,
    match_case,
    random_deletion,
    random_insertion,
    random_swap,
    split_affixes,
    strip_special_tokens,
    synonym_replacement,
)
from roclip_plugin.config import RoClipConfig

SYNONYMS = {
    "dog": ("hound", "domestic dog"),
    "cat": ("feline",),
    "red": ("crimson", "ruby"),
    "photo": ("photograph", "picture"),
    "car": ("auto", "automobile"),
    "sits": ("perches",),
}
VOCAB = [*SYNONYMS, "a", "the", "on", "of", "Dog", "CAT", "Red,", "(photo)", "ünïcödé", "猫", "🙂"]


class FakeSource:
    """A synonym source for tests: a fixed table, single-word synonyms unless asked."""

    def __init__(self, table: dict[str, tuple[str, ...]], multi_word: bool = False) -> None:
        self.table = {
            k: tuple(v for v in vs if multi_word or " " not in v) for k, vs in table.items()
        }

    def synonyms(self, word: str) -> tuple[str, ...]:
        return self.table.get(word.lower(), ())


SINGLE = FakeSource(SYNONYMS)
LOOKUP = Lookup(SINGLE)  # type: ignore[arg-type]

words_st = st.lists(
    st.sampled_from(VOCAB) | st.text(min_size=1, max_size=8).filter(lambda w: not w.split() == []),
    min_size=1,
    max_size=30,
).map(lambda ws: [p for w in ws for p in w.split()] or ["x"])
captions = st.text(max_size=80) | words_st.map(" ".join)
seeds = st.integers(0, 2**63 - 1)


def _contains_special(text: str) -> bool:
    return any(t.casefold() in text.casefold() for t in SPECIAL_TOKENS)


# -- special strings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "caption",
    [
        "a dog <end_of_text> on a couch",
        "a dog<END_OF_TEXT>on a couch",
        "<start_of_text>a dog on a couch",
        "a dog &lt;end_of_text&gt; on a couch",
        "a dog &amp;lt;end_of_text&amp;gt; on a couch",
        "a dog &#60;end_of_text&#x3E; on a couch",
        "a dog ＜end_of_text＞ on a couch",
        "a dog <end\x07_of_text> on a couch",
        "a dog <ﬆart_of_text> on a couch",
        "a dog <|endoftext|> on a couch",
        "a dog <end_of<end_of_text>_text> on a couch",
    ],
)
def test_special_strings_are_removed(caption: str) -> None:
    cleaned = strip_special_tokens(caption)
    assert cleaned.startswith("a dog")
    assert cleaned.endswith("on a couch")
    assert not _contains_special(cleaned)
    assert "end_of" not in cleaned.replace("<end_of _text>", "")


def test_captions_without_special_strings_are_untouched() -> None:
    for caption in ["Ein Hund  auf dem Sofa\t", "a < b & c > d", "猫が  いる", "<b>bold</b>"]:
        assert strip_special_tokens(caption) is caption


@given(st.text(max_size=40), st.text(max_size=40), st.sampled_from(SPECIAL_TOKENS))
@settings(max_examples=200, deadline=None)
def test_stripping_removes_every_injected_token(left: str, right: str, token: str) -> None:
    cleaned = strip_special_tokens(left + token + right)
    assert not _contains_special(cleaned)
    assert strip_special_tokens(cleaned) == cleaned  # idempotent


@pytest.fixture(scope="module")
def openclip_tokenizer():
    open_clip = pytest.importorskip("open_clip")
    return open_clip.get_tokenizer("RN50")


def _variant(token: str, data: st.DataObject) -> str:
    out = []
    for c in token:
        choice = data.draw(st.sampled_from(["same", "upper", "wide", "ctl"]))
        if choice == "upper":
            c = c.upper()
        elif choice == "wide" and "!" <= c <= "~":
            c = chr(ord(c) + 0xFEE0)
        elif choice == "ctl":
            c = c + data.draw(st.sampled_from(["\x00", "\x07", "\x1b", "\ufeff", "\u206a"]))
        out.append(c)
    text = "".join(out)
    if data.draw(st.booleans()):
        text = text.replace("<", "&lt;").replace(">", "&gt;")
    return text


@given(st.data())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_openclip_tokenizer_sees_no_special_token_after_stripping(openclip_tokenizer, data) -> None:
    token = data.draw(st.sampled_from(SPECIAL_TOKENS[:2]))
    left = data.draw(st.text(max_size=15))
    right = data.draw(st.text(max_size=15))
    raw = left + " " + _variant(token, data) + " tail words here"
    raw += right
    ids = openclip_tokenizer([strip_special_tokens(raw)])[0].tolist()
    sot, eot = openclip_tokenizer.sot_token_id, openclip_tokenizer.eot_token_id
    body = ids[1 : ids.index(eot)] if eot in ids else ids[1:]
    assert sot not in body
    assert ids.count(eot) <= 1


def test_openclip_truncates_without_stripping(openclip_tokenizer) -> None:
    # the reason for stripping: the literal token ends the caption early
    raw = "a photo of a <end_of_text> dog"
    eot = openclip_tokenizer.eot_token_id
    assert openclip_tokenizer([raw])[0].tolist().count(eot) == 2
    assert openclip_tokenizer([strip_special_tokens(raw)])[0].tolist().count(eot) == 1


# -- word helpers -------------------------------------------------------------------------------


def test_split_affixes_and_case() -> None:
    assert split_affixes("(dog),") == ("(", "dog", "),")
    assert split_affixes("...") == ("...", "", "")
    assert split_affixes("don't") == ("", "don't", "")
    assert match_case("Dog", "hound") == "Hound"
    assert match_case("DOG", "hound") == "HOUND"
    assert match_case("dog", "Canis familiaris") == "Canis familiaris"
    assert match_case("I", "one") == "One"


# -- the four operations ------------------------------------------------------------------------


@given(words_st, seeds)
@settings(max_examples=150, deadline=None)
def test_random_swap_permutes(words: list[str], seed: int) -> None:
    n = max(1, int(0.1 * len(words)))
    out = random_swap(words, n, random.Random(seed))
    assert Counter(out) == Counter(words)
    if len(words) >= 2 and len(set(words)) == len(words):
        assert out != words  # a swap of two different positions always changes the order


@given(words_st, seeds, st.floats(0.0, 1.0))
@settings(max_examples=150, deadline=None)
def test_random_deletion_keeps_an_ordered_nonempty_subsequence(
    words: list[str], seed: int, p: float
) -> None:
    out = random_deletion(words, p, random.Random(seed))
    assert 1 <= len(out) <= len(words)
    remaining = iter(words)
    assert all(any(w == r for r in remaining) for w in out)  # subsequence, order kept
    if len(words) == 1:
        assert out == words


def test_random_deletion_rate() -> None:
    rng = random.Random(0)
    words = [f"w{i}" for i in range(50)]
    deleted = [50 - len(random_deletion(words, 0.1, rng)) for _ in range(2000)]
    assert abs(sum(deleted) / (50 * 2000) - 0.1) < 0.01


@given(words_st, seeds)
@settings(max_examples=150, deadline=None)
def test_synonym_replacement_bounds(words: list[str], seed: int) -> None:
    n = max(1, int(0.1 * len(words)))
    out = synonym_replacement(words, n, random.Random(seed), LOOKUP)
    assert len(out) == len(words)  # single-word synonyms: count unchanged
    changed_keys = set()
    for before, after in zip(words, out, strict=True):
        if before != after:
            prefix, core, suffix = split_affixes(before)
            assert after.startswith(prefix) and after.endswith(suffix)
            key = core.lower()
            assert key in SYNONYMS and key not in STOP_WORDS
            assert split_affixes(after)[1].lower() in SYNONYMS[key]
            changed_keys.add(key)
    assert len(changed_keys) <= n
    if any(split_affixes(w)[1].lower() in SYNONYMS for w in words):
        assert changed_keys  # a word with synonyms is always found


@given(words_st, seeds)
@settings(max_examples=150, deadline=None)
def test_random_insertion_bounds(words: list[str], seed: int) -> None:
    n = max(1, int(0.1 * len(words)))
    out = random_insertion(words, n, random.Random(seed), LOOKUP)
    assert len(words) <= len(out) <= len(words) + n
    remaining = iter(out)
    assert all(any(w == r for r in remaining) for w in words)  # originals kept, in order
    inserted = Counter(out) - Counter(words)
    all_synonyms = {s for v in SYNONYMS.values() for s in v}
    assert set(inserted) <= all_synonyms


def test_multi_word_synonyms_grow_the_caption() -> None:
    lookup = Lookup(FakeSource({"dog": ("domestic dog",)}, multi_word=True))  # type: ignore[arg-type]
    out = synonym_replacement(["the", "Dog,", "barks"], 1, random.Random(0), lookup)
    assert out == ["the", "Domestic dog,", "barks"]
    assert len(" ".join(out).split()) == 4


def test_stop_words_are_neither_replaced_nor_sources() -> None:
    lookup = Lookup(FakeSource({"the": ("thee",), "in": ("inch",)}))  # type: ignore[arg-type]
    words = ["the", "cat", "in", "the", "hat"]
    for seed in range(50):
        assert synonym_replacement(words, 3, random.Random(seed), lookup) == words
        assert random_insertion(words, 3, random.Random(seed), lookup) == words


# -- EDA ----------------------------------------------------------------------------------------


class RecordingEda(Eda):
    def apply(self, words, operation, rng):  # type: ignore[override]
        self.seen.append(operation)  # type: ignore[attr-defined]
        return super().apply(words, operation, rng)


def test_one_operation_per_caption_uniformly() -> None:
    eda = RecordingEda(synonyms=SINGLE)  # type: ignore[arg-type]
    object.__setattr__(eda, "seen", [])
    for seed in range(4000):
        eda("a red dog sits on the photo of a car", random.Random(seed))
    counts = Counter(eda.seen)  # type: ignore[attr-defined]
    assert sum(counts.values()) == 4000
    for op in OPERATIONS:
        assert abs(counts[op] / 4000 - 0.25) < 0.03


def test_without_synonyms_only_swap_and_deletion_run() -> None:
    eda = RecordingEda(synonyms=None)
    object.__setattr__(eda, "seen", [])
    words = "a red dog sits on the photo of a car".split()
    for seed in range(400):
        out = eda(" ".join(words), random.Random(seed)).split()
        assert Counter(out) == Counter(words) or len(out) < len(words)
    assert set(eda.seen) == {"rs", "rd"}  # type: ignore[attr-defined]


def test_eda_n_follows_alpha() -> None:
    words = [f"w{i}" for i in range(40)]
    out = Eda(alpha=0.25, operations=("rs",)).apply(words, "rs", random.Random(1))
    assert 2 <= sum(a != b for a, b in zip(words, out, strict=True)) <= 2 * 10


def test_eda_factory_reads_config() -> None:
    eda = eda_factory(RoClipConfig(eda_alpha=0.3, eda_p=0.2, eda_synonyms="off"))
    assert (eda.alpha, eda.p, eda.synonyms) == (0.3, 0.2, None)


def test_eda_keeps_case_and_unicode() -> None:
    eda = Eda(synonyms=SINGLE, operations=("sr",))  # type: ignore[arg-type]
    out = eda("Ein Dog auf dem Sofa, très jolie 🙂", random.Random(0))
    assert out == "Ein Hound auf dem Sofa, très jolie 🙂"


# -- through the policy -------------------------------------------------------------------------


def _policy(refresh: str = "epoch", seed: int = 0) -> AugmentationPolicy:
    return AugmentationPolicy(text=Eda(synonyms=SINGLE), seed=seed, text_refresh=refresh)  # type: ignore[arg-type]


POLICY = _policy()
POLICY_RUN = _policy("run")


@given(captions, st.integers(0, 1000), st.integers(0, 2**40))
@settings(max_examples=300, deadline=None)
def test_policy_text_never_empty_never_special(caption: str, epoch: int, index: int) -> None:
    for token in SPECIAL_TOKENS[:2]:
        raw = caption + token if index % 2 else token + caption
        out = POLICY.text(raw, epoch=epoch, index=index)
        assert not _contains_special(out)
        if strip_special_tokens(raw).split():
            assert out.strip()
        else:
            assert out == strip_special_tokens(raw)


@given(words_st.map(" ".join), st.integers(0, 1000), st.integers(0, 2**40))
@settings(max_examples=200, deadline=None)
def test_policy_word_count_bounds(caption: str, epoch: int, index: int) -> None:
    assume(not _contains_special(caption))
    words = caption.split()
    n = max(1, int(0.1 * len(words)))
    out = POLICY.text(caption, epoch=epoch, index=index).split()
    assert 1 <= len(out) <= len(words) + n
    # unless an operation touched them, words are byte-identical (no lower-casing, no stripping)
    assert len({split_affixes(w)[1].lower() for w in set(out) - set(words)}) <= n


@given(captions, st.integers(0, 2**63 - 1), st.integers(0, 1000), st.integers(0, 2**40))
@settings(max_examples=200, deadline=None)
def test_policy_text_is_a_function_of_seed_epoch_index(
    caption: str, seed: int, epoch: int, index: int
) -> None:
    a = _policy(seed=seed).text(caption, epoch=epoch, index=index)
    b = _policy(seed=seed).text(caption, epoch=epoch, index=index)
    assert a == b


def test_fresh_per_epoch_or_fixed_per_run() -> None:
    caption = "a red dog sits on the photo of a car near the cat"
    fresh = [POLICY.text(caption, epoch=e, index=7) for e in range(12)]
    fixed = [POLICY_RUN.text(caption, epoch=e, index=7) for e in range(12)]
    assert len(set(fresh)) > 3
    assert len(set(fixed)) == 1
    across_indices = {POLICY.text(caption, epoch=0, index=i) for i in range(30)}
    assert len(across_indices) > 5


def test_policy_epoch_default_is_the_shared_epoch() -> None:
    policy = _policy()
    caption = "a red dog sits on the photo of a car near the cat"
    policy.set_epoch(3)
    assert policy.text(caption, index=5) == policy.text(caption, epoch=3, index=5)


def test_plugin_output_is_cleaned_and_never_empty() -> None:
    policy = AugmentationPolicy(text=lambda caption: "", seed=0)
    assert policy.text("a dog", index=0) == "a dog"
    policy = AugmentationPolicy(text=lambda caption: caption + " <end_of_text> x", seed=0)
    assert policy.text("a dog", index=0) == "a dog x"
    policy = AugmentationPolicy(text=lambda caption: 3, seed=0, text_name="bad")
    with pytest.raises(TypeError, match="'bad' returned int"):
        policy.text("a dog", index=0)


def test_none_text_augmentation_still_strips() -> None:
    policy = AugmentationPolicy(seed=0)
    assert policy.text("a <end_of_text> dog", index=0) == "a dog"
    assert policy.text("a  dog", index=0) == "a  dog"


def test_counter_fallback_differs_per_call() -> None:
    policy = _policy()
    caption = "a red dog sits on the photo of a car near the cat"
    outs = {policy.text(caption) for _ in range(20)}
    assert len(outs) > 3


def test_caption_words_split_on_any_whitespace() -> None:
    out = POLICY.text("a\tred\ndog  sits", epoch=0, index=0)
    assert re.fullmatch(r"\S+( \S+)*", out)
