import itertools

import pytest

from genesis_hf import corpus


@pytest.mark.parametrize("source", corpus.EMBEDDED_SOURCES)
def test_each_source_yields_nonempty_documents(source):
    documents = list(corpus.iter_documents(source, max_documents=20))
    assert len(documents) == 20
    assert all(isinstance(document, str) and document.strip() for document in documents)


def test_sources_hold_what_their_names_say():
    docs = list(corpus.iter_documents("stdlib-docs"))
    code = list(corpus.iter_documents("stdlib-code"))
    # A few MB in all: enough text for small tokenizers and smoke runs, small enough to read in seconds.
    assert 500_000 < sum(map(len, docs)) < 5_000_000
    assert 1_000_000 < sum(map(len, code)) < 20_000_000
    # Code documents are whole modules; docs documents are prose (pydoc topics, then docstrings).
    assert sum("def " in document for document in code) > len(code) // 2
    assert sum("\ndef " in document for document in docs) < len(docs) // 10


def test_documents_are_deterministic():
    first = list(corpus.iter_documents("stdlib-docs"))
    second = list(corpus.iter_documents("stdlib-docs"))
    assert first == second
    assert list(corpus.default_corpus(5)) == list(corpus.default_corpus(5))


def test_max_documents_limits_each_source():
    assert list(corpus.iter_documents("stdlib-code", max_documents=0)) == []
    assert len(list(corpus.iter_documents("stdlib-code", max_documents=3))) == 3


def test_default_corpus_round_robins_the_sources():
    docs = list(corpus.iter_documents("stdlib-docs", 3))
    code = list(corpus.iter_documents("stdlib-code", 3))
    assert list(corpus.default_corpus(3)) == [docs[0], code[0], docs[1], code[1], docs[2], code[2]]


def test_default_corpus_continues_when_one_source_runs_out():
    docs = list(corpus.iter_documents("stdlib-docs"))
    code = list(corpus.iter_documents("stdlib-code"))
    everything = list(corpus.default_corpus())
    assert len(everything) == len(docs) + len(code)
    longer = docs if len(docs) > len(code) else code
    shorter_count = min(len(docs), len(code))
    assert everything[2 * shorter_count :] == longer[shorter_count:]


def test_unknown_source_names_the_valid_ones():
    # Raised at call time, not on the first next().
    with pytest.raises(ValueError, match="stdlib-docs, stdlib-code"):
        corpus.iter_documents("wikipedia")


def test_negative_max_documents_is_an_error():
    with pytest.raises(ValueError, match="-1"):
        corpus.iter_documents("stdlib-code", max_documents=-1)
    with pytest.raises(ValueError, match="max_documents_per_source"):
        next(itertools.islice(corpus.default_corpus(-2), 1))
