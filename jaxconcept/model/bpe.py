"""Write a small CLIP-format BPE vocabulary (vocab.json + merges.txt) for a given word list.

The tiny test model and the toy world use the real `CLIPTokenizer` class on a vocabulary we write
ourselves: base characters (each alone and word-final, "a" and "a</w>"), one merge chain per word so
that every listed word is a single token, then CLIP's two special tokens. Characters outside the base
set map to the unknown token, as in any restricted vocabulary.
"""

from __future__ import annotations

import json
import os
import string
from collections.abc import Iterable

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
BASE_CHARS = string.ascii_lowercase + string.digits + ",.!?'-"


def _pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return {(a, b) for a, b in zip(word[:-1], word[1:])}


def bpe_pieces(word: str, ranks: dict[tuple[str, str], int]) -> tuple[str, ...]:
    """CLIP's BPE on one lower-case word: merge the lowest-ranked adjacent pair until none applies."""
    pieces = tuple(word[:-1]) + (word[-1] + "</w>",)
    while len(pieces) > 1:
        pair = min(_pairs(pieces), key=lambda p: ranks.get(p, float("inf")))
        if pair not in ranks:
            break
        merged, i = [], 0
        while i < len(pieces):
            if i < len(pieces) - 1 and (pieces[i], pieces[i + 1]) == pair:
                merged.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                merged.append(pieces[i])
                i += 1
        pieces = tuple(merged)
    return pieces


def build_vocab(words: Iterable[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges in which every word of `words` is one token.

    Each new merge gets the highest rank so far, so it never changes how earlier words split: they
    still finish with lower-ranked merges before the new pair could be chosen.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in dict.fromkeys(w.strip().lower() for w in words if w.strip()):
        bad = set(word) - set(BASE_CHARS)
        if bad:
            raise ValueError(f"word {word!r} uses characters outside the base set: {sorted(bad)}")
        pieces = bpe_pieces(word, ranks)
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            pieces = bpe_pieces(word, ranks)
    vocab_list = list(BASE_CHARS) + [c + "</w>" for c in BASE_CHARS]
    vocab_list += ["".join(m) for m in merges]
    vocab_list += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    return vocab, merges


def write_vocab(folder: str, words: Iterable[str]) -> tuple[str, str]:
    """Write `vocab.json` and `merges.txt` into `folder`; returns their paths."""
    vocab, merges = build_vocab(words)
    os.makedirs(folder, exist_ok=True)
    vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    with open(vocab_path, "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(merges_path, "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)
    return vocab_path, merges_path
