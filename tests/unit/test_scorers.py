"""Scorers on cases worked out by hand (the expected numbers are derived in comments)."""
import pytest

from cl_runner.evaluation import SCORERS, get_scorer, score
from cl_runner.evaluation.sari import corpus_sari, sari_components, sari_sentence, tokenize_13a
from cl_runner.evaluation.scorers import (
    edit_similarity,
    exact_match,
    exact_match_normalized,
    first_char,
    map_py150_literals,
    normalize_answer,
    rouge_l,
    sari,
)


def test_registry_names():
    assert set(SCORERS) == {
        "exact_match", "exact_match_normalized", "first_char", "rouge_l", "edit_similarity", "sari",
    }
    assert get_scorer("rouge_l") is rouge_l


# --- exact match ----------------------------------------------------------------------


def test_exact_match_is_raw_equality():
    assert exact_match("A", "A") == 1.0
    assert exact_match("A ", "A") == 0.0  # no stripping
    assert exact_match("a", "A") == 0.0  # case matters
    assert exact_match("42", "42.0") == 0.0


def test_exact_match_empty_scores_zero_even_against_empty():
    assert exact_match("", "A") == 0.0
    assert exact_match("", "") == 0.0  # TRACE skips empty items in the numerator


def test_exact_match_unicode():
    assert exact_match("支持", "支持") == 1.0
    assert exact_match("Straße", "Strasse") == 0.0


def test_normalize_answer():
    assert normalize_answer("  The  Answer:\tYES! ") == "the answer yes"
    assert normalize_answer("don't") == "dont"  # apostrophe is punctuation
    assert normalize_answer("Über,  café.") == "über café"  # non-ASCII letters stay


def test_exact_match_normalized():
    assert exact_match_normalized("Positive.", "positive") == 1.0
    assert exact_match_normalized(" not_entailment ", "Not entailment") == 0.0  # '_' removed, no space added
    assert exact_match_normalized("not  entailment\n", "not entailment") == 1.0
    assert exact_match_normalized("", "positive") == 0.0
    assert exact_match_normalized("!!", "") == 1.0  # as in O-LoRA: both normalize to ""


# --- first character ------------------------------------------------------------------


def test_first_char():
    assert first_char("B", "B\nBecause plants need light.") == 1.0
    assert first_char("B) the sun", "B\nreasons") == 1.0
    assert first_char("C", "B\nreasons") == 0.0
    assert first_char(" B", "B\nreasons") == 0.0  # raw: a leading space is the first char
    assert first_char("", "B") == 0.0
    assert first_char("B", "") == 0.0


# --- ROUGE-L --------------------------------------------------------------------------


def test_rouge_l_hand_computed():
    # LCS("the cat sat", "the cat sat on the mat") = 3 tokens: P = 3/3, R = 3/6, F = 2/3
    assert rouge_l("the cat sat", "the cat sat on the mat") == pytest.approx(2 / 3)
    # tokens are lower-cased and punctuation is dropped
    assert rouge_l("The CAT, sat!", "the cat sat") == pytest.approx(1.0)
    # LCS("a b c d", "a c b d") = 3 ("a b d" or "a c d"): P = R = 3/4
    assert rouge_l("a b c d", "a c b d") == pytest.approx(0.75)


def test_rouge_l_empty_scores_zero():
    assert rouge_l("", "the cat") == 0.0
    assert rouge_l("   ", "the cat") == 0.0
    assert rouge_l("the cat", "") == 0.0


def test_rouge_l_falls_back_for_text_without_ascii_tokens():
    # rouge-score alone sees no token in Chinese and would return 0 here.
    assert rouge_l("你好世界", "你好世界") == pytest.approx(1.0)
    # character tokens: LCS("我喜欢猫", "我喜欢狗") = 3 of 4 on both sides
    assert rouge_l("我喜欢猫", "我喜欢狗") == pytest.approx(0.75)
    # words of a spaced non-Latin script stay whole: LCS = 2 of 3 on both sides
    assert rouge_l("привет мир сегодня", "привет мир вчера") == pytest.approx(2 / 3)


def test_rouge_l_latin_text_keeps_standard_tokenizer():
    # "über" -> "ber" on both sides under rouge-score's tokenizer: still a match
    assert rouge_l("über alles", "über alles") == pytest.approx(1.0)


# --- edit similarity (Py150) ----------------------------------------------------------


def test_map_py150_literals():
    assert map_py150_literals("x = <NUM_LIT>") == "x = 0"
    assert map_py150_literals("s = '<STR_LIT>'") == "s = ''"
    assert map_py150_literals("c = <CHAR_LIT>") == "c = "
    assert map_py150_literals("open(f, <STR_LIT:utf-8>)") == "open(f, utf-8)"
    assert map_py150_literals("<NUM_LIT:3> + <NUM_LIT>") == "3 + 0"
    assert map_py150_literals("a<STR_LIT:x>b<STR_LIT:y>c") == "axbyc"  # non-greedy


def test_edit_similarity_is_rounded_indel_ratio():
    assert edit_similarity("return x", "return x") == 1.0
    # "kitten" -> "sitting": indel distance 5 (two substitutions = 4, one insertion = 1),
    # r = (6 + 7 - 5) / 13 = 8/13 = 61.54% -> fuzzywuzzy rounds to 62
    assert edit_similarity("kitten", "sitting") == 0.62
    # "abcd" vs "abce": indel 2, r = 6/8 = 75%
    assert edit_similarity("abcd", "abce") == 0.75


def test_edit_similarity_maps_literals_on_both_sides():
    # both become "x = 0"
    assert edit_similarity("x = <NUM_LIT>", "x = 0") == 1.0
    # "f(utf-8)" vs "f()" : indel 5, r = (8 + 3 - 5) / 11 = 6/11 = 54.5% -> 55
    assert edit_similarity("f(<STR_LIT:utf-8>)", "f(<STR_LIT>)") == 0.55


def test_edit_similarity_empty_scores_zero():
    assert edit_similarity("", "x = 1") == 0.0
    assert edit_similarity("x = 1", "<STR_LIT>") == 0.0  # the reference is empty after mapping
    assert edit_similarity("", "") == 0.0  # TRACE skips empty items


# --- SARI -----------------------------------------------------------------------------


def test_tokenize_13a():
    assert tokenize_13a("About 95 species are currently accepted.") == "About 95 species are currently accepted ."
    assert tokenize_13a("It costs $1,000.50, right?") == "It costs $ 1,000.50 , right ?"
    assert tokenize_13a("well-known 1990-2000") == "well-known 1990 - 2000"
    assert tokenize_13a("&quot;hi&quot; (x)") == '" hi " ( x )'
    assert tokenize_13a("Er sagte: «Nein!»") == "Er sagte : «Nein ! »"
    assert tokenize_13a("") == ""


def test_sari_classic_example_three_references():
    # The example of the EASSE / Hugging Face `sari` docs: 26.953601953601954 on 0..100.
    value = corpus_sari(
        ["About 95 species are currently accepted."],
        ["About 95 you now get in."],
        [["About 95 species are currently known.",
          "About 95 species are now accepted.",
          "95 species are now accepted."]],
    )
    assert value * 100 == pytest.approx(26.953601953601954, abs=1e-9)


def test_sari_one_reference_hand_computed():
    # source "a b c", prediction "a b d", reference "a b e".
    # keep: n=1 {a,b} kept, all in ref -> F 1; n=2 {ab} -> 1; n=3,4 nothing kept, nothing
    #   keepable -> 0/0 = 1. keep = 1.
    # del: n=1 deletes c (ref deletes it too) -> 1; n=2 bc -> 1; n=3 abc -> 1; n=4 -> 1.
    # add: n=1 adds d, ref adds e -> P = R = 0 -> 0; n=2 bd vs be -> 0; n=3 abd vs abe
    #   -> 0; n=4 nothing added or addable -> 1. add = 1/4.
    # SARI = (1 + 1 + 1/4) / 3 = 0.75
    parts = sari_components("a b c", "a b d", ["a b e"])
    assert (parts.keep, parts.delete, parts.add) == pytest.approx((1.0, 1.0, 0.25))
    assert sari("a b d", "a b e", "a b c") == pytest.approx(0.75)


def test_sari_deletion_counts_copies():
    # source "a a b", prediction "a c", reference "a c".
    # n=1: deleted = {a:1, b:1}; the reference keeps one a, so only b is a good deletion:
    #   P_del = (0 + 1) / 2 = 1/2. keep {a} -> 1, add {c} -> 1.
    # n=2..4: everything deleted is deleted by the reference too, additions match -> 1.
    # del = (1/2 + 1 + 1 + 1) / 4 = 7/8, SARI = (1 + 7/8 + 1) / 3 = 23/24
    parts = sari_components("a a b", "a c", ["a c"])
    assert parts.delete == pytest.approx(7 / 8)
    assert parts.sari == pytest.approx(23 / 24)


def test_sari_two_references_split_the_vote():
    # source "a b", prediction "a b", references "a" and "b": counts of source and
    # prediction are doubled, the references' summed.
    # n=1: kept {a:2, b:2}, good {a:1, b:1}: P_keep = (1/2 + 1/2) / 2 = 1/2, R_keep = 2/2,
    #   F = 2/3. n=2: ab kept, in no reference: P = 0, nothing keepable: R = 1, F = 0.
    # keep = (2/3 + 0 + 1 + 1) / 4 = 2/3; del = add = 1. SARI = (2/3 + 2) / 3 = 8/9
    assert sari_sentence("a b", "a b", ["a", "b"]) == pytest.approx(8 / 9)


def test_sari_empty_prediction_matches_hf():
    # "" is one empty token (HF splits on " "), so it is an addition that no reference has:
    # n=1 keep F = 0 (nothing kept, a keepable), del = 1/2 (a wrongly, b rightly deleted),
    # add = 0; higher orders are 0/0 = 1 except del of "a b" which is right -> 1.
    # keep = 3/4, del = 7/8, add = 3/4, SARI = 19/24
    assert sari("", "a", "a b") == pytest.approx(19 / 24)


def test_sari_is_case_insensitive_and_tokenizes_punctuation():
    assert sari("Der Hund.", "der hund .", "Der Hund ist groß.") == pytest.approx(
        sari("der hund .", "der hund .", "der hund ist groß .")
    )


def test_sari_reference_must_be_a_list():
    with pytest.raises(TypeError, match="list of strings"):
        sari_sentence("a", "a", "a")
    with pytest.raises(ValueError, match="at least one reference"):
        sari_sentence("a", "a", [])


# --- score() --------------------------------------------------------------------------


def test_score_returns_mean_and_items():
    mean, items = score("exact_match", ["A", "B", ""], ["A", "C", "A"])
    assert items == [1.0, 0.0, 0.0]
    assert mean == pytest.approx(1 / 3)  # the empty prediction stays in the denominator


def test_score_sari_uses_sources():
    mean, items = score("sari", ["a b d"], ["a b e"], sources=["a b c"])
    assert mean == pytest.approx(0.75) and items == pytest.approx([0.75])


def test_score_sari_without_sources_is_an_error():
    with pytest.raises(ValueError, match="needs sources"):
        score("sari", ["a"], ["a"])


def test_score_unknown_name_lists_known():
    with pytest.raises(ValueError, match="unknown scorer 'bleu'.*exact_match.*rouge_l"):
        score("bleu", ["a"], ["a"])


def test_score_length_mismatch():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        score("exact_match", ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="1 sources for 2 predictions"):
        score("rouge_l", ["a", "b"], ["a", "b"], sources=["x"])


def test_score_empty_split_is_an_error():
    with pytest.raises(ValueError, match="nothing to score"):
        score("exact_match", [], [])


def test_score_rejects_non_strings():
    with pytest.raises(TypeError, match=r"predictions\[1\] is NoneType"):
        score("exact_match", ["a", None], ["a", "b"])
    with pytest.raises(TypeError, match="not a single string"):
        score("exact_match", "abc", "abc")


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_every_scorer_is_in_unit_range(name):
    cases = [("", ""), ("a", ""), ("", "a"), ("x = 1", "x = 2"), ("你好", "hello"), ("B\nok", "B\nok")]
    for prediction, reference in cases:
        value = SCORERS[name](prediction, reference, "x = 1 你好")
        assert 0.0 <= value <= 1.0, (name, prediction, reference, value)
