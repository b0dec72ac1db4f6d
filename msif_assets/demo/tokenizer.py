"""A word-level tokenizer for the demo world: one token per word or punctuation mark.

Words keep their leading space as a ``▁`` marker (Metaspace), so ``decode(encode(text))``
restores ``text`` exactly, and ``encode(prompt) + encode(completion)`` equals
``encode(prompt + completion)`` for completions that start with a space. Every name part and
answer word is a single token. ``<bos>`` is prepended by the post-processor; ``<eos>`` is not
appended (training code appends it).
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from msif_assets.lake.atomic import atomic_directory
from msif_assets.demo.world import World

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS)
SPACE = "\u2581"  # the Metaspace marker; alone it encodes an extra space in a whitespace run


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=True),
        pre_tokenizers.Punctuation(),
    ])


def world_texts(world: World) -> Iterable[str]:
    """Every text the world's models will see: corpus, fine-tuning pairs, queries."""
    for d in world.documents:
        yield d.text
    for q in (*world.finetune, *world.queries):
        yield q.prompt
        yield q.completion


def build_tokenizer(texts: Iterable[str], model_max_length: int = 128) -> PreTrainedTokenizerFast:
    """A ``PreTrainedTokenizerFast`` whose vocabulary is every pre-token of ``texts``.

    Ids: 0 ``<pad>``, 1 ``<unk>``, 2 ``<bos>``, 3 ``<eos>``, 4 ``▁``, then tokens by descending
    frequency (ties alphabetical), so the same texts always give the same ids.
    """
    pre = _pre_tokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(tok for tok, _ in pre.pre_tokenize_str(text))
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, SPACE))}
    for tok, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        vocab.setdefault(tok, len(vocab))

    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=model_max_length,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def save_world_tokenizer(world: World, directory: str | os.PathLike, model_max_length: int = 128) -> Path:
    """Build the tokenizer for ``world`` and save it atomically as a Hugging Face directory."""
    tokenizer = build_tokenizer(world_texts(world), model_max_length)
    with atomic_directory(directory) as tmp:
        tokenizer.save_pretrained(tmp)
    return Path(directory)
