"""The whole InstructGPT pipeline on the embedded world, then a report.

    python pipeline.py                       # every stage, then runs/report.md (README: how long)
    python pipeline.py --force=true          # redo every stage
    python pipeline.py --from_stage=reward   # redo reward, ppo and the report; keep the rest

Stages, each the same code as its script (and re-runnable alone from its checkpoint):
    world     python -m data.world    prompts, demonstrations, corpus, labelers, tokenizer
    pretrain  python pretrain.py      the base model
    sft       python sft.py           step 1: supervised fine-tuning on demonstrations
    reward    python reward.py        step 2: sample K answers, simulated labelers rank, train the RM
    ppo       python ppo.py           step 3: PPO against the RM with a KL penalty to SFT
    oracle    python ppo.py --reward=gold   the same loop with the gold judge as reward (the ceiling)
A stage whose summary.json exists is skipped unless --force or --from_stage says otherwise.
The report (runs/report.md) is built from the stages' summary.json files only: every number in it
was measured by this run.
"""
import json
import os
import time
from dataclasses import dataclass

from common import print_config, pyplot, run_command, write_json

HERE = os.path.dirname(os.path.abspath(__file__))
STAGES = ["world", "pretrain", "sft", "reward", "ppo", "oracle"]


@dataclass
class Config:
    runs: str = os.path.join(HERE, "runs")  # one sub-folder per stage, and report.md
    force: bool = False  # redo every stage even if its summary exists
    from_stage: str = ""  # redo this stage and all later ones (world|pretrain|sft|reward|ppo|oracle)
    oracle: bool = True  # also run PPO with the gold judge as reward (the ceiling for PPO with the RM)
    threads: int = 0  # torch CPU threads (0 = torch's default)
    seed: int = 1337  # every stage's seed (the world keeps its own, data/world.py)


def stage_dir(cfg, name):
    return os.path.join(HERE, "data", "world") if name == "world" else os.path.join(cfg.runs, name)


def run_stage(cfg, name):
    import torch
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = stage_dir(cfg, name)
    if name == "world":
        from data.world import Config as C, build_world
        build_world(C())
        return
    if name == "pretrain":
        import pretrain as m
        m.train(m.Config(out_dir=out, seed=cfg.seed))
    elif name == "sft":
        import sft as m
        m.train(m.Config(init_from=os.path.join(stage_dir(cfg, "pretrain"), "ckpt.pt"), out_dir=out, seed=cfg.seed))
    elif name == "reward":
        import reward as m
        m.train(m.Config(init_from=os.path.join(stage_dir(cfg, "sft"), "ckpt.pt"), out_dir=out, seed=cfg.seed))
    elif name in ("ppo", "oracle"):
        import ppo as m
        m.train(m.Config(sft=os.path.join(stage_dir(cfg, "sft"), "ckpt.pt"), out_dir=out, seed=cfg.seed,
                         reward_model=os.path.join(stage_dir(cfg, "reward"), "ckpt.pt"),
                         pretrain_tokens=os.path.join(stage_dir(cfg, "pretrain"), "tokens"),
                         reward="gold" if name == "oracle" else "rm"))


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


def write_report(cfg, times):
    world, pre, sft, rm, ppo, orc = (load(cfg, s) for s in STAGES)
    bon = {r["n"]: r for r in rm.get("best_of_n", [])}
    n_max = max(bon) if bon else None
    lines = ["# RLHF from scratch: report", "",
             "Every number below was measured by `python pipeline.py` on this machine; gold = the embedded "
             "world's programmatic judge (never seen by any model), sampled = 8 answers per held-out prompt "
             "at temperature 1, greedy = one greedy answer per prompt. Held-out prompts use argument "
             "combinations never seen in training.", "",
             "| policy | gold mean (sampled) | pass rate (sampled) | gold mean (greedy) | pass rate (greedy) | win rate vs SFT (sampled) |",
             "|---|---|---|---|---|---|",
             f"| base model (pretrained only) | {fmt(sft.get('base_sampled_gold_mean'))} | {fmt(sft.get('base_sampled_pass_rate'))} | "
             f"{fmt(sft.get('base_greedy_gold_mean'))} | {fmt(sft.get('base_greedy_pass_rate'))} | |",
             f"| SFT | {fmt(ppo.get('sft_gold_mean'))} | {fmt(ppo.get('sft_pass_rate'))} | {fmt(ppo.get('sft_gold_mean_greedy'))} | "
             f"{fmt(ppo.get('sft_pass_rate_greedy'))} | 0.5 |"]
    if n_max:
        lines.append(f"| best-of-{n_max} SFT samples, chosen by the RM | {fmt(bon[n_max]['gold_mean'])} | "
                     f"{fmt(bon[n_max]['pass_rate'])} | | | |")
    for name, s in (("PPO (reward model)", ppo), ("PPO oracle (gold judge as reward)", orc)):
        if s:
            ci = s.get("win_rate_ci95", [None, None])
            lines.append(f"| {name} | {fmt(s.get('ppo_gold_mean'))} | {fmt(s.get('ppo_pass_rate'))} | "
                         f"{fmt(s.get('ppo_gold_mean_greedy'))} | {fmt(s.get('ppo_pass_rate_greedy'))} | "
                         f"{fmt(s.get('win_rate_vs_sft'))} (95% CI {fmt(ci[0])}-{fmt(ci[1])}) |")
    lines += ["", "| quantity | value |", "|---|---|"]
    rows = [("KL(PPO || SFT) per answer, nats", ppo.get("kl_to_ref")),
            ("KL(PPO oracle || SFT) per answer, nats", orc.get("kl_to_ref")),
            ("labelers: agreement between two labelers (SFT samples, double-labelled prompts)",
             rm.get("labeler_agreement")),
            ("labelers: expected agreement on the held-out pairs", rm.get("heldout_expected_labeler_agreement")),
            ("best possible accuracy vs labelers on the held-out pairs", rm.get("heldout_bayes_accuracy")),
            ("labels agree with the gold judge", rm.get("label_vs_gold_accuracy")),
            ("reward model: held-out accuracy vs labelers", rm.get("heldout_acc_vs_labels")),
            ("reward model: held-out accuracy vs gold", rm.get("heldout_acc_vs_gold")),
            ("reward model: correlation of reward with answer length", rm.get("heldout_length_corr")),
            ("comparisons (prompts, ranked pairs)", f"{rm.get('n_comparisons')} prompts, {rm.get('n_pairs')} pairs"),
            ("pretraining: val loss (unigram entropy)", f"{fmt(pre.get('val_loss'))} ({fmt(pre.get('unigram_entropy'))})"),
            ("alignment tax: pretraining val loss SFT -> PPO",
             f"{fmt(ppo.get('pretrain_val_loss_sft'))} -> {fmt(ppo.get('pretrain_val_loss_ppo'))}")]
    if ppo and orc and ppo.get("sft_gold_mean") is not None:
        gain, gain_o = ppo["ppo_gold_mean"] - ppo["sft_gold_mean"], orc["ppo_gold_mean"] - orc["sft_gold_mean"]
        rows.append(("fraction of the oracle's gold gain recovered by PPO with the RM",
                     gain / gain_o if gain_o > 0 else None))
    lines += [f"| {k} | {fmt(v)} |" for k, v in rows]
    lines += ["", "Wall time per stage (seconds): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()), ""]
    if bon:
        plot_best_of_n(rm["best_of_n"], os.path.join(cfg.runs, "best_of_n.png"))
        lines += ["## Best-of-n with the reward model", "", "| n | KL | gold mean | pass rate | by gold: pass rate |",
                  "|---|---|---|---|---|"]
        lines += [f"| {r['n']} | {r['kl']:.2f} | {r['gold_mean']:.3f} | {r['pass_rate']:.3f} | {r['oracle_pass_rate']:.3f} |"
                  for r in rm["best_of_n"]]
        lines += ["", "![best of n](best_of_n.png)", ""]
    lines += ["## Plots", ""]
    for stage, png in (("pretrain", "loss.png"), ("sft", "loss.png"), ("reward", "training.png"),
                       ("reward", "calibration.png"), ("ppo", "training.png"), ("oracle", "training.png")):
        if os.path.exists(os.path.join(cfg.runs, stage, png)):
            lines.append(f"![{stage} {png}]({stage}/{png})")
    if ppo.get("examples"):
        lines += ["", "## Answers side by side (held-out prompts, first sample of each)", "",
                  "| prompt | SFT | PPO |", "|---|---|---|"]
        esc = lambda t: t.replace("|", "\\|").replace("\n", " ")
        lines += [f"| {esc(e['prompt'])} | {esc(e['sft'])} | {esc(e['ppo'])} |" for e in ppo["examples"]]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(cfg.runs, "report.md"), "w") as f:
        f.write(text)
    return text


def main(cfg):
    print_config(cfg)
    if cfg.from_stage and cfg.from_stage not in STAGES:
        raise SystemExit(f"error: --from_stage={cfg.from_stage!r}: expected one of {', '.join(STAGES)}")
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


if __name__ == "__main__":
    run_command(main, Config)
