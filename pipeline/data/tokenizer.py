"""A word-level tokenizer for the embedded default (no pretrained tokenizer exists offline).

Its vocabulary covers the vicuna_v1 template (system line, `USER`, `ASSISTANT`, `:`), the
synthetic benchmark's words (`shards.synthetic.vocabulary()`) and numbers; everything else
maps to `<unk>`. It is an ordinary `PreTrainedTokenizerFast` (offsets, `save_pretrained`,
`AutoTokenizer.from_pretrained`), so the data pipeline treats it like any HF tokenizer.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from pipeline.data.template import IMAGE_MARKER, SYSTEM_PROMPT

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3, Llama's order plus a pad
WORD_RE = re.compile(r"\w+|[^\w\s]+")  # what the Whitespace pre-tokenizer splits into


def _words(text: str) -> list[str]:
    return WORD_RE.findall(text.lower())


def build_word_tokenizer(words: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """WordLevel tokenizer, lower-cased, split on whitespace and punctuation.

    `words` are added to the vocabulary (split the same way); the synthetic benchmark's
    vocabulary and the numbers 0..100 are always included. `<image>` is an added special
    token; `tokenizer("...")` prepends `<s>` as Llama's tokenizer does.
    """
    from shards.synthetic import vocabulary  # lazy: shards imports nothing from pipeline

    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIALS)}
    texts = [SYSTEM_PROMPT, "USER: ASSISTANT:", ".,;:!?'\"()-/", *map(str, range(101))]
    for text in [*texts, *vocabulary(), *words]:
        for w in _words(text):
            vocab.setdefault(w, len(vocab))

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()  # keeps character offsets aligned
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces, no glue before punctuation
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=4096,
    )
    hf.add_special_tokens({"additional_special_tokens": [IMAGE_MARKER]})
    return hf
