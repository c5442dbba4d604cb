"""Step 3 as supervised learning: rejection sampling fine-tuning (best-of-n, then SFT on the winners).

    python rejection.py                           # one round: 800 prompts x 8 answers, SFT on the 800 best
    python rejection.py --rounds=3 --prompts_per_round=300    # iterated, each round from the last one's model
    python rejection.py --min_score=0.5           # keep a prompt's best answer only if its score beats 0.5

Llama 2's first RLHF rounds (Touvron et al. 2023, sec. 3.2.3) at toy scale: sample n answers to each
prompt from the current policy, let the reward model pick the best, fine-tune on the winners as if they
were demonstrations. Best-of-n (evaluate.evaluate_best_of_n) gets the same selection at inference time
by sampling n answers to every question; rejection sampling pays for it once, in training. Each round:

    sample    -> n answers to each of prompts_per_round prompts (rl.rollout on every row repeated n times)
    score     -> reward-model score, or no_eos_score for an answer that never ends (rl.score_rollout)
    select    -> per prompt the highest-scoring answer (above min_score): runs/rejection/round_<r>/winners.jsonl
    fine-tune -> sft.train on the winners, starting from the current policy (no second training loop)

Implementation details:
1. Sampling, scoring and the EOS trick are the online methods' (rl.rollout, rl.score_rollout): the
   answers are sampled at temperature T with the KV cache, cut after <|end|>, and one that never ends
   gets no_eos_score, so it can only win if every answer to its prompt failed to end (it is then
   trained on without an <|end|>, like a demonstration marked "ended": false).
2. Selection: argmax of the reward model's score among a prompt's n answers (ties: the first); a
   winner must score above min_score (-inf keeps every prompt's best) and be non-empty. The rollout's
   gold verdicts are logged for all answers and for the winners (the policy never sees them).
3. Fine-tuning is sft.train with sft.Config(init_from=<the current policy>, train_data=<the winners>):
   loss on answer tokens only, AdamW, warmup and cosine decay, gradient clipping (sft.py's details).
4. Every round samples a fresh set of prompts (without replacement where the file is large enough).
5. Options and inputs are checked before anything is written (sft.py's options too: a bad one would
   otherwise stop the first round's fine-tuning); out_dir/ckpt.pt holds the current policy after each
   round, with the round's metrics row written before it. --resume continues after the last finished
   round and redoes an interrupted one exactly: each round's random streams are seeded by its index
   (prompt choice, sampling; sft.py seeds its own). It refuses another stage's checkpoint or a finished
   run (unless --rounds grows).
Deviations from Llama 2: one model size and one reward model (no separate safety reward model, no
distillation from the largest model); each round keeps only its own winners (Llama 2 later pools the
best answers of all earlier rounds); the sampling temperature is fixed; fine-tuning continues from
the previous round's model. Defaults: docs/EXPERIMENTS.md.
"""
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Annotated

import torch

import sft
from common import (above, at_least, check_config, config_dict, folder, one_of, one_process, open_run, or_infinite,
                    plot_metrics, read_jsonl, resume_checkpoint, run_command, save_checkpoint, write_json)
from data.formats import write_jsonl
from engine import load_model
from evaluate import a_judge
from rl import disable_dropout, final_evaluation, frozen, gold_means, load_online_inputs, rollout, score_rollout

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD = os.path.join(HERE, "data", "world")
RUNS = os.path.join(HERE, "runs")


@dataclass
class Config:
    sft: str = os.path.join(RUNS, "sft", "ckpt.pt")  # the first round's policy, and the evaluation's reference
    reward_model: str = os.path.join(RUNS, "reward", "ckpt.pt")  # picks the winners
    reward: Annotated[str, one_of("rm", "gold")] = "rm"  # gold = oracle mode: the gold judge (--judge) picks
    judge: Annotated[str, a_judge()] = "world"  # gold judge: world | package.module:function | file.py:function
    prompts: str = os.path.join(WORLD, "prompts_ppo.jsonl")  # prompts to sample answers to
    eval_prompts: str = os.path.join(WORLD, "prompts_dev.jsonl")  # final evaluation (dev; compare.py passes test; "" = skip)
    out_dir: Annotated[str, folder()] = os.path.join(RUNS, "rejection")  # round_<r>/ (winners, sft.py's run), ckpt, ...
    rounds: Annotated[int, at_least(1)] = 1  # sample -> select -> fine-tune cycles
    prompts_per_round: Annotated[int, at_least(1)] = 800  # prompts sampled each round
    n: Annotated[int, at_least(1)] = 8  # answers sampled per prompt
    min_score: Annotated[float, or_infinite()] = float("-inf")  # keep a prompt's best answer only if it scores above
    temperature: Annotated[float, above(0)] = 1.0  # sampling temperature
    max_new_tokens: Annotated[int, at_least(1)] = 48  # longest answer, in tokens
    no_eos_score: float = -1.0  # score of an answer that never emits <|end|>
    chunk: Annotated[int, at_least(1)] = 32  # prompts per rollout call (each repeated n times)
    epochs: Annotated[int, at_least(1)] = 2  # sft.py epochs over each round's winners
    batch_size: Annotated[int, at_least(1)] = 32  # sft.py batch size
    lr: Annotated[float, at_least(0)] = 1e-4  # sft.py peak learning rate
    min_lr: Annotated[float, at_least(0)] = 1e-5  # sft.py cosine floor
    warmup_steps: Annotated[int, at_least(0)] = 5  # sft.py warmup
    eval_samples: Annotated[int, at_least(1)] = 8  # samples per held-out prompt in the final evaluation
    seed: int = 1337  # seeds the prompts, the sampling, sft.py's data order and the evaluation samples
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    threads: Annotated[int, at_least(0)] = 0  # torch CPU threads (0 = torch's default)
    resume: bool = False  # continue after the last finished round (out_dir/ckpt.pt)


def check(cfg, world):
    """Each option's own range (declared in Config), then sft.py's checks of the options it is handed, which
    would otherwise stop the first round's fine-tuning after the sampling."""
    check_config(sft_config(check_config(cfg, world), cfg.sft, "", cfg.out_dir), world)


# ----------------------------------------------------------------------------- the formula

def select_best(scores, n, min_score=float("-inf")):
    """Rejection sampling's choice: for each group of n consecutive scores, the index of the highest (the
    first on ties), or None when even the best is not above min_score. scores (G * n,) -> G indices."""
    best = scores.view(-1, n).max(dim=1)  # values (G,), indices (G,)
    return [g * n + int(i) if v > min_score else None for g, (v, i) in enumerate(zip(best.values.tolist(), best.indices))]


# ----------------------------------------------------------------------------- the steps of train()

def sample_round(policy, ref, rm, tok, rows, cfg, device, gen, judge):
    """n answers to every row, scored (detail 1), in chunks of cfg.chunk prompts. Returns the answer
    texts, endeds, scores (G * n,) and gold verdicts (None where no judge can judge)."""
    texts, endeds, scores, judged = [], [], [], []
    for b in range(0, len(rows), cfg.chunk):
        ro = rollout(policy, ref, rm, tok, [r for r in rows[b:b + cfg.chunk] for _ in range(cfg.n)], cfg, device, gen,
                     judge)
        s, _ = score_rollout(ro, cfg, gold_norm=(0.0, 1.0))  # gold only ranks here: no normalisation needed
        texts += ro["texts"]
        endeds += ro["ended"].tolist()
        scores.append(s.cpu())
        judged += ro["judged"]
    return texts, endeds, torch.cat(scores), judged


def select(rows, texts, endeds, scores, judged, cfg):
    """The winners as sft.py demonstrations, and the round's statistics (all answers vs winners)."""
    picks = [i for i in select_best(scores, cfg.n, cfg.min_score) if i is not None and texts[i].strip()]
    winners = [{"prompt": rows[i // cfg.n]["prompt"], "response": texts[i], "ended": endeds[i]} for i in picks]
    stats = {"answers": len(texts), "kept": len(winners), "score_all": scores.mean().item(),
             "score_winners": scores[picks].mean().item() if picks else None}
    stats |= {f"{k}_all": v for k, v in gold_means(judged).items()}  # {} outside the embedded world
    stats |= {f"{k}_winners": v for k, v in gold_means([judged[i] for i in picks]).items()}
    return winners, stats


def sft_config(cfg, init_from, winners_path, round_dir):
    """sft.py's options for one round's fine-tuning (detail 3): the winners, from the current policy."""
    return sft.Config(init_from=init_from, train_data=winners_path, val_data="", prompts="", eval_base=False,
                      out_dir=round_dir, epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, min_lr=cfg.min_lr,
                      warmup_steps=cfg.warmup_steps, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                      device=cfg.device, threads=cfg.threads)


def setup(cfg):
    """Options and inputs checked; the reference, the reward model, the prompts and the current policy's
    checkpoint (the SFT model, or the last finished round's on --resume); metrics.jsonl is opened last."""
    check(cfg, one_process("rejection.py"))
    run = load_online_inputs(cfg)
    cfg = run.cfg
    run.ref = frozen(run.__dict__.pop("sft"))  # the evaluation's reference; each round loads its own policy
    run.__dict__.update(round=0, current=cfg.sft, ckpt_path=os.path.join(cfg.out_dir, "ckpt.pt"))
    if cfg.resume:
        run.round = resume_checkpoint(run.ckpt_path, "rejection", "round", cfg.rounds)["round"]
        run.current = run.ckpt_path  # the policy after that round
        print(f"resumed from {run.ckpt_path} after round {run.round}")
    run.metrics = open_run(cfg, True, f"{cfg.rounds} round(s) of {cfg.prompts_per_round} prompts x n={cfg.n} answers",
                           resumed=("round", run.round))
    return run


def save(run, cfg, finished=False):
    """out_dir/ckpt.pt: the current policy (the last round's fine-tuned model), a policy checkpoint as sft.py's."""
    policy, ckpt = load_model(run.current)
    save_checkpoint(run.ckpt_path, {"stage": "rejection", "finished": finished, "model": policy.state_dict(),
                                    "model_config": ckpt["model_config"], "config": config_dict(cfg),
                                    "tokenizer": run.tok.name, "round": run.round})


def train_round(run, cfg):
    """Round run.round: sample, score, select, fine-tune. Returns the metrics row."""
    r = run.round
    policy = disable_dropout(load_model(run.current, run.device)[0])
    rng = random.Random(cfg.seed + r)
    m = cfg.prompts_per_round
    rows = rng.sample(run.rows, m) if m <= len(run.rows) else [rng.choice(run.rows) for _ in range(m)]
    t0 = time.time()
    gen = torch.Generator(device=run.device).manual_seed(cfg.seed + 1000 * r)
    texts, endeds, scores, judged = sample_round(policy, run.ref, run.rm, run.tok, rows, cfg, run.device, gen, run.judge)
    winners, stats = select(rows, texts, endeds, scores, judged, cfg)
    t1 = time.time()
    if not winners:
        raise SystemExit(f"error: round {r}: no answer scored above --min_score={cfg.min_score}")
    round_dir = os.path.join(cfg.out_dir, f"round_{r}")
    os.makedirs(round_dir, exist_ok=True)
    write_jsonl(os.path.join(round_dir, "winners.jsonl"), winners)
    sft.train(sft_config(cfg, run.current, os.path.join(round_dir, "winners.jsonl"), round_dir))
    run.round, run.current = r + 1, os.path.join(round_dir, "ckpt.pt")
    row = {"round": r + 1, **stats, "sample_seconds": t1 - t0, "sft_seconds": time.time() - t1}
    print(f"round {r + 1}/{cfg.rounds} | kept {stats['kept']}/{len(rows)} | score {stats['score_all']:+.3f} -> winners "
          f"{stats['score_winners']:+.3f} | gold {stats.get('gold_all', math.nan):.3f} -> {stats.get('gold_winners', math.nan):.3f} "
          f"| {row['sample_seconds']:.0f}+{row['sft_seconds']:.0f}s")
    return row


def finish(run, cfg, t_start):
    """summary.json with the budget and the evaluation of the final policy against SFT; plot."""
    policy = load_model(run.current, run.device)[0]
    rows = read_jsonl(os.path.join(cfg.out_dir, "metrics.jsonl"))
    answers = cfg.rounds * cfg.prompts_per_round * cfg.n
    summary = {"method": "rejection", "rounds": cfg.rounds, "train_seconds": round(time.time() - t_start, 1),
               "sample_seconds": round(sum(r["sample_seconds"] for r in rows), 1),
               "sft_seconds": round(sum(r["sft_seconds"] for r in rows), 1), "answers_generated": answers,
               "rm_calls": answers if cfg.reward == "rm" else 0, "winners": [r["kept"] for r in rows]}
    summary |= final_evaluation(policy, run.ref, run.tok, run.eval_rows, cfg, run.device, run.eval_judge)
    write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
    plot_metrics(os.path.join(cfg.out_dir, "metrics.jsonl"), os.path.join(cfg.out_dir, "training.png"),
                 ["score_all", "score_winners", "gold_all", "gold_winners", "gold_pass_all", "gold_pass_winners", "kept"],
                 x="round", title="rejection sampling")
    return policy, summary


def train(cfg):
    run = setup(cfg)
    cfg = run.cfg  # with the defaults that follow the data resolved
    t_start = time.time()
    while run.round < cfg.rounds:
        run.metrics.log(**train_round(run, cfg))  # the row first, then the checkpoint that covers it
        save(run, cfg)
    policy, summary = finish(run, cfg, t_start)
    save(run, cfg, finished=True)
    return policy, summary


if __name__ == "__main__":
    run_command(train, Config)
