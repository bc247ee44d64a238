"""Time the query speller (assay/spell.py) at several vocabulary sizes, against an exact scan as the peer.

    python benchmarks/bench_spell.py                      # catalog vocabularies of 2k, 20k and 200k words
    python benchmarks/bench_spell.py --sizes 2000 500000

A simulated catalog of 10k items uses about 1,700 distinct words; a real one of a million items, tens to hundreds
of thousands. The vocabulary here is synthetic (pronounceable words of 4-12 letters, Zipf-distributed item counts)
so its size can grow past what the simulator writes. Queries are catalog words with one random edit (a quarter), two
edits (a quarter, words of 8+ letters; one edit for shorter ones) or none (half).

The peer corrects the same words by scanning the whole vocabulary with the same edit-distance function (what the
symmetric-delete index avoids); both must return the same corrections, which the run checks. Reported: index build
seconds, the index's peak memory, words per second for both and the speed-up.
"""

from __future__ import annotations

import argparse
import random
import resource
import time
from collections import Counter

from assay.spell import Speller, edit_distance

CONS, VOWELS = "bcdfghklmnprstvwz", "aeiou"


def vocabulary(n: int, rng: random.Random) -> Counter:
    out: Counter = Counter()
    while len(out) < n:
        w = "".join(rng.choice(CONS) + rng.choice(VOWELS) for _ in range(rng.randint(2, 6)))
        out[w] = max(1, int(1000 / (len(out) + 1) ** 0.8))
    return out


def typo(w: str, rng: random.Random) -> str:
    i = rng.randrange(len(w))
    kind = rng.randrange(4)
    if kind == 0:
        return w[:i] + w[i + 1:]
    if kind == 1:
        return w[:i] + rng.choice("abcdefghijklmnopqrstuvwxyz") + w[i:]
    if kind == 2:
        return w[:i] + rng.choice("abcdefghijklmnopqrstuvwxyz") + w[i + 1:]
    return w[:i] + w[i + 1:i + 2] + w[i:i + 1] + w[i + 2:] if i + 1 < len(w) else w[:-1]


def scan(sp: Speller, word: str) -> str:
    """The peer: the same rule, by comparing the word with every vocabulary word."""
    if len(word) < sp.min_length or word in sp.known:
        return word
    limit = 2 if len(word) >= sp.long_length else 1
    best = None
    for c, n in sp.counts.items():
        d = edit_distance(word, c, limit)
        if d <= limit:
            key = (d, -n, c)
            best = key if best is None or key < best else best
    return best[2] if best else word


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[2_000, 20_000, 200_000])
    ap.add_argument("--words", type=int, default=2_000, help="query words corrected by the speller per size")
    ap.add_argument("--peer-words", type=int, default=100, help="of those, corrected by the exact scan too")
    args = ap.parse_args()
    rng = random.Random(7)
    rows = []
    for n in args.sizes:
        vocab = vocabulary(n, rng)
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = time.perf_counter()
        sp = Speller(vocab)
        build = time.perf_counter() - t
        rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
        pool = list(vocab)
        words = [typo(typo(w, rng), rng) if i % 4 == 0 and len(w) >= sp.long_length else typo(w, rng)
                 if i % 2 == 0 else w for i, w in enumerate(rng.choice(pool) for _ in range(args.words))]
        t = time.perf_counter()
        fixed = [sp.correct_word(w) for w in words]
        ours = len(words) / (time.perf_counter() - t)
        sample = words[:args.peer_words]
        t = time.perf_counter()
        peer = [scan(sp, w) for w in sample]
        theirs = len(sample) / (time.perf_counter() - t)
        assert peer == fixed[:len(sample)], "the index and the exact scan disagree"
        rows.append((n, len(sp._index), build, rss, ours, theirs))
        print(f"{n:>8,} words: index {len(sp._index):>10,} keys, built in {build:6.2f} s (+{rss:,.0f} MB peak); "
              f"{ours:>9,.0f} words/s against the exact scan's {theirs:>7,.1f} ({ours / theirs:,.0f}x)", flush=True)
    print("\n| vocabulary | index keys | build s | peak MB | words/s | exact scan words/s | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for n, keys, build, rss, ours, theirs in rows:
        print(f"| {n:,} | {keys:,} | {build:.2f} | {rss:,.0f} | {ours:,.0f} | {theirs:,.1f} | {ours / theirs:,.0f}x |")


if __name__ == "__main__":
    main()
