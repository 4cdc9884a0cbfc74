"""Shared fixtures: tiny random GPT-2 teachers saved to a temporary folder, the shared data, small corpora.

Nothing here touches the network; tests that need ../shared skip with a reason when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GOOSE_SHARED", REPO.parent / "shared"))
GPT2_TOKENIZER = SHARED / "data" / "gpt2-tokenizer"
ENWIKI_TEACHER = SHARED / "teachers" / "enwiki-tiny"
WIKITEXT_VALID = SHARED / "data" / "wikitext-2-raw" / "wiki.valid.raw"
ENWIKI_TEXT = SHARED / "data" / "enwiki-wikiextractor-2015"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent (the ../shared folder beside the checkout is needed for this test)")
    return path


def save_tiny_teacher(folder: Path, *, vocab_size: int | None = None, n_layer: int = 2, n_embd: int = 32,
                      n_positions: int = 64, seed: int = 0) -> Path:
    """A random GPT-2 with the real GPT-2 tokenizer (vocab_size above 50257 pads the embedding)."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(str(need(GPT2_TOKENIZER)))
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size or len(tokenizer), n_layer=n_layer, n_embd=n_embd, n_head=2,
                        n_positions=n_positions, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # sharper logits than the 0.02 init so top-k and tails are not all ties
        model.transformer.wte.weight.normal_(0, 0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    return save_tiny_teacher(tmp_path_factory.mktemp("tiny_teacher"))


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory) -> Path:
    """A few thousand tokens of English in two WikiExtractor-style documents."""
    text = (need(SHARED / "data" / "tinyshakespeare" / "input.txt")).read_text()[:12000]
    half = len(text) // 2
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(f'<doc id="1" title="A">\n{text[:half]}\n</doc>\n<doc id="2" title="B">\n{text[half:]}\n</doc>\n')
    return path


@pytest.fixture(scope="session")
def store(tmp_path_factory) -> str:
    """enwiki-tiny over a slice of the enwiki text: 96 windows of 64 tokens, hidden layers 2 and 4, samples."""
    from goose.pipeline.stage_one.cache_teacher import CacheTeacherConfig, run_cache_teacher
    from goose.pipeline.data import DataSpec

    out = tmp_path_factory.mktemp("store") / "enwiki.zarr"
    cfg = CacheTeacherConfig(output=str(out), teacher=str(need(ENWIKI_TEACHER)),
                             data=DataSpec(data_files=(str(need(ENWIKI_TEXT) / "wiki_00"),)), seq_len=64,
                             max_tokens=96 * 64, top_k=32, hidden_layers="2,4", samples=8, chunk_windows=8,
                             batch_size=8, device="cpu", progress=False)
    run_cache_teacher(cfg)
    return str(out)
