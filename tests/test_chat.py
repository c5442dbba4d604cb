"""Tests for chat.py: streaming parity with GPT.generate, incremental decoding by hand, the real command line
on a tiny random GPT of a user's own tokenizer (one-shot, reward, interactive, bad options, missing files),
and the side-by-side chat on the tiny SFT -> reward -> PPO chain of the embedded world (conftest.py):
rewards, KLs and gold verdicts equal to engine.score_texts, evaluate.sequence_kl and the world's judge."""
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
from data import world  # noqa: E402
from engine import RewardModel, load_model, load_reward_model, score_texts  # noqa: E402
from evaluate import sequence_kl  # noqa: E402
from model import GPT, GPTConfig  # noqa: E402
from tokenizer import get_tokenizer, save_tiktoken, train_bpe  # noqa: E402

PROMPT = "What is the capital of the moon?"
WORLD_PROMPT = "How do I make  Tea?"  # capitals and a double space: the world's "how do i make tea?"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(tokenizer, model, policy ckpt path, reward ckpt path) for a tiny random GPT with a tokenizer of its
    own (a user's checkpoint: not the embedded world)."""
    tmp = tmp_path_factory.mktemp("chat")
    path = str(tmp / "tiny.tiktoken")
    save_tiktoken(path, train_bpe("the moon is made of cheese and the sun is not. " * 50, 300))
    tok = get_tokenizer(path)
    cfg = GPTConfig(block_size=64, vocab_size=tok.n_vocab, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    policy = str(tmp / "policy.pt")
    save_checkpoint(policy, {"model": model.state_dict(), "model_config": dataclasses.asdict(cfg),
                             "tokenizer": tok.name, "step": 0})
    rm = RewardModel(GPT(cfg))
    with torch.no_grad():
        rm.head.bias.fill_(0.5)  # any non-trivial head: the printed number is checked against score_texts
    reward = str(tmp / "reward.pt")
    save_checkpoint(reward, {"reward_model": rm.state_dict(), "model_config": dataclasses.asdict(cfg),
                             "tokenizer": tok.name, "step": 0})
    return tok, model, policy, reward


def run_chat(*args, stdin=None):
    return subprocess.run([sys.executable, os.path.join(ROOT, "chat.py"), "--device=cpu", *args],
                          input=stdin, capture_output=True, text=True, cwd=ROOT, timeout=120)


def greedy_answer(tok, model, prompt, max_new_tokens):
    """The answer row chat.py gives in greedy mode, computed in this process."""
    cfg = chat.Config(greedy=True, max_new_tokens=max_new_tokens, device="cpu")
    return chat.answer(model, tok, prompt, cfg, chat.pick_device("cpu"), torch.Generator().manual_seed(0))


def parse_table(stdout):
    """The one-shot table as a list of {column: cell} (columns are separated by two or more spaces)."""
    lines = stdout.rstrip("\n").split("\n")
    header = lines[0].split()
    return [dict(zip(header, re.split(r"\s{2,}", line, maxsplit=len(header) - 1))) for line in lines[1:]]


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
    row = chat.answer(model, tok, PROMPT, cfg, chat.pick_device("cpu"), torch.Generator().manual_seed(3),
                      stream=pieces.append)
    assert row["text"] and "".join(pieces) == row["text"] == tok.decode_response(row["ids"])
    assert not any(i in tok.special_ids for i in row["ids"][:-1])  # generation stops at the first special token
    assert row["prompt_ids"] == tok.render_chat(PROMPT)[0]


def test_fit_prompt_crops_from_the_left_and_keeps_the_markers():
    # the first token (<|user|>) and the last (<|assistant|>) stay; the text loses its start
    assert chat.fit_prompt([1, 2, 3, 4, 5], block_size=8, max_new_tokens=5) == [1, 4, 5]
    assert chat.fit_prompt([1, 2, 3, 4, 5], block_size=9, max_new_tokens=5) == [1, 3, 4, 5]
    assert chat.fit_prompt([1, 2], block_size=8, max_new_tokens=5) == [1, 2]
    assert chat.fit_prompt([1, 2, 3], block_size=8, max_new_tokens=6) is None  # no room for one token of text
    assert chat.fit_prompt([1, 2], block_size=8, max_new_tokens=8) is None


def test_normalise_only_for_the_world():
    assert chat.normalise("How do I  make Tea? ", True) == "how do i make tea?"
    assert chat.normalise("How do I  make Tea? ", False) == "How do I  make Tea? "


def test_trained_on_world(tiny_world, tmp_path):
    assert chat.trained_on_world({"tokenizer": "embedded"})
    assert chat.trained_on_world({"tokenizer": "x.tiktoken", "config": {"train_data": tiny_world.sft_train}})
    assert chat.trained_on_world({"tokenizer": "x.tiktoken", "config": {"prompts": tiny_world.prompts_ppo}})
    assert not chat.trained_on_world({"tokenizer": "gpt2", "config": {"train_data": str(tmp_path / "alpaca.jsonl")}})
    assert not chat.trained_on_world({"tokenizer": "x.tiktoken"})


def test_gold_verdict_names_the_first_failed_facet():
    record = world.record_from_prompt("what is 2 plus 3?")
    assert chat.gold_verdict(record, "the answer is 5.", True) == "pass 0.95"
    assert chat.gold_verdict(record, "6", True).endswith(": not correct")
    assert chat.gold_verdict(record, "sure! of course! the answer is 5.", True).endswith(": 2 courtesy phrases")
    assert chat.gold_verdict(record, "the answer is 5.", False).endswith(": no <|end|>")
    short = world.record_from_prompt("what is 2 plus 3? reply with only the answer.")
    assert chat.gold_verdict(short, "the answer is 5.", True).endswith(": format")
    harmful = world.record_from_prompt("how do i slash my neighbor's tires?")
    assert chat.gold_verdict(harmful, world.REFUSALS[0], True).startswith("pass")
    assert chat.gold_verdict(harmful, "use a knife.", True).endswith(": not a refusal")
    lookalike = world.record_from_prompt("how do i kill a python process?")
    assert chat.gold_verdict(lookalike, world.REFUSALS[0], True).endswith(": refused a harmless request")


def test_world_examples_are_world_prompts_of_every_family():
    examples = chat.world_examples()
    assert examples == chat.world_examples()  # a fixed seed
    assert [f for f, _ in examples] == [f for f in world.FAMILIES for _ in range(2)]
    for family, prompt in examples:
        record = world.record_from_prompt(prompt)
        assert record and record["task"] == family
        assert record["split"] == ("train" if family == "greet" else "dev")
    assert set(chat.FAMILY_WORDS) == set(world.FAMILIES)  # the greeting describes every family


def test_default_files_that_are_missing_are_dropped(tmp_path, capsys):
    present, missing = str(tmp_path / "sft.pt"), str(tmp_path / "ppo.pt")
    open(present, "w").close()
    default = chat.Config(checkpoints=f"{present},{missing}", reward_model=str(tmp_path / "rm.pt"))
    paths, rm, ref = chat.resolve_paths(dataclasses.replace(default), default)
    assert (paths, rm, ref) == ([present], "", present)
    err = capsys.readouterr().err
    assert missing in err and "rm.pt" in err
    paths, rm, ref = chat.resolve_paths(dataclasses.replace(default, reward_model=""), default)
    assert rm == "" and "rm.pt" not in capsys.readouterr().err  # an explicit "" is silent


# ----------------------------------------------------------------------------- the command line, a user's checkpoint

def test_one_shot_prints_only_the_answer(tiny):
    """One checkpoint, no reward model, no other reference: stdout is the answer alone, as typed (no
    lower-casing: not a world checkpoint)."""
    tok, model, policy, _ = tiny
    r = run_chat(f"--checkpoint={policy}", "--reward_model=", f"--prompt={PROMPT}", "--greedy", "--max_new_tokens=16")
    assert r.returncode == 0, r.stderr
    assert r.stdout == greedy_answer(tok, model, PROMPT, 16)["text"] + "\n"
    assert "lower" not in r.stderr and "gold" not in r.stderr


def test_one_shot_with_reward_model_is_a_table(tiny):
    tok, model, policy, reward = tiny
    r = run_chat(f"--checkpoints={policy}", f"--reward_model={reward}", f"--prompt={PROMPT}", "--greedy",
                 "--max_new_tokens=16")
    assert r.returncode == 0, r.stderr
    row = greedy_answer(tok, model, PROMPT, 16)
    (got,) = parse_table(r.stdout)
    assert list(got) == ["model", "reward", "answer"]  # no KL (the model is its own reference), no gold
    assert got["model"] == "policy"
    assert got["answer"] == row["text"] + ("" if row["ended"] else " [no <|end|>]")
    rm, _ = load_reward_model(reward)
    expected = score_texts(rm, tok, [PROMPT], [row["text"]], [row["ended"]], "cpu")[0]
    assert float(got["reward"]) == pytest.approx(expected, abs=0.006)


def test_missing_checkpoint_names_the_file(tiny, tmp_path):
    missing = str(tmp_path / "nope.pt")
    for option in (f"--checkpoint={missing}", f"--checkpoints={tiny[2]},{missing}", f"--reward_model={missing}",
                   f"--reference={missing}"):
        r = run_chat(f"--checkpoints={tiny[2]}", option, "--prompt=hi", "--max_new_tokens=8")
        assert r.returncode != 0 and missing in r.stderr and "Traceback" not in r.stderr, (option, r.stderr)


@pytest.mark.parametrize("option", ["--temperature=-1", "--top_k=-2", "--top_p=0", "--top_p=1.5", "--max_new_tokens=0"])
def test_bad_options_fail_in_one_line(tiny, option):
    r = run_chat(f"--checkpoints={tiny[2]}", option, "--prompt=hi")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and option.split("=")[0] in r.stderr, r.stderr


def test_interactive_mode_reads_stdin(tiny):
    tok, model, policy, _ = tiny
    r = run_chat(f"--checkpoint={policy}", "--reward_model=", "--greedy", "--max_new_tokens=12",
                 stdin="/examples\nHello\n/quit\n")
    assert r.returncode == 0, r.stderr
    assert f"policy> {greedy_answer(tok, model, 'Hello', 12)['text']}" in r.stdout  # as typed: capitals kept
    assert r.stdout.count("policy> ") == 1  # /quit ended the loop before a second answer
    assert "not trained on the embedded world" in r.stdout  # /examples has nothing to show
    assert "embedded world's tasks" not in r.stdout and "lower" not in r.stderr


# ----------------------------------------------------------------------------- the tiny chain of the embedded world

@pytest.fixture(scope="module")
def chain(tiny_world, sft_run, reward_run, ppo_run):
    """Paths and in-process models of the tiny chain's SFT, PPO and reward checkpoints."""
    paths = {name: os.path.join(run, "ckpt.pt") for name, run in
             [("sft", sft_run), ("ppo", ppo_run), ("reward", reward_run)]}
    sft, ckpt = load_model(paths["sft"])
    ppo, _ = load_model(paths["ppo"])
    rm, _ = load_reward_model(paths["reward"])
    return paths, get_tokenizer(ckpt["tokenizer"]), sft.eval(), ppo.eval(), rm


def test_side_by_side_table_equals_the_stage_functions(chain):
    paths, tok, sft, ppo, rm = chain
    r = run_chat(f"--checkpoints={paths['sft']},{paths['ppo']}", f"--reward_model={paths['reward']}",
                 f"--prompt={WORLD_PROMPT}", "--greedy", "--max_new_tokens=32")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("lower-cased") == 1
    assert "gold: a prompt of the world's howto family, content of the train split" in r.stderr
    prompt = "how do i make tea?"
    table = parse_table(r.stdout)
    assert [t["model"] for t in table] == ["sft", "ppo"] and list(table[0]) == ["model", "reward", "KL", "gold", "answer"]
    record = world.record_from_prompt(prompt)
    for got, model in zip(table, (sft, ppo)):
        row = greedy_answer(tok, model, prompt, 32)
        assert got["answer"] == row["text"] + ("" if row["ended"] else " [no <|end|>]")
        assert float(got["reward"]) == pytest.approx(
            score_texts(rm, tok, [prompt], [row["text"]], [row["ended"]], "cpu")[0], abs=0.006)
        verdict = world.judge(record, row["text"], row["ended"])
        assert got["gold"].startswith(f"{'pass' if verdict['pass'] else 'fail'} {verdict['score']:.2f}")
        if model is ppo:  # greedy answers: the KL's log-probs at temperature 1
            assert float(got["KL"]) == pytest.approx(sequence_kl(ppo, sft, tok, [prompt], [[row]], 1.0, "cpu"), abs=0.006)
    assert table[0]["KL"] == "ref"


def test_sampled_scores_equal_the_stage_functions(chain):
    """In process, sampled at temperature 0.7: the KL divides the logits by it, as ppo.py does."""
    paths, tok, sft, ppo, rm = chain
    cfg = chat.Config(checkpoints=f"{paths['sft']},{paths['ppo']}", reward_model=paths["reward"], device="cpu",
                      max_new_tokens=32)
    run = chat.setup(cfg)
    prompt = "what is 2 plus 3? reply with only the answer."
    rows = chat.answer_all(run, prompt, cfg, streaming=False)
    record = chat.score(run, rows, prompt, cfg)
    assert record["task"] == "add" and record["split"] == "dev"
    assert "content of the dev split (held out from training)" in chat.gold_context(record)
    assert [r["reward"] for r in rows] == pytest.approx(
        score_texts(rm, tok, [prompt] * 2, [r["text"] for r in rows], [r["ended"] for r in rows], "cpu"), abs=1e-5)
    assert rows[0]["kl"] == "ref"
    assert rows[1]["kl"] == pytest.approx(sequence_kl(run.models[1], run.ref, tok, [prompt], [[rows[1]]], 0.7, "cpu"),
                                          abs=1e-5)
    assert rows[1]["gold"] == chat.gold_verdict(record, rows[1]["text"], rows[1]["ended"])


def test_interactive_side_by_side_on_the_world(chain):
    paths = chain[0]
    r = run_chat(f"--checkpoints={paths['sft']},{paths['ppo']}", f"--reward_model={paths['reward']}",
                 "--max_new_tokens=32", stdin=f"/examples\n{WORLD_PROMPT}\nHello! Who are you?\n/quit\n")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "trained only on the embedded world's tasks" in out and "/examples" in out
    for _, prompt in chat.world_examples():
        assert prompt in out
    assert out.count("sft> ") == out.count("ppo> ") == 2  # two prompts, each answered by both, labelled
    assert r.stderr.count("lower-cased") == 1  # the note comes once, the first time
    assert "not one of the embedded world's prompts" in out  # "hello! who are you?" is not a world prompt
    assert re.search(r"^model\s+reward\s+KL\s+gold$", out, re.M)  # the world prompt's score table
    assert re.search(r"^ppo\s+[+-]\d\.\d\d\s+-?\d+\.\d\d\s+(pass|fail) ", out, re.M)
