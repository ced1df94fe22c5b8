"""pipeline/tokenizer.py: the job's BPE tokenizes a question's first word as it does inside a sentence."""

from tokenizers import pre_tokenizers

from pipeline import tokenizer

TEXTS = ["Chad is in Africa. The capital of Chad is N'Djamena. The atomic number of iron is 26."] * 40


def test_a_question_opens_with_its_in_sentence_tokens(tmp_path):
    tok = tokenizer.train_bpe(TEXTS, 300)
    question = tok.encode("The capital of Chad is").ids
    in_document = tok.encode("Chad is in Africa. The capital of Chad is").ids
    assert in_document[-len(question) :] == question  # 'ĠThe', not a start-of-text 'The'
    assert tok.encode(" N'Djamena").ids == tok.encode("N'Djamena").ids  # an answer scored after a space
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)
    loaded, eot, pad = tokenizer.load(path)
    assert (eot, pad) == (0, 1) and loaded.encode("The capital").ids == tok.encode("The capital").ids


def test_a_tokenizer_without_prefix_space_keeps_its_behaviour(tmp_path):
    """A run written before the prefix space: its tokenizer.json says how it splits, and loads as it was."""
    tok = tokenizer.train_bpe(TEXTS, 300)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)
    loaded, _, _ = tokenizer.load(path)
    assert not loaded.encode("The capital").tokens[0].startswith("Ġ")
