"""Concept tokens: new tokenizer entries whose embedding rows are the only trainable text parameters.

`add_concept_tokens` returns a new bundle (tokenizer copy with the tokens, text encoder with a larger
table holding the initial rows) and a `Concepts` record. In the token stage the trainable state is just
`rows_NxD`; `text_hidden_states` splices those rows into the frozen table inside the (differentiable)
forward pass, so the optimiser can only ever change the concept rows.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from . import adapter
from ..errors import ConceptTokenError, PromptError
from ..runio.inputs import init_word_parts
from .loading import ModelBundle

log = logging.getLogger(__name__)

EMBED_PATH = ("text_model", "embeddings", "token_embedding", "embedding")


@dataclasses.dataclass(frozen=True)
class Concepts:
    """The concept tokens of a bundle: names, their vocabulary ids, and their initial embedding rows."""

    tokens: tuple[str, ...]
    ids: tuple[int, ...]
    init_words: tuple[str | None, ...]
    init_rows: np.ndarray  # N x D, float32

    @property
    def ids_array(self) -> jnp.ndarray:
        return jnp.asarray(self.ids, jnp.int32)


def embedding_table(text_params) -> jnp.ndarray:
    node = text_params
    for key in EMBED_PATH:
        node = node[key]
    return node


def with_embedding_table(text_params, table_VxD):
    """Copy of the text-encoder params (nested dicts) with the token table replaced."""

    def rebuild(node, path):
        if not path:
            return table_VxD
        return {**node, path[0]: rebuild(node[path[0]], path[1:])}

    return rebuild(text_params, EMBED_PATH)


def splice_rows(table_VxD, ids_N, rows_NxD):
    """The table with the concept rows written in; the gradient flows to `rows_NxD` only."""
    return table_VxD.at[ids_N].set(rows_NxD.astype(table_VxD.dtype))


def text_hidden_states(text_encoder, text_params, input_ids_BxT, concept_ids_N=None, rows_NxD=None):
    """Last hidden states of the CLIP text encoder (what SD's UNet attends to), with optional spliced rows."""
    if rows_NxD is not None:
        table = splice_rows(embedding_table(text_params), concept_ids_N, rows_NxD)
        text_params = with_embedding_table(text_params, table)
    batch, length = input_ids_BxT.shape
    position_ids = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    out = text_encoder.apply(
        {"params": text_params}, input_ids_BxT, jnp.ones_like(input_ids_BxT), position_ids, deterministic=True
    )
    return out[0]


# ------------------------------------------------------------------------------------------ tokenizing


def tokenize(tokenizer, prompts: Sequence[str], max_length: int) -> np.ndarray:
    """Ids (B x max_length) padded like SD's pipelines; a prompt that would be cut is an error."""
    for prompt in prompts:
        n = len(tokenizer(prompt).input_ids)
        if n > max_length:
            raise PromptError(
                f"prompt {prompt!r} is {n} tokens long (with start/end tokens); the text encoder takes at most "
                f"{max_length}. Shorten it."
            )
    enc = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True)
    return np.asarray(enc.input_ids, np.int32)


def token_positions(ids_T: np.ndarray, concept_ids: Sequence[int]) -> list[int]:
    """Position of each concept id in one tokenized prompt (-1 where absent)."""
    ids_T = np.asarray(ids_T)
    out = []
    for cid in concept_ids:
        where = np.flatnonzero(ids_T == cid)
        out.append(int(where[0]) if where.size else -1)
    return out


def _pieces(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


# ------------------------------------------------------------------------------------------ adding tokens


def add_concept_tokens(
    bundle: ModelBundle, tokens: Sequence[str], init_words: Sequence[str | None] | None = None, seed: int = 0,
) -> tuple[ModelBundle, Concepts]:
    """Add placeholder tokens (e.g. "<v1>") with rows from an init word (its first piece) or random.

    Several words joined by "+" ("purple+ring") start the row at the mean of their rows: a token that should
    carry two attributes (a colour the attention follows, a shape the samples need) starts between them.
    Random rows have a random direction and the table's mean row norm, so they start on the scale of
    real words.
    """
    tokens = list(tokens)
    init_words = list(init_words) if init_words is not None else [None] * len(tokens)
    if not tokens:
        raise ConceptTokenError("no concept tokens given: name at least one, e.g. '<v1>'.")
    if len(init_words) != len(tokens):
        raise ConceptTokenError(f"{len(tokens)} tokens but {len(init_words)} init words: give one per token (or None).")
    tokenizer = bundle.tokenizer
    _check_new_tokens(tokenizer, tokens)
    table = np.asarray(embedding_table(bundle.params["text_encoder"]), np.float32)
    init_ids = [[_init_word_id(tokenizer, part, tokens) for part in init_word_parts(w)] if w else None
                for w in init_words]

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_tokens(tokens)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in tokens]
    for token, tid in zip(tokens, ids):
        for text in (token, f"a photo of {token} and a dog"):
            if tid not in _pieces(tokenizer, text) or _pieces(tokenizer, token) != [tid]:
                raise ConceptTokenError(
                    f"token {token!r} would not stay one piece (it encodes as {tokenizer.tokenize(token)}); "
                    "choose a name without spaces or characters the tokenizer normalises, e.g. '<v1>'."
                )

    rng = np.random.default_rng(seed)
    norms = np.linalg.norm(table, axis=1)
    rows = []
    for wid in init_ids:
        if wid is not None:
            rows.append(table[wid].mean(axis=0))
        else:
            direction = rng.standard_normal(table.shape[1]).astype(np.float32)
            rows.append(direction / np.linalg.norm(direction) * norms.mean())
    rows_NxD = np.stack(rows).astype(np.float32)

    vocab = len(tokenizer)
    grown = np.zeros((vocab, table.shape[1]), np.float32)
    grown[: table.shape[0]] = table
    grown[ids] = rows_NxD
    old_table = embedding_table(bundle.params["text_encoder"])
    text_params = with_embedding_table(bundle.params["text_encoder"], jnp.asarray(grown, old_table.dtype))
    new_bundle = bundle.replace(
        tokenizer=tokenizer,
        text_encoder=adapter.text_encoder_with_vocab(bundle.text_encoder, vocab),
        params={**bundle.params, "text_encoder": text_params},
    )
    return new_bundle, Concepts(tuple(tokens), tuple(ids), tuple(init_words), rows_NxD)


def _check_new_tokens(tokenizer, tokens: list[str]) -> None:
    seen = set()
    vocab = tokenizer.get_vocab()
    for token in tokens:
        if not isinstance(token, str) or not token.strip():
            raise ConceptTokenError(f"concept token {token!r} is empty: use a name such as '<v1>'.")
        if any(ch.isspace() for ch in token):
            raise ConceptTokenError(f"concept token {token!r} contains whitespace and would split into several pieces; use e.g. '<v1>'.")
        if token in seen:
            raise ConceptTokenError(f"concept token {token!r} is given twice: each concept needs its own token.")
        seen.add(token)
        pieces = _pieces(tokenizer, token)
        if token in vocab or (len(pieces) == 1 and tokenizer.convert_ids_to_tokens(pieces[0]) in (token, token + "</w>")):
            raise ConceptTokenError(
                f"concept token {token!r} already exists in the vocabulary; training it would change an existing "
                "word. Pick a new name, e.g. '<v1>' or '<my-dog>'."
            )


def _init_word_id(tokenizer, word: str, tokens: list[str]) -> int:
    if not word.strip():
        raise ConceptTokenError("an init word joined with '+' is empty: write e.g. 'purple+ring'.")
    if word in tokens:
        raise ConceptTokenError(f"init word {word!r} is itself a new concept token; use an existing word.")
    pieces = _pieces(tokenizer, word)
    unk = tokenizer.unk_token_id
    if not pieces or unk in pieces:
        raise ConceptTokenError(
            f"init word {word!r} is unknown to this model's tokenizer (it encodes as "
            f"{tokenizer.convert_ids_to_tokens(pieces) if pieces else 'nothing'}). Use a word it knows, "
            "or leave the init word empty for a random start."
        )
    if len(pieces) > 1:
        log.warning("init word %r is %d pieces %s; using the first, %r", word, len(pieces),
                 tokenizer.convert_ids_to_tokens(pieces), tokenizer.convert_ids_to_tokens(pieces[0]))
    return int(pieces[0])


__all__ = [
    "Concepts", "add_concept_tokens", "embedding_table", "splice_rows", "text_hidden_states", "token_positions",
    "tokenize", "with_embedding_table",
]
