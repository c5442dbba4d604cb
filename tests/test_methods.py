"""The step-3 methods beside PPO: dpo.py, grpo.py (RLOO, GRPO, Dr. GRPO), rejection.py and compare.py.

Hand-derived values for the formulas (the DPO loss and implicit reward, the leave-one-out baseline,
group normalisation and its zero-variance case, the k3 estimator, the two loss reductions, rejection
sampling's choice, the held-out split), parity checks (the DPO loss is reward.py's Bradley-Terry loss on
the implicit reward; a padded batch gives each answer's log-prob alone), and tiny runs of each script
through its command line on the session's tiny chain (tests/conftest.py)."""
import math
import os
import random

import pytest
import torch

from common import read_jsonl
from conftest import MAX_NEW_TOKENS, assert_fails_clearly, read_json, run_script
from data.formats import read_comparisons, split_by_prompt
from dpo import dpo_loss, implicit_reward, sequence_logprobs
from engine import load_model
from grpo import (drgrpo_advantages, grpo_advantages, k3_kl, policy_loss, rloo_advantages, sequence_rewards)
from model import GPT, GPTConfig
from reward import bradley_terry_loss
from rejection import select_best


# ----------------------------------------------------------------------------- DPO

def test_dpo_loss_and_implicit_reward_by_hand():
    # beta 0.5; log pi - log pi_ref = +1 for the chosen answer, -1 for the rejected one
    lp, ref = torch.tensor([-3.0, -5.0]), torch.tensor([-4.0, -4.0])
    assert implicit_reward(lp, ref, 0.5).tolist() == pytest.approx([0.5, -0.5])
    loss, margins, (w, l) = dpo_loss(lp, ref, [0, 1], beta=0.5)
    assert margins.tolist() == pytest.approx([1.0])  # 0.5 * (1 - (-1))
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1.0)))  # -log sigmoid(1) = 0.3133
    assert (w.tolist(), l.tolist()) == ([0], [1])
    # the same answers with the ranking reversed: margin -1, loss -log sigmoid(-1) = 1.3133
    assert dpo_loss(lp, ref, [1, 0], 0.5)[0].item() == pytest.approx(math.log(1 + math.e))


def test_dpo_k3_uses_every_pair_of_the_ranking():
    # ranking [2, 0, 1]: pairs (2 over 0), (2 over 1), (0 over 1); implicit rewards beta (lp - ref) = [0, -1, 1]
    lp, ref, beta = torch.tensor([-2.0, -3.0, -1.0]), torch.tensor([-2.0, -2.0, -2.0]), 1.0
    loss, margins, (w, l) = dpo_loss(lp, ref, [2, 0, 1], beta)
    assert (w.tolist(), l.tolist()) == ([2, 2, 0], [0, 1, 1])
    assert margins.tolist() == pytest.approx([1.0, 2.0, 1.0])
    sp = lambda x: math.log(1 + math.exp(-x))  # -log sigmoid(x)
    assert loss.item() == pytest.approx((sp(1) + sp(2) + sp(1)) / 3)


def test_dpo_loss_is_bradley_terry_on_the_implicit_reward():
    g = torch.Generator().manual_seed(0)
    lp, ref = -5 * torch.rand(6, generator=g), -5 * torch.rand(6, generator=g)
    ranking = torch.randperm(6, generator=g).tolist()
    bt_loss, bt_acc, bt_margin = bradley_terry_loss(implicit_reward(lp, ref, 0.3), ranking)
    loss, margins, _ = dpo_loss(lp, ref, ranking, 0.3)
    torch.testing.assert_close(loss, bt_loss)
    torch.testing.assert_close(margins.mean(), bt_margin)
    assert (margins > 0).float().mean() == bt_acc


def test_dpo_at_the_reference_and_its_gradient():
    lp = torch.tensor([-2.0, -3.0, -4.0], requires_grad=True)
    loss, margins, _ = dpo_loss(lp, lp.detach().clone(), [0, 1, 2], beta=0.1)
    assert loss.item() == pytest.approx(math.log(2)) and torch.all(margins == 0)
    loss.backward()
    # pushes the best answer up, the worst down, the middle one (won one pair, lost one) not at all
    assert lp.grad[0] < 0 < lp.grad[2] and lp.grad[1].item() == pytest.approx(0.0, abs=1e-7)


def test_sequence_logprobs_of_a_padded_batch_equal_each_answer_alone():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=24, vocab_size=30, n_layer=1, n_head=2, n_embd=16)).eval()
    prompts, answers = [[1, 2, 3], [4, 5], [6, 7, 8, 9]], [[10, 11], [12, 13, 14, 15], [16]]
    with torch.no_grad():
        batch = sequence_logprobs(model, prompts, answers, pad_id=0, device="cpu")
        for i, (p, a) in enumerate(zip(prompts, answers)):
            logp = torch.log_softmax(model(torch.tensor([p + a]))[0][0], -1)  # (T, V)
            alone = sum(logp[len(p) - 1 + t, tok] for t, tok in enumerate(a))
            torch.testing.assert_close(batch[i], alone)


def test_split_by_prompt_holds_out_whole_prompts():
    comps = [{"prompt": f"p{i % 7}", "responses": ["a", "b"], "ranking": [0, 1]} for i in range(30)]
    train, held = split_by_prompt(comps, 0.3, seed=5)
    held_prompts = {c["prompt"] for c in held}
    assert len(held_prompts) == 2  # int(7 * 0.3)
    assert not held_prompts & {c["prompt"] for c in train} and len(train) + len(held) == 30
    # the rule reward.py had inline before it was shared: a seeded sample of the sorted prompt texts
    assert held_prompts == set(random.Random(5).sample(sorted({c["prompt"] for c in comps}), 2))
    assert split_by_prompt(comps, 0.3, seed=5) == (train, held)


# ----------------------------------------------------------------------------- RLOO, GRPO, Dr. GRPO

def test_leave_one_out_baseline_by_hand():
    # A_i = R_i - mean of the others: 1 - (2+3+4)/3 = -2, 2 - 8/3 = -2/3, 3 - 7/3 = 2/3, 4 - 6/3 = 2
    adv = rloo_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 9.0]), k=4)
    torch.testing.assert_close(adv, torch.tensor([-2.0, -2 / 3, 2 / 3, 2.0, -4 / 3, -4 / 3, -4 / 3, 4.0]))
    # the same as k / (k - 1) (R_i - group mean): the groups never mix
    r = torch.randn(12, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(rloo_advantages(r, 3), 1.5 * drgrpo_advantages(r, 3))


def test_group_normalisation_by_hand_and_its_zero_variance_case():
    # mean 2.5, std with Bessel's correction sqrt((2.25 + 0.25 + 0.25 + 2.25) / 3) = sqrt(5/3) = 1.2910
    adv = grpo_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]), k=4)
    torch.testing.assert_close(adv, torch.tensor([-1.5, -0.5, 0.5, 1.5]) / (math.sqrt(5 / 3) + 1e-4))
    torch.testing.assert_close(drgrpo_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]), 4), torch.tensor([-1.5, -0.5, 0.5, 1.5]))
    same = torch.tensor([0.7, 0.7, 0.7, 0.7, -1.0, 3.0, -1.0, 3.0])  # a group of equal rewards, and a normal one
    for fn in (grpo_advantages, drgrpo_advantages, rloo_advantages):
        out = fn(same, 4)
        assert torch.isfinite(out).all() and torch.all(out[:4] == 0), fn.__name__
    # GRPO scales every group to unit std (up to eps), whatever its spread
    torch.testing.assert_close(grpo_advantages(same, 4)[4:].std(), torch.tensor(1.0), atol=1e-3, rtol=0)


def test_k3_estimator_is_never_negative_and_pulls_toward_the_reference():
    # x = ref - lp: lp -1, ref -2 -> x = -1, e^-1 + 1 - 1 = 0.3679; lp -2, ref -1 -> x = 1, e - 2 = 0.7183
    lp = torch.tensor([-1.0, -2.0, -1.5], requires_grad=True)
    ref = torch.tensor([-2.0, -1.0, -1.5])
    k3 = k3_kl(lp, ref)
    assert k3.tolist() == pytest.approx([math.exp(-1), math.e - 2, 0.0], abs=1e-6)
    k3.sum().backward()
    # d k3 / d lp = 1 - exp(ref - lp): positive where the policy is above the reference (minimising pushes
    # it down), negative where below, 0 where they agree
    assert lp.grad[0] > 0 > lp.grad[1] and lp.grad[2] == 0
    g = torch.Generator().manual_seed(1)
    assert (k3_kl(torch.randn(1000, generator=g), torch.randn(1000, generator=g)) >= 0).all()


def test_sequence_rewards_and_the_two_loss_reductions_by_hand():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    lp = torch.tensor([[-1.0, -1.0, -1.0, 9.0], [-2.0, 9.0, 9.0, 9.0]])
    ref = torch.tensor([[-1.5, -1.0, -2.0, 0.0], [-1.0, 0.0, 0.0, 0.0]])
    # R = score - beta * sum over real tokens of (lp - ref): 1 - 0.1 * 1.5 = 0.85 ; 2 - 0.1 * (-1) = 2.1
    torch.testing.assert_close(sequence_rewards(torch.tensor([1.0, 2.0]), lp, ref, mask, 0.1), torch.tensor([0.85, 2.1]))
    per_token = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 100.0, 100.0, 100.0]])
    # GRPO: mean over each answer's tokens (2 and 4), then over answers: 3
    assert policy_loss(per_token, mask, "grpo", max_new_tokens=4).item() == pytest.approx(3.0)
    # Dr. GRPO and RLOO: token sums / max_new_tokens (6/4 and 4/4), then the mean: 1.25
    for est in ("drgrpo", "rloo"):
        assert policy_loss(per_token, mask, est, max_new_tokens=4).item() == pytest.approx(1.25)


def test_rejection_sampling_picks_the_best_of_each_group():
    scores = torch.tensor([0.1, 0.5, 0.3, -1.0, -2.0, -1.0])
    assert select_best(scores, 3) == [1, 3]  # a tie goes to the first
    assert select_best(scores, 3, min_score=0.0) == [1, None]
    assert select_best(scores, 1) == list(range(6))


# ----------------------------------------------------------------------------- the scripts, tiny

def method_args(world, sft_dir, reward_dir, out_dir, **overrides):
    opts = {"sft": f"{sft_dir}/ckpt.pt", "reward_model": f"{reward_dir}/ckpt.pt", "prompts": world.prompts_ppo,
            "eval_prompts": world.prompts_dev, "out_dir": out_dir, "max_new_tokens": MAX_NEW_TOKENS,
            "eval_samples": 1} | overrides
    return [f"--{k}={v}" for k, v in opts.items()]


def test_grpo_runs_and_the_first_minibatch_ratio_is_exactly_one(tiny_world, sft_run, reward_run, tmp_path):
    out = str(tmp_path / "grpo")
    run_script("grpo.py", *method_args(tiny_world, sft_run, reward_run, out, iterations=2, prompts_per_iter=4, k=4,
                                       minibatch=4, ppo_epochs=2, kl="loss", beta=0.04, save_interval=1))
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert len(rows) == 2
    for r in rows:  # detail 9: the stored log-probs are the policy's own on the first minibatch
        assert r["first_ratio"] == 1.0 and r["first_approx_kl"] == 0.0
        assert r["k3_kl"] >= 0 and 0 <= r["zero_std_groups"] <= 1
    s = read_json(os.path.join(out, "summary.json"))
    assert s["answers_generated"] == s["rm_calls"] == 2 * 16
    for key in ("policy_pass_rate", "sft_pass_rate", "win_rate_vs_sft", "win_rate_ci95", "kl_to_ref"):
        assert key in s, key
    assert os.path.exists(os.path.join(out, "training.png"))
    policy, _ = load_model(os.path.join(out, "ckpt.pt"))
    sft, _ = load_model(os.path.join(sft_run, "ckpt.pt"))
    assert any(not torch.equal(a, b) for a, b in zip(policy.state_dict().values(), sft.state_dict().values()))


def test_rloo_one_update_per_batch_never_clips_and_resume_reproduces(tiny_world, sft_run, reward_run, tmp_path):
    args = dict(estimator="rloo", kl="reward", prompts_per_iter=4, k=2, minibatch=8, ppo_epochs=1, lr=1e-4,
                save_interval=1, eval_prompts="")
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run_script("grpo.py", *method_args(tiny_world, sft_run, reward_run, full, iterations=3, **args))
    rows = read_jsonl(os.path.join(full, "metrics.jsonl"))
    assert all(r["ratio"] == 1.0 and r["clipfrac"] == 0.0 for r in rows)  # REINFORCE: one step on fresh samples
    run_script("grpo.py", *method_args(tiny_world, sft_run, reward_run, part, iterations=2, **args))
    run_script("grpo.py", *method_args(tiny_world, sft_run, reward_run, part, iterations=3, resume="true", **args))
    drop = lambda r: {k: v for k, v in r.items() if "seconds" not in k and k != "elapsed"}
    assert [drop(r) for r in read_jsonl(os.path.join(part, "metrics.jsonl"))] == [drop(r) for r in rows]


def test_dpo_runs_on_the_reward_models_comparisons(tiny_world, sft_run, reward_run, tmp_path):
    out = str(tmp_path / "dpo")
    run_script("dpo.py", f"--sft={sft_run}/ckpt.pt", f"--comparisons={reward_run}/comparisons.jsonl",
               f"--reward_model={reward_run}/ckpt.pt", f"--eval_prompts={tiny_world.prompts_dev}", f"--out_dir={out}",
               "--batch_size=8", "--warmup_steps=2", "--eval_interval=3", "--lr=3e-4", "--eval_samples=1",
               f"--max_new_tokens={MAX_NEW_TOKENS}")
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert rows[0]["step"] == 0 and rows[0]["val_acc_vs_labels"] == 0.5  # every implicit reward is 0: all ties
    steps = [r for r in rows if "loss" in r]
    assert steps and all(k in steps[0] for k in ("chosen_logprob", "rejected_logprob", "chosen_reward", "accuracy"))
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # the first step starts at the reference
    s = read_json(os.path.join(out, "summary.json"))
    # the same held-out pairs as reward.py: its seed (1337) and val_fraction (0.1), the shared split
    train, held = split_by_prompt(read_comparisons(f"{reward_run}/comparisons.jsonl"), 0.1, 1337)
    assert (s["n_train_comparisons"], s["n_heldout_comparisons"]) == (len(train), len(held))
    assert s["rm_heldout_acc_vs_labels"] == read_json(os.path.join(reward_run, "summary.json"))["heldout_acc_vs_labels"]
    assert 0 <= s["heldout_implicit_acc_vs_labels"] <= 1 and s["answers_generated"] == s["rm_calls"] == 0
    assert "policy_gold_mean" in s and "win_rate_vs_sft" in s and os.path.exists(os.path.join(out, "training.png"))


def test_rejection_sampling_two_rounds_through_sft(tiny_world, sft_run, reward_run, tmp_path):
    out = str(tmp_path / "rs")
    run_script("rejection.py", *method_args(tiny_world, sft_run, reward_run, out, rounds=2, prompts_per_round=12, n=4,
                                            chunk=6, epochs=1, batch_size=4))
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert [r["round"] for r in rows] == [1, 2]
    for r in range(2):
        winners = read_jsonl(os.path.join(out, f"round_{r}", "winners.jsonl"))
        assert len(winners) == rows[r]["kept"] <= 12 and all(w["response"].strip() for w in winners)
        assert rows[r]["score_winners"] >= rows[r]["score_all"]  # the best of each group beats the average
        assert os.path.exists(os.path.join(out, f"round_{r}", "ckpt.pt"))  # sft.py's own run
    s = read_json(os.path.join(out, "summary.json"))
    assert s["answers_generated"] == s["rm_calls"] == 2 * 12 * 4 and "policy_pass_rate" in s
    load_model(os.path.join(out, "ckpt.pt"))


def test_compare_writes_one_table_and_the_plot(tiny_world, sft_run, reward_run, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- methods:begin (written by compare.py) -->\nSTALE TABLE\n<!-- methods:end -->\nafter\n")
    results, png = str(tmp_path / "results"), str(tmp_path / "img" / "m.png")
    args = [f"--sft={sft_run}/ckpt.pt", f"--reward_model={reward_run}/ckpt.pt", f"--prompts={tiny_world.prompts_ppo}",
            f"--eval_prompts={tiny_world.prompts_dev}", f"--out_dir={tmp_path / 'runs'}", f"--results={results}",
            f"--plot={png}", f"--readme={readme}", "--budget=64", "--best_of=2", "--eval_samples=1",
            f"--max_new_tokens={MAX_NEW_TOKENS}"]
    run_script("compare.py", *args, timeout=600)
    res = read_json(os.path.join(results, "methods.json"))
    assert list(res["methods"]) == ["ppo", "rloo", "grpo", "drgrpo", "rejection", "dpo", "best_of_n"]
    for name, m in res["methods"].items():
        row = m["per_seed"][0]
        assert row["wall_seconds"] > 0 and 0 <= row["pass"] <= 1, name
        if name in ("ppo", "rloo", "grpo", "drgrpo", "rejection"):
            assert row["answers"] == row["rm_calls"] == 64, name  # the matched budget
    assert res["methods"]["dpo"]["per_seed"][0]["answers"] == 0
    md = open(os.path.join(results, "methods.md")).read()
    assert md.count("\n| ") == 9 and "SFT (the start)" in md  # header + separator... 1 SFT row + 7 methods
    text = readme.read_text()
    assert "STALE TABLE" not in text and "| GRPO (k=4) |" in text and text.endswith("<!-- methods:end -->\nafter\n")
    assert os.path.getsize(png) > 10_000
    # a second call reuses every run (no method's summary is rewritten)
    before = os.path.getmtime(tmp_path / "runs" / "seed_1337" / "ppo" / "summary.json")
    run_script("compare.py", *args, "--methods=ppo")
    assert os.path.getmtime(tmp_path / "runs" / "seed_1337" / "ppo" / "summary.json") == before


def test_bad_command_lines_fail_with_a_clear_message(tmp_path):
    assert_fails_clearly("grpo.py", ["--estimator=ppo", f"--out_dir={tmp_path}"], "--estimator")
    assert_fails_clearly("grpo.py", ["--k=1", f"--out_dir={tmp_path}"], "--k=1")
    assert_fails_clearly("compare.py", ["--methods=ppo,sac", f"--out_dir={tmp_path}"], "--methods")
    assert_fails_clearly("compare.py", ["--budget=100", f"--out_dir={tmp_path}"], "--budget=100")
    assert_fails_clearly("rejection.py", ["--reward=human", f"--out_dir={tmp_path}"], "--reward")
