"""Checkpoints for the notebooks: the full pipeline's if it has run, else a tiny chain built once.

    import tiny
    chain = tiny.ensure("reward")   # world files + pretrain, sft and reward checkpoints
    chain.sft, chain.reward         # checkpoint paths; chain.world, chain.prompts_dev, chain.prompts_test, ... data paths

1. If `python pipeline.py` has finished a stage (runs/<stage>/summary.json and ckpt.pt, and the world
   in data/world/), the notebooks use its checkpoints: bigger models, better pictures.
2. Otherwise a tiny chain is built once into runs/notebook_tiny/ (gitignored, like all of runs/):
   a small world (600K characters of corpus, its own 512-token BPE in tok.tiktoken), then pretrain.py,
   sft.py and reward.py through their own `train(Config(...))` with a 2-layer, 64-wide GPT on one CPU
   thread (for models this small a second thread only adds overhead, and one thread makes the runs
   bitwise reproducible). It takes about a minute and all six notebooks share it. A stamp file holds the settings and a
   hash of the scripts, so editing a script rebuilds the chain instead of reusing stale checkpoints.
3. The environment variable RLHF_NOTEBOOKS=tiny forces the tiny chain (the test suite sets it so a
   test run never depends on what happens to be in runs/), =full insists on the pipeline's runs.
   RLHF_NOTEBOOK_CACHE moves the tiny chain's folder.
The stage scripts' logs go to <cache>/build.log; the notebook shows one line per stage.
"""
import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import time
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # the notebooks import the stage scripts from the repository root

STAGES = ["world", "pretrain", "sft", "reward"]
SEED = 1337
MAX_NEW_TOKENS = 40  # most answers take < 40 tokens; the longest tiny-world prompt (44) + 40 < block_size 96

# The tiny chain's settings (every other field keeps the script's default).
TINY_WORLD = dict(corpus_chars=600_000, n_sft=3000, n_label=500, n_ppo=500, n_dev=60, n_test=60, vocab_size=512, seed=0)
TINY_MODEL = dict(n_layer=2, n_head=4, n_embd=64, block_size=96)
TINY_PRETRAIN = dict(max_steps=500, batch_size=24, lr=5e-3, min_lr=5e-4, warmup_steps=30,
                     eval_interval=500, eval_batches=4, log_interval=100)
TINY_SFT = dict(epochs=3, batch_size=32, lr=1e-3, min_lr=1e-4, warmup_steps=10, eval_interval=1000,
                prompts="", eval_base=False)
TINY_REWARD = dict(k=6, double_label=100, epochs=2, ensemble=1, batch_size=16, lr=3e-4, min_lr=3e-5, warmup_steps=5,
                   best_of=0, n_norm=256, val_fraction=0.15)


def cache_dir():
    return os.environ.get("RLHF_NOTEBOOK_CACHE") or os.path.join(REPO, "runs", "notebook_tiny")


def _full_chain(upto):
    """The pipeline's files, or None if a stage up to `upto` has not finished."""
    world, runs = os.path.join(REPO, "data", "world"), os.path.join(REPO, "runs")
    need = [os.path.join(world, "stats.json")]
    for stage in STAGES[1:STAGES.index(upto) + 1]:
        need += [os.path.join(runs, stage, "summary.json"), os.path.join(runs, stage, "ckpt.pt")]
    if not all(os.path.exists(p) for p in need):
        return None
    return _paths("full", world, "embedded", runs, os.path.join(runs, "notebooks"))


def _paths(kind, world, tok, runs, work):
    return types.SimpleNamespace(
        kind=kind, world=world, tokenizer=tok, work=work, max_new_tokens=MAX_NEW_TOKENS, seed=SEED,
        corpus=os.path.join(world, "corpus.txt"), sft_train=os.path.join(world, "sft_train.jsonl"),
        sft_val=os.path.join(world, "sft_val.jsonl"), prompts_label=os.path.join(world, "prompts_label.jsonl"),
        prompts_ppo=os.path.join(world, "prompts_ppo.jsonl"), prompts_dev=os.path.join(world, "prompts_dev.jsonl"),
        prompts_test=os.path.join(world, "prompts_test.jsonl"),
        pretrain=os.path.join(runs, "pretrain", "ckpt.pt"), pretrain_tokens=os.path.join(runs, "pretrain", "tokens"),
        sft=os.path.join(runs, "sft", "ckpt.pt"), reward=os.path.join(runs, "reward", "ckpt.pt"),
        comparisons=os.path.join(runs, "reward", "comparisons.jsonl"))


def _stamp():
    """The tiny settings plus a hash of every file whose change could change the checkpoints."""
    h = hashlib.sha1()
    for name in ("model.py", "tokenizer.py", "common.py", "evaluate.py", "pretrain.py", "sft.py", "reward.py",
                 os.path.join("data", "world.py"), os.path.join("data", "formats.py"), os.path.join("notebooks", "tiny.py")):
        with open(os.path.join(REPO, name), "rb") as f:
            h.update(f.read())
    return {"sources": h.hexdigest(), "world": TINY_WORLD, "model": TINY_MODEL, "pretrain": TINY_PRETRAIN,
            "sft": TINY_SFT, "reward": TINY_REWARD, "seed": SEED}


def _build_stage(stage, p, log):
    """One stage through its script's own train(Config(...)); its printout goes to the log file."""
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        if stage == "world":
            from data.world import Config, build_world
            build_world(Config(out_dir=p.world, tokenizer_path=p.tokenizer, **TINY_WORLD))
        elif stage == "pretrain":
            import pretrain
            pretrain.train(pretrain.Config(corpus=p.corpus, tokenizer=p.tokenizer, out_dir=os.path.dirname(p.pretrain),
                                           seed=SEED, device="cpu", threads=1, **TINY_MODEL, **TINY_PRETRAIN))
        elif stage == "sft":
            import sft
            sft.train(sft.Config(init_from=p.pretrain, train_data=p.sft_train, val_data=p.sft_val,
                                 out_dir=os.path.dirname(p.sft), seed=SEED, device="cpu", threads=1,
                                 max_new_tokens=MAX_NEW_TOKENS, **TINY_SFT))
        elif stage == "reward":
            import reward
            reward.train(reward.Config(init_from=p.sft, label_prompts=p.prompts_label, demonstrations=p.sft_train,
                                       eval_prompts=p.prompts_dev, world_dir=p.world, out_dir=os.path.dirname(p.reward),
                                       seed=SEED, device="cpu", threads=1, max_new_tokens=MAX_NEW_TOKENS, **TINY_REWARD))


def _tiny_chain(upto):
    root = cache_dir()
    runs = os.path.join(root, "runs")
    p = _paths("tiny", os.path.join(root, "world"), os.path.join(root, "tok.tiktoken"), runs, os.path.join(root, "work"))
    stamp_path, stamp = os.path.join(root, "stamp.json"), _stamp()
    old = json.load(open(stamp_path)) if os.path.exists(stamp_path) else None
    if old is not None and old.get("settings") != stamp:
        print(f"tiny chain: the scripts or settings changed since {root} was built; rebuilding it")
        shutil.rmtree(root)
        old = None
    done = old["done"] if old else []
    todo = STAGES[:STAGES.index(upto) + 1]
    if all(s in done for s in todo):
        return p
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "build.log"), "a") as log:
        for stage in todo:
            if stage in done:
                continue
            t0 = time.time()
            _build_stage(stage, p, log)
            done.append(stage)
            with open(stamp_path, "w") as f:
                json.dump({"settings": stamp, "done": done}, f, indent=1)
            print(f"tiny chain: built {stage:8s} in {time.time() - t0:5.1f}s  (log: {os.path.join(root, 'build.log')})")
    return p


def ensure(stage="reward"):
    """Paths of the world files and of the checkpoints up to `stage` (world|pretrain|sft|reward)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, not {stage!r}")
    mode = os.environ.get("RLHF_NOTEBOOKS", "auto")
    full = None if mode == "tiny" else _full_chain(stage)
    if mode == "full" and full is None:
        raise SystemExit("RLHF_NOTEBOOKS=full but the pipeline has not finished: run `python pipeline.py`")
    p = full or _tiny_chain(stage)
    restore_inline_figures()
    os.makedirs(p.work, exist_ok=True)
    print(f"using the {p.kind} chain: " + ("runs/ of `python pipeline.py`" if p.kind == "full" else
                                          f"tiny checkpoints in {os.path.relpath(cache_dir(), REPO)}"))
    return p


@contextlib.contextmanager
def quiet():
    """Capture a script's printout (for calls whose log would bury the lesson); yields the buffer.
    On exit it also gives the notebook its inline figures back (see restore_inline_figures)."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            yield buf
    finally:
        restore_inline_figures()


def restore_inline_figures():
    """The scripts draw their PNGs after `matplotlib.use("Agg")`, which switches pyplot to Agg for the
    whole Python session: in a notebook, plt.show() would then show nothing. Switch back to inline."""
    if "matplotlib.pyplot" in sys.modules and "ipykernel" in sys.modules:
        import matplotlib.pyplot as plt
        from IPython import get_ipython
        if plt.get_backend().lower() == "agg" and get_ipython() is not None:
            get_ipython().run_line_magic("matplotlib", "inline")


def grep(buf, *prefixes):
    """Print the lines of a captured log (tiny.quiet()) that start with one of `prefixes`."""
    print("\n".join(line for line in buf.getvalue().splitlines() if line.startswith(prefixes)))


def gpt2_tokenizer():
    """GPT-2's BPE through tiktoken (downloaded once, then cached), or None with a one-line note when it
    cannot be downloaded. RLHF_OFFLINE=1 (set by the test suite) skips the download attempt."""
    from tokenizer import get_tokenizer
    if os.environ.get("RLHF_OFFLINE"):
        print("note: RLHF_OFFLINE is set, so GPT-2's encoding is not downloaded; the comparison is skipped")
        return None
    try:
        return get_tokenizer("gpt2")
    except (SystemExit, Exception) as e:
        print(f"note: GPT-2's encoding is not available here ({str(e).splitlines()[0][:90]}...); comparison skipped")
        return None


def print_table(rows, headers, formats=None):
    """An aligned text table (pandas is not a dependency). rows: lists of values; formats: per column."""
    formats = formats or [""] * len(headers)
    cells = [[format(v, f) if f and isinstance(v, (int, float)) else str(v) for v, f in zip(r, formats)] for r in rows]
    widths = [max(len(str(h)), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = "  ".join(f"{h:>{w}}" for h, w in zip(headers, widths))
    print(line)
    print("-" * len(line))
    for c in cells:
        print("  ".join(f"{v:>{w}}" for v, w in zip(c, widths)))
