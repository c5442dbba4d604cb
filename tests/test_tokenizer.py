"""Tests for tokenizer.py: hand-worked BPE merges, parity of tiktoken with the Python reference, the
chat layout, files in tiktoken's format. No internet: tiktoken.get_encoding is never really called."""
import base64
import os
import random
import subprocess
import sys
import time
from collections import Counter

import pytest
import regex
import tiktoken
import tiktoken.load

import tokenizer
from tokenizer import (GPT2_SPLIT_PATTERN, SPECIAL_TOKENS, Tokenizer, bpe_encode, get_tokenizer,
                       learn_merges, load_tiktoken, make_encoding, save_tiktoken, tokens_per_word,
                       train_bpe)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ("the a of and to in is it on at cat dog bird sat ran saw big small red blue green river "
          "house tree city road walked quickly slowly over under near because then when").split()
RARE = "café naïve Straße über 日本 東京 😀 x² hello_world e-mail can't it's we're I'll".split()


def make_corpus(n_chars=100_000, seed=0):
    """~100 KB of English-like text: Zipf-weighted words, punctuation, numbers, newlines, unicode."""
    rng = random.Random(seed)
    weights = [1 / (r + 1) for r in range(len(COMMON))]
    docs, size = [], 0
    while size < n_chars:
        lines = []
        for _ in range(rng.randint(1, 4)):
            words = rng.choices(COMMON, weights, k=rng.randint(3, 12))
            if rng.random() < 0.3:
                words.insert(rng.randrange(len(words)), str(rng.randint(0, 2026)))
            if rng.random() < 0.2:
                words.insert(rng.randrange(len(words)), rng.choice(RARE))
            lines.append(" ".join(words).capitalize() + rng.choice([".", ".", "!", "?", "...", ":"]))
        docs.append("\n".join(lines))
        size += len(docs[-1]) + 2
    return "\n\n".join(docs)


def encode_with_merges(word, merges):
    """minbpe's encoder: apply the trainer's merges in the order they were learned."""
    ids = list(word.encode("utf-8"))
    for k, pair in enumerate(merges):
        ids = tokenizer.merge(ids, pair, 256 + k)
    return ids


@pytest.fixture(scope="module")
def trained():
    text = make_corpus()
    t0 = time.time()
    ranks = train_bpe(text, vocab_size=512)
    seconds = time.time() - t0
    return text, ranks, seconds, Tokenizer(make_encoding("test", ranks))


# ----------------------------------------------------------------------------- worked examples

def test_split_pattern_by_hand():
    # a leading space sticks to the word after it; of two spaces the first stands alone so that the
    # second can lead " apples"; contractions, numbers and punctuation runs are their own pieces.
    text = "Hello world's 42  apples!!\n"
    assert regex.findall(GPT2_SPLIT_PATTERN, text) == \
        ["Hello", " world", "'s", " 42", " ", " apples", "!!", "\n"]


def test_merges_by_hand_wikipedia():
    # "aaabdaaabac" (a=97 b=98 c=99 d=100), no space so the pre-split keeps it as one word.
    # pairs: aa x4, ab x2, the rest once                    -> merge 1: (97, 97)  -> 256 "aa"
    #   [256 97 98 100 256 97 98 97 99]  (left to right: "aaa" -> "aa" "a")
    # pairs: (256, 97) x2 and (97, 98) x2 tie: lowest pair -> merge 2: (97, 98)  -> 257 "ab"
    #   [256 257 100 256 257 97 99]
    # pairs: (256, 257) x2, the rest once                   -> merge 3: (256, 257) -> 258 "aaab"
    #   [258 100 258 97 99]        (Wikipedia's "XdXac" with Z=aa, Y=ab, X=ZY)
    assert learn_merges({"aaabdaaabac": 1}, 3) == [(97, 97), (97, 98), (256, 257)]
    ranks = train_bpe("aaabdaaabac", vocab_size=256 + 3 + len(SPECIAL_TOKENS))
    assert len(ranks) == 259
    assert all(ranks[bytes([b])] == b for b in range(256))
    assert (ranks[b"aa"], ranks[b"ab"], ranks[b"aaab"]) == (256, 257, 258)
    tok = Tokenizer(make_encoding("hand", ranks))
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 97, 99]
    assert bpe_encode(b"aaabdaaabac", ranks) == [258, 100, 258, 97, 99]
    # the special tokens take the 5 ids after the ranks, in SPECIAL_TOKENS order
    assert (tok.eot_id, tok.user_id, tok.assistant_id, tok.end_id, tok.pad_id) == (259, 260, 261, 262, 263)
    assert tok.n_vocab == 264


def test_merges_by_hand_word_counts():
    # The word counts of the Hugging Face course's BPE chapter (h=104 u=117 g=103 p=112 n=110 b=98 s=115):
    # hug 10, pug 5, pun 12, bun 4, hugs 5.
    # pairs: ug 10+5+5=20, pu 5+12=17, un 12+4=16, hu 10+5=15, gs 5, bu 4  -> (117, 103) -> 256 "ug"
    # pairs: un 16, h-ug 15, pu 12, p-ug 5, ug-s 5, bu 4                  -> (117, 110) -> 257 "un"
    # pairs: h-ug 15, p-un 12, p-ug 5, ug-s 5, b-un 4                     -> (104, 256) -> 258 "hug"
    # pairs: p-un 12, p-ug 5, hug-s 5, b-un 4                             -> (112, 257) -> 259 "pun"
    # pairs: p-ug 5 and hug-s 5 tie, (112, 256) < (258, 115)              -> (112, 256) -> 260 "pug"
    counts = {"hug": 10, "pug": 5, "pun": 12, "bun": 4, "hugs": 5}
    expected = [(117, 103), (117, 110), (104, 256), (112, 257), (112, 256)]
    assert learn_merges(counts, 5) == expected
    # ties are broken by ids, not by the order in which words were seen
    assert learn_merges(dict(reversed(list(counts.items()))), 5) == expected
    # then hug-s 5 before b-un 4, and every word is one token: asking for more merges stops there
    assert learn_merges(counts, 100) == expected + [(258, 115), (98, 257)]


# ----------------------------------------------------------------------------- parity with references

def test_tiktoken_matches_reference_bpe(trained):
    text, ranks, _, tok = trained
    words = Counter(regex.findall(GPT2_SPLIT_PATTERN, text))
    merges = learn_merges(words, 512 - len(SPECIAL_TOKENS) - 256)
    assert len(ranks) == 256 + len(merges)  # each merge made a new, distinct token
    sample = random.Random(1).sample(sorted(words), 300)
    for word in sample:
        expected = encode_with_merges(word, merges)  # the trainer's own segmentation
        assert bpe_encode(word.encode("utf-8"), ranks) == expected, word
        assert tok.encode(word) == expected, word
    # whole lines: tiktoken's split and merges == our split and the Python reference, piece by piece
    for line in random.Random(2).sample(text.splitlines(), 200):
        pieces = regex.findall(GPT2_SPLIT_PATTERN, line)
        assert tok.encode(line) == [i for p in pieces for i in bpe_encode(p.encode("utf-8"), ranks)]


def test_common_words_become_single_tokens(trained):
    text, _, _, tok = trained
    for word in COMMON:
        assert len(tok.encode(" " + word)) == 1, word
    assert 1.0 <= tokens_per_word(tok, text) < 1.6


def test_training_is_fast_and_deterministic(trained):
    text, ranks, seconds, _ = trained
    assert seconds < 5.0, f"training 100 KB took {seconds:.1f}s"
    assert train_bpe(text, vocab_size=512) == ranks


# ----------------------------------------------------------------------------- the Tokenizer

@pytest.mark.parametrize("text", ["", "hello world", "Line one.\nLine two\n\n  indented\ttab",
                                  "numbers 3.14159 and 1,000,000 and 2026-01-01",
                                  "unicode: café naïve 日本語 😀👍🏽 x² ½", "trailing spaces   "])
def test_encode_decode_round_trip(trained, text):
    tok = trained[3]
    assert tok.decode(tok.encode(text)) == text


def test_special_token_strings_are_plain_text(trained):
    tok = trained[3]
    text = "".join(SPECIAL_TOKENS) + " user says <|end|> and <|pad|>"
    ids = tok.encode(text)
    assert not set(ids) & {tok.eot_id, tok.user_id, tok.assistant_id, tok.end_id, tok.pad_id}
    assert all(i < tok.n_vocab - len(SPECIAL_TOKENS) for i in ids)
    assert tok.decode(ids) == text
    prompt_ids, response_ids = tok.render_chat("<|end|>", "<|user|>")
    assert prompt_ids.count(tok.end_id) == 0 and response_ids.count(tok.user_id) == 0


def test_render_chat_layout_by_hand():
    # ranks of the Wikipedia example: aa=256 ab=257 aaab=258; specials eot..pad = 259..263.
    # " aaab" is one piece: [32 97 97 97 98] -> aa (rank 256) first -> [32 aa a b] -> ab (257)
    #   -> [32 aa ab] -> aaab (258) -> [32 258]; " ab ac" -> " ab" [32 257] and " ac" [32 97 99].
    tok = Tokenizer(make_encoding("hand", train_bpe("aaabdaaabac", vocab_size=264)))
    prompt_ids, response_ids = tok.render_chat("aaab", "ab ac")
    assert prompt_ids == [260, 32, 258, 261]        # <|user|> " aaab" <|assistant|>
    assert response_ids == [32, 257, 32, 97, 99, 262]  # " ab ac" <|end|>
    assert tok.render_chat("aaab") == (prompt_ids, None)


def test_render_chat_matches_spec_and_decode_response(trained):
    tok = trained[3]
    prompt, response = "Where did the cat sit?", "On the mat, 3 times."
    prompt_ids, response_ids = tok.render_chat(prompt, response)
    assert prompt_ids == [tok.user_id] + tok.encode(" " + prompt) + [tok.assistant_id]
    assert response_ids == tok.encode(" " + response) + [tok.end_id]
    assert tok.decode_response(response_ids) == response
    # generation continues past <|end|> or pads the batch: the response stops at the first special
    assert tok.decode_response(response_ids + [tok.pad_id, tok.pad_id]) == response
    assert tok.decode_response(response_ids + tok.encode(" junk")) == response
    assert tok.decode_response(tok.encode(" no end yet")) == "no end yet"
    assert tok.decode_response([tok.pad_id] + response_ids) == ""
    for text in ["  two leading spaces", "trailing space ", "line\nbreak"]:  # only render_chat's space goes
        assert tok.decode_response(tok.render_chat(prompt, text)[1]) == text


# ----------------------------------------------------------------------------- files and loading

def test_save_load_tiktoken_format(trained, tmp_path, monkeypatch):
    text, ranks, _, tok = trained
    path = str(tmp_path / "test.tiktoken")
    save_tiktoken(path, ranks)
    with open(path, "rb") as f:
        lines = f.read().splitlines()
    assert lines[0] == b"AA== 0" and lines[97] == base64.b64encode(b"a") + b" 97"  # byte 0, byte 'a'
    assert len(lines) == len(ranks)
    assert load_tiktoken(path) == ranks
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken's own reader, without its file cache
    assert tiktoken.load.load_tiktoken_bpe(path) == ranks
    loaded = get_tokenizer(path)
    assert loaded.name == path and loaded.n_vocab == tok.n_vocab == 512
    sample = text[:5000]
    assert loaded.encode(sample) == tok.encode(sample)
    # a retrained file at the same path is read afresh (tiktoken's reader would serve a cached copy)
    small = train_bpe(text, vocab_size=300)
    save_tiktoken(path, small)
    assert load_tiktoken(path) == small and get_tokenizer(path).n_vocab == 300


def test_missing_files_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="does not exist"):
        get_tokenizer(str(tmp_path / "nope.tiktoken"))
    monkeypatch.setattr(tokenizer, "EMBEDDED_PATH", str(tmp_path / "embedded.tiktoken"))
    with pytest.raises(SystemExit, match="python -m data.world"):
        get_tokenizer("embedded")


def test_gpt2_layout_without_internet(monkeypatch):
    # A stand-in for tiktoken's gpt2 (256 byte ranks, <|endoftext|> right after them, as 50256 is
    # right after gpt2's 50256 ranks): <|endoftext|> keeps its id and the chat tokens follow it.
    ranks = {bytes([b]): b for b in range(256)}
    fake = tiktoken.Encoding(name="gpt2", pat_str=GPT2_SPLIT_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 256})
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: fake)
    tok = get_tokenizer("gpt2")
    assert (tok.eot_id, tok.user_id, tok.assistant_id, tok.end_id, tok.pad_id) == (256, 257, 258, 259, 260)
    assert tok.n_vocab == 261 and tok.name == "gpt2"

    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(SystemExit, match="internet"):
        get_tokenizer("gpt2")


def test_command_line(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(make_corpus(20_000, seed=3), encoding="utf-8")
    out = tmp_path / "tok.tiktoken"
    result = subprocess.run([sys.executable, "tokenizer.py", f"--input={corpus}", "--vocab_size=300",
                             f"--output={out}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "tokens per word" in result.stdout
    assert len(load_tiktoken(str(out))) == 300 - len(SPECIAL_TOKENS)
