"""Step 2 of InstructGPT: comparisons and a Bradley-Terry reward model.

    python reward.py                        # embedded world: sample, label, train 3 models, evaluate (~14 min)
    python reward.py --comparisons=hh/comparisons.jsonl --init_from=runs/sft/ckpt.pt

"I can't build a fridge, but I can judge one." For each labelling prompt the SFT model answers K
times, a (simulated) labeler ranks the answers, and a reward model learns to predict the ranking.

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
   (InstructGPT: "labeler demonstrations achieve a mean score of 0") and the SFT samples std 1
   (N implementation details #7); the normalisation is recorded in the checkpoint. An ensemble's
   members are normalised one by one, then share one gain so that their mean has std 1 too.
5. Evaluation on held-out comparisons: accuracy against the labelers and against the gold judge,
   mean margin, a calibration plot, the correlation of reward with answer length; and best-of-n
   (the cheapest use of a reward model) at n = 1..16 with KL = log n - (n-1)/n.
6. `--ensemble=N` trains N reward models on the same comparisons, one after the other, from different
   seeds (head initialisation, data order); the reward is their mean (Coste et al. 2023). Each
   member's own held-out accuracy is reported beside the ensemble's.
Deviations: the paper's RM is a 6B model initialised from a pretrained (not SFT) checkpoint; ours
is the SFT model (as in Stiennon et al. 2020), one run, and the labelers are simulated. InstructGPT
trains one epoch (more epochs overfit its 6B model); our ~1M-parameter members gain from a second
one (measured on the default world with --threads=1, ensemble of 3: held-out accuracy 0.719 -> 0.724 against the labelers,
0.837 -> 0.846 against gold; best-of-16 pass rate 0.547 -> 0.593; PPO's held-out pass rate, three
seeds at 150 iterations, 0.524 -> 0.547 on average: ppo.py). Five members of one epoch each instead:
0.714 / 0.831, best-of-16 0.547.
"""
import copy
import math
import os
import random
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (Metrics, all_reduce_sum, config_dict, ddp_barrier, ddp_cleanup, ddp_setup, load_checkpoint,
                    load_model, parse_config, plot_metrics, print_config, pyplot, rng_state, save_checkpoint,
                    set_rng_state, set_seed, write_json)
from data import world as W
from data.formats import read_comparisons, read_prompts, read_sft, write_jsonl
from evaluate import generate_answers, left_pad
from model import GPT, GPTConfig, pick_device
from pretrain import lr_at, make_optimizer
from tokenizer import get_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD = os.path.join(HERE, "data", "world")


@dataclass
class Config:
    init_from: str = os.path.join(HERE, "runs", "sft", "ckpt.pt")  # SFT checkpoint: sampler and RM init
    comparisons: str = ""  # a comparisons JSONL to train on ("" = collect them in the embedded world)
    label_prompts: str = os.path.join(WORLD, "prompts_label.jsonl")  # prompts to sample and label
    demonstrations: str = os.path.join(WORLD, "sft_train.jsonl")  # the RM is biased so these score 0
    eval_prompts: str = os.path.join(WORLD, "prompts_eval.jsonl")  # held-out prompts for best-of-n
    world_dir: str = WORLD  # labelers.json (the calibrated labeler pool)
    out_dir: str = os.path.join(HERE, "runs", "reward")
    k: int = 8  # answers sampled per labelling prompt (InstructGPT: 4 to 9)
    temperature: float = 1.0  # sampling temperature for the answers to be labelled
    max_new_tokens: int = 48
    labeler_bias: float = -1.0  # extra utility per courtesy phrase (-1 = the value in labelers.json)
    double_label: int = 300  # prompts ranked by a second labeler to measure agreement
    val_fraction: float = 0.1  # held-out comparisons (by prompt)
    epochs: int = 2  # passes over the comparisons, per member (InstructGPT: one; see Deviations above)
    batch_size: int = 16  # prompts (each with all its K answers) per optimizer step
    lr: float = 3e-4  # measured on 2000 prompts: 1e-4 -> held-out acc 0.686, 3e-4 -> 0.707
    min_lr: float = 3e-5
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_interval: int = 100  # steps between held-out evaluations (each one scores every held-out answer)
    ensemble: int = 3  # reward models trained from different seeds; the reward is their mean score
    best_of: int = 16  # best-of-n evaluation up to this n on the held-out prompts (0 = skip)
    n_norm: int = 512  # demonstrations / SFT samples used for the score normalisation
    seed: int = 1337
    device: str = "auto"
    threads: int = 0
    resume: bool = False  # resume training from out_dir/ckpt.pt (comparisons are re-read from out_dir)


class RewardModel(nn.Module):
    """A GPT trunk plus a scalar head. `forward` reads the head at the last real token; `values`
    reads it at every position (the PPO critic is initialised from this model)."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt
        self.head = nn.Linear(gpt.config.n_embd, 1)
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(gpt.config.n_embd + 1))
        nn.init.zeros_(self.head.bias)

    def values(self, idx, attention_mask):
        return self.head(self.gpt.hidden_states(idx, attention_mask)).squeeze(-1)  # (B, T)

    def forward(self, idx, attention_mask):
        return last_token_score(self.values(idx, attention_mask), attention_mask)  # (B,)


class RewardEnsemble(nn.Module):
    """Several reward models trained on the same comparisons from different seeds; the reward is their
    mean score. Their errors are partly independent, so the mean is more accurate and PPO finds less to
    exploit (Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization")."""

    def __init__(self, members):
        super().__init__()
        self.members = nn.ModuleList(members)

    @property
    def gpt(self):  # the members share one architecture: block size, vocabulary
        return self.members[0].gpt

    def values(self, idx, attention_mask):
        return torch.stack([m.values(idx, attention_mask) for m in self.members]).mean(0)

    def member_scores(self, idx, attention_mask):
        return torch.stack([m(idx, attention_mask) for m in self.members])  # (E, B)

    def forward(self, idx, attention_mask):
        return self.member_scores(idx, attention_mask).mean(0)


def last_token_index(attention_mask):
    """Index of the last real token of each row, for left or right padding. (B, T) -> (B,)"""
    T = attention_mask.size(1)
    return T - 1 - attention_mask.flip(1).argmax(dim=1)


def last_token_score(values, attention_mask):
    return values.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)  # (B,)


def bradley_terry_loss(scores, ranking):
    """InstructGPT eq. 1 for ONE prompt: scores (K,) of its answers, ranking best first.
    Returns (loss = -mean over the C(K,2) pairs of log sigmoid(r_w - r_l), pair accuracy, mean margin)."""
    order = torch.as_tensor(ranking, device=scores.device)
    ranked = scores[order]  # (K,) best first
    K = ranked.numel()
    w, l = torch.triu_indices(K, K, offset=1, device=scores.device)  # every pair: w ranked above l
    margins = ranked[w] - ranked[l]  # (C(K,2),)
    return -F.logsigmoid(margins).mean(), (margins > 0).float().mean(), margins.mean()


def load_reward_model(path, device="cpu"):
    """A RewardModel (or a RewardEnsemble) from a reward.py checkpoint (normalisation folded into the heads)."""
    ckpt = load_checkpoint(path)
    if "reward_model" not in ckpt:
        raise SystemExit(f"error: {path!r} is not a reward model checkpoint (no 'reward_model' key)")
    members = [RewardModel(GPT(GPTConfig(**ckpt["model_config"]))) for _ in range(ckpt.get("ensemble", 1))]
    rm = members[0] if len(members) == 1 else RewardEnsemble(members)
    rm.load_state_dict(ckpt["reward_model"])
    return rm.to(device), ckpt


def encode_answers(tok, prompt, responses, endeds, block_size):
    """Token ids of prompt + answer (+ <|end|> if the answer ended) for each answer."""
    prompt_ids = tok.render_chat(prompt)[0]
    seqs = []
    for r, e in zip(responses, endeds):
        ids = prompt_ids + tok.render_chat(prompt, r)[1][:None if e else -1]
        seqs.append(ids[-block_size:])
    return seqs


@torch.no_grad()
def score_texts(rm, tok, prompts, responses, endeds, device, batch_size=128):
    """Reward of each (prompt, response) pair, batched, left-padded."""
    rm.eval()
    seqs = [encode_answers(tok, p, [r], [e], rm.gpt.config.block_size)[0]
            for p, r, e in zip(prompts, responses, endeds)]
    out = []
    for b in range(0, len(seqs), batch_size):
        ids, mask = left_pad(seqs[b:b + batch_size], tok.pad_id)
        out.extend(rm(ids.to(device), mask.to(device)).float().tolist())
    return out


def collect_comparisons(policy, tok, rows, cfg, device, labelers, bias):
    """Sample K answers per prompt, have one labeler of the pool rank them (ties dropped)."""
    rng = random.Random(cfg.seed)
    answers = generate_answers(policy, tok, [r["prompt"] for r in rows], n=cfg.k, temperature=cfg.temperature,
                               max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, device=device)
    comps, agree, pairs, label_gold_agree, label_gold_pairs = [], 0, 0, 0, 0
    for i, (row, ans) in enumerate(zip(rows, answers)):
        texts, endeds = [a["text"] for a in ans], [a["ended"] for a in ans]
        labeler = rng.choice(labelers)
        kept, ranking = W.label(row["record"], texts, endeds, labeler, rng, bias)
        if len(kept) < 2:
            continue
        gold = [W.judge(row["record"], texts[j], endeds[j])["score"] for j in kept]
        for a in range(len(ranking)):
            for b in range(a + 1, len(ranking)):
                label_gold_pairs += 1
                label_gold_agree += gold[ranking[a]] > gold[ranking[b]]
        if i < cfg.double_label:  # a second, different labeler ranks the same answers
            other = rng.choice([l for l in labelers if l is not labeler])
            _, ranking2 = W.label(row["record"], texts, endeds, other, rng, bias)
            p1 = {j: p for p, j in enumerate(ranking)}
            p2 = {j: p for p, j in enumerate(ranking2)}
            for a in range(len(kept)):
                for b in range(a + 1, len(kept)):
                    pairs += 1
                    agree += (p1[a] < p1[b]) == (p2[a] < p2[b])
        comps.append({"prompt": row["prompt"], "responses": [texts[j] for j in kept], "ranking": ranking,
                      "ended": [endeds[j] for j in kept], "record": row["record"]})
    stats = {"labeler_agreement": agree / max(pairs, 1), "agreement_pairs": pairs,
             "label_vs_gold_accuracy": label_gold_agree / max(label_gold_pairs, 1),
             "n_comparisons": len(comps), "n_pairs": sum(len(c["ranking"]) * (len(c["ranking"]) - 1) // 2
                                                         for c in comps),
             "mean_k": sum(len(c["responses"]) for c in comps) / max(len(comps), 1)}
    return comps, stats


def labeler_ceiling(comps, labelers, bias):
    """What the labels allow, on these comparisons' answer pairs (embedded world only): the expected
    agreement of two different labelers of the pool, and the best accuracy any reward model can reach
    against one labeler's labels (it would know every utility, not which labeler labelled)."""
    taus = [lab["tau"] for lab in labelers]
    margins = []
    for c in comps:
        ends = c.get("ended") or [True] * len(c["responses"])
        u = [W.utility(c["record"], r, e, bias) for r, e in zip(c["responses"], ends)]
        margins += [u[i] - u[j] for i in range(len(u)) for j in range(i + 1, len(u))]
    return {"expected_labeler_agreement": W.expected_agreement(margins, taus),
            "bayes_accuracy": W.bayes_accuracy(margins, taus)}


def batch_loss(rm, tok, comps, device):
    """All answers of all prompts in one forward; the loss is the mean over prompts of eq. 1."""
    seqs, spans = [], []
    block_size = getattr(rm, "module", rm).gpt.config.block_size  # rm may be wrapped in DDP
    for c in comps:
        s = encode_answers(tok, c["prompt"], c["responses"], c.get("ended") or [True] * len(c["responses"]),
                           block_size)
        spans.append((len(seqs), len(seqs) + len(s)))
        seqs += s
    ids, mask = left_pad(seqs, tok.pad_id)
    scores = rm(ids.to(device), mask.to(device)).float()  # (sum of K,)
    losses, accs, margins = zip(*[bradley_terry_loss(scores[a:b], c["ranking"]) for (a, b), c in zip(spans, comps)])
    return torch.stack(losses), torch.stack(accs), torch.stack(margins), scores, spans


@torch.no_grad()
def evaluate_rm(rm, tok, comps, device, batch_size=64):
    """Held-out accuracy vs labels and vs gold, margin, calibration bins, length correlation."""
    rm.eval()
    acc_l, acc_g, margins, calib, lengths, rewards = [], [], [], [], [], []
    for b in range(0, len(comps), batch_size):
        chunk = comps[b:b + batch_size]
        _, accs, m, scores, spans = batch_loss(rm, tok, chunk, device)
        acc_l += accs.tolist()
        margins += m.tolist()
        for (a, e), c in zip(spans, chunk):
            s = scores[a:e].tolist()
            rank_pos = {j: p for p, j in enumerate(c["ranking"])}
            for i in range(len(s)):
                lengths.append(len(c["responses"][i].split()))
                rewards.append(s[i])
                for j in range(i + 1, len(s)):
                    # calibration: predicted P(i preferred) vs whether the labeler preferred i
                    calib.append((1 / (1 + math.exp(-(s[i] - s[j]))), float(rank_pos[i] < rank_pos[j])))
            if c.get("record"):
                ends = c.get("ended") or [True] * len(s)
                g = [W.judge(c["record"], r, e)["score"] for r, e in zip(c["responses"], ends)]
                acc_g += [float((s[i] - s[j]) * (g[i] - g[j]) > 0) for i in range(len(s))
                          for j in range(i + 1, len(s)) if g[i] != g[j]]
    rm.train()
    n = len(rewards)
    ml, mr = sum(lengths) / n, sum(rewards) / n
    cov = sum((x - ml) * (y - mr) for x, y in zip(lengths, rewards))
    sd = math.sqrt(sum((x - ml) ** 2 for x in lengths) * sum((y - mr) ** 2 for y in rewards)) or 1.0
    return {"acc_vs_labels": sum(acc_l) / len(acc_l), "acc_vs_gold": sum(acc_g) / len(acc_g) if acc_g else None,
            "mean_margin": sum(margins) / len(margins), "length_corr": cov / sd, "_calibration": calib}


def plot_calibration(calib, path, bins=10):
    plt = pyplot()
    xs, ys, ns = [], [], []
    for k in range(bins):
        pts = [(p, y) for p, y in calib if k / bins <= p < (k + 1) / bins or (k == bins - 1 and p == 1)]
        if pts:
            xs.append(sum(p for p, _ in pts) / len(pts))
            ys.append(sum(y for _, y in pts) / len(pts))
            ns.append(len(pts))
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.plot(xs, ys, "o-", label="reward model")
    ax.set_xlabel("predicted P(labeler prefers A) = sigmoid(r_A - r_B)")
    ax.set_ylabel("fraction the labeler preferred A")
    ax.set_title("reward model calibration (held out)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def best_of_n(records, samples, rewards, ns):
    """For each n: split each prompt's samples into groups of n, keep the highest-reward answer of each
    group (and, for the ceiling, the highest-gold one). Gold mean / pass rate, KL = log n - (n-1)/n."""
    out = []
    for n in ns:
        g_rm = p_rm = g_or = p_or = r_rm = count = 0
        for rec, ans, rw in zip(records, samples, rewards):
            judged = [W.judge(rec, a["text"], a["ended"]) for a in ans]
            for start in range(0, len(ans) - n + 1, n):
                grp = range(start, start + n)
                best = max(grp, key=lambda i: rw[i])
                oracle = max(grp, key=lambda i: judged[i]["score"])
                g_rm += judged[best]["score"]
                p_rm += judged[best]["pass"]
                r_rm += rw[best]
                g_or += judged[oracle]["score"]
                p_or += judged[oracle]["pass"]
                count += 1
        out.append({"n": n, "kl": math.log(n) - (n - 1) / n, "gold_mean": g_rm / count, "pass_rate": p_rm / count,
                    "proxy_reward": r_rm / count, "oracle_gold_mean": g_or / count, "oracle_pass_rate": p_or / count})
    return out


def train(cfg):
    rank, world = ddp_setup(cfg.device)
    master = rank == 0
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    dev = pick_device(cfg.device)
    policy, sft_ckpt = load_model(cfg.init_from, dev.device)
    tok = get_tokenizer(sft_ckpt.get("tokenizer", "embedded"))
    os.makedirs(cfg.out_dir, exist_ok=True)
    comps_path = os.path.join(cfg.out_dir, "comparisons.jsonl")
    collect_stats = {}
    t0 = time.time()
    if cfg.comparisons:
        comps = read_comparisons(cfg.comparisons)
    elif cfg.resume and os.path.exists(comps_path):
        comps = read_comparisons(comps_path)
    elif not master:  # rank 0 samples and labels once; every rank then trains on exactly its comparisons
        ddp_barrier()
        comps = read_comparisons(comps_path)
    else:
        labelers = W.load_labelers(cfg.world_dir)
        bias = labelers["bias"] if cfg.labeler_bias < 0 else cfg.labeler_bias
        rows = [r for r in read_prompts(cfg.label_prompts) if r.get("record")]
        if not rows:
            raise SystemExit(f"error: {cfg.label_prompts} has no prompts with a record to label")
        print(f"sampling {cfg.k} answers for each of {len(rows)} prompts and labelling them ...")
        comps, collect_stats = collect_comparisons(policy, tok, rows, cfg, dev.device, labelers["labelers"], bias)
        write_jsonl(comps_path, comps)
        print(f"collected {len(comps)} comparisons in {time.time() - t0:.0f}s: {collect_stats}")
        ddp_barrier()  # the file is complete: the other ranks may read it
    collect_seconds = time.time() - t0
    perm = random.Random(cfg.seed).sample(range(len(comps)), len(comps))
    n_val = max(1, int(len(comps) * cfg.val_fraction))
    val = [comps[i] for i in perm[:n_val]]
    train_set = [comps[i] for i in perm[n_val:]]

    if cfg.ensemble < 1 or cfg.eval_interval < 1:
        raise SystemExit(f"error: --ensemble={cfg.ensemble} and --eval_interval={cfg.eval_interval} "
                         f"must be at least 1")
    if cfg.batch_size % world:
        raise SystemExit(f"error: --batch_size={cfg.batch_size} must divide by the world size {world}")
    members = []
    for m in range(cfg.ensemble):  # each member: its own trunk copy, head init (seed + m) and data order
        torch.manual_seed(cfg.seed + m)
        members.append(RewardModel(copy.deepcopy(policy)).to(dev.device))  # `policy` still samples best-of-n
    rm = members[0] if cfg.ensemble == 1 else RewardEnsemble(members)
    steps_per_epoch = math.ceil(len(train_set) / cfg.batch_size)
    member_steps = cfg.epochs * steps_per_epoch
    max_steps = cfg.ensemble * member_steps  # the members train one after the other
    step, history, opt_state = 0, [], None
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    if cfg.resume and os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.get("ensemble", 1) != cfg.ensemble:
            raise SystemExit(f"error: {ckpt_path} holds {ckpt.get('ensemble', 1)} reward model(s), "
                             f"--ensemble={cfg.ensemble}: resume with the same --ensemble")
        rm.load_state_dict(ckpt["reward_model"])
        if "optimizer" in ckpt:
            opt_state = ckpt["optimizer"]
            set_rng_state(ckpt["rng"])
        step, history = ckpt["step"], ckpt["history"]
        print(f"resumed from {ckpt_path} at step {step}")
    metrics = Metrics(cfg.out_dir, resume=cfg.resume, enabled=master)
    if master:
        print_config(cfg)
        print(f"{len(train_set)} training / {len(val)} held-out comparisons; {max_steps} steps "
              f"({cfg.ensemble} reward model{'s' if cfg.ensemble > 1 else ''})")

    def save(step, final=False):
        if master:
            ckpt = {"reward_model": rm.state_dict(), "ensemble": cfg.ensemble,
                    "model_config": config_dict(rm.gpt.config), "config": config_dict(cfg), "tokenizer": tok.name,
                    "step": step, "history": history}
            if not final:  # the final, normalised model is not resumable training state
                ckpt |= {"optimizer": optimizer.state_dict(), "rng": rng_state()}
            ckpt |= extra
            save_checkpoint(ckpt_path, ckpt)

    extra, current = {}, None
    t1 = time.time()
    rm.train()
    while step < max_steps:
        m, s = divmod(step, member_steps)
        member = members[m]
        if current != m:  # a fresh optimizer for each member (or the saved one, when resuming mid-member)
            current = m
            optimizer = make_optimizer(member, cfg.lr, cfg.weight_decay, dev.device.split(":")[0])
            if opt_state is not None and s > 0:
                optimizer.load_state_dict(opt_state)
            model = torch.nn.parallel.DistributedDataParallel(member) if world > 1 else member
        epoch, i = divmod(s, steps_per_epoch)
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(cfg.seed + 1000 * m + epoch))
        batch_idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size].tolist()
        # this rank's share of the global batch, strided so the epoch's short last batch splits evenly
        mine = [train_set[j] for j in batch_idx[rank::world]]
        lr = lr_at(s, cfg.lr, cfg.min_lr, cfg.warmup_steps, member_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        n_global = all_reduce_sum(torch.tensor(float(len(mine)), device=dev.device))
        # fewer prompts than ranks: a rank without one forwards a dummy with weight 0 so DDP's all-reduce runs
        weight = 1.0 if mine else 0.0
        losses, accs, margins, _, _ = batch_loss(model, tok, mine or [train_set[batch_idx[0]]], dev.device)
        losses, accs, margins = losses * weight, accs * weight, margins * weight
        (losses.sum() / n_global * world).backward()  # mean over the global batch of prompts
        grad_norm = torch.nn.utils.clip_grad_norm_(member.parameters(), cfg.grad_clip or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        stats = all_reduce_sum(torch.stack([losses.sum(), accs.sum(), margins.sum()]).detach()) / n_global
        row = {"step": step, "member": m, "epoch": epoch, "loss": stats[0].item(), "accuracy": stats[1].item(),
               "margin": stats[2].item(), "lr": lr, "grad_norm": float(grad_norm)}
        if step % cfg.eval_interval == 0 or step % member_steps == 0:
            ev = evaluate_rm(member, tok, val, dev.device)  # this member alone
            row |= {f"val_{k}": v for k, v in ev.items() if not k.startswith("_")}
            if master:
                print(f"step {step:4d}/{max_steps} | loss {row['loss']:.4f} | acc {row['accuracy']:.3f} | "
                      f"val acc {ev['acc_vs_labels']:.3f} (gold {ev['acc_vs_gold'] or float('nan'):.3f}) | "
                      f"{time.time() - t1:.0f}s")
            save(step)
        metrics.log(**row)
        history.append({k: row[k] for k in ("step", "loss", "accuracy")})
    train_seconds = time.time() - t1

    summary = {"collect_seconds": round(collect_seconds, 1), "train_seconds": round(train_seconds, 1)} | collect_stats
    if master:
        ev = evaluate_rm(rm, tok, val, dev.device)
        plot_calibration(ev.pop("_calibration"), os.path.join(cfg.out_dir, "calibration.png"))
        summary |= {f"heldout_{k}": v for k, v in ev.items()}
        if cfg.ensemble > 1:  # what averaging bought: each member alone on the same held-out pairs
            alone = [evaluate_rm(mem, tok, val, dev.device) for mem in members]
            summary["heldout_member_acc_vs_labels"] = [e["acc_vs_labels"] for e in alone]
            summary["heldout_member_acc_vs_gold"] = [e["acc_vs_gold"] for e in alone]
        labelers_path = os.path.join(cfg.world_dir, "labelers.json")
        if all(c.get("record") for c in val) and os.path.exists(labelers_path):
            labelers = W.load_labelers(cfg.world_dir)
            bias = labelers["bias"] if cfg.labeler_bias < 0 else cfg.labeler_bias
            summary |= {f"heldout_{k}": v for k, v in labeler_ceiling(val, labelers["labelers"], bias).items()}
        # normalisation: demonstrations score mean 0 (InstructGPT), SFT samples std 1 (N details #7)
        demos = read_sft(cfg.demonstrations) if cfg.demonstrations and os.path.exists(cfg.demonstrations) else []
        demos = random.Random(cfg.seed).sample(demos, min(cfg.n_norm, len(demos)))  # all of them if fewer
        norm_comps = comps[:cfg.n_norm]
        norm_samples = ([c["prompt"] for c in norm_comps for _ in c["responses"]],
                        [r for c in norm_comps for r in c["responses"]],
                        [e for c in norm_comps for e in (c.get("ended") or [True] * len(c["responses"]))])
        norm_demos = ([d["prompt"] for d in demos], [d["response"] for d in demos],
                      [d.get("ended", True) for d in demos])

        def demo_mean_sample_std(demo, sample):
            mu = sum(sample) / len(sample)
            return sum(demo) / len(demo), math.sqrt(sum((x - mu) ** 2 for x in sample) / len(sample)) or 1.0

        def mean_of(score_lists):  # the ensemble's score of each text: the mean of its members' scores
            return [sum(v) / len(v) for v in zip(*score_lists)]

        raw = []  # (demonstration scores, sample scores) of every member, each member scored once
        for mem in members:
            sample = score_texts(mem, tok, *norm_samples, dev.device)
            raw.append((score_texts(mem, tok, *norm_demos, dev.device) if demos else sample, sample))
        mean, std = demo_mean_sample_std(mean_of([d for d, _ in raw]), mean_of([x for _, x in raw]))
        member_stats = [demo_mean_sample_std(d, x) for d, x in raw]
        # each member on its own: demonstrations mean 0, samples std 1 (the PPO critic starts from member 0);
        # then one common gain so that the members' mean has std 1 too (exactly 1 for a single model)
        normalised = [[(v - m) / sd for v in x] for (_, x), (m, sd) in zip(raw, member_stats)]
        _, ens_std = demo_mean_sample_std([0.0], mean_of(normalised))
        with torch.no_grad():
            for mem, (m, sd) in zip(members, member_stats):
                mem.head.bias.sub_(m).div_(sd * ens_std)
                mem.head.weight.div_(sd * ens_std)
        norm = {"demo_mean_before": mean, "sample_std_before": std,
                "demo_source": cfg.demonstrations if demos else "sampled answers"}
        if cfg.ensemble > 1:
            norm |= {"member_demo_mean_before": [m for m, _ in member_stats],
                     "member_sample_std_before": [sd for _, sd in member_stats], "ensemble_gain": 1 / ens_std}
        extra = {"normalization": norm}
        summary |= extra
        print(f"reward normalised: demonstrations had mean {mean:.3f}, SFT samples std {std:.3f}")
        if cfg.best_of and cfg.eval_prompts:
            eval_rows = [r for r in read_prompts(cfg.eval_prompts) if r.get("record")]
            ns = [n for n in (1, 2, 4, 8, 16, 32, 64, 128) if n <= cfg.best_of]
            samples = generate_answers(policy, tok, [r["prompt"] for r in eval_rows], n=cfg.best_of,
                                       temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens,
                                       seed=cfg.seed + 1, device=dev.device)
            flat = score_texts(rm, tok, [r["prompt"] for r, a in zip(eval_rows, samples) for _ in a],
                               [x["text"] for a in samples for x in a], [x["ended"] for a in samples for x in a],
                               dev.device)
            rewards = [flat[i * cfg.best_of:(i + 1) * cfg.best_of] for i in range(len(eval_rows))]
            summary["best_of_n"] = best_of_n([r["record"] for r in eval_rows], samples, rewards, ns)
            for r in summary["best_of_n"]:
                print(f"best-of-{r['n']:<3d} KL {r['kl']:.2f} | gold {r['gold_mean']:.3f} pass {r['pass_rate']:.3f} "
                      f"| by gold: pass {r['oracle_pass_rate']:.3f}")
        save(step, final=True)
        write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
        plot_metrics(os.path.join(cfg.out_dir, "metrics.jsonl"), os.path.join(cfg.out_dir, "training.png"),
                     ["loss", "accuracy", "val_acc_vs_labels", "val_acc_vs_gold", "val_mean_margin"],
                     title="reward model")
        nan = float("nan")
        print(f"held-out accuracy vs labelers {ev['acc_vs_labels']:.3f} (on these pairs two labelers agree "
              f"{summary.get('heldout_expected_labeler_agreement', nan):.3f} in expectation, the best possible "
              f"accuracy is {summary.get('heldout_bayes_accuracy', nan):.3f}; measured agreement on "
              f"{collect_stats.get('agreement_pairs', 0)} double-labelled pairs "
              f"{collect_stats.get('labeler_agreement', nan):.3f}; labels vs gold "
              f"{collect_stats.get('label_vs_gold_accuracy', nan):.3f}); vs gold "
              f"{ev['acc_vs_gold'] or nan:.3f}; length corr {ev['length_corr']:.2f}")
    ddp_cleanup()
    return rm, history


def main():
    train(parse_config(Config))


if __name__ == "__main__":
    main()
