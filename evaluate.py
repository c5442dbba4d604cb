"""Evaluating policies against a gold judge: pass rates, facets, win rates, gains, KL to the reference.

    python evaluate.py --checkpoint=runs/ppo/ckpt.pt                 # the dev prompts of the embedded world
    python evaluate.py --checkpoint=runs/ppo/ckpt.pt --prompts=data/world/prompts_test.jsonl

1. A judge is a function judge(row, response, ended) -> {"score": float in [0, 1], "pass": bool, and
   optionally "facets": {name: bool or number}, "family": str}; `row` is the prompt row as read from
   its file. The embedded world's judge (data/world.judge_row) reads row["world"]; load_judge gives it
   or a user's "package.module:function".
2. Answers are sampled through engine.generate_answers (chat template, left padding, KV cache). Two
   policies compared on the same prompts are sampled from independent random streams.
3. Statistics are over prompts: every confidence interval is a bootstrap that resamples prompts with
   all their samples (answers to one prompt are not independent of each other). A gain (policy minus
   reference) and a win rate are paired by prompt.
4. Win rate: each prompt's answers are paired sample by sample; ties count half.
5. KL to the reference: the mean over sampled answers of sum_t log pi(y_t) - log pi_ref(y_t), an
   unbiased estimate of KL(pi || pi_ref) per answer (`answer_kls` gives each answer's term; chat.py
   shows it per answer).
6. Per-family tables give the number of distinct prompts beside each rate.
"""
import importlib
import math
import os
import random
from dataclasses import dataclass

import torch

from data.world import judge_row
from engine import generate_answers, pack, score_texts
from model import token_logprobs

HERE = os.path.dirname(os.path.abspath(__file__))


def load_judge(spec="world"):
    """A judge function: "world" (the embedded world's gold judge) or "package.module:function"."""
    if spec == "world":
        return judge_row
    module, _, name = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise SystemExit(f"error: option --judge={spec!r}: cannot load it ({e}); expected world or "
                         f"package.module:function")
    return fn


# ----------------------------------------------------------------------------- statistics over prompts

def bootstrap_ci(values, n_boot=1000, seed=0, level=0.95):
    """Percentile bootstrap CI of the mean of per-prompt values (one value per prompt)."""
    rng = random.Random(seed)
    n = len(values)
    boots = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    lo = int((1 - level) / 2 * n_boot)
    return boots[lo], boots[n_boot - 1 - lo]


def mean(xs):
    return sum(xs) / len(xs)


def mean_with_ci(values, seed=0):
    """{"mean", "ci95": [lo, hi]} of per-prompt values."""
    return {"mean": mean(values), "ci95": list(bootstrap_ci(values, seed=seed))}


def win_rate(scores_a, scores_b, n_boot=1000, seed=0):
    """P(a beats b) on the gold judge, ties half; answers paired per prompt; bootstrap over prompts."""
    per_prompt = [mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(sa, sb)])
                  for sa, sb in zip(scores_a, scores_b)]
    return mean(per_prompt), bootstrap_ci(per_prompt, n_boot, seed)


# ----------------------------------------------------------------------------- judging answers

def judge_answers(rows, answers, judge=judge_row):
    """The judge's verdict on every answer: verdicts[i][j] for answer j to prompt row i."""
    return [[judge(row, a["text"], a["ended"]) for a in ans] for row, ans in zip(rows, answers)]


def summarize(rows, answers, judge=judge_row):
    """Gold mean and pass rate (with the pass rate's CI over prompts), facet rates, and a per-family
    table with the number of distinct prompts. Returns (summary, gold scores[i][j], passes[i][j])."""
    verdicts = judge_answers(rows, answers, judge)
    flat = [v for vs in verdicts for v in vs]
    scores = [[v["score"] for v in vs] for vs in verdicts]
    passes = [[float(v["pass"]) for v in vs] for vs in verdicts]
    out = {"gold_mean": mean([v["score"] for v in flat]), "pass_rate": mean([float(v["pass"]) for v in flat]),
           "pass_rate_ci95": list(bootstrap_ci([mean(p) for p in passes])), "n_answers": len(flat),
           "n_prompts": len(rows)}
    for key in flat[0].get("facets", {}):  # booleans as rates, numbers as means
        values = [v["facets"][key] for v in flat]
        out[("rate_" if all(isinstance(x, bool) for x in values) else "mean_") + key] = mean([float(x) for x in values])
    families = {}
    for row, vs in zip(rows, verdicts):
        fam = families.setdefault(vs[0].get("family", "all"), {"prompts": set(), "pass": [], "gold": []})
        fam["prompts"].add(row["prompt"])
        fam["pass"] += [float(v["pass"]) for v in vs]
        fam["gold"] += [v["score"] for v in vs]
    out["by_family"] = {f: {"pass_rate": round(mean(d["pass"]), 4), "gold_mean": round(mean(d["gold"]), 4),
                            "prompts": len(d["prompts"]), "answers": len(d["pass"])} for f, d in sorted(families.items())}
    return out, scores, passes


def evaluate_policy(model, tok, rows, n_samples=8, temperature=1.0, device="cpu", max_new_tokens=48,
                    seed=0, greedy_too=True, judge=judge_row):
    """Sampled (n_samples per prompt) and greedy gold metrics on prompt rows; the answers, their gold
    scores and passes are kept under "_sampled_answers" / "_sampled_scores" / "_sampled_passes" (and greedy)."""
    prompts = [r["prompt"] for r in rows]
    result = {"_sampled_answers": generate_answers(model, tok, prompts, n=n_samples, temperature=temperature,
                                                   max_new_tokens=max_new_tokens, seed=seed, device=device)}
    if greedy_too:
        result["_greedy_answers"] = generate_answers(model, tok, prompts, greedy=True, max_new_tokens=max_new_tokens,
                                                     device=device)
    for mode in ("sampled", "greedy") if greedy_too else ("sampled",):
        result[mode], result[f"_{mode}_scores"], result[f"_{mode}_passes"] = \
            summarize(rows, result[f"_{mode}_answers"], judge)
    return result


def best_of_n(rows, samples, rewards, ns, judge=judge_row):
    """For each n: split each prompt's samples into groups of n, keep the highest-reward answer of each
    group (and, for the ceiling, the highest-gold one). Gold mean / pass rate, KL = log n - (n-1)/n."""
    verdicts = judge_answers(rows, samples, judge)
    out = []
    for n in ns:
        picks = []  # (gold of the RM's pick, pass, its reward, gold of gold's pick, pass)
        for judged, rw in zip(verdicts, rewards):
            for start in range(0, len(judged) - n + 1, n):
                grp = range(start, start + n)
                best = max(grp, key=lambda i: rw[i])
                oracle = max(grp, key=lambda i: judged[i]["score"])
                picks.append((judged[best]["score"], judged[best]["pass"], rw[best], judged[oracle]["score"],
                              judged[oracle]["pass"]))
        g_rm, p_rm, r_rm, g_or, p_or = (mean([float(p[k]) for p in picks]) for k in range(5))
        out.append({"n": n, "kl": math.log(n) - (n - 1) / n, "gold_mean": g_rm, "pass_rate": p_rm,
                    "proxy_reward": r_rm, "oracle_gold_mean": g_or, "oracle_pass_rate": p_or})
    return out


def evaluate_best_of_n(policy, rm, tok, rows, n_max, temperature, max_new_tokens, seed, device, judge=judge_row,
                       verbose=True):
    """Best-of-n with a reward model on prompt rows, n = 1, 2, 4, ... n_max: n_max samples per prompt
    from `policy`, scored once by `rm`, split into groups for every n (best_of_n). Returns its rows."""
    ns = [2 ** i for i in range(int(math.log2(n_max)) + 1)]
    samples = generate_answers(policy, tok, [r["prompt"] for r in rows], n=n_max, temperature=temperature,
                               max_new_tokens=max_new_tokens, seed=seed, device=device)
    flat = score_texts(rm, tok, [r["prompt"] for r, a in zip(rows, samples) for _ in a],
                       [x["text"] for a in samples for x in a], [x["ended"] for a in samples for x in a], device)
    rewards = [flat[i * n_max:(i + 1) * n_max] for i in range(len(rows))]
    out = best_of_n(rows, samples, rewards, ns, judge)
    for r in out if verbose else []:
        print(f"best-of-{r['n']:<3d} KL {r['kl']:.2f} | proxy {r['proxy_reward']:+.3f} | gold {r['gold_mean']:.3f} "
              f"pass {r['pass_rate']:.3f} | by gold: pass {r['oracle_pass_rate']:.3f}")
    return out


@torch.no_grad()
def answer_kls(policy, ref, pad_id, prompt_ids, answer_ids, temperature, device, batch_size=128):
    """sum_t log pi(y_t) - log pi_ref(y_t) of each answer (token ids, its <|end|> included) after its
    prompt (token ids), logits divided by the sampling temperature: one KL sample per answer."""
    kls = []
    for b in range(0, len(prompt_ids), batch_size):
        seq, mask, P, resp, rmask = pack(prompt_ids[b:b + batch_size], answer_ids[b:b + batch_size], pad_id)
        seq, mask, resp, rmask = seq.to(device), mask.to(device), resp.to(device), rmask.to(device)
        lp = token_logprobs(policy(seq, attention_mask=mask)[0][:, P - 1:-1], resp, temperature)
        rlp = token_logprobs(ref(seq, attention_mask=mask)[0][:, P - 1:-1], resp, temperature)
        kls += ((lp - rlp) * rmask).sum(1).tolist()  # (B,)
    return kls


def sequence_kl(policy, ref, tok, prompts, answers, temperature, device, batch_size=128):
    """Mean over answers of sum_t log pi(y_t) - log pi_ref(y_t): the KL to the reference, estimated on
    samples of pi. answers[i] = the list of sampled answers (with their "ids") to prompts[i]."""
    items = [(tok.render_chat(p)[0], a["ids"]) for p, ans in zip(prompts, answers) for a in ans]
    kls = answer_kls(policy, ref, tok.pad_id, [p for p, _ in items], [a for _, a in items], temperature, device,
                     batch_size)
    return sum(kls) / len(kls)


def gain(scores_new, scores_ref, seed=0):
    """Mean per-prompt difference of two policies' scores (or passes), with its bootstrap CI over prompts."""
    return mean_with_ci([mean(a) - mean(b) for a, b in zip(scores_new, scores_ref)], seed=seed)


def compare_to_reference(policy, ref, tok, rows, n_samples, temperature, device, max_new_tokens, seed=0,
                         judge=judge_row):
    """A trained policy against its reference (the SFT model) on held-out prompt rows: gold mean and pass
    rate of both (sampled and greedy) with CIs over prompts, the pass-rate gain and the win rate with
    their CIs (paired by prompt), KL to the reference, facets, per-family tables and a few answers side
    by side. The two policies' samples come from independent random streams. Every step-3 method reports this."""
    out, res = {}, {}
    for name, model, stream in (("sft", ref, seed), ("policy", policy, seed + 7_654_321)):
        res[name] = evaluate_policy(model, tok, rows, n_samples, temperature, device, max_new_tokens, seed=stream,
                                    judge=judge)
        for mode in ("sampled", "greedy"):
            sfx = "" if mode == "sampled" else "_greedy"
            r = res[name][mode]
            out |= {f"{name}_gold_mean{sfx}": r["gold_mean"], f"{name}_pass_rate{sfx}": r["pass_rate"],
                    f"{name}_pass_rate{sfx}_ci95": r["pass_rate_ci95"], f"{name}_by_family{sfx}": r["by_family"]}
        out[f"{name}_facets"] = {k: v for k, v in res[name]["sampled"].items() if k.startswith(("rate_", "mean_"))}
        print(f"{name}: sampled gold {res[name]['sampled']['gold_mean']:.3f} pass {res[name]['sampled']['pass_rate']:.3f} "
              f"| greedy gold {res[name]['greedy']['gold_mean']:.3f} pass {res[name]['greedy']['pass_rate']:.3f}")
    out["pass_gain"] = gain(res["policy"]["_sampled_passes"], res["sft"]["_sampled_passes"])
    out["pass_gain_greedy"] = gain(res["policy"]["_greedy_passes"], res["sft"]["_greedy_passes"])
    wr, ci = win_rate(res["policy"]["_sampled_scores"], res["sft"]["_sampled_scores"])
    wr_g, ci_g = win_rate(res["policy"]["_greedy_scores"], res["sft"]["_greedy_scores"])
    out |= {"win_rate_vs_sft": wr, "win_rate_ci95": list(ci), "win_rate_vs_sft_greedy": wr_g,
            "win_rate_greedy_ci95": list(ci_g), "n_prompts": len(rows), "samples_per_prompt": n_samples,
            "kl_to_ref": sequence_kl(policy, ref, tok, [r["prompt"] for r in rows], res["policy"]["_sampled_answers"],
                                     temperature, device)}
    g = out["pass_gain"]
    print(f"pass gain {g['mean']:+.3f} (95% CI {g['ci95'][0]:+.3f} to {g['ci95'][1]:+.3f}); win rate vs SFT {wr:.3f} "
          f"(95% CI {ci[0]:.3f}-{ci[1]:.3f}); greedy win {wr_g:.3f}; KL to ref {out['kl_to_ref']:.3f}")
    out["examples"] = [{"prompt": r["prompt"], "sft": a[0]["text"], "policy": b[0]["text"]}
                       for r, a, b in list(zip(rows, res["sft"]["_sampled_answers"], res["policy"]["_sampled_answers"]))[:12]]
    return out


@dataclass
class Config:
    checkpoint: str = os.path.join(HERE, "runs", "sft", "ckpt.pt")  # a policy checkpoint (pretrain/sft/ppo)
    prompts: str = os.path.join(HERE, "data", "world", "prompts_dev.jsonl")  # prompt rows the judge can judge
    judge: str = "world"  # world (the embedded world's gold judge) | package.module:function
    n_samples: int = 8  # samples per prompt at `temperature`
    temperature: float = 1.0  # sampling temperature
    max_new_tokens: int = 48  # longest answer, in tokens
    seed: int = 0  # seed of the sampling generator
    device: str = "auto"  # auto | cpu | cuda | mps


def main(cfg):
    from common import pick_device, print_config
    from data.formats import read_prompts
    from engine import load_model
    from tokenizer import get_tokenizer
    print_config(cfg)
    judge = load_judge(cfg.judge)
    rows = read_prompts(cfg.prompts)
    if cfg.judge == "world" and not all(r.get("world") for r in rows):
        raise SystemExit(f"error: {cfg.prompts}: the world judge needs a \"world\" field on every row "
                         f"(pass --judge=package.module:function for prompts of your own)")
    dev = pick_device(cfg.device)
    model, ckpt = load_model(cfg.checkpoint, dev.device)
    tok = get_tokenizer(ckpt.get("tokenizer", "embedded"))
    res = evaluate_policy(model, tok, rows, cfg.n_samples, cfg.temperature, dev.device, cfg.max_new_tokens, cfg.seed,
                          judge=judge)
    for mode in ("sampled", "greedy"):
        r = res[mode]
        print(f"{mode:8s} gold mean {r['gold_mean']:.3f} | pass rate {r['pass_rate']:.3f} (95% CI "
              f"{r['pass_rate_ci95'][0]:.3f}-{r['pass_rate_ci95'][1]:.3f}, {r['n_prompts']} prompts)")
        for f, d in r["by_family"].items():
            print(f"   {f:10s} pass {d['pass_rate']:.3f}  gold {d['gold_mean']:.3f}  ({d['prompts']} prompts)")


if __name__ == "__main__":
    from common import run_command
    run_command(main, Config)
