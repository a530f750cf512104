"""The text tokenizer: the base LLM's (`from_pretrained`) or, offline, a byte-level BPE trained
with Hugging Face `tokenizers` on the prepared texts and saved in HF format, so the unified
model extends exactly that vocabulary."""

from __future__ import annotations

import os
from typing import Iterable

from tessera.tokenize.tokenizer import file_hash

SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"]


def train_text_tokenizer(texts: Iterable[str], vocab_size: int, directory: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>",
                                   unk_token="<|unk|>")
    os.makedirs(directory, exist_ok=True)
    fast.save_pretrained(directory)
    return fast


def segment_text(text: str) -> str:
    """The canonical, word-initial form of a text segment (see `encode_segments`)."""
    return " " + text.lstrip()


def encode_segments(tokenizer, texts: list[str]) -> list[list[int]]:
    """Text positions -> token ids, each segment in its word-initial form (a leading space).

    A sample's texts are separate segments (a caption, a question, a one-word answer). Encoded
    bare, an answer `red` and the `red` inside a caption (` red`) would be different tokens, so
    captions could not teach answers. Every segment is encoded as `" " + text.lstrip()`: one
    canonical form for the same word everywhere, in training (`tokenize`) and in prompts (`eval`)."""
    if not texts:
        return []
    return tokenizer([segment_text(t) for t in texts], add_special_tokens=False)["input_ids"]


def load_text_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def text_tokenizer_identity(path: str) -> dict:
    """Path + hash of tokenizer.json (a hub id without local files is identified by name)."""
    f = os.path.join(path, "tokenizer.json")
    return {"path": os.path.abspath(path) if os.path.exists(path) else path, "hash": file_hash(f) if os.path.exists(f) else path}
