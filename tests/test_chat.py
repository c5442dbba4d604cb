"""Tests for chat.py: streaming parity with GPT.generate, incremental decoding by hand, and the real
command line (one-shot, reward, interactive, missing checkpoint) on a tiny random GPT."""
import dataclasses
import os
import re
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import chat  # noqa: E402
from common import save_checkpoint  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from tokenizer import EMBEDDED_PATH, get_tokenizer, save_tiktoken, train_bpe  # noqa: E402

PROMPT = "What is the capital of the moon?"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(tokenizer, model, policy ckpt path, reward ckpt path) for a tiny random GPT."""
    tmp = tmp_path_factory.mktemp("chat")
    if os.path.exists(EMBEDDED_PATH):
        tok = get_tokenizer("embedded")
    else:  # no embedded tokenizer built yet: a small one of our own
        path = str(tmp / "tiny.tiktoken")
        save_tiktoken(path, train_bpe("the moon is made of cheese and the sun is not. " * 50, 300))
        tok = get_tokenizer(path)
    cfg = GPTConfig(block_size=64, vocab_size=tok.n_vocab, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    policy = str(tmp / "policy.pt")
    save_checkpoint(policy, {"model": model.state_dict(), "model_config": dataclasses.asdict(cfg),
                             "tokenizer": tok.name, "step": 0})
    from engine import RewardModel
    rm = RewardModel(GPT(cfg))
    with torch.no_grad():
        rm.head.bias.fill_(0.5)  # any non-trivial head: the printed number is checked against score_texts
    reward = str(tmp / "reward.pt")
    save_checkpoint(reward, {"reward_model": rm.state_dict(), "model_config": dataclasses.asdict(cfg),
                             "tokenizer": tok.name, "step": 0})
    return tok, model, policy, reward


def run_chat(*args, stdin=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "chat.py"), "--device=cpu", *args],
                          input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=60)


def greedy_answer(tok, model, prompt, max_new_tokens):
    """The answer chat.py gives in greedy mode, computed in this process."""
    cfg = chat.Config(greedy=True, max_new_tokens=max_new_tokens, device="cpu")
    dev = chat.pick_device("cpu")
    return chat.answer(model, tok, prompt, cfg, dev, torch.Generator().manual_seed(0))[:2]


# ----------------------------------------------------------------------------- in process

def test_stream_equals_generate_greedy(tiny):
    tok, model, _, _ = tiny
    prompt_ids = tok.render_chat(PROMPT)[0]
    ref, _ = model.generate(torch.tensor([prompt_ids]), max_new_tokens=20, greedy=True)
    ref = ref[0].tolist()
    assert list(chat.stream_tokens(model, prompt_ids, 20, greedy=True)) == ref
    # with an eos that greedy decoding reaches at step k: both stop there, the eos included
    k = 5
    eos = ref[k]
    k = ref.index(eos)  # its first occurrence
    out, mask = model.generate(torch.tensor([prompt_ids]), max_new_tokens=20, greedy=True, eos_id=eos)
    expected = out[0][mask[0]].tolist()
    assert expected == ref[:k + 1]
    assert list(chat.stream_tokens(model, prompt_ids, 20, greedy=True, eos_id=eos)) == expected


def test_visible_text_holds_back_split_utf8(tiny):
    tok = tiny[0]
    # single bytes are ranks 0..255 in our tokenizer: " " = 32, "é" = 0xC3 0xA9
    assert chat.visible_text(tok, [32, 0xC3]) == ""  # " " + half a character -> nothing yet
    assert chat.visible_text(tok, [32, 0xC3, 0xA9]) == "é"  # the leading space of render_chat dropped
    assert chat.visible_text(tok, [32, 0xC3, 0xA9, tok.end_id, 32]) == "é"  # stops at <|end|>


def test_streamed_pieces_add_up_to_the_answer(tiny):
    tok, model, _, _ = tiny
    cfg = chat.Config(temperature=1.5, max_new_tokens=40, device="cpu")
    pieces = []
    text, ended, ids = chat.answer(model, tok, PROMPT, cfg, chat.pick_device("cpu"),
                                   torch.Generator().manual_seed(3), stream=pieces.append)
    assert text and "".join(pieces) == text == tok.decode_response(ids)
    assert not any(i in tok.special_ids for i in ids[:-1])  # generation stops at the first special token


def test_fit_prompt_crops_from_the_left_and_keeps_the_markers():
    # the first token (<|user|>) and the last (<|assistant|>) stay; the text loses its start
    assert chat.fit_prompt([1, 2, 3, 4, 5], block_size=8, max_new_tokens=5) == [1, 4, 5]
    assert chat.fit_prompt([1, 2, 3, 4, 5], block_size=9, max_new_tokens=5) == [1, 3, 4, 5]
    assert chat.fit_prompt([1, 2], block_size=8, max_new_tokens=5) == [1, 2]
    assert chat.fit_prompt([1, 2, 3], block_size=8, max_new_tokens=6) is None  # no room for one token of text
    assert chat.fit_prompt([1, 2], block_size=8, max_new_tokens=8) is None


# ----------------------------------------------------------------------------- the command line

def test_one_shot_prints_only_the_answer(tiny):
    tok, model, policy, _ = tiny
    r = run_chat(f"--checkpoint={policy}", f"--prompt={PROMPT}", "--greedy", "--max_new_tokens=16")
    assert r.returncode == 0, r.stderr
    text, _ = greedy_answer(tok, model, PROMPT, 16)
    assert r.stdout == text + "\n"


def test_one_shot_with_reward_model(tiny):
    tok, model, policy, reward = tiny
    r = run_chat(f"--checkpoint={policy}", f"--reward_model={reward}", f"--prompt={PROMPT}", "--greedy",
                 "--max_new_tokens=16")
    assert r.returncode == 0, r.stderr
    text, ended = greedy_answer(tok, model, PROMPT, 16)
    lines = r.stdout.split("\n")
    assert lines[0] == text
    m = re.match(r"\[reward ([+-]\d+\.\d\d)", lines[1])
    assert m, r.stdout
    from engine import load_reward_model, score_texts
    rm, _ = load_reward_model(reward)
    expected = score_texts(rm, tok, [PROMPT], [text], [ended], "cpu")[0]
    assert float(m.group(1)) == pytest.approx(expected, abs=0.006)


def test_missing_checkpoint_names_the_file(tmp_path):
    missing = str(tmp_path / "nope.pt")
    r = run_chat(f"--checkpoint={missing}", "--prompt=hi")
    assert r.returncode != 0
    assert missing in r.stderr


def test_interactive_mode_reads_stdin(tiny):
    tok, model, policy, _ = tiny
    r = run_chat(f"--checkpoint={policy}", "--greedy", "--max_new_tokens=12", stdin="hello\n/quit\n")
    assert r.returncode == 0, r.stderr
    text, _ = greedy_answer(tok, model, "hello", 12)
    assert f"bot> {text}" in r.stdout
    assert r.stdout.count("bot> ") == 1  # /quit ended the loop before a second answer
