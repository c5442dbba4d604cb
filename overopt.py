"""Reward over-optimisation (Gao et al. 2022) in the embedded world: proxy up, gold up then down.

    python overopt.py                          # after pipeline.py (minutes on 2 CPU cores)
    python overopt.py --ppo_iterations=0       # best-of-n only
    python overopt.py --sft=out/sft/ckpt.pt --reward_model=out/reward/ckpt.pt --prompts=task/heldout.jsonl \
        --ppo_prompts=task/ppo_prompts.jsonl --judge=task/judge.py:judge --out_dir=out/overopt   # your own task

The reward model is a proxy for the gold judge. Optimising the proxy harder moves the policy further
from SFT (KL), and past some distance the gold score falls while the proxy keeps rising. We measure
both curves against d = sqrt(KL(policy || SFT)) as Gao et al. do:
1. Best-of-n: for n = 1, 2, 4, ..., n_max pick the SFT sample with the highest RM score;
   KL = log n - (n-1)/n (exact for best-of-n). Each prompt's n_max samples are split into groups of n
   so every n uses all samples. Fit gold(d) - gold(0) = d (a - b d).
2. RL: PPO with beta = 0 (no KL penalty, no PPO-ptx, 4 epochs per rollout) run long, logging proxy reward,
   gold and the sampled KL to the reference every iteration. Fit gold(d) - gold(0) = d (a - b log d) for
   d >= 0.3.
3. Examples of the answers PPO without a KL penalty ends up with, with their proxy and gold scores.
The gold judge is --judge (the embedded world's by default, or the user's): the study needs one for
--prompts and, for the RL curve, for --ppo_prompts. With the user's own --prompts, --ppo_prompts left
out skips the RL curve (common.follow_data).
Deviation from the paper: one RM size, one seed, and the RL curve is a single run's trajectory
(Gao et al. fit across checkpoints of many runs).
"""
import json
import math
import os
from dataclasses import dataclass
from typing import Annotated

import numpy as np

from common import follow_data, pick_device, print_config, pyplot, read_jsonl, run_command, write_json
from engine import generate_answers, load_model, load_reward_model, score_texts
from evaluate import a_judge, evaluate_best_of_n, judged_prompts
from tokenizer import get_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = os.path.join(HERE, "runs")


@dataclass
class Config:
    sft: str = os.path.join(RUNS, "sft", "ckpt.pt")  # the policy to sample from (and PPO's start)
    reward_model: str = os.path.join(RUNS, "reward", "ckpt.pt")  # the proxy
    prompts: str = os.path.join(HERE, "data", "world", "prompts_dev.jsonl")  # held-out prompts (dev: a study)
    ppo_prompts: str = os.path.join(HERE, "data", "world", "prompts_ppo.jsonl")  # rollout prompts of the RL curve
    judge: Annotated[str, a_judge()] = "world"  # gold judge: world | package.module:function | file.py:function
    out_dir: str = os.path.join(RUNS, "overopt")  # summary.json, overoptimization.png, ppo_beta0/
    n_prompts: int = 100  # prompts for best-of-n
    n_max: int = 128  # largest n (samples per prompt)
    ppo_iterations: int = 150  # PPO with beta = 0 (0 = skip the RL curve)
    ppo_lr: float = 5e-5  # a little above the default so the run travels far enough
    temperature: float = 1.0  # sampling temperature of the best-of-n samples
    seed: int = 1337  # seeds the samples and the PPO run
    device: str = "auto"  # auto | cpu | cuda | mps


def fit_bon(d, gain):
    """Least squares for gain = d (a - b d) = a d - b d^2. Returns (a, b)."""
    A = np.stack([d, -d ** 2], 1)
    return tuple(np.linalg.lstsq(A, gain, rcond=None)[0])


def fit_rl(d, gain):
    """Least squares for gain = d (a - b log d) = a d - b d log d. Returns (a, b)."""
    A = np.stack([d, -d * np.log(d)], 1)
    return tuple(np.linalg.lstsq(A, gain, rcond=None)[0])


def plot(bon, rl, fits, path):
    plt = pyplot()
    fig, axes = plt.subplots(1, 2 if rl else 1, figsize=(11 if rl else 5.5, 4), squeeze=False)
    ax = axes[0, 0]
    d = np.array([math.sqrt(r["kl"]) for r in bon])
    ax.plot(d, [r["gold_mean"] for r in bon], "o", color="C0", label="gold (best-of-n by RM)")
    dd = np.linspace(0, d.max(), 100)
    a, b = fits["bon"]
    ax.plot(dd, bon[0]["gold_mean"] + dd * (a - b * dd), "-", color="C0", alpha=0.6, label=f"fit d({a:.2f} - {b:.2f} d)")
    ax2 = ax.twinx()
    ax2.plot(d, [r["proxy_reward"] for r in bon], "s--", color="C3", label="proxy (RM score)")
    ax.set_xlabel("d = sqrt(KL to SFT), KL = log n - (n-1)/n")
    ax.set_ylabel("gold score")
    ax2.set_ylabel("proxy reward", color="C3")
    ax.set_title("best-of-n")
    ax.legend(loc="lower left", fontsize=8)
    if rl:
        ax = axes[0, 1]
        d = np.sqrt(np.maximum([r["kl_to_ref"] for r in rl], 0))
        ax.plot(d, [r["gold"] for r in rl], ".", color="C0", label="gold")
        if "rl" in fits:
            a, b = fits["rl"]
            dd = np.linspace(0.3, max(d.max(), 0.31), 100)
            ax.plot(dd, rl[0]["gold"] + dd * (a - b * np.log(dd)), "-", color="C0", alpha=0.6,
                    label=f"fit d({a:.2f} - {b:.2f} log d)")
        ax2 = ax.twinx()
        ax2.plot(d, [r["reward"] for r in rl], ".", color="C3", label="proxy")
        ax2.set_ylabel("proxy reward", color="C3")
        ax.set_xlabel("d = sqrt(KL to SFT) (sampled, per answer)")
        ax.set_ylabel("gold score")
        ax.set_title("PPO with beta = 0")
        ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def rl_curve(cfg, rm, rows, tok, device, judge):
    """PPO from the SFT model with beta = 0 and no PPO-ptx (nothing holds it near the SFT model): its metrics
    rows, the fit of the RL form, the peak, and the answers the final (hacked) policy gives, with their proxy
    and gold scores."""
    import ppo
    ppo_dir = os.path.join(cfg.out_dir, "ppo_beta0")
    ppo.train(ppo.Config(sft=cfg.sft, reward_model=cfg.reward_model, prompts=cfg.ppo_prompts, judge=cfg.judge,
                         out_dir=ppo_dir, beta=0.0, ptx_coef=0.0, ppo_epochs=4, iterations=cfg.ppo_iterations,
                         lr=cfg.ppo_lr, eval_prompts="", seed=cfg.seed, device=cfg.device))
    rl = read_jsonl(os.path.join(ppo_dir, "metrics.jsonl"))
    d_rl = np.sqrt(np.maximum([r["kl_to_ref"] for r in rl], 0))
    g_rl = np.array([r["gold"] - rl[0]["gold"] for r in rl])
    keep = d_rl >= 0.3
    out = {}
    if keep.sum() >= 3:
        a, b = fit_rl(d_rl[keep], g_rl[keep])
        out["fit_rl"] = {"a": a, "b": b}
    peak = max(range(len(rl)), key=lambda i: rl[i]["gold"])
    out["rl"] = {"gold_start": rl[0]["gold"], "gold_peak": rl[peak]["gold"], "peak_iteration": rl[peak]["iteration"],
                 "kl_at_peak": rl[peak]["kl_to_ref"], "gold_end": rl[-1]["gold"], "kl_end": rl[-1]["kl_to_ref"],
                 "proxy_start": rl[0]["reward"], "proxy_end": rl[-1]["reward"]}
    print("RL without KL penalty:", json.dumps(out["rl"]))
    hacked, _ = load_model(os.path.join(ppo_dir, "ckpt.pt"), device)
    ans = generate_answers(hacked, tok, [r["prompt"] for r in rows[:12]], n=1, seed=cfg.seed, device=device)
    proxy = score_texts(rm, tok, [r["prompt"] for r in rows[:12]], [a[0]["text"] for a in ans],
                        [a[0]["ended"] for a in ans], device)
    out["hacked_examples"] = [{"prompt": r["prompt"], "answer": a[0]["text"], "proxy": p,
                               "gold": judge(r, a[0]["text"], a[0]["ended"])["score"]}
                              for r, a, p in zip(rows[:12], ans, proxy)]
    for e in out["hacked_examples"]:
        print(f"  proxy {e['proxy']:+.2f} gold {e['gold']:.2f} | {e['prompt']} -> {e['answer']}")
    return rl, out


def main(cfg):
    cfg = follow_data(cfg, "prompts", {"ppo_prompts": "the RL curve is skipped; pass --ppo_prompts=<rollout prompts>"},
                      checkpoints=("sft", "reward_model"))
    print_config(cfg)
    dev = pick_device(cfg.device)
    policy, ckpt = load_model(cfg.sft, dev.device)
    tok = get_tokenizer(ckpt.get("tokenizer", "embedded"))
    rm, _ = load_reward_model(cfg.reward_model, dev.device, tok, normalized=True)
    block = policy.config.block_size
    rows, judge = judged_prompts(cfg.prompts, cfg.judge, tok, 48, block, "the study")
    ppo_rows, ppo_judge = judged_prompts(cfg.ppo_prompts if cfg.ppo_iterations else "", cfg.judge, tok, 48, block,
                                         "the RL curve")
    if judge is None or (ppo_rows and ppo_judge is None):
        raise SystemExit("error: overopt.py measures gold against the proxy: it needs a gold judge (--judge) of "
                         "--prompts and of --ppo_prompts")
    os.makedirs(cfg.out_dir, exist_ok=True)
    rows = rows[:cfg.n_prompts]
    print(f"sampling {cfg.n_max} answers for each of {len(rows)} prompts ...")
    bon = evaluate_best_of_n(policy, rm, tok, rows, cfg.n_max, cfg.temperature, 48, cfg.seed, dev.device, judge=judge)
    d = np.array([math.sqrt(r["kl"]) for r in bon])
    gain = np.array([r["gold_mean"] - bon[0]["gold_mean"] for r in bon])
    fits = {"bon": fit_bon(d, gain)}
    summary = {"best_of_n": bon, "fit_bon": {"a": fits["bon"][0], "b": fits["bon"][1]}}
    rl = []
    if cfg.ppo_iterations and cfg.ppo_prompts:
        rl, out = rl_curve(cfg, rm, rows, tok, dev.device, judge)
        summary |= out
        if "fit_rl" in out:
            fits["rl"] = (out["fit_rl"]["a"], out["fit_rl"]["b"])
    plot(bon, rl, fits, os.path.join(cfg.out_dir, "overoptimization.png"))
    write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
    print(f"wrote {os.path.join(cfg.out_dir, 'overoptimization.png')} and summary.json")


if __name__ == "__main__":
    run_command(main, Config)
