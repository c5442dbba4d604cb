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
   order is a seeded permutation per epoch; --resume continues from the checkpoint.
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

import torch
import torch.nn.functional as F

from common import (config_dict, load_checkpoint, lr_at, make_optimizer, open_run, parse_config, pick_device,
                    plot_metrics, rng_state, save_checkpoint, set_lr, set_rng_state, set_seed, write_json)
from data import world as W
from data.formats import read_comparisons, read_prompts, split_by_prompt
from engine import load_model, pack
from evaluate import compare_to_reference
from model import token_logprobs
from rl import disable_dropout
from tokenizer import get_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = os.path.join(HERE, "runs")


@dataclass
class Config:
    sft: str = os.path.join(RUNS, "sft", "ckpt.pt")  # policy init and frozen reference
    comparisons: str = os.path.join(RUNS, "reward", "comparisons.jsonl")  # what reward.py trained on
    reward_model: str = os.path.join(RUNS, "reward", "ckpt.pt")  # its --seed/--val_fraction give the split ("" = below)
    split_seed: int = 1337  # the split's seed when reward_model is ""
    val_fraction: float = 0.1  # share of prompts held out when reward_model is ""
    eval_prompts: str = os.path.join(HERE, "data", "world", "prompts_dev.jsonl")  # final evaluation (dev; "" = skip)
    out_dir: str = os.path.join(RUNS, "dpo")  # checkpoint, metrics, summary, plot
    beta: float = 0.1  # KL coefficient of the implicit objective (DPO paper: 0.1)
    epochs: int = 1  # passes over the training comparisons
    batch_size: int = 16  # prompts (each with all its K answers) per optimizer step
    lr: float = 5e-5  # learning rate after warmup
    warmup_steps: int = 20  # linear warmup
    grad_clip: float = 1.0  # max gradient norm (0 = off)
    eval_interval: int = 100  # steps between held-out accuracies
    eval_samples: int = 8  # samples per held-out prompt in the final evaluation
    temperature: float = 1.0  # sampling temperature of the final evaluation
    max_new_tokens: int = 48  # longest answer sampled in the final evaluation
    seed: int = 1337  # seeds the data order and the evaluation samples
    device: str = "auto"  # auto | cpu | cuda | mps
    threads: int = 0  # torch CPU threads (0 = torch's default)
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


def sequence_logprobs(model, prompts, answers, pad_id, device):
    """log pi(y|x) = sum over the answer's tokens of log pi(y_t | x, y_<t) for token-id lists: (S,)."""
    seq, mask, P, resp, rmask = pack(prompts, answers, pad_id)
    logits = model(seq.to(device), attention_mask=mask.to(device))[0][:, P - 1:-1]  # (S, N, V)
    return (token_logprobs(logits, resp.to(device)) * rmask.to(device)).sum(1)


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


def setup(cfg):
    """Policy and frozen reference, the comparisons split by prompt and encoded, the reference's log-probs."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    device = pick_device(cfg.device).device
    policy, ckpt = load_model(cfg.sft, device)
    tok = get_tokenizer(ckpt.get("tokenizer", "embedded"))
    ref = disable_dropout(copy.deepcopy(policy)).eval().requires_grad_(False)
    disable_dropout(policy)
    seed, fraction = cfg.split_seed, cfg.val_fraction
    if cfg.reward_model:  # the reward model's own split (reward.py: split_by_prompt(comps, val_fraction, seed))
        rm_cfg = load_checkpoint(cfg.reward_model)["config"]
        seed, fraction = rm_cfg["seed"], rm_cfg["val_fraction"]
    train_comps, val_comps = split_by_prompt(read_comparisons(cfg.comparisons), fraction, seed)
    block = policy.config.block_size
    run = types.SimpleNamespace(device=device, tok=tok, policy=policy, ref=ref, train=encode(tok, train_comps, block),
                                val=encode(tok, val_comps, block), val_comps=val_comps, step=0,
                                ckpt_path=os.path.join(cfg.out_dir, "ckpt.pt"))
    run.steps_per_epoch = math.ceil(len(run.train) / cfg.batch_size)
    run.max_steps = cfg.epochs * run.steps_per_epoch
    t0 = time.time()
    for items in (run.train, run.val):  # detail 4: the reference's log-probs, once
        for it, lp in zip(items, logprobs_of(ref, items, tok.pad_id, device)):
            it["ref"] = lp.to(device)
    run.ref_seconds = time.time() - t0
    run.val_gold = [[W.judge(c["world"], r, e)["score"] for r, e in zip(c["responses"], c.get("ended") or
                     [True] * len(c["responses"]))] if c.get("world") else None for c in val_comps]
    run.optimizer = make_optimizer(policy, cfg.lr, 0.0, device.split(":")[0])
    os.makedirs(cfg.out_dir, exist_ok=True)
    if cfg.resume:
        ck = load_checkpoint(run.ckpt_path)
        policy.load_state_dict(ck["model"])
        run.optimizer.load_state_dict(ck["optimizer"])
        set_rng_state(ck["rng"])
        run.step = ck["step"]
        print(f"resumed from {run.ckpt_path} at step {run.step}")
    run.metrics = open_run(cfg, True, f"{len(run.train)} training / {len(run.val)} held-out comparisons "
                                      f"(split seed {seed}, fraction {fraction}); {run.max_steps} steps")
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


def save(run, cfg):
    save_checkpoint(run.ckpt_path, {"model": run.policy.state_dict(), "model_config": config_dict(run.policy.config),
                                    "config": config_dict(cfg), "tokenizer": run.tok.name, "step": run.step,
                                    "optimizer": run.optimizer.state_dict(), "rng": rng_state()})


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
    rm_summary = os.path.join(os.path.dirname(cfg.reward_model), "summary.json") if cfg.reward_model else ""
    if rm_summary and os.path.exists(rm_summary):  # the reward model's accuracy on the same held-out pairs
        rm = json.load(open(rm_summary))
        summary |= {"rm_heldout_acc_vs_labels": rm.get("heldout_acc_vs_labels"),
                    "rm_heldout_acc_vs_gold": rm.get("heldout_acc_vs_gold")}
    print(f"held-out implicit reward: acc vs labels {last['val_acc_vs_labels']:.3f}, vs gold "
          f"{last['val_acc_vs_gold'] or float('nan'):.3f} (reward model: {summary.get('rm_heldout_acc_vs_labels')}, "
          f"{summary.get('rm_heldout_acc_vs_gold')}); chosen log-prob {first_eval['val_chosen_logprob']:.2f} -> "
          f"{last['val_chosen_logprob']:.2f}, rejected {first_eval['val_rejected_logprob']:.2f} -> "
          f"{last['val_rejected_logprob']:.2f}")
    t_eval = time.time()
    if cfg.eval_prompts:
        rows = [r for r in read_prompts(cfg.eval_prompts) if r.get("world")]
        summary |= compare_to_reference(run.policy, run.ref, run.tok, rows, cfg.eval_samples, cfg.temperature,
                                        run.device, cfg.max_new_tokens, seed=cfg.seed)
    summary["eval_seconds"] = round(time.time() - t_eval, 1)
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
            save(run, cfg)
        run.metrics.log(**row)
    return run.policy, finish(run, cfg, t_start, first_eval)


if __name__ == "__main__":
    train(parse_config(Config))
