"""Soft prompts as a model feature (cl_runner/models/prompts.py): where the virtual tokens
go, the attention mask and labels around them, the frozen backbone, the initial vectors,
and generation with the KV cache against step-by-step decoding without it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from cl_runner.errors import ConfigError
from cl_runner.models.prompts import (
    IGNORE,
    PromptedModel,
    check_positions,
    initial_prompt,
    insert,
)

pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder(nn.Module):
    """A backbone that records what it is called with."""

    def __init__(self, vocab=10, width=3, head=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.body = nn.Linear(width, width)
        if head:
            self.classifier = nn.Linear(width, 2)
        self.seen = None

    def get_input_embeddings(self):
        return self.embed

    def forward(self, **kwargs):
        self.seen = kwargs
        return kwargs


class FixedPrompt(nn.Module):
    """Two virtual tokens of known values; records the query mask it gets."""

    def __init__(self, width=3):
        super().__init__()
        self.prompt = nn.Parameter(torch.full((2, width), 7.0))
        self.query_mask = None

    def forward(self, inputs_embeds, query_mask):
        self.query_mask = query_mask
        return self.prompt.unsqueeze(0).expand(inputs_embeds.shape[0], -1, -1)


def test_insert_puts_the_block_before_the_position():
    rows = torch.tensor([[1, 2, 3]])
    block = torch.tensor([[8, 9]])
    assert insert(rows, block, 0).tolist() == [[8, 9, 1, 2, 3]]
    assert insert(rows, block, 1).tolist() == [[1, 8, 9, 2, 3]]


def test_causal_prompt_goes_first_with_mask_ones_and_ignored_labels():
    backbone, source = Recorder(), FixedPrompt()
    model = PromptedModel(backbone, source, "causal")
    ids = torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    labels = torch.tensor([[IGNORE, 2, 3, IGNORE], [IGNORE, IGNORE, 6, 7]])
    seen = model(input_ids=ids, attention_mask=mask, labels=labels)
    embeds = seen["inputs_embeds"]
    assert embeds.shape == (2, 6, 3)
    assert torch.equal(embeds[:, :2], torch.full((2, 2, 3), 7.0))  # the virtual tokens first
    assert torch.equal(embeds[:, 2:], backbone.embed(ids))  # then the input, its own embeddings
    assert seen["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert seen["labels"].tolist() == [[IGNORE, IGNORE, IGNORE, 2, 3, IGNORE], [IGNORE, IGNORE, IGNORE, IGNORE, 6, 7]]
    # The query reads the input's own tokens: no pads, no answer tokens (labels set).
    assert source.query_mask.tolist() == [[True, False, False, False], [True, True, False, False]]


def test_seq2seq_labels_are_the_decoders_and_stay_as_they_are():
    backbone = Recorder()
    model = PromptedModel(backbone, FixedPrompt(), "seq2seq")
    labels = torch.tensor([[3, 4, IGNORE]])
    seen = model(input_ids=torch.tensor([[1, 2]]), attention_mask=torch.tensor([[1, 1]]), labels=labels)
    assert seen["labels"] is labels and seen["inputs_embeds"].shape == (1, 4, 3)


def test_classifier_prompt_goes_after_cls_and_token_types_grow():
    backbone = Recorder(head=True)
    model = PromptedModel(backbone, FixedPrompt(), "classifier")
    ids, mask = torch.tensor([[1, 2, 3]]), torch.tensor([[1, 1, 1]])
    seen = model(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids), labels=torch.tensor([1]))
    embeds = seen["inputs_embeds"]
    assert torch.equal(embeds[0, 0], backbone.embed.weight[1])  # [CLS] stays first: the pooler reads it
    assert torch.equal(embeds[0, 1:3], torch.full((2, 3), 7.0))
    assert torch.equal(embeds[0, 3:], backbone.embed(torch.tensor([2, 3])))
    assert seen["attention_mask"].tolist() == [[1, 1, 1, 1, 1]]
    assert seen["token_type_ids"].tolist() == [[0, 0, 0, 0, 0]]
    assert seen["labels"].tolist() == [1]


def test_backbone_is_frozen_but_a_classifiers_head():
    lm = PromptedModel(Recorder(), FixedPrompt(), "causal")
    assert {n for n, p in lm.named_parameters() if p.requires_grad} == {"source.prompt"}
    clf = PromptedModel(Recorder(head=True), FixedPrompt(), "classifier")
    assert {n for n, p in clf.named_parameters() if p.requires_grad} == \
        {"source.prompt", "backbone.classifier.weight", "backbone.classifier.bias"}


def test_initial_prompt_from_vocabulary_rows_or_text():
    table = torch.arange(12, dtype=torch.float32).reshape(6, 2)
    drawn = initial_prompt(table, 4, "vocab", generator=torch.Generator().manual_seed(0))
    assert drawn.shape == (4, 2)
    assert all(any(torch.equal(row, t) for t in table) for row in drawn)  # each a vocabulary row
    text = initial_prompt(table, 5, "text", text_ids=[1, 4])
    assert text.tolist() == [[2, 3], [8, 9], [2, 3], [8, 9], [2, 3]]  # the text's rows, repeated
    with pytest.raises(ConfigError, match="model.prompt.text"):
        initial_prompt(table, 2, "text", text_ids=[])


def test_inputs_and_virtual_tokens_must_fit_the_positions():
    check_positions({"max_position_embeddings": 32}, 24, 8)
    with pytest.raises(ConfigError, match=r"model.max_length.*<=23"):
        check_positions({"max_position_embeddings": 32}, 24, 9)
    check_positions({}, 10_000, 50)  # T5: relative positions, no limit


def tiny_prompted_llama(length=3):
    from omegaconf import OmegaConf

    from cl_runner.config.schema import ModelConfig
    from cl_runner.models.build import build_model

    torch.manual_seed(0)
    cfg = OmegaConf.structured(ModelConfig(name="tiny_llama", architecture="llama", tokenizer="byte", max_length=24,
                                           architecture_config=dict(hidden_size=16, intermediate_size=32,
                                                                    num_hidden_layers=2, num_attention_heads=2,
                                                                    num_key_value_heads=2, max_position_embeddings=32)))
    cfg.prompt.length = length
    return build_model(cfg).model


def test_build_model_wraps_with_one_prompt_and_too_long_inputs_are_refused():
    model = tiny_prompted_llama()
    assert isinstance(model, PromptedModel) and model.source.prompt.shape == (3, 16)
    vocab = model.backbone.get_input_embeddings().weight
    assert all(any(torch.equal(row, v) for v in vocab) for row in model.source.prompt)  # TRACE's init
    with pytest.raises(ConfigError, match="model.max_length"):
        tiny_prompted_llama(length=9)  # 24 + 9 > 32 positions


def test_generation_with_the_kv_cache_matches_step_by_step_decoding_with_prompts():
    model = tiny_prompted_llama()
    model.eval()
    with torch.no_grad():
        model.source.prompt.normal_(0, 1.0)  # a prompt that matters
    rows = [[5, 9, 13, 40], [7, 3]]
    pad = 0
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])  # left-padded, as evaluation does
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                         pad_token_id=pad, eos_token_id=None)
    assert torch.equal(out[:, :width], ids)  # input first, as a plain model's generate
    for i, row in enumerate(rows):
        seq = list(row)
        with torch.no_grad():
            for _ in range(4):  # no cache, no padding: the whole sequence every step
                logits = model(input_ids=torch.tensor([seq])).logits
                seq.append(int(logits[0, -1].argmax()))
        assert out[i, width:].tolist() == seq[len(row):], i
