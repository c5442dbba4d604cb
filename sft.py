"""Step 1 of InstructGPT: supervised fine-tuning (SFT) on demonstrations.

    python sft.py                                    # embedded world
    python sft.py --init_from=out/pretrain/ckpt.pt --train_data=task/sft_train.jsonl --val_data=task/sft_val.jsonl \
        --prompts=task/heldout.jsonl --judge=task/judge.py:judge --out_dir=out/sft     # your own (docs/OWN_DATA.md)
    python sft.py --init_from=gpt2 --train_data=data/public/alpaca/sft.jsonl

Take the pretrained model and teach it the assistant format from (prompt, response) demonstrations:

    <|user|> {prompt}<|assistant|> {response}<|end|>

Implementation details:
1. The next-token loss counts the response tokens and the <|end|> token only; prompt and padding
   targets are -100 (Ouyang et al. 2022 train SFT on labeler demonstrations; masking the prompt is
   the standard choice). A demonstration marked "ended": false (a demonstrator that never stops)
   gets no <|end|>, so the model also learns that flaw, on purpose.
2. The loss is a token mean over the whole global batch: each rank sums its token losses and divides
   by the all-reduced token count, so under torchrun the gradient equals the single-process one.
   A batch whose targets are all masked contributes zero loss, never NaN.
3. Right-padded batches (causal attention never lets a real token see the padding that follows it),
   AdamW, warmup then cosine decay, gradient clipping, validation loss on held-out demonstrations,
   atomic checkpoints and `--resume` (the data order is a seeded permutation per epoch).
4. Evaluation on the held-out prompts: answers sampled at temperature 1 (8 per prompt) and greedy,
   scored by the gold judge (--judge: the embedded world's, or the user's own), next to the base model's.
   With the user's own --train_data, --val_data and --prompts left out are skipped with a note, never
   read from the embedded world (common.follow_data); so is the evaluation of rows no judge can read.
5. Inputs are checked before anything is written: a demonstration whose prompt fills the context is
   an error naming its file and line (it would train on nothing); one whose answer runs past the
   context is cut there, with a note counting them and naming their lines; a held-out prompt too long
   to answer within the context is dropped with a count. `--resume` continues exactly (the metrics
   row of a step is written before the checkpoint that covers it).
Simplifications: no sequence packing (answers are short; padding costs little here).
"""
import math
import os
import time
import types
from dataclasses import dataclass
from typing import Annotated

import torch
import torch.nn.functional as F

from common import (all_reduce_sum, at_least, below, check_config, config_dict, ddp_cleanup, ddp_setup, ddp_wrap,
                    folder, follow_data, load_state, lr_at, make_optimizer, open_run, per_rank, pick_device,
                    plot_metrics, rank0_first, resume_checkpoint, rng_state, run_command, save_checkpoint, set_lr,
                    set_rng_state, set_seed, write_json)
from data.formats import read_sft
from engine import load_policy, set_dropout
from evaluate import a_judge, evaluate_policy, judged_prompts
from tokenizer import get_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD = os.path.join(HERE, "data", "world")


@dataclass
class Config:
    init_from: str = os.path.join(HERE, "runs", "pretrain", "ckpt.pt")  # pretrain checkpoint, or gpt2 / HF folder
    tokenizer: str = ""  # "" = the one stored in the checkpoint (gpt2 for GPT-2 weights)
    train_data: str = os.path.join(WORLD, "sft_train.jsonl")  # demonstrations {"prompt", "response"}
    val_data: str = os.path.join(WORLD, "sft_val.jsonl")  # held-out demonstrations for the val loss ("" = none)
    prompts: str = os.path.join(WORLD, "prompts_dev.jsonl")  # held-out prompts for the gold evaluation ("" = skip)
    judge: Annotated[str, a_judge()] = "world"  # gold judge: world | package.module:function | file.py:function
    out_dir: Annotated[str, folder()] = os.path.join(HERE, "runs", "sft")  # checkpoint, metrics, summary, plot
    epochs: Annotated[int, at_least(1)] = 2  # passes over the demonstrations (chosen on dev: docs/EXPERIMENTS.md)
    batch_size: Annotated[int, at_least(1), per_rank()] = 32  # demonstrations per optimizer step (global)
    lr: Annotated[float, at_least(0)] = 1e-4  # peak learning rate (higher erases held-out knowledge: EXPERIMENTS.md)
    min_lr: Annotated[float, at_least(0)] = 1e-5  # cosine floor
    warmup_steps: Annotated[int, at_least(0)] = 50  # linear warmup
    weight_decay: Annotated[float, at_least(0)] = 0.0  # AdamW, on 2-D weights only
    grad_clip: Annotated[float, at_least(0)] = 1.0  # max global gradient norm (0 = off)
    dropout: Annotated[float, at_least(0), below(1)] = 0.0  # dropout during SFT (the model config's value is replaced)
    eval_interval: Annotated[int, at_least(1)] = 100  # steps between validation losses
    eval_samples: Annotated[int, at_least(1)] = 4  # sampled answers per held-out prompt for the gold evaluation
    eval_base: bool = True  # also evaluate the starting model, for the before/after table
    max_new_tokens: Annotated[int, at_least(1)] = 48  # longest sampled answer in the evaluation, in tokens
    seed: int = 1337  # seeds the data order and the evaluation samples
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16
    threads: Annotated[int, at_least(0)] = 0  # torch CPU threads (0 = torch's default)
    resume: bool = False  # continue from out_dir/ckpt.pt


def example_too_long(tok, row, block_size, cut=False):
    """Why a demonstration does not fit the context, or None (data/formats.py reports it with its line).
    cut=False: its prompt leaves no answer token to learn (an error: it would train on nothing); cut=True:
    its answer loses its end (kept, with a note: the usual truncation to the context, as build_example does)."""
    prompt_ids, response_ids = tok.render_chat(row["prompt"], row["response"])
    n = len(prompt_ids) + len(response_ids) - (0 if row.get("ended", True) else 1)
    if not cut and len(prompt_ids) > block_size:
        return f"the prompt takes {len(prompt_ids)} tokens: the context of {block_size} leaves no answer token to learn"
    if cut and n - 1 > block_size:
        return f"prompt and answer take {n} tokens, the context {block_size} + 1: the answer loses {n - 1 - block_size}"
    return None


def build_example(tok, prompt, response, ended=True, block_size=None):
    """Token ids and next-token targets: only the response (and <|end|>) tokens are targets."""
    prompt_ids, response_ids = tok.render_chat(prompt, response)
    if not ended:
        response_ids = response_ids[:-1]  # this demonstration never ends
    ids = prompt_ids + response_ids
    targets = [-100] * (len(prompt_ids) - 1) + response_ids  # target at t predicts ids[t + 1]
    if block_size is not None:
        ids = ids[:block_size + 1]
        targets = targets[:block_size]
    return ids[:-1], targets


def collate(examples, pad_id):
    """Right-pad (inputs, targets) pairs: x (B, T), y (B, T) with -100 on padding."""
    T = max(len(x) for x, _ in examples)
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), -100, dtype=torch.long)
    for i, (xi, yi) in enumerate(examples):
        x[i, :len(xi)] = torch.tensor(xi)
        y[i, :len(yi)] = torch.tensor(yi)
    return x, y


def masked_nll_sum(logits, targets):
    """Sum of -log p(target) over positions whose target is not -100, and how many there are."""
    loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1),
                           ignore_index=-100, reduction="sum")
    return loss, (targets != -100).sum()


@torch.no_grad()
def val_loss(model, examples, pad_id, batch_size, device):
    model.eval()
    total, count = 0.0, 0
    for b in range(0, len(examples), batch_size):
        x, y = collate(examples[b:b + batch_size], pad_id)
        logits, _ = model(x.to(device))
        loss, n = masked_nll_sum(logits, y.to(device))
        total, count = total + loss.item(), count + n.item()
    model.train()
    return total / max(count, 1)


def read_examples(path, tok, block_size):
    """Demonstrations as (inputs, targets), checked against the context (example_too_long)."""
    rows = read_sft(path, too_long=lambda r: example_too_long(tok, r, block_size),
                    cut=lambda r: example_too_long(tok, r, block_size, cut=True))
    return [build_example(tok, r["prompt"], r["response"], r.get("ended", True), block_size) for r in rows]


def setup(cfg):
    """Options and inputs checked, then the starting model and its tokenizer, the demonstrations as examples,
    the optimizer, the base model's evaluation (for the before/after table), all restored from the
    checkpoint on --resume; metrics.jsonl is opened last, when nothing can fail on bad input."""
    rank, world = ddp_setup(cfg.device)
    check_config(cfg, world)
    cfg = follow_data(cfg, "train_data", {
        "val_data": "no validation loss; pass --val_data=<held-out demonstrations> for one",
        "prompts": "the gold evaluation is skipped; pass --prompts=<held-out prompts> --judge=FILE.py:function"},
        checkpoints=("init_from",), master=rank == 0)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    dev = pick_device(cfg.device, cfg.dtype)
    with rank0_first():  # GPT-2 weights: one rank downloads, the others read the cache
        model, tok_name = load_policy(cfg.init_from, dev.device)
    tok = get_tokenizer(cfg.tokenizer or tok_name)
    if model.config.vocab_size < tok.n_vocab:
        model.resize_vocab(tok.n_vocab)
    set_dropout(model, cfg.dropout)  # attention dropout included
    block = model.config.block_size
    train_ex = read_examples(cfg.train_data, tok, block)
    val_ex = read_examples(cfg.val_data, tok, block) if cfg.val_data else []
    eval_rows, judge = judged_prompts(cfg.prompts, cfg.judge, tok, cfg.max_new_tokens, block)
    eval_rows = eval_rows if judge else []  # nothing to evaluate without a judge of them
    run = types.SimpleNamespace(cfg=cfg, rank=rank, world=world, master=rank == 0, dev=dev, tok=tok, raw_model=model,
                                judge=judge, train_ex=train_ex, val_ex=val_ex, eval_rows=eval_rows, base_eval=None,
                                base_eval_seconds=0.0,
                                steps_per_epoch=math.ceil(len(train_ex) / cfg.batch_size), step=0, history=[],
                                ckpt_path=os.path.join(cfg.out_dir, "ckpt.pt"))
    run.max_steps = cfg.epochs * run.steps_per_epoch
    ckpt = resume_checkpoint(run.ckpt_path, "sft", "step", run.max_steps) if cfg.resume else None
    if run.master and eval_rows and cfg.eval_base and not cfg.resume:
        print("evaluating the starting model on the held-out prompts ...")
        t0 = time.time()
        run.base_eval = evaluate_policy(model, tok, eval_rows, cfg.eval_samples, 1.0, dev.device, cfg.max_new_tokens,
                                        judge=judge)
        run.base_eval_seconds = round(time.time() - t0, 1)
    run.optimizer = make_optimizer(model, cfg.lr, cfg.weight_decay, dev.device.split(":")[0])
    if ckpt is not None:
        load_state(model, ckpt["model"], run.ckpt_path)
        run.optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        run.step, run.history, run.base_eval = ckpt["step"], ckpt["history"], ckpt.get("base_eval")
        print(f"resumed from {run.ckpt_path} at step {run.step}")
    run.model = ddp_wrap(model, world)
    run.metrics = open_run(cfg, run.master, f"{len(train_ex):,} demonstrations, {len(val_ex):,} for validation; "
                                            f"{run.max_steps} steps", resumed=("step", run.step))
    return run


def train_step(run, cfg):
    """One optimizer step on the next global batch of demonstrations (this rank's share of it)."""
    epoch, i = divmod(run.step, run.steps_per_epoch)
    order = torch.randperm(len(run.train_ex), generator=torch.Generator().manual_seed(cfg.seed + epoch))
    batch_idx = order[i * cfg.batch_size:(i + 1) * cfg.batch_size].tolist()
    # this rank's share of the global batch, strided so the epoch's short last batch splits evenly
    mine = batch_idx[run.rank::run.world]
    lr = lr_at(run.step, cfg.lr, cfg.min_lr, cfg.warmup_steps, run.max_steps)
    set_lr(run.optimizer, lr)
    x, y = collate([run.train_ex[j] for j in mine or batch_idx[:1]], run.tok.pad_id)
    if not mine:  # fewer examples than ranks: a fully masked dummy (zero loss) keeps DDP's all-reduce in step
        y.fill_(-100)
    device = run.dev.device
    n_global = all_reduce_sum((y != -100).sum().to(device)).clamp(min=1)
    with run.dev.autocast():
        logits, _ = run.model(x.to(device))
    loss_sum, _ = masked_nll_sum(logits, y.to(device))
    # token mean over the GLOBAL batch; x world because DDP averages gradients over ranks
    (loss_sum / n_global * run.world).backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), cfg.grad_clip or float("inf"))
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    loss = all_reduce_sum(loss_sum.detach().clone()).item() / n_global.item()
    return {"step": run.step, "epoch": epoch, "train_loss": loss, "lr": lr, "grad_norm": float(grad_norm)}


def save(run, cfg, finished=False):
    if run.master:
        save_checkpoint(run.ckpt_path, {
            "stage": "sft", "finished": finished, "model": run.raw_model.state_dict(),
            "model_config": config_dict(run.raw_model.config),
            "config": config_dict(cfg), "tokenizer": run.tok.name, "step": run.step,
            "optimizer": run.optimizer.state_dict(), "rng": rng_state(), "history": run.history,
            "base_eval": run.base_eval})


def evaluate_before_after(run, cfg):
    """The SFT model (and the starting model) on the held-out prompts: the rows of summary.json."""
    print("evaluating the SFT model on the held-out prompts ...")
    sft_eval = evaluate_policy(run.raw_model, run.tok, run.eval_rows, cfg.eval_samples, 1.0, run.dev.device,
                               cfg.max_new_tokens, judge=run.judge)
    summary = {}
    for name, res in (("base", run.base_eval), ("sft", sft_eval)):
        if res is None:
            continue
        for mode in ("sampled", "greedy"):
            r = res[mode]
            summary[f"{name}_{mode}_gold_mean"] = round(r["gold_mean"], 4)
            summary[f"{name}_{mode}_pass_rate"] = round(r["pass_rate"], 4)
            print(f"{name:5s} {mode:8s} gold mean {r['gold_mean']:.3f} | pass {r['pass_rate']:.3f} | "
                  f"by family {({f: d['pass_rate'] for f, d in r['by_family'].items()})}")
    summary["sft_facets_sampled"] = {k: v for k, v in sft_eval["sampled"].items() if not k.startswith("_")}
    summary["examples"] = [{"prompt": row["prompt"], "sft": ans[0]["text"]}
                           for row, ans in list(zip(run.eval_rows, sft_eval["_sampled_answers"]))[:8]]
    return summary


def train(cfg):
    run = setup(cfg)
    cfg = run.cfg  # with the defaults that follow the data resolved
    t0 = time.time()
    run.model.train()
    while run.step < run.max_steps:
        row = train_step(run, cfg)
        evaluating = run.step % cfg.eval_interval == 0 or run.step == run.max_steps
        if evaluating:
            if run.val_ex:
                row["val_loss"] = val_loss(run.raw_model, run.val_ex, run.tok.pad_id, 64, run.dev.device)
            if run.master:
                val = f" | val {row['val_loss']:.4f}" if "val_loss" in row else ""
                print(f"step {run.step:5d}/{run.max_steps} | loss {row['train_loss']:.4f}{val} | lr {row['lr']:.2e} | "
                      f"{time.time() - t0:.0f}s")
        run.metrics.log(**row)  # the row and the history first, then the checkpoint that covers them
        run.history.append({k: v for k, v in row.items() if k in ("step", "train_loss", "val_loss")})
        if evaluating:
            save(run, cfg)

    summary = {"steps": run.step, "train_loss": run.history[-1]["train_loss"] if run.history else None,
               "val_loss": next((h["val_loss"] for h in reversed(run.history) if "val_loss" in h), None),
               "train_seconds": round(time.time() - t0, 1)}
    if run.master and run.eval_rows:
        t_eval = time.time()
        summary |= evaluate_before_after(run, cfg)
        summary["eval_seconds"] = round(time.time() - t_eval, 1) + run.base_eval_seconds
    if run.master:
        save(run, cfg, finished=True)
        write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
        plot_metrics(os.path.join(cfg.out_dir, "metrics.jsonl"), os.path.join(cfg.out_dir, "loss.png"),
                     ["train_loss", "val_loss", "lr"], title="SFT")
    ddp_cleanup()
    return run.raw_model, run.history


if __name__ == "__main__":
    run_command(train, Config)
