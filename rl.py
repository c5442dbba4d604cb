"""What every step-3 method shares: the rollout, its scores, masked statistics and the KL penalty.

ppo.py imports these, and so does every newer method, so that they all sample, score and handle the
end of an answer the same way. The numbered details are those of docs/RLHF_DETAILS.md.

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

Shapes: B answers in the rollout, P prompt length (left-padded), N answer length (right-padded).
"""
import math

import torch

from common import all_reduce_sum
from data import world as W
from engine import RewardEnsemble, encode_answers, left_pad, set_dropout
from model import token_logprobs


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


def kl_penalty(logprobs, ref_logprobs, beta):
    """Per-token KL-penalty reward -beta * (log pi(y_t) - log pi_ref(y_t)) (Ziegler et al. 2019)."""
    return -beta * (logprobs - ref_logprobs)


def disable_dropout(model):
    """Detail 1: dropout off (attention dropout included), so that the policy's and the reference's
    log-probs of the same tokens agree."""
    return set_dropout(model, 0.0)


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
