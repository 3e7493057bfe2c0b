"""Offline tokenizers (no downloads): CLIP with OpenAI CLIP's real vocabulary, and a
T5-shaped one for the transformer presets.

The BPE file ships inside the open_clip_torch wheel (installed with --no-deps); it is
read without importing open_clip. Without that wheel a byte-level fallback keeps working.
No installed package ships T5's SentencePiece vocabulary, so `t5_tokenizer` builds a
Unigram vocabulary of T5's shape (32,100 pieces, pad 0 / eos 1 / unk 2, `<extra_id_*>`)
from those same CLIP merges: right for seeded random weights, but its ids are not T5's;
a real model folder brings its own tokenizer (`tokenizer_2/` or `tokenizer_3/`).
"""

from __future__ import annotations

import gzip
import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Any

TEXT_MAX_LENGTH = 77  # CLIP's context length
T5_VOCAB_PIECES = 32000  # T5's SentencePiece vocabulary size, before the 100 sentinel tokens


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


@lru_cache(maxsize=4)
def t5_tokenizer(model_max_length: int = 512) -> Any:
    """A T5-shaped Unigram tokenizer built offline (about 1 s, deterministic): the special
    pieces, printable ASCII, then CLIP's BPE merges as word pieces in merge order (earlier
    merges score higher), cut to T5's 32,000 pieces plus its 100 sentinels."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    seen = {piece for piece, _ in pieces}
    ascii_chars = [chr(c) for c in range(33, 127)]
    candidates = ["\u2581" + c for c in ascii_chars] + ascii_chars
    _, merges = _clip_bpe()
    for left, right in merges:
        word = left + right
        candidates.append("\u2581" + word[:-4] if word.endswith("</w>") else word)
    for i, piece in enumerate(candidates):
        if len(pieces) == T5_VOCAB_PIECES:
            break
        if piece not in seen and "</w>" not in piece:
            seen.add(piece)
            pieces.append((piece, -3.0 - i * 1e-4))
    pieces += [(f"<extra_id_{i}>", 0.0) for i in range(99, -1, -1)]
    return T5Tokenizer(vocab=pieces, extra_ids=100, model_max_length=model_max_length)


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
