"""Step 3 without a reward model or sampling: Direct Preference Optimization (Rafailov et al. 2023).

    python dpo.py                                 # on runs/reward/comparisons.jsonl, SFT as the reference
    python dpo.py --beta=0.3 --epochs=2 --out_dir=runs/dpo_b03

"Your language model is secretly a reward model": the KL-regularised objective max E[r] - beta KL(pi ||
pi_ref) is maximised by pi*(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x) (DPO eq. 4), so the reward is
r = beta log pi*/pi_ref + beta log Z(x) (eq. 5), and in a Bradley-Terry comparison Z(x) cancels. DPO fits
the policy itself to the comparisons with the reward model's loss, the implicit reward
r_hat(x, y) = beta (log pi(y|x) - log pi_ref(y|x)) in place of r. Offline: nothing is sampled and no
reward model is queried. `train` is: reference log-probs once, then a loop of

    step   -> a batch of prompts with all their ranked answers; the DPO loss over every pair; Adam
    eval   -> every eval_interval steps, the implicit reward's accuracy on the held-out comparisons
    log    -> one metrics.jsonl row per step

Shapes: K answers per prompt, S answers in a batch (the sum of its K), N answer length.

Implementation details:
1. The data are the comparisons reward.py trained on, held out by prompt with data.formats.split_by_prompt
   at the reward run's own --seed and --val_fraction (read from its checkpoint), so the implicit reward's
   held-out accuracy is measured on exactly the pairs of reward.py's held-out accuracy, reported beside it.
2. K-wise rankings used fully, as reward.py's eq. 1 (InstructGPT): all C(K,2) pairs of a prompt (w
   ranked above l) form ONE batch element, each answer forwarded once, and the loss is
   -1/C(K,2) sum log sigmoid(beta ((lp_w - ref_w) - (lp_l - ref_l))) (DPO eq. 7 for each pair); the batch
   loss is the mean over prompts. (The pairwise form, not the Plackett-Luce form of the DPO paper's
   appendix A.3: our labelers' rankings are Plackett-Luce, so every pair is Bradley-Terry, and the loss
   is then reward.py's with the implicit reward.)
3. The log-prob of an answer is the sum over its tokens of log softmax(logits) at temperature 1, its
   <|end|> included when it ended (the tokens the reward model scores).
4. The reference is the frozen SFT model; its log-probs of every answer, training and held out, are
   computed once before training, without gradients. Dropout is off in both models.
5. Logged: the loss; the implicit reward's pair accuracy and margin; the mean log-probs of the chosen
   and the rejected answer of every pair (in DPO both often fall, the rejected faster: the margin grows
   while the likelihood of the preferred answers drops too); their implicit rewards; beta. Held out: the
   implicit reward's accuracy against the labels and against gold, per pair as reward.py counts them (an
   exact tie counts half: before the first step every implicit reward is 0).
6. AdamW, linear warmup then a constant learning rate (as the DPO paper), gradient clipping; the data
   order is a seeded permutation per epoch.
7. Options and inputs (the SFT and reward model checkpoints, the comparisons, the evaluation prompts) are
   checked before anything is written; --resume is exact and refuses another stage's checkpoint or a
   finished run (unless --epochs grows), as every stage's.
Deviations: the comparisons are samples of the SFT model, which is the reference: the setting the paper
calls ideal (pi_ref = the policy that produced the preference data); simulated labelers; the paper's
RMSprop at lr 1e-6 for 6B-parameter models becomes AdamW at a rate for a ~1M-parameter one; one
process. Defaults: docs/EXPERIMENTS.md.
"""
import copy
import json
import math
import os
import time
import types
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F

from common import (above, at_least, below, check_config, config_dict, folder, load_state, lr_at, make_optimizer,
                    one_process, open_run, pick_device, plot_metrics, resume_checkpoint, rng_state, run_command,
                    save_checkpoint, set_lr, set_rng_state, set_seed, write_json)
from data.formats import read_comparisons, split_by_prompt
from engine import answers_too_long, load_model, load_reward_model, sequence_logprobs
from evaluate import a_judge, gold_scores, judged_prompts, resolve_judge
from rl import disable_dropout, final_evaluation, frozen
from tokenizer import get_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = os.path.join(HERE, "runs")


@dataclass
class Config:
    sft: str = os.path.join(RUNS, "sft", "ckpt.pt")  # policy init and frozen reference
    comparisons: str = os.path.join(RUNS, "reward", "comparisons.jsonl")  # what reward.py trained on
    reward_model: str = os.path.join(RUNS, "reward", "ckpt.pt")  # its --seed/--val_fraction give the split ("" = below)
    split_seed: int = 1337  # the split's seed when reward_model is ""
    val_fraction: Annotated[float, at_least(0), below(1)] = 0.1  # share of prompts held out when reward_model is ""
    eval_prompts: str = os.path.join(HERE, "data", "world", "prompts_dev.jsonl")  # final evaluation (dev; "" = skip)
    judge: Annotated[str, a_judge()] = "world"  # gold judge: world | package.module:function | file.py:function
    out_dir: Annotated[str, folder()] = os.path.join(RUNS, "dpo")  # checkpoint, metrics, summary, plot
    beta: Annotated[float, above(0)] = 0.1  # KL coefficient of the implicit objective (DPO paper: 0.1)
    epochs: Annotated[int, at_least(1)] = 1  # passes over the training comparisons
    batch_size: Annotated[int, at_least(1)] = 16  # prompts (each with all its K answers) per optimizer step
    lr: Annotated[float, at_least(0)] = 5e-5  # learning rate after warmup
    warmup_steps: Annotated[int, at_least(0)] = 20  # linear warmup
    grad_clip: Annotated[float, at_least(0)] = 1.0  # max gradient norm (0 = off)
    eval_interval: Annotated[int, at_least(1)] = 100  # steps between held-out accuracies (and checkpoints)
    eval_samples: Annotated[int, at_least(1)] = 8  # samples per held-out prompt in the final evaluation
    temperature: Annotated[float, above(0)] = 1.0  # sampling temperature of the final evaluation
    max_new_tokens: Annotated[int, at_least(1)] = 48  # longest answer sampled in the final evaluation
    seed: int = 1337  # seeds the data order and the evaluation samples
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    threads: Annotated[int, at_least(0)] = 0  # torch CPU threads (0 = torch's default)
    resume: bool = False  # continue from out_dir/ckpt.pt


# ----------------------------------------------------------------------------- the formulas

def implicit_reward(logprobs, ref_logprobs, beta):
    """DPO's reward, eq. 5 without beta log Z(x) (it cancels in every comparison): beta log pi/pi_ref."""
    return beta * (logprobs - ref_logprobs)


def dpo_loss(logprobs, ref_logprobs, ranking, beta):
    """DPO eq. 7 for ONE prompt with K ranked answers, over all its C(K,2) pairs (as InstructGPT eq. 1):
    logprobs, ref_logprobs (K,) sequence log-probs, ranking best first. Returns (loss = -mean over pairs
    of log sigmoid(r_hat_w - r_hat_l), the pairs' margins r_hat_w - r_hat_l, (w, l) answer indices)."""
    order = torch.as_tensor(ranking, device=logprobs.device)
    K = order.numel()
    iw, il = torch.triu_indices(K, K, offset=1, device=logprobs.device)  # every pair: w ranked above l
    w, l = order[iw], order[il]
    r = implicit_reward(logprobs, ref_logprobs, beta)  # (K,)
    margins = r[w] - r[l]  # (C(K,2),)
    return -F.logsigmoid(margins).mean(), margins, (w, l)


# ----------------------------------------------------------------------------- the steps of train()

def encode(tok, comps, block_size):
    """Each comparison as prompt ids and its answers' ids (<|end|> kept if the answer ended), cropped to the context."""
    out = []
    for c in comps:
        p = tok.render_chat(c["prompt"])[0]
        ends = c.get("ended") or [True] * len(c["responses"])
        out.append({"prompt": p, "ranking": c["ranking"], "answers": [
            tok.render_chat(c["prompt"], r)[1][:None if e else -1][:block_size - len(p)] for r, e in zip(c["responses"], ends)]})
    return out


@torch.no_grad()
def logprobs_of(model, items, pad_id, device, batch_prompts=64):
    """Every answer's sequence log-prob under `model`, one (K,) tensor per comparison."""
    model.eval()
    out = []
    for b in range(0, len(items), batch_prompts):
        chunk = items[b:b + batch_prompts]
        lp = sequence_logprobs(model, [it["prompt"] for it in chunk for _ in it["answers"]],
                               [a for it in chunk for a in it["answers"]], pad_id, device).cpu()
        out += list(lp.split([len(it["answers"]) for it in chunk]))
    return out


def heldout_split(cfg):
    """(seed, fraction) of the held-out split and the reward model's held-out accuracies: with --reward_model,
    reward.py's own split (split_by_prompt(comps, val_fraction, seed)) and its summary.json (if written)."""
    if not cfg.reward_model:
        return cfg.split_seed, cfg.val_fraction, {}
    ckpt = load_reward_model(cfg.reward_model)[1]  # refuses a checkpoint that is not a reward model's
    path = os.path.join(os.path.dirname(cfg.reward_model), "summary.json")
    rm = json.load(open(path)) if os.path.exists(path) else {}
    return ckpt["config"]["seed"], ckpt["config"]["val_fraction"], {
        f"rm_heldout_acc_vs_{k}": rm[f"heldout_acc_vs_{k}"] for k in ("labels", "gold") if f"heldout_acc_vs_{k}" in rm}


def setup(cfg):
    """Options and inputs checked; policy and frozen reference, the comparisons split by prompt and encoded, the
    reference's log-probs, the optimizer, restored on --resume; metrics.jsonl is opened last."""
    check_config(cfg, one_process("dpo.py"))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    device = pick_device(cfg.device).device
    policy, ckpt = load_model(cfg.sft, device)
    tok = get_tokenizer(ckpt.get("tokenizer", "embedded"))
    ref = frozen(copy.deepcopy(disable_dropout(policy)))
    seed, fraction, rm_acc = heldout_split(cfg)
    block = policy.config.block_size
    comps = read_comparisons(cfg.comparisons, lambda c: answers_too_long(tok, c["prompt"], c["responses"], c.get(
        "ended"), block), at_least=2)  # reward.py's rule: what it trained on, DPO reads
    train_comps, val_comps = split_by_prompt(comps, fraction, seed)
    if not train_comps:  # one prompt text in every comparison: split_by_prompt holds out at least one
        raise SystemExit(f"error: {cfg.comparisons}: every comparison has the one held-out prompt, none to train on")
    eval_rows, eval_judge = judged_prompts(cfg.eval_prompts, cfg.judge, tok, cfg.max_new_tokens, block)
    val_judge = resolve_judge(cfg.judge, val_comps, cfg.comparisons, "the held-out accuracy against the gold judge")
    run = types.SimpleNamespace(device=device, tok=tok, policy=policy, ref=ref, train=encode(tok, train_comps, block),
                                val=encode(tok, val_comps, block), eval_rows=eval_rows, eval_judge=eval_judge,
                                rm_acc=rm_acc, step=0, ckpt_path=os.path.join(cfg.out_dir, "ckpt.pt"),
                                steps_per_epoch=math.ceil(len(train_comps) / cfg.batch_size))
    run.max_steps = cfg.epochs * run.steps_per_epoch
    ckpt = resume_checkpoint(run.ckpt_path, "dpo", "step", run.max_steps) if cfg.resume else None
    t0 = time.time()
    for items in (run.train, run.val):  # detail 4: the reference's log-probs, once
        for it, lp in zip(items, logprobs_of(ref, items, tok.pad_id, device)):
            it["ref"] = lp.to(device)
    run.ref_seconds = time.time() - t0
    run.val_gold = gold_scores(val_comps, val_judge)  # the gold judge's scores of the held-out answers
    run.optimizer = make_optimizer(policy, cfg.lr, 0.0, device.split(":")[0])
    if ckpt is not None:
        load_state(policy, ckpt["model"], run.ckpt_path)
        run.optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        run.step = ckpt["step"]
        print(f"resumed from {run.ckpt_path} at step {run.step}")
    run.metrics = open_run(cfg, True, f"{len(run.train)} training / {len(run.val)} held-out comparisons (split seed "
                                      f"{seed}, fraction {fraction}); {run.max_steps} steps", resumed=("step", run.step))
    return run


def train_step(run, cfg):
    """One optimizer step on the next batch of prompts, each with all its ranked answers."""
    epoch, i = divmod(run.step, run.steps_per_epoch)
    order = torch.randperm(len(run.train), generator=torch.Generator().manual_seed(cfg.seed + epoch))
    batch = [run.train[j] for j in order[i * cfg.batch_size:(i + 1) * cfg.batch_size].tolist()]
    lr = lr_at(run.step, cfg.lr, cfg.lr, cfg.warmup_steps, run.max_steps)  # warmup, then constant
    set_lr(run.optimizer, lr)
    run.policy.train()
    lp = sequence_logprobs(run.policy, [it["prompt"] for it in batch for _ in it["answers"]],
                           [a for it in batch for a in it["answers"]], run.tok.pad_id, run.device)  # (S,)
    losses, margins, chosen, rejected = [], [], [], []
    for it, lp_k in zip(batch, lp.split([len(it["answers"]) for it in batch])):
        loss, m, (w, l) = dpo_loss(lp_k, it["ref"], it["ranking"], cfg.beta)
        losses.append(loss)
        margins.append(m.detach())
        chosen.append(torch.stack([lp_k[w].detach(), it["ref"][w]]))  # (2, pairs): policy and reference
        rejected.append(torch.stack([lp_k[l].detach(), it["ref"][l]]))
    loss = torch.stack(losses).mean()
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.policy.parameters(), cfg.grad_clip or float("inf"))
    run.optimizer.step()
    run.step += 1
    m, c, r = torch.cat(margins), torch.cat(chosen, 1), torch.cat(rejected, 1)
    return {"step": run.step, "epoch": epoch, "loss": loss.item(), "accuracy": ((m > 0).float() + 0.5 * (m == 0).float()).mean().item(),
            "margin": m.mean().item(), "chosen_logprob": c[0].mean().item(), "rejected_logprob": r[0].mean().item(),
            "chosen_reward": cfg.beta * (c[0] - c[1]).mean().item(), "rejected_reward": cfg.beta * (r[0] - r[1]).mean().item(),
            "beta": cfg.beta, "lr": lr, "grad_norm": float(grad_norm)}


def evaluate_heldout(run, cfg, model):
    """The implicit reward of `model` on the held-out comparisons: per-pair accuracy vs the labels and vs
    gold (ties half), and the mean log-probs of the chosen and the rejected answers."""
    acc_l, acc_g, chosen, rejected = [], [], [], []
    for it, lp, gold in zip(run.val, logprobs_of(model, run.val, run.tok.pad_id, run.device), run.val_gold):
        _, m, (w, l) = dpo_loss(lp.to(run.device), it["ref"], it["ranking"], cfg.beta)
        acc_l += ((m > 0).float() + 0.5 * (m == 0).float()).tolist()
        chosen += lp[w.cpu()].tolist()
        rejected += lp[l.cpu()].tolist()
        if gold is not None:
            r = implicit_reward(lp, it["ref"].cpu(), cfg.beta).tolist()
            acc_g += [1.0 if (r[a] - r[b]) * (gold[a] - gold[b]) > 0 else 0.5 if r[a] == r[b] else 0.0
                      for a in range(len(r)) for b in range(a + 1, len(r)) if gold[a] != gold[b]]
    mean = lambda xs: sum(xs) / len(xs) if xs else None
    return {"val_acc_vs_labels": mean(acc_l), "val_acc_vs_gold": mean(acc_g), "val_chosen_logprob": mean(chosen),
            "val_rejected_logprob": mean(rejected)}


def save(run, cfg, finished=False):
    save_checkpoint(run.ckpt_path, {
        "stage": "dpo", "finished": finished, "model": run.policy.state_dict(),
        "model_config": config_dict(run.policy.config), "config": config_dict(cfg), "tokenizer": run.tok.name,
        "step": run.step, "optimizer": run.optimizer.state_dict(), "rng": rng_state()})


def finish(run, cfg, t_start, first_eval):
    """summary.json: held-out accuracies beside the reward model's, log-probs before and after, the
    evaluation against SFT; the plot."""
    last = evaluate_heldout(run, cfg, run.policy)
    summary = {"method": "dpo", "steps": run.step, "beta": cfg.beta, "train_seconds": round(time.time() - t_start, 1),
               "ref_logprob_seconds": round(run.ref_seconds, 1), "answers_generated": 0, "rm_calls": 0,
               "n_train_comparisons": len(run.train), "n_heldout_comparisons": len(run.val),
               "heldout_implicit_acc_vs_labels": last["val_acc_vs_labels"],
               "heldout_implicit_acc_vs_gold": last["val_acc_vs_gold"],
               "heldout_chosen_logprob": [first_eval["val_chosen_logprob"], last["val_chosen_logprob"]],
               "heldout_rejected_logprob": [first_eval["val_rejected_logprob"], last["val_rejected_logprob"]]}
    summary |= run.rm_acc  # the reward model's accuracies on the same held-out pairs
    print(f"held-out implicit reward: acc vs labels {last['val_acc_vs_labels']:.3f}, vs gold "
          f"{last['val_acc_vs_gold'] or float('nan'):.3f} (reward model: {summary.get('rm_heldout_acc_vs_labels')}, "
          f"{summary.get('rm_heldout_acc_vs_gold')}); chosen log-prob {first_eval['val_chosen_logprob']:.2f} -> "
          f"{last['val_chosen_logprob']:.2f}, rejected {first_eval['val_rejected_logprob']:.2f} -> "
          f"{last['val_rejected_logprob']:.2f}")
    summary |= final_evaluation(run.policy, run.ref, run.tok, run.eval_rows, cfg, run.device, run.eval_judge)
    write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
    plot_metrics(os.path.join(cfg.out_dir, "metrics.jsonl"), os.path.join(cfg.out_dir, "training.png"),
                 ["loss", "accuracy", "margin", "val_acc_vs_labels", "val_acc_vs_gold", "chosen_logprob",
                  "rejected_logprob", "chosen_reward", "rejected_reward", "val_chosen_logprob", "val_rejected_logprob"],
                 title=f"DPO (beta {cfg.beta})")
    return summary


def train(cfg):
    run = setup(cfg)
    first_eval = evaluate_heldout(run, cfg, run.ref)  # before training: every implicit reward is 0
    if not cfg.resume:
        run.metrics.log(step=0, **first_eval)
    t_start = time.time()
    while run.step < run.max_steps:
        row = train_step(run, cfg)
        if run.step % cfg.eval_interval == 0 or run.step == run.max_steps:
            row |= evaluate_heldout(run, cfg, run.policy)
            print(f"step {run.step:5d}/{run.max_steps} | loss {row['loss']:.4f} | acc {row['accuracy']:.3f} | "
                  f"held-out acc {row['val_acc_vs_labels']:.3f} (gold {row['val_acc_vs_gold'] or float('nan'):.3f}) | "
                  f"chosen {row['chosen_logprob']:.2f} rejected {row['rejected_logprob']:.2f} | {time.time() - t_start:.0f}s")
        run.metrics.log(**row)  # the row first, then the checkpoint that covers it
        if "val_acc_vs_labels" in row:
            save(run, cfg)
    summary = finish(run, cfg, t_start, first_eval)
    save(run, cfg, finished=True)
    return run.policy, summary


if __name__ == "__main__":
    run_command(train, Config)
