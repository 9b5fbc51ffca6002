"""Concept tokens: new tokenizer entries whose embedding rows are the only trainable text parameters.

`add_concept_tokens` returns a new bundle (tokenizer copy with the tokens, text encoder with a larger
table holding the initial rows) and a `Concepts` record. In the token stage the trainable state is just
`rows_NxD`; `text_hidden_states` splices those rows into the frozen table inside the (differentiable)
forward pass, so the optimiser can only ever change the concept rows.

A concept may have several vectors (`vectors`): its token `<ring>` then stands for `<ring> <ring>_1 ...` in
every prompt (`tokenize` writes them out, as diffusers' multi-vector textual inversion does), and each vector
can start from one of its init words ("purple+ring": one vector at "purple", one at "ring"), so that the token
starts where the words are instead of at their mean. N counts vectors, C concepts; a concept's attention
(positions, losses, masks) is its first vector's.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np

from . import adapter
from ..errors import ConceptTokenError, PromptError
from ..runio import outputs
from ..runio.inputs import init_word_parts
from .loading import ModelBundle

log = logging.getLogger(__name__)

EMBED_PATH = ("text_model", "embeddings", "token_embedding", "embedding")
EXPANSIONS = "jaxconcept_vectors"  # tokenizer attribute: multi-vector token -> its vectors' names


@dataclasses.dataclass(frozen=True)
class Concepts:
    """The concept tokens of a bundle: names, their vocabulary ids, and their initial embedding rows."""

    tokens: tuple[str, ...]  # C
    ids: tuple[int, ...]  # N: every vector's vocabulary id, concept by concept
    init_words: tuple[str | None, ...]  # C
    init_rows: np.ndarray  # N x D, float32 (SDXL: N x (D1 + D2), each vector's rows in both tables, side by side)
    vectors: tuple[int, ...] = ()  # C: vectors per concept (empty: one each)
    widths: tuple[int, ...] = ()  # SDXL: (D1, D2), the two tables' widths; empty: one table

    @property
    def ids_array(self) -> jnp.ndarray:
        return jnp.asarray(self.ids, jnp.int32)

    @property
    def counts(self) -> tuple[int, ...]:
        return self.vectors or (1,) * len(self.tokens)

    @property
    def ids_CxV(self) -> np.ndarray:
        """C x V (V: the most vectors of a concept): the vocabulary ids of each concept's vectors, -1 past its last."""
        counts = self.counts
        out = np.full((len(counts), max(counts, default=1)), -1, np.int32)
        for c, (start, n) in enumerate(zip(np.cumsum((0,) + counts[:-1]), counts)):
            out[c, :n] = self.ids[int(start):int(start) + n]
        return out

    @property
    def first_ids(self) -> tuple[int, ...]:
        """C: the id of each concept's first vector (where its attention is read)."""
        return tuple(int(i) for i in self.ids_CxV[:, 0])

    def rows_by_token(self, rows_NxD) -> dict:
        """token -> its rows (n x D)."""
        return {t: np.atleast_2d(x) for t, x in outputs.token_tensors(self.tokens, rows_NxD, self.counts).items()}


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


def with_rows(text_params, concept_ids_N, rows_NxD):
    """The text encoder's params with the concept rows spliced into its table (unchanged for rows None)."""
    if rows_NxD is None:
        return text_params
    return with_embedding_table(text_params, splice_rows(embedding_table(text_params), concept_ids_N, rows_NxD))


def text_hidden_states(text_encoder, text_params, input_ids_BxT, concept_ids_N=None, rows_NxD=None):
    """Last hidden states of the CLIP text encoder (what SD's UNet attends to), with optional spliced rows.
    (SDXL's conditioning: `conditioning.encode`.)"""
    text_params = with_rows(text_params, concept_ids_N, rows_NxD)
    return adapter.text_encoder_outputs(text_encoder, text_params, input_ids_BxT)[0]


# ------------------------------------------------------------------------------------------ tokenizing


def vector_names(token: str, n: int) -> list[str]:
    """The names of a concept's vectors: the token, then `token_1` ... (diffusers' multi-vector names)."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def expand_prompt(prompt: str, expansions: dict[str, str]) -> str:
    """Each multi-vector token written out as all its vectors ("<ring>" -> "<ring> <ring>_1")."""
    for token, written in expansions.items():
        prompt = re.sub(re.escape(token) + r"(?!_\d)", lambda _m, w=written: w, prompt)
    return prompt


def tokenize(tokenizer, prompts: Sequence[str], max_length: int) -> np.ndarray:
    """Ids (B x max_length) padded like SD's pipelines; a prompt that would be cut is an error. Multi-vector
    tokens of the tokenizer (`add_concept_tokens`) are written out first."""
    expansions = getattr(tokenizer, EXPANSIONS, None)
    if expansions:
        prompts = [expand_prompt(p, expansions) for p in prompts]
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


def vector_counts(init_words: Sequence[str | None], vectors) -> list[int]:
    """Vectors per concept: `vectors` as given (an int for all, or one per concept); 0 = one per init word
    ("purple+ring": 2; one word or none: 1)."""
    given = [vectors] * len(init_words) if isinstance(vectors, (int, np.integer)) else list(vectors)
    if len(given) != len(init_words) or any(int(v) < 0 for v in given):
        raise ConceptTokenError(f"vectors per concept must be >= 0, one number for all or one per concept; got "
                                f"{vectors!r} for {len(init_words)} concepts.")
    return [int(v) or (len(init_word_parts(w)) if w else 1) for v, w in zip(given, init_words)]


def add_concept_tokens(
    bundle: ModelBundle, tokens: Sequence[str], init_words: Sequence[str | None] | None = None, seed: int = 0,
    vectors=1,
) -> tuple[ModelBundle, Concepts]:
    """Add placeholder tokens (e.g. "<v1>") with rows from an init word (its first piece) or random.

    With one vector per concept, several words joined by "+" ("purple+ring") start the row at the mean of their
    rows: a token that should carry two attributes (a colour the attention follows, a shape the samples need)
    starts between them. With as many vectors as words (`vectors=0`, see `vector_counts`), each vector starts at
    its word: the token starts as the words themselves. Random rows have a random direction and the table's
    mean row norm, so they start on the scale of real words.

    SDXL: the tokens join both tokenizers (with the same ids, their vocabularies being one) and get a row in
    both encoders' tables, each started as above in its own table; a vector's two rows are kept side by side
    (N x (D1 + D2)) and trained together.
    """
    tokens = list(tokens)
    init_words = list(init_words) if init_words is not None else [None] * len(tokens)
    if not tokens:
        raise ConceptTokenError("no concept tokens given: name at least one, e.g. '<v1>'.")
    if len(init_words) != len(tokens):
        raise ConceptTokenError(f"{len(tokens)} tokens but {len(init_words)} init words: give one per token (or None).")
    counts = vector_counts(init_words, vectors)
    names = [name for t, n in zip(tokens, counts) for name in vector_names(t, n)]
    _check_new_tokens(bundle.tokenizer, names)
    init_ids = [[_init_word_id(bundle.tokenizer, part, tokens) for part in init_word_parts(w)] if w else None
                for w in init_words]
    expansions = {t: " ".join(vector_names(t, n)) for t, n in zip(tokens, counts) if n > 1}
    tokenizer, ids = _tokenizer_with(bundle.tokenizer, names, expansions)
    encoders = [("text_encoder", bundle.text_encoder)]
    changes = {"tokenizer": tokenizer}
    if bundle.is_sdxl:
        changes["tokenizer_2"], ids_2 = _tokenizer_with(bundle.tokenizer_2, names, expansions)
        if ids_2 != ids:  # the loader checked that the vocabularies are one; a mismatch here is a bug
            raise ConceptTokenError(f"the concept tokens got ids {ids} in tokenizer/ but {ids_2} in tokenizer_2/")
        encoders.append(("text_encoder_2", bundle.text_encoder_2))
    params, parts = dict(bundle.params), []
    for key, module in encoders:
        table = np.asarray(embedding_table(bundle.params[key]), np.float32)
        parts.append(initial_rows(table, init_ids, counts, seed))
        params[key] = _grown(bundle.params[key], ids, parts[-1], len(tokenizer))
        changes[key] = adapter.text_encoder_with_vocab(module, len(tokenizer))
    rows_NxD = np.concatenate(parts, axis=1)
    widths = tuple(p.shape[1] for p in parts) if bundle.is_sdxl else ()
    return bundle.replace(params=params, **changes), Concepts(
        tuple(tokens), tuple(ids), tuple(init_words), rows_NxD, tuple(counts) if any(n > 1 for n in counts) else (),
        widths)


def _tokenizer_with(tokenizer, names: list[str], expansions: dict[str, str]):
    """(a copy of the tokenizer with the new tokens, their ids); each must stay one piece."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_tokens(names)
    setattr(tokenizer, EXPANSIONS, {**(getattr(tokenizer, EXPANSIONS, None) or {}), **expansions})
    ids = [tokenizer.convert_tokens_to_ids(t) for t in names]
    for token, tid in zip(names, ids):
        for text in (token, f"a photo of {token} and a dog"):
            if tid not in _pieces(tokenizer, text) or _pieces(tokenizer, token) != [tid]:
                raise ConceptTokenError(
                    f"token {token!r} would not stay one piece (it encodes as {tokenizer.tokenize(token)}); "
                    "choose a name without spaces or characters the tokenizer normalises, e.g. '<v1>'."
                )
    return tokenizer, ids


def _grown(text_params, ids: list[int], rows_NxD: np.ndarray, vocab: int):
    """The text encoder's params with its table grown to `vocab` rows, the new ids' rows set."""
    old_table = embedding_table(text_params)
    grown = np.zeros((vocab, old_table.shape[1]), np.float32)
    grown[: old_table.shape[0]] = np.asarray(old_table, np.float32)
    grown[ids] = rows_NxD
    return with_embedding_table(text_params, jnp.asarray(grown, old_table.dtype))


def initial_rows(table_VxD: np.ndarray, init_ids, counts, seed: int) -> np.ndarray:
    """N x D: per concept, one row per vector. Word starts: one word per vector while there are words, the
    mean of the words for one vector (or past the last word); random starts: the table's mean row norm."""
    rng = np.random.default_rng(seed)
    norm = np.linalg.norm(table_VxD, axis=1).mean()
    rows = []
    for wid, n in zip(init_ids, counts):
        for v in range(n):
            if wid is None:  # drawn in concept order, so one-vector runs draw the rows they always drew
                direction = rng.standard_normal(table_VxD.shape[1]).astype(np.float32)
                rows.append(direction / np.linalg.norm(direction) * norm)
            else:
                rows.append(table_VxD[wid[v]] if n > 1 and v < len(wid) else table_VxD[wid].mean(axis=0))
    return np.stack(rows).astype(np.float32)


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
    "tokenize", "with_embedding_table", "with_rows",
]
