"""The whole InstructGPT pipeline on the embedded world, then a report.

    python pipeline.py                       # every stage, then runs/report.md (README: how long)
    python pipeline.py --force=true          # redo every stage
    python pipeline.py --from_stage=reward   # redo reward, ppo and the report; keep the rest
    python pipeline.py --split=dev --runs=runs/dev   # a tuning run: every evaluation on the dev prompts

Stages, each the same code as its script (and re-runnable alone from its checkpoint):
    world     python -m data.world    prompts, demonstrations, corpus, labelers, tokenizer
    pretrain  python pretrain.py      the base model
    sft       python sft.py           step 1: supervised fine-tuning on demonstrations
    reward    python reward.py        step 2: sample K answers, simulated labelers rank, train the RM
    ppo       python ppo.py           step 3: PPO against the RM with a KL penalty to SFT
    oracle    python ppo.py --reward=gold   the same loop with the gold judge as reward (the ceiling),
                                            with hyper-parameters of its own (chosen on dev)
A stage whose summary.json exists is skipped unless --force or --from_stage says otherwise.
Every evaluation reads the test prompts (held-out content, data/README.md) unless --split=dev: tuning
runs read dev, the reported numbers test. The report (runs/report.md) and runs/results.json (the
headline numbers that seeds.py aggregates) are built from the stages' summary.json files only: every
number in them was measured by this run.
"""
import json
import os
import time
from dataclasses import dataclass
from typing import Annotated

from common import at_least, check_config, one_of, print_config, pyplot, run_command, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD = os.path.join(HERE, "data", "world")
STAGES = ["world", "pretrain", "sft", "reward", "ppo", "oracle"]


@dataclass
class Config:
    runs: str = os.path.join(HERE, "runs")  # one sub-folder per stage, report.md and results.json
    force: bool = False  # redo every stage even if its summary exists
    from_stage: Annotated[str, one_of("", *STAGES)] = ""  # redo this stage and all later ones (world ... oracle)
    oracle: bool = True  # also run PPO with the gold judge as reward (the ceiling for PPO with the RM)
    oracle_beta: float = 0.15  # the oracle's KL coefficient (its own, chosen on dev: docs/EXPERIMENTS.md)
    oracle_iterations: Annotated[int, at_least(1)] = 100  # the oracle's iterations (its own, chosen on dev)
    split: Annotated[str, one_of("test", "dev")] = "test"  # test: the reported numbers | dev: a tuning run
    threads: Annotated[int, at_least(0)] = 0  # torch CPU threads (0 = torch's default)
    seed: int = 1337  # every stage's seed (the world keeps its own, data/world.py)


def stage_dir(cfg, name):
    return WORLD if name == "world" else os.path.join(cfg.runs, name)


def run_stage(cfg, name):
    import torch
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out, ckpt = stage_dir(cfg, name), lambda stage: os.path.join(stage_dir(cfg, stage), "ckpt.pt")
    evals = os.path.join(WORLD, f"prompts_{cfg.split}.jsonl")
    if name == "world":
        from data.world import Config as C, build_world
        build_world(C())
    elif name == "pretrain":
        import pretrain as m
        m.train(m.Config(out_dir=out, seed=cfg.seed))
    elif name == "sft":
        import sft as m
        m.train(m.Config(init_from=ckpt("pretrain"), prompts=evals, out_dir=out, seed=cfg.seed))
    elif name == "reward":
        import reward as m
        m.train(m.Config(init_from=ckpt("sft"), eval_prompts=evals, out_dir=out, seed=cfg.seed))
    else:
        import ppo as m
        own = {"reward": "gold", "beta": cfg.oracle_beta, "iterations": cfg.oracle_iterations} if name == "oracle" else {}
        m.train(m.Config(sft=ckpt("sft"), reward_model=ckpt("reward"), eval_prompts=evals, out_dir=out, seed=cfg.seed,
                         pretrain_tokens=os.path.join(stage_dir(cfg, "pretrain"), "tokens"), **own))


def done(cfg, name):
    path = os.path.join(stage_dir(cfg, name), "stats.json" if name == "world" else "summary.json")
    return os.path.exists(path)


def load(cfg, name):
    path = os.path.join(stage_dir(cfg, name), "stats.json" if name == "world" else "summary.json")
    return json.load(open(path)) if os.path.exists(path) else {}


def plot_best_of_n(bon, path):
    plt = pyplot()
    d = [r["kl"] ** 0.5 for r in bon]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    ax[0].plot(d, [r["gold_mean"] for r in bon], "o-", label="best-of-n by RM: gold")
    ax[0].plot(d, [r["oracle_gold_mean"] for r in bon], "s--", label="best-of-n by gold (ceiling)")
    ax[0].set_xlabel("sqrt(KL)  (KL = log n - (n-1)/n)")
    ax[0].set_ylabel("gold mean")
    ax[0].legend(fontsize=8)
    ax[1].plot(d, [r["proxy_reward"] for r in bon], "o-", color="C2")
    ax[1].set_xlabel("sqrt(KL)")
    ax[1].set_ylabel("RM reward of the chosen answer")
    for r, x in zip(bon, d):
        ax[0].annotate(f"n={r['n']}", (x, r["gold_mean"]), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def fmt(x, digits=3):
    return "n/a" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def ci(pair):
    return "" if not pair else f" [{pair[0]:.3f}, {pair[1]:.3f}]"


def results(cfg, times):
    """The headline numbers of this run, flat, for the report and for seeds.py."""
    pre, sft, rm, ppo, orc = (load(cfg, s) for s in STAGES[1:])
    bon = {r["n"]: r for r in rm.get("best_of_n", [])}
    out = {"seed": cfg.seed, "split": cfg.split, "n_prompts": ppo.get("n_prompts"),
           "samples_per_prompt": ppo.get("samples_per_prompt"),
           "base_pass": sft.get("base_sampled_pass_rate"), "base_pass_greedy": sft.get("base_greedy_pass_rate"),
           "sft_pass": ppo.get("sft_pass_rate"), "sft_pass_ci95": ppo.get("sft_pass_rate_ci95"),
           "sft_pass_greedy": ppo.get("sft_pass_rate_greedy"), "sft_gold": ppo.get("sft_gold_mean")}
    for name, s in (("ppo", ppo), ("oracle", orc)):
        out |= {f"{name}_pass": s.get("policy_pass_rate"), f"{name}_pass_ci95": s.get("policy_pass_rate_ci95"),
                f"{name}_pass_greedy": s.get("policy_pass_rate_greedy"), f"{name}_gold": s.get("policy_gold_mean"),
                f"{name}_gain": (s.get("pass_gain") or {}).get("mean"), f"{name}_gain_ci95": (s.get("pass_gain") or {}).get("ci95"),
                f"{name}_gain_greedy": (s.get("pass_gain_greedy") or {}).get("mean"),
                f"{name}_gain_greedy_ci95": (s.get("pass_gain_greedy") or {}).get("ci95"),
                f"{name}_win_rate": s.get("win_rate_vs_sft"), f"{name}_win_rate_ci95": s.get("win_rate_ci95"),
                f"{name}_kl": s.get("kl_to_ref")}
    if ppo.get("policy_gold_mean") is not None and orc.get("policy_gold_mean") is not None:
        g, g_o = ppo["policy_gold_mean"] - ppo["sft_gold_mean"], orc["policy_gold_mean"] - orc["sft_gold_mean"]
        out["oracle_share"] = g / g_o if g_o > 0 else None
    if bon:
        n = max(bon)
        out |= {"best_of": n, "bon_rm_pass": bon[n]["pass_rate"], "bon_gold_pass": bon[n]["oracle_pass_rate"]}
    out |= {"rm_acc_labels": rm.get("heldout_acc_vs_labels"), "rm_acc_gold": rm.get("heldout_acc_vs_gold"),
            "rm_expected_agreement": rm.get("heldout_expected_labeler_agreement"),
            "rm_bayes_accuracy": rm.get("heldout_bayes_accuracy"), "label_vs_gold": rm.get("label_vs_gold_accuracy"),
            "alignment_tax": ppo.get("alignment_tax"), "pretrain_val_loss": pre.get("val_loss"),
            "stage_seconds": {k: round(v) for k, v in times.items()}, "total_seconds": round(sum(times.values()))}
    return out


def time_rows(cfg, times):
    """(stage, seconds, what the stage's time went to) for the report's time table."""
    parts = {"sft": [("training", "train_seconds"), ("evaluation", "eval_seconds")],
             "reward": [("sampling + labelling", "collect_seconds"), ("training", "train_seconds"),
                        ("normalisation + evaluation", "eval_seconds")],
             "ppo": [("rollouts", "rollout_seconds"), ("updates", "update_seconds"), ("evaluation", "eval_seconds")]}
    parts["oracle"] = parts["ppo"]
    rows = []
    for stage, seconds in times.items():
        s = load(cfg, stage)
        rows.append((stage, seconds, ", ".join(f"{what} {s[k]:.0f}" for what, k in parts.get(stage, []) if k in s)))
    return rows


def write_report(cfg, times):
    sft, rm, ppo, orc = (load(cfg, s) for s in STAGES[2:])
    r = results(cfg, times)
    bon = {b["n"]: b for b in rm.get("best_of_n", [])}
    lines = ["# RLHF from scratch: report", "",
             f"Every number below was measured by `python pipeline.py --seed={cfg.seed}` on this machine, on the "
             f"**{cfg.split}** prompts ({r['n_prompts']} prompts whose content no training file holds, "
             f"{r['samples_per_prompt']} answers sampled per prompt at temperature 1, and one greedy answer). "
             "gold = the embedded world's programmatic judge, which no model ever sees. [a, b] = 95% confidence "
             "interval by bootstrap over prompts.", "",
             "| policy | pass rate (sampled) | pass rate (greedy) | gold mean (sampled) | win rate vs SFT (sampled) | KL to SFT (nats) |",
             "|---|---|---|---|---|---|",
             f"| base model (pretrained only) | {fmt(r['base_pass'])} | {fmt(r['base_pass_greedy'])} | "
             f"{fmt(sft.get('base_sampled_gold_mean'))} | | |",
             f"| SFT (step 1) | {fmt(r['sft_pass'])}{ci(r['sft_pass_ci95'])} | {fmt(r['sft_pass_greedy'])} | "
             f"{fmt(r['sft_gold'])} | 0.5 | 0 |"]
    if bon:
        n = max(bon)
        lines += [f"| best-of-{n} SFT samples chosen by the RM | {fmt(bon[n]['pass_rate'])} | | {fmt(bon[n]['gold_mean'])} | | "
                  f"{fmt(bon[n]['kl'], 2)} |",
                  f"| best-of-{n} chosen by gold (selection ceiling) | {fmt(bon[n]['oracle_pass_rate'])} | | "
                  f"{fmt(bon[n]['oracle_gold_mean'])} | | {fmt(bon[n]['kl'], 2)} |"]
    for name, key in (("**PPO against the reward model (step 3)**", "ppo"), ("PPO oracle: gold judge as reward", "oracle")):
        if r.get(f"{key}_pass") is not None:
            lines.append(f"| {name} | {fmt(r[f'{key}_pass'])}{ci(r[f'{key}_pass_ci95'])} | {fmt(r[f'{key}_pass_greedy'])} | "
                         f"{fmt(r[f'{key}_gold'])} | {fmt(r[f'{key}_win_rate'])}{ci(r[f'{key}_win_rate_ci95'])} | "
                         f"{fmt(r[f'{key}_kl'], 2)} |")
    lines += ["", "| gain over SFT (paired by prompt) | pass rate, sampled | pass rate, greedy |", "|---|---|---|"]
    for name, key in (("PPO", "ppo"), ("PPO oracle", "oracle")):
        if r.get(f"{key}_gain") is not None:
            lines.append(f"| {name} | {r[f'{key}_gain']:+.3f}{ci(r[f'{key}_gain_ci95'])} | "
                         f"{r[f'{key}_gain_greedy']:+.3f}{ci(r[f'{key}_gain_greedy_ci95'])} |")
    if r.get("oracle_share") is not None:
        lines += ["", f"PPO with the reward model recovers {fmt(r['oracle_share'])} of the oracle's gold gain."]
    fams = ppo.get("policy_by_family") or {}
    if fams:
        lines += ["", "## By family (sampled pass rate)", "", "| family | prompts | SFT | PPO | oracle |", "|---|---|---|---|---|"]
        for f, d in fams.items():
            lines.append(f"| {f} | {d['prompts']} | {fmt(ppo['sft_by_family'][f]['pass_rate'])} | {fmt(d['pass_rate'])} | "
                         f"{fmt((orc.get('policy_by_family') or {}).get(f, {}).get('pass_rate'))} |")
    lines += ["", "## Reward model", "", "| quantity | value |", "|---|---|"]
    lines += [f"| {k} | {fmt(v)} |" for k, v in [
        ("held-out accuracy vs labelers (per pair; held out by prompt)", r["rm_acc_labels"]),
        ("held-out accuracy vs gold", r["rm_acc_gold"]),
        ("two labelers agree, in expectation, on the same pairs", r["rm_expected_agreement"]),
        ("best possible accuracy vs one labeler's labels", r["rm_bayes_accuracy"]),
        ("a label agrees with gold", r["label_vs_gold"]),
        ("correlation of reward with answer length", rm.get("heldout_length_corr")),
        ("comparisons (prompts, ranked pairs)", f"{rm.get('n_comparisons')} prompts, {rm.get('n_pairs')} pairs"),
        ("alignment tax: pretraining val loss SFT -> PPO",
         f"{fmt(ppo.get('pretrain_val_loss_sft'))} -> {fmt(ppo.get('pretrain_val_loss_ppo'))}")]]
    lines += ["", "## Where the time goes", "", "| stage | seconds | of which |", "|---|---|---|"]
    lines += [f"| {stage} | {sec:.0f} | {parts} |" for stage, sec, parts in time_rows(cfg, times)]
    lines += [f"| **total** | **{sum(times.values()):.0f}** | |", ""]
    if bon:
        plot_best_of_n(rm["best_of_n"], os.path.join(cfg.runs, "best_of_n.png"))
        lines += ["## Best-of-n with the reward model", "", "| n | KL | gold mean | pass rate | by gold: pass rate |",
                  "|---|---|---|---|---|"]
        lines += [f"| {b['n']} | {b['kl']:.2f} | {b['gold_mean']:.3f} | {b['pass_rate']:.3f} | {b['oracle_pass_rate']:.3f} |"
                  for b in rm["best_of_n"]]
        lines += ["", "![best of n](best_of_n.png)", ""]
    lines += ["## Plots", ""]
    for stage, png in (("pretrain", "loss.png"), ("sft", "loss.png"), ("reward", "training.png"),
                       ("reward", "calibration.png"), ("ppo", "training.png"), ("oracle", "training.png")):
        if os.path.exists(os.path.join(cfg.runs, stage, png)):
            lines.append(f"![{stage} {png}]({stage}/{png})")
    if ppo.get("examples"):
        lines += ["", "## Answers side by side (first sample of each)", "", "| prompt | SFT | PPO |", "|---|---|---|"]
        esc = lambda t: t.replace("|", "\\|").replace("\n", " ")
        lines += [f"| {esc(e['prompt'])} | {esc(e['sft'])} | {esc(e['policy'])} |" for e in ppo["examples"]]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(cfg.runs, "report.md"), "w") as f:
        f.write(text)
    write_json(os.path.join(cfg.runs, "results.json"), r)
    return text


def main(cfg):
    check_config(cfg)
    print_config(cfg)
    os.makedirs(cfg.runs, exist_ok=True)
    times_path = os.path.join(cfg.runs, "stage_seconds.json")
    times = json.load(open(times_path)) if os.path.exists(times_path) else {}
    redo_from = STAGES.index(cfg.from_stage) if cfg.from_stage else len(STAGES)
    for i, name in enumerate(STAGES):
        if name == "oracle" and not cfg.oracle:
            continue
        if done(cfg, name) and not cfg.force and i < redo_from:
            print(f"== {name}: done already ({stage_dir(cfg, name)}), skipping")
            continue
        print(f"\n== {name} " + "=" * 60)
        t0 = time.time()
        run_stage(cfg, name)
        times[name] = time.time() - t0
        write_json(times_path, times)
    print("\n" + write_report(cfg, times))
    print(f"report written to {os.path.join(cfg.runs, 'report.md')}")
    return cfg


if __name__ == "__main__":
    run_command(main, Config)
