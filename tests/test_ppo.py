"""ppo.py: the RLHF formulas by hand or against a brute-force reference (GAE, clipped losses, KL penalty,
per-token rewards, masked statistics, Ziegler's controller), the answer-token alignment of ActorCritic,
and tiny runs through the command line: ratio exactly 1 on the first minibatch, and a gold-reward run
whose gold score clearly rises."""
import copy
import types
import math
import os

import numpy as np
import pytest
import torch

from conftest import assert_fails_clearly, ppo_args, read_json, run_script
from common import read_jsonl
from engine import RewardModel, left_pad, load_model
from model import GPT, GPTConfig, token_logprobs
from ppo import ActorCritic, adaptive_beta, compute_gae, explained_variance, per_token_rewards, ppo_losses
from rl import disable_dropout, entropy_from_logits, kl_penalty, masked_mean, masked_whiten


def tiny_gpt(seed=0, vocab=30):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=24, vocab_size=vocab, n_layer=1, n_head=2, n_embd=16)).eval()


# ----------------------------------------------------------------------------- masked statistics

def test_masked_mean_and_whiten_ignore_padding():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(3.0)  # (1+2+3+4+5) / 5
    assert masked_mean(x, mask, dim=1).tolist() == pytest.approx([2.0, 4.5])
    # mean 3, variance E[x^2] - 9 = 55/5 - 9 = 2
    expected = torch.tensor([[-2.0, -1.0, 0.0, 0.0], [1.0, 2.0, 0.0, 0.0]]) / math.sqrt(2)
    torch.testing.assert_close(masked_whiten(x, mask), expected)
    torch.testing.assert_close(masked_whiten(x, mask, shift_mean=False), (expected + 3.0) * mask)
    y = x.clone()
    y[mask == 0] = torch.tensor([-7.0, 1e4, 3.0])  # other padding values: same results
    assert masked_mean(y, mask) == masked_mean(x, mask)
    torch.testing.assert_close(masked_whiten(y, mask), expected)


def test_explained_variance_and_entropy():
    returns = torch.tensor([[1.0, 2.0, 4.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(returns.clone(), returns, mask) == pytest.approx(1.0)  # perfect critic
    assert explained_variance(torch.zeros_like(returns), returns, mask) == pytest.approx(0.0)  # constant critic
    assert entropy_from_logits(torch.zeros(2, 8)).tolist() == pytest.approx([math.log(8)] * 2)
    assert entropy_from_logits(torch.tensor([[50.0, 0.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)
    # at the sampling temperature: logits (log 3, 0) at T = 1 are p = (3/4, 1/4); at T = 2, (sqrt 3, 1) / (sqrt 3 + 1)
    logits = torch.tensor([[math.log(3.0), 0.0]])
    h = lambda p: -sum(x * math.log(x) for x in p)
    assert entropy_from_logits(logits).item() == pytest.approx(h([0.75, 0.25]), rel=1e-5)
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    assert entropy_from_logits(logits, temperature=2.0).item() == pytest.approx(h([p, 1 - p]), rel=1e-5)


def test_dropout_off_everywhere_including_attention():
    """rl.disable_dropout also turns off the attention dropout (a float handed to SDPA, not an nn.Dropout):
    in train mode, two forward passes of the same tokens then give the same log-probs."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=24, vocab_size=30, n_layer=1, n_head=2, n_embd=16, dropout=0.5)).train()
    critic = RewardModel(GPT(GPTConfig(block_size=24, vocab_size=30, n_layer=1, n_head=2, n_embd=16, dropout=0.5)))
    seq = torch.randint(30, (2, 10), generator=torch.Generator().manual_seed(1))
    assert not torch.equal(model(seq)[0], model(seq)[0])  # dropout on: two passes differ
    for m in (model, critic):
        disable_dropout(m)
    assert model.transformer.h[0].attn.dropout == 0.0 and model.config.dropout == 0.0
    torch.testing.assert_close(model(seq)[0], model(seq)[0], atol=0, rtol=0)
    critic.train()
    torch.testing.assert_close(critic.values(seq, torch.ones_like(seq)), critic.values(seq, torch.ones_like(seq)),
                               atol=0, rtol=0)


# ----------------------------------------------------------------------------- rewards and advantages

def test_kl_penalty_by_hand_and_zero_for_the_reference_itself():
    kl = kl_penalty(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]), beta=0.1)
    assert kl.tolist() == pytest.approx([-0.05, 0.1])  # -beta (logp - ref_logp)
    policy = tiny_gpt()
    ref = copy.deepcopy(policy)
    seq = torch.randint(30, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lp = token_logprobs(policy(seq)[0][:, :-1], seq[:, 1:], temperature=0.7)
        ref_lp = token_logprobs(ref(seq)[0][:, :-1], seq[:, 1:], temperature=0.7)
        assert torch.all(kl_penalty(lp, ref_lp, 0.05) == 0)
        # a reference that differs (the tied embedding moved): a penalty appears
        ref.transformer.wte.weight.add_(0.3 * torch.randn(30, 16, generator=torch.Generator().manual_seed(1)))
        moved = token_logprobs(ref(seq)[0][:, :-1], seq[:, 1:], temperature=0.7)
        assert kl_penalty(lp, moved, 0.05).abs().max() > 1e-4


def test_per_token_rewards_put_the_score_on_the_end_token():
    END, PAD, beta = 9, 0, 0.1
    # a rollout: prompts LEFT padded, answers of different lengths right padded after <|end|>;
    # the last answer never ended (the score then sits on its last token)
    prompts, _ = left_pad([[1, 2, 3], [4, 5], [6], [7, 8, 2]], PAD)
    resp = torch.tensor([[3, END, PAD, PAD, PAD],
                         [3, 4, 5, 6, END],
                         [5, 5, END, PAD, PAD],
                         [1, 2, 3, 4, 5]])
    rmask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).float()
    scores = torch.tensor([1.0, 2.0, 3.0, -1.0])
    g = torch.Generator().manual_seed(0)
    logprobs, ref_logprobs = -torch.rand(4, 5, generator=g), -torch.rand(4, 5, generator=g)
    rewards = per_token_rewards(scores, logprobs, ref_logprobs, rmask, beta)
    expected = -beta * (logprobs - ref_logprobs) * rmask
    for b, t in enumerate([1, 4, 2, 4]):
        assert resp[b, t] == END or b == 3
        expected[b, t] += scores[b]
    torch.testing.assert_close(rewards, expected)
    assert torch.all(rewards[rmask == 0] == 0)  # nothing is ever written at a padding slot
    assert prompts.shape == (4, 3)


def brute_force_gae(rewards, values, mask, gamma, lam):
    """A_t = sum_k (gamma lam)^k delta_{t+k} over the real tokens, delta_t = r_t + gamma V_{t+1} - V_t,
    with V = 0 after the last real token. Real tokens are a prefix of each row."""
    A = torch.zeros_like(rewards)
    for b in range(rewards.size(0)):
        n = int(mask[b].sum())
        for t in range(n):
            for k in range(n - t):
                nxt = values[b, t + k + 1] if t + k + 1 < n else 0.0
                delta = rewards[b, t + k] + gamma * nxt - values[b, t + k]
                A[b, t] += (gamma * lam) ** k * delta
    return A, (A + values) * mask


def test_gae_by_hand_with_padding_at_the_end():
    # gamma = 1, lam = 0.95, two real tokens then padding (garbage rewards/values there must not matter):
    # delta_1 = r_1 + 0 - V_1 = 1 - 0.2 = 0.8          A_1 = 0.8
    # delta_0 = r_0 + V_1 - V_0 = 0 + 0.2 - 0.5 = -0.3  A_0 = -0.3 + 0.95 * 0.8 = 0.46
    # returns = A + V = [0.96, 1.0]
    rewards = torch.tensor([[0.0, 1.0, 5.0, 5.0]])
    values = torch.tensor([[0.5, 0.2, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    adv, ret = compute_gae(rewards, values, mask, gamma=1.0, lam=0.95)
    torch.testing.assert_close(adv, torch.tensor([[0.46, 0.8, 0.0, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.96, 1.0, 0.0, 0.0]]))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (1.0, 0.0)])
def test_gae_equals_the_brute_force_sum(gamma, lam):
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    mask = (torch.arange(7) < torch.tensor([[7], [3], [1], [5]])).float()
    adv, ret = compute_gae(rewards, values, mask, gamma, lam)
    ref_adv, ref_ret = brute_force_gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, ref_adv)
    torch.testing.assert_close(ret, ref_ret)
    if gamma == 1.0 and lam == 1.0:  # Monte Carlo: return = sum of the remaining rewards
        mc = torch.flip(torch.cumsum(torch.flip(rewards * mask, [1]), 1), [1]) * mask
        torch.testing.assert_close(ret, mc)


# ----------------------------------------------------------------------------- the PPO losses

def test_ppo_clipped_losses_by_hand():
    # four tokens (advantage, ratio) with clip 0.2, and a padded fifth token with absurd values
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 100.0])
    ratio = torch.tensor([1.5, 0.5, 1.5, 0.5, 9.0])
    old_lp = torch.tensor([-1.0, -2.0, -0.5, -3.0, -1.0])
    logprobs = (old_lp + ratio.log()).requires_grad_(True)
    mask = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])
    # values: old 0, returns 1; new 0.5 (clipped to 0.2 -> loss 0.64 wins) and 0.1 (inside the clip: 0.81)
    values = torch.tensor([0.5, 0.1, 0.5, 0.1, 7.0])
    zeros, returns = torch.zeros(5), torch.tensor([1.0, 1.0, 1.0, 1.0, -9.0])
    pg, vf, st = ppo_losses(logprobs, old_lp, adv, values, zeros, returns, mask, clip_range=0.2, vf_clip=0.2)
    # per token: max(-A r, -A clip(r, 0.8, 1.2))
    #   A=+1 r=1.5: max(-1.5, -1.2) = -1.2 (clipped: no gain from moving further)
    #   A=+1 r=0.5: max(-0.5, -0.8) = -0.5 (unclipped: the pessimistic bound)
    #   A=-1 r=1.5: max( 1.5,  1.2) =  1.5 (unclipped)
    #   A=-1 r=0.5: max( 0.5,  0.8) =  0.8 (clipped)
    assert pg.item() == pytest.approx((-1.2 - 0.5 + 1.5 + 0.8) / 4)
    assert vf.item() == pytest.approx(0.5 * (0.64 + 0.81 + 0.64 + 0.81) / 4)
    assert st["ratio"] == pytest.approx(1.0) and st["clipfrac"] == 1.0 and st["vf_clipfrac"] == 0.5
    # k3 estimator (r - 1) - log r: 0.0945 at r = 1.5, 0.1931 at r = 0.5
    assert st["approx_kl"] == pytest.approx(((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))) / 2, rel=1e-5)
    pg.backward()
    # d/dlogp (-A r) = -A r on the unclipped tokens, 0 on the clipped ones and the padding; / 4 tokens
    torch.testing.assert_close(logprobs.grad, torch.tensor([0.0, -0.5, 1.5, 0.0, 0.0]) / 4)


def test_ratio_is_exactly_one_when_nothing_changed():
    g = torch.Generator().manual_seed(0)
    lp, adv = -torch.rand(3, 6, generator=g), torch.randn(3, 6, generator=g)
    mask = torch.ones(3, 6)
    pg, _, st = ppo_losses(lp, lp.clone(), adv, torch.zeros(3, 6), torch.zeros(3, 6), torch.zeros(3, 6), mask, 0.2, 0.2)
    assert st["ratio"] == 1.0 and st["approx_kl"] == 0.0 and st["clipfrac"] == 0.0
    assert pg.item() == pytest.approx(-masked_mean(adv, mask).item())  # plain policy gradient surrogate


def test_adaptive_beta_by_hand():
    # Ziegler et al. 2019: e = clip(KL / target - 1, -0.2, 0.2); beta *= 1 + e * n / horizon
    assert adaptive_beta(0.1, kl=9.0, target=6.0, n_steps=64, horizon=10000) == pytest.approx(0.1 * (1 + 0.2 * 0.0064))
    assert adaptive_beta(0.1, kl=6.6, target=6.0, n_steps=64, horizon=10000) == pytest.approx(0.1 * (1 + 0.1 * 0.0064))
    assert adaptive_beta(0.1, kl=0.0, target=6.0, n_steps=64, horizon=10000) == pytest.approx(0.1 * (1 - 0.2 * 0.0064))
    assert adaptive_beta(0.1, kl=6.0, target=6.0, n_steps=64, horizon=10000) == pytest.approx(0.1)


@pytest.mark.parametrize("shared", [False, True])
def test_actor_critic_aligns_answer_tokens_with_the_unpadded_sequence(shared):
    """ActorCritic's outputs at answer position t are the policy's prediction of answer token t (and the
    value of the state before it), as if each sequence were run alone without padding."""
    policy = tiny_gpt(seed=1)
    torch.manual_seed(2)
    critic = RewardModel(policy) if shared else RewardModel(tiny_gpt(seed=3))
    ac = ActorCritic(policy, critic, shared).eval()
    prompts, answers = [[1, 2, 3], [4, 5, 6, 7, 8]], [[9, 10, 11, 12], [13, 14]]
    pids, pmask = left_pad(prompts, 0)
    resp = torch.tensor([[9, 10, 11, 12], [13, 14, 0, 0]])
    rmask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    seq, mask, P = torch.cat([pids, resp], 1), torch.cat([pmask, rmask], 1), pids.size(1)
    with torch.no_grad():
        logits0, _ = ac(seq, mask, P)
    logits, values = ac(seq, mask, P)  # with autograd, as in the update: the very same numbers
    assert torch.equal(logits0, logits.detach())
    lp = token_logprobs(logits, resp).detach()
    for b, (p, a) in enumerate(zip(prompts, answers)):
        alone = torch.tensor([p + a])
        ones = torch.ones_like(alone)
        with torch.no_grad():
            ref_lp = token_logprobs(policy(alone)[0][:, len(p) - 1:-1], torch.tensor([a]))[0]
            ref_v = critic.values(alone, ones)[0, len(p) - 1:-1]
        torch.testing.assert_close(lp[b, :len(a)], ref_lp, atol=1e-5, rtol=0)
        torch.testing.assert_close(values[b, :len(a)].detach(), ref_v, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- tiny runs

def test_tiny_run_first_minibatch_ratio_is_exactly_one(ppo_run):
    rows = read_jsonl(os.path.join(ppo_run, "metrics.jsonl"))
    assert [r["iteration"] for r in rows] == [1, 2]
    for r in rows:  # N implementation details #9: the rollout's log-probs come from the same minibatches
        assert r["first_ratio"] == 1.0 and r["first_approx_kl"] == 0.0
        for key in ("reward", "kl_to_ref", "approx_kl", "clipfrac", "entropy", "explained_variance", "gold",
                    "ptx_loss"):
            assert math.isfinite(r[key]), key
    assert rows[0]["kl_to_ref"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    assert all(r["rm_disagreement"] > 0 for r in rows)  # an ensemble's members trained from different seeds differ


def test_tiny_run_summary_and_checkpoint(ppo_run):
    s = read_json(os.path.join(ppo_run, "summary.json"))
    assert s["iterations"] == 2
    for key in ("sft_gold_mean", "policy_gold_mean", "sft_pass_rate", "policy_pass_rate", "win_rate_vs_sft"):
        assert 0.0 <= s[key] <= 1.0, key
    lo, hi = s["win_rate_ci95"]
    assert lo <= s["win_rate_vs_sft"] <= hi
    assert math.isfinite(s["kl_to_ref"]) and math.isfinite(s["alignment_tax"])
    ckpt = torch.load(os.path.join(ppo_run, "ckpt.pt"), weights_only=True)
    assert ckpt["iteration"] == 2 and "critic" in ckpt
    model, _ = load_model(os.path.join(ppo_run, "ckpt.pt"))  # chat.py / evaluate.py can load the policy
    assert isinstance(model, GPT)


@pytest.fixture(scope="module")
def ppo_gold_run(tiny_world, pretrain_run, sft_run, reward_run):
    """Oracle mode: the gold judge is the reward. A large learning rate and a small KL coefficient so the
    tiny policy improves within ~16 iterations of 32 prompts (~9 s). The critic starts from the tiny
    reward model, whose values before the last token are far off (explained variance ~ -12 at first),
    so the first iterations mostly teach the critic."""
    out = os.path.join(tiny_world.root, "ppo_gold")
    run_script("ppo.py", *ppo_args(tiny_world, sft_run, reward_run, pretrain_run, out, reward="gold",
                                   eval_prompts="", iterations=16, rollout_batch=32, minibatch=8, lr=1e-3,
                                   beta=0.01, ptx_coef=0, ppo_epochs=4))  # plain PPO, 4 epochs: what 16 its need
    return out


def test_ppo_on_the_gold_reward_raises_it(ppo_gold_run):
    rows = read_jsonl(os.path.join(ppo_gold_run, "metrics.jsonl"))
    assert len(rows) == 16
    gold = [r["gold"] for r in rows]
    assert all(r["rm_score"] == pytest.approx(r["gold"], abs=1e-6) for r in rows)  # raw score = gold in this mode
    before, after = sum(gold[:2]) / 2, sum(gold[-4:]) / 4
    assert after > before + 0.1, gold  # ~0.21 -> ~0.4 on the tiny world; noise per iteration ~0.03
    assert all(r["first_ratio"] == 1.0 and r["first_approx_kl"] == 0.0 for r in rows)
    assert rows[-1]["kl_to_ref"] > 0.1  # it got there by moving away from the reference


def test_bad_command_lines_fail_with_a_clear_message(tiny_world, pretrain_run, sft_run, reward_run, tmp_path):
    assert_fails_clearly("ppo.py", ["--betta=0.1"], "--betta", "valid keys", "beta")
    missing = str(tmp_path / "no_sft" / "ckpt.pt")
    assert_fails_clearly("ppo.py", [f"--sft={missing}", f"--out_dir={tmp_path / 'out'}"], missing)
    # PPO-ptx on pretraining tokens of another tokenizer (ids beyond the policy's 400-token vocabulary)
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    for name in ("train.bin", "val.bin"):
        np.arange(1000, 3000, dtype=np.uint16).tofile(tokens / name)
    args = ppo_args(tiny_world, sft_run, reward_run, pretrain_run, str(tmp_path / "out"), ptx_coef=0.1)
    args = [a for a in args if not a.startswith("--pretrain_tokens=")] + [f"--pretrain_tokens={tokens}"]
    assert_fails_clearly("ppo.py", args, str(tokens / "val.bin"), "vocabulary")


def test_default_ppo_ptx_without_its_tokens_is_plain_ppo_and_an_explicit_one_is_an_error(
        tiny_world, sft_run, reward_run, tmp_path, monkeypatch, capsys):
    """PPO-ptx is on by default; with the default --pretrain_tokens missing (no pretrain.py run: a GPT-2
    start, your own data) the default is plain PPO with one note, while a coefficient or a folder the user
    named that cannot be used is an error naming that option."""
    import ppo
    missing = str(tmp_path / "runs" / "pretrain" / "tokens")
    monkeypatch.setattr(ppo.Config, "pretrain_tokens", missing)  # "the default" as load_ptx_tokens reads it
    vocab = types.SimpleNamespace(vocab_size=400, block_size=64)
    assert ppo.Config.ptx_coef > 0
    assert ppo.load_ptx_tokens(ppo.Config(pretrain_tokens=missing), vocab) is None
    assert capsys.readouterr().out.count("note: PPO-ptx off (plain PPO, no alignment tax)") == 1
    assert ppo.load_ptx_tokens(ppo.Config(pretrain_tokens=""), vocab) is None  # asked for: no note
    assert capsys.readouterr().out == ""
    with pytest.raises(SystemExit, match=r"--ptx_coef=0.5 needs --pretrain_tokens"):
        ppo.load_ptx_tokens(ppo.Config(pretrain_tokens="", ptx_coef=0.5), vocab)
    typo = r"--pretrain_tokens=\S+/typo: PPO-ptx \(on by default\) needs \S+/typo/train.bin"
    with pytest.raises(SystemExit, match=typo):
        ppo.load_ptx_tokens(ppo.Config(pretrain_tokens=str(tmp_path / "typo")), vocab)
    # setup turns the default coefficient off, so the run is plain PPO and its saved config says so
    run = ppo.setup(ppo.Config(sft=f"{sft_run}/ckpt.pt", reward_model=f"{reward_run}/ckpt.pt",
                               prompts=tiny_world.prompts_ppo, eval_prompts="", pretrain_tokens=missing,
                               out_dir=str(tmp_path / "out"), device="cpu"))
    assert run.ptx is None and run.cfg.ptx_coef == 0.0
    assert "note: PPO-ptx off" in capsys.readouterr().out


def test_answers_stop_at_their_first_special_token_and_the_reward_model_reads_their_text(tiny_world, sft_run,
                                                                                         reward_run):
    """An answer never runs on past a special token: the judge reads the text before the first special
    token and "ended" says whether that token is <|end|>, so both describe the same answer; and the
    rollout's reward-model score is the score of that text encoded afresh (what reward.py trains on),
    not of the sampled ids, which can be another segmentation of the same text."""
    from data.formats import read_prompts
    from engine import generate_answers, load_reward_model, score_texts
    from rl import rollout
    from tokenizer import get_tokenizer
    policy, ckpt = load_model(os.path.join(sft_run, "ckpt.pt"))
    tok = get_tokenizer(ckpt["tokenizer"])
    rows = read_prompts(tiny_world.prompts_ppo)[:24]
    hot = generate_answers(policy, tok, [r["prompt"] for r in rows], n=4, temperature=3.0, max_new_tokens=32, seed=0)
    answers = [a for ans in hot for a in ans]
    assert sum(bool(tok.special_ids & set(a["ids"])) for a in answers) > 10  # hot sampling hits special tokens
    for a in answers:
        specials = [i for i, t in enumerate(a["ids"]) if t in tok.special_ids]
        assert specials in ([], [len(a["ids"]) - 1])  # at most one, and only as the last token
        assert a["ended"] == (a["ids"][-1:] == [tok.end_id])
        assert a["text"] == tok.decode_response(a["ids"])
    rm, _ = load_reward_model(os.path.join(reward_run, "ckpt.pt"))
    cfg = types.SimpleNamespace(max_new_tokens=32, temperature=3.0, reward="rm")
    ro = rollout(policy, copy.deepcopy(policy), rm.eval(), tok, rows, cfg, "cpu", torch.Generator().manual_seed(0))
    expected = score_texts(rm, tok, [r["prompt"] for r in rows], ro["texts"], ro["ended"].tolist(), "cpu")
    torch.testing.assert_close(ro["raw_scores"], torch.tensor(expected), atol=1e-5, rtol=0)
