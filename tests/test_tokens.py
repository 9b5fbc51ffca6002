"""Concept tokens: adding, initial rows, splicing, tokenizing, and every bad input with its message."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxconcept import ConceptTokenError, PromptError
from jaxconcept.model import tokens


def test_added_tokens_are_single_pieces_with_initial_rows(tiny, tiny_with_concepts):
    bundle, concepts = tiny_with_concepts
    assert concepts.tokens == ("<v1>", "<v2>")
    assert len(bundle.tokenizer) == len(tiny.tokenizer) + 2
    assert "<v1>" not in tiny.tokenizer.get_vocab()  # the original bundle is untouched
    ids = tokens.tokenize(bundle.tokenizer, ["a photo of <v1> and <v2>"], bundle.max_length)[0]
    assert tokens.token_positions(ids, concepts.ids) == [4, 6]

    old = np.asarray(tokens.embedding_table(tiny.params["text_encoder"]))
    new = np.asarray(tokens.embedding_table(bundle.params["text_encoder"]))
    assert new.shape == (old.shape[0] + 2, old.shape[1])
    np.testing.assert_array_equal(new[: old.shape[0]], old)
    dog = tiny.tokenizer("dog", add_special_tokens=False).input_ids[0]
    np.testing.assert_array_equal(concepts.init_rows[0], old[dog])  # from the init word
    mean_norm = np.linalg.norm(old, axis=1).mean()
    assert np.linalg.norm(concepts.init_rows[1]) == pytest.approx(mean_norm, rel=1e-5)  # random, table's norm
    np.testing.assert_array_equal(new[list(concepts.ids)], concepts.init_rows)


def test_splice_changes_only_concept_rows_and_hidden_states(tiny_with_concepts):
    bundle, c = tiny_with_concepts
    te, tp = bundle.text_encoder, bundle.params["text_encoder"]
    ids = jnp.asarray(tokens.tokenize(bundle.tokenizer, ["a photo of <v1>", "a dog"], bundle.max_length))
    base = tokens.text_hidden_states(te, tp, ids)
    same = tokens.text_hidden_states(te, tp, ids, c.ids_array, jnp.asarray(c.init_rows))
    np.testing.assert_allclose(same, base, atol=1e-6)
    moved = tokens.text_hidden_states(te, tp, ids, c.ids_array, jnp.asarray(c.init_rows) + 1.0)
    assert not np.allclose(moved[0], base[0])  # the prompt with <v1> changes
    np.testing.assert_allclose(moved[1], base[1], atol=1e-6)  # the prompt without it does not


def test_words_joined_by_plus_start_at_the_mean_of_their_rows(tiny):
    table = np.asarray(tokens.embedding_table(tiny.params["text_encoder"]))
    dog, cat = (tiny.tokenizer(w, add_special_tokens=False).input_ids[0] for w in ("dog", "cat"))
    _, c = tokens.add_concept_tokens(tiny, ["<a>", "<b>"], ["dog+cat", "dog"])
    np.testing.assert_allclose(c.init_rows[0], (table[dog] + table[cat]) / 2, rtol=1e-6)
    np.testing.assert_array_equal(c.init_rows[1], table[dog])  # one word: its row, as before
    assert c.init_words == ("dog+cat", "dog")


def test_random_init_is_seeded(tiny):
    _, a = tokens.add_concept_tokens(tiny, ["<a>"], seed=3)
    _, b = tokens.add_concept_tokens(tiny, ["<a>"], seed=3)
    _, c = tokens.add_concept_tokens(tiny, ["<a>"], seed=4)
    np.testing.assert_array_equal(a.init_rows, b.init_rows)
    assert not np.allclose(a.init_rows, c.init_rows)


@pytest.mark.parametrize("toks, words, message", [
    ([], None, "no concept tokens"),
    (["dog"], None, "already exists in the vocabulary"),
    (["<v1>", "<v1>"], None, "given twice"),
    (["my token"], None, "whitespace"),
    (["  "], None, "empty"),
    (["<v1>"], ["dog", "cat"], "2 init words"),
    (["<v1>"], ["zebra#"], "unknown to this model's tokenizer"),
    (["<v1>"], ["\u00e9t\u00e9"], "unknown to this model's tokenizer"),
    (["<v1>", "<v2>"], ["<v2>", None], "itself a new concept token"),
    (["<v1>"], ["dog+"], "joined with '\\+' is empty"),
    (["<v1>"], ["dog+zebra#"], "'zebra#' is unknown"),
])
def test_bad_tokens_and_init_words(tiny, toks, words, message):
    with pytest.raises(ConceptTokenError, match=message):
        tokens.add_concept_tokens(tiny, toks, words)


def test_prompt_too_long(tiny):
    with pytest.raises(PromptError, match="at most 77"):
        tokens.tokenize(tiny.tokenizer, ["a dog " * 60], tiny.max_length)
    ids = tokens.tokenize(tiny.tokenizer, ["a dog"], tiny.max_length)
    assert ids.shape == (1, 77)


def test_one_vector_per_init_word_starts_at_the_words(tiny):
    """tokens.vectors=0: "dog+cat" gets two vectors, at dog and at cat; prompts write the token out."""
    table = np.asarray(tokens.embedding_table(tiny.params["text_encoder"]))
    dog, cat = (tiny.tokenizer(w, add_special_tokens=False).input_ids[0] for w in ("dog", "cat"))
    b, c = tokens.add_concept_tokens(tiny, ["<a>", "<b>", "<r>"], ["dog+cat", "dog", None], vectors=0)
    assert c.counts == (2, 1, 1) and len(c.ids) == 4 and c.init_rows.shape == (4, 32)
    np.testing.assert_array_equal(c.init_rows[0], table[dog])
    np.testing.assert_array_equal(c.init_rows[1], table[cat])
    np.testing.assert_array_equal(c.init_rows[2], table[dog])
    assert c.first_ids == (c.ids[0], c.ids[2], c.ids[3])
    ids = tokens.tokenize(b.tokenizer, ["a photo of <a> and <b>"], b.max_length)[0]
    assert b.tokenizer.convert_ids_to_tokens(ids[1:7].tolist()) == ["a</w>", "photo</w>", "of</w>", "<a>", "<a>_1",
                                                                   "and</w>"]
    assert tokens.token_positions(ids, c.first_ids) == [4, 7, -1]
    by_token = c.rows_by_token(c.init_rows)
    assert by_token["<a>"].shape == (2, 32) and by_token["<b>"].shape == (1, 32)
    # one vector (the default) is what it always was: the mean of the words, the same random rows
    _, one = tokens.add_concept_tokens(tiny, ["<a>", "<b>", "<r>"], ["dog+cat", "dog", None])
    _, again = tokens.add_concept_tokens(tiny, ["<a>", "<b>", "<r>"], ["dog+cat", "dog", None], vectors=1)
    assert one.counts == (1, 1, 1) and one.first_ids == one.ids
    np.testing.assert_array_equal(one.init_rows, again.init_rows)
    np.testing.assert_array_equal(one.init_rows[2], c.init_rows[3])  # the random row is drawn as before


def test_a_multi_vector_name_taken_by_another_token_is_refused(tiny):
    with pytest.raises(ConceptTokenError, match="given twice"):
        tokens.add_concept_tokens(tiny, ["<a>", "<a>_1"], ["dog+cat", "dog"], vectors=0)
