"""A byte-level tokenizer for random-init models, and one face for HF tokenizers.

The loop only needs encode/decode and three special ids, so both kinds are wrapped in
`TextTokenizer`. Bytes cover any language with no vocabulary file to ship.
"""
from __future__ import annotations

from typing import Any


class ByteTokenizer:
    """ids 0..255 are UTF-8 bytes; then pad, bos, eos."""

    def __init__(self) -> None:
        self.pad_token_id = 256
        self.bos_token_id = 257
        self.eos_token_id = 258
        self.vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        data = bytes(i for i in ids if 0 <= i < 256)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """Adapter over a `transformers` tokenizer: no special tokens added by encode()."""

    def __init__(self, tok: Any) -> None:
        self.hf = tok
        if tok.pad_token_id is None:
            # Causal LMs often ship without a pad token; padding is masked out anyway.
            tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
        self.pad_token_id = tok.pad_token_id
        self.bos_token_id = tok.bos_token_id
        self.eos_token_id = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
        self.vocab_size = len(tok)

    def encode(self, text: str) -> list[int]:
        return self.hf(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(ids, skip_special_tokens=True)
