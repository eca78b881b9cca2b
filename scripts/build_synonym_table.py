"""Build roclip_plugin/augment/data/wordnet_synonyms.json.gz, the synonym table shipped for EDA.

The table is a reduced WordNet 3.0, used when neither NLTK's WordNet corpus nor WordNet's
database files are installed. It keeps, per part of speech, the synsets restricted to lemmas
that are

- single words (letters, optionally joined by hyphens: no multi-word lemmas), and
- plausibly common: tagged at least ``--min-count`` times in WordNet's own sense-frequency list
  ``cntlist.rev`` (counts from the SemCor corpus, shipped with WordNet),

dropping synsets left with fewer than two such lemmas (they give no synonym), plus the morphy
exception entries (``mice -> mouse``) whose base forms survive or that stop a suffix rule from
reaching a kept lemma. Lemma case is kept.

Usage (WordNet's database from Debian's ``wordnet-base``: ``apt-get install wordnet-base``)::

    python scripts/build_synonym_table.py --wordnet-dir /usr/share/wordnet

The output is deterministic (sorted, no timestamp in the gzip header), so rebuilding from the
same WordNet gives a byte-identical file. WordNet's licence must stay next to the table
(roclip_plugin/augment/data/WORDNET_LICENSE).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import io
import json
import re
from pathlib import Path

from roclip_plugin.augment.synonyms import (
    POS,
    POS_FILES,
    SUFFIX_RULES,
    TABLE_FORMAT,
    TABLE_NAME,
    read_data_file,
    read_exceptions,
)

ROOT = Path(__file__).resolve().parents[1]
SINGLE_WORD = re.compile(r"[A-Za-z]+(?:-[A-Za-z]+)*")


def lemma_counts(cntlist: Path) -> collections.Counter[str]:
    """Tag counts per lower-case lemma from ``cntlist.rev`` (``sense_key sense_number count``)."""
    counts: collections.Counter[str] = collections.Counter()
    with open(cntlist, encoding="utf-8") as handle:
        for line in handle:
            parts = line.split()
            if len(parts) == 3:
                counts[parts[0].split("%", 1)[0].lower()] += int(parts[2])
    return counts


def build_table(wordnet_dir: Path, min_count: int) -> dict[str, object]:
    """The table as a JSON-able dict."""
    counts = lemma_counts(wordnet_dir / "cntlist.rev")

    def keep(lemma: str) -> bool:
        return bool(SINGLE_WORD.fullmatch(lemma)) and counts[lemma.lower()] >= min_count

    synsets: dict[str, list[list[str]]] = {}
    exceptions: dict[str, dict[str, list[str]]] = {}
    for pos in POS:
        name = POS_FILES[pos]
        reduced = {
            tuple(dict.fromkeys(lemma for lemma in synset if keep(lemma)))
            for synset in read_data_file(wordnet_dir / f"data.{name}")
        }
        synsets[pos] = sorted(list(s) for s in reduced if len(s) >= 2)
        kept = {lemma.lower() for s in synsets[pos] for lemma in s}
        exceptions[pos] = {}
        for form, bases in sorted(read_exceptions(wordnet_dir / f"{name}.exc").items()):
            kept_bases = [b for b in bases if b in kept]
            # An entry, even emptied, stops the suffix rules, as in full WordNet: without
            # "vest -> vest" the adjective rule est -> "" would find "v" in the table.
            ruled = [
                form[: -len(old)] + new for old, new in SUFFIX_RULES[pos] if form.endswith(old)
            ]
            if SINGLE_WORD.fullmatch(form) and (kept_bases or kept.intersection(ruled)):
                exceptions[pos][form] = kept_bases
    return {
        "format": TABLE_FORMAT,
        "source": "WordNet 3.0 (Princeton University); see WORDNET_LICENSE",
        "min_count": min_count,
        "synsets": synsets,
        "exceptions": exceptions,
    }


def write_table(table: dict[str, object], out: Path) -> int:
    """Write gzip JSON deterministically (mtime 0); return the size in bytes."""
    raw = json.dumps(table, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as gz:
        gz.write(raw.encode("utf-8"))
    out.write_bytes(buffer.getvalue())
    return len(buffer.getvalue())


def main() -> None:
    """Build the table from the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet-dir", type=Path, default=Path("/usr/share/wordnet"))
    parser.add_argument("--min-count", type=int, default=1, help="SemCor tags a lemma needs")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "roclip_plugin" / "augment" / "data" / TABLE_NAME
    )
    args = parser.parse_args()
    table = build_table(args.wordnet_dir, args.min_count)
    size = write_table(table, args.out)
    synsets = table["synsets"]
    assert isinstance(synsets, dict)
    total = sum(len(v) for v in synsets.values())
    lemmas = len({lemma.lower() for v in synsets.values() for s in v for lemma in s})
    print(f"wrote {args.out}: {total} synsets, {lemmas} lemmas, {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
