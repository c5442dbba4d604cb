"""Step 3 of InstructGPT: PPO against the reward model, with a KL leash to the SFT model.

    python ppo.py                          # embedded world
    python ppo.py --reward=gold            # oracle mode: the gold judge is the reward
    python ppo.py --beta=0 --iterations=300 --out_dir=runs/ppo_nokl    # over-optimisation
    python ppo.py --sft=out/sft/ckpt.pt --reward_model=out/reward/ckpt.pt --prompts=task/ppo_prompts.jsonl \
        --eval_prompts=task/heldout.jsonl --judge=task/judge.py:judge --out_dir=out/ppo   # your own (docs/OWN_DATA.md)

Four models: the policy (initialised from SFT), a frozen reference copy of the SFT model, the frozen
reward model, and a value model initialised from the reward model. Each iteration of `train`:

    rollout     -> sample answers to a batch of prompts (rl.rollout)
    score       -> reward-model score of each answer, or the fixed penalty if it never ended (rl.score_rollout)
    advantages  -> old log-probs and values; r_t = -beta * (logprob_t - ref_logprob_t) plus the score at
                   the last real token; GAE over the answer tokens; whitening
    update      -> ppo_epochs epochs of clipped-surrogate minibatch steps on policy and value model
    log         -> one line and one metrics.jsonl row of the standard diagnostics, gold where a judge can
                   judge the prompts, and the drift signals that need none (evaluate.drift: length, ...)

Shapes: B answers in a rollout (or a minibatch), P prompt length, N answer length, V vocabulary,
C channels.

Implementation details, numbered as in docs/RLHF_DETAILS.md (Ouyang et al. 2022; Ziegler et al. 2019;
Huang et al. 2023/2024, "The N(+) implementation details of RLHF with PPO"):
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
13. PPO-ptx (InstructGPT eq. 2): add ptx_coef * the pretraining LM loss (on by default: on dev it kept
    what the pretraining corpus states about held-out topics, which plain PPO lost); the held-out
    pretraining loss of the SFT model and of the policy is measured at the end (the "alignment tax").
    Without pretraining tokens (your own data, a GPT-2 start) the default turns into plain PPO, noted.
14. Inputs are checked before anything is written (a too long prompt is dropped, with a count; a reward
    model that reward.py did not normalise is refused); --resume is exact. With the user's own --prompts,
    --eval_prompts and --pretrain_tokens left out are skipped with a note, never read (common.follow_data).
Simplifications: a ~1M-parameter model; the paper's gamma = 27.8 for PPO-ptx is not transferable to
this scale (ours, 2.0, weighs a per-token mean LM loss against per-token mean PPO losses; tune it); the
oracle mode normalises the gold score with the mean and std of the first rollout's answers. How the
defaults were chosen: docs/EXPERIMENTS.md.
"""
import copy
import os
import random
import time
import types
from dataclasses import dataclass, replace
from typing import Annotated

import torch
import torch.nn as nn

from common import (above, all_gather_object, at_least, at_most, check_config, config_dict, ddp_cleanup, ddp_setup,
                    ddp_wrap, folder, follow_data, get_batch, load_state, one_of, open_run, option_error, per_rank,
                    pick_device, plot_metrics, read_jsonl, reduce_stats, resume_checkpoint, rng_state, run_command,
                    save_checkpoint, set_rng_state, set_seed, token_files, write_json)
from engine import RewardEnsemble, RewardModel, last_token_index, load_model, load_reward_model
from evaluate import a_judge, compare_to_reference, drift, heldout_ptx_loss, judged_prompts
from model import token_logprobs
from rl import (clipped_surrogate, disable_dropout, entropy_from_logits, epoch_orders, global_masked_mean, kl_penalty,
                masked_mean, masked_whiten, read_prompt_files, rollout, score_rollout, set_stream_state, stream_state,
                training_summary)
from tokenizer import get_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD = os.path.join(HERE, "data", "world")
RUNS = os.path.join(HERE, "runs")


@dataclass
class Config:
    sft: str = os.path.join(RUNS, "sft", "ckpt.pt")  # policy init and frozen reference
    reward_model: str = os.path.join(RUNS, "reward", "ckpt.pt")  # frozen RM, and the critic's init
    reward: Annotated[str, one_of("rm", "gold")] = "rm"  # gold = oracle mode: the gold judge (--judge) is the reward
    judge: Annotated[str, a_judge()] = "world"  # gold judge: world | package.module:function | file.py:function
    prompts: str = os.path.join(WORLD, "prompts_ppo.jsonl")  # rollout prompts
    eval_prompts: str = os.path.join(WORLD, "prompts_dev.jsonl")  # held-out prompts (the pipeline passes test; "" = skip)
    pretrain_tokens: str = os.path.join(RUNS, "pretrain", "tokens")  # train.bin/val.bin: PPO-ptx, alignment tax
    out_dir: Annotated[str, folder()] = os.path.join(RUNS, "ppo")  # checkpoint, metrics, summary, plots
    iterations: Annotated[int, at_least(1)] = 100  # rollout + update cycles
    rollout_batch: Annotated[int, at_least(1), per_rank()] = 64  # prompts per rollout (global across ranks)
    minibatch: Annotated[int, at_least(1)] = 16  # answers per gradient step
    ppo_epochs: Annotated[int, at_least(1)] = 2  # passes over each rollout
    temperature: Annotated[float, above(0)] = 1.0  # sampling temperature, also used for every log-prob
    max_new_tokens: Annotated[int, at_least(1)] = 48  # longest answer, in tokens
    lr: Annotated[float, at_least(0)] = 3e-5  # policy learning rate
    value_lr: Annotated[float, at_least(0)] = 1e-4  # value model learning rate
    beta: Annotated[float, at_least(0)] = 0.15  # KL penalty coefficient (initial value when adaptive_kl)
    adaptive_kl: bool = False  # Ziegler et al. 2019 controller toward kl_target
    kl_target: Annotated[float, above(0)] = 1.0  # target KL to the reference (nats per answer), adaptive only
    kl_horizon: Annotated[int, at_least(1)] = 10000  # controller horizon in episodes
    clip_range: Annotated[float, above(0)] = 0.2  # PPO ratio clip
    vf_clip: Annotated[float, above(0)] = 0.2  # value clip
    vf_coef: Annotated[float, at_least(0)] = 0.1  # value loss coefficient
    gamma: Annotated[float, at_least(0), at_most(1)] = 1.0  # GAE discount
    lam: Annotated[float, at_least(0), at_most(1)] = 0.95  # GAE lambda
    no_eos_score: float = -1.0  # score of an answer that never emits <|end|>
    value_model: Annotated[str, one_of("separate", "shared")] = "separate"  # separate (critic from the RM) | shared
    ptx_coef: Annotated[float, at_least(0)] = 2.0  # PPO-ptx: pretraining-loss weight (0 = plain PPO; see load_ptx_tokens)
    ptx_batch: Annotated[int, at_least(1)] = 8  # pretraining sequences per minibatch when ptx_coef > 0
    grad_clip: Annotated[float, at_least(0)] = 1.0  # max gradient norm, policy and value model each
    eval_samples: Annotated[int, at_least(1)] = 4  # samples per held-out prompt in the final evaluation
    save_interval: Annotated[int, at_least(1)] = 10  # iterations between checkpoints
    seed: int = 1337  # seeds the rollouts, the minibatch order and the evaluation samples
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    threads: Annotated[int, at_least(0)] = 0  # torch CPU threads (0 = torch's default)
    resume: bool = False  # continue from out_dir/ckpt.pt


def check(cfg, world):
    """The rules that tie options together (each option's own range is declared in Config)."""
    if (check_config(cfg, world).rollout_batch // world) % cfg.minibatch:
        raise option_error("rollout_batch", cfg.rollout_batch, f"must split into {world} rank(s) x whole "
                                                               f"minibatches of --minibatch={cfg.minibatch}")


# ----------------------------------------------------------------------------- the formulas

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
    per_token, stats = clipped_surrogate(logprobs, old_logprobs, advantages, mask, clip_range)
    pg_loss = masked_mean(per_token, mask)  # a token mean over the minibatch (detail 10)
    v_clipped = old_values + torch.clamp(values - old_values, -vf_clip, vf_clip)
    vf_loss = 0.5 * masked_mean(torch.max((values - returns) ** 2, (v_clipped - returns) ** 2), mask)
    with torch.no_grad():
        stats["vf_clipfrac"] = masked_mean(((values - old_values).abs() > vf_clip).float(), mask).item()
    return pg_loss, vf_loss, stats


def adaptive_beta(beta, kl, target, n_steps, horizon):
    """Ziegler et al. 2019, adaptive KL controller: proportional, clipped error."""
    error = max(-0.2, min(0.2, kl / target - 1))
    return beta * (1 + error * n_steps / horizon)


def explained_variance(values, returns, mask):
    """1 - Var(returns - values) / Var(returns) over real answer tokens, across all ranks."""
    var_r = global_masked_mean((returns - global_masked_mean(returns, mask)) ** 2, mask)
    err = returns - values
    var_e = global_masked_mean((err - global_masked_mean(err, mask)) ** 2, mask)
    return (1 - var_e / var_r).item() if var_r > 0 else float("nan")


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


# ----------------------------------------------------------------------------- the steps of train()

def load_ptx_tokens(cfg, model_config, master=True):
    """The pretraining token files (train, val) as memmaps, for PPO-ptx and the alignment tax, or None; an error
    when an explicit --ptx_coef asks for them or --pretrain_tokens names a folder that cannot be used. The
    default coefficient with the default (or no) tokens unusable turns PPO-ptx off, with a note."""
    tokens, problem = token_files(cfg.pretrain_tokens, model_config.vocab_size, min(128, model_config.block_size)) \
        if cfg.pretrain_tokens else (None, "needs --pretrain_tokens")
    if problem and cfg.ptx_coef > 0 and cfg.ptx_coef != Config.ptx_coef:
        raise SystemExit(f"error: option --ptx_coef={cfg.ptx_coef} {problem}")
    if problem and cfg.pretrain_tokens not in ("", Config.pretrain_tokens):
        what = "PPO-ptx (on by default)" if cfg.ptx_coef > 0 else "the alignment tax"
        raise SystemExit(f"error: option --pretrain_tokens={cfg.pretrain_tokens}: {what} {problem}")
    if problem and cfg.ptx_coef > 0:  # the default coefficient, the default tokens missing (or none): plain PPO
        if cfg.pretrain_tokens and master:  # "" was asked for, or follow_data has said so: no second note
            print(f"note: PPO-ptx off (plain PPO, no alignment tax): --pretrain_tokens {problem}")
        return None  # setup then sets ptx_coef to 0
    return tokens


def setup(cfg):
    """Options and inputs checked; the four models, the optimizer, the prompts, the random streams, restored
    on --resume; metrics.jsonl is opened last, when nothing can fail on bad input."""
    rank, world = ddp_setup(cfg.device)
    check(cfg, world)
    cfg = follow_data(cfg, "prompts", {
        "eval_prompts": "no held-out evaluation; pass --eval_prompts=<held-out prompts> [--judge=FILE.py:function]",
        "pretrain_tokens": "no PPO-ptx and no alignment tax; pass --pretrain_tokens=<pretrain out_dir>/tokens"},
        checkpoints=("sft", "reward_model"), master=rank == 0)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed + rank)
    device = pick_device(cfg.device).device
    policy, sft_ckpt = load_model(cfg.sft, device)
    tok = get_tokenizer(sft_ckpt.get("tokenizer", "embedded"))
    rm, _ = load_reward_model(cfg.reward_model, device, tok, normalized=True)  # of this tokenizer, normalised
    rows, judge, eval_rows, eval_judge = read_prompt_files(cfg, tok, min(policy.config.block_size,
                                                                          rm.gpt.config.block_size))
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = resume_checkpoint(ckpt_path, "ppo", "iteration", cfg.iterations) if cfg.resume else None
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    rm.eval().requires_grad_(False)
    first = rm.members[0] if isinstance(rm, RewardEnsemble) else rm  # an ensemble's critic starts from member 0
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
    ptx = load_ptx_tokens(cfg, policy.config, rank == 0)
    if ptx is None and cfg.ptx_coef > 0:  # the default coefficient, no pretraining tokens: plain PPO
        cfg = replace(cfg, ptx_coef=0.0)
    run = types.SimpleNamespace(
        cfg=cfg, rank=rank, world=world, master=rank == 0, device=device, tok=tok, policy=policy, ref=ref, rm=rm,
        critic=critic, ac=ac, value_params=value_params, optimizer=optimizer, rows=rows, eval_rows=eval_rows,
        judge=judge, eval_judge=eval_judge,
        local_batch=cfg.rollout_batch // world, ptx=ptx, it=0, beta=cfg.beta,
        gold_norm=None, ckpt_path=ckpt_path, gen=torch.Generator(device=device).manual_seed(cfg.seed + 1000 * rank),
        prompt_rng=random.Random(cfg.seed + rank), ptx_gen=torch.Generator().manual_seed(cfg.seed + 17 + rank))
    if ckpt is not None:
        restore(run, ckpt)
    run.model = ddp_wrap(ac, world)
    run.metrics = open_run(cfg, run.master, resumed=("iteration", run.it))
    return run


def restore(run, ckpt):
    """--resume: the weights, the optimizer, beta and every random stream (this rank's own) of the checkpoint."""
    load_state(run.policy, ckpt["model"], run.ckpt_path)
    load_state(run.critic, ckpt["critic"], run.ckpt_path)
    run.optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    streams = ckpt.get("rank_streams") or [ckpt]  # one per rank of the saved run (rank 0's also at top level)
    if run.rank < len(streams):  # a rank the saved run did not have keeps its fresh seeds
        mine = streams[run.rank]
        set_stream_state(run.gen, run.prompt_rng, mine)
        run.ptx_gen.set_state(mine.get("ptx_gen", run.ptx_gen.get_state()))  # PPO-ptx's batches (older: absent)
    run.it, run.beta, run.gold_norm = ckpt["iteration"], ckpt["beta"], ckpt.get("gold_norm")
    print(f"resumed from {run.ckpt_path} at iteration {run.it}")


def advantages(run, cfg, ro, scores, first_epoch):
    """Old log-probs and values of the rollout (computed with the first epoch's minibatches, detail 9),
    the per-token rewards, GAE and whitening. Returns a dict of (B, N) tensors (advantages whitened)."""
    seq, mask, P, resp, rmask = ro["seq"], ro["mask"], ro["P"], ro["resp"], ro["resp_mask"].float()
    old_logprobs, old_values = torch.zeros_like(rmask), torch.zeros_like(rmask)
    with torch.no_grad():
        for mb in first_epoch.split(cfg.minibatch):
            logits, values = run.ac(seq[mb], mask[mb], P)
            old_logprobs[mb] = token_logprobs(logits, resp[mb], cfg.temperature)
            old_values[mb] = values.float()
    rewards = per_token_rewards(scores, old_logprobs, ro["ref_logprobs"], rmask, run.beta)
    adv, returns = compute_gae(rewards, old_values, rmask, cfg.gamma, cfg.lam)
    return {"logprobs": old_logprobs, "ref_logprobs": ro["ref_logprobs"], "values": old_values, "rewards": rewards,
            "advantages": masked_whiten(adv, rmask), "returns": returns, "mask": rmask}


def ptx_loss(run, cfg):
    """PPO-ptx: the pretraining LM loss on a batch of the pretraining corpus (InstructGPT eq. 2)."""
    x, y = get_batch(run.ptx[0], cfg.ptx_batch, min(128, run.policy.config.block_size), run.ptx_gen)
    return run.policy(x.to(run.device), y.to(run.device))[1]


def update(run, cfg, ro, batch, perms):
    """ppo_epochs passes of clipped-surrogate minibatch steps over one rollout. Returns one stats dict
    per minibatch step."""
    seq, mask, P, resp, rmask = ro["seq"], ro["mask"], ro["P"], ro["resp"], batch["mask"]
    stats = []
    run.ac.train()
    for perm in perms:
        for mb in perm.split(cfg.minibatch):
            logits, values = run.model(seq[mb], mask[mb], P)
            logprobs = token_logprobs(logits, resp[mb], cfg.temperature)
            pg_loss, vf_loss, st = ppo_losses(logprobs, batch["logprobs"][mb], batch["advantages"][mb],
                                              values.float(), batch["values"][mb], batch["returns"][mb], rmask[mb],
                                              cfg.clip_range, cfg.vf_clip)
            loss = pg_loss + cfg.vf_coef * vf_loss
            if cfg.ptx_coef > 0:  # InstructGPT eq. 2, gamma * E_pretrain[log pi(x)]
                lm_loss = ptx_loss(run, cfg)
                loss = loss + cfg.ptx_coef * lm_loss
                st["ptx_loss"] = lm_loss.item()
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(run.policy.parameters(), cfg.grad_clip)
                torch.nn.utils.clip_grad_norm_(run.value_params, cfg.grad_clip)
            run.optimizer.step()
            with torch.no_grad():
                st["entropy"] = masked_mean(entropy_from_logits(logits, cfg.temperature), rmask[mb]).item()
            st |= {"pg_loss": pg_loss.item(), "vf_loss": vf_loss.item()}
            stats.append(st)
    return stats


def log_iteration(run, cfg, ro, scores, batch, stats, seconds):
    """The iteration's diagnostics as one metrics row (global means across ranks) and one printed line."""
    rmask = batch["mask"]
    seq_kl = ((batch["logprobs"] - ro["ref_logprobs"]) * rmask).sum(1)  # (B,) sequence KL estimate
    judged = [j for j in ro["judged"] if j]
    s = reduce_stats({"rm_score": ro["raw_scores"].sum().item(), "kl_to_ref": seq_kl.sum().item(),
                      "answer_length": rmask.sum().item(), "eos_rate": ro["ended"].float().sum().item(),
                      "n": float(run.local_batch), "gold": sum(j["score"] for j in judged),
                      "gold_pass": sum(j["pass"] for j in judged), "n_judged": float(len(judged)),
                      "reward": scores.sum().item(),
                      "rm_disagreement": 0.0 if ro["disagreement"] is None else ro["disagreement"].sum().item()},
                     device=run.device)
    means = reduce_stats({k: sum(st[k] for st in stats) / len(stats) for k in stats[0]}
                         | {"first_ratio": stats[0]["ratio"], "first_approx_kl": stats[0]["approx_kl"]},
                         op="mean", device=run.device)
    row = {"iteration": run.it} | {k: s[k] / s["n"] for k in ("reward", "rm_score", "kl_to_ref")}
    row |= {"beta": run.beta, "answer_length": s["answer_length"] / s["n"], "eos_rate": s["eos_rate"] / s["n"],
            "explained_variance": explained_variance(batch["values"], batch["returns"], rmask),
            "first_ratio": means.pop("first_ratio"), "first_approx_kl": means.pop("first_approx_kl")}
    row |= seconds | means
    if s["n_judged"]:
        row["gold"], row["gold_pass"] = s["gold"] / s["n_judged"], s["gold_pass"] / s["n_judged"]
    if ro["disagreement"] is not None:
        row["rm_disagreement"] = s["rm_disagreement"] / s["n"]  # mean variance of the members' scores
    texts = sum(all_gather_object(ro["texts"]), [])  # every rank's answers: the share of distinct ones
    row["distinct_rate"] = len(set(texts)) / len(texts)
    if run.master:
        gold = f" | gold {row['gold']:.3f} pass {row['gold_pass']:.2f}" if "gold" in row else ""
        print(f"iter {run.it:4d} | reward {row['reward']:+.3f}{gold} | kl {row['kl_to_ref']:.3f} | beta {run.beta:.3f} | "
              f"approx_kl {row['approx_kl']:.4f} | clip {row['clipfrac']:.3f} | ent {row['entropy']:.2f} | "
              f"len {row['answer_length']:.1f} distinct {row['distinct_rate']:.2f} | ev "
              f"{row['explained_variance']:.2f} | {row['rollout_seconds']:.1f}+{row['update_seconds']:.1f}s")
    return row


def save(run, cfg, finished=False):
    # every rank's random streams (a collective: all ranks call save()): a --resume continues each rank's own
    streams = all_gather_object(stream_state(run.gen, run.prompt_rng) | {"ptx_gen": run.ptx_gen.get_state()})
    if run.master:
        save_checkpoint(run.ckpt_path, {
            "stage": "ppo", "finished": finished, "model": run.policy.state_dict(),
            "model_config": config_dict(run.policy.config), "critic": run.critic.state_dict(),
            "config": config_dict(cfg), "tokenizer": run.tok.name, "iteration": run.it, "beta": run.beta,
            "gold_norm": run.gold_norm, "optimizer": run.optimizer.state_dict(), "rng": rng_state(),
            "rank_streams": streams if run.world > 1 else None} | streams[0])


def finish(run, cfg, ptx_before, t_start):
    """summary.json: KL at the end of training, the drift signals (with warnings), the alignment tax, the
    held-out evaluation against SFT (gold where a judge can judge them); plots."""
    summary = {"iterations": run.it, "train_seconds": round(time.time() - t_start, 1), "final_beta": run.beta,
               "reward": cfg.reward}
    rows = read_jsonl(os.path.join(cfg.out_dir, "metrics.jsonl"))
    summary |= training_summary(rows)
    summary |= drift(rows)  # prints the signals and any warnings
    t_eval = time.time()
    ptx_after = heldout_ptx_loss(run.policy, run.ptx, run.device)
    if ptx_before is not None:
        summary |= {"pretrain_val_loss_sft": ptx_before, "pretrain_val_loss_ppo": ptx_after,
                    "alignment_tax": ptx_after - ptx_before}
    if run.eval_rows:
        summary |= compare_to_reference(run.policy, run.ref, run.tok, run.eval_rows, cfg.eval_samples,
                                        cfg.temperature, run.device, cfg.max_new_tokens, cfg.seed, run.eval_judge)
    summary["eval_seconds"] = round(time.time() - t_eval, 1)
    write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
    plot_metrics(os.path.join(cfg.out_dir, "metrics.jsonl"), os.path.join(cfg.out_dir, "training.png"),
                 ["reward", "gold", "gold_pass", "kl_to_ref", "beta", "approx_kl", "clipfrac", "entropy",
                  "vf_loss", "explained_variance", "answer_length", "distinct_rate", "eos_rate", "rm_disagreement"],
                 x="iteration", title="PPO")
    return summary


def train(cfg):
    run = setup(cfg)
    cfg = run.cfg  # with the defaults that follow the data resolved
    ptx_before = heldout_ptx_loss(run.ref, run.ptx, run.device)  # the SFT model's, also after a --resume
    t_start = time.time()
    while run.it < cfg.iterations:
        t0 = time.time()
        rows = [run.rows[run.prompt_rng.randrange(len(run.rows))] for _ in range(run.local_batch)]
        ro = rollout(run.policy, run.ref, run.rm, run.tok, rows, cfg, run.device, run.gen, run.judge)
        t_rollout = time.time() - t0
        scores, run.gold_norm = score_rollout(ro, cfg, run.gold_norm)
        perms = epoch_orders(run.local_batch, cfg.ppo_epochs, cfg.seed, run.it)
        batch = advantages(run, cfg, ro, scores, perms[0])
        t1 = time.time()
        stats = update(run, cfg, ro, batch, perms)
        seconds = {"rollout_seconds": t_rollout, "update_seconds": time.time() - t1, "elapsed": time.time() - t_start}
        run.it += 1
        row = log_iteration(run, cfg, ro, scores, batch, stats, seconds)
        if cfg.adaptive_kl:
            run.beta = adaptive_beta(run.beta, row["kl_to_ref"], cfg.kl_target, cfg.rollout_batch, cfg.kl_horizon)
        run.metrics.log(**row)  # the row first, then the checkpoint that covers it
        if run.it % cfg.save_interval == 0 or run.it == cfg.iterations:
            save(run, cfg)
    summary = finish(run, cfg, ptx_before, t_start) if run.master else {}
    save(run, cfg, finished=True)
    ddp_cleanup()
    return run.policy, summary


if __name__ == "__main__":
    run_command(train, Config)
