"""Evaluating policies against a gold judge: pass rates, facets, win rates, gains, KL to the reference.

    python evaluate.py --checkpoint=runs/ppo/ckpt.pt                 # the dev prompts of the embedded world
    python evaluate.py --checkpoint=runs/ppo/ckpt.pt --prompts=data/world/prompts_test.jsonl
    python evaluate.py --checkpoint=out/ppo/ckpt.pt --prompts=task/heldout.jsonl --judge=task/judge.py:judge

1. A judge is a function judge(row, response, ended) -> {"score": a number, higher is better (the world's is
   in [0, 1]), "pass": bool, and optionally "facets": {name: bool or number}, "family": str}; `row` is the
   prompt row as read from its file (every field of it, the user's own included), `response` the answer
   text (possibly empty), `ended` whether it ended with <|end|>. The embedded world's judge
   (data/world.judge_row) reads row["world"]; load_judge gives it ("world") or a user's
   ("package.module:function", or "path/to/file.py:function"). A user's judge is checked before any
   training on every row it will judge (resolve_judge), and every verdict it gives is checked too, so a
   judge that fails is one line naming the judge, the prompt and the answer.
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
7. Without a judge, what needs none: answer length, the share of distinct answers, the share that ended
   and the KL to the reference (answer_stats, drift); they are the signs of reward hacking when no
   judge can say whether the answers got better (docs/OWN_DATA.md, "Reading the outputs").
"""
import functools
import importlib
import importlib.util
import math
import os
import random
import sys
from dataclasses import dataclass
from typing import Annotated

import torch

from common import Rule, get_batch
from data.formats import InputError, read_prompts
from data.world import judge_row
from engine import generate_answers, pack, prompt_too_long, score_texts
from model import token_logprobs

HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------- judges

@functools.lru_cache(maxsize=None)
def load_judge(spec="world"):
    """A judge function: "world" (the embedded world's gold judge), "package.module:function" (importable from
    the current directory or PYTHONPATH) or "path/to/file.py:function". A user's judge comes back wrapped in
    checked_judge. Loaded once per spec (a file's module is executed once)."""
    if spec == "world":
        return judge_row
    module, _, name = spec.rpartition(":")
    try:
        if not module or not name:
            raise ValueError("no ':function'")
        if module.endswith(".py"):
            found = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(module))[0], module)
            mod = importlib.util.module_from_spec(found)
            found.loader.exec_module(mod)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())  # as `python -m` does: a module next to the user's data
            mod = importlib.import_module(module)
        fn = getattr(mod, name)
    except Exception as e:  # the user's module may fail in any way while it loads
        raise SystemExit(f"error: option --judge={spec}: cannot load it ({type(e).__name__}: {e}); expected "
                         f"world, package.module:function or path/to/file.py:function") from None
    if not callable(fn):
        raise SystemExit(f"error: option --judge={spec}: {name} is not a function")
    return checked_judge(fn, spec)


def a_judge():
    """The rule of a --judge option (common.Rule): "" (none), world, or a judge load_judge can load (its own
    one-line error otherwise), so that a judge that cannot be imported fails before anything runs."""
    return Rule(lambda spec, world: not spec or callable(load_judge(spec)), "a judge")


def verdict_problem(verdict):
    """What is wrong with a judge's verdict (the interface of the docstring, detail 1), or None."""
    if not isinstance(verdict, dict):
        return f"a {type(verdict).__name__}, not a dict"
    score = verdict.get("score")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
        return f'"score" {score!r} (expected a finite number)'
    if verdict.get("pass") not in (True, False):  # 0 and 1 pass too
        return f'"pass" {verdict.get("pass")!r} (expected true or false)'
    if not isinstance(verdict.get("facets", {}), dict):
        return f'"facets" {verdict["facets"]!r} (expected a dict)'
    return None


def checked_judge(fn, spec):
    """fn, with every call checked: an exception or a malformed verdict is a one-line error naming the judge,
    the prompt and the answer (never a traceback in the middle of an evaluation)."""
    def judge(row, response, ended=True):
        where = f"on the prompt {row.get('prompt', '')[:60]!r} and the answer {response[:40]!r}"
        try:
            verdict = fn(row, response, ended)
        except Exception as e:
            raise SystemExit(f"error: --judge={spec} raised {type(e).__name__}: {e} {where}") from None
        if problem := verdict_problem(verdict):
            raise SystemExit(f"error: --judge={spec} returned {problem} {where}")
        return verdict
    return judge


def resolve_judge(spec, rows, source, what):
    """The judge of `rows` (prompt or comparison rows read from `source`), or None with a printed note saying
    that `what` ("the gold evaluation") is skipped: spec "" asks for no judge; the world's judge ("world")
    cannot read rows without a "world" field (a user's rows; some with it and some without is an error).
    A user's judge is called once on every row with an empty answer that did not end, before anything is
    trained: a judge that fails on a row fails here, in one line."""
    if not spec:
        print(f"note: no --judge: {what} on {source} is skipped")
        return None
    if spec == "world":
        n = sum(isinstance(r.get("world"), dict) for r in rows)
        if n == 0:
            print(f'note: {source} has no "world" fields (the embedded world\'s judge reads them): {what} is '
                  f'skipped; pass --judge=FILE.py:function to judge your rows with your own judge')
            return None
        if n < len(rows):
            raise InputError(f'{source}: {len(rows) - n} of {len(rows)} rows have no "world" field, which the '
                             f'embedded world\'s judge (--judge=world) reads')
        return judge_row
    judge = load_judge(spec)
    for row in rows:
        judge(row, "", False)
    return judge


def judged_prompts(path, spec, tok, max_new_tokens, block_size, what="the gold evaluation"):
    """The prompt rows of `path` ("" = none) that can be answered within the context (read_prompts drops the
    others, with a count and their lines) and their judge (resolve_judge): (rows, judge or None)."""
    if not path:
        return [], None
    rows = read_prompts(path, lambda r: prompt_too_long(tok, r["prompt"], max_new_tokens, block_size))
    return rows, resolve_judge(spec, rows, path, what)


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


def gold_scores(comps, judge=judge_row):
    """The judge's score of every answer of every comparison row, [[score of each answer] or None], None for a
    row without a verdict: there is no judge, or it is the world's and the row has no "world" field."""
    return [None if judge is None or (judge is judge_row and not c.get("world")) else
            [judge(c, r, e)["score"] for r, e in zip(c["responses"], c.get("ended") or [True] * len(c["responses"]))]
            for c in comps]


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
    for key in flat[0].get("facets", {}):  # booleans as rates, numbers as means, over the verdicts that have them
        values = [v["facets"][key] for v in flat if isinstance(v.get("facets", {}).get(key), (bool, int, float))]
        if values:
            kind = "rate_" if all(isinstance(x, bool) for x in values) else "mean_"
            out[kind + key] = mean([float(x) for x in values])
    families = {}
    for row, vs in zip(rows, verdicts):
        fam = families.setdefault(vs[0].get("family", "all"), {"prompts": set(), "pass": [], "gold": []})
        fam["prompts"].add(row["prompt"])
        fam["pass"] += [float(v["pass"]) for v in vs]
        fam["gold"] += [v["score"] for v in vs]
    out["by_family"] = {f: {"pass_rate": round(mean(d["pass"]), 4), "gold_mean": round(mean(d["gold"]), 4),
                            "prompts": len(d["prompts"]), "answers": len(d["pass"])} for f, d in sorted(families.items())}
    return out, scores, passes


def answer_stats(answers):
    """What needs no judge, over every answer (answers[i] = the answers to prompt i): mean length in words,
    the share of distinct answer texts (a policy collapsing onto a few answers lowers it) and the share
    that ended."""
    flat = [a for ans in answers for a in ans]
    return {"answer_words": mean([len(a["text"].split()) for a in flat]),
            "distinct_rate": len({a["text"] for a in flat}) / len(flat),
            "end_rate": mean([float(a["ended"]) for a in flat])}


def evaluate_policy(model, tok, rows, n_samples=8, temperature=1.0, device="cpu", max_new_tokens=48,
                    seed=0, greedy_too=True, judge=judge_row):
    """Sampled (n_samples per prompt) and greedy gold metrics on prompt rows; the answers, their gold
    scores and passes are kept under "_sampled_answers" / "_sampled_scores" / "_sampled_passes" (and greedy).
    judge None: the sampled answers only."""
    prompts = [r["prompt"] for r in rows]
    result = {"_sampled_answers": generate_answers(model, tok, prompts, n=n_samples, temperature=temperature,
                                                   max_new_tokens=max_new_tokens, seed=seed, device=device)}
    greedy_too = greedy_too and judge is not None
    if greedy_too:
        result["_greedy_answers"] = generate_answers(model, tok, prompts, greedy=True, max_new_tokens=max_new_tokens,
                                                     device=device)
    for mode in ("sampled", "greedy") if greedy_too else ("sampled",) if judge else ():
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


@torch.no_grad()
def heldout_ptx_loss(policy, ptx, device):
    """The pretraining loss on 8 fixed batches of held-out pretraining text ptx[1] (the alignment tax's
    measure; None without the token files)."""
    if ptx is None:
        return None
    g = torch.Generator().manual_seed(0)
    losses = [policy(*[t.to(device) for t in get_batch(ptx[1], 32, min(128, policy.config.block_size), g)])[1]
              for _ in range(8)]
    return float(torch.stack(losses).mean())


def gain(scores_new, scores_ref, seed=0):
    """Mean per-prompt difference of two policies' scores (or passes), with its bootstrap CI over prompts."""
    return mean_with_ci([mean(a) - mean(b) for a, b in zip(scores_new, scores_ref)], seed=seed)


def compare_to_reference(policy, ref, tok, rows, n_samples, temperature, device, max_new_tokens, seed=0,
                         judge=judge_row):
    """A trained policy against its reference (the SFT model) on held-out prompt rows: gold mean and pass
    rate of both (sampled and greedy) with CIs over prompts, the pass-rate gain and the win rate with
    their CIs (paired by prompt), KL to the reference, facets, per-family tables, answer length, distinct
    and ended shares (answer_stats) and a few answers side by side. The two policies' samples come from
    independent random streams. Without a judge (None) only what needs none: KL and answer_stats. Every
    step-3 method reports this."""
    out, res = {}, {}
    for name, model, stream in (("sft", ref, seed), ("policy", policy, seed + 7_654_321)):
        res[name] = evaluate_policy(model, tok, rows, n_samples, temperature, device, max_new_tokens, seed=stream,
                                    judge=judge)
        stats = answer_stats(res[name]["_sampled_answers"])
        out |= {f"{name}_{k}": v for k, v in stats.items()}
        line = f"{name}: answers {stats['answer_words']:.1f} words, distinct {stats['distinct_rate']:.2f}, " \
               f"ended {stats['end_rate']:.2f}"
        for mode in ("sampled", "greedy") if judge else ():
            sfx = "" if mode == "sampled" else "_greedy"
            r = res[name][mode]
            out |= {f"{name}_gold_mean{sfx}": r["gold_mean"], f"{name}_pass_rate{sfx}": r["pass_rate"],
                    f"{name}_pass_rate{sfx}_ci95": r["pass_rate_ci95"], f"{name}_by_family{sfx}": r["by_family"]}
            line += f" | {mode} gold {r['gold_mean']:.3f} pass {r['pass_rate']:.3f}"
        if judge:
            out[f"{name}_facets"] = {k: v for k, v in res[name]["sampled"].items() if k.startswith(("rate_", "mean_"))}
        print(line)
    out |= {"n_prompts": len(rows), "samples_per_prompt": n_samples,
            "kl_to_ref": sequence_kl(policy, ref, tok, [r["prompt"] for r in rows], res["policy"]["_sampled_answers"],
                                     temperature, device)}
    if judge:
        out["pass_gain"] = gain(res["policy"]["_sampled_passes"], res["sft"]["_sampled_passes"])
        out["pass_gain_greedy"] = gain(res["policy"]["_greedy_passes"], res["sft"]["_greedy_passes"])
        wr, ci = win_rate(res["policy"]["_sampled_scores"], res["sft"]["_sampled_scores"])
        wr_g, ci_g = win_rate(res["policy"]["_greedy_scores"], res["sft"]["_greedy_scores"])
        out |= {"win_rate_vs_sft": wr, "win_rate_ci95": list(ci), "win_rate_vs_sft_greedy": wr_g,
                "win_rate_greedy_ci95": list(ci_g)}
        g = out["pass_gain"]
        print(f"pass gain {g['mean']:+.3f} (95% CI {g['ci95'][0]:+.3f} to {g['ci95'][1]:+.3f}); win rate vs SFT "
              f"{wr:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f}); greedy win {wr_g:.3f}; KL to ref {out['kl_to_ref']:.3f}")
    else:
        print(f"KL to ref {out['kl_to_ref']:.3f} (no judge: no gold numbers)")
    out["examples"] = [{"prompt": r["prompt"], "sft": a[0]["text"], "policy": b[0]["text"]}
                       for r, a, b in list(zip(rows, res["sft"]["_sampled_answers"], res["policy"]["_sampled_answers"]))[:12]]
    return out


# ----------------------------------------------------------------------------- signs of trouble without a judge

DRIFT = ("reward", "kl_to_ref", "answer_length", "distinct_rate", "eos_rate", "rm_disagreement")


def drift(rows, window=5, verbose=True):
    """The drift signals of a step-3 run's metrics rows, each as [start, end] (the means of its first and of its
    last `window` iterations), and the warnings drift_warnings draws from them; printed (verbose) as a line
    and a "warning: ..." line each."""
    out, window = {}, max(1, min(window, len(rows) // 2))  # a short run: its start and its end do not overlap
    for key in DRIFT:
        ends = [[r[key] for r in part if r.get(key) is not None] for part in (rows[:window], rows[-window:])]
        if all(ends):
            out[key] = [mean(ends[0]), mean(ends[1])]
    warnings = drift_warnings(out)
    if verbose:
        print("drift, start -> end: " + ", ".join(f"{k} {a:.3f} -> {b:.3f}" for k, (a, b) in out.items()))
        print("".join(f"warning: {w}\n" for w in warnings), end="")
    return {"drift": out, "drift_warnings": warnings}


def drift_warnings(d):
    """Signs of reward hacking that need no judge (docs/OWN_DATA.md): the share of distinct answers halved,
    the answer length grown or shrunk by half, a tenth more answers that never end, the reward models of
    an ensemble disagreeing twice as much. Each is a reason to read the answers, not a proof."""
    warn = []
    if "distinct_rate" in d and d["distinct_rate"][1] < 0.5 * d["distinct_rate"][0]:
        warn.append("the share of distinct answers fell from {:.2f} to {:.2f}: the policy repeats a few "
                    "answers".format(*d["distinct_rate"]))
    if "answer_length" in d and not 2 / 3 <= d["answer_length"][1] / max(d["answer_length"][0], 1e-9) <= 1.5:
        warn.append("the answers went from {:.1f} to {:.1f} tokens: check that the reward model does not just "
                    "pay for length".format(*d["answer_length"]))
    if "eos_rate" in d and d["eos_rate"][1] < d["eos_rate"][0] - 0.1:
        warn.append("the share of answers that end fell from {:.2f} to {:.2f}".format(*d["eos_rate"]))
    if "rm_disagreement" in d and d["rm_disagreement"][1] > 2 * d["rm_disagreement"][0]:
        warn.append("the reward models disagree {:.1f}x as much as at the start: the policy left the data they "
                    "were trained on".format(d["rm_disagreement"][1] / max(d["rm_disagreement"][0], 1e-12)))
    return warn


def reward_model_stats(comps, scores, gold):
    """A reward model on comparison rows, from scores[i] (its score of each answer of row i) and gold[i] (the
    judge's, or None): accuracy against the labels and against gold (both per answer pair, like the
    labelers' ceilings; gold ties left out), mean margin of the labelled pairs, calibration points
    (predicted P(first preferred), preferred or not) and the correlation of reward with answer length."""
    acc_l, acc_g, margins, calib, lengths, rewards = [], [], [], [], [], []
    for c, s, g in zip(comps, scores, gold):
        rank_pos = {j: p for p, j in enumerate(c["ranking"])}
        for i in range(len(s)):
            lengths.append(len(c["responses"][i].split()))
            rewards.append(s[i])
            for j in range(i + 1, len(s)):
                i_first = rank_pos[i] < rank_pos[j]  # the labeler preferred answer i
                margin = s[i] - s[j] if i_first else s[j] - s[i]
                acc_l.append(float(margin > 0))
                margins.append(margin)
                calib.append((1 / (1 + math.exp(-(s[i] - s[j]))), float(i_first)))  # predicted vs labelled
        if g is not None:
            acc_g += [float((s[i] - s[j]) * (g[i] - g[j]) > 0) for i in range(len(s))
                      for j in range(i + 1, len(s)) if g[i] != g[j]]
    ml, mr = mean(lengths), mean(rewards)
    cov = sum((x - ml) * (y - mr) for x, y in zip(lengths, rewards))
    sd = math.sqrt(sum((x - ml) ** 2 for x in lengths) * sum((y - mr) ** 2 for y in rewards)) or 1.0
    return {"acc_vs_labels": mean(acc_l), "acc_vs_gold": mean(acc_g) if acc_g else None,
            "mean_margin": mean(margins), "length_corr": cov / sd, "_calibration": calib}


def reward_model_line(summary, stats):
    """reward.py's last line: held-out accuracy against the labels, the labelers' ceilings and agreement (the
    embedded world's), against gold (where judged), and the length correlation."""
    parts = [f"held-out accuracy vs labels {summary['heldout_acc_vs_labels']:.3f}"]
    if "heldout_bayes_accuracy" in summary:
        parts.append(f"on these pairs two labelers agree {summary['heldout_expected_labeler_agreement']:.3f} in "
                     f"expectation, the best possible accuracy is {summary['heldout_bayes_accuracy']:.3f}")
    if "labeler_agreement" in stats:
        parts.append(f"measured agreement on {stats['agreement_pairs']} double-labelled pairs "
                     f"{stats['labeler_agreement']:.3f}, labels vs gold {stats['label_vs_gold_accuracy']:.3f}")
    if summary["heldout_acc_vs_gold"] is not None:
        parts.append(f"vs gold {summary['heldout_acc_vs_gold']:.3f}")
    return "; ".join(parts + [f"length corr {summary['heldout_length_corr']:.2f}"])


WEAK_RM = 0.65  # a held-out accuracy against the labels below this is close to chance (0.5)


def reward_model_warning(heldout_acc, train_accs):
    """A warning line when a reward model's held-out accuracy is close to chance, with the likely remedy:
    more epochs when it has not learnt its training pairs either (train_accs: its training accuracies over
    the last epoch), more data when it has memorised them."""
    if heldout_acc >= WEAK_RM or not train_accs:
        return None
    train_acc = mean(train_accs)
    fix = ("it has memorised its training pairs: more comparisons, or fewer --epochs" if train_acc > heldout_acc + 0.15
           else "it has not learnt its training pairs either: train longer (e.g. --epochs=4)")
    return (f"warning: held-out accuracy {heldout_acc:.3f} is close to chance (training accuracy {train_acc:.3f}): "
            f"{fix}; PPO against a weak reward model optimises its errors (docs/OWN_DATA.md)")


@dataclass
class Config:
    checkpoint: str = os.path.join(HERE, "runs", "sft", "ckpt.pt")  # a policy checkpoint (pretrain/sft/ppo)
    prompts: str = os.path.join(HERE, "data", "world", "prompts_dev.jsonl")  # prompt rows the judge can judge
    judge: Annotated[str, a_judge()] = "world"  # world (the embedded world's) | package.module:function | file.py:fn
    n_samples: int = 8  # samples per prompt at `temperature`
    temperature: float = 1.0  # sampling temperature
    max_new_tokens: int = 48  # longest answer, in tokens
    seed: int = 0  # seed of the sampling generator
    device: str = "auto"  # auto | cpu | cuda | mps


def main(cfg):
    from common import pick_device, print_config
    from engine import load_model
    from tokenizer import get_tokenizer
    print_config(cfg)
    if cfg.prompts == Config.prompts and cfg.judge != Config.judge:
        raise SystemExit(f"error: --prompts not given with your own --judge={cfg.judge}: name the prompts to judge")
    dev = pick_device(cfg.device)
    model, ckpt = load_model(cfg.checkpoint, dev.device)
    tok = get_tokenizer(ckpt.get("tokenizer", "embedded"))
    rows, judge = judged_prompts(cfg.prompts, cfg.judge, tok, cfg.max_new_tokens, model.config.block_size)
    if judge is None:
        raise SystemExit("error: evaluate.py needs a judge of these prompts: pass --judge=FILE.py:function")
    res = evaluate_policy(model, tok, rows, cfg.n_samples, cfg.temperature, dev.device, cfg.max_new_tokens, cfg.seed,
                          judge=judge)
    for mode in ("sampled", "greedy"):
        r = res[mode]
        print(f"{mode:8s} gold mean {r['gold_mean']:.3f} | pass rate {r['pass_rate']:.3f} (95% CI "
              f"{r['pass_rate_ci95'][0]:.3f}-{r['pass_rate_ci95'][1]:.3f}, {r['n_prompts']} prompts)")
        for f, d in r["by_family"].items():
            print(f"   {f:10s} pass {d['pass_rate']:.3f}  gold {d['gold_mean']:.3f}  ({d['prompts']} prompts)")
    stats = answer_stats(res["_sampled_answers"])
    print(f"answers {stats['answer_words']:.1f} words, distinct {stats['distinct_rate']:.3f}, "
          f"ended {stats['end_rate']:.3f}")


if __name__ == "__main__":
    from common import run_command
    run_command(main, Config)
