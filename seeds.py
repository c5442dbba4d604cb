"""The whole pipeline for several end-to-end seeds, then a seed table: the project's reported result.

    python seeds.py                          # seeds 1, 2, 3: runs/seeds/seed_<s>/, then docs/results/
    python seeds.py --seeds=1,2,3,4,5        # more seeds
    python seeds.py --run=false              # only rebuild the table from the runs already there

Every stage's seed changes with the seed (initialisation, data order, sampling, labelling, rollouts,
evaluation samples); the world (data/world/) stays fixed. A number measured once is one draw: floating
point differs between machines and the difference grows through the stages, so the headline is the
median over seeds with its range, and each seed's own confidence intervals (bootstrap over test
prompts) are listed beside it.

Writes docs/results/seeds.json (every seed's results.json and the summary), docs/results/seeds.md (the
table) and rewrites the results block of README.md between its markers, so that every figure there
comes from these files.
"""
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass

import pipeline
from common import print_config, run_command, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
BEGIN, END = "<!-- results:begin (written by seeds.py) -->", "<!-- results:end -->"

# (results.json key, label, digits); the headline numbers of the table
HEADLINE = [("sft_pass", "SFT pass rate (sampled)", 3), ("sft_pass_greedy", "SFT pass rate (greedy)", 3),
            ("ppo_pass", "PPO pass rate (sampled)", 3), ("ppo_pass_greedy", "PPO pass rate (greedy)", 3),
            ("ppo_gain", "PPO - SFT pass rate (sampled)", 3), ("ppo_gain_greedy", "PPO - SFT pass rate (greedy)", 3),
            ("ppo_win_rate", "PPO win rate vs SFT", 3), ("ppo_kl", "PPO KL to SFT (nats)", 2),
            ("oracle_pass", "oracle pass rate (sampled)", 3), ("oracle_gain", "oracle - SFT pass rate (sampled)", 3),
            ("oracle_gain_greedy", "oracle - SFT pass rate (greedy)", 3),
            ("oracle_share", "share of the oracle's gold gain PPO recovers", 2),
            ("bon_rm_pass", "best-of-n by the RM, pass rate", 3), ("bon_gold_pass", "best-of-n by gold, pass rate", 3),
            ("rm_acc_labels", "RM accuracy vs labelers", 3), ("rm_acc_gold", "RM accuracy vs gold", 3),
            ("rm_expected_agreement", "two labelers' expected agreement", 3),
            ("total_seconds", "pipeline wall time (s)", 0)]


@dataclass
class Config:
    seeds: str = "1,2,3"  # comma-separated end-to-end seeds
    runs: str = os.path.join(HERE, "runs", "seeds")  # runs/seeds/seed_<s>/ per seed
    out: str = os.path.join(HERE, "docs", "results")  # seeds.json and seeds.md
    readme: str = os.path.join(HERE, "README.md")  # its results block is rewritten ("" = leave README alone)
    run: bool = True  # run the pipeline for seeds whose results.json is missing (false: only aggregate)
    threads: int = 0  # torch CPU threads (0 = torch's default)


def summarize_seeds(per_seed):
    """{key: {"median", "min", "max", "values"}} over seeds for every headline key they all have."""
    out = {}
    for key, _, _ in HEADLINE:
        values = [r[key] for r in per_seed if r.get(key) is not None]
        if len(values) == len(per_seed) and values:
            out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}
    return out


def markdown(per_seed, summary, machine):
    seeds = [r["seed"] for r in per_seed]
    r0 = per_seed[0]
    lines = [f"Median over {len(seeds)} end-to-end seeds ({', '.join(map(str, seeds))}) of `python pipeline.py "
             f"--seed=S`, on the **{r0['split']}** set ({r0['n_prompts']} prompts of held-out content, "
             f"{r0['samples_per_prompt']} sampled answers each plus one greedy), {machine}. "
             "Regenerate with `python seeds.py`.", "",
             "| quantity | median | min | max | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---|---|---|" + "---|" * len(seeds)]
    for key, label, digits in HEADLINE:
        if key not in summary:
            continue
        s = summary[key]
        lines.append(f"| {label} | **{s['median']:.{digits}f}** | {s['min']:.{digits}f} | {s['max']:.{digits}f} | "
                     + " | ".join(f"{v:.{digits}f}" for v in s["values"]) + " |")
    lines += ["", "Each seed's 95% confidence intervals (bootstrap over test prompts, all samples of a prompt together):", "",
              "| seed | PPO - SFT pass (sampled) | PPO - SFT pass (greedy) | PPO win rate vs SFT |", "|---|---|---|---|"]
    for r in per_seed:
        c = lambda k: f"[{r[k][0]:+.3f}, {r[k][1]:+.3f}]" if r.get(k) else "n/a"
        lines.append(f"| {r['seed']} | {r['ppo_gain']:+.3f} {c('ppo_gain_ci95')} | {r['ppo_gain_greedy']:+.3f} "
                     f"{c('ppo_gain_greedy_ci95')} | {r['ppo_win_rate']:.3f} [{r['ppo_win_rate_ci95'][0]:.3f}, "
                     f"{r['ppo_win_rate_ci95'][1]:.3f}] |")
    lines += stage_lines(per_seed) + family_lines(per_seed)
    return "\n".join(lines) + "\n"


def stage_lines(per_seed):
    """The stage-time table: each stage's median seconds over seeds, with its range."""
    stages = [k for k in per_seed[0].get("stage_seconds", {}) if all(k in r.get("stage_seconds", {}) for r in per_seed)]
    if not stages:
        return []
    span = lambda v: f"{statistics.median(v):.0f} ({min(v):.0f}-{max(v):.0f})"
    cells = [span([r["stage_seconds"][k] for r in per_seed]) for k in stages] + [
        span([r["total_seconds"] for r in per_seed])]
    return ["", "Stage times in seconds, median (range) over the seeds (`runs/report.md` splits each stage further):", "",
            "| " + " | ".join(stages) + " | total |", "|" + "---|" * (len(stages) + 1), "| " + " | ".join(cells) + " |"]


def family_lines(per_seed):
    """Pass rate by task family (sampled), SFT -> PPO -> oracle, medians over seeds, with the number of prompts."""
    fams = {}
    for r in per_seed:
        for name, key in (("sft", "sft_by_family"), ("ppo", "policy_by_family"), ("oracle", "oracle_by_family")):
            for fam, d in (r.get(key) or {}).items():
                fams.setdefault(fam, {}).setdefault(name, []).append(d["pass_rate"])
                fams[fam]["prompts"] = d["prompts"]
    if not fams:
        return []
    med = lambda v: f"{statistics.median(v):.3f}" if v and len(v) == len(per_seed) else "n/a"
    lines = ["", "Pass rate by task family (sampled answers), median over the seeds:", "",
             "| family | test prompts | SFT | PPO | oracle |", "|---|---|---|---|---|"]
    for fam in sorted(fams):
        f = fams[fam]
        lines.append(f"| {fam} | {f['prompts']} | {med(f.get('sft'))} | {med(f.get('ppo'))} | {med(f.get('oracle'))} |")
    return lines


def by_family(run_dir, r):
    """A seed's results.json row with the per-family tables of its PPO and oracle runs (their summary.json)."""
    for stage, keys in (("ppo", (("sft_by_family", "sft_by_family"), ("policy_by_family", "policy_by_family"))),
                        ("oracle", (("oracle_by_family", "policy_by_family"),))):
        path = os.path.join(run_dir, stage, "summary.json")
        if os.path.exists(path):
            summary = json.load(open(path))
            r |= {mine: summary.get(theirs) for mine, theirs in keys}
    return r


def update_readme(path, block):
    """README's results block rewritten with `block` (None: only check that the file has the block)."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: option --readme={path}: no such file")
    with open(path) as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"error: {path} has no results block ({BEGIN} ... {END}) to rewrite")
    if block is None:
        return
    head, rest = text.split(BEGIN, 1)
    with open(path, "w") as f:
        f.write(head + BEGIN + "\n" + block + END + rest.split(END, 1)[1])


def main(cfg):
    print_config(cfg)
    try:
        seeds = [int(s) for s in cfg.seeds.split(",") if s.strip()]
    except ValueError:
        seeds = []
    if not seeds:
        raise SystemExit(f"error: option --seeds={cfg.seeds!r}: expected comma-separated integers, e.g. --seeds=1,2,3")
    if cfg.readme:  # checked before any run: hours of seeds should not end on a README without its block
        update_readme(cfg.readme, None)
    per_seed = []
    for s in seeds:
        run_dir = os.path.join(cfg.runs, f"seed_{s}")
        path = os.path.join(run_dir, "results.json")
        if cfg.run and not os.path.exists(path):
            t0 = time.time()
            pipeline.main(pipeline.Config(runs=run_dir, seed=s, threads=cfg.threads))
            print(f"seed {s}: pipeline done in {time.time() - t0:.0f}s")
        if not os.path.exists(path):
            raise SystemExit(f"error: {path} does not exist (run with --run=true)")
        per_seed.append(by_family(run_dir, json.load(open(path))))
    summary = summarize_seeds(per_seed)
    import torch
    machine = (f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, "
               f"{cfg.threads or torch.get_num_threads()} threads")
    os.makedirs(cfg.out, exist_ok=True)
    write_json(os.path.join(cfg.out, "seeds.json"), {"machine": machine, "seeds": per_seed, "summary": summary})
    block = markdown(per_seed, summary, machine)
    with open(os.path.join(cfg.out, "seeds.md"), "w") as f:
        f.write(block)
    if cfg.readme:
        update_readme(cfg.readme, block)
    print(block)


if __name__ == "__main__":
    run_command(main, Config)
