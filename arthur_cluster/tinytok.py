"""A small byte-level BPE tokenizer trained offline with `tokenizers`, for miniature models.

Deterministic: the same corpus and vocabulary size give the same tokenizer.json every time.
The chat template follows the ChatML shape and honours `enable_thinking`, like Nemotron's.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

SPECIAL = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '<think></think>' }}"
    "{% else %}{{ '<think>\n' }}{% endif %}{% endif %}"
)

_CORPUS = """\
The cluster runs the model across several machines. Each node holds part of the weights.
A pipeline splits the layers into stages; tensor parallel splits every layer across the nodes.
Long documents need a long context: the attention layers keep a key and value cache, while the
Mamba layers keep a fixed-size state that does not grow with the number of tokens.
What is two plus two? Two plus two is four. The answer is four.
Summarize the document. The document describes a system, its parts, and how they work together.
# Heading
A paragraph of plain text, with numbers 0 1 2 3 4 5 6 7 8 9 and punctuation: , . ; : ! ? ( ) [ ] { }.
def function(argument): return argument + 1
Models downloaded by LM Studio live in a folder; the linker makes them visible to other tools.
"""


@functools.lru_cache(maxsize=4)
def tokenizer_json(vocab_size: int = 512) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tok.to_str()


def write(folder: Path, vocab_size: int = 512) -> None:
    """tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json."""
    folder = Path(folder)
    (folder / "tokenizer.json").write_text(tokenizer_json(vocab_size), encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "<|im_end|>",
        "pad_token": "<pad>",
        "model_max_length": 1_000_000,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    special = {"bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": "<pad>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
