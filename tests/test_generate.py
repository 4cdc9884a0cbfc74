"""`goose generate`'s text stream: prompt and continuation decoded together, streamed token by token."""

from __future__ import annotations

import pytest
from conftest import GPT2_TOKENIZER, need

from goose.pipeline.generate import TextStream


@pytest.fixture(scope="module")
def gpt2_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(need(GPT2_TOKENIZER)))


def stream_text(tok, prompt: str, new_ids: list[int], *, eos: int | None = None, window: int = 64):
    """(prompt as the CLI prints it + every streamed piece, the pieces) after feeding new_ids one by one."""
    pieces: list[str] = []
    ids = tok(prompt)["input_ids"]
    stream = TextStream(tok, pieces.append, context=ids, skip_id=eos, window=window)
    for t in new_ids:
        stream(t)
    stream.flush()
    return prompt + "".join(pieces), pieces


@pytest.mark.parametrize("prompt, continuation", [
    ("The station", " is closed on Sundays."),
    ("topic : sea .", " the sailor swims near the harbour ."),   # the quickstart's "sea .the"
    ("the", " station"),                                           # ... and its "thestation"
    ("Zürich is", " a city in Switzerland, near the Alps."),
])
def test_gpt2_prompt_and_continuation_are_decoded_together(gpt2_tok, prompt, continuation):
    prompt_ids = gpt2_tok(prompt)["input_ids"]
    new_ids = gpt2_tok(prompt + continuation)["input_ids"][len(prompt_ids):]
    assert gpt2_tok.decode(prompt_ids + new_ids) == prompt + continuation  # the test's own premise
    text, pieces = stream_text(gpt2_tok, prompt, new_ids, eos=gpt2_tok.eos_token_id)
    assert text == prompt + continuation
    assert pieces[0].startswith(" ")  # the space after the prompt is printed
    assert len(pieces) == len(new_ids)  # streamed: one piece per token, as it comes


def test_gpt2_multibyte_characters_wait_for_their_last_byte(gpt2_tok):
    prompt, continuation = "Say", " 日本語 and café 🙂 done"
    prompt_ids = gpt2_tok(prompt)["input_ids"]
    new_ids = gpt2_tok(prompt + continuation)["input_ids"][len(prompt_ids):]
    text, pieces = stream_text(gpt2_tok, prompt, new_ids)
    assert text == prompt + continuation
    assert not any("\ufffd" in p for p in pieces)  # never half a character
    assert len(pieces) < len(new_ids)  # some tokens were held back until their character was whole


def test_gpt2_long_stream_matches_whole_decode_across_window_reanchoring(gpt2_tok):
    prompt = "Once upon a time"
    body = " there was a goose, who sailed the sea. " * 12 + "The end."
    prompt_ids = gpt2_tok(prompt)["input_ids"]
    new_ids = gpt2_tok(prompt + body)["input_ids"][len(prompt_ids):]
    assert len(new_ids) > 3 * 16
    text, pieces = stream_text(gpt2_tok, prompt, new_ids, window=16)
    assert text == gpt2_tok.decode(prompt_ids + new_ids) == prompt + body


def test_stop_token_is_not_printed_and_empty_prompt_works(gpt2_tok):
    eos = gpt2_tok.eos_token_id
    pieces: list[str] = []
    stream = TextStream(gpt2_tok, pieces.append, context=[eos], skip_id=eos)  # the CLI's empty prompt
    for t in gpt2_tok(" Hello world")["input_ids"] + [eos]:
        stream(t)
    stream.flush()
    assert "".join(pieces) == " Hello world"


def test_word_level_tokenizer_keeps_the_space_after_the_prompt(tmp_path):
    from goose.pipeline.quickstart import save_tokenizer

    tok = save_tokenizer(tmp_path / "tok")
    new_ids = tok("the station")["input_ids"]
    text, pieces = stream_text(tok, "topic : city .", new_ids, eos=tok.eos_token_id)
    assert text == "topic : city . the station" and pieces == [" the", " station"]
