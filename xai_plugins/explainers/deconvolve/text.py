"""Aggregating the filters' sentences (DeConvolve, section 3.4.2): score buckets and weighted
semantic averaging.

"Averaging sentences grouped by their scores. Then, the various bucket average sentences are
averaged based on the mean score of the filter within the bucket." With sentence embeddings
(all-MiniLM-L6-v2, offline) an "average sentence" is the sentence nearest an average embedding:

1. buckets: sentences are split by the sign of their score, then by magnitude into ``buckets``
   equal-width bins of |score| in (0, max |score| of that sign];
2. each bucket's centroid is the |score|-weighted mean of its embeddings; the bucket keeps the
   sentence nearest it (cosine);
3. the summary is the sentence nearest the mean of the bucket centroids weighted by each bucket's
   mean |score| (a strongly negative bucket weighs as much as an equally strong positive one);
4. the text lists the bucket sentences ordered by bucket mean score, highest first.

The result depends only on the multiset of (sentence, score) pairs, not their order: members are
put in a canonical order before any sum, and ties go to the lexicographically smaller sentence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

Embedder = Callable[[Sequence[str]], torch.Tensor]


class CachedEmbedder:
    """Embeds every sentence of a batch in one call, then answers per image from the cache."""

    def __init__(self, embed: Embedder, sentences: Sequence[str]):
        self.embed = embed
        unique = sorted(set(sentences))
        self.cache = dict(zip(unique, embed(unique))) if unique else {}

    def __call__(self, sentences: Sequence[str]) -> torch.Tensor:
        missing = sorted({s for s in sentences if s not in self.cache})
        if missing:
            self.cache.update(zip(missing, self.embed(missing)))
        return torch.stack([self.cache[s] for s in sentences]) if sentences else torch.zeros(0, 1)


@dataclass
class Bucket:
    sign: int  # +1 / -1
    level: int  # 0 = weakest magnitude bin
    mean_score: float
    sentence: str
    members: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Aggregate:
    text: str
    summary: str
    buckets: list[Bucket]


def bucket_keys(scores: Sequence[float], buckets: int) -> list[tuple[int, int]]:
    """(sign, level) of each score; levels are equal-width bins of |score| per sign."""
    buckets = max(1, int(buckets))
    top = {s: max([abs(x) for x in scores if (x >= 0) == (s > 0)], default=0.0) for s in (1, -1)}
    keys = []
    for x in scores:
        sign = 1 if x >= 0 else -1
        span = top[sign]
        level = min(buckets - 1, int(abs(x) / span * buckets)) if span > 0 else 0
        keys.append((sign, level))
    return keys


def _nearest(target: torch.Tensor, candidates: list[str], vectors: dict[str, torch.Tensor]) -> str:
    """The candidate whose embedding has the highest cosine with ``target`` (ties: smaller text)."""
    t = torch.nn.functional.normalize(target.double(), dim=0)
    best = max(sorted(set(candidates)), key=lambda s: (round(float(vectors[s].double() @ t), 9), _neg(s)))
    return best


def _neg(s: str) -> tuple[int, ...]:
    return tuple(-ord(c) for c in s) + (0,)


def _weighted_mean(vectors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    w = torch.tensor(weights, dtype=torch.float64)
    if float(w.sum()) <= 0:
        w = torch.ones_like(w)
    return (torch.stack([v.double() for v in vectors]) * w.view(-1, 1)).sum(0) / w.sum()


def semantic_average(
    sentences: Sequence[str], scores: Sequence[float], embed: Embedder, buckets: int = 2
) -> Aggregate:
    """Bucket the (sentence, score) pairs and average them semantically (see module docstring)."""
    if len(sentences) != len(scores):
        raise ValueError("one score per sentence")
    if not sentences:
        return Aggregate("", "", [])
    pairs = sorted(zip(sentences, (float(s) for s in scores)), key=lambda p: (p[1], p[0]))
    unique = sorted({s for s, _ in pairs})
    vectors = dict(zip(unique, embed(unique)))
    groups: dict[tuple[int, int], list[tuple[str, float]]] = {}
    for key, pair in zip(bucket_keys([p[1] for p in pairs], buckets), pairs):
        groups.setdefault(key, []).append(pair)
    out: list[Bucket] = []
    centroids: list[torch.Tensor] = []
    for (sign, level), members in sorted(groups.items()):
        centroid = _weighted_mean([vectors[s] for s, _ in members], [abs(x) for _, x in members])
        mean = sum(x for _, x in members) / len(members)
        out.append(Bucket(sign, level, mean, _nearest(centroid, [s for s, _ in members], vectors), members))
        centroids.append(centroid)
    overall = _weighted_mean(centroids, [abs(b.mean_score) for b in out])
    summary = _nearest(overall, unique, vectors)
    order = sorted(range(len(out)), key=lambda i: (-out[i].mean_score, out[i].sentence))
    ordered = [out[i] for i in order]
    seen: list[str] = []
    for b in ordered:
        if b.sentence not in seen:
            seen.append(b.sentence)
    return Aggregate(" ".join(seen), summary, ordered)
