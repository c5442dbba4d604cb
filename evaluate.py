"""Evaluating policies against the gold judge: pass rates, facets, win rates, KL to the reference.

    python evaluate.py --checkpoint=runs/ppo/ckpt.pt          # gold mean / pass rate on held-out prompts

1. Answers are sampled through engine.generate_answers (chat template, left padding, KV cache); the
   gold judge (data/world.py) sees the text and whether the answer ended.
2. Comparisons between policies use the same prompts, the same decoding and many samples per
   prompt (one sample on 300 prompts has a standard error of ~0.03; eight have ~0.01).
3. Win rate: each prompt's answers are paired sample by sample; ties count half; a bootstrap over
   prompts gives the 95% confidence interval.
4. KL to the reference: the mean over sampled answers of sum_t log pi(y_t) - log pi_ref(y_t), an
   unbiased estimate of KL(pi || pi_ref) per answer.
"""
import math
import os
import random
from dataclasses import dataclass

import torch

from data.world import judge
from engine import generate_answers, pack, score_texts
from model import token_logprobs

HERE = os.path.dirname(os.path.abspath(__file__))


def score_answers(records, answers):
    """Gold judge on every answer: (scores[i][j], passes[i][j], facets list)."""
    scores, passes, facets = [], [], []
    for rec, ans in zip(records, answers):
        js = [judge(rec, a["text"], a["ended"]) for a in ans]
        scores.append([j["score"] for j in js])
        passes.append([j["pass"] for j in js])
        facets.extend((rec["task"], j) for j in js)
    return scores, passes, facets


def summarize(records, answers):
    """Gold mean, pass rate, per-facet rates and per-task pass rates of a set of answers."""
    scores, passes, facets = score_answers(records, answers)
    flat_s = [s for row in scores for s in row]
    flat_p = [p for row in passes for p in row]
    n = len(flat_s)
    out = {"gold_mean": sum(flat_s) / n, "pass_rate": sum(flat_p) / n, "n_answers": n}
    for key in ("correct", "format", "rude", "repeated", "too_long", "ended", "refused"):
        out[f"rate_{key}"] = sum(bool(j["facets"][key]) for _, j in facets) / n
    out["rate_filler"] = sum(j["facets"]["filler"] > 0 for _, j in facets) / n
    out["mean_courtesy"] = sum(j["facets"]["courtesy"] for _, j in facets) / n
    out["mean_words"] = sum(j["facets"]["words"] for _, j in facets) / n
    tasks = sorted({t for t, _ in facets})
    out["pass_by_task"] = {t: round(sum(j["pass"] for u, j in facets if u == t) /
                                    max(1, sum(u == t for u, _ in facets)), 4) for t in tasks}
    return out, scores


def win_rate(scores_a, scores_b, n_boot=1000, seed=0):
    """P(a beats b) on the gold judge, ties half; answers paired per prompt; bootstrap over prompts."""
    per_prompt = []
    for sa, sb in zip(scores_a, scores_b):
        wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(sa, sb)]
        per_prompt.append(sum(wins) / len(wins))
    mean = sum(per_prompt) / len(per_prompt)
    rng = random.Random(seed)
    boots = sorted(sum(rng.choice(per_prompt) for _ in per_prompt) / len(per_prompt) for _ in range(n_boot))
    return mean, (boots[int(0.025 * n_boot)], boots[int(0.975 * n_boot) - 1])


def evaluate_policy(model, tok, rows, n_samples=8, temperature=1.0, device="cpu", max_new_tokens=48,
                    seed=0, greedy_too=True):
    """Sampled (n_samples per prompt) and greedy gold metrics on prompt rows {"prompt", "record"};
    the answers and their gold scores are kept under "_sampled_answers"/"_sampled_scores" (and greedy)."""
    prompts, records = [r["prompt"] for r in rows], [r["record"] for r in rows]
    sampled = generate_answers(model, tok, prompts, n=n_samples, temperature=temperature,
                               max_new_tokens=max_new_tokens, seed=seed, device=device)
    result = {}
    result["sampled"], result["_sampled_scores"] = summarize(records, sampled)
    result["_sampled_answers"] = sampled
    if greedy_too:
        greedy = generate_answers(model, tok, prompts, greedy=True, max_new_tokens=max_new_tokens,
                                  device=device)
        result["greedy"], result["_greedy_scores"] = summarize(records, greedy)
        result["_greedy_answers"] = greedy
    return result


def best_of_n(records, samples, rewards, ns):
    """For each n: split each prompt's samples into groups of n, keep the highest-reward answer of each
    group (and, for the ceiling, the highest-gold one). Gold mean / pass rate, KL = log n - (n-1)/n."""
    out = []
    for n in ns:
        g_rm = p_rm = g_or = p_or = r_rm = count = 0
        for rec, ans, rw in zip(records, samples, rewards):
            judged = [judge(rec, a["text"], a["ended"]) for a in ans]
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


def evaluate_best_of_n(policy, rm, tok, rows, n_max, temperature, max_new_tokens, seed, device, verbose=True):
    """Best-of-n with a reward model on prompt rows with gold records, n = 1, 2, 4, ... n_max: n_max
    samples per prompt from `policy`, scored once by `rm`, split into groups for every n (best_of_n).
    Returns best_of_n's rows."""
    ns = [2 ** i for i in range(int(math.log2(n_max)) + 1)]
    samples = generate_answers(policy, tok, [r["prompt"] for r in rows], n=n_max, temperature=temperature,
                               max_new_tokens=max_new_tokens, seed=seed, device=device)
    flat = score_texts(rm, tok, [r["prompt"] for r, a in zip(rows, samples) for _ in a],
                       [x["text"] for a in samples for x in a], [x["ended"] for a in samples for x in a], device)
    rewards = [flat[i * n_max:(i + 1) * n_max] for i in range(len(rows))]
    out = best_of_n([r["record"] for r in rows], samples, rewards, ns)
    for r in out if verbose else []:
        print(f"best-of-{r['n']:<3d} KL {r['kl']:.2f} | proxy {r['proxy_reward']:+.3f} | gold {r['gold_mean']:.3f} "
              f"pass {r['pass_rate']:.3f} | by gold: pass {r['oracle_pass_rate']:.3f}")
    return out


@torch.no_grad()
def sequence_kl(policy, ref, tok, prompts, answers, temperature, device, batch_size=128):
    """Mean over answers of sum_t log pi(y_t) - log pi_ref(y_t): the KL to the reference, estimated on
    samples of pi. answers[i] = the list of sampled answers (with their "ids") to prompts[i]."""
    items = [(tok.render_chat(p)[0], a["ids"]) for p, ans in zip(prompts, answers) for a in ans]
    total = 0.0
    for b in range(0, len(items), batch_size):
        chunk = items[b:b + batch_size]
        seq, mask, P, resp, rmask = pack([p for p, _ in chunk], [a for _, a in chunk], tok.pad_id)
        seq, mask, resp, rmask = seq.to(device), mask.to(device), resp.to(device), rmask.to(device)
        lp = token_logprobs(policy(seq, attention_mask=mask)[0][:, P - 1:-1], resp, temperature)
        rlp = token_logprobs(ref(seq, attention_mask=mask)[0][:, P - 1:-1], resp, temperature)
        total += ((lp - rlp) * rmask).sum().item()
    return total / len(items)


def compare_to_reference(policy, ref, tok, rows, n_samples, temperature, device, max_new_tokens, seed=0):
    """A trained policy against its reference (the SFT model) on held-out prompts with gold records:
    gold mean and pass rate of both (sampled and greedy), win rate with its CI, KL to the reference,
    per-facet rates and a few answers side by side. Every step-3 method reports this."""
    out, res = {}, {}
    for name, model in (("sft", ref), ("ppo", policy)):
        res[name] = evaluate_policy(model, tok, rows, n_samples, temperature, device, max_new_tokens, seed=seed)
        for mode in ("sampled", "greedy"):
            out[f"{name}_gold_mean" + ("" if mode == "sampled" else "_greedy")] = res[name][mode]["gold_mean"]
            out[f"{name}_pass_rate" + ("" if mode == "sampled" else "_greedy")] = res[name][mode]["pass_rate"]
        out[f"{name}_facets"] = {k: v for k, v in res[name]["sampled"].items() if not k.startswith("_")}
        print(f"{name}: sampled gold {res[name]['sampled']['gold_mean']:.3f} pass {res[name]['sampled']['pass_rate']:.3f} "
              f"| greedy gold {res[name]['greedy']['gold_mean']:.3f} pass {res[name]['greedy']['pass_rate']:.3f}")
    wr, ci = win_rate(res["ppo"]["_sampled_scores"], res["sft"]["_sampled_scores"])
    wr_g, ci_g = win_rate(res["ppo"]["_greedy_scores"], res["sft"]["_greedy_scores"])
    prompts = [r["prompt"] for r in rows]
    out |= {"win_rate_vs_sft": wr, "win_rate_ci95": list(ci), "win_rate_vs_sft_greedy": wr_g,
            "win_rate_greedy_ci95": list(ci_g),
            "kl_to_ref": sequence_kl(policy, ref, tok, prompts, res["ppo"]["_sampled_answers"], temperature, device)}
    print(f"win rate vs SFT {wr:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f}); greedy {wr_g:.3f}; KL to ref {out['kl_to_ref']:.3f}")
    out["examples"] = [{"prompt": r["prompt"], "sft": a["text"], "ppo": b["text"]}
                       for r, a, b in list(zip(rows, [x[0] for x in res["sft"]["_sampled_answers"]],
                                               [x[0] for x in res["ppo"]["_sampled_answers"]]))[:12]]
    return out


@dataclass
class Config:
    checkpoint: str = os.path.join(HERE, "runs", "sft", "ckpt.pt")  # a policy checkpoint (pretrain/sft/ppo)
    prompts: str = os.path.join(HERE, "data", "world", "prompts_eval.jsonl")  # prompts with gold records
    n_samples: int = 8  # samples per prompt at `temperature`
    temperature: float = 1.0  # sampling temperature
    max_new_tokens: int = 48  # longest answer, in tokens
    seed: int = 0  # seed of the sampling generator
    device: str = "auto"  # auto | cpu | cuda | mps


def main():
    from common import parse_config, pick_device, print_config
    from data.formats import read_prompts
    from engine import load_model
    from tokenizer import get_tokenizer
    cfg = parse_config(Config)
    print_config(cfg)
    dev = pick_device(cfg.device)
    model, ckpt = load_model(cfg.checkpoint, dev.device)
    tok = get_tokenizer(ckpt.get("tokenizer", "embedded"))
    rows = [r for r in read_prompts(cfg.prompts) if r.get("record")]
    if not rows:
        raise SystemExit(f"error: {cfg.prompts} has no prompts with a gold record to judge")
    res = evaluate_policy(model, tok, rows, cfg.n_samples, cfg.temperature, dev.device, cfg.max_new_tokens, cfg.seed)
    for mode in ("sampled", "greedy"):
        r = res[mode]
        print(f"{mode:8s} gold mean {r['gold_mean']:.3f} | pass rate {r['pass_rate']:.3f} | "
              f"by task {r['pass_by_task']}")


if __name__ == "__main__":
    main()
