"""The shipped vocabularies are the real ones: llama.cpp's tokenizer test cases give exactly the ids
the models' own Hugging Face tokenizers gave (the .out files were written by those tokenizers), and
each family's special tokens sit at the ids of the real model's tokenizer. mistral-spm's .out is not
llama.cpp's: the `sentencepiece` library wrote it from Mistral 7B's own model (see
scripts/build_template_fixtures.py), so that vocabulary is checked against the model, not a converter;
phi-4's .out was written by tiktoken's own cl100k_base (Phi-4's BPE), not by our conversion of it."""
from __future__ import annotations

import pytest
from template_families import FAMILIES, VOCABS, vocab_cases, vocab_text


@pytest.mark.parametrize("vocab", VOCABS)
def test_converted_vocabulary_reproduces_the_models_own_token_ids(vocab: str) -> None:
    from tokenizers import Tokenizer

    tokenizer, cases = Tokenizer.from_str(vocab_text(vocab)), vocab_cases(vocab)  # as converted (no stand-in re-split)
    assert len(cases) >= 40
    wrong = [(text, ids, tokenizer.encode(text, add_special_tokens=False).ids) for text, ids in cases
             if tokenizer.encode(text, add_special_tokens=False).ids != ids]
    assert not wrong, wrong[:3]


def test_the_cases_are_not_trivial() -> None:  # the BPE words that real split regexes disagree on are there
    texts = [text for text, _ in vocab_cases("llama-bpe")]
    assert any("\n\n\n" in t for t in texts) and any("🦙" in t for t in texts) and any("3333333" in t for t in texts)
    assert vocab_cases("qwen2")[-1][1] != vocab_cases("llama-bpe")[-1][1]
    assert vocab_cases("mistral-spm")[0][1] != vocab_cases("llama-spm")[0][1]  # not Llama 2's ids
    # Llama 3's first 100256 tokens are cl100k's, but its merges and digits differ on some cases
    assert [ids for _, ids in vocab_cases("phi-4")] != [ids for _, ids in vocab_cases("llama-bpe")]


def test_mistral_vocabulary_encodes_and_decodes_as_sentencepiece_does() -> None:
    """With special tokens every case is <s> then sentencepiece's ids (its add_bos=True), and decoding
    gives the text back; [INST] is text in Mistral 7B v0.1/v0.2's model, not a piece."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(vocab_text("mistral-spm"))
    for text, ids in vocab_cases("mistral-spm"):
        assert tokenizer.encode(text).ids == [1, *ids], text
        assert tokenizer.decode(ids) == text
    assert tokenizer.get_vocab_size() == 32000 and tokenizer.token_to_id("[INST]") is None


def test_phi4_vocabulary_is_cl100k_with_phi4s_tokens_after_it() -> None:
    """tiktoken's ids (the .out) round-trip; every id from 100256 to 100351 is one special token (the
    named ones, the rest <|dummy_N|>), matched whole inside text, so the vocabulary is 100352 long."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(vocab_text("phi-4"))
    for text, ids in vocab_cases("phi-4"):
        assert tokenizer.encode(text).ids == ids and tokenizer.decode(ids) == text, text  # no BOS, no EOS
    added = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items()}
    assert sorted(added.values()) == list(range(100256, 100352)) and tokenizer.get_vocab_size() == 100352
    assert sum(t.startswith("<|dummy_") for t in added) == 88
    ids = tokenizer.encode("<|im_start|>user<|im_sep|>Hi<|im_end|>").ids
    assert ids[0] == 100264 and ids[2] == 100266 and ids[-1] == 100265 and len(ids) == 5


@pytest.mark.parametrize("family", [f for f, spec in FAMILIES.items() if "ids" in spec])
def test_family_special_tokens_have_the_real_models_ids(family: str) -> None:
    from template_families import make_tokenizer

    spec, tok = FAMILIES[family], make_tokenizer(family)
    assert {t: tok.convert_tokens_to_ids(t) for t in spec["ids"]} == spec["ids"]
    assert len(tok) == spec.get("size", len(tok))  # nothing appended past the real vocabulary
    for token in [*spec["ids"], spec["eot"]]:
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1, token  # never split as text


@pytest.mark.parametrize(("vocab", "bos"), [("llama-bpe", 128000), ("command-r", 5), ("llama-spm", 1), ("phi-3", 1),
                                            ("mistral-spm", 1), ("qwen2", None), ("phi-4", None)])
def test_encoding_with_special_tokens_adds_bos_where_the_model_does(vocab: str, bos: int | None) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(vocab_text(vocab))
    plain = tokenizer.encode("Hello world", add_special_tokens=False).ids
    assert tokenizer.encode("Hello world").ids == ([bos] if bos is not None else []) + plain
