"""What every step-3 method shares: the prompts, the rollout, its scores, masked statistics, the KL penalty,
the clipped surrogate and the final evaluation.

ppo.py imports these, and so do grpo.py, rejection.py and dpo.py (its frozen reference and final evaluation),
so that they all read prompts, sample, score, handle the end of an answer and evaluate the same way (a
method that wants k answers per prompt repeats each prompt row k times). The numbered details are those
of docs/RLHF_DETAILS.md.

1. The rollout (detail 3): prompts are left-padded, answers sampled with the KV cache at temperature T
   (detail 2: every log-prob is then computed from logits / T); each answer stops at its first special
   token (it ended if that is <|end|>), what follows is padding with mask 0 (detail 5).
2. Scores: the frozen reward model reads the answer's text encoded afresh with the chat template (what
   reward.py trains it on; the sampled ids can be a different segmentation of the same text) and scores
   its last real token; an ensemble's score is its members' mean, and their variance is kept as a diagnostic (the members
   disagree most where the policy has left the data they were trained on). With reward "gold" the
   gold judge is the reward instead (oracle mode: the embedded world's, or the user's --judge),
   normalised with the mean and std of the first rollout's answers, since the reward model's
   normalisation (detail 7) does not apply to it. The judge's verdicts are kept for logging either way.
3. The EOS trick (detail 5): an answer that never ends gets the fixed score `no_eos_score`.
4. Masked means everywhere (detail 10): padding and after-EOS tokens never enter a statistic;
   whitening uses statistics over every rank's real tokens.
5. The clipped surrogate (Schulman et al. 2017) is one function, `clipped_surrogate`, returning the
   per-token loss: PPO takes its masked mean over the minibatch's tokens, grpo.py reduces it per answer.
6. The prompts (`read_prompt_files`): rollout and held-out prompt rows, read and checked before a run
   writes anything; a prompt too long to answer within the context is dropped with a count. The gold
   judge reads a row's "world" field (data.world.judge_row): held-out rows without one are not
   evaluated, and oracle mode (reward "gold") needs it on every rollout prompt. The trained policy's
   final evaluation against SFT is evaluate.compare_to_reference for every method (`final_evaluation`).
7. --resume: a rollout's own random streams (`stream_state`), and the minibatch order seeded by
   (seed, iteration, epoch) (`epoch_orders`), so an iteration draws the same after a resume.

Shapes: B answers in the rollout, P prompt length (left-padded), N answer length (right-padded).
"""
import math
import time
import types

import torch

from common import all_reduce_sum, follow_data, pick_device, set_seed
from data import world as W
from engine import RewardEnsemble, encode_answers, left_pad, load_model, load_reward_model, set_dropout
from evaluate import compare_to_reference, judged_prompts
from model import token_logprobs
from tokenizer import get_tokenizer


# ----------------------------------------------------------------------------- prompts

def read_prompt_files(cfg, tok, block_size):
    """The rollout prompts (cfg.prompts) and the held-out prompts (cfg.eval_prompts, "" = none), each with its
    judge (evaluate.resolve_judge of cfg.judge: None, with a note, where none can judge them). A prompt too
    long to answer within the context is dropped at load time, with a count and its line numbers: it cannot
    be answered at all, and a few long prompts in a public dataset should not stop a run (all of them
    dropped is an error). Returns (rows, judge, eval_rows, eval_judge)."""
    rows, judge = judged_prompts(cfg.prompts, cfg.judge, tok, cfg.max_new_tokens, block_size, "the rollouts' gold")
    if cfg.reward == "gold" and judge is None:
        raise SystemExit(f"error: --reward=gold needs a gold judge of the prompts of {cfg.prompts} (--judge)")
    return (rows, judge, *judged_prompts(cfg.eval_prompts, cfg.judge, tok, cfg.max_new_tokens, block_size))


def load_online_inputs(cfg):
    """What grpo.py and rejection.py start from, after their option checks (ppo.py does the same under
    torchrun): the defaults that follow the data (common.follow_data: with your own --prompts, the world's
    held-out prompts are not read), threads and seed, the device, the SFT model and its tokenizer, the
    frozen reward model (of the same tokenizer, normalised) and the prompt files with their judges.
    Returns a namespace: cfg (resolved), device, sft, tok, rm, rows, judge, eval_rows, eval_judge."""
    cfg = follow_data(cfg, "prompts", {
        "eval_prompts": "no held-out evaluation; pass --eval_prompts=<held-out prompts> [--judge=FILE.py:function]"},
        checkpoints=("sft", "reward_model"))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    device = pick_device(cfg.device).device
    sft, ckpt = load_model(cfg.sft, device)
    tok = get_tokenizer(ckpt.get("tokenizer", "embedded"))
    rm = frozen(load_reward_model(cfg.reward_model, device, tok, normalized=True)[0])
    rows, judge, eval_rows, eval_judge = read_prompt_files(cfg, tok, min(sft.config.block_size,
                                                                          rm.gpt.config.block_size))
    return types.SimpleNamespace(cfg=cfg, device=device, sft=sft, tok=tok, rm=rm, rows=rows, judge=judge,
                                 eval_rows=eval_rows, eval_judge=eval_judge)


def final_evaluation(policy, ref, tok, eval_rows, cfg, device, judge=W.judge_row):
    """Every step-3 method's last word: evaluate.compare_to_reference of the trained policy against the
    reference (SFT) on the held-out rows ({} without any), cfg.eval_samples answers per prompt at
    cfg.temperature from cfg.seed, judged by `judge` (None: what needs no judge), and the seconds it took
    (eval_seconds)."""
    t0 = time.time()
    out = compare_to_reference(policy, ref, tok, eval_rows, cfg.eval_samples, cfg.temperature, device,
                               cfg.max_new_tokens, seed=cfg.seed, judge=judge) if eval_rows else {}
    return out | {"eval_seconds": round(time.time() - t0, 1)}


# ----------------------------------------------------------------------------- masked statistics

def masked_mean(x, mask, dim=None):
    """Mean of x over positions where mask is 1 (padding and after-EOS tokens never count)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def global_masked_mean(x, mask):
    """masked_mean over the real tokens of every rank (all-reduced sum and count under torchrun)."""
    mask = mask.to(x.dtype)
    total = all_reduce_sum(torch.stack([(x * mask).sum(), mask.sum()]))
    return total[0] / total[1].clamp(min=1)


def masked_whiten(x, mask, shift_mean=True):
    """(x - mean) / std over real tokens, with global statistics across ranks under torchrun."""
    mask = mask.to(x.dtype)
    stats = all_reduce_sum(torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]))
    mean = stats[0] / stats[2]
    var = stats[1] / stats[2] - mean ** 2
    out = (x - mean) * torch.rsqrt(var.clamp(min=0) + 1e-8)
    return (out if shift_mean else out + mean) * mask


def entropy_from_logits(logits, temperature=1.0):
    """Entropy of the distribution the tokens were sampled from: softmax(logits / temperature)."""
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip_range):
    """PPO's clipped surrogate objective per token, as a loss (Schulman et al. 2017, eq. 7):
    max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) with rho = pi / pi_old = exp(logprobs - old_logprobs).
    Every clipped step-3 method uses it; each reduces the per-token loss its own way. Returns (per-token
    loss (B, N), stats: masked means of the ratio, approx_kl (the k3 estimator (rho - 1) - log rho, >= 0) and
    the clip fraction)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    loss = torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range))
    with torch.no_grad():
        stats = {"ratio": masked_mean(ratio, mask).item(),
                 "approx_kl": masked_mean((ratio - 1) - log_ratio, mask).item(),
                 "clipfrac": masked_mean(((ratio - 1).abs() > clip_range).float(), mask).item()}
    return loss, stats


def kl_penalty(logprobs, ref_logprobs, beta):
    """Per-token KL-penalty reward -beta * (log pi(y_t) - log pi_ref(y_t)) (Ziegler et al. 2019)."""
    return -beta * (logprobs - ref_logprobs)


def disable_dropout(model):
    """Detail 1: dropout off (attention dropout included), so that the policy's and the reference's
    log-probs of the same tokens agree."""
    return set_dropout(model, 0.0)


def frozen(model):
    """A model that only scores (the reference, the reward model): dropout off, eval mode, no gradients."""
    return disable_dropout(model).eval().requires_grad_(False)


def answer_logprobs(policy, ro, rows, temperature):
    """The policy's logits and log-probs (at the sampling temperature, detail 2) of the answer tokens of
    rollout rows `rows` (an index tensor): (B, N, V), (B, N)."""
    logits = policy(ro["seq"][rows], attention_mask=ro["mask"][rows])[0][:, ro["P"] - 1:-1]
    return logits, token_logprobs(logits, ro["resp"][rows], temperature)


# ----------------------------------------------------------------------------- rollouts

@torch.no_grad()
def rollout(policy, ref, rm, tok, rows, cfg, device, generator, judge=W.judge_row):
    """Sample one answer per prompt row, score it, and compute the reference's log-probs of its tokens.
    Reads cfg.max_new_tokens, cfg.temperature and cfg.reward. judge(row, text, ended): the gold judge of the
    rows (evaluate.resolve_judge), None for none; the default, the embedded world's, judges the rows that
    carry its "world" field. Returns a dict of tensors and lists ("judged": a verdict or None per answer)."""
    prompt_ids, prompt_mask = left_pad([tok.render_chat(r["prompt"])[0] for r in rows], tok.pad_id)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    policy.eval()
    resp, resp_mask = policy.generate(prompt_ids, attention_mask=prompt_mask, max_new_tokens=cfg.max_new_tokens,
                                      temperature=cfg.temperature, eos_id=tok.special_ids, pad_id=tok.pad_id,
                                      generator=generator)
    resp_mask = resp_mask.long()
    seq = torch.cat([prompt_ids, resp], dim=1)  # (B, P + N)
    mask = torch.cat([prompt_mask, resp_mask], dim=1)
    P = prompt_ids.size(1)
    ended = ((resp == tok.end_id) & resp_mask.bool()).any(dim=1)
    texts = [tok.decode_response([t for t, m in zip(r, mk) if m]) for r, mk in zip(resp.tolist(), resp_mask.tolist())]
    judged = [None if judge is None or (judge is W.judge_row and not r.get("world")) else judge(r, t, bool(e))
              for r, t, e in zip(rows, texts, ended.tolist())]
    disagreement = None  # variance of an ensemble's member scores, per answer
    if cfg.reward == "gold":
        scores = torch.tensor([j["score"] for j in judged], device=device)
    else:  # the reward model reads what it was trained on: the answer's text, encoded afresh (not the sampled ids)
        rm_ids, rm_mask = left_pad([encode_answers(tok, r["prompt"], [t], [e], rm.gpt.config.block_size)[0]
                                    for r, t, e in zip(rows, texts, ended.tolist())], tok.pad_id)
        rm_ids, rm_mask = rm_ids.to(device), rm_mask.to(device)
        if isinstance(rm, RewardEnsemble):
            member_scores = rm.member_scores(rm_ids, rm_mask).float()  # (E, B)
            scores, disagreement = member_scores.mean(0), member_scores.var(0, unbiased=False)
        else:
            scores = rm(rm_ids, rm_mask).float()
    ref_logits = ref(seq, attention_mask=mask)[0][:, P - 1:-1]
    ref_logprobs = token_logprobs(ref_logits, resp, cfg.temperature)
    return {"seq": seq, "mask": mask, "P": P, "resp": resp, "resp_mask": resp_mask, "ended": ended,
            "raw_scores": scores, "disagreement": disagreement, "ref_logprobs": ref_logprobs, "texts": texts,
            "judged": judged}


def stream_state(gen, prompt_rng):
    """A rollout's own random streams (the answers' sampling generator, the prompt choice), for a checkpoint."""
    return {"gen_state": gen.get_state(), "prompt_rng": list(prompt_rng.getstate()[1])}


def set_stream_state(gen, prompt_rng, state):
    """--resume: the streams of stream_state back in place."""
    gen.set_state(state["gen_state"])
    prompt_rng.setstate((3, tuple(state["prompt_rng"]), None))


def epoch_orders(n, epochs, seed, iteration):
    """One permutation of the n rollout rows per epoch of updates, seeded by (seed, iteration, epoch): the
    minibatches of an iteration are the same after a --resume without a saved stream."""
    return [torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919 * iteration + e))
            for e in range(epochs)]


def gold_means(judged):
    """The gold judge's mean score and pass rate of the judged answers (None entries: rows without a world
    record); {} when none was judged."""
    judged = [j for j in judged if j]
    if not judged:
        return {}
    return {"gold": sum(j["score"] for j in judged) / len(judged), "gold_pass": sum(j["pass"] for j in judged) / len(judged)}


def training_summary(rows):
    """From an online method's metrics rows: the seconds spent sampling and updating, and the KL to the
    reference over the last 5 iterations (the KL at the end of training)."""
    return {"rollout_seconds": round(sum(r["rollout_seconds"] for r in rows), 1),
            "update_seconds": round(sum(r["update_seconds"] for r in rows), 1),
            "kl_to_ref_train": sum(r["kl_to_ref"] for r in rows[-5:]) / len(rows[-5:]) if rows else None}


def score_rollout(ro, cfg, gold_norm=None):
    """The scores the policy is trained on: the reward model's (normalised in reward.py), or the gold
    judge's normalised with the first rollout's mean and std (global across ranks: every rank must
    apply the same map); then the EOS trick. Returns (scores (B,), gold_norm)."""
    scores = ro["raw_scores"]
    if cfg.reward == "gold":
        if gold_norm is None:
            n_, s1, s2 = all_reduce_sum(torch.stack([scores.new_tensor(float(scores.numel())), scores.sum(),
                                                     (scores ** 2).sum()])).tolist()
            mean_ = s1 / n_
            gold_norm = (mean_, math.sqrt(max(s2 - n_ * mean_ ** 2, 0.0) / max(n_ - 1, 1)) or 1.0)
        scores = (scores - gold_norm[0]) / gold_norm[1]
    return torch.where(ro["ended"], scores, torch.full_like(scores, cfg.no_eos_score)), gold_norm
