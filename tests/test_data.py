"""Corpus loading, WikiExtractor splitting, tokenising and packing."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import GPT2_TOKENIZER, need
from goose.errors import GooseError
from goose.pipeline.data import DataSpec, load_texts, split_documents, tokenize_and_pack, windows_fingerprint


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(need(GPT2_TOKENIZER)))


def test_split_documents_removes_wikiextractor_markup():
    text = '<doc id="1" url="u" title="A">\nA\n\nFirst body.\n</doc>\n<doc id="2" title="B">\nB\nSecond.\n</doc>\n'
    assert split_documents(text) == ["A\n\nFirst body.", "B\nSecond."]
    assert split_documents("plain text\n<docs> are fine\n") == ["plain text\n<docs> are fine\n"]


def test_pack_joins_documents_with_eos_and_drops_the_remainder(tmp_path, tokenizer):
    docs = ["Hello world", "The cat sat on the mat", "A third document with some more words in it"]
    path = tmp_path / "d.jsonl"
    import json

    path.write_text("\n".join(json.dumps({"text": d}) for d in docs))
    ds = load_texts(DataSpec(data_files=(str(path),)))
    expected = []
    for d in docs:
        expected += tokenizer(d)["input_ids"] + [tokenizer.eos_token_id]
    windows = tokenize_and_pack(ds, tokenizer, text_column="text", seq_len=5)
    n = len(expected) // 5
    np.testing.assert_array_equal(windows, np.array(expected[: n * 5]).reshape(n, 5))
    capped = tokenize_and_pack(ds, tokenizer, text_column="text", seq_len=5, max_tokens=12)
    np.testing.assert_array_equal(capped, np.array(expected[:10]).reshape(2, 5))
    assert windows_fingerprint(capped) != windows_fingerprint(windows)
    assert windows_fingerprint(capped) == windows_fingerprint(capped.copy())


def test_parquet_and_mixed_formats(tmp_path, tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["one two three four five six seven"] * 3}), tmp_path / "a.parquet")
    ds = load_texts(DataSpec(data_files=(str(tmp_path / "a.parquet"),), text_column="content"))
    assert tokenize_and_pack(ds, tokenizer, text_column="content", seq_len=4).shape[1] == 4
    (tmp_path / "b.txt").write_text("x")
    with pytest.raises(GooseError, match="mix formats"):
        load_texts(DataSpec(data_files=(str(tmp_path / "a.parquet"), str(tmp_path / "b.txt"))))
    with pytest.raises(GooseError, match="exactly one of"):
        load_texts(DataSpec())
