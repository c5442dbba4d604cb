"""Step 3 without a critic: RLOO, GRPO and Dr. GRPO against the reward model, with a KL leash to SFT.

    python grpo.py                                   # GRPO's group-normalised advantages, KL in the reward
    python grpo.py --estimator=rloo --ppo_epochs=1 --minibatch=64 --lr=1e-4   # RLOO as Ahmadian et al. 2024
    python grpo.py --estimator=drgrpo                # Dr. GRPO: no std division, no length normalisation
    python grpo.py --kl=loss --beta=0.04             # GRPO's own KL: the k3 estimator in the loss

Three models: the policy (initialised from SFT), a frozen reference copy of SFT and the frozen reward
model. There is no value model: each prompt is answered k times and the other answers to the same
prompt are the baseline. Each iteration of `train`:

    rollout     -> k answers to each of prompts_per_iter prompts (rl.rollout on every row repeated k times)
    score       -> reward-model score, or the fixed penalty if it never ended (rl.score_rollout); with
                   --kl=reward minus beta * the answer's summed log pi - log pi_ref
    advantages  -> one number per answer from its group's rewards (the estimator), on all its tokens
    update      -> ppo_epochs epochs of clipped-surrogate minibatch steps (rl.clipped_surrogate)
    log         -> one line and one metrics.jsonl row

Shapes: B = prompts_per_iter * k answers in a rollout, G groups of k, N answer length.

Implementation details (numbers in brackets: docs/RLHF_DETAILS.md):
 1. The rollout, the scores and the EOS trick are ppo.py's (rl.rollout, rl.score_rollout): dropout off
    [1], sampling and every log-prob at temperature T [2], left-padded prompts [3], answers cut after
    <|end|> and masked, no_eos_score for an answer that never ends [5]. A group is k consecutive rows.
 2. Advantages, one per answer, from the k sequence rewards R of its group (`ESTIMATORS`):
    rloo   A_i = R_i - 1/(k-1) sum_{j != i} R_j   (Ahmadian et al. 2024, "Back to Basics"; Kool et al. 2019)
    grpo   A_i = (R_i - mean R) / (std R + eps)    (Shao et al. 2024, DeepSeekMath sec. 4.1.2; std with Bessel's
                                                    correction, as TRL; a group of equal rewards gets A = 0)
    drgrpo A_i = R_i - mean R                      (Liu et al. 2025, "Understanding R1-Zero-Like Training", sec. 3.2)
 3. The KL to the reference: --kl=reward puts -beta * sum_t (log pi - log pi_ref) into R (rl.kl_penalty
    summed over the answer, as ppo.py and RLOO do); --kl=loss adds GRPO's per-token k3 estimator
    beta * (exp(ref - lp) - (ref - lp) - 1) to the loss instead (DeepSeekMath eq. 4), through which the
    gradient flows. The two betas live on different scales.
 4. The loss: rl.clipped_surrogate per token with the answer's advantage on every token, reduced as each
    paper does. grpo: mean over an answer's tokens, then over answers (DeepSeekMath eq. 3); drgrpo and
    rloo: sum over an answer's tokens divided by the constant max_new_tokens, then mean over answers
    (Dr. GRPO's fix of the length bias; for RLOO the sum is REINFORCE's log pi(y|x), the constant only
    rescales the learning rate).
 5. ppo_epochs epochs over minibatches of answers; the rollout's log-probs are computed with the first
    epoch's minibatches, so the first minibatch sees ratio == 1 exactly [9] (logged as first_ratio).
    With ppo_epochs=1 and minibatch = the whole rollout (RLOO's default) the ratio is always 1, the clip
    never acts and the update is plain REINFORCE with the leave-one-out baseline.
 6. Masked means over real answer tokens [10]; gradient clipping; Adam with a small learning rate [11].
 7. Options and inputs are checked before anything is written (a prompt too long for the context is dropped,
    with a count); --resume is exact and refuses another stage's checkpoint or a finished run, as ppo.py's.
Deviations: k = 4 answers per prompt (DeepSeekMath: 64; Ahmadian et al.: 2 to 4) so that a rollout
holds as many answers as ppo.py's; the reward is a learned reward model, not a verifier (Dr. GRPO also
drops the KL term, which a learned reward needs); one process (no torchrun); the oracle mode
(--reward=gold) normalises the gold score as ppo.py does. Defaults: docs/EXPERIMENTS.md.
"""
import copy
import os
import random
import time
from dataclasses import dataclass
from typing import Annotated

import torch

from common import (above, at_least, check_config, config_dict, folder, load_state, one_of, one_process, open_run,
                    option_error, plot_metrics, read_jsonl, resume_checkpoint, rng_state, run_command, save_checkpoint,
                    set_rng_state, write_json)
from evaluate import a_judge
from rl import (answer_logprobs, clipped_surrogate, disable_dropout, entropy_from_logits, epoch_orders,
                final_evaluation, frozen, gold_means, kl_penalty, load_online_inputs, masked_mean, rollout,
                score_rollout, set_stream_state, stream_state, training_summary)

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD = os.path.join(HERE, "data", "world")
RUNS = os.path.join(HERE, "runs")


@dataclass
class Config:
    sft: str = os.path.join(RUNS, "sft", "ckpt.pt")  # policy init and frozen reference
    reward_model: str = os.path.join(RUNS, "reward", "ckpt.pt")  # frozen RM
    reward: Annotated[str, one_of("rm", "gold")] = "rm"  # gold = oracle mode: the gold judge (--judge) is the reward
    judge: Annotated[str, a_judge()] = "world"  # gold judge: world | package.module:function | file.py:function
    prompts: str = os.path.join(WORLD, "prompts_ppo.jsonl")  # rollout prompts
    eval_prompts: str = os.path.join(WORLD, "prompts_dev.jsonl")  # held-out prompts (dev; compare.py passes test; "" = skip)
    out_dir: Annotated[str, folder()] = os.path.join(RUNS, "grpo")  # checkpoint, metrics, summary, plot
    estimator: Annotated[str, one_of("rloo", "grpo", "drgrpo")] = "grpo"  # the advantage from k rewards (detail 2)
    kl: Annotated[str, one_of("reward", "loss")] = "reward"  # in each answer's reward (as PPO) | GRPO's k3 in the loss
    iterations: Annotated[int, at_least(1)] = 100  # rollout + update cycles
    prompts_per_iter: Annotated[int, at_least(1)] = 16  # prompts per rollout, each answered k times
    k: Annotated[int, at_least(2)] = 4  # answers per prompt (the group)
    minibatch: Annotated[int, at_least(1)] = 16  # answers per gradient step
    ppo_epochs: Annotated[int, at_least(1)] = 4  # passes over each rollout (1 with minibatch = the rollout: REINFORCE)
    temperature: Annotated[float, above(0)] = 1.0  # sampling temperature, also used for every log-prob
    max_new_tokens: Annotated[int, at_least(1)] = 48  # longest answer, in tokens (also Dr. GRPO's constant normaliser)
    lr: Annotated[float, at_least(0)] = 3e-5  # policy learning rate
    beta: Annotated[float, at_least(0)] = 0.15  # KL coefficient (per answer with --kl=reward, per token with --kl=loss)
    clip_range: Annotated[float, above(0)] = 0.2  # PPO ratio clip
    no_eos_score: float = -1.0  # score of an answer that never emits <|end|>
    grad_clip: Annotated[float, at_least(0)] = 1.0  # max gradient norm (0 = off)
    eval_samples: Annotated[int, at_least(1)] = 8  # samples per held-out prompt in the final evaluation
    save_interval: Annotated[int, at_least(1)] = 10  # iterations between checkpoints
    seed: int = 1337  # seeds the rollouts, the minibatch order and the evaluation samples
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    threads: Annotated[int, at_least(0)] = 0  # torch CPU threads (0 = torch's default)
    resume: bool = False  # continue from out_dir/ckpt.pt


def check(cfg, world):
    """The rules that tie options together (each option's own range is declared in Config)."""
    if (check_config(cfg, world).prompts_per_iter * cfg.k) % cfg.minibatch:
        raise option_error("minibatch", cfg.minibatch,
                           f"must divide the rollout's --prompts_per_iter x --k = {cfg.prompts_per_iter * cfg.k} answers")


# ----------------------------------------------------------------------------- the formulas

def rloo_advantages(rewards, k):
    """REINFORCE with a leave-one-out baseline: A_i = R_i - mean of the other k-1 rewards of the group
    (Ahmadian et al. 2024, RLOO; Kool et al. 2019). rewards (G * k,), groups consecutive -> (G * k,)."""
    r = rewards.view(-1, k)  # (G, k)
    return (r - (r.sum(1, keepdim=True) - r) / (k - 1)).view(-1)


def grpo_advantages(rewards, k, eps=1e-4):
    """GRPO's group-normalised advantage (Shao et al. 2024, sec. 4.1.2): (R_i - mean) / (std + eps), std
    with Bessel's correction; a group whose rewards are all equal gets 0, never NaN."""
    r = rewards.view(-1, k)  # (G, k)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).view(-1)


def drgrpo_advantages(rewards, k):
    """Dr. GRPO (Liu et al. 2025, sec. 3.2): R_i - mean of the group, without GRPO's std division."""
    r = rewards.view(-1, k)  # (G, k)
    return (r - r.mean(1, keepdim=True)).view(-1)


ESTIMATORS = {"rloo": rloo_advantages, "grpo": grpo_advantages, "drgrpo": drgrpo_advantages}


def sequence_rewards(scores, logprobs, ref_logprobs, mask, beta):
    """R = score + sum over the answer of -beta * (log pi - log pi_ref) (rl.kl_penalty; Ziegler et al. 2019)."""
    return scores + (kl_penalty(logprobs, ref_logprobs, beta) * mask).sum(1)


def k3_kl(logprobs, ref_logprobs):
    """GRPO's per-token KL estimate (Shao et al. 2024, eq. 4; Schulman 2020, "k3"): with x = log pi_ref -
    log pi, exp(x) - x - 1 >= 0 for every token, 0 only where they agree; its mean on samples of pi is
    KL(pi || pi_ref)."""
    x = ref_logprobs - logprobs
    return torch.exp(x) - x - 1


def policy_loss(per_token, mask, estimator, max_new_tokens):
    """Reduce a per-token loss (B, N) as each paper does: grpo, the mean over each answer's tokens and then
    over answers (DeepSeekMath eq. 3); drgrpo and rloo, each answer's token sum / max_new_tokens, then
    the mean over answers (Liu et al. 2025: no length normalisation)."""
    if estimator == "grpo":
        return masked_mean(per_token, mask, dim=1).mean()
    return ((per_token * mask).sum(1) / max_new_tokens).mean()


# ----------------------------------------------------------------------------- the steps of train()

def setup(cfg):
    """Options and inputs checked; the three models, the optimizer, the prompts and the random streams, restored
    on --resume; metrics.jsonl is opened last, when nothing can fail on bad input."""
    check(cfg, one_process("grpo.py"))
    run = load_online_inputs(cfg)
    cfg, policy = run.cfg, disable_dropout(run.__dict__.pop("sft"))  # the SFT model: the policy's start
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = resume_checkpoint(ckpt_path, "grpo", "iteration", cfg.iterations) if cfg.resume else None
    run.policy, run.ref = policy, frozen(copy.deepcopy(policy))
    run.optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr, eps=1e-5)
    run.__dict__.update(it=0, gold_norm=None, batch=cfg.prompts_per_iter * cfg.k, ckpt_path=ckpt_path,
                        gen=torch.Generator(device=run.device).manual_seed(cfg.seed), prompt_rng=random.Random(cfg.seed))
    if ckpt is not None:  # the weights, the optimizer and every random stream of the checkpoint
        load_state(policy, ckpt["model"], ckpt_path)
        run.optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        set_stream_state(run.gen, run.prompt_rng, ckpt)
        run.it, run.gold_norm = ckpt["iteration"], ckpt["gold_norm"]
        print(f"resumed from {ckpt_path} at iteration {run.it}")
    run.metrics = open_run(cfg, True, f"{cfg.estimator}: {cfg.prompts_per_iter} prompts x k={cfg.k} answers "
                                      f"per iteration, KL in the {cfg.kl}", resumed=("iteration", run.it))
    return run


def advantages(run, cfg, ro, scores, first_epoch):
    """Old log-probs (with the first epoch's minibatches, detail 5), the sequence rewards and the group
    advantages, one per answer. Returns a dict of tensors."""
    rmask = ro["resp_mask"].float()
    old_logprobs = torch.zeros_like(rmask)
    with torch.no_grad():
        for mb in first_epoch.split(cfg.minibatch):
            old_logprobs[mb] = answer_logprobs(run.policy, ro, mb, cfg.temperature)[1]
    beta = cfg.beta if cfg.kl == "reward" else 0.0
    rewards = sequence_rewards(scores, old_logprobs, ro["ref_logprobs"], rmask, beta)  # (B,)
    group_std = rewards.view(-1, cfg.k).std(1)  # (G,)
    return {"logprobs": old_logprobs, "mask": rmask, "rewards": rewards,
            "advantages": ESTIMATORS[cfg.estimator](rewards, cfg.k),
            "group_std": group_std.mean().item(), "zero_std_groups": (group_std == 0).float().mean().item()}


def update(run, cfg, ro, batch, perms):
    """ppo_epochs passes of clipped-surrogate minibatch steps over one rollout. Returns one stats dict per step."""
    stats = []
    run.policy.train()
    for perm in perms:
        for mb in perm.split(cfg.minibatch):
            logits, logprobs = answer_logprobs(run.policy, ro, mb, cfg.temperature)
            rmask = batch["mask"][mb]
            adv = batch["advantages"][mb, None].expand_as(logprobs)  # the answer's advantage on each of its tokens
            per_token, st = clipped_surrogate(logprobs, batch["logprobs"][mb], adv, rmask, cfg.clip_range)
            if cfg.kl == "loss":  # DeepSeekMath eq. 3: + beta * D_KL per token, inside the answer's mean
                kl = k3_kl(logprobs, ro["ref_logprobs"][mb])
                per_token = per_token + cfg.beta * kl
                st["k3_kl"] = masked_mean(kl, rmask).item()
            loss = policy_loss(per_token, rmask, cfg.estimator, cfg.max_new_tokens)
            run.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(run.policy.parameters(), cfg.grad_clip)
            run.optimizer.step()
            with torch.no_grad():
                st["entropy"] = masked_mean(entropy_from_logits(logits / cfg.temperature), rmask).item()
            stats.append(st | {"loss": loss.item()})
    return stats


def log_iteration(run, cfg, ro, scores, batch, stats, seconds):
    """The iteration's diagnostics as one metrics row and one printed line."""
    rmask = batch["mask"]
    row = {"iteration": run.it, "reward": batch["rewards"].mean().item(), "score": scores.mean().item(),
           "rm_score": ro["raw_scores"].mean().item(),
           "kl_to_ref": ((batch["logprobs"] - ro["ref_logprobs"]) * rmask).sum(1).mean().item(),
           "answer_length": rmask.sum(1).mean().item(), "eos_rate": ro["ended"].float().mean().item(),
           "group_std": batch["group_std"], "zero_std_groups": batch["zero_std_groups"],
           "first_ratio": stats[0]["ratio"], "first_approx_kl": stats[0]["approx_kl"]}
    row |= {k: sum(st[k] for st in stats) / len(stats) for k in stats[0]} | seconds | gold_means(ro["judged"])
    print(f"iter {run.it:4d} | reward {row['reward']:+.3f} | gold {row.get('gold', float('nan')):.3f} "
          f"pass {row.get('gold_pass', float('nan')):.2f} | kl {row['kl_to_ref']:.3f} | approx_kl {row['approx_kl']:.4f} "
          f"| clip {row['clipfrac']:.3f} | ent {row['entropy']:.2f} | len {row['answer_length']:.1f} | "
          f"std0 {row['zero_std_groups']:.2f} | {row['rollout_seconds']:.1f}+{row['update_seconds']:.1f}s")
    return row


def save(run, cfg, finished=False):
    save_checkpoint(run.ckpt_path, {
        "stage": "grpo", "finished": finished, "model": run.policy.state_dict(),
        "model_config": config_dict(run.policy.config), "config": config_dict(cfg), "tokenizer": run.tok.name,
        "iteration": run.it, "gold_norm": run.gold_norm, "optimizer": run.optimizer.state_dict(), "rng": rng_state(),
        **stream_state(run.gen, run.prompt_rng)})


def finish(run, cfg, t_start):
    """summary.json: the budget spent, the KL at the end of training, the held-out evaluation against SFT; plot."""
    summary = {"method": cfg.estimator, "kl": cfg.kl, "iterations": run.it, "train_seconds": round(time.time() - t_start, 1),
               "answers_generated": run.it * run.batch, "rm_calls": run.it * run.batch if cfg.reward == "rm" else 0}
    summary |= training_summary(read_jsonl(os.path.join(cfg.out_dir, "metrics.jsonl")))
    summary |= final_evaluation(run.policy, run.ref, run.tok, run.eval_rows, cfg, run.device, run.eval_judge)
    write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
    plot_metrics(os.path.join(cfg.out_dir, "metrics.jsonl"), os.path.join(cfg.out_dir, "training.png"),
                 ["reward", "gold", "gold_pass", "kl_to_ref", "k3_kl", "approx_kl", "clipfrac", "entropy",
                  "group_std", "zero_std_groups", "answer_length", "eos_rate"], x="iteration", title=cfg.estimator)
    return summary


def train(cfg):
    run = setup(cfg)
    cfg = run.cfg  # with the defaults that follow the data resolved
    t_start = time.time()
    while run.it < cfg.iterations:
        t0 = time.time()
        prompts = [run.rows[run.prompt_rng.randrange(len(run.rows))] for _ in range(cfg.prompts_per_iter)]
        ro = rollout(run.policy, run.ref, run.rm, run.tok, [r for r in prompts for _ in range(cfg.k)], cfg,
                     run.device, run.gen, run.judge)  # each prompt k times in a row: a group
        t_rollout = time.time() - t0
        scores, run.gold_norm = score_rollout(ro, cfg, run.gold_norm)
        perms = epoch_orders(run.batch, cfg.ppo_epochs, cfg.seed, run.it)
        batch = advantages(run, cfg, ro, scores, perms[0])
        t1 = time.time()
        stats = update(run, cfg, ro, batch, perms)
        run.it += 1
        row = log_iteration(run, cfg, ro, scores, batch, stats, {"rollout_seconds": t_rollout, "update_seconds":
                                                                 time.time() - t1, "elapsed": time.time() - t_start})
        run.metrics.log(**row)  # the row first, then the checkpoint that covers it
        if run.it % cfg.save_interval == 0 or run.it == cfg.iterations:
            save(run, cfg)
    summary = finish(run, cfg, t_start)
    save(run, cfg, finished=True)
    return run.policy, summary


if __name__ == "__main__":
    run_command(train, Config)
