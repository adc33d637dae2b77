"""The toy world's word-level tokenizer (built with the ``tokenizers`` library, no download).

Words are split on whitespace, digits one by one (``"12"`` -> ``1 2``); encoding adds a
leading ``<bos>``; decoding joins words with spaces. Saved as an ordinary HF tokenizer
directory that ``AutoTokenizer.from_pretrained(dir)`` loads offline.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from probe.toy.task import BOS_ID, SPECIAL_TOKENS, TOKEN_ID


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The toy tokenizer: ids as in :data:`probe.toy.task.VOCAB`, pad/bos/eos/unk set."""
    core = Tokenizer(models.WordLevel(vocab=dict(TOKEN_ID), unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.Punctuation()]
    )
    core.add_special_tokens(list(SPECIAL_TOKENS))
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        model_max_length=64,
    )


def save_tokenizer(directory: str | Path) -> Path:
    """Write the toy tokenizer into ``directory`` (created if needed); returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save_pretrained(str(directory))
    return directory
