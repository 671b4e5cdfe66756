"""Item-level scorers: `scorer(prediction, reference, source) -> float` in [0, 1].

Each task of a stream names one scorer (`Task.scorer`); `score` applies it to a whole
test split and returns the mean (the task's entry in the accuracy matrix R) and the
per-item scores. Every scorer reproduces the number of the benchmark that uses it; the
docstrings say which and where the reproduction stops.

| name | benchmark | score of one item |
| --- | --- | --- |
| exact_match | TRACE accuracy | prediction == reference, raw strings; empty -> 0 |
| exact_match_normalized | O-LoRA | equality after lower-case, no punctuation, one space |
| first_char | TRACE ScienceQA | first characters equal; empty -> 0 |
| rouge_l | TRACE MeetingBank | ROUGE-L F1 (rouge-score); empty -> 0 |
| edit_similarity | TRACE Py150 | Levenshtein ratio after mapping literal placeholders |
| sari | TRACE 20Minuten | SARI / 100, source = prompt, one reference |
"""
from __future__ import annotations

import re
import string
from functools import lru_cache
from typing import Callable, Optional, Sequence

from rapidfuzz.distance import Indel
from rouge_score import rouge_scorer, tokenizers

from cl_runner.evaluation.sari import sari_sentence

Scorer = Callable[[str, str, str], float]


# --- accuracy -----------------------------------------------------------------------


def exact_match(prediction: str, reference: str, source: str = "") -> float:
    """1.0 when the raw strings are equal, else 0.0 (TRACE's accuracy).

    TRACE skips empty predictions (and empty references) in the numerator but keeps them
    in the denominator, so an empty string always scores 0, even against an empty
    reference. No stripping: trimming the generation is the decoder's job."""
    if prediction == "" or reference == "":
        return 0.0
    return float(prediction == reference)


_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """O-LoRA's answer normalization (SQuAD's without dropping articles): lower-case,
    delete ASCII punctuation, collapse runs of whitespace to one space and strip."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(text.split())


def exact_match_normalized(prediction: str, reference: str, source: str = "") -> float:
    """1.0 when `normalize_answer` makes the strings equal (O-LoRA's exact match).

    As in O-LoRA there is no special case for empty strings: "!" matches "" because both
    normalize to the empty string; a real label never does."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def first_char(prediction: str, reference: str, source: str = "") -> float:
    """1.0 when the first characters are equal (TRACE ScienceQA, where the answer is
    "B\\n<rationale>" and only the option letter is scored); an empty side scores 0."""
    if prediction == "" or reference == "":
        return 0.0
    return float(prediction[0] == reference[0])


# --- ROUGE-L ------------------------------------------------------------------------

# Scripts written without spaces between words: each character is one token there.
_UNSPACED_SCRIPTS = (
    "\u3040-\u30ff"  # Hiragana, Katakana
    "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"  # CJK ideographs
    "\u0e00-\u0e7f"  # Thai
)
_UNICODE_TOKEN_RE = re.compile(rf"[{_UNSPACED_SCRIPTS}]|(?:(?![{_UNSPACED_SCRIPTS}])[^\W_])+")


class UnicodeTokenizer(tokenizers.Tokenizer):
    """Fallback for text rouge-score cannot see: lower-case, words are runs of Unicode
    letters and digits, and every character of a script without spaces (Chinese,
    Japanese, Thai) is a token of its own."""

    def tokenize(self, text: str) -> list[str]:
        return _UNICODE_TOKEN_RE.findall(text.lower())


@lru_cache(maxsize=None)
def _rouge_scorer(fallback: bool) -> rouge_scorer.RougeScorer:
    tokenizer = UnicodeTokenizer() if fallback else None
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=tokenizer)


_DEFAULT_TOKENIZER = tokenizers.DefaultTokenizer(use_stemmer=False)


def rouge_l(prediction: str, reference: str, source: str = "") -> float:
    """ROUGE-L F1 (Lin 2004) from Google's `rouge-score`, no stemming (TRACE MeetingBank).

    rouge-score's tokenizer keeps only [a-z0-9] runs, so Chinese or Japanese text has no
    tokens and would always score 0. When either side is non-blank but has no such token,
    both sides are tokenized with `UnicodeTokenizer` instead (Unicode words, one token
    per CJK/Thai character). English keeps the standard tokenization; accented Latin
    letters are still dropped there ("über" -> "ber"), identically on both sides.

    TRACE used the `rouge` PyPI package, whose tokenization differs from rouge-score's,
    so numbers are close to the paper's but not bit-identical. An empty prediction or
    reference scores 0, as in TRACE."""
    if not prediction.strip() or not reference.strip():
        return 0.0
    fallback = not (_DEFAULT_TOKENIZER.tokenize(prediction) and _DEFAULT_TOKENIZER.tokenize(reference))
    return float(_rouge_scorer(fallback).score(reference, prediction)["rougeL"].fmeasure)


# --- edit similarity ----------------------------------------------------------------

_LITERAL_WITH_VALUE_RE = re.compile(r"<(?:STR|NUM|CHAR)_LIT:(.*?)>", re.S)


def map_py150_literals(code: str) -> str:
    """Py150's literal placeholders back to code, as TRACE does before scoring:
    `<NUM_LIT>` -> `0`, `<STR_LIT>` and `<CHAR_LIT>` -> nothing, and a literal with its
    value, `<STR_LIT:x>` (also NUM_/CHAR_), -> `x`."""
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    return _LITERAL_WITH_VALUE_RE.sub(lambda m: m.group(1), code)


def edit_similarity(prediction: str, reference: str, source: str = "") -> float:
    """Levenshtein ratio of the two code lines after `map_py150_literals`, as TRACE's
    Py150 score (fuzzywuzzy's `fuzz.ratio`) divided by 100.

    fuzzywuzzy (with python-Levenshtein) computes `int(round(100 * r))` where
    r = (|a| + |b| - indel(a, b)) / (|a| + |b|) and indel is the edit distance with
    insertions and deletions only (a substitution costs 2). rapidfuzz's `fuzz.ratio` is
    the same r times 100 but not rounded; we round like fuzzywuzzy so that per-item
    scores are whole percents and the task mean matches TRACE's. (Without
    python-Levenshtein, fuzzywuzzy falls back to difflib, a different measure; the
    benchmark defines the Levenshtein one.) TRACE scores an empty side 0, also after
    the mapping (a reference that was only `<STR_LIT>`)."""
    prediction, reference = map_py150_literals(prediction), map_py150_literals(reference)
    if prediction == "" or reference == "":
        return 0.0
    total = len(prediction) + len(reference)
    ratio = (total - Indel.distance(prediction, reference)) / total
    return round(100 * ratio) / 100


# --- SARI ---------------------------------------------------------------------------


def sari(prediction: str, reference: str, source: str = "") -> float:
    """SARI / 100 against one reference, the source being the task's prompt (TRACE
    20Minuten); see `cl_runner.evaluation.sari` for the formula and its details."""
    return sari_sentence(source, prediction, [reference])


# --- registry -----------------------------------------------------------------------

SCORERS: dict[str, Scorer] = {
    "exact_match": exact_match,
    "exact_match_normalized": exact_match_normalized,
    "first_char": first_char,
    "rouge_l": rouge_l,
    "edit_similarity": edit_similarity,
    "sari": sari,
}

# Scorers whose value depends on the source; `score` refuses to run them without one.
NEEDS_SOURCE = frozenset({"sari"})


def get_scorer(name: str) -> Scorer:
    """The scorer registered as `name`; a ValueError lists the known names."""
    try:
        return SCORERS[name]
    except KeyError:
        raise ValueError(f"unknown scorer {name!r}; known scorers: {', '.join(sorted(SCORERS))}") from None


def _check_strings(kind: str, values: Sequence[str]) -> None:
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise TypeError(f"{kind}[{i}] is {type(value).__name__} {value!r}; scorers take strings")


def score(
    name: str,
    predictions: Sequence[str],
    references: Sequence[str],
    sources: Optional[Sequence[str]] = None,
) -> tuple[float, list[float]]:
    """Score a test split with the scorer `name`: returns (mean, per-item scores).

    The mean is the macro score of the task over all items, empty predictions included
    (they score 0). `sources` (the prompts) are required for `sari` and ignored by the
    others. Lengths must agree, and an empty split is an error rather than a silent 0."""
    scorer = get_scorer(name)
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be lists of strings, not a single string")
    if len(predictions) != len(references):
        raise ValueError(
            f"scorer {name!r}: {len(predictions)} predictions but {len(references)} references; "
            "pass one prediction per reference, in the same order"
        )
    if sources is None:
        if name in NEEDS_SOURCE:
            raise ValueError(f"scorer {name!r} needs sources (the prompts), one per prediction")
        sources = [""] * len(predictions)
    elif len(sources) != len(predictions):
        raise ValueError(
            f"scorer {name!r}: {len(sources)} sources for {len(predictions)} predictions; "
            "pass one source (prompt) per prediction"
        )
    if not predictions:
        raise ValueError(f"scorer {name!r}: nothing to score (0 predictions); a task needs test examples")
    _check_strings("predictions", predictions)
    _check_strings("references", references)
    _check_strings("sources", sources)
    per_item = [float(scorer(p, r, s)) for p, r, s in zip(predictions, references, sources)]
    return sum(per_item) / len(per_item), per_item
