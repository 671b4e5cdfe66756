"""Stream loaders: record files, TRACE, O-LoRA and custom streams (fixtures + real data)."""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import pytest

from cl_runner.streams.custom import ALLOWED_KEYS, load_custom
from cl_runner.streams.olora import (
    OLORA_DATASETS,
    OLORA_ORDERS,
    available_olora_datasets,
    format_olora_prompt,
    load_olora,
)
from cl_runner.streams.records import RecordError, read_records, require_fields, resolve_child, subsample
from cl_runner.streams.trace import TRACE_ORDERS, TRACE_TASKS, load_trace, load_trace_replay_source

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TRACE_MINI = FIXTURES / "trace_mini"
OLORA_MINI = FIXTURES / "olora_mini"
CUSTOM = FIXTURES / "custom"
REAL_OLORA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cl_benchmark"


def write_json(path: Path, value) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value), encoding="utf-8")
    return path


def copy_tree(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------- records


def test_read_records_json_list_and_jsonl(tmp_path):
    assert read_records(write_json(tmp_path / "a.json", [{"x": "1"}, {"x": "2"}])) == [{"x": "1"}, {"x": "2"}]
    # Blank lines in JSON Lines are skipped.
    assert len(read_records(CUSTOM / "qa_train.jsonl")) == 4


def test_read_records_malformed_jsonl_names_file_and_line():
    with pytest.raises(RecordError) as err:
        read_records(CUSTOM / "malformed.jsonl")
    assert "malformed.jsonl" in str(err.value) and "line 3" in str(err.value)


def test_read_records_malformed_json_list_names_position(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n {"prompt": "a", "answer": "b"},\n {"prompt": "c" "answer": "d"}\n]\n')
    with pytest.raises(RecordError, match=r"broken\.json.*line 3, column"):
        read_records(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "empty"), ("  \n", "empty"), ('{\n "prompt": "a"\n}\n', "JSON list"), ("hello\n", "line 1")],
)
def test_read_records_rejects_files_that_are_neither(tmp_path, text, message):
    path = tmp_path / "f.json"
    path.write_text(text)
    with pytest.raises(RecordError, match=message) as err:
        read_records(path)
    assert "f.json" in str(err.value)


def test_read_records_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        read_records(tmp_path / "nope.json")


def test_require_fields_reports_file_index_and_field():
    records = [{"prompt": "p", "answer": "a"}, {"prompt": "p"}]
    with pytest.raises(RecordError, match=r"f\.json: record 1: field 'answer' is missing"):
        require_fields(records, ["prompt", "answer"], "f.json")
    with pytest.raises(RecordError, match=r"record 0 is a list"):
        require_fields([["p", "a"]], ["prompt", "answer"], "f.json")
    with pytest.raises(RecordError, match=r"record 0: field 'answer' must be a string, got int"):
        require_fields([{"prompt": "p", "answer": 3}], ["prompt", "answer"], "f.json")
    with pytest.raises(RecordError, match=r"record 0: field 'answer' is empty"):
        require_fields([{"prompt": "p", "answer": " "}], ["prompt", "answer"], "f.json")
    require_fields([{"prompt": "p", "answer": ""}], ["prompt", "answer"], "f.json", allow_empty=("answer",))
    with pytest.raises(RecordError, match=r"record 17: field 'answer' is missing"):
        require_fields([{"prompt": "p"}], ["prompt", "answer"], "f.json", indices=[17])


def test_subsample_is_seeded_and_keeps_order_when_not_capping():
    items = list(range(50))
    assert subsample(items, None, 0) == items
    assert subsample(items, 50, 3) == items
    assert subsample(items, 80, 3) == items
    first = subsample(items, 10, seed=1)
    assert first == subsample(items, 10, seed=1)
    assert first != subsample(items, 10, seed=2)
    assert len(set(first)) == 10 and first != items[:10]
    # The first n of a larger sample: growing the cap only adds records.
    assert subsample(items, 20, seed=1)[:10] == first
    assert subsample(items, 0, 0) == []
    with pytest.raises(ValueError, match="n must be"):
        subsample(items, -1, 0)


def test_resolve_child_ignores_case(tmp_path):
    (tmp_path / "IMDB").mkdir()
    assert resolve_child(tmp_path, "imdb") == tmp_path / "IMDB"
    assert resolve_child(tmp_path, "yelp") is None


# --------------------------------------------------------------------------- TRACE


def test_trace_orders_match_the_spec():
    assert TRACE_ORDERS["default"] == [
        "C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten",
    ]
    assert TRACE_ORDERS["reverse"] == [
        "NumGLUE-cm", "NumGLUE-ds", "FOMC", "20Minuten", "C-STANCE", "Py150", "MeetingBank", "ScienceQA",
    ]
    assert {name: spec.scorer for name, spec in TRACE_TASKS.items()} == {
        "C-STANCE": "exact_match",
        "FOMC": "exact_match",
        "MeetingBank": "rouge_l",
        "Py150": "edit_similarity",
        "ScienceQA": "first_char",
        "NumGLUE-cm": "exact_match",
        "NumGLUE-ds": "exact_match",
        "20Minuten": "sari",
    }


@pytest.mark.parametrize("order", ["default", "reverse"])
def test_load_trace_both_orders(order):
    tasks = load_trace(TRACE_MINI, order)
    assert [t.name for t in tasks] == TRACE_ORDERS[order]
    for task in tasks:
        assert task.scorer == TRACE_TASKS[task.name].scorer
        assert task.max_new_tokens == TRACE_TASKS[task.name].max_new_tokens
        assert task.labels is None
        assert len(task.train) == 4 and len(task.test) == 3
        assert all(ex.task == task.name and ex.prompt and ex.answer for ex in task.train + task.test)


def test_load_trace_keeps_records_verbatim():
    by_name = {t.name: t for t in load_trace(TRACE_MINI)}
    raw = json.loads((TRACE_MINI / "Py150" / "train.json").read_text())
    assert [(e.prompt, e.answer) for e in by_name["Py150"].train] == [(r["prompt"], r["answer"]) for r in raw]
    assert any("<STR_LIT>" in e.prompt for e in by_name["Py150"].train)
    assert all(e.answer[0] in "ABC" and e.answer[1] == "\n" for e in by_name["ScienceQA"].test)


def test_load_trace_eval_split_and_custom_order():
    tasks = load_trace(TRACE_MINI, ["fomc", "Py150"], test_split="eval")
    assert [t.name for t in tasks] == ["FOMC", "Py150"]
    raw = json.loads((TRACE_MINI / "FOMC" / "eval.json").read_text())
    assert [e.prompt for e in tasks[0].test] == [r["prompt"] for r in raw]
    with pytest.raises(ValueError, match="test_split"):
        load_trace(TRACE_MINI, test_split="dev")


def test_load_trace_caps_deterministically():
    a = load_trace(TRACE_MINI, max_train=2, max_test=1, seed=7)
    b = load_trace(TRACE_MINI, max_train=2, max_test=1, seed=7)
    assert all(len(t.train) == 2 and len(t.test) == 1 for t in a)
    assert [t.train + t.test for t in a] == [t.train + t.test for t in b]
    full = {t.name: set(t.train) for t in load_trace(TRACE_MINI)}
    assert all(set(t.train) <= full[t.name] for t in a)
    seeds = {tuple(load_trace(TRACE_MINI, ["Py150"], max_train=2, seed=s)[0].train) for s in range(6)}
    assert len(seeds) > 1


def test_load_trace_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match="known tasks: C-STANCE, FOMC") as err:
        load_trace(TRACE_MINI, ["FOMC", "GSM8K"])
    assert "GSM8K" in str(err.value)
    with pytest.raises(ValueError, match="known orders: default, reverse"):
        load_trace(TRACE_MINI, "backwards")


def test_load_trace_missing_data_dir_names_the_config_key(tmp_path):
    missing = tmp_path / "LLM-CL-Benchmark_500"
    with pytest.raises(FileNotFoundError) as err:
        load_trace(missing)
    message = str(err.value)
    assert "task_stream.data_dir" in message and str(missing) in message
    assert "train.json" in message and "C-STANCE" in message
    with pytest.raises(FileNotFoundError, match="task_stream.data_dir is not set"):
        load_trace(None)


def test_load_trace_points_at_a_nested_root(tmp_path):
    copy_tree(TRACE_MINI, tmp_path)
    with pytest.raises(FileNotFoundError, match="did you mean task_stream.data_dir=.*trace_mini"):
        load_trace(tmp_path)


def test_load_trace_missing_task_folder_and_split(tmp_path):
    root = copy_tree(TRACE_MINI, tmp_path)
    (root / "ScienceQA" / "eval.json").unlink()
    load_trace(root)  # eval is only read when it is the test split
    with pytest.raises(FileNotFoundError, match=r"'ScienceQA'.*eval\.json"):
        load_trace(root, test_split="eval")
    shutil.rmtree(root / "MeetingBank")
    with pytest.raises(FileNotFoundError) as err:
        load_trace(root)
    assert "'MeetingBank'" in str(err.value) and str(root / "MeetingBank") in str(err.value)


def test_load_trace_malformed_record_names_file_index_field(tmp_path):
    root = copy_tree(TRACE_MINI, tmp_path)
    path = root / "FOMC" / "train.json"
    records = json.loads(path.read_text())
    del records[2]["answer"]
    write_json(path, records)
    with pytest.raises(RecordError) as err:
        load_trace(root)
    assert str(path) in str(err.value) and "record 2" in str(err.value) and "'answer'" in str(err.value)


def test_load_trace_empty_answer_is_an_error_outside_lima(tmp_path):
    root = copy_tree(TRACE_MINI, tmp_path)
    write_json(root / "NumGLUE-cm" / "test.json", [{"prompt": "1 + 1 = ", "answer": ""}])
    with pytest.raises(RecordError, match=r"test\.json: record 0: field 'answer' is empty"):
        load_trace(root)


def test_empty_test_split_raises(tmp_path):
    root = copy_tree(TRACE_MINI, tmp_path)
    write_json(root / "FOMC" / "test.json", [])
    with pytest.raises(ValueError, match=r"FOMC.test\.json: holds no records"):
        load_trace(root)
    # A cap of 0 gives an empty split, which Task itself refuses.
    with pytest.raises(ValueError, match="test split is empty"):
        load_trace(TRACE_MINI, ["Py150"], max_test=0)
    assert load_trace(TRACE_MINI, ["Py150"], max_train=0)[0].train == []


def test_trace_replay_source_allows_empty_answers(tmp_path):
    examples = load_trace_replay_source(TRACE_MINI, max_examples=None, seed=0)
    assert len(examples) == 5 and all(e.task == "Lima" for e in examples)
    assert any(e.answer == "" for e in examples)
    capped = load_trace_replay_source(TRACE_MINI, max_examples=2, seed=3)
    assert capped == load_trace_replay_source(TRACE_MINI, max_examples=2, seed=3) and len(capped) == 2
    root = copy_tree(TRACE_MINI, tmp_path)
    shutil.rmtree(root / "Lima")
    with pytest.raises(FileNotFoundError, match="Lima"):
        load_trace_replay_source(root, 10, 0)


# --------------------------------------------------------------------------- O-LoRA


def test_olora_orders_match_the_spec():
    assert OLORA_ORDERS["order1"] == ["dbpedia", "amazon", "yahoo", "agnews"]
    assert OLORA_ORDERS["order2"] == ["dbpedia", "amazon", "agnews", "yahoo"]
    assert OLORA_ORDERS["order3"] == ["yahoo", "amazon", "agnews", "dbpedia"]
    assert OLORA_ORDERS["order4"] == "mnli cb wic copa qqp boolqa rte imdb yelp amazon sst-2 dbpedia agnews multirc yahoo".split()
    assert OLORA_ORDERS["order5"] == "multirc boolqa wic mnli cb copa qqp rte imdb sst-2 dbpedia agnews yelp amazon yahoo".split()
    assert OLORA_ORDERS["order6"] == "yelp amazon mnli cb copa qqp rte imdb sst-2 dbpedia agnews yahoo multirc boolqa wic".split()
    for order in OLORA_ORDERS.values():
        assert set(order) <= set(OLORA_DATASETS)
    assert len(set(OLORA_ORDERS["order4"])) == 15


def test_format_olora_prompt_nli_exact():
    prompt = format_olora_prompt(
        "NLI", "MNLI", ["neutral", "entailment", "contradiction"],
        "sentence 1: The museum is open every day except Monday.\nsentence 2: You can visit the museum on a Tuesday.",
    )
    assert prompt == (
        "Task:NLI\n"
        "Dataset:MNLI\n"
        'What is the logical relationship between the "sentence 1" and the "sentence 2"? Choose one from the option.\n'
        "Option: neutral, entailment, contradiction \n"
        "sentence 1: The museum is open every day except Monday.\n"
        "sentence 2: You can visit the museum on a Tuesday.\n"
        "Answer:"
    )


def test_format_olora_prompt_copa_exact():
    sentence = (
        'Which sentence is the effect of "The girl dropped the glass."? Choose one between A and B.\n'
        "A: The glass shattered.\nB: The glass was full."
    )
    assert format_olora_prompt("COPA", "COPA", ["A", "B"], sentence) == (
        "Task:COPA\n"
        "Dataset:COPA\n"
        'Which sentence is the effect of "The girl dropped the glass."? Choose one between A and B.\n'
        "A: The glass shattered.\n"
        "B: The glass was full.\n"
        "Answer:"
    )
    with pytest.raises(ValueError, match="known types"):
        format_olora_prompt("NER", "x", [], "s")


def test_load_olora_standard_order1():
    tasks = load_olora(OLORA_MINI, "order1")
    assert [t.name for t in tasks] == ["dbpedia", "amazon", "yahoo", "agnews"]
    for task in tasks:
        labels = json.loads((OLORA_MINI / "/".join(OLORA_DATASETS[task.name]) / "labels.json").read_text())
        assert task.labels == labels
        assert task.scorer == "exact_match_normalized" and task.max_new_tokens == 50
        assert len(task.train) == 5 and len(task.test) == 4
        for ex in task.train + task.test:
            assert ex.answer in labels and ex.task == task.name
            assert ex.prompt.startswith(f"Task:TC\nDataset:{task.name}\n" if task.name != "amazon" else "Task:SC\nDataset:amazon\n")
            assert f"Option: {', '.join(labels)} \n" in ex.prompt and ex.prompt.endswith("\nAnswer:")


def test_load_olora_prompt_from_a_record_and_bare_sentences():
    raw = json.loads((OLORA_MINI / "NLI" / "MNLI" / "train.json").read_text())
    labels = json.loads((OLORA_MINI / "NLI" / "MNLI" / "labels.json").read_text())
    (mnli, copa) = load_olora(OLORA_MINI, ["MNLI", "copa"])
    assert mnli.train[0].prompt == format_olora_prompt("NLI", "MNLI", labels, raw[0]["sentence"])
    assert mnli.train[0].answer == raw[0]["label"]
    assert copa.train[0].prompt.startswith("Task:COPA\nDataset:COPA\nWhich sentence")
    (bare,) = load_olora(OLORA_MINI, ["mnli"], template=False)
    assert [e.prompt for e in bare.train] == [r["sentence"] for r in raw]


def test_load_olora_caps_deterministically():
    a = load_olora(OLORA_MINI, ["sst-2", "qqp"], max_train=3, max_test=2, seed=5)
    assert a == load_olora(OLORA_MINI, ["sst-2", "qqp"], max_train=3, max_test=2, seed=5)
    assert all(len(t.train) == 3 and len(t.test) == 2 for t in a)


def test_load_olora_unknown_order_or_dataset():
    with pytest.raises(ValueError, match="known orders: order1"):
        load_olora(OLORA_MINI, "order7")
    with pytest.raises(ValueError, match="known datasets: dbpedia, amazon") as err:
        load_olora(OLORA_MINI, ["mnli", "snli"])
    assert "'snli'" in str(err.value)
    with pytest.raises(ValueError, match="twice"):
        load_olora(OLORA_MINI, ["mnli", "MNLI"])


def test_load_olora_missing_data_dir_and_dataset(tmp_path):
    with pytest.raises(FileNotFoundError, match="task_stream.data_dir") as err:
        load_olora(tmp_path / "CL_Benchmark", "order1")
    assert str(tmp_path / "CL_Benchmark") in str(err.value) and "labels.json" in str(err.value)
    # The mini set has no yelp: the message names the folder and what is there.
    with pytest.raises(FileNotFoundError) as err:
        load_olora(OLORA_MINI, "order6")
    assert "'yelp'" in str(err.value) and str(OLORA_MINI / "SC" / "yelp") in str(err.value)
    assert "agnews" in str(err.value)


def test_load_olora_folder_names_are_case_tolerant(tmp_path):
    root = copy_tree(OLORA_MINI, tmp_path)
    (root / "TC" / "agnews").rename(root / "TC" / "AGNews")
    (root / "NLI").rename(root / "nli")
    agnews, mnli = load_olora(root, ["agnews", "mnli"])
    # The prompt keeps the released dataset name, whatever the folder's spelling.
    assert agnews.train[0].prompt.startswith("Task:TC\nDataset:agnews\n")
    assert mnli.train[0].prompt.startswith("Task:NLI\nDataset:MNLI\n")


def test_load_olora_label_outside_labels_json(tmp_path, caplog):
    root = copy_tree(OLORA_MINI, tmp_path)
    path = root / "NLI" / "MNLI" / "test.json"
    records = json.loads(path.read_text())
    records[1]["label"] = "-"
    write_json(path, records)
    with pytest.raises(RecordError) as err:
        load_olora(root, ["mnli"])
    message = str(err.value)
    assert str(path) in message and "record 1" in message and "'label'" in message and "'-'" in message
    assert "['neutral', 'entailment', 'contradiction']" in message
    with caplog.at_level(logging.WARNING):
        (task,) = load_olora(root, ["mnli"], unknown_labels="drop")
    assert len(task.test) == 3 and "left out 1 of 4" in caplog.text
    with pytest.raises(ValueError, match="unknown_labels"):
        load_olora(root, ["mnli"], unknown_labels="keep")


def test_load_olora_malformed_record_and_labels(tmp_path):
    root = copy_tree(OLORA_MINI, tmp_path)
    path = root / "QQP" / "QQP" / "train.json"
    records = json.loads(path.read_text())
    records[3]["label"] = True
    write_json(path, records)
    with pytest.raises(RecordError, match=r"train\.json: record 3: field 'label' must be a string, got bool"):
        load_olora(root, ["qqp"])
    write_json(root / "SC" / "SST-2" / "labels.json", ["Good", "Good"])
    with pytest.raises(RecordError, match="labels repeat"):
        load_olora(root, ["sst-2"])


# --------------------------------------------------------------------------- custom


def test_custom_folder_in_trace_layout():
    (task,) = load_custom([{"name": "fomc_again", "path": str(TRACE_MINI / "FOMC")}])
    raw = json.loads((TRACE_MINI / "FOMC" / "test.json").read_text())
    assert [(e.prompt, e.answer) for e in task.test] == [(r["prompt"], r["answer"]) for r in raw]
    assert task.scorer == "exact_match" and task.labels is None and task.max_new_tokens == 32
    assert all(e.task == "fomc_again" for e in task.train)
    (on_eval,) = load_custom([{"name": "f", "path": str(TRACE_MINI / "FOMC"), "test_split": "eval"}])
    assert len(on_eval.test) == 3 and on_eval.test != task.test


def test_custom_folder_in_olora_layout():
    (task,) = load_custom([{"name": "nli", "path": str(OLORA_MINI / "NLI" / "MNLI")}])
    raw = json.loads((OLORA_MINI / "NLI" / "MNLI" / "train.json").read_text())
    assert [(e.prompt, e.answer) for e in task.train] == [(r["sentence"], r["label"]) for r in raw]
    assert task.labels == ["neutral", "entailment", "contradiction"] and task.max_new_tokens == 50
    (templated,) = load_custom([{"name": "nli", "path": str(OLORA_MINI / "NLI" / "MNLI"), "task_type": "NLI"}])
    assert templated.train[0].prompt == format_olora_prompt("NLI", "nli", task.labels, raw[0]["sentence"])


def test_custom_file_pairs_fields_scorer_and_caps():
    entries = [
        {"name": "fr", "train": str(CUSTOM / "qa_train.jsonl"), "test": str(CUSTOM / "qa_test.jsonl"),
         "scorer": "rouge_l", "max_new_tokens": 12},
        {"name": "reviews", "train": str(CUSTOM / "reviews_train.jsonl"), "test": str(CUSTOM / "reviews_test.jsonl"),
         "labels": ["negative", "positive"]},
    ]
    fr, reviews = load_custom(entries)
    assert fr.scorer == "rouge_l" and fr.max_new_tokens == 12 and len(fr.train) == 4
    assert fr.test[0].answer == "maison"
    # sentence/label records are recognised without a labels.json.
    assert reviews.test[0].prompt == "Lovely terrace with a view." and reviews.labels == ["negative", "positive"]
    capped = load_custom(entries, max_train=2, max_test=1, seed=4)
    assert capped == load_custom(entries, max_train=2, max_test=1, seed=4)
    assert [len(t.train) for t in capped] == [2, 2] and [len(t.test) for t in capped] == [1, 1]
    (swapped,) = load_custom([{"name": "swap", "train": str(CUSTOM / "reviews_train.jsonl"),
                               "test": str(CUSTOM / "reviews_test.jsonl"), "prompt_field": "label", "answer_field": "sentence"}])
    assert (swapped.train[0].prompt, swapped.train[0].answer) == ("negative", "The soup was cold and bland.")


def test_custom_entries_from_a_hydra_config():
    omegaconf = pytest.importorskip("omegaconf")
    entries = omegaconf.OmegaConf.create(
        [{"name": "r", "train": str(CUSTOM / "reviews_train.jsonl"), "test": str(CUSTOM / "reviews_test.jsonl"),
          "labels": ["negative", "positive"], "max_new_tokens": 4},
         {"name": "nli", "path": str(OLORA_MINI / "NLI" / "MNLI"), "task_type": "NLI"}]
    )
    reviews, nli = load_custom(entries)
    assert reviews.labels == ["negative", "positive"] and type(reviews.labels) is list
    assert reviews.max_new_tokens == 4 and nli.train[0].prompt.startswith("Task:NLI\nDataset:nli\n")
    assert load_olora(OLORA_MINI, omegaconf.OmegaConf.create(["mnli"]))[0].name == "mnli"
    assert load_trace(TRACE_MINI, omegaconf.OmegaConf.create(["FOMC"]))[0].name == "FOMC"


def test_custom_labels_are_checked():
    entry = {"name": "r", "train": str(CUSTOM / "reviews_train.jsonl"), "test": str(CUSTOM / "reviews_test.jsonl"),
             "labels": ["positive", "neutral"]}
    with pytest.raises(RecordError, match=r"reviews_train\.jsonl: record 0: field 'label' is 'negative'"):
        load_custom([entry])
    (task,) = load_custom([{**entry, "unknown_labels": "drop"}])
    assert {e.answer for e in task.train} == {"positive"}


def test_custom_entry_errors():
    pair = {"train": str(CUSTOM / "qa_train.jsonl"), "test": str(CUSTOM / "qa_test.jsonl")}
    with pytest.raises(ValueError, match="unknown key\\(s\\) 'prompt_column'") as err:
        load_custom([{"name": "a", **pair, "prompt_column": "q"}])
    assert all(key in str(err.value) for key in ALLOWED_KEYS)
    with pytest.raises(ValueError, match="exactly one source.*got path, train/test"):
        load_custom([{"name": "a", "path": str(TRACE_MINI / "FOMC"), **pair}])
    with pytest.raises(ValueError, match="exactly one source.*got none"):
        load_custom([{"name": "a"}])
    # null values count as absent (a typed config carries every optional key).
    (task,) = load_custom([{"name": "a", **pair, "path": None, "hf_dataset": None, "labels": None}])
    assert len(task.test) == 3
    with pytest.raises(ValueError, match="give both"):
        load_custom([{"name": "a", "train": pair["train"]}])
    with pytest.raises(ValueError, match="'name'"):
        load_custom([{"path": str(TRACE_MINI / "FOMC")}])
    with pytest.raises(ValueError, match="used twice"):
        load_custom([{"name": "a", **pair}, {"name": "a", **pair}])
    with pytest.raises(ValueError, match="max_new_tokens"):
        load_custom([{"name": "a", **pair, "max_new_tokens": 0}])
    with pytest.raises(ValueError, match="list of task entries"):
        load_custom({"name": "a", **pair})
    with pytest.raises(FileNotFoundError, match="custom task 'a'.*does not exist"):
        load_custom([{"name": "a", "path": str(CUSTOM / "no_such_folder")}])
    with pytest.raises(FileNotFoundError, match="is a file"):
        load_custom([{"name": "a", "path": pair["train"]}])


def test_custom_malformed_files():
    with pytest.raises(RecordError, match=r"malformed\.jsonl: line 3"):
        load_custom([{"name": "m", "train": str(CUSTOM / "malformed.jsonl"), "test": str(CUSTOM / "qa_test.jsonl")}])
    with pytest.raises(RecordError) as err:
        load_custom([{"name": "b", "train": str(CUSTOM / "qa_train.jsonl"), "test": str(CUSTOM / "bad_field.json")}])
    message = str(err.value)
    assert "bad_field.json" in message and "record 2" in message and "'answer'" in message and "got int" in message


def test_custom_hf_dataset_missing_from_cache_fails_fast():
    start = time.monotonic()
    with pytest.raises(FileNotFoundError) as err:
        load_custom([{"name": "h", "hf_dataset": "cl-runner-tests/not-a-dataset", "config": "x"}])
    assert time.monotonic() - start < 15
    message = str(err.value)
    assert "custom task 'h'" in message and "cl-runner-tests/not-a-dataset" in message and "not in the local" in message


def test_custom_hf_dataset_local_folder(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    entry = {"name": "qa", "hf_dataset": str(CUSTOM / "hf_local"), "prompt_field": "question", "answer_field": "reply"}
    (task,) = load_custom([entry], max_train=3)
    assert len(task.train) == 3 and len(task.test) == 3
    assert task.test[0].prompt == "What is the opposite of hot?" and task.test[0].answer == "cold"
    assert load_custom([entry], max_train=3) == [task]
    with pytest.raises(ValueError, match="test split is empty"):
        load_custom([entry], max_test=0)
    with pytest.raises(RecordError, match=r"field 'prompt' is missing"):
        load_custom([{"name": "qa", "hf_dataset": str(CUSTOM / "hf_local")}])
    with pytest.raises(ValueError, match="split 'validation'"):
        load_custom([{**entry, "test_split": "validation"}])


def test_custom_hf_class_labels_become_strings(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    folder = tmp_path / "sentiment"
    folder.mkdir()
    for split in ("train", "test"):
        data = datasets.Dataset.from_dict({"text": ["dull", "great", "fine"], "label": [0, 1, 1]}, features=features)
        data.to_parquet(str(folder / f"{split}.parquet"))
    (task,) = load_custom([{"name": "s", "hf_dataset": str(folder), "prompt_field": "text", "answer_field": "label"}])
    assert task.labels == ["neg", "pos"]
    assert [(e.prompt, e.answer) for e in task.test] == [("dull", "neg"), ("great", "pos"), ("fine", "pos")]


# --------------------------------------------------------------------------- real data


@pytest.mark.shared_data
def test_real_olora_subset():
    if not REAL_OLORA.is_dir():
        pytest.skip(f"real O-LoRA subset not found at {REAL_OLORA}")
    assert set(available_olora_datasets(REAL_OLORA)) == {
        "agnews", "amazon", "sst-2", "mnli", "cb", "rte", "qqp", "wic", "copa", "boolqa",
    }
    tasks = load_olora(REAL_OLORA, ["mnli", "agnews", "amazon", "qqp"], max_train=40, max_test=20, seed=1,
                       unknown_labels="drop")
    expected = {
        "mnli": ("NLI", "MNLI", ["neutral", "entailment", "contradiction"]),
        "agnews": ("TC", "agnews", ["World", "Sports", "Business", "Science or Technology"]),
        "amazon": ("SC", "amazon", ["very negative", "negative", "neutral", "positive", "very positive"]),
        "qqp": ("QQP", "QQP", ["False", "True"]),
    }
    for task in tasks:
        task_type, dataset, labels = expected[task.name]
        assert task.labels == labels and len(task.train) == 40 and len(task.test) == 20
        header = f"Task:{task_type}\nDataset:{dataset}\n"
        for ex in task.train + task.test:
            assert ex.answer in labels
            assert ex.prompt.startswith(header) and ex.prompt.endswith("\nAnswer:")
            assert f"Option: {', '.join(labels)} \n" in ex.prompt
    assert "sentence 1: " in tasks[0].train[0].prompt and "first sentence: " in tasks[3].train[0].prompt
    # The released MNLI test file holds GLUE's "-" (no gold label): an error unless dropped.
    with pytest.raises(RecordError, match=r"MNLI.test\.json: record \d+: field 'label' is '-'"):
        load_olora(REAL_OLORA, ["mnli"], max_train=5, max_test=5)


def test_cl_benchmark_stream_picks_the_order_by_key_not_by_its_name():
    """One stream file: task_stream.order names the benchmark order (or lists datasets);
    the display name is only a label, so renaming the stream changes nothing else."""
    from cl_runner.config.validate import validate
    from cl_runner.streams.build import build_stream, planned_task_names
    from tests.helpers import compose

    cfg = validate(compose(["task_stream=cl_benchmark", "task_stream.order=order4", "task_stream.data_dir=/data"]))
    assert planned_task_names(cfg.task_stream) == OLORA_ORDERS["order4"]
    assert planned_task_names(validate(compose(["task_stream=cl_benchmark", "task_stream.data_dir=/d"])).task_stream) \
        == ["dbpedia", "amazon", "yahoo", "agnews"]  # the file's default, order1
    cfg = validate(compose(["task_stream=cl_benchmark", "task_stream.name=renamed", "task_stream.order=[sst-2,qqp]",
                            f"task_stream.data_dir={OLORA_MINI}"]))
    stream = build_stream(cfg.task_stream, "classifier", 0)
    assert stream.name == "renamed" and stream.names == ["sst-2", "qqp"]


def test_named_order_is_refused_where_the_stream_has_none():
    from cl_runner.errors import ConfigError
    from cl_runner.config.validate import validate
    from tests.helpers import compose


    with pytest.raises(ConfigError, match="^task_stream.order: 'order1' names a benchmark order.*only trace and olora"):
        validate(compose(["task_stream.order=order1"]))
    cfg = validate(compose(["task_stream=trace", "task_stream.order=reverse", "task_stream.data_dir=/d"]))
    from cl_runner.streams.build import planned_task_names

    assert planned_task_names(cfg.task_stream)[0] == "NumGLUE-cm"
