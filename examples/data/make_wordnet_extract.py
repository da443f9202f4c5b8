"""Regenerate ``wordnet_glosses.jsonl`` from a local WordNet 3.0 database.

Each record is a common lowercase word, its part of speech and the gloss of its most frequent
sense (sense 1, as ranked by the SemCor tag counts in ``cntlist.rev``), with example sentences
removed. The held-out split shares no word and no gloss with training: records linked by a word or
a gloss are grouped, and whole groups are assigned to one split.

Usage (Debian/Ubuntu: ``apt-get install wordnet-base``)::

    python examples/data/make_wordnet_extract.py [--wordnet-dir /usr/share/wordnet]
"""

from __future__ import annotations

import argparse
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

POS_FILES = {"noun": "noun", "verb": "verb", "adjective": "adj", "adverb": "adv"}
#: Sense-key ``ss_type`` digits (wndb(5)/senseidx(5)); 5 is an adjective satellite.
SS_TYPE_POS = {"1": "noun", "2": "verb", "3": "adjective", "4": "adverb", "5": "adjective"}
WORD_RE = re.compile(r"[a-z]{3,12}")
ADJ_MARKER_RE = re.compile(r"\((?:a|p|ip)\)$")


@dataclass(frozen=True)
class Record:
    word: str
    pos: str
    gloss: str
    synset: str  # "<pos>:<offset>", grouping key only, not written
    tag_count: int


def definition_only(gloss: str) -> str:
    """The gloss up to its first quoted example sentence, without the separator before it."""
    definition = gloss.partition('"')[0].strip().rstrip(";:,").strip()
    return re.sub(r"[\s;,(]+(?:e\.g\.|i\.e\.)[:,]?$", "", definition)


def read_index(wordnet_dir: Path, pos: str) -> dict[str, list[str]]:
    """lemma -> synset offsets, in sense-number order."""
    senses: dict[str, list[str]] = {}
    for line in (wordnet_dir / f"index.{POS_FILES[pos]}").read_text(encoding="utf-8").splitlines():
        if line.startswith("  "):  # licence header
            continue
        fields = line.split()
        synset_count, pointer_count = int(fields[2]), int(fields[3])
        senses[fields[0]] = fields[6 + pointer_count : 6 + pointer_count + synset_count]
    return senses


def read_data(wordnet_dir: Path, pos: str) -> dict[str, tuple[list[str], str]]:
    """synset offset -> (word forms as written, definition)."""
    synsets: dict[str, tuple[list[str], str]] = {}
    for line in (wordnet_dir / f"data.{POS_FILES[pos]}").read_text(encoding="utf-8").splitlines():
        if line.startswith("  "):
            continue
        head, _, gloss = line.partition(" | ")
        fields = head.split()
        word_count = int(fields[3], 16)
        words = [ADJ_MARKER_RE.sub("", fields[4 + 2 * i]) for i in range(word_count)]
        # Some glosses lose an opening quote, leaving example text that cannot be told apart.
        definition = definition_only(gloss) if gloss.count('"') % 2 == 0 else ""
        synsets[fields[0]] = (words, definition)
    return synsets


def candidates(wordnet_dir: Path, max_gloss_words: int) -> list[Record]:
    """Sense-1 records of every tagged lemma that passes the word and gloss filters."""
    index = {pos: read_index(wordnet_dir, pos) for pos in POS_FILES}
    data = {pos: read_data(wordnet_dir, pos) for pos in POS_FILES}
    records: dict[tuple[str, str], Record] = {}
    for line in (wordnet_dir / "cntlist.rev").read_text(encoding="utf-8").splitlines():
        sense_key, sense_number, tag_count = line.split()
        lemma, _, lex_sense = sense_key.partition("%")
        pos = SS_TYPE_POS[lex_sense[0]]
        if sense_number != "1" or not WORD_RE.fullmatch(lemma) or lemma not in index[pos]:
            continue
        offset = index[pos][lemma][0]
        words, gloss = data[pos][offset]
        # A lemma written capitalised in its synset is a proper noun or an acronym ("Paris", "AIDS").
        if lemma not in words or not gloss or "`" in gloss or len(gloss.split()) > max_gloss_words:
            continue
        record = Record(lemma, pos, gloss, f"{pos}:{offset}", int(tag_count))
        records[lemma, pos] = record
    return list(records.values())


def split_groups(records: list[Record]) -> list[list[Record]]:
    """Connected components of records that share a word, a synset or a gloss text."""
    parent = list(range(len(records)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_seen: dict[str, int] = {}
    for i, record in enumerate(records):
        for key in (f"w:{record.word}", f"s:{record.synset}", f"g:{record.gloss.lower()}"):
            j = first_seen.setdefault(key, i)
            parent[find(i)] = find(j)
    groups: dict[int, list[Record]] = {}
    for i, record in enumerate(records):
        groups.setdefault(find(i), []).append(record)
    return sorted(groups.values(), key=lambda group: min((r.word, r.pos) for r in group))


def build(
    wordnet_dir: Path, count: int, test_fraction: float, seed: int, max_gloss_words: int
) -> list[dict[str, str]]:
    """The ``count`` most frequent candidates; whole groups go to test until it holds ``test_fraction``."""
    ranked = sorted(candidates(wordnet_dir, max_gloss_words), key=lambda r: (-r.tag_count, r.word, r.pos))
    groups = split_groups(ranked[:count])
    random.Random(seed).shuffle(groups)
    test_target = round(test_fraction * count)
    rows: list[dict[str, str]] = []
    in_test = 0
    for group in groups:
        split = "test" if in_test < test_target else "train"
        in_test += len(group) if split == "test" else 0
        rows.extend({"word": r.word, "pos": r.pos, "gloss": r.gloss, "split": split} for r in group)
    return sorted(rows, key=lambda row: (row["split"] != "train", row["word"], row["pos"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wordnet-dir", type=Path, default=Path("/usr/share/wordnet"))
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("wordnet_glosses.jsonl"))
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-gloss-words", type=int, default=12)
    args = parser.parse_args()
    rows = build(args.wordnet_dir, args.count, args.test_fraction, args.seed, args.max_gloss_words)
    with args.out.open("w", encoding="utf-8", newline="\n") as handle:
        handle.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    test = sum(row["split"] == "test" for row in rows)
    print(f"wrote {len(rows)} records ({len(rows) - test} train, {test} test) to {args.out}")


if __name__ == "__main__":
    main()
