"""Step 2 of InstructGPT: comparisons and a Bradley-Terry reward model.

    python reward.py                        # embedded world: sample, label, train 3 models, evaluate
    python reward.py --init_from=out/sft/ckpt.pt --comparisons=task/comparisons.jsonl --out_dir=out/reward

"I can't build a fridge, but I can judge one." For each labelling prompt the SFT model answers K
times, a (simulated) labeler ranks the answers, and a reward model learns to predict the ranking.

Shapes: K answers per prompt, E members of an ensemble.

Implementation details:
1. Collection: K answers per prompt sampled from the SFT policy at temperature 1 with the KV cache;
   one labeler from the pool ranks them (data/world.py: Plackett-Luce over gold score, calibrated
   noise; identical answers and exact ties are dropped first). A second labeler ranks a subset so
   the inter-labeler agreement on SFT samples is measured, not assumed.
2. The reward model is the SFT Transformer plus a scalar head on the final hidden state of the last
   real token (the <|end|> token), never a mean over positions (padding would leak in). Position
   ids come from the attention mask, so the amount and side of padding never change a score.
3. Loss exactly as InstructGPT (Ouyang et al. 2022, eq. 1): all C(K,2) pairs of one prompt form ONE
   batch element (each answer is forwarded once) and the loss is
   -1/C(K,2) * sum log sigmoid(r(x, y_w) - r(x, y_l)). Pairwise data is the K = 2 case.
4. After training, the head is shifted and scaled so that the demonstrations score mean 0
   (InstructGPT: "labeler demonstrations achieve a mean score of 0") and the comparison answers (in the
   embedded world: SFT samples) std 1 (docs/RLHF_DETAILS.md, detail 7); without --demonstrations the
   comparison answers get mean 0 too. The normalisation is recorded in the checkpoint (ppo.py refuses a
   reward model without it). An ensemble's members are normalised one by one, then share one gain so
   that their mean has std 1 too.
5. Evaluation on held-out comparisons, held out by prompt (no held-out prompt text is trained on):
   accuracy against the labels and against the gold judge (--judge, the world's or the user's), both per
   answer pair like the labelers' ceilings on the same pairs (embedded world only), mean margin, a
   calibration plot, the correlation of reward with answer length, a warning when the accuracy is close
   to chance; and best-of-n (the cheapest use of a reward model) at n = 1, 2, 4, ... up to --best_of,
   with KL = log n - (n-1)/n.
6. `--ensemble=N` trains N reward models on the same comparisons, one after the other, from different
   seeds (head initialisation, data order); the reward is their mean (Coste et al. 2023). Each
   member's own held-out accuracy is reported beside the ensemble's.
7. Inputs are checked before anything is written: a comparison whose answer leaves no room for its
   prompt in the context is an error naming its line (a long prompt loses its start, markers kept).
   With the user's own --comparisons, the options that default to the embedded world's files are
   skipped with a note, never read (common.follow_data); a named file that is missing is an error.
Deviations: the paper's RM is a 6B model initialised from a pretrained (not SFT) checkpoint; ours
is the SFT model (as in Stiennon et al. 2020) and the labelers are simulated. InstructGPT trains one
epoch (more epochs overfit its 6B model); our ~1M-parameter members train two (docs/EXPERIMENTS.md).
"""
import copy
import math
import os
import random
import time
import types
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F

from common import (above, all_reduce_sum, at_least, below, check_config, config_dict, ddp_barrier, ddp_cleanup,
                    ddp_setup, ddp_wrap, folder, follow_data, load_state, lr_at, make_optimizer, open_run, per_rank,
                    pick_device, plot_calibration, plot_metrics, resume_checkpoint, rng_state, run_command,
                    save_checkpoint, set_lr, set_rng_state, set_seed, write_json)
from data import world as W
from data.formats import read_comparisons, read_prompts, read_sft, split_by_prompt, write_jsonl
from engine import (RewardEnsemble, RewardModel, answers_too_long, encode_answers, generate_answers, left_pad,
                    load_model, pack_answers, prompt_too_long, score_texts)
from evaluate import (a_judge, evaluate_best_of_n, gold_scores, judged_prompts, resolve_judge, reward_model_line,
                      reward_model_stats, reward_model_warning)
from tokenizer import get_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD = os.path.join(HERE, "data", "world")


@dataclass
class Config:
    init_from: str = os.path.join(HERE, "runs", "sft", "ckpt.pt")  # SFT checkpoint: sampler and RM init
    comparisons: str = ""  # a comparisons JSONL to train on ("" = collect them in the embedded world)
    label_prompts: str = os.path.join(WORLD, "prompts_label.jsonl")  # prompts to sample and label
    demonstrations: str = os.path.join(WORLD, "sft_train.jsonl")  # the RM is biased so these score 0 ("" = none)
    eval_prompts: str = os.path.join(WORLD, "prompts_dev.jsonl")  # held-out prompts for best-of-n ("" = skip)
    judge: Annotated[str, a_judge()] = "world"  # gold judge: world | package.module:function | file.py:function
    world_dir: str = WORLD  # labelers.json (the calibrated labeler pool)
    out_dir: Annotated[str, folder()] = os.path.join(HERE, "runs", "reward")  # comparisons, checkpoint, metrics, plots
    k: Annotated[int, at_least(2)] = 8  # answers sampled per labelling prompt (InstructGPT: 4 to 9)
    temperature: Annotated[float, above(0)] = 1.0  # sampling temperature for the answers to be labelled
    max_new_tokens: Annotated[int, at_least(1)] = 48  # longest sampled answer, in tokens
    labeler_bias: float = -1.0  # extra utility per courtesy phrase (< 0 = the value in labelers.json)
    double_label: Annotated[int, at_least(0)] = 300  # prompts ranked by a second labeler to measure agreement
    val_fraction: Annotated[float, at_least(0), below(1)] = 0.1  # share of prompt texts whose comparisons are held out
    epochs: Annotated[int, at_least(1)] = 2  # passes over the comparisons per member (InstructGPT: one; Deviations)
    batch_size: Annotated[int, at_least(1), per_rank()] = 16  # prompts (each with all its K answers) per optimizer step
    lr: Annotated[float, at_least(0)] = 3e-4  # peak learning rate (docs/EXPERIMENTS.md: how it was chosen)
    min_lr: Annotated[float, at_least(0)] = 3e-5  # cosine floor
    warmup_steps: Annotated[int, at_least(0)] = 20  # linear warmup, per member
    weight_decay: Annotated[float, at_least(0)] = 0.0  # AdamW, on 2-D weights only
    grad_clip: Annotated[float, at_least(0)] = 1.0  # max global gradient norm (0 = off)
    eval_interval: Annotated[int, at_least(1)] = 100  # steps between held-out evaluations (each scores all held out)
    ensemble: Annotated[int, at_least(1)] = 1  # reward models trained from different seeds; the reward: their mean
    best_of: Annotated[int, at_least(0)] = 8  # best-of-n evaluation up to this n on the held-out prompts (0 = skip)
    n_norm: Annotated[int, at_least(1)] = 512  # demonstrations / SFT samples used for the score normalisation
    seed: int = 1337  # seeds sampling, labelling, the split; member m uses seed + m for its head and order
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    threads: Annotated[int, at_least(0)] = 0  # torch CPU threads (0 = torch's default)
    resume: bool = False  # resume training from out_dir/ckpt.pt (comparisons are re-read from out_dir)


def bradley_terry_loss(scores, ranking):
    """InstructGPT eq. 1 for ONE prompt: scores (K,) of its answers, ranking best first.
    Returns (loss = -mean over the C(K,2) pairs of log sigmoid(r_w - r_l), pair accuracy, mean margin)."""
    order = torch.as_tensor(ranking, device=scores.device)
    ranked = scores[order]  # (K,) best first
    K = ranked.numel()
    w, l = torch.triu_indices(K, K, offset=1, device=scores.device)  # every pair: w ranked above l
    margins = ranked[w] - ranked[l]  # (C(K,2),)
    return -F.logsigmoid(margins).mean(), (margins > 0).float().mean(), margins.mean()


def collect_comparisons(policy, tok, rows, cfg, device, labelers, bias):
    """Sample K answers per prompt from the SFT policy; one labeler of the pool ranks them (data/world.py)."""
    answers = generate_answers(policy, tok, [r["prompt"] for r in rows], n=cfg.k, temperature=cfg.temperature,
                               max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, device=device)
    return W.label_answers(rows, answers, labelers, random.Random(cfg.seed), bias, cfg.double_label)


def batch_loss(rm, tok, comps, device):
    """All answers of all prompts in one forward, each prompt computed once for its K answers (detail 3:
    each answer forwarded once); the loss is the mean over prompts of eq. 1."""
    block_size = getattr(rm, "module", rm).gpt.config.block_size  # rm may be wrapped in DDP
    endeds = [c.get("ended") or [True] * len(c["responses"]) for c in comps]
    packed = pack_answers(tok, [c["prompt"] for c in comps], [c["responses"] for c in comps], endeds, block_size)
    ks = [len(c["responses"]) for c in comps]
    spans = [(sum(ks[:i]), sum(ks[:i + 1])) for i in range(len(ks))]
    if packed is not None:
        pids, pmask, (owner, aids, amask) = packed
        scores = rm(pids.to(device), pmask.to(device), (owner.to(device), aids.to(device), amask.to(device)))
    else:  # a sequence longer than the context: every answer with its (cropped) prompt on its own
        seqs = [s for c, e in zip(comps, endeds) for s in encode_answers(tok, c["prompt"], c["responses"], e, block_size)]
        ids, mask = left_pad(seqs, tok.pad_id)
        scores = rm(ids.to(device), mask.to(device))
    scores = scores.float()  # (sum of K,)
    losses, accs, margins = zip(*[bradley_terry_loss(scores[a:b], c["ranking"]) for (a, b), c in zip(spans, comps)])
    return torch.stack(losses), torch.stack(accs), torch.stack(margins), scores, spans


@torch.no_grad()
def evaluate_rm(rm, tok, comps, device, gold=None, batch_size=64):
    """Held-out accuracy vs labels and vs gold, mean margin, calibration points and the correlation of reward with
    answer length (evaluate.reward_model_stats) of the scores of every answer, each prompt forwarded once.
    gold: the judge's scores of the answers (evaluate.gold_scores; None: the world's judge where it can)."""
    rm.eval()
    scores = []
    for b in range(0, len(comps), batch_size):
        _, _, _, flat, spans = batch_loss(rm, tok, comps[b:b + batch_size], device)
        scores += [flat[i:j].tolist() for i, j in spans]
    rm.train()
    return reward_model_stats(comps, scores, gold_scores(comps) if gold is None else gold)


def get_comparisons(policy, tok, cfg, run):
    """The comparisons to train on: a file the user gave, the ones collected before a --resume, or
    freshly sampled and labelled in the embedded world (rank 0 does it once; the others read the file).
    Fewer than two (one to train on, one held out) is an error, raised before a file is written."""
    comps_path, block = os.path.join(cfg.out_dir, "comparisons.jsonl"), policy.config.block_size
    if cfg.comparisons or cfg.resume or not run.master:
        if not (cfg.comparisons or cfg.resume):
            ddp_barrier()
        return read_comparisons(cfg.comparisons or comps_path, lambda c: answers_too_long(
            tok, c["prompt"], c["responses"], c.get("ended"), block), at_least=2), {}  # to train on and to hold out
    labelers = W.load_labelers(cfg.world_dir)  # a missing or unreadable labelers.json: InputError
    bias = labelers["bias"] if cfg.labeler_bias < 0 else cfg.labeler_bias
    rows = [r for r in read_prompts(cfg.label_prompts, lambda r: prompt_too_long(tok, r["prompt"], cfg.max_new_tokens,
                                                                                  block)) if r.get("world")]
    if not rows:
        raise SystemExit(f"error: {cfg.label_prompts} has no prompts with the world's fields to label")
    t0 = time.time()
    print(f"sampling {cfg.k} answers for each of {len(rows)} prompts and labelling them ...")
    comps, stats = collect_comparisons(policy, tok, rows, cfg, run.dev.device, labelers["labelers"], bias)
    if len(comps) < 2:  # identical answers and ties are dropped: a degenerate policy may leave almost none
        raise SystemExit(f"error: labelling the answers to {cfg.label_prompts} gave {len(comps)} comparison(s); "
                         f"training needs at least 2")
    write_jsonl(comps_path, comps)
    print(f"collected {len(comps)} comparisons in {time.time() - t0:.0f}s: {stats}")
    ddp_barrier()  # the file is complete: the other ranks may read it
    return comps, stats


def read_eval_inputs(cfg, tok, block):
    """The demonstrations of the normalisation (any length: only their mean score is used, encode_answers crops
    what does not fit) and the best-of-n prompts with their judge, read and checked before training."""
    demos = read_sft(cfg.demonstrations) if cfg.demonstrations else []
    rows, judge = judged_prompts(cfg.eval_prompts if cfg.best_of else "", cfg.judge, tok, cfg.max_new_tokens, block,
                                   "best-of-n")
    return demos, rows if judge else [], judge


def setup(cfg):
    """Options and inputs checked; the SFT policy (sampler and trunk of every member), the comparisons split
    into train / held out, the ensemble's members, and the training state restored on --resume."""
    rank, world = ddp_setup(cfg.device)
    check_config(cfg, world)
    cfg = follow_data(cfg, "comparisons", {
        "demonstrations": "the reward is normalised on the comparison answers (mean 0, std 1); pass "
                          "--demonstrations=<your SFT data> to have demonstrations score 0 (InstructGPT)",
        "eval_prompts": "best-of-n is skipped; pass --eval_prompts=<held-out prompts> --judge=FILE.py:function",
        "world_dir": "the labelers' agreement ceilings (the embedded world's simulated labelers) are skipped",
        "label_prompts": None}, checkpoints=("init_from",), master=rank == 0)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    dev = pick_device(cfg.device)
    policy, sft_ckpt = load_model(cfg.init_from, dev.device)
    tok = get_tokenizer(sft_ckpt.get("tokenizer", "embedded"))
    run = types.SimpleNamespace(cfg=cfg, rank=rank, world=world, master=rank == 0, dev=dev, tok=tok, policy=policy,
                                step=0, history=[], opt_state=None, normalization=None,
                                ckpt_path=os.path.join(cfg.out_dir, "ckpt.pt"))
    ckpt = resume_checkpoint(run.ckpt_path, "reward", "step", None) if cfg.resume else None  # never a finished run
    run.demos, run.eval_rows, run.eval_judge = read_eval_inputs(cfg, tok, policy.config.block_size)
    t0 = time.time()
    run.comps, run.collect_stats = get_comparisons(policy, tok, cfg, run)
    run.collect_seconds = time.time() - t0
    # held out by prompt: every comparison of a held-out prompt text is held out (a prompt can recur)
    run.train_set, run.val = split_by_prompt(run.comps, cfg.val_fraction, cfg.seed)
    run.val_gold = gold_scores(run.val, resolve_judge(cfg.judge, run.val, cfg.comparisons or "the comparisons",
                                                      "the held-out accuracy against the gold judge"))
    run.members = []
    for m in range(cfg.ensemble):  # each member: its own trunk copy, head init (seed + m) and data order
        torch.manual_seed(cfg.seed + m)
        run.members.append(RewardModel(copy.deepcopy(policy)).to(dev.device))  # `policy` still samples best-of-n
    run.rm = run.members[0] if cfg.ensemble == 1 else RewardEnsemble(run.members)
    run.steps_per_epoch = math.ceil(len(run.train_set) / cfg.batch_size)
    run.member_steps = cfg.epochs * run.steps_per_epoch
    run.max_steps = cfg.ensemble * run.member_steps  # the members train one after the other
    if ckpt is not None:
        load_state(run.rm, ckpt["reward_model"], run.ckpt_path)  # another --ensemble: a one-line error
        run.opt_state, run.collect_stats = ckpt["optimizer"], ckpt.get("collect_stats", {})
        set_rng_state(ckpt["rng"])
        run.step, run.history = ckpt["step"], ckpt["history"]
        print(f"resumed from {run.ckpt_path} at step {run.step}")
    run.metrics = open_run(cfg, run.master, f"{len(run.train_set)} training / {len(run.val)} held-out comparisons; "
                           f"{run.max_steps} steps ({cfg.ensemble} reward model{'s' if cfg.ensemble > 1 else ''})",
                           resumed=("step", run.step))
    return run


def save(run, cfg, optimizer=None):
    """A checkpoint; with the optimizer (mid-training, resumable) or without (the final, normalised model)."""
    if run.master:
        ckpt = {"stage": "reward", "finished": optimizer is None, "reward_model": run.rm.state_dict(),
                "ensemble": cfg.ensemble, "model_config": config_dict(run.rm.gpt.config), "config": config_dict(cfg),
                "tokenizer": run.tok.name, "step": run.step, "history": run.history, "collect_stats": run.collect_stats}
        if optimizer is not None:
            ckpt |= {"optimizer": optimizer.state_dict(), "rng": rng_state()}
        if run.normalization is not None:
            ckpt["normalization"] = run.normalization
        save_checkpoint(run.ckpt_path, ckpt)


def train_step(run, cfg, model, optimizer, m, s):
    """Step s of member m: one optimizer step on the next global batch of prompts (all K answers each)."""
    epoch, i = divmod(s, run.steps_per_epoch)
    order = torch.randperm(len(run.train_set), generator=torch.Generator().manual_seed(cfg.seed + 1000 * m + epoch))
    batch_idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size].tolist()
    # this rank's share of the global batch, strided so the epoch's short last batch splits evenly
    mine = [run.train_set[j] for j in batch_idx[run.rank::run.world]]
    lr = lr_at(s, cfg.lr, cfg.min_lr, cfg.warmup_steps, run.member_steps)
    set_lr(optimizer, lr)
    n_global = all_reduce_sum(torch.tensor(float(len(mine)), device=run.dev.device))
    # fewer prompts than ranks: a rank without one forwards a dummy with weight 0 so DDP's all-reduce runs
    weight = 1.0 if mine else 0.0
    losses, accs, margins, _, _ = batch_loss(model, run.tok, mine or [run.train_set[batch_idx[0]]], run.dev.device)
    losses, accs, margins = losses * weight, accs * weight, margins * weight
    (losses.sum() / n_global * run.world).backward()  # mean over the global batch of prompts
    grad_norm = torch.nn.utils.clip_grad_norm_(run.members[m].parameters(), cfg.grad_clip or float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    run.step += 1
    stats = all_reduce_sum(torch.stack([losses.sum(), accs.sum(), margins.sum()]).detach()) / n_global
    return {"step": run.step, "member": m, "epoch": epoch, "loss": stats[0].item(), "accuracy": stats[1].item(),
            "margin": stats[2].item(), "lr": lr, "grad_norm": float(grad_norm)}


def train_member(run, cfg, m, t_start):
    """All steps of member m, with its own optimizer and schedule (the saved ones when resuming mid-member)."""
    member, s = run.members[m], run.step - m * run.member_steps
    optimizer = make_optimizer(member, cfg.lr, cfg.weight_decay, run.dev.device.split(":")[0])
    if run.opt_state is not None and s > 0:
        optimizer.load_state_dict(run.opt_state)
    model = ddp_wrap(member, run.world)
    for s in range(s, run.member_steps):
        row = train_step(run, cfg, model, optimizer, m, s)
        evaluating = run.step % cfg.eval_interval == 0 or s + 1 == run.member_steps
        if evaluating:
            ev = evaluate_rm(member, run.tok, run.val, run.dev.device, run.val_gold)  # this member alone
            row |= {f"val_{k}": v for k, v in ev.items() if not k.startswith("_")}
            if run.master:
                gold = "" if ev["acc_vs_gold"] is None else f" (gold {ev['acc_vs_gold']:.3f})"
                print(f"step {run.step:4d}/{run.max_steps} | loss {row['loss']:.4f} | acc {row['accuracy']:.3f} | "
                      f"val acc {ev['acc_vs_labels']:.3f}{gold} | {time.time() - t_start:.0f}s")
        run.metrics.log(**row)  # the row and the history first, then the checkpoint that covers them
        run.history.append({k: row[k] for k in ("step", "loss", "accuracy")})
        if evaluating:
            save(run, cfg, optimizer)


def demo_mean_sample_std(demo, sample):
    """(mean of the demonstrations' scores, std of the samples' scores), the std never 0."""
    mu = sum(sample) / len(sample)
    return sum(demo) / len(demo), math.sqrt(sum((x - mu) ** 2 for x in sample) / len(sample)) or 1.0


def mean_of(score_lists):
    """The ensemble's score of each text: the mean of its members' scores."""
    return [sum(v) / len(v) for v in zip(*score_lists)]


def normalize(run, cfg):
    """Shift and scale every member's head so that the demonstrations (without them: the comparison answers)
    score mean 0 (InstructGPT) and the comparison answers std 1 (N details #7); then one common gain so that
    the members' mean has std 1 too (the PPO critic starts from member 0, so its scale and offset must be
    right on its own). Returns the record."""
    demos = random.Random(cfg.seed).sample(run.demos, min(cfg.n_norm, len(run.demos)))  # all of them if fewer
    norm_comps = run.comps[:cfg.n_norm]
    norm_samples = ([c["prompt"] for c in norm_comps for _ in c["responses"]],
                    [r for c in norm_comps for r in c["responses"]],
                    [e for c in norm_comps for e in (c.get("ended") or [True] * len(c["responses"]))])
    norm_demos = ([d["prompt"] for d in demos], [d["response"] for d in demos], [d.get("ended", True) for d in demos])
    raw = []  # (demonstration scores, comparison answers' scores) of every member, each member scored once
    for mem in run.members:
        sample = score_texts(mem, run.tok, *norm_samples, run.dev.device)
        raw.append((score_texts(mem, run.tok, *norm_demos, run.dev.device) if demos else sample, sample))
    mean, std = demo_mean_sample_std(mean_of([d for d, _ in raw]), mean_of([x for _, x in raw]))
    member_stats = [demo_mean_sample_std(d, x) for d, x in raw]
    normalised = [[(v - m) / sd for v in x] for (_, x), (m, sd) in zip(raw, member_stats)]
    _, ens_std = demo_mean_sample_std([0.0], mean_of(normalised))  # exactly 1 for a single model
    with torch.no_grad():
        for mem, (m, sd) in zip(run.members, member_stats):
            mem.head.bias.sub_(m).div_(sd * ens_std)
            mem.head.weight.div_(sd * ens_std)
    norm = {"demo_mean_before": mean, "sample_std_before": std,
            "demo_source": cfg.demonstrations if demos else "comparison answers"}
    if cfg.ensemble > 1:
        norm |= {"member_demo_mean_before": [m for m, _ in member_stats],
                 "member_sample_std_before": [sd for _, sd in member_stats], "ensemble_gain": 1 / ens_std}
    print(f"reward normalised: {'demonstrations' if demos else 'comparison answers'} had mean {mean:.3f}, "
          f"comparison answers std {std:.3f}")
    return norm


def evaluate_heldout(run, cfg):
    """The ensemble (and each member) on the held-out comparisons, with the labelers' ceilings on the same pairs."""
    ev = evaluate_rm(run.rm, run.tok, run.val, run.dev.device, run.val_gold)
    plot_calibration(ev.pop("_calibration"), os.path.join(cfg.out_dir, "calibration.png"))
    summary = {f"heldout_{k}": v for k, v in ev.items()}
    if cfg.ensemble > 1:  # what averaging bought: each member alone on the same held-out pairs
        alone = [evaluate_rm(mem, run.tok, run.val, run.dev.device, run.val_gold) for mem in run.members]
        summary["heldout_member_acc_vs_labels"] = [e["acc_vs_labels"] for e in alone]
        summary["heldout_member_acc_vs_gold"] = [e["acc_vs_gold"] for e in alone]
    if cfg.world_dir and all(c.get("world") for c in run.val) and os.path.exists(os.path.join(cfg.world_dir,
                                                                                               "labelers.json")):
        labelers = W.load_labelers(cfg.world_dir)
        bias = labelers["bias"] if cfg.labeler_bias < 0 else cfg.labeler_bias
        summary |= {f"heldout_{k}": v for k, v in W.labeler_ceiling(run.val, labelers["labelers"], bias).items()}
    return summary


def train(cfg):
    run = setup(cfg)
    cfg = run.cfg  # with the defaults that follow the data resolved
    t1 = time.time()
    for m in range(cfg.ensemble):
        if run.step < (m + 1) * run.member_steps:  # members finished before a --resume are skipped
            train_member(run, cfg, m, t1)
    summary = {"collect_seconds": round(run.collect_seconds, 1), "train_seconds": round(time.time() - t1, 1)} \
        | run.collect_stats
    if run.master:
        t_eval = time.time()
        summary |= evaluate_heldout(run, cfg)
        warning = reward_model_warning(summary["heldout_acc_vs_labels"],  # and the last member's last epoch:
                                       [h["accuracy"] for h in run.history[-run.steps_per_epoch:]])
        summary["warnings"] = [warning] if warning else []
        run.normalization = normalize(run, cfg)
        summary["normalization"] = run.normalization
        if run.eval_rows:
            summary["best_of_n"] = evaluate_best_of_n(run.policy, run.rm, run.tok, run.eval_rows, cfg.best_of,
                                                      cfg.temperature, cfg.max_new_tokens, cfg.seed + 1, run.dev.device,
                                                      judge=run.eval_judge)
        summary["eval_seconds"] = round(time.time() - t_eval, 1)
        save(run, cfg)
        write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
        plot_metrics(os.path.join(cfg.out_dir, "metrics.jsonl"), os.path.join(cfg.out_dir, "training.png"),
                     ["loss", "accuracy", "val_acc_vs_labels", "val_acc_vs_gold", "val_mean_margin"],
                     title="reward model")
        print("\n".join([reward_model_line(summary, run.collect_stats)] + summary["warnings"]))
    ddp_cleanup()
    return run.rm, run.history


if __name__ == "__main__":
    run_command(train, Config)
