"""Step 3 of InstructGPT: PPO against the reward model, with a KL leash to the SFT model.

    python ppo.py                          # embedded world, ~3.5 minutes on 2 CPU cores (+40 s of evaluation)
    python ppo.py --reward=gold            # oracle mode: the gold judge is the reward (sanity check, ceiling)
    python ppo.py --beta=0 --iterations=300 --out_dir=runs/ppo_nokl    # over-optimisation

Four models: the policy (initialised from SFT), a frozen reference copy of the SFT model, the frozen
reward model, and a value model initialised from the reward model. Each iteration:

    rollout  -> sample answers to a batch of prompts, score them with the reward model
    rewards  -> r_t = -beta * (logprob_t - ref_logprob_t), plus the score at the last real token
    GAE      -> advantages and returns over the answer tokens
    update   -> several epochs of clipped-surrogate minibatch steps on policy and value model

Implementation details (Ouyang et al. 2022; Ziegler et al. 2019; Huang et al. 2023/2024 "The N(+)
implementation details of RLHF with PPO", numbered as in ../shared/RLHF_NOTES.md):
 1. Dropout is off in all four models.
 2. Answers are sampled at temperature T and every log-prob is computed from logits / T.
 3. Prompts are left-padded; position ids come from the attention mask (model.py).
 4. Per-token reward: -beta * (logprob - ref_logprob) at every answer token, plus the normalised
    reward-model score at the last real token (the <|end|> token), never at a padding slot.
 5. EOS trick: generate at most max_new_tokens, cut after the first <|end|>, mask what follows; an
    answer that never ends gets the fixed score `no_eos_score` instead of the reward model's.
 6. GAE with gamma = 1, lambda = 0.95 over answer tokens only; advantages whitened (masked).
 7. The reward model's bias and gain were set in reward.py so SFT answers score mean 0, std 1.
 8. The value model starts from the reward model (separate critic; `--value_model=shared` puts a
    value head on the policy trunk instead); its loss is clipped like the policy's, coefficient vf_coef.
    With a reward-model ensemble (reward.py --ensemble) the reward is the members' mean score and
    the critic starts from the first member.
 9. ppo_epochs epochs over minibatches per rollout. The rollout's log-probs are computed with the
    same minibatches as the first epoch, so the first minibatch sees ratio == 1 and approx-KL == 0.
10. Every loss and statistic is a masked mean over real answer tokens.
11. Gradient clipping; Adam with a small learning rate.
12. beta fixed, or Ziegler's adaptive controller: e = clip(KL/target - 1, -0.2, 0.2),
    beta <- beta * (1 + e * batch / horizon).
13. PPO-ptx (InstructGPT eq. 2): optionally add ptx_coef * the pretraining LM loss; the held-out
    pretraining loss is measured before and after (the "alignment tax").
Simplifications: one seed per run (the tuning below repeats the final choices over three), a
~1M-parameter model; the paper's gamma = 27.8 for PPO-ptx is not transferable to this scale (tune
ptx_coef); the oracle mode normalises the gold score with the mean and std of the first rollout's
answers.

Tuning (held-out pass rate of sampled answers, 8 per prompt, measured on a 2-core CPU; runs since the
one-epoch/two-epoch comparison used --threads=1, which changes the numbers a little). The default:
reward ensemble of three models, two epochs each (reward.py), beta 0.15, 100 iterations. Three seeds
(--seed changes the rollouts and the evaluation samples; SFT 0.325 / 0.330 / 0.315 on those samples):
    100 iterations: PPO 0.553 / 0.547 / 0.530 (+0.228 / +0.217 / +0.215), greedy 0.670 / 0.700 / 0.660,
                    win rate vs SFT 0.675 / 0.687 / 0.690, KL 1.11 / 1.16 / 1.23 nats
    150 iterations: PPO 0.549 / 0.537 / 0.555 (+0.224 / +0.207 / +0.240), greedy 0.650 / 0.697 / 0.690,
                    win rate vs SFT 0.692 / 0.671 / 0.716, KL 1.29 / 1.18 / 1.30 nats
The same seeds with one-epoch reward models (accuracy 0.719 instead of 0.724 against the labelers,
0.837 instead of 0.846 against gold): 150 iterations 0.551 / 0.516 / 0.504; 200 iterations (seeds
1337, 2) 0.522 / 0.500; 100 iterations (seed 1337) 0.502. Seed-to-seed spread is about +-0.02, so
single runs below differ mostly by noise. One-epoch members, 100 iterations, with a variance penalty on
the ensemble (--uncertainty_coef=1, Coste et al. 2023): 0.491 (greedy 0.653, win 0.664, KL 1.31): not
adopted.
Before that, one-epoch ensemble normalised as one (before reward.py normalised each member first),
100 iterations, SFT 0.325:
    beta 0.1: 0.490 (KL 1.47)    beta 0.15: 0.519 (KL 1.19)    beta 0.2: 0.502 (KL 0.97)
The same beta 0.15 run with the members normalised one by one (as now): 0.502 (KL 1.14).
Earlier, on the previous world layout (6,000 labelled prompts, one reward model, 2 epochs; SFT 0.322):
    beta 0.05, 60 iterations: 0.371 (KL 3.4)    beta 0.1, 60 it: 0.444 (KL 1.4); 120 it: 0.445 (KL 2.0)
    beta 0.2, 60 it: 0.453 (KL 0.8); 120 it: 0.487 (KL 1.0); 120 it at lr 6e-5: 0.455 (KL 2.1)
    beta 0.2, 120 it, an ensemble of three (1 epoch each) instead: 0.490, win rate vs SFT 0.660 (one: 0.632)
beta (three values), the iteration count and the reward models' epochs were chosen on the held-out
prompts themselves (there is no separate dev set), so the PPO numbers carry a little selection on top
of the sampling error; the three seeds show how much. Too small a beta lets the policy drift toward
what the reward model gets wrong (0.05 above); lr 1e-4 with 4 epochs was unstable in a prototype (KL
4-6 nats, one task family collapsed).
"""
import copy
import math
import os
import random
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from common import (Metrics, all_gather_object, all_reduce_mean, all_reduce_sum, config_dict, ddp_cleanup,
                    ddp_setup, load_checkpoint, load_model, parse_config, plot_metrics, print_config, read_jsonl, rng_state,
                    save_checkpoint, set_rng_state, set_seed, write_json)
from data import world as W
from data.formats import read_prompts
from evaluate import evaluate_policy, left_pad, win_rate
from model import pick_device, token_logprobs
from pretrain import get_batch
from reward import RewardEnsemble, RewardModel, last_token_index, load_reward_model
from tokenizer import get_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD = os.path.join(HERE, "data", "world")
RUNS = os.path.join(HERE, "runs")


@dataclass
class Config:
    sft: str = os.path.join(RUNS, "sft", "ckpt.pt")  # policy init and frozen reference
    reward_model: str = os.path.join(RUNS, "reward", "ckpt.pt")  # frozen RM, and the critic's init
    reward: str = "rm"  # rm | gold (oracle mode: the gold judge of the embedded world is the reward)
    prompts: str = os.path.join(WORLD, "prompts_ppo.jsonl")  # rollout prompts
    eval_prompts: str = os.path.join(WORLD, "prompts_eval.jsonl")  # held-out prompts ("" = skip eval)
    pretrain_tokens: str = os.path.join(RUNS, "pretrain", "tokens")  # train.bin/val.bin for PPO-ptx
    out_dir: str = os.path.join(RUNS, "ppo")
    iterations: int = 100  # rollout + update cycles (tuning notes above: 150 gave no more)
    rollout_batch: int = 64  # prompts per rollout (global across ranks)
    minibatch: int = 16  # answers per gradient step
    ppo_epochs: int = 4  # passes over each rollout
    temperature: float = 1.0  # sampling temperature, also used for every log-prob
    max_new_tokens: int = 48
    lr: float = 3e-5  # policy learning rate
    value_lr: float = 1e-4  # value model learning rate
    beta: float = 0.15  # KL penalty coefficient (initial value when adaptive_kl); see the tuning notes above
    adaptive_kl: bool = False  # Ziegler et al. 2019 controller toward kl_target
    kl_target: float = 1.0  # target KL to the reference (nats per answer), adaptive only
    kl_horizon: int = 10000  # controller horizon in episodes
    clip_range: float = 0.2  # PPO ratio clip
    vf_clip: float = 0.2  # value clip
    vf_coef: float = 0.1  # value loss coefficient
    gamma: float = 1.0  # GAE discount
    lam: float = 0.95  # GAE lambda
    uncertainty_coef: float = 0.0  # ensemble RM: reward = members' mean - coef * their variance (Coste et al.)
    no_eos_score: float = -1.0  # score of an answer that never emits <|end|>
    value_model: str = "separate"  # separate (critic from the RM) | shared (value head on the policy)
    ptx_coef: float = 0.0  # PPO-ptx: weight of the pretraining loss (0 = plain PPO)
    ptx_batch: int = 8  # pretraining sequences per minibatch when ptx_coef > 0
    grad_clip: float = 1.0
    eval_samples: int = 8  # samples per held-out prompt in the final evaluation
    eval_interval: int = 0  # iterations between quick gold evaluations on held-out prompts (0 = off)
    save_interval: int = 10  # iterations between checkpoints
    seed: int = 1337
    device: str = "auto"
    threads: int = 0
    resume: bool = False


# ----------------------------------------------------------------------------- the formulas

def masked_mean(x, mask, dim=None):
    """Mean of x over positions where mask is 1 (padding and after-EOS tokens never count)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x, mask, shift_mean=True):
    """(x - mean) / std over real tokens, with global statistics across ranks under torchrun."""
    mask = mask.to(x.dtype)
    stats = all_reduce_sum(torch.stack([(x * mask).sum(), (x * x * mask).sum(), mask.sum()]))
    mean = stats[0] / stats[2]
    var = stats[1] / stats[2] - mean ** 2
    out = (x - mean) * torch.rsqrt(var.clamp(min=0) + 1e-8)
    return (out if shift_mean else out + mean) * mask


def kl_penalty(logprobs, ref_logprobs, beta):
    """Per-token KL-penalty reward -beta * (log pi(y_t) - log pi_ref(y_t)) (Ziegler et al. 2019)."""
    return -beta * (logprobs - ref_logprobs)


def per_token_rewards(scores, logprobs, ref_logprobs, mask, beta):
    """KL penalty on every real answer token plus the sequence score at the last real token."""
    rewards = kl_penalty(logprobs, ref_logprobs, beta) * mask
    last = last_token_index(mask)  # (B,) the <|end|> token (or the last token of an unfinished answer)
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))


def compute_gae(rewards, values, mask, gamma=1.0, lam=0.95):
    """Generalised advantage estimation over answer tokens (Schulman et al. 2016).
    delta_t = r_t + gamma V_{t+1} - V_t ;  A_t = delta_t + gamma lambda A_{t+1}. Padding after the end
    has reward 0 and value 0, so nothing flows back from it. Returns (advantages, returns) (B, N)."""
    values = values * mask
    rewards = rewards * mask
    N = rewards.size(1)
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(N)):
        next_value = values[:, t + 1] if t + 1 < N else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def ppo_losses(logprobs, old_logprobs, advantages, values, old_values, returns, mask, clip_range, vf_clip):
    """Clipped surrogate policy loss and clipped value loss (Schulman et al. 2017), masked means.
    Returns (pg_loss, vf_loss, stats dict with ratio, approx_kl, clipfrac, vf_clipfrac)."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_loss = masked_mean(torch.max(-advantages * ratio,
                                    -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)), mask)
    v_clipped = old_values + torch.clamp(values - old_values, -vf_clip, vf_clip)
    vf_loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (v_clipped - returns) ** 2), mask)
    with torch.no_grad():
        stats = {"ratio": masked_mean(ratio, mask).item(),
                 "approx_kl": masked_mean((ratio - 1) - log_ratio, mask).item(),  # k3 estimator, >= 0
                 "clipfrac": masked_mean(((ratio - 1).abs() > clip_range).float(), mask).item(),
                 "vf_clipfrac": masked_mean(((values - old_values).abs() > vf_clip).float(), mask).item()}
    return pg_loss, vf_loss, stats


def adaptive_beta(beta, kl, target, n_steps, horizon):
    """Ziegler et al. 2019, adaptive KL controller: proportional, clipped error."""
    error = max(-0.2, min(0.2, kl / target - 1))
    return beta * (1 + error * n_steps / horizon)


def uncertainty_weighted(member_scores, coef):
    """Coste et al. 2023 (UWO): an ensemble's mean score minus coef times the members' variance, so
    answers the reward models disagree on are worth less. member_scores (E, B) -> (scores, variance), (B,) each"""
    variance = member_scores.var(0, unbiased=False)
    return member_scores.mean(0) - coef * variance, variance


def entropy_from_logits(logits):
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ----------------------------------------------------------------------------- the models

class ActorCritic(nn.Module):
    """Policy and value model in one module so DistributedDataParallel sees a single forward.
    With a shared trunk the value head reads the policy's hidden states (one forward pass)."""

    def __init__(self, policy, critic, shared):
        super().__init__()
        self.policy, self.critic, self.shared = policy, critic, shared

    def forward(self, seq, mask, P):
        """seq (B, P + N) = left-padded prompt + answer. Returns the logits that predict each answer
        token (B, N, V) and the value of the state before each answer token (B, N)."""
        if self.shared:
            h = self.policy.hidden_states(seq, mask)  # (B, T, C)
            logits, values = self.policy.lm_head(h), self.critic.head(h).squeeze(-1)
        else:
            logits, values = self.policy(seq, attention_mask=mask)[0], self.critic.values(seq, mask)
        return logits[:, P - 1:-1], values[:, P - 1:-1]


def disable_dropout(model):
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


# ----------------------------------------------------------------------------- rollouts

@torch.no_grad()
def rollout(policy, ref, rm, tok, rows, cfg, device, generator):
    """Sample answers, score them, compute log-probs, reference log-probs. Returns a dict of tensors."""
    prompt_ids, prompt_mask = left_pad([tok.render_chat(r["prompt"])[0] for r in rows], tok.pad_id)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    policy.eval()
    resp, resp_mask = policy.generate(prompt_ids, attention_mask=prompt_mask, max_new_tokens=cfg.max_new_tokens,
                                      temperature=cfg.temperature, eos_id=tok.end_id, pad_id=tok.pad_id,
                                      generator=generator)
    resp_mask = resp_mask.long()
    seq = torch.cat([prompt_ids, resp], dim=1)  # (B, P + N)
    mask = torch.cat([prompt_mask, resp_mask], dim=1)
    P = prompt_ids.size(1)
    ended = ((resp == tok.end_id) & resp_mask.bool()).any(dim=1)
    texts = [tok.decode_response([t for t, m in zip(r, mk) if m]) for r, mk in zip(resp.tolist(), resp_mask.tolist())]
    judged = [W.judge(r["record"], t, bool(e)) if r.get("record") else None
              for r, t, e in zip(rows, texts, ended.tolist())]
    disagreement = None  # variance of an ensemble's member scores, per answer
    if cfg.reward == "gold":
        scores = torch.tensor([j["score"] for j in judged], device=device)
    elif isinstance(rm, RewardEnsemble):  # the members' mean, less coef x their variance when asked for
        scores, disagreement = uncertainty_weighted(rm.member_scores(seq, mask).float(), cfg.uncertainty_coef)
    else:
        scores = rm(seq, mask).float()
    ref_logits = ref(seq, attention_mask=mask)[0][:, P - 1:-1]
    ref_logprobs = token_logprobs(ref_logits, resp, cfg.temperature)
    return {"seq": seq, "mask": mask, "P": P, "resp": resp, "resp_mask": resp_mask, "ended": ended,
            "raw_scores": scores, "disagreement": disagreement, "ref_logprobs": ref_logprobs, "texts": texts,
            "judged": judged}


def global_masked_mean(x, mask):
    """masked_mean over the real tokens of every rank (all-reduced sum and count under torchrun)."""
    mask = mask.to(x.dtype)
    total = all_reduce_sum(torch.stack([(x * mask).sum(), mask.sum()]))
    return total[0] / total[1].clamp(min=1)


def explained_variance(values, returns, mask):
    """1 - Var(returns - values) / Var(returns) over real answer tokens, across all ranks."""
    var_r = global_masked_mean((returns - global_masked_mean(returns, mask)) ** 2, mask)
    err = returns - values
    var_e = global_masked_mean((err - global_masked_mean(err, mask)) ** 2, mask)
    return (1 - var_e / var_r).item() if var_r > 0 else float("nan")


# ----------------------------------------------------------------------------- training

def train(cfg):
    rank, world = ddp_setup(cfg.device)
    master = rank == 0
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed + rank)
    dev = pick_device(cfg.device)
    device = dev.device
    if cfg.reward not in ("rm", "gold") or cfg.value_model not in ("separate", "shared"):
        raise SystemExit(f"error: --reward must be rm or gold (got {cfg.reward!r}); --value_model must be "
                         f"separate or shared (got {cfg.value_model!r})")
    policy, sft_ckpt = load_model(cfg.sft, device)
    tok = get_tokenizer(sft_ckpt.get("tokenizer", "embedded"))
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    rm, rm_ckpt = load_reward_model(cfg.reward_model, device)
    rm.eval().requires_grad_(False)
    first = rm.members[0] if isinstance(rm, RewardEnsemble) else rm  # an ensemble's critic starts from member 0
    if cfg.uncertainty_coef and (cfg.reward != "rm" or not isinstance(rm, RewardEnsemble)):
        raise SystemExit(f"error: --uncertainty_coef={cfg.uncertainty_coef} needs --reward=rm and an ensemble "
                         f"reward model (reward.py --ensemble=2 or more); got --reward={cfg.reward} and "
                         f"{cfg.reward_model}")
    critic = copy.deepcopy(first) if cfg.value_model == "separate" else RewardModel(policy)
    if cfg.value_model == "shared":
        critic.head.load_state_dict(first.head.state_dict())  # the head at least starts from the RM's
    for m in (policy, ref, rm, critic):
        disable_dropout(m)
    critic.requires_grad_(True)
    ac = ActorCritic(policy, critic, cfg.value_model == "shared").to(device)
    value_params = list(critic.head.parameters()) if cfg.value_model == "shared" else list(critic.parameters())
    optimizer = torch.optim.Adam([{"params": list(policy.parameters()), "lr": cfg.lr},
                                  {"params": value_params, "lr": cfg.value_lr}], eps=1e-5)
    rows = read_prompts(cfg.prompts)
    if cfg.reward == "gold" and not all(r.get("record") for r in rows):
        raise SystemExit(f"error: --reward=gold needs a gold record on every prompt of {cfg.prompts}")
    if cfg.rollout_batch % world or (cfg.rollout_batch // world) % cfg.minibatch:
        raise SystemExit(f"error: --rollout_batch={cfg.rollout_batch} must split into {world} rank(s) x "
                         f"whole minibatches of --minibatch={cfg.minibatch}")
    local_batch = cfg.rollout_batch // world
    ptx = None
    if cfg.ptx_coef > 0 or os.path.exists(os.path.join(cfg.pretrain_tokens, "val.bin")):
        paths = [os.path.join(cfg.pretrain_tokens, f) for f in ("train.bin", "val.bin")]
        if all(os.path.exists(p) for p in paths):
            ptx = [np.memmap(p, np.uint16, "r") for p in paths]
            if int(ptx[1].max()) >= policy.config.vocab_size:  # tokens of another tokenizer
                if cfg.ptx_coef > 0:
                    raise SystemExit(f"error: {paths[1]} holds token ids beyond the policy's vocabulary "
                                     f"({policy.config.vocab_size}): pass --pretrain_tokens of its tokenizer")
                ptx = None
        elif cfg.ptx_coef > 0:
            raise SystemExit(f"error: --ptx_coef needs {paths[0]} (run pretrain.py first)")

    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    it, beta, gold_norm = 0, cfg.beta, None
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1000 * rank)
    prompt_rng = random.Random(cfg.seed + rank)
    ptx_gen = torch.Generator().manual_seed(cfg.seed + 17 + rank)
    if cfg.resume:
        ckpt = load_checkpoint(ckpt_path)
        policy.load_state_dict(ckpt["model"])
        critic.load_state_dict(ckpt["critic"])
        optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        streams = ckpt.get("rank_streams") or [ckpt]  # one per rank of the saved run (rank 0's also at top level)
        if rank < len(streams):  # a rank the saved run did not have keeps its fresh seeds
            gen.set_state(streams[rank]["gen_state"])
            prompt_rng.setstate((3, tuple(streams[rank]["prompt_rng"]), None))
        it, beta, gold_norm = ckpt["iteration"], ckpt["beta"], ckpt.get("gold_norm")
        print(f"resumed from {ckpt_path} at iteration {it}")
    model = torch.nn.parallel.DistributedDataParallel(ac) if world > 1 else ac
    metrics = Metrics(cfg.out_dir, resume=cfg.resume, enabled=master)
    if master:
        print_config(cfg)

    def save():
        # every rank's sampling streams (a collective: save() runs on all ranks), so that --resume under
        # torchrun continues each rank's own rollouts instead of giving every rank rank 0's
        streams = all_gather_object({"gen_state": gen.get_state(), "prompt_rng": list(prompt_rng.getstate()[1])})
        if master:
            save_checkpoint(ckpt_path, {
                "model": policy.state_dict(), "model_config": config_dict(policy.config), "critic": critic.state_dict(),
                "config": config_dict(cfg), "tokenizer": tok.name, "iteration": it, "beta": beta,
                "gold_norm": gold_norm, "optimizer": optimizer.state_dict(), "rng": rng_state(),
                "gen_state": gen.get_state(), "prompt_rng": list(prompt_rng.getstate()[1]),
                "rank_streams": streams if world > 1 else None})

    def heldout_ptx_loss():
        if ptx is None:
            return None
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            losses = [policy(*[t.to(device) for t in get_batch(ptx[1], 32, min(128, policy.config.block_size), g)])[1]
                      for _ in range(8)]
        return float(torch.stack(losses).mean())

    ptx_before = heldout_ptx_loss()
    t_start = time.time()
    while it < cfg.iterations:
        t0 = time.time()
        batch_rows = [rows[prompt_rng.randrange(len(rows))] for _ in range(local_batch)]
        ro = rollout(policy, ref, rm, tok, batch_rows, cfg, device, gen)
        t_rollout = time.time() - t0
        scores = ro["raw_scores"]
        if cfg.reward == "gold":  # normalise like the RM: first rollout's answers -> mean 0, std 1
            if gold_norm is None:  # global statistics: every rank must apply the same normalisation
                n_, s1, s2 = all_reduce_sum(torch.stack([scores.new_tensor(float(scores.numel())), scores.sum(),
                                                         (scores ** 2).sum()])).tolist()
                mean_ = s1 / n_
                gold_norm = (mean_, math.sqrt(max(s2 - n_ * mean_ ** 2, 0.0) / max(n_ - 1, 1)) or 1.0)
            scores = (scores - gold_norm[0]) / gold_norm[1]
        scores = torch.where(ro["ended"], scores, torch.full_like(scores, cfg.no_eos_score))  # EOS trick
        seq, mask, P, resp, rmask = ro["seq"], ro["mask"], ro["P"], ro["resp"], ro["resp_mask"].float()
        perms = [torch.randperm(local_batch, generator=torch.Generator().manual_seed(cfg.seed + 7919 * it + e))
                 for e in range(cfg.ppo_epochs)]
        # old log-probs and values, computed with the first epoch's minibatches (detail 9)
        old_logprobs, old_values = torch.zeros_like(rmask), torch.zeros_like(rmask)
        with torch.no_grad():
            for mb in perms[0].split(cfg.minibatch):
                logits, values = ac(seq[mb], mask[mb], P)
                old_logprobs[mb] = token_logprobs(logits, resp[mb], cfg.temperature)
                old_values[mb] = values.float()
        rewards = per_token_rewards(scores, old_logprobs, ro["ref_logprobs"], rmask, beta)
        advantages, returns = compute_gae(rewards, old_values, rmask, cfg.gamma, cfg.lam)
        advantages = masked_whiten(advantages, rmask)

        t1 = time.time()
        stats = []
        ac.train()
        for e in range(cfg.ppo_epochs):
            for mb in perms[e].split(cfg.minibatch):
                logits, values = model(seq[mb], mask[mb], P)
                logprobs = token_logprobs(logits, resp[mb], cfg.temperature)
                pg_loss, vf_loss, st = ppo_losses(logprobs, old_logprobs[mb], advantages[mb], values.float(),
                                                  old_values[mb], returns[mb], rmask[mb], cfg.clip_range, cfg.vf_clip)
                loss = pg_loss + cfg.vf_coef * vf_loss
                if cfg.ptx_coef > 0:  # PPO-ptx: InstructGPT eq. 2, gamma * E_pretrain[log pi(x)]
                    x, y = get_batch(ptx[0], cfg.ptx_batch, min(128, policy.config.block_size), ptx_gen)
                    ptx_loss = policy(x.to(device), y.to(device))[1]
                    loss = loss + cfg.ptx_coef * ptx_loss
                    st["ptx_loss"] = ptx_loss.item()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
                    torch.nn.utils.clip_grad_norm_(value_params, cfg.grad_clip)
                optimizer.step()
                with torch.no_grad():
                    st["entropy"] = masked_mean(entropy_from_logits(logits), rmask[mb]).item()
                st |= {"pg_loss": pg_loss.item(), "vf_loss": vf_loss.item()}
                stats.append(st)
        t_update = time.time() - t1
        it += 1

        # statistics of this iteration (global means across ranks)
        seq_kl = ((old_logprobs - ro["ref_logprobs"]) * rmask).sum(1)  # (B,) sequence KL estimate
        n = float(local_batch)
        judged = [j for j in ro["judged"] if j]
        sums = all_reduce_sum(torch.tensor([ro["raw_scores"].sum().item(), seq_kl.sum().item(),
                                            rmask.sum().item(), ro["ended"].float().sum().item(), n,
                                            sum(j["score"] for j in judged), sum(j["pass"] for j in judged),
                                            float(len(judged)), scores.sum().item(),
                                            0.0 if ro["disagreement"] is None else ro["disagreement"].sum().item()],
                                           device=device)).tolist()
        N = sums[4]
        keys = list(stats[0])  # the same keys in the same order on every rank
        update = all_reduce_mean(torch.tensor([sum(s[k] for s in stats) / len(stats) for k in keys]
                                              + [stats[0]["ratio"], stats[0]["approx_kl"]], device=device)).tolist()
        row = {"iteration": it, "reward": sums[8] / N, "rm_score": sums[0] / N, "kl_to_ref": sums[1] / N, "beta": beta,
               "answer_length": sums[2] / N, "eos_rate": sums[3] / N,
               "explained_variance": explained_variance(old_values, returns, rmask),
               "first_ratio": update[-2], "first_approx_kl": update[-1],
               "rollout_seconds": t_rollout, "update_seconds": t_update, "elapsed": time.time() - t_start}
        row |= dict(zip(keys, update))
        if sums[7]:
            row["gold"], row["gold_pass"] = sums[5] / sums[7], sums[6] / sums[7]
        if ro["disagreement"] is not None:
            row["rm_disagreement"] = sums[9] / N  # mean variance of the members' scores
        if cfg.adaptive_kl:
            beta = adaptive_beta(beta, row["kl_to_ref"], cfg.kl_target, cfg.rollout_batch, cfg.kl_horizon)
        if master:
            print(f"iter {it:4d} | reward {row['reward']:+.3f} | gold {row.get('gold', float('nan')):.3f} "
                  f"pass {row.get('gold_pass', float('nan')):.2f} | kl {row['kl_to_ref']:.3f} | beta {beta:.3f} | "
                  f"approx_kl {row['approx_kl']:.4f} | clip {row['clipfrac']:.3f} | ent {row['entropy']:.2f} | "
                  f"len {row['answer_length']:.1f} | ev {row['explained_variance']:.2f} | "
                  f"{t_rollout:.1f}+{t_update:.1f}s")
        metrics.log(**row)
        if it % cfg.save_interval == 0 or it == cfg.iterations:
            save()

    summary = {"iterations": it, "train_seconds": round(time.time() - t_start, 1), "final_beta": beta,
               "reward": cfg.reward}
    if master:
        last = read_jsonl(os.path.join(cfg.out_dir, "metrics.jsonl"))[-5:]
        summary["kl_to_ref_train"] = sum(r["kl_to_ref"] for r in last) / len(last) if last else None
        ptx_after = heldout_ptx_loss()
        if ptx_before is not None:
            summary |= {"pretrain_val_loss_sft": ptx_before, "pretrain_val_loss_ppo": ptx_after,
                        "alignment_tax": ptx_after - ptx_before}
        if cfg.eval_prompts:
            summary |= final_evaluation(policy, ref, rm, tok, cfg, device)
        write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
        plot_metrics(os.path.join(cfg.out_dir, "metrics.jsonl"), os.path.join(cfg.out_dir, "training.png"),
                     ["reward", "gold", "gold_pass", "kl_to_ref", "beta", "approx_kl", "clipfrac", "entropy",
                      "vf_loss", "explained_variance", "answer_length", "eos_rate", "rm_disagreement"],
                     x="iteration", title="PPO")
    ddp_cleanup()
    return policy, summary


@torch.no_grad()
def sequence_kl(policy, ref, tok, rows, answers, cfg, device, batch_size=128):
    """Mean over answers of sum_t log pi(y_t) - log pi_ref(y_t): the KL to the reference, estimated on samples."""
    items = [(tok.render_chat(r["prompt"])[0], a["ids"]) for r, ans in zip(rows, answers) for a in ans]
    total = 0.0
    for b in range(0, len(items), batch_size):
        chunk = items[b:b + batch_size]
        P = max(len(p) for p, _ in chunk)
        N = max(max(len(a) for _, a in chunk), 1)
        pids, pmask = left_pad([p for p, _ in chunk], tok.pad_id)
        resp = torch.full((len(chunk), N), tok.pad_id, dtype=torch.long)
        rmask = torch.zeros((len(chunk), N), dtype=torch.long)
        for i, (_, a) in enumerate(chunk):
            resp[i, :len(a)], rmask[i, :len(a)] = torch.tensor(a, dtype=torch.long), 1
        seq, mask = torch.cat([pids, resp], 1).to(device), torch.cat([pmask, rmask], 1).to(device)
        resp, rmask = resp.to(device), rmask.to(device)
        lp = token_logprobs(policy(seq, attention_mask=mask)[0][:, P - 1:-1], resp, cfg.temperature)
        rlp = token_logprobs(ref(seq, attention_mask=mask)[0][:, P - 1:-1], resp, cfg.temperature)
        total += ((lp - rlp) * rmask).sum().item()
    return total / len(items)


def final_evaluation(policy, ref, rm, tok, cfg, device):
    """SFT (the reference) vs PPO on held-out prompts, same decoding, several samples per prompt."""
    rows = [r for r in read_prompts(cfg.eval_prompts) if r.get("record")]
    out = {}
    res = {}
    for name, model in (("sft", ref), ("ppo", policy)):
        res[name] = evaluate_policy(model, tok, rows, cfg.eval_samples, cfg.temperature, device, cfg.max_new_tokens,
                                    seed=cfg.seed)
        for mode in ("sampled", "greedy"):
            out[f"{name}_gold_mean" + ("" if mode == "sampled" else "_greedy")] = res[name][mode]["gold_mean"]
            out[f"{name}_pass_rate" + ("" if mode == "sampled" else "_greedy")] = res[name][mode]["pass_rate"]
        out[f"{name}_facets"] = {k: v for k, v in res[name]["sampled"].items() if not k.startswith("_")}
        print(f"{name}: sampled gold {res[name]['sampled']['gold_mean']:.3f} pass {res[name]['sampled']['pass_rate']:.3f} "
              f"| greedy gold {res[name]['greedy']['gold_mean']:.3f} pass {res[name]['greedy']['pass_rate']:.3f}")
    wr, ci = win_rate(res["ppo"]["_sampled_scores"], res["sft"]["_sampled_scores"])
    wr_g, ci_g = win_rate(res["ppo"]["_greedy_scores"], res["sft"]["_greedy_scores"])
    out |= {"win_rate_vs_sft": wr, "win_rate_ci95": list(ci), "win_rate_vs_sft_greedy": wr_g,
            "win_rate_greedy_ci95": list(ci_g),
            "kl_to_ref": sequence_kl(policy, ref, tok, rows, res["ppo"]["_sampled_answers"], cfg, device)}
    print(f"win rate vs SFT {wr:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f}); greedy {wr_g:.3f}; KL to ref {out['kl_to_ref']:.3f}")
    out["examples"] = [{"prompt": r["prompt"], "sft": a["text"], "ppo": b["text"]}
                       for r, a, b in list(zip(rows, [x[0] for x in res["sft"]["_sampled_answers"]],
                                               [x[0] for x in res["ppo"]["_sampled_answers"]]))[:12]]
    return out


def main():
    train(parse_config(Config))


if __name__ == "__main__":
    main()
