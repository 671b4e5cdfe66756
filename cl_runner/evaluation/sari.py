"""SARI (Xu et al. 2016, "Optimizing Statistical Machine Translation for Text
Simplification", TACL 4) for one prediction against its source and references.

SARI rewards what a rewrite adds, keeps and deletes relative to the source, judged
against the references:

    SARI = (F_keep + P_del + F_add) / 3

each term averaged over n-gram orders n = 1..4. This module follows the variant that
Hugging Face `evaluate` ships as `sari` (itself from tensor2tensor's `sari_hook`), which
is what TRACE calls for 20Minuten, so that our numbers are the published ones (on a
0..1 scale instead of 0..100):

* text is lower-cased and tokenized with sacreBLEU's `13a` tokenizer (re-implemented
  below, so no dependency), then split on single spaces. An empty text therefore becomes
  one empty token, exactly as there; this keeps an empty prediction from collecting the
  0/0 = 1 bonus on additions.
* n-gram counts of the source and the prediction are multiplied by the number of
  references, and the references' counts are summed, so several references act as
  fractional votes, as in Xu et al.'s multi-reference formulation.
* 0/0 is defined as 1 for every precision and recall (a prediction equal to the source
  when the reference is also the source scores 1).
* keep recall divides by the total count of source n-grams found in the references
  (the fix of cocoxu/simplification issue #6 that HF applies).
* deletion uses precision only, as in the paper.

The corpus score in HF is the mean of the sentence scores, so averaging `sari_sentence`
over items gives HF's number divided by 100.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

MAX_ORDER = 4

# mteval-v13a tokenization as sacreBLEU's `13a` applies it. The first class is the ASCII
# punctuation that is always split off: space to '&', '(' to '+', ':' to '@', '/',
# '[' to '`' and '{' to '~'; apostrophe, comma, hyphen and period are handled apart.
_13A_RULES = (
    (re.compile(r"([ -&(-+:-@/\[-`{-~])"), r" \1 "),
    # period and comma are split off unless they sit between digits (1,000 and 3.14)
    (re.compile(r"([^0-9])([.,])"), r"\1 \2 "),
    (re.compile(r"([.,])([^0-9])"), r" \1 \2"),
    # a dash right after a digit (ranges such as 1990-2000)
    (re.compile(r"([0-9])(-)"), r"\1 \2 "),
)


def tokenize_13a(text: str) -> str:
    """sacreBLEU's `13a` tokenization (the WMT mteval-v13a script), tokens joined by
    single spaces. Case is left alone; `normalize` lower-cases first."""
    text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for entity, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
        text = text.replace(entity, char)
    # the padding lets the rules see a non-digit before the first and after the last char
    text = f" {text} "
    for pattern, replacement in _13A_RULES:
        text = pattern.sub(replacement, text)
    return " ".join(text.split())


def normalize(text: str) -> list[str]:
    """Lower-case, 13a-tokenize and split on single spaces (`""` becomes `[""]`)."""
    return tokenize_13a(text.lower()).split(" ")


def _ngram_counts(tokens: Sequence[str], n: int, weight: int = 1) -> Counter:
    grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
    if weight != 1:
        for gram in grams:
            grams[gram] *= weight
    return grams


def _f1(precision: float, recall: float) -> float:
    if precision + recall == 0:
        return 0.0
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class SariComponents:
    """The three SARI terms, each averaged over n = 1..4, on a 0..1 scale."""

    keep: float  # F1 of the source n-grams the prediction keeps
    delete: float  # precision of the source n-grams the prediction drops
    add: float  # F1 of the n-grams the prediction adds (not in the source)

    @property
    def sari(self) -> float:
        return (self.keep + self.delete + self.add) / 3


def _order_scores(source: Sequence[str], prediction: Sequence[str],
                  references: Sequence[Sequence[str]], n: int) -> tuple[float, float, float]:
    """Keep F1, deletion precision and addition F1 for n-grams of order n."""
    num_refs = len(references)
    src = _ngram_counts(source, n, weight=num_refs)
    pred = _ngram_counts(prediction, n, weight=num_refs)
    refs = Counter()
    for reference in references:
        refs.update(_ngram_counts(reference, n))

    # Keep: n-grams both in the source and the prediction, credited up to the number of
    # references that also keep them.
    kept = src & pred
    kept_good = kept & refs
    keepable = src & refs
    keep_precision = sum(kept_good[g] / kept[g] for g in kept) / len(kept) if kept else 1.0
    keep_recall = sum(kept_good.values()) / sum(keepable.values()) if keepable else 1.0

    # Deletion: source n-grams the prediction dropped (count-wise), credited when the
    # references drop them too. Precision only: over-deleting is already punished by keep.
    deleted = src - pred
    deleted_good = deleted - refs
    delete_precision = (
        sum(deleted_good[g] / deleted[g] for g in deleted) / len(deleted) if deleted else 1.0
    )

    # Addition: n-gram types new to the prediction, good when a reference has them too.
    added = set(pred) - set(src)
    addable = set(refs) - set(src)
    added_good = added & addable
    add_precision = len(added_good) / len(added) if added else 1.0
    add_recall = len(added_good) / len(addable) if addable else 1.0

    return _f1(keep_precision, keep_recall), delete_precision, _f1(add_precision, add_recall)


def sari_components(source: str, prediction: str, references: Sequence[str]) -> SariComponents:
    """Keep, delete and add terms of SARI for one prediction (see the module docstring)."""
    if isinstance(references, str):
        raise TypeError("references must be a list of strings, not a string; wrap one reference as [reference]")
    if len(references) == 0:
        raise ValueError("SARI needs at least one reference")
    src = normalize(source)
    pred = normalize(prediction)
    refs = [normalize(r) for r in references]
    per_order = [_order_scores(src, pred, refs, n) for n in range(1, MAX_ORDER + 1)]
    keep, delete, add = (sum(values) / MAX_ORDER for values in zip(*per_order))
    return SariComponents(keep=keep, delete=delete, add=add)


def sari_sentence(source: str, prediction: str, references: Sequence[str]) -> float:
    """SARI of one prediction on a 0..1 scale (HF `evaluate`'s `sari` divided by 100)."""
    return sari_components(source, prediction, references).sari


def corpus_sari(sources: Sequence[str], predictions: Sequence[str],
                references: Sequence[Sequence[str]]) -> float:
    """Mean sentence SARI over a corpus, 0..1 (HF reports the same number times 100)."""
    if not (len(sources) == len(predictions) == len(references)):
        raise ValueError(
            f"sources, predictions and references must have one entry per item; got "
            f"{len(sources)}, {len(predictions)} and {len(references)}"
        )
    if not predictions:
        raise ValueError("corpus_sari got no items to score")
    total = sum(sari_sentence(s, p, r) for s, p, r in zip(sources, predictions, references))
    return total / len(predictions)
