"""CL_Benchmark classification as generation (the way O-LoRA runs LLaMA): the instruction
prompt, the label word as the answer (+ EOS, the loss on those tokens only), and exact
match after normalisation of the generated text."""
from __future__ import annotations

import pytest

from cl_runner.evaluation.scorers import exact_match_normalized, normalize_answer, score
from cl_runner.streams.olora import OLORA_DATASETS, format_olora_prompt, load_olora, read_labels
from cl_runner.streams.task import Example


def test_prompt_holds_header_instruction_options_sentence_and_answer_cue():
    prompt = format_olora_prompt("TC", "agnews", ["World", "Sports", "Business", "Science or Technology"],
                                 "Stocks fell on Monday.")
    assert prompt == ("Task:TC\nDataset:agnews\n"
                      "What is the topic of the following paragraph? Choose one from the option.\n"
                      "Option: World, Sports, Business, Science or Technology \n"
                      "Stocks fell on Monday.\nAnswer:")
    # COPA: no instruction and no options, the sentence holds the question and the choices.
    assert format_olora_prompt("COPA", "COPA", ["A", "B"], "Q? A: x B: y") == "Task:COPA\nDataset:COPA\nQ? A: x B: y\nAnswer:"


def test_shared_data_tasks_become_prompt_and_label_pairs(cl_benchmark_dir):
    [agnews, sst2] = load_olora(cl_benchmark_dir, ["agnews", "sst-2"], max_train=5, max_test=5)
    for task, dataset, labels in ((agnews, "agnews", agnews.labels), (sst2, "SST-2", ["Good", "Bad"])):
        assert task.scorer == "exact_match_normalized"
        for ex in task.train + task.test:
            assert ex.answer in labels  # the target is the label word itself
            assert ex.prompt.startswith(f"Task:{OLORA_DATASETS[task.name][0]}\nDataset:{dataset}\n")
            assert f"Option: {', '.join(labels)} \n" in ex.prompt and ex.prompt.endswith("\nAnswer:")


def test_causal_batch_is_bos_prompt_then_label_and_eos_with_loss_on_those_only(tmp_path):
    """With a real (GGUF, byte-level BPE) tokenizer: the input is BOS + prompt + label +
    EOS, joined with no separator (as O-LoRA's decoder collator does), and only the
    label's tokens and the EOS carry loss."""
    pytest.importorskip("gguf")
    from cl_runner.models.batching import IGNORE, Collator
    from cl_runner.models.build import build_model
    from omegaconf import OmegaConf

    from cl_runner.config.schema import ModelConfig
    from tests.tiny_gguf import write_tiny_gguf

    write_tiny_gguf(tmp_path / "tiny.gguf")
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig),
                          {"kind": "causal", "gguf_file": str(tmp_path / "tiny.gguf"), "cache_dir": str(tmp_path / "c")})
    tok = build_model(cfg).tokenizer
    collate = Collator("causal", tok, max_length=512)  # the byte-level prompt is ~130 tokens
    prompt = format_olora_prompt("SC", "SST-2", ["Good", "Bad"], "a fine film")
    batch = collate([Example(prompt, "Good", "sst-2")])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(ids[1:-1]) == prompt + "Good"
    answer = [t for t in labels if t != IGNORE]
    assert tok.decode(answer[:-1]) == "Good" and answer[-1] == tok.eos_token_id
    assert labels[: len(ids) - len(answer)] == [IGNORE] * (len(ids) - len(answer))


@pytest.mark.parametrize("generated, label", [
    ("World", "World"),
    ("world", "World"),                               # case
    ("  Science  or\tTechnology \n", "Science or Technology"),  # whitespace runs, ends
    ("Science or Technology.", "Science or Technology"),         # punctuation
    ("very negative!", "very negative"),
    ("\"True\"", "True"),
])
def test_generated_label_matches_after_normalisation(generated, label):
    assert exact_match_normalized(generated, label) == 1.0


@pytest.mark.parametrize("generated, label", [
    ("negative", "very negative"),       # a label inside another is not a match
    ("very negative", "negative"),
    ("Sports World", "Sports"),          # extra words
    ("", "World"),                        # nothing generated
    ("ScienceorTechnology", "Science or Technology"),  # words run together
    ("contradiction.\nAnswer: neutral", "contradiction"),  # rambling on after the label
])
def test_other_generations_do_not_match(generated, label):
    assert exact_match_normalized(generated, label) == 0.0


def test_normalisation_keeps_every_tasks_labels_apart(cl_benchmark_dir):
    """No two labels of a task normalise to the same string (else a wrong label would
    score); every label stays non-empty."""
    for name, (task_type, dataset) in OLORA_DATASETS.items():
        path = cl_benchmark_dir / task_type / dataset / "labels.json"
        if not path.is_file():
            continue
        normalised = [normalize_answer(label) for label in read_labels(path)]
        assert all(normalised) and len(set(normalised)) == len(normalised), (name, normalised)
    assert normalize_answer(" Science or\nTechnology. ") == "science or technology"


def test_task_score_is_the_mean_over_items_empty_generations_included():
    value, per_item = score("exact_match_normalized", ["world.", "", "Sports"], ["World", "Sports", "Business"])
    assert per_item == [1.0, 0.0, 0.0] and value == pytest.approx(1 / 3)
