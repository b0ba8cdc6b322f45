"""Tokenizers: the offline byte-level one of `tiny-random`, and the padding set-up every loaded tokenizer gets."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import ModelLoadError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

_BYTE_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<s>' + message['role'] + '\\n' + message['content'] + '</s>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's printable stand-in for each byte: what the ByteLevel pre-tokenizer emits, so token id == byte value.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars), strict=True))


def build_byte_tokenizer() -> PreTrainedTokenizerFast:
    """Offline byte-level tokenizer: ids 0-255 are the UTF-8 bytes, then `<pad>`, `<s>`, `</s>` (259 tokens).

    BPE without merges, so any text round-trips exactly; no special token is added on `encode`. Has a small
    ChatML-like chat template (`<s>role\\ncontent</s>\\n`) so the chat path can be exercised.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    vocab.update({"<pad>": 256, "<s>": 257, "</s>": 258})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # No regex split: with no merges it would only cost time, and it is what keeps whitespace lossless.
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=2048,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = _BYTE_CHAT_TEMPLATE
    return tokenizer


def prepare_tokenizer(label: str, tokenizer: Any) -> Any:
    """`tokenizer` with a pad token (eos when it has none) and right padding, as the engine's batches need."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"the tokenizer of '{label}' has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token  # labels mask padding out, so reusing eos is harmless
    tokenizer.padding_side = "right"
    return tokenizer
