"""Our CLIP-format vocabulary builder, checked with the real CLIPTokenizer."""

import pytest

from jaxconcept.model import bpe, loading as model


def test_every_word_is_one_token_and_round_trips():
    words = model.TINY_WORDS + ("banana", "band", "and", "an", "bandana", "nan")
    tok = model.word_tokenizer(words)
    for w in words:
        ids = tok(w, add_special_tokens=False).input_ids
        assert len(ids) == 1, (w, tok.tokenize(w))
        assert tok.decode(ids).strip() == w
    sentence = "a red striped dog and a banana on the beach"
    assert tok.decode(tok(sentence, add_special_tokens=False).input_ids) == sentence


def test_our_bpe_matches_clip_on_unlisted_words():
    words = ("cat", "catalog", "dog")
    tok = model.word_tokenizer(words)
    vocab, merges = bpe.build_vocab(words)
    ranks = {m: i for i, m in enumerate(merges)}
    for w in ("cats", "dogcat", "tacocat", "catalogs", "xyz"):
        assert list(bpe.bpe_pieces(w, ranks)) == tok.tokenize(w)


def test_unknown_characters_become_unk_and_bad_words_are_refused():
    tok = model.word_tokenizer(("dog",))
    assert tok.unk_token_id in tok("d\u00f6g", add_special_tokens=False).input_ids
    with pytest.raises(ValueError, match="outside the base set"):
        bpe.build_vocab(["caf\u00e9"])
