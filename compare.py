"""Step 3 as taught today: every method from the same SFT model, at a matched budget, on the gold judge.

    python compare.py                          # after pipeline.py: runs/compare/, docs/results/methods.*, the plot
    python compare.py --methods=ppo,grpo,dpo   # a subset (the table keeps the others' rows from earlier runs)
    python compare.py --seeds=1,2,3            # medians over seeds of the methods (same SFT and reward model)
    python compare.py --seeds=1,2,3 --sft=runs/seeds/seed_{seed}/sft/ckpt.pt \\
        --reward_model=runs/seeds/seed_{seed}/reward/ckpt.pt      # end-to-end seeds: seeds.py's runs

The budget is a number of sampled answers (--budget, default 6,400 = ppo.py's 100 iterations x 64):

    ppo        budget / 64 iterations of 64 prompts, plain PPO at GRPO's update schedule: without ppo.py's
               default pretraining mix (PPO-ptx: no other method has one) and with 4 epochs, not ppo.py's 2
               (chosen with PPO-ptx on); ppo.py's defaults otherwise
    rloo       budget / 64 iterations of 16 prompts x k = 4; one update per batch (ppo_epochs 1, minibatch
               64: plain REINFORCE with the leave-one-out baseline, Ahmadian et al. 2024) at lr 1e-4
    grpo       budget / 64 iterations of 16 prompts x 4, PPO's update schedule here (4 epochs of minibatches of 16)
    drgrpo     the same with Dr. GRPO's advantage and loss
    rejection  one round of budget / 8 prompts x n = 8, then sft.py on the winners
    dpo        samples nothing: it trains on the comparisons the reward model trained on (K answers to each
               labelling prompt; the online methods paid for the same answers through their reward model)
    best_of_n  no training: n = 1 .. best_of SFT answers to every test prompt, the reward model picks one
               (its cost is paid at inference: n answers and n reward-model calls per question); the table
               shows n = 8, rejection sampling's n, the plot every n
The online methods all use the same reward model and KL coefficient (0.15, in the reward as ppo.py);
every other setting is the method's default (docs/EXPERIMENTS.md says which are untuned). Each method's
final evaluation is evaluate.compare_to_reference on the test prompts with the same seed, so the SFT
numbers are one draw shared by every row. A method whose summary.json exists is reused (--force=true
reruns it). Writes methods.json and methods.md under --results, the plot of gold against KL to SFT
(each method's final point, best-of-n's curve, and the online methods' training curves), and the
README's block between its markers. Every run's options and input files (each method's Config, the SFT
and reward model checkpoints of every seed, the prompt files, DPO's comparisons, the README's block) are
checked before the first run writes anything; a bad one is one line and exit code 2.
"""
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Annotated

from common import (at_least, check_config, folder, one_process, option_error, print_config, pyplot, read_jsonl,
                    run_command, write_json)

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = os.path.join(HERE, "runs")
BEGIN, END = "<!-- methods:begin (written by compare.py) -->", "<!-- methods:end -->"
# name: (script, its options beyond the shared ones and the budget's); the order of the table
METHODS = {"ppo": ("ppo", {"ptx_coef": 0.0, "ppo_epochs": 4}),  # no pretraining mix, GRPO's 4 epochs: see above
           "rloo": ("grpo", {"estimator": "rloo", "ppo_epochs": 1, "minibatch": 64, "lr": 1e-4}),
           "grpo": ("grpo", {"estimator": "grpo"}),
           "drgrpo": ("grpo", {"estimator": "drgrpo"}),
           "rejection": ("rejection", {}),
           "dpo": ("dpo", {}),
           "best_of_n": (None, {})}
LABELS = {"ppo": "PPO (critic, GAE)", "rloo": "RLOO (k=4, REINFORCE)", "grpo": "GRPO (k=4)", "drgrpo": "Dr. GRPO (k=4)",
          "rejection": "rejection sampling (n=8, 1 round)", "dpo": "DPO (offline, RM's comparisons)",
          "best_of_n": "best-of-n by the RM (no training)"}


@dataclass
class Config:
    sft: str = os.path.join(RUNS, "sft", "ckpt.pt")  # every method's start and reference ("{seed}" = the seed)
    reward_model: str = os.path.join(RUNS, "reward", "ckpt.pt")  # the online methods' reward ("{seed}" = the seed)
    comparisons: str = ""  # DPO's comparisons ("" = comparisons.jsonl beside the reward model)
    prompts: str = os.path.join(HERE, "data", "world", "prompts_ppo.jsonl")  # training prompts of the online methods
    eval_prompts: str = os.path.join(HERE, "data", "world", "prompts_test.jsonl")  # the reported evaluation
    out_dir: Annotated[str, folder()] = os.path.join(RUNS, "compare")  # seed_<s>/<method>/ per run
    results: Annotated[str, folder()] = os.path.join(HERE, "docs", "results")  # methods.json and methods.md ("" = none)
    plot: str = os.path.join(HERE, "docs", "img", "methods_gold_vs_kl.png")  # gold vs KL to SFT ("" = none)
    readme: str = os.path.join(HERE, "README.md")  # its methods block is rewritten ("" = leave README alone)
    methods: str = ",".join(METHODS)  # comma-separated subset of the methods
    seeds: str = "1337"  # comma-separated seeds (each method's --seed)
    budget: Annotated[int, at_least(64)] = 6400  # sampled answers per method that samples (a multiple of 64)
    best_of: Annotated[int, at_least(1)] = 16  # best-of-n up to this n (a power of 2)
    max_new_tokens: Annotated[int, at_least(1)] = 48  # longest answer, in tokens, for every method
    eval_samples: Annotated[int, at_least(1)] = 8  # sampled answers per test prompt in each final evaluation
    force: bool = False  # rerun methods whose summary.json exists
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    threads: Annotated[int, at_least(0)] = 0  # torch CPU threads (0 = torch's default)


def check(cfg, world):
    """The rules that tie options together (each option's own range is declared in Config). Returns the
    methods and the seeds."""
    check_config(cfg, world)
    names = [m.strip() for m in cfg.methods.split(",") if m.strip()]
    if not names or any(m not in METHODS for m in names):
        raise option_error("methods", cfg.methods, f"must list some of {', '.join(METHODS)}")
    seeds = [s.strip() for s in cfg.seeds.split(",") if s.strip()]
    if not seeds or not all(s.lstrip("-").isdigit() for s in seeds):
        raise option_error("seeds", cfg.seeds, "must be one or more comma-separated integers")
    if cfg.budget % 64:
        raise option_error("budget", cfg.budget, "must be a multiple of 64 (ppo.py's rollout of 64 prompts)")
    if cfg.best_of & (cfg.best_of - 1):
        raise option_error("best_of", cfg.best_of, "must be a power of 2")
    return names, [int(s) for s in seeds]


def read_inputs(cfg, names, seeds):
    """Every run's options (each method's Config against its rules) and every input file, read before
    the first run writes anything: a bad one would otherwise stop the comparison after hours of runs."""
    from data.formats import read_comparisons, read_prompts
    from engine import load_model, load_reward_model
    from tokenizer import get_tokenizer
    files = {cfg.prompts: read_prompts, cfg.eval_prompts: read_prompts}
    for seed in seeds:
        for name in (n for n in names if n != "best_of_n"):
            module, mcfg = method_config(name, cfg, seed, os.path.join(cfg.out_dir, f"seed_{seed}", name))
            getattr(module, "check", check_config)(mcfg, 1)  # dpo.py has no cross-field rule
            if name == "dpo":
                files[mcfg.comparisons] = read_comparisons
        ckpt = load_model(cfg.sft.format(seed=seed))[1]
        load_reward_model(cfg.reward_model.format(seed=seed), tok=get_tokenizer(ckpt.get("tokenizer", "embedded")))
    for path, read in files.items():
        read(path)
    if cfg.readme:
        readme_parts(cfg.readme)


def method_config(name, cfg, seed, out):
    """(module, Config) of one method's run: the shared options, the budget's, the method's own."""
    import importlib
    script, own = METHODS[name]
    module = importlib.import_module(script)
    sft, rm = cfg.sft.format(seed=seed), cfg.reward_model.format(seed=seed)
    shared = {"sft": sft, "eval_prompts": cfg.eval_prompts, "out_dir": out, "seed": seed, "device": cfg.device,
              "threads": cfg.threads, "max_new_tokens": cfg.max_new_tokens, "eval_samples": cfg.eval_samples}
    if script == "dpo":
        shared |= {"reward_model": rm, "comparisons": cfg.comparisons.format(seed=seed) or
                   os.path.join(os.path.dirname(rm), "comparisons.jsonl")}
    else:
        shared |= {"reward_model": rm, "prompts": cfg.prompts}
    if script == "ppo":
        shared["iterations"] = cfg.budget // module.Config.rollout_batch  # one answer per prompt
    if script == "grpo":
        shared["iterations"] = cfg.budget // (module.Config.prompts_per_iter * module.Config.k)
    if script == "rejection":
        shared["prompts_per_round"] = cfg.budget // module.Config.n
    return module, module.Config(**shared | own)


def run_best_of_n(cfg, seed, out):
    """Best-of-n on the test prompts with the SFT model and the reward model: evaluate.evaluate_best_of_n."""
    from data.formats import read_prompts
    from engine import load_model, load_reward_model
    from evaluate import evaluate_best_of_n
    from tokenizer import get_tokenizer
    from common import pick_device
    device = pick_device(cfg.device).device
    policy, ckpt = load_model(cfg.sft.format(seed=seed), device)
    rm = load_reward_model(cfg.reward_model.format(seed=seed), device)[0]
    rows = [r for r in read_prompts(cfg.eval_prompts) if r.get("world")]
    t0 = time.time()
    bon = evaluate_best_of_n(policy, rm, get_tokenizer(ckpt.get("tokenizer", "embedded")), rows, cfg.best_of, 1.0,
                             cfg.max_new_tokens, seed, device)
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, "summary.json"), {"method": "best_of_n", "best_of_n": bon, "n_prompts": len(rows),
                                                   "train_seconds": 0.0, "eval_seconds": round(time.time() - t0, 1)})


def run(cfg, name, seed):
    """Run one method for one seed (unless its summary exists); returns its wall time or None if reused."""
    out = os.path.join(cfg.out_dir, f"seed_{seed}", name)
    if os.path.exists(os.path.join(out, "summary.json")) and not cfg.force:
        print(f"== {name}, seed {seed}: done already ({out})")
        return None
    print(f"\n== {name}, seed {seed} " + "=" * 50)
    t0 = time.time()
    if name == "best_of_n":
        run_best_of_n(cfg, seed, out)
    else:
        module, mcfg = method_config(name, cfg, seed, out)
        module.train(mcfg)
    return time.time() - t0


def table_row(name, s, cfg):
    """The table's numbers of one method's summary.json."""
    if name == "best_of_n":  # n = rejection sampling's n: the same selection, paid at inference (the plot has every n)
        import rejection
        b = [b for b in s["best_of_n"] if b["n"] <= rejection.Config.n][-1]
        return {"pass": b["pass_rate"], "gold": b["gold_mean"], "kl": b["kl"], "n": b["n"],
                "answers": f"{b['n']} per question", "rm_calls": f"{b['n']} per question", "train_seconds": 0.0}
    row = {"pass": s["policy_pass_rate"], "pass_greedy": s["policy_pass_rate_greedy"], "gold": s["policy_gold_mean"],
           "win": s["win_rate_vs_sft"], "win_ci95": s["win_rate_ci95"], "gain": s["pass_gain"]["mean"],
           "gain_ci95": s["pass_gain"]["ci95"], "kl": s["kl_to_ref"], "train_seconds": s["train_seconds"]}
    if name == "ppo":  # ppo.py's summary has no budget keys: one answer and one RM call per rollout row
        import ppo
        answers = s["iterations"] * ppo.Config.rollout_batch
        row |= {"answers": answers, "rm_calls": answers}
    else:
        row |= {"answers": s["answers_generated"], "rm_calls": s["rm_calls"]}
    return row


def collect(cfg, names, seeds, times):
    """{method: {"per_seed": [row...], "median": {...}}} and SFT's row, from the runs' summary.json files."""
    out, sft = {}, []
    for name in names:
        rows = []
        for seed in seeds:
            path = os.path.join(cfg.out_dir, f"seed_{seed}", name, "summary.json")
            if os.path.exists(path):
                s = json.load(open(path))
                rows.append({"seed": seed, "wall_seconds": times.get(f"{seed}/{name}")} | table_row(name, s, cfg))
                if "sft_pass_rate" in s:
                    sft.append({"seed": seed, "pass": s["sft_pass_rate"], "pass_greedy": s["sft_pass_rate_greedy"],
                                "gold": s["sft_gold_mean"], "n_prompts": s["n_prompts"],
                                "samples_per_prompt": s["samples_per_prompt"]})
        if rows:
            out[name] = {"per_seed": rows, "median": {k: statistics.median(r[k] for r in rows) for k in rows[0]
                                                      if all(isinstance(r.get(k), (int, float)) for r in rows)}}
    return out, sft


def fmt(x, digits=3):
    return "" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def markdown(cfg, res, sft, seeds, machine):
    n = len(seeds)
    s0 = sft[0] if sft else {}
    lines = [f"Measured by `python compare.py{''.join(' ' + a for a in sys.argv[1:])}` on {machine}: "
             f"{'the median over ' + str(n) + ' seeds (' + ', '.join(map(str, seeds)) + ')' if n > 1 else 'one seed (' + str(seeds[0]) + ')'}; "
             f"SFT `{os.path.relpath(cfg.sft, HERE)}`, reward model `{os.path.relpath(cfg.reward_model, HERE)}`; "
             f"evaluation on `{os.path.relpath(cfg.eval_prompts, HERE)}` ({s0.get('n_prompts')} prompts, "
             f"{s0.get('samples_per_prompt')} sampled answers each at temperature 1, plus one greedy). Budget: "
             f"{cfg.budget:,} sampled answers per method that samples. [a, b] = 95% CI by bootstrap over prompts"
             f"{' (of the first seed)' if n > 1 else ''}.", "",
             "| method | pass rate (sampled) | pass rate (greedy) | gold mean | win rate vs SFT | pass gain vs SFT | KL to SFT (nats) | train time (s) | answers sampled | RM calls |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    if sft:
        med = lambda k: statistics.median(r[k] for r in sft)
        lines.append(f"| SFT (the start) | {fmt(med('pass'))} | {fmt(med('pass_greedy'))} | {fmt(med('gold'))} | 0.5 | 0 | 0 | | | |")
    for name, r in res.items():
        m, first = r["median"], r["per_seed"][0]
        ci = lambda k, f=".3f": f" [{first[k][0]:{f}}, {first[k][1]:{f}}]" if first.get(k) else ""
        sign = lambda x: "" if x is None else f"{x:+.3f}"
        count = lambda x: f"{x:,}" if isinstance(x, int) else x
        label = LABELS[name] + (f", n={first['n']}" if name == "best_of_n" else "")
        lines.append(f"| {label} | {fmt(m.get('pass'))} | {fmt(m.get('pass_greedy'))} | {fmt(m.get('gold'))} | "
                     f"{fmt(m.get('win'))}{ci('win_ci95')} | {sign(m.get('gain'))}{ci('gain_ci95', '+.3f')} | {fmt(m.get('kl'), 2)} | "
                     f"{fmt(m.get('train_seconds'), 0)} | {count(first['answers'])} | {count(first['rm_calls'])} |")
    return "\n".join(lines) + "\n"


def plot(cfg, res, sft, seeds, path):
    """Gold mean against KL to SFT: left, each method's final point on the test prompts and best-of-n's
    curve; right, the online methods' training rollouts (training prompts) per iteration."""
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    if sft:
        ax.plot([0.0] * len(sft), [r["gold"] for r in sft], "k*", ms=12, label="SFT")
    for i, (name, r) in enumerate(res.items()):
        color = f"C{i}"
        if name == "best_of_n":
            for seed in seeds:
                p = os.path.join(cfg.out_dir, f"seed_{seed}", name, "summary.json")
                if os.path.exists(p):
                    bon = json.load(open(p))["best_of_n"]
                    ax.plot([b["kl"] for b in bon], [b["gold_mean"] for b in bon], "o--", color=color, alpha=0.7,
                            label=LABELS[name] if seed == seeds[0] else None)
                    for b in bon:
                        ax.annotate(f"n={b['n']}", (b["kl"], b["gold_mean"]), fontsize=7, color=color)
            continue
        ax.plot([x["kl"] for x in r["per_seed"]], [x["gold"] for x in r["per_seed"]], "o", ms=9, color=color,
                label=LABELS[name])
        for seed in seeds if METHODS[name][0] in ("ppo", "grpo") else []:
            p = os.path.join(cfg.out_dir, f"seed_{seed}", name, "metrics.jsonl")
            rows = [m for m in read_jsonl(p) if "gold" in m] if os.path.exists(p) else []
            smooth = lambda k: [statistics.mean(x[k] for x in rows[max(0, j - 9):j + 1]) for j in range(len(rows))]
            if rows:
                ax2.plot(smooth("kl_to_ref"), smooth("gold"), "-", color=color, alpha=0.8,
                         label=LABELS[name] if seed == seeds[0] else None)
                ax2.plot(smooth("kl_to_ref")[-1:], smooth("gold")[-1:], "o", color=color)
    ax.set_xlabel("KL(policy || SFT), nats per answer (best-of-n: log n - (n-1)/n)")
    ax.set_ylabel("gold mean on the evaluation prompts (sampled)")
    ax.set_title("final policies, evaluation prompts")
    ax2.set_xlabel("KL to SFT of the rollout answers (nats; means of 10 iterations)")
    ax2.set_ylabel("gold mean of the rollout answers")
    ax2.set_title("online methods while training (training prompts)")
    for a in (ax, ax2):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def readme_parts(path):
    """(the text before the methods block, the text after it) of the README, or a one-line error."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: --readme={path} does not exist (\"\" leaves the README alone)")
    text = open(path).read()
    if BEGIN not in text or END not in text.split(BEGIN, 1)[-1]:
        raise SystemExit(f"error: --readme={path} has no methods block ({BEGIN} ... {END}) to rewrite")
    head, rest = text.split(BEGIN, 1)
    return head, rest.split(END, 1)[1]


def update_readme(path, block):
    head, tail = readme_parts(path)
    with open(path, "w") as f:
        f.write(head + BEGIN + "\n" + block + END + tail)


def main(cfg):
    names, seeds = check(cfg, one_process("compare.py"))
    read_inputs(cfg, names, seeds)
    print_config(cfg)
    os.makedirs(cfg.out_dir, exist_ok=True)
    times_path = os.path.join(cfg.out_dir, "wall_seconds.json")
    times = json.load(open(times_path)) if os.path.exists(times_path) else {}
    for seed in seeds:
        for name in names:
            seconds = run(cfg, name, seed)
            if seconds is not None:
                times[f"{seed}/{name}"] = round(seconds, 1)
                write_json(times_path, times)
    res, sft = collect(cfg, list(METHODS), seeds, times)  # every method with a summary, in the table's order
    import torch
    machine = (f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, "
               f"{cfg.threads or torch.get_num_threads()} threads")
    block = markdown(cfg, res, sft, seeds, machine)
    total = sum(v for k, v in times.items() if int(k.split("/")[0]) in seeds)
    block += f"\nWall time of these runs, evaluations included: {total / 60:.1f} minutes.\n"
    if cfg.results:
        os.makedirs(cfg.results, exist_ok=True)
        rel = {k: os.path.relpath(v, HERE) if isinstance(v, str) and os.path.isabs(v) else v for k, v in vars(cfg).items()}
        write_json(os.path.join(cfg.results, "methods.json"), {"machine": machine, "config": rel, "seeds": seeds,
                                                               "sft": sft, "methods": res, "wall_seconds": times})
        with open(os.path.join(cfg.results, "methods.md"), "w") as f:
            f.write(block)
    if cfg.plot:
        plot(cfg, res, sft, seeds, cfg.plot)
    if cfg.readme:
        update_readme(cfg.readme, block + (f"\n![gold vs KL]({os.path.relpath(cfg.plot, os.path.dirname(cfg.readme))})\n"
                                           if cfg.plot else ""))
    print(block)
    return res


if __name__ == "__main__":
    run_command(main, Config)
