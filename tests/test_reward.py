"""reward.py: the K-wise Bradley-Terry loss by hand and against the mean of its pairs, scores that ignore
padding, the last-token index, best-of-n by hand, and a tiny run through the command line (comparisons
file, normalisation of the head, batched loss parity)."""
import math
import os
import random

import pytest
import torch

from conftest import assert_fails_clearly, read_json
from data import world as W
from data.formats import read_comparisons, read_sft
from model import GPT, GPTConfig
import reward
import common
from common import read_jsonl
from engine import (RewardEnsemble, RewardModel, encode_answers, last_token_index, load_reward_model,
                    pack_answers, score_texts)
from evaluate import best_of_n
from reward import batch_loss, bradley_terry_loss
from tokenizer import EMBEDDED_PATH, get_tokenizer


# ----------------------------------------------------------------------------- the loss by hand

def test_bradley_terry_k2_by_hand():
    loss, acc, margin = bradley_terry_loss(torch.tensor([1.0, 0.0]), [0, 1])
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)))  # -log sigmoid(1) = 0.3133
    assert acc.item() == 1.0 and margin.item() == pytest.approx(1.0)
    loss, acc, margin = bradley_terry_loss(torch.tensor([1.0, 0.0]), [1, 0])  # the labeler preferred answer 1
    assert loss.item() == pytest.approx(math.log(1 + math.exp(1)))  # 1.3133
    assert acc.item() == 0.0 and margin.item() == pytest.approx(-1.0)


def test_bradley_terry_gradient_pushes_the_winner_up():
    scores = torch.tensor([1.0, 0.0], requires_grad=True)
    bradley_terry_loss(scores, [0, 1])[0].backward()
    # d/dr_w -log sigmoid(r_w - r_l) = -(1 - sigmoid(1)) = -0.2689, and +0.2689 for the loser
    torch.testing.assert_close(scores.grad, torch.tensor([-0.26894142, 0.26894142]))


def test_bradley_terry_k4_is_the_mean_of_its_six_pairs():
    scores = torch.tensor([0.5, -1.0, 2.0, 0.3])
    ranking = [2, 3, 0, 1]  # best first: answer 2, then 3, then 0, then 1
    # the C(4,2) = 6 pairs (winner, loser) and their margins r_w - r_l, by hand:
    # (2,3) 1.7  (2,0) 1.5  (2,1) 3.0  (3,0) -0.2  (3,1) 1.3  (0,1) 1.5   -> one pair inverted
    margins = [1.7, 1.5, 3.0, -0.2, 1.3, 1.5]
    loss, acc, margin = bradley_terry_loss(scores, ranking)
    assert loss.item() == pytest.approx(sum(math.log(1 + math.exp(-m)) for m in margins) / 6, rel=1e-6)
    assert acc.item() == pytest.approx(5 / 6)
    assert margin.item() == pytest.approx(8.8 / 6, rel=1e-6)
    # parity: the K-wise loss is the mean of the K = 2 loss over every ordered pair of the ranking
    pairs = [(ranking[i], ranking[j]) for i in range(4) for j in range(i + 1, 4)]
    pair_losses = [bradley_terry_loss(scores[[w, l]], [0, 1])[0] for w, l in pairs]
    torch.testing.assert_close(loss, torch.stack(pair_losses).mean())


# ----------------------------------------------------------------------------- scores and padding

def tiny_rm(seed=0):
    torch.manual_seed(seed)
    rm = RewardModel(GPT(GPTConfig(block_size=24, vocab_size=50, n_layer=2, n_head=2, n_embd=16))).eval()
    with torch.no_grad():
        rm.head.bias.fill_(0.3)
    return rm


def test_last_token_index_left_and_right_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1],   # left padded
                         [1, 1, 1, 0, 0],   # right padded
                         [1, 1, 1, 1, 1],   # no padding
                         [0, 0, 0, 0, 1],   # one token at the end
                         [1, 0, 0, 0, 0]])  # one token at the start
    assert last_token_index(mask).tolist() == [4, 2, 4, 4, 0]


@torch.no_grad()
def test_padding_amount_and_side_never_change_a_score():
    rm = tiny_rm()
    seq = torch.tensor([7, 3, 9, 1, 4, 11])
    noise = torch.tensor([17, 2, 42])  # pad slots hold arbitrary tokens: they must not matter
    alone = rm(seq[None], torch.ones(1, 6, dtype=torch.long))
    left = rm(torch.cat([noise, seq])[None], torch.tensor([[0, 0, 0] + [1] * 6]))
    right = rm(torch.cat([seq, noise])[None], torch.tensor([[1] * 6 + [0, 0, 0]]))
    # in a batch with a longer sequence, left padded as score_texts does
    other = torch.arange(20, 29)
    batch = rm(torch.stack([torch.cat([noise, seq]), other]), torch.tensor([[0, 0, 0] + [1] * 6, [1] * 9]))
    for s in (left, right, batch[:1]):
        torch.testing.assert_close(s, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch[1:], rm(other[None], torch.ones(1, 9, dtype=torch.long)), atol=1e-5, rtol=0)
    # and the score reads the head at the LAST real token: the values there, not a mean over positions
    values = rm.values(seq[None], torch.ones(1, 6, dtype=torch.long))
    torch.testing.assert_close(alone, values[:, -1])
    assert (values[0, :-1] - values[0, -1]).abs().max() > 1e-4  # so a mean or another position would differ


@torch.no_grad()
def test_prompt_computed_once_gives_the_scores_of_each_answer_alone():
    """pack_answers + RewardModel.forward(..., answers=...): each prompt forwarded once, its keys and
    values shared by its K answers, equals scoring every prompt + answer on its own (encode_answers);
    also for an ensemble, an empty answer that never ended, and prompts of different lengths."""
    tok = get_tokenizer(EMBEDDED_PATH if os.path.exists(EMBEDDED_PATH) else "embedded")
    torch.manual_seed(0)
    rm = RewardModel(GPT(GPTConfig(block_size=64, vocab_size=tok.n_vocab, n_layer=2, n_head=2, n_embd=16))).eval()
    prompts = ["what is 3 plus 4?", "how do i boil an egg? answer in at most 7 words."]
    responses = [["7", "the answer is 7.", ""], ["boil it for ten minutes.", "sure! boil it."]]
    endeds = [[True, True, False], [False, True]]
    pids, pmask, answers = pack_answers(tok, prompts, responses, endeds, 64)
    for model in (rm, RewardEnsemble([rm, RewardModel(GPT(rm.gpt.config))])):
        packed = model(pids, pmask, answers)
        alone = torch.cat([model(ids, torch.ones_like(ids)) for p, rs, es in zip(prompts, responses, endeds)
                           for ids in (torch.tensor([s]) for s in encode_answers(tok, p, rs, es, 64))])
        torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)
    assert pack_answers(tok, prompts, responses, endeds, 20) is None  # too long for the context: no packing
    with torch.enable_grad():  # and the gradients a training step takes from it are the same too
        grads = []
        for packed in (True, False):
            rm.zero_grad()
            scores = rm(pids, pmask, answers) if packed else torch.cat(
                [rm(ids, torch.ones_like(ids)) for p, rs, es in zip(prompts, responses, endeds)
                 for ids in (torch.tensor([s]) for s in encode_answers(tok, p, rs, es, 64))])
            (scores * torch.arange(1.0, 6.0)).sum().backward()
            grads.append([p.grad.clone() for p in rm.parameters()])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- best-of-n by hand

def test_best_of_n_by_hand():
    record = W.make_record(random.Random(0), task="add")
    right, wrong = W.answer(record), "banana."
    answers = [{"text": t, "ended": True} for t in (wrong, right, right, wrong)]
    rewards = [0.9, 0.1, 0.8, 0.2]
    g_right, g_wrong = W.judge(record, right)["score"], W.judge(record, wrong)["score"]
    assert g_right > g_wrong
    res = {r["n"]: r for r in best_of_n([{"prompt": record["prompt"], "world": record}], [answers], [rewards], [1, 2, 4])}
    # n = 1: every answer is its own group
    assert res[1]["gold_mean"] == pytest.approx((g_right + g_wrong) / 2)
    assert res[1]["proxy_reward"] == pytest.approx(0.5) and res[1]["kl"] == 0.0
    # n = 2: groups (0, 1) and (2, 3); the reward picks 0 (wrong, 0.9) and 2 (right, 0.8)
    assert res[2]["gold_mean"] == pytest.approx((g_wrong + g_right) / 2)
    assert res[2]["proxy_reward"] == pytest.approx(0.85)
    assert res[2]["oracle_gold_mean"] == pytest.approx(g_right)  # the gold judge would pick 1 and 2
    assert res[2]["kl"] == pytest.approx(math.log(2) - 1 / 2)  # 0.1931
    # n = 4: one group; the reward model is fooled into the wrong answer
    assert res[4]["gold_mean"] == pytest.approx(g_wrong) and res[4]["proxy_reward"] == pytest.approx(0.9)
    assert res[4]["oracle_gold_mean"] == pytest.approx(g_right)
    assert res[4]["kl"] == pytest.approx(math.log(4) - 3 / 4)  # 0.6363
    assert res[4]["pass_rate"] == float(W.judge(record, wrong)["pass"])


# ----------------------------------------------------------------------------- the tiny run

def test_comparisons_file_is_valid(reward_run):
    s = read_json(os.path.join(reward_run, "summary.json"))
    comps = read_comparisons(os.path.join(reward_run, "comparisons.jsonl"))
    assert len(comps) == s["n_comparisons"] > 20
    for c in comps:
        K = len(c["responses"])
        assert 2 <= K <= 4 and len(c["ended"]) == K and c["world"]
        assert len(set(zip(c["responses"], c["ended"]))) == K  # identical answers were dropped
    assert s["n_pairs"] == sum(len(c["ranking"]) * (len(c["ranking"]) - 1) // 2 for c in comps)
    assert s["mean_k"] == pytest.approx(sum(len(c["responses"]) for c in comps) / len(comps))
    assert 0 <= s["labeler_agreement"] <= 1 and 0 <= s["heldout_acc_vs_labels"] <= 1
    # the ceilings on the held-out pairs: knowing the utilities beats a second labeler, which beats chance
    assert 0.5 < s["heldout_expected_labeler_agreement"] < s["heldout_bayes_accuracy"] <= 1


def test_head_is_normalised_demonstrations_mean_0_samples_std_1(tiny_world, reward_run):
    rm, ckpt = load_reward_model(os.path.join(reward_run, "ckpt.pt"))  # weights_only=True inside
    cfg = ckpt["config"]
    tok = get_tokenizer(ckpt["tokenizer"])
    demos = read_sft(cfg["demonstrations"])
    demos = random.Random(cfg["seed"]).sample(demos, min(cfg["n_norm"], len(demos)))
    assert len(demos) == 270  # n_norm = 512 > 270 tiny demonstrations: all of them
    scores = score_texts(rm, tok, [d["prompt"] for d in demos], [d["response"] for d in demos],
                         [d.get("ended", True) for d in demos], "cpu")
    assert sum(scores) / len(scores) == pytest.approx(0.0, abs=1e-3)
    comps = read_comparisons(os.path.join(reward_run, "comparisons.jsonl"))[:cfg["n_norm"]]
    samples = score_texts(rm, tok, [c["prompt"] for c in comps for _ in c["responses"]],
                          [r for c in comps for r in c["responses"]], [e for c in comps for e in c["ended"]], "cpu")
    mean = sum(samples) / len(samples)
    assert math.sqrt(sum((x - mean) ** 2 for x in samples) / len(samples)) == pytest.approx(1.0, abs=1e-3)
    norm = read_json(os.path.join(reward_run, "summary.json"))["normalization"]
    assert norm == ckpt["normalization"] and norm["demo_source"] == tiny_world.sft_train


@torch.no_grad()
def test_batched_loss_equals_per_prompt_scores(reward_run):
    """batch_loss forwards every answer of several prompts in one left-padded batch: each prompt's loss
    must equal eq. 1 on that prompt's answers scored on their own."""
    rm, ckpt = load_reward_model(os.path.join(reward_run, "ckpt.pt"))
    tok = get_tokenizer(ckpt["tokenizer"])
    comps = read_comparisons(os.path.join(reward_run, "comparisons.jsonl"))[:6]
    losses, accs, margins, _, _ = batch_loss(rm.eval(), tok, comps, "cpu")
    for c, loss, acc, margin in zip(comps, losses, accs, margins):
        scores = torch.tensor(score_texts(rm, tok, [c["prompt"]] * len(c["responses"]), c["responses"],
                                          c["ended"], "cpu", batch_size=1))
        ref = bradley_terry_loss(scores, c["ranking"])
        torch.testing.assert_close(torch.stack([loss, acc, margin]), torch.stack(ref), atol=1e-5, rtol=0)


def test_best_of_n_summary(reward_run):
    bon = read_json(os.path.join(reward_run, "summary.json"))["best_of_n"]
    assert [r["n"] for r in bon] == [1, 2, 4]
    assert [r["kl"] for r in bon] == pytest.approx([0.0, math.log(2) - 0.5, math.log(4) - 0.75])
    assert bon[0]["gold_mean"] == pytest.approx(bon[0]["oracle_gold_mean"])
    # the max over a larger group of the same samples is never lower on average
    for key in ("proxy_reward", "oracle_gold_mean"):
        assert bon[0][key] <= bon[1][key] + 1e-9 <= bon[2][key] + 2e-9


@torch.no_grad()
def test_ensemble_score_is_the_mean_of_its_members():
    members = [tiny_rm(seed) for seed in (0, 1, 2)]
    ens = RewardEnsemble(members).eval()
    idx, mask = torch.randint(0, 50, (3, 7)), torch.tensor([[0, 0, 1, 1, 1, 1, 1]] * 3)
    scores = torch.stack([m(idx, mask) for m in members])  # (members, B)
    assert not torch.allclose(scores[0], scores[1])  # the members really differ
    torch.testing.assert_close(ens(idx, mask), scores.mean(0))
    torch.testing.assert_close(ens.values(idx, mask), torch.stack([m.values(idx, mask) for m in members]).mean(0))
    assert ens.gpt is members[0].gpt and all(k.startswith("members.") for k in ens.state_dict())


class Crash(Exception):
    pass


def test_ensemble_trains_members_in_turn_and_resume_reproduces_it(tiny_world, sft_run, reward_run, tmp_path,
                                                                   monkeypatch):
    def cfg(out, resume=False):
        return reward.Config(init_from=f"{sft_run}/ckpt.pt", comparisons=os.path.join(reward_run, "comparisons.jsonl"),
                             demonstrations=tiny_world.sft_train, world_dir=tiny_world.dir, out_dir=out, ensemble=2,
                             epochs=1, batch_size=8, warmup_steps=2, eval_interval=2, best_of=0, n_norm=64,
                             device="cpu", resume=resume)
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    reward.train(cfg(straight))
    a = read_jsonl(os.path.join(straight, "metrics.jsonl"))
    ms = len(a) // 2  # steps per member
    assert ms >= 4 and [r["member"] for r in a] == [0] * ms + [1] * ms
    assert [r["lr"] for r in a[:ms]] == [r["lr"] for r in a[ms:]]  # each member: its own warmup and schedule
    ckpt = torch.load(os.path.join(straight, "ckpt.pt"), weights_only=True)
    assert ckpt["ensemble"] == 2
    heads = [ckpt["reward_model"][f"members.{m}.head.weight"] for m in (0, 1)]
    assert not torch.equal(*heads)
    s = read_json(os.path.join(straight, "summary.json"))
    assert len(s["heldout_member_acc_vs_labels"]) == 2
    # normalisation: every member alone, and so their mean, gives the demonstrations mean 0
    rm, _ = load_reward_model(os.path.join(straight, "ckpt.pt"))
    assert isinstance(rm, RewardEnsemble)
    demos = random.Random(1337).sample(read_sft(tiny_world.sft_train), 64)
    for model in [rm, *rm.members]:
        scores = score_texts(model, get_tokenizer(ckpt["tokenizer"]), [d["prompt"] for d in demos],
                             [d["response"] for d in demos], [d.get("ended", True) for d in demos], "cpu")
        assert sum(scores) / len(scores) == pytest.approx(0.0, abs=1e-3)
    assert len(s["normalization"]["member_sample_std_before"]) == 2 and s["normalization"]["ensemble_gain"] > 0

    # crash inside the second member two steps after a checkpoint (checkpoints at even steps), so metrics.jsonl
    # holds a row the checkpoint does not cover; then --resume: the same run, bit for bit, no row twice
    crash_at = next(s for s in range(ms + 4, 2 * ms + 1) if s % 2 == 0)
    log = common.Metrics.log

    def crashing_log(self, **row):
        if row["step"] == crash_at:
            raise Crash
        log(self, **row)
    monkeypatch.setattr(common.Metrics, "log", crashing_log)
    with pytest.raises(Crash):
        reward.train(cfg(split))
    monkeypatch.setattr(common.Metrics, "log", log)
    assert torch.load(os.path.join(split, "ckpt.pt"), weights_only=True)["step"] == crash_at - 2
    assert len(read_jsonl(os.path.join(split, "metrics.jsonl"))) == crash_at - 1
    reward.train(cfg(split, resume=True))
    b = read_jsonl(os.path.join(split, "metrics.jsonl"))
    assert [r["step"] for r in b] == list(range(1, 2 * ms + 1))
    assert a == b  # every metric of every row, bit for bit (reward rows carry no timing)
    timing = ("collect_seconds", "train_seconds", "eval_seconds")
    assert {k: v for k, v in s.items() if k not in timing} == \
        {k: v for k, v in read_json(os.path.join(split, "summary.json")).items() if k not in timing}
    cb = torch.load(os.path.join(split, "ckpt.pt"), weights_only=True)
    assert cb["history"] == ckpt["history"] and cb["finished"]
    assert all(torch.equal(ckpt["reward_model"][k], cb["reward_model"][k]) for k in cb["reward_model"])


def test_bad_command_lines_fail_with_a_clear_message(tmp_path):
    assert_fails_clearly("reward.py", ["--kk=4"], "--kk", "valid keys")
    missing = str(tmp_path / "no_sft" / "ckpt.pt")
    assert_fails_clearly("reward.py", [f"--init_from={missing}", f"--out_dir={tmp_path / 'out'}"], missing)
