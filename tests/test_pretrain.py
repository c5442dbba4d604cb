"""pretrain.py: the learning-rate schedule, batches and unigram entropy by hand; a tiny run through the
command line (loss below the unigram entropy, a checkpoint that loads with weights_only=True), and
--resume reproducing the uninterrupted run's losses bit for bit."""
import math
import os

import numpy as np
import pytest
import torch

from conftest import assert_fails_clearly, pretrain_args, read_json, run_script
from common import get_batch, lr_at, pick_device, read_jsonl
from model import GPT, GPTConfig
from pretrain import Config, evaluate, unigram_entropy


# ----------------------------------------------------------------------------- formulas by hand

def test_lr_schedule_by_hand():
    cfg = Config(lr=1e-3, min_lr=1e-4, warmup_steps=10, max_steps=110)
    # warmup: lr * (step + 1) / warmup, so the first step already moves and step 9 reaches the peak
    assert lr_at(0, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps) == pytest.approx(1e-4)
    assert lr_at(4, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps) == pytest.approx(5e-4)
    assert lr_at(9, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps) == pytest.approx(1e-3)
    # cosine over the remaining 100 steps: progress 0 -> peak, 0.5 -> halfway, 1 -> min_lr
    assert lr_at(10, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps) == pytest.approx(1e-3)
    assert lr_at(60, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))  # cos(pi/2) = 0
    assert lr_at(35, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps) == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi / 4)) * 9e-4)
    assert lr_at(110, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps) == pytest.approx(1e-4)
    assert lr_at(500, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps) == pytest.approx(1e-4)  # past the end: stays at the floor
    after_warmup = [lr_at(s, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(after_warmup, after_warmup[1:]))


def test_get_batch_targets_are_inputs_shifted_by_one():
    data = np.arange(200, dtype=np.uint16)  # token value == its position: windows are easy to read
    x, y = get_batch(data, batch_size=64, block_size=8, generator=torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (64, 8) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])  # y is x shifted left by one ...
    assert torch.equal(y, x + 1)  # ... and its last token is the one after x's window
    assert torch.equal(x, x[:, :1] + torch.arange(8))  # contiguous windows
    assert int(y.max()) < len(data)


def test_get_batch_is_reproducible_from_the_generator_state():
    data = np.arange(1000, dtype=np.uint16)
    g = torch.Generator().manual_seed(3)
    get_batch(data, 4, 16, g)
    state = g.get_state()  # what the checkpoint stores as "data_rng"
    x1, _ = get_batch(data, 4, 16, g)
    x2, _ = get_batch(data, 4, 16, torch.Generator().set_state(state))
    assert torch.equal(x1, x2)


def test_unigram_entropy_by_hand():
    assert unigram_entropy(np.array([0, 0, 1, 1], dtype=np.uint16)) == pytest.approx(math.log(2))
    assert unigram_entropy(np.array([7, 7, 7, 9], dtype=np.uint16)) == pytest.approx(
        -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))  # 0.5623
    assert unigram_entropy(np.array([3, 1, 4, 2], dtype=np.uint16)) == pytest.approx(math.log(4))
    assert unigram_entropy(np.array([5, 5, 5], dtype=np.uint16)) == pytest.approx(0.0)


# ----------------------------------------------------------------------------- tiny runs

def test_tiny_run_learns_more_than_word_frequencies(pretrain_run):
    rows = read_jsonl(os.path.join(pretrain_run, "metrics.jsonl"))
    s = read_json(os.path.join(pretrain_run, "summary.json"))
    assert s["steps"] == 150 and len(rows) == 150
    assert [r["step"] for r in rows] == list(range(1, 151))
    # the model uses context: ~2.8 nats vs a unigram entropy of ~4.7 on this corpus
    assert s["val_loss"] < s["unigram_entropy"] - 0.5
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 1.0
    # the logged learning rate is the schedule's value at each step (0-based in lr_at)
    cfg = Config(lr=1e-2, min_lr=1e-3, warmup_steps=10, max_steps=150)
    for r in rows:
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.max_steps), rel=1e-12)
    assert os.path.exists(os.path.join(pretrain_run, "loss.png"))


def test_checkpoint_loads_with_weights_only_and_holds_the_final_model(pretrain_run):
    ckpt = torch.load(os.path.join(pretrain_run, "ckpt.pt"), map_location="cpu", weights_only=True)
    for key in ("model", "model_config", "config", "tokenizer", "step", "optimizer", "rng", "data_rng", "history"):
        assert key in ckpt, key
    assert ckpt["step"] == 150 and ckpt["config"]["max_steps"] == 150
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    # re-evaluating the loaded weights the way train() did gives the summary's validation loss
    cfg = Config(**ckpt["config"])
    val = np.memmap(os.path.join(pretrain_run, "tokens", "val.bin"), np.uint16, "r")
    loss = evaluate(model, val, cfg, pick_device("cpu"), torch.Generator().manual_seed(cfg.seed + 1))
    assert loss == pytest.approx(read_json(os.path.join(pretrain_run, "summary.json"))["val_loss"], abs=1e-4)


def test_resume_reproduces_the_uninterrupted_run(tiny_world, tmp_path):
    # A schedule that does not depend on max_steps (warmup, then flat: min_lr == lr), so that a run
    # stopped at step 10 and resumed to 20 follows exactly the same lr as a straight 20-step run.
    common = dict(lr=5e-3, min_lr=5e-3, warmup_steps=5, eval_interval=1000)
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    run_script("pretrain.py", *pretrain_args(tiny_world, straight, max_steps=20, **common))
    run_script("pretrain.py", *pretrain_args(tiny_world, split, max_steps=10, **common))
    proc = run_script("pretrain.py", *pretrain_args(tiny_world, split, max_steps=20, **common), "--resume")
    assert "resumed from" in proc.stdout and "at step 10" in proc.stdout
    a, b = read_jsonl(os.path.join(straight, "metrics.jsonl")), read_jsonl(os.path.join(split, "metrics.jsonl"))
    assert [r["step"] for r in b] == list(range(1, 21))  # metrics were appended, not overwritten
    assert [r["train_loss"] for r in a] == [r["train_loss"] for r in b]  # exact, same thread count
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    wa = torch.load(os.path.join(straight, "ckpt.pt"), weights_only=True)["model"]
    wb = torch.load(os.path.join(split, "ckpt.pt"), weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bad_command_lines_fail_with_a_clear_message(tiny_world, tmp_path):
    assert_fails_clearly("pretrain.py", ["--max_stepz=3"], "--max_stepz", "valid keys", "max_steps")
    # --resume where there is no checkpoint: the message names the file it looked for
    out = str(tmp_path / "empty")
    assert_fails_clearly("pretrain.py", pretrain_args(tiny_world, out, max_steps=2) + ["--resume"],
                         os.path.join(out, "ckpt.pt"), "does not exist")
