"""Shared fixtures: a tiny embedded world and tiny runs of the four stages through their real command lines.

One session builds, in a temporary folder, a world of ~150 KB of corpus with a 400-token BPE, then runs

    pretrain.py -> sft.py -> reward.py -> ppo.py

as subprocesses (`python <script> --key=value ...`, cwd = the repository root), each in a few seconds:
a 1-layer, 32-wide GPT with block_size 96 (the longest tiny-world prompt is 55 tokens, + 32 new tokens).
Every stage fixture returns its out_dir. All runs use --device=cpu --threads=1: the same thread count
gives bitwise-identical numbers (docs/EXPERIMENTS.md), which the --resume test relies on.
"""
import json
import os
import subprocess
import sys
import types

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

MAX_NEW_TOKENS = 32  # tiny-world prompts are <= 55 tokens: 55 + 32 < block_size 96
TINY_MODEL = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=96"]


def run_script(script, *args, check=True, timeout=300):
    """Run `python <script> args... --device=cpu --threads=1` from the repo root. Returns the
    CompletedProcess; with check=True a failure shows the end of the script's output."""
    cmd = [sys.executable, os.path.join(REPO, script), *args, "--device=cpu", "--threads=1"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited with {proc.returncode}\n--- stdout ---\n"
                             f"{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}")
    return proc


def read_json(path):
    with open(path) as f:
        return json.load(f)


def assert_fails_clearly(script, args, *needles):
    """A bad command line must exit non-zero with a message naming what is wrong (no traceback)."""
    proc = run_script(script, *args, check=False, timeout=120)
    assert proc.returncode != 0, f"{script} {args} should fail\n{proc.stdout[-2000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for needle in needles:
        assert needle in proc.stderr, f"{needle!r} not in the error message:\n{proc.stderr[-2000:]}"


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """data.world.build_world at a tiny size. Returns a namespace of paths (dir, tok, and each file)."""
    from data.world import Config, build_world
    root = tmp_path_factory.mktemp("tiny")
    world_dir, tok_path = str(root / "world"), str(root / "tok.tiktoken")
    build_world(Config(out_dir=world_dir, corpus_chars=150_000, n_sft=300, n_label=60, n_ppo=100, n_dev=24, n_test=24,
                       vocab_size=400, tokenizer_path=tok_path))
    files = {name: os.path.join(world_dir, name + ext) for name, ext in [
        ("corpus", ".txt"), ("sft_train", ".jsonl"), ("sft_val", ".jsonl"), ("prompts_label", ".jsonl"),
        ("prompts_ppo", ".jsonl"), ("prompts_dev", ".jsonl"), ("prompts_test", ".jsonl")]}
    return types.SimpleNamespace(root=str(root), dir=world_dir, tok=tok_path, **files)


def pretrain_args(world, out_dir, max_steps=150, **overrides):
    """The tiny pretraining command line: 150 steps of 16 x 96 tokens take ~2 s and reach a validation
    loss well below the corpus's unigram entropy (~2.8 vs ~4.7 nats)."""
    opts = {"corpus": world.corpus, "tokenizer": world.tok, "out_dir": out_dir, "max_steps": max_steps,
            "batch_size": 16, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 10, "eval_interval": 1000,
            "eval_batches": 2, "log_interval": 50} | overrides
    return TINY_MODEL + [f"--{k}={v}" for k, v in opts.items()]


@pytest.fixture(scope="session")
def pretrain_run(tiny_world):
    out = os.path.join(tiny_world.root, "pretrain")
    run_script("pretrain.py", *pretrain_args(tiny_world, out))
    return out


@pytest.fixture(scope="session")
def sft_run(tiny_world, pretrain_run):
    out = os.path.join(tiny_world.root, "sft")
    run_script("sft.py", f"--init_from={pretrain_run}/ckpt.pt", f"--train_data={tiny_world.sft_train}",
               f"--val_data={tiny_world.sft_val}", f"--prompts={tiny_world.prompts_dev}", f"--out_dir={out}",
               "--epochs=2", "--batch_size=16", "--lr=3e-3", "--warmup_steps=5", "--eval_samples=2",
               f"--max_new_tokens={MAX_NEW_TOKENS}")
    return out


@pytest.fixture(scope="session")
def reward_run(tiny_world, sft_run):
    # n_norm keeps its default (512), more than the 270 tiny demonstrations: all of them are used
    out = os.path.join(tiny_world.root, "reward")
    run_script("reward.py", f"--init_from={sft_run}/ckpt.pt", f"--label_prompts={tiny_world.prompts_label}",
               f"--demonstrations={tiny_world.sft_train}", f"--eval_prompts={tiny_world.prompts_dev}",
               f"--world_dir={tiny_world.dir}", f"--out_dir={out}", "--k=4", "--double_label=20", "--epochs=2",
               "--batch_size=8", "--warmup_steps=2", "--best_of=4", f"--max_new_tokens={MAX_NEW_TOKENS}",
               "--ensemble=2")  # two members: PPO's tests see an ensemble (the default is one model)
    return out


def ppo_args(world, sft_dir, reward_dir, pretrain_dir, out_dir, **overrides):
    opts = {"sft": f"{sft_dir}/ckpt.pt", "reward_model": f"{reward_dir}/ckpt.pt", "prompts": world.prompts_ppo,
            "eval_prompts": world.prompts_dev, "pretrain_tokens": f"{pretrain_dir}/tokens", "out_dir": out_dir,
            "max_new_tokens": MAX_NEW_TOKENS} | overrides
    return [f"--{k}={v}" for k, v in opts.items()]


@pytest.fixture(scope="session")
def ppo_run(tiny_world, pretrain_run, sft_run, reward_run):
    out = os.path.join(tiny_world.root, "ppo")
    run_script("ppo.py", *ppo_args(tiny_world, sft_run, reward_run, pretrain_run, out,
                                   iterations=2, rollout_batch=8, minibatch=4, eval_samples=1,
                                   ptx_coef=0.1, ptx_batch=4))  # PPO-ptx on, so its path runs too
    return out
