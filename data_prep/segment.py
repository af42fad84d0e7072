"""Sentence segmentation of running text (documents that are not one sentence per line).

sentencex was chosen by measurement (tests/benchmarks/segmenters.py, figures in RESULTS.md): on 5 MB of
prose it segments ~64 MB/s on one core (blingfire ~12, syntok ~1.1, pysbd ~0.2) with boundary F1 0.95 on
our gold set and no false splits, and it needs no model download. At ~4 bytes a token that is ~10% of
the per-core budget of the shard pipeline.
"""

from __future__ import annotations

import sentencex

LANGUAGE = "en"  # sentencex falls back through language families; English rules suit most Latin-script text


def split_sentences(text: str) -> list[str]:
    """One paragraph of text -> its sentences, stripped, empty ones dropped."""
    if not text:
        return []
    return [s.strip() for s in sentencex.segment(LANGUAGE, text) if not s.isspace() and s]
