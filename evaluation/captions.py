"""Caption metrics, offline and in plain Python: corpus BLEU-4, ROUGE-L, CIDEr-D, and for the
procedural captions of datasets/shapes.py whether a caption names the right shape family and colour.

Captions are compared as lower-case word lists (`words`: runs of letters and digits; punctuation
dropped), each candidate against one or more references.

- BLEU-4 (Papineni et al. 2002), corpus level: clipped n-gram counts (n = 1..4) summed over the
  corpus, geometric mean of the four precisions, brevity penalty exp(1 - r/c) when the candidates
  are shorter (r: per candidate the reference length closest to its own, the shorter on a tie);
  smoothing "method 1" of Chen & Cherry (2014) as in NLTK: a precision with no match counts as
  0.1 / (its n-gram count); no unigram match at all scores 0.
- ROUGE-L (Lin 2004): F-measure of the longest common subsequence, P = LCS/|candidate|,
  R = LCS/|reference|, F = (1 + β²)PR / (R + β²P), the best over the references, averaged over
  candidates; β = 1 by default (the COCO caption toolkit uses 1.2).
- CIDEr-D (Vedantam et al. 2015), as the COCO caption toolkit computes it: TF-IDF n-gram vectors
  (n = 1..4; document frequencies over the references of the corpus), the candidate's weights
  clipped to the reference's, cosine per n, times the Gaussian length penalty (σ = 6, lengths
  counted as the toolkit does, by bigrams), averaged over n and references, times 10. It needs a
  corpus: with one object every weight is log(1) = 0.
"""
from __future__ import annotations

import math
import re
from collections import Counter

from datasets.shapes import FAMILIES, PALETTE


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def _check(candidates: list[str], references: list[list[str]]) -> None:
    if len(candidates) != len(references) or not candidates:
        raise ValueError(f"{len(candidates)} candidates for {len(references)} reference lists; give one list "
                         "(of one or more references) per candidate")
    if any(not refs for refs in references):
        raise ValueError("every candidate needs at least one reference")


def bleu4(candidates: list[str], references: list[list[str]], epsilon: float = 0.1) -> float:
    """Corpus BLEU-4 in [0, 1] with the brevity penalty and smoothing method 1 (module docstring)."""
    _check(candidates, references)
    matched, total = [0] * 4, [0] * 4
    c_len = r_len = 0
    for cand, refs in zip(candidates, references):
        c, rs = words(cand), [words(r) for r in refs]
        for n in range(1, 5):
            counts = ngrams(c, n)
            most = Counter()
            for r in rs:
                most |= ngrams(r, n)                 # the most each n-gram occurs in one reference
            matched[n - 1] += sum(min(k, most[g]) for g, k in counts.items())
            total[n - 1] += max(1, sum(counts.values()))
        c_len += len(c)
        r_len += min((abs(len(r) - len(c)), len(r)) for r in rs)[1]
    if matched[0] == 0:
        return 0.0
    log_p = sum(math.log((m if m else epsilon) / t) for m, t in zip(matched, total)) / 4
    brevity = 1.0 if c_len > r_len else math.exp(1 - r_len / c_len)
    return brevity * math.exp(log_p)


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence (dynamic programming, one row kept)."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, 1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(candidates: list[str], references: list[list[str]], beta: float = 1.0) -> float:
    """Mean over candidates of the best LCS F-measure against their references, in [0, 1]."""
    _check(candidates, references)
    scores = []
    for cand, refs in zip(candidates, references):
        c, best = words(cand), 0.0
        for ref in refs:
            r = words(ref)
            lcs = lcs_length(c, r)
            if lcs:
                p, rec = lcs / len(c), lcs / len(r)
                best = max(best, (1 + beta ** 2) * p * rec / (rec + beta ** 2 * p))
        scores.append(best)
    return sum(scores) / len(scores)


def _tfidf(tokens: list[str], df: Counter, log_docs: float) -> tuple[list[dict], list[float], int]:
    """Per n: {n-gram: tf·idf}, the vector's norm; and the length (the bigram count, as the toolkit)."""
    vecs, norms = [], []
    for n in range(1, 5):
        vec = {g: k * (log_docs - math.log(max(1.0, df[g]))) for g, k in ngrams(tokens, n).items()}
        vecs.append(vec)
        norms.append(math.sqrt(sum(v * v for v in vec.values())))
    return vecs, norms, sum(ngrams(tokens, 2).values())


def cider_d(candidates: list[str], references: list[list[str]], sigma: float = 6.0) -> float:
    """Corpus-mean CIDEr-D (module docstring); 10 for a candidate equal to its references when
    each n-gram order has some weight."""
    _check(candidates, references)
    refs_words = [[words(r) for r in refs] for refs in references]
    df = Counter()
    for refs in refs_words:
        df.update({g for r in refs for n in range(1, 5) for g in ngrams(r, n)})
    log_docs = math.log(len(candidates))
    total = 0.0
    for cand, refs in zip(candidates, refs_words):
        vc, nc, lc = _tfidf(words(cand), df, log_docs)
        score = 0.0
        for r in refs:
            vr, nr, lr = _tfidf(r, df, log_docs)
            penalty = math.exp(-((lc - lr) ** 2) / (2 * sigma ** 2))
            for n in range(4):
                dot = sum(min(v, vr[n].get(g, 0.0)) * vr[n].get(g, 0.0) for g, v in vc[n].items())
                if nc[n] and nr[n]:
                    score += dot / (nc[n] * nr[n]) * penalty / 4
        total += 10.0 * score / len(refs)
    return total / len(candidates)


# ----------------------------------------------------------------------------- procedural captions

def named(text: str, vocabulary) -> set:
    """The words of `vocabulary` (shape families, colours) that `text` names."""
    found = set(words(text))
    return {w for w in vocabulary if w in found}


def shape_and_colour(candidates: list[str], references: list[str]) -> dict:
    """For procedural captions ("a small red box", "a blue cone next to a green torus"): the share
    of candidates that name exactly the reference's shape families (family_acc) and exactly its
    colours (colour_acc), over the references that name any."""
    out = {}
    for key, vocab in (("family_acc", FAMILIES), ("colour_acc", tuple(PALETTE))):
        pairs = [(named(c, vocab), named(r, vocab)) for c, r in zip(candidates, references)]
        pairs = [(c, r) for c, r in pairs if r]
        if pairs:
            out[key] = sum(c == r for c, r in pairs) / len(pairs)
    return out


def caption_scores(candidates: list[str], references: list[list[str]]) -> dict:
    """bleu4, rouge_l, cider_d, and family_acc / colour_acc against the first references when
    they are procedural captions."""
    scores = {"bleu4": bleu4(candidates, references), "rouge_l": rouge_l(candidates, references),
              "cider_d": cider_d(candidates, references)}
    return {**scores, **shape_and_colour(candidates, [refs[0] for refs in references])}
