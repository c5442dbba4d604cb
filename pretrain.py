"""Pretraining: the base model (the "GPT-3" of the InstructGPT story).

    python pretrain.py                              # embedded world (README: how long each stage takes)
    python pretrain.py --max_steps=50 --out_dir=runs/tiny
    python pretrain.py --corpus=task/corpus.txt --tokenizer=task/tok.tiktoken --out_dir=out/pretrain   # your own
    python pretrain.py --init_from=gpt2 --corpus=my.txt --tokenizer=gpt2   # GPU + internet

A plain next-token language model trained on a text corpus. It learns the language and the facts of
its world, good and bad behaviour alike, but nothing about being an assistant: the corpus never
contains the chat markers, which SFT (sft.py) introduces.

Implementation details:
1. The corpus is tokenised once into uint16 train/val files (documents separated by a blank line,
   each preceded by <|endoftext|> as in GPT-2's training data); later runs reuse them.
2. Batches are random windows of block_size + 1 tokens drawn with a seeded torch.Generator whose
   state is saved in the checkpoint, so `--resume` reproduces the uninterrupted run on CPU.
3. AdamW (weight decay on matrices only), linear warmup then cosine decay to min_lr, gradient
   clipping, gradient accumulation; validation loss every eval_interval steps with a few samples.
4. Under torchrun every rank draws the same global batch and trains on its slice (DDP averages the
   gradients), so N processes follow the single-process run on the same global batch.
5. summary.json compares the final validation loss with the corpus's unigram entropy: a model that
   learned nothing but word frequencies would sit at that entropy.
6. Options and the corpus (read by data/formats.read_corpus; too short for one window of each split
   is an error) are checked before anything is written. `--resume` refuses another stage's
   checkpoint; a finished run continues only to a larger --max_steps. A tokenizer file is recorded by
   its absolute path, so later stages find it from any folder; a corpus of the user's own with the
   embedded world's tokenizer (the default) gets a note (train one with tokenizer.py).
"""
import os
import time
import types
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import torch

from common import (all_reduce_mean, at_least, below, check_config, config_dict, ddp_cleanup, ddp_setup, ddp_wrap,
                    folder, get_batch, load_state, lr_at, make_optimizer, open_run, option_error, pick_device,
                    plot_metrics, rank0_first, resume_checkpoint, rng_state, run_command, save_checkpoint, set_lr,
                    set_rng_state, set_seed, write_json)
from data.formats import read_corpus
from engine import load_gpt2
from model import GPT, HF_GPT2_NAMES, GPTConfig
from tokenizer import get_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Config:
    corpus: str = os.path.join(HERE, "data", "world", "corpus.txt")  # plain-text corpus
    tokenizer: str = "embedded"  # embedded | gpt2 | path to a .tiktoken file
    out_dir: Annotated[str, folder()] = os.path.join(HERE, "runs", "pretrain")  # checkpoints, metrics, plots
    init_from: str = "scratch"  # scratch | gpt2 | gpt2-medium | ... | a local HF GPT-2 folder
    n_layer: Annotated[int, at_least(1)] = 4  # model shape when init_from=scratch
    n_head: Annotated[int, at_least(1)] = 4  # attention heads per block (n_embd must divide by it)
    n_embd: Annotated[int, at_least(1)] = 128  # channels of the residual stream
    block_size: Annotated[int, at_least(1)] = 128  # context length in tokens
    dropout: Annotated[float, at_least(0), below(1)] = 0.0  # off by default: tiny models on tiny data do not need it
    batch_size: Annotated[int, at_least(1)] = 32  # sequences per optimizer step (global, across ranks and accumulation)
    grad_accum: Annotated[int, at_least(1)] = 1  # micro-batches per optimizer step
    max_steps: Annotated[int, at_least(1)] = 1000  # optimizer steps
    lr: Annotated[float, at_least(0)] = 2e-3  # peak learning rate
    min_lr: Annotated[float, at_least(0)] = 2e-4  # cosine decay floor
    warmup_steps: Annotated[int, at_least(0)] = 100  # linear warmup
    weight_decay: Annotated[float, at_least(0)] = 0.1  # AdamW, on 2-D weights only
    grad_clip: Annotated[float, at_least(0)] = 1.0  # max global gradient norm (0 = off)
    val_fraction: Annotated[float, at_least(0), below(1)] = 0.02  # tail of the corpus held out for validation
    eval_interval: Annotated[int, at_least(1)] = 200  # steps between validation losses and samples
    eval_batches: Annotated[int, at_least(1)] = 10  # batches per validation estimate
    log_interval: Annotated[int, at_least(1)] = 20  # steps between log lines
    seed: int = 1337  # seeds the initialisation and the batches
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"  # auto | float32 | bfloat16
    compile: bool = False  # torch.compile (CUDA only)
    threads: Annotated[int, at_least(0)] = 0  # torch CPU threads (0 = leave torch's default)
    resume: bool = False  # continue from out_dir/ckpt.pt


def check(cfg, world):
    """The rules that tie options together (each option's own range is declared in Config)."""
    check_config(cfg)
    if cfg.batch_size % (world * cfg.grad_accum):
        raise option_error("batch_size", cfg.batch_size, f"must divide by world size x grad_accum ({world} x "
                                                         f"{cfg.grad_accum})")
    if cfg.init_from == "scratch" and cfg.n_embd % cfg.n_head:
        raise option_error("n_embd", cfg.n_embd, f"must be a multiple of --n_head={cfg.n_head}")
    if cfg.init_from not in ("scratch", *HF_GPT2_NAMES) and not os.path.isdir(cfg.init_from):
        raise option_error("init_from", cfg.init_from, f"must be scratch, {', '.join(HF_GPT2_NAMES)} or a "
                                                       f"Hugging Face GPT-2 folder")


def tokenize_corpus(corpus_path, tok, out_dir, val_fraction, block_size=0):
    """Tokenise once into uint16 train.bin / val.bin (cached in out_dir/tokens). A corpus too short for
    one window of block_size + 1 tokens in each split is an error, before the cache is written."""
    tok_dir = os.path.join(out_dir, "tokens")
    train_path, val_path = os.path.join(tok_dir, "train.bin"), os.path.join(tok_dir, "val.bin")
    if not os.path.isfile(corpus_path):
        raise SystemExit(f"error: --corpus={corpus_path!r} does not exist (build the embedded world with "
                         f"`python -m data.world`, or pass a plain-text file)")
    stamp = f"{os.path.abspath(corpus_path)} {os.path.getmtime(corpus_path)} {tok.name} {val_fraction}"
    stamp_path = os.path.join(tok_dir, "source.txt")
    if os.path.exists(stamp_path) and open(stamp_path).read() == stamp:
        train, val = np.memmap(train_path, np.uint16, "r"), np.memmap(val_path, np.uint16, "r")
        check_token_counts(corpus_path, len(train), len(val), block_size)
        return train, val
    assert tok.n_vocab < 2 ** 16, "uint16 token files need a vocabulary below 65536"
    docs = [d for d in read_corpus(corpus_path).split("\n\n") if d.strip()]
    ids = []
    for doc_ids in tok.enc.encode_ordinary_batch(docs):
        ids.append(tok.eot_id)
        ids.extend(doc_ids)
    ids = np.array(ids, dtype=np.uint16)
    n_val = min(max(int(len(ids) * val_fraction), 1024), len(ids))
    check_token_counts(corpus_path, len(ids) - n_val, n_val, block_size)
    os.makedirs(tok_dir, exist_ok=True)
    ids[:-n_val].tofile(train_path)
    ids[-n_val:].tofile(val_path)
    with open(stamp_path, "w") as f:
        f.write(stamp)
    print(f"tokenised {corpus_path}: {len(ids):,} tokens ({len(ids) - n_val:,} train, {n_val:,} val)")
    return np.memmap(train_path, np.uint16, "r"), np.memmap(val_path, np.uint16, "r")


def check_token_counts(corpus_path, n_train, n_val, block_size):
    """get_batch draws windows of block_size + 1 tokens: each split needs more than that."""
    if min(n_train, n_val) < block_size + 2:
        raise SystemExit(f"error: --corpus={corpus_path}: {n_train:,} training and {n_val:,} validation tokens "
                         f"(at least 1,024 are held out), but a window of --block_size={block_size} needs "
                         f"{block_size + 2:,} in each: use a longer corpus or a smaller --block_size")


def unigram_entropy(data):
    """Entropy (nats) of the token frequencies: the loss of a model that ignores context."""
    counts = np.bincount(np.asarray(data), minlength=1).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def build_model(cfg, tok):
    if cfg.init_from == "scratch":
        return GPT(GPTConfig(block_size=cfg.block_size, vocab_size=tok.n_vocab, n_layer=cfg.n_layer,
                             n_head=cfg.n_head, n_embd=cfg.n_embd, dropout=cfg.dropout))
    model = load_gpt2(cfg.init_from)
    if model.config.vocab_size < tok.n_vocab:
        model.resize_vocab(tok.n_vocab)  # room for the chat special tokens
    return model


@torch.no_grad()
def evaluate(model, val, cfg, dev, generator):
    model.eval()
    losses = []
    for _ in range(cfg.eval_batches):
        x, y = get_batch(val, cfg.batch_size, cfg.block_size, generator)
        with dev.autocast():
            losses.append(model(x.to(dev.device), y.to(dev.device))[1].item())
    model.train()
    return sum(losses) / len(losses)


@torch.no_grad()
def sample_text(model, tok, prompt, dev, max_new_tokens=40, seed=0):
    model.eval()
    idx = torch.tensor([[tok.eot_id] + tok.encode(prompt)], device=dev.device)
    gen = torch.Generator(device=dev.device).manual_seed(seed)
    out, _ = model.generate(idx, max_new_tokens=max_new_tokens, temperature=0.8, eos_id=tok.eot_id,
                            pad_id=tok.pad_id, generator=gen)
    model.train()
    return prompt + tok.decode([t for t in out[0].tolist() if t not in (tok.eot_id, tok.pad_id)])


def setup(cfg):
    """Options and inputs checked, then devices, tokens, model, optimizer and the data generator, restored
    from the checkpoint on --resume; metrics.jsonl is opened last, when nothing can fail on bad input."""
    rank, world = ddp_setup(cfg.device)
    check(cfg, world)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_seed(cfg.seed)
    dev = pick_device(cfg.device, cfg.dtype, cfg.compile)
    tok = get_tokenizer(os.path.abspath(cfg.tokenizer) if os.path.isfile(cfg.tokenizer) else cfg.tokenizer)
    if rank == 0 and cfg.corpus != Config.corpus and cfg.tokenizer == "embedded":
        print("note: --tokenizer not given with your own --corpus: the embedded world's BPE (data/embedded.tiktoken) "
              "splits it; train one on your corpus: python tokenizer.py --input=CORPUS --output=tok.tiktoken")
    ckpt_path = os.path.join(cfg.out_dir, "ckpt.pt")
    ckpt = resume_checkpoint(ckpt_path, "pretrain", "step", cfg.max_steps) if cfg.resume else None
    with rank0_first():  # one rank writes the token cache (and downloads GPT-2), the others then read it
        train_data, val_data = tokenize_corpus(cfg.corpus, tok, cfg.out_dir, cfg.val_fraction, cfg.block_size)
        model = build_model(cfg, tok).to(dev.device)
    run = types.SimpleNamespace(rank=rank, world=world, master=rank == 0, dev=dev, tok=tok, train_data=train_data,
                                val_data=val_data, raw_model=model, micro=cfg.batch_size // (world * cfg.grad_accum),
                                optimizer=make_optimizer(model, cfg.lr, cfg.weight_decay, dev.device.split(":")[0]),
                                data_gen=torch.Generator().manual_seed(cfg.seed), step=0, history=[],
                                ckpt_path=ckpt_path)
    if ckpt is not None:
        load_state(model, ckpt["model"], ckpt_path)
        run.optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        run.data_gen.set_state(ckpt["data_rng"])
        run.step, run.history = ckpt["step"], ckpt["history"]
        print(f"resumed from {run.ckpt_path} at step {run.step}")
    if dev.compile:  # compile, then wrap (nanoGPT's order): require_backward_grad_sync below must reach DDP
        model = torch.compile(model)
    run.model = ddp_wrap(model, world)
    run.metrics = open_run(cfg, run.master, f"model: {run.raw_model.num_params():,} parameters; corpus: "
                           f"{len(train_data):,} train tokens; {cfg.batch_size * cfg.block_size:,} tokens per step",
                           resumed=("step", run.step))
    return run


def train_step(run, cfg):
    """One optimizer step on one global batch (this rank's slice, in grad_accum micro-batches)."""
    lr = lr_at(run.step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps)
    set_lr(run.optimizer, lr)
    x_all, y_all = get_batch(run.train_data, cfg.batch_size, cfg.block_size, run.data_gen)  # global batch
    x_all, y_all = x_all[run.rank * run.micro * cfg.grad_accum:], y_all[run.rank * run.micro * cfg.grad_accum:]
    loss_sum = 0.0
    for k in range(cfg.grad_accum):
        x = x_all[k * run.micro:(k + 1) * run.micro].to(run.dev.device)
        y = y_all[k * run.micro:(k + 1) * run.micro].to(run.dev.device)
        if run.world > 1:
            run.model.require_backward_grad_sync = k == cfg.grad_accum - 1
        with run.dev.autocast():
            _, loss = run.model(x, y)
        (loss / cfg.grad_accum).backward()
        loss_sum += loss.item() / cfg.grad_accum
    grad_norm = torch.nn.utils.clip_grad_norm_(run.raw_model.parameters(), cfg.grad_clip or float("inf"))
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.step += 1
    train_loss = all_reduce_mean(torch.tensor(loss_sum, device=run.dev.device)).item()  # NCCL needs a GPU tensor
    return {"step": run.step, "train_loss": train_loss, "lr": lr, "grad_norm": float(grad_norm)}


def save(run, cfg, finished=False):
    if run.master:
        save_checkpoint(run.ckpt_path, {
            "stage": "pretrain", "finished": finished, "model": run.raw_model.state_dict(),
            "model_config": config_dict(run.raw_model.config), "config": config_dict(cfg), "tokenizer": run.tok.name,
            "step": run.step, "optimizer": run.optimizer.state_dict(), "rng": rng_state(),
            "data_rng": run.data_gen.get_state(), "history": run.history})


def train(cfg):
    run = setup(cfg)
    t0, t_last, tokens_seen = time.time(), time.time(), 0
    run.model.train()
    while run.step < cfg.max_steps:
        row = train_step(run, cfg)
        tokens_seen += cfg.batch_size * cfg.block_size
        last = run.step == cfg.max_steps
        if run.step % cfg.log_interval == 0 or last:
            row["tokens_per_sec"] = cfg.log_interval * cfg.batch_size * cfg.block_size / max(time.time() - t_last, 1e-9)
            t_last = time.time()
            if run.master:
                print(f"step {run.step:5d} | loss {row['train_loss']:.4f} | lr {row['lr']:.2e} | "
                      f"grad {row['grad_norm']:.2f} | {row['tokens_per_sec']:,.0f} tok/s")
        evaluating = run.step % cfg.eval_interval == 0 or last
        if evaluating:
            row["val_loss"] = evaluate(run.raw_model, run.val_data, cfg, run.dev,
                                       torch.Generator().manual_seed(cfg.seed + 1))
            if run.master:
                print(f"step {run.step:5d} | val loss {row['val_loss']:.4f}")
                if cfg.tokenizer == "embedded":
                    print("   sample:", sample_text(run.raw_model, run.tok, "question: what is 3 plus 4?\nanswer:",
                                                    run.dev).replace("\n", " / "))
        run.metrics.log(**row)  # the row and the history first, then the checkpoint that covers them
        run.history.append({k: row[k] for k in ("step", "train_loss", "val_loss") if k in row})
        if evaluating:
            save(run, cfg)

    elapsed = time.time() - t0
    val_loss = next((h["val_loss"] for h in reversed(run.history) if "val_loss" in h), None)
    summary = {"val_loss": val_loss, "train_loss": run.history[-1]["train_loss"] if run.history else None,
               "unigram_entropy": unigram_entropy(run.train_data), "steps": run.step,
               "params": run.raw_model.num_params(), "train_tokens": int(len(run.train_data)),
               "seconds": round(elapsed, 1), "tokens_per_sec": round(tokens_seen / max(elapsed, 1e-9))}
    if run.master:
        save(run, cfg, finished=True)
        write_json(os.path.join(cfg.out_dir, "summary.json"), summary)
        plot_metrics(os.path.join(cfg.out_dir, "metrics.jsonl"), os.path.join(cfg.out_dir, "loss.png"),
                     ["train_loss", "val_loss", "lr"], title="pretraining")
        print(f"done: val loss {val_loss:.4f} (unigram entropy {summary['unigram_entropy']:.3f}) in {elapsed:.0f}s")
    ddp_cleanup()
    return run.raw_model, run.history


if __name__ == "__main__":
    run_command(train, Config)
