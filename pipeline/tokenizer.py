"""An offline CLIP tokenizer with OpenAI CLIP's real vocabulary (no downloads).

The BPE file ships inside the open_clip_torch wheel (installed with --no-deps); it is
read without importing open_clip. Without that wheel a byte-level fallback keeps working.
"""

from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Any

TEXT_MAX_LENGTH = 77  # CLIP's context length


@lru_cache(maxsize=1)
def clip_tokenizer() -> Any:
    """A CLIP BPE tokenizer built offline.

    The real OpenAI CLIP vocabulary (49,408 tokens) ships in the open_clip_torch wheel;
    it is read without importing open_clip. Without that wheel, a byte-level fallback
    (one token per character) keeps everything working with different token ids."""
    from transformers import CLIPTokenizer

    vocab_tokens, merges = _clip_bpe()
    vocab = {token: i for i, token in enumerate(vocab_tokens)}
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=TEXT_MAX_LENGTH,
    )


def _clip_bpe() -> tuple[list[str], list[tuple[str, str]]]:
    byte_chars = list(_bytes_to_unicode().values())
    merges: list[tuple[str, str]] = []
    spec = importlib.util.find_spec("open_clip")
    bpe = None
    if spec is not None and spec.submodule_search_locations:
        candidate = (
            Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
        )
        bpe = candidate if candidate.is_file() else None
    if bpe is not None:
        lines = gzip.open(bpe, "rt", encoding="utf-8").read().split("\n")
        # Same slice as OpenAI's CLIP: 49152 - 256 - 2 merges after the header line.
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return vocab, merges


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode characters."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))
