"""torchrun: each stage run as 2 CPU processes (gloo) against 1 process on the same global batch.

    torchrun --standalone --nproc_per_node=2 <script> --key=value ...

pretrain, SFT and the reward model must follow the single-process run step for step: both ranks
slice the same global batch, DDP averages the gradients, the logged losses are all-reduced. Not
bitwise: a batch split in two sums in a different order (losses differ by ~1e-6 over these few
steps), so they are compared with a tolerance. The SFT and reward runs end each epoch with a
batch of ONE example, which leaves rank 1 with nothing to train on (it must still join the
gradient all-reduce). PPO is different by design: each rank samples its own prompts and answers,
so the test rebuilds both ranks' first rollouts in this process and checks that the logged
statistics (and the oracle mode's score normalisation) are taken over both ranks' answers, and
that the first minibatch still sees ratio == 1 / approx-KL == 0; advantage whitening and explained
variance are checked directly on a 2-process gloo group. Every 2-process run also checks that only
rank 0 wrote (one metrics row per step, one log line per event). All runs use --threads=1 and
OMP_NUM_THREADS=1: with a fixed thread count the numbers are reproducible across processes.
"""
import contextlib
import json
import os
import random
import subprocess
import sys

import pytest
import torch

from conftest import MAX_NEW_TOKENS, REPO, ppo_args, pretrain_args, run_script

from common import read_jsonl
from engine import load_model


def torchrun(script, *args, nproc=2, timeout=300):
    """`python -m torch.distributed.run --standalone --nproc_per_node=2 <script> args... --device=cpu
    --threads=1` from the repo root; a failure shows the end of both ranks' output."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(REPO, script), *args, "--device=cpu", "--threads=1"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited with {proc.returncode}\n--- stdout ---\n"
                             f"{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}")
    return proc


def metrics(out_dir):
    return read_jsonl(os.path.join(out_dir, "metrics.jsonl"))


def assert_same_curves(one, two, keys, rtol=1e-4, atol=1e-5):
    """Per-step values of `keys` in two metrics.jsonl row lists agree within the tolerance."""
    assert len(one) == len(two) and len(one) > 0
    for a, b in zip(one, two):
        for k in keys:
            if k in a or k in b:
                assert b[k] == pytest.approx(a[k], rel=rtol, abs=atol), (k, a, b)


def write_lines(path, lines):
    with open(path, "w") as f:
        f.writelines(lines)
    return str(path)


# ----------------------------------------------------------------------------- pretrain, SFT, reward model

def test_pretrain_two_ranks_follow_one_process(tiny_world, tmp_path):
    # 12 steps of 16 sequences; the 2-rank run also accumulates 2 micro-batches of 4 per rank, so that
    # DDP's no-sync path (require_backward_grad_sync) is exercised. Fresh out_dirs: each run tokenises,
    # the 2-rank run through rank0_first (rank 0 writes the token cache, rank 1 then reads it).
    opts = dict(max_steps=12, warmup_steps=4, eval_interval=6, log_interval=6)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run_script("pretrain.py", *pretrain_args(tiny_world, one, **opts))
    proc = torchrun("pretrain.py", *pretrain_args(tiny_world, two, **opts), "--grad_accum=2")
    a, b = metrics(one), metrics(two)
    assert [r["step"] for r in b] == list(range(1, 13))  # one row per step: rank 1 did not append
    assert_same_curves(a, b, ["train_loss", "grad_norm", "val_loss"])
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    assert proc.stdout.count("| val loss") == 2 and proc.stdout.count("done:") == 1  # rank 0 alone logs
    s1, s2 = (json.load(open(os.path.join(d, "summary.json"))) for d in (one, two))
    assert s2["val_loss"] == pytest.approx(s1["val_loss"], rel=1e-4)
    w1, w2 = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True)["model"] for d in (one, two))
    assert all(torch.allclose(w1[k], w2[k], rtol=1e-3, atol=1e-5) for k in w1)


def test_sft_two_ranks_follow_one_process(tiny_world, pretrain_run, tmp_path):
    # 33 demonstrations in batches of 16: each epoch ends with a batch of ONE, so rank 1 gets nothing
    # and must still join DDP's gradient all-reduce (with a fully masked dummy example)
    train = write_lines(tmp_path / "train.jsonl", open(tiny_world.sft_train).readlines()[:33])
    val = write_lines(tmp_path / "val.jsonl", open(tiny_world.sft_val).readlines()[:8])
    prompts = write_lines(tmp_path / "prompts.jsonl", open(tiny_world.prompts_dev).readlines()[:3])
    args = [f"--init_from={pretrain_run}/ckpt.pt", f"--train_data={train}", f"--val_data={val}",
            f"--prompts={prompts}", "--epochs=2", "--batch_size=16", "--lr=3e-3", "--warmup_steps=2",
            "--eval_interval=3", "--eval_samples=1", "--max_new_tokens=16"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run_script("sft.py", *args, f"--out_dir={one}")
    proc = torchrun("sft.py", *args, f"--out_dir={two}")
    a, b = metrics(one), metrics(two)
    assert [r["step"] for r in b] == list(range(1, 7))
    assert_same_curves(a, b, ["train_loss", "grad_norm", "val_loss"])
    # the gold evaluation runs on rank 0 only (no collective inside it), while rank 1 waits at the end
    assert proc.stdout.count("evaluating the SFT model") == 1
    s1, s2 = (json.load(open(os.path.join(d, "summary.json"))) for d in (one, two))
    assert s2["sft_greedy_gold_mean"] == pytest.approx(s1["sft_greedy_gold_mean"], abs=1e-6)


def test_reward_model_two_ranks_collect_once_and_follow_one_process(tiny_world, sft_run, tmp_path):
    # Under torchrun rank 0 samples and labels the comparisons, writes comparisons.jsonl, and the other
    # rank reads that file. What rank 0 will collect is known in advance (same seed, one thread): the
    # batch size is chosen so that each epoch ends with a batch of ONE comparison, which leaves rank 1
    # without a prompt: it must still join DDP's gradient all-reduce (a dummy with weight 0).
    label = write_lines(tmp_path / "label.jsonl", open(tiny_world.prompts_label).readlines()[:24])
    collected = collect_in_process(sft_run, label, tiny_world.dir, k=4, double_label=6)
    n = len(collected)
    n_val = 1 if (n - 1) % 2 else 2  # an odd number of training comparisons ...
    n_train = n - n_val
    assert n_train >= 5, f"only {n} comparisons from 24 tiny-world prompts"
    batch = next(b for b in range(4, n_train, 2) if n_train % b == 1)  # ... ending each epoch with a batch of 1
    args = [f"--init_from={sft_run}/ckpt.pt", f"--label_prompts={label}", f"--demonstrations={tiny_world.sft_train}",
            f"--world_dir={tiny_world.dir}", "--k=4", "--double_label=6", f"--val_fraction={(n_val + 0.5) / n}",
            "--epochs=2", "--ensemble=2", f"--batch_size={batch}", "--warmup_steps=2", "--best_of=0", "--n_norm=32",
            f"--max_new_tokens={MAX_NEW_TOKENS}"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run_script("reward.py", *args, f"--out_dir={one}")
    proc = torchrun("reward.py", *args, f"--out_dir={two}")
    assert proc.stdout.count("collected") == 1  # rank 0 alone collected ...
    assert read_jsonl(os.path.join(two, "comparisons.jsonl")) == json.loads(json.dumps(collected))  # ... this
    a, b = metrics(one), metrics(two)
    steps_per_epoch = -(-n_train // batch)
    assert [r["step"] for r in b] == list(range(1, 2 * 2 * steps_per_epoch + 1))  # 2 members x 2 epochs
    assert_same_curves(a, b, ["loss", "accuracy", "margin", "grad_norm", "val_acc_vs_labels", "val_mean_margin"])
    s1, s2 = (json.load(open(os.path.join(d, "summary.json"))) for d in (one, two))
    for key in ("demo_mean_before", "sample_std_before"):  # the normalisation, on rank 0 after training
        assert s2["normalization"][key] == pytest.approx(s1["normalization"][key], rel=1e-3, abs=1e-4)


def collect_in_process(sft_dir, label_prompts, world_dir, k, double_label):
    """reward.collect_comparisons as the 2-rank run's rank 0 ran it (1 thread, the default seed)."""
    import reward
    from data import world as W
    from data.formats import read_prompts
    from tokenizer import get_tokenizer
    cfg = reward.Config(k=k, double_label=double_label, max_new_tokens=MAX_NEW_TOKENS)
    policy, ckpt = load_model(os.path.join(sft_dir, "ckpt.pt"))
    labelers = W.load_labelers(world_dir)
    rows = [r for r in read_prompts(label_prompts) if r.get("world")]
    with one_thread():
        comps, _ = reward.collect_comparisons(policy, get_tokenizer(ckpt["tokenizer"]), rows, cfg, "cpu",
                                              labelers["labelers"], labelers["bias"])
    return comps


@contextlib.contextmanager
def one_thread():
    """torch.set_num_threads(1) for a block: bitwise the numbers of a --threads=1 subprocess."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


# ----------------------------------------------------------------------------- PPO

def _global_statistics_on_rank(rank, world, init_file, out_dir, x, values, returns, mask):
    """One rank of test_ppo_statistics_are_global: its half of the batch, statistics over both."""
    import torch.distributed as dist
    import ppo
    import rl
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    rows = slice(rank * 3, rank * 3 + 3)
    result = {"whitened": rl.masked_whiten(x[rows], mask[rows]).tolist(),
              "explained_variance": ppo.explained_variance(values[rows], returns[rows], mask[rows])}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_ppo_statistics_are_global_across_ranks(tmp_path):
    # advantage whitening (detail 6) and explained variance on 2 ranks x 3 answers equal the
    # single-process statistics of all 6 answers (the ranks' halves have different means on purpose)
    import ppo
    import rl
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 5, generator=g) + torch.tensor([[2.0]] * 3 + [[-1.0]] * 3)  # (B, N)
    values, returns = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    mask = torch.ones(6, 5)
    mask[0, 3:], mask[4, 1:] = 0, 0  # answers of different lengths
    torch.multiprocessing.spawn(_global_statistics_on_rank, nprocs=2, join=True, args=(
        2, str(tmp_path / "init"), str(tmp_path), x, values, returns, mask))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    whitened = torch.tensor(ranks[0]["whitened"] + ranks[1]["whitened"])
    torch.testing.assert_close(whitened, rl.masked_whiten(x, mask))
    assert not torch.allclose(rl.masked_whiten(x[:3], mask[:3]), whitened[:3], atol=1e-3)  # local != global
    expected = ppo.explained_variance(values, returns, mask)
    for r in ranks:
        assert r["explained_variance"] == pytest.approx(expected, rel=1e-5)


def test_ppo_two_ranks_log_global_means_of_their_own_rollouts(tiny_world, pretrain_run, sft_run, reward_run,
                                                              tmp_path):
    out = str(tmp_path / "ppo")
    args = ppo_args(tiny_world, sft_run, reward_run, pretrain_run, out, iterations=2, rollout_batch=8,
                    minibatch=4, ppo_epochs=2, eval_samples=1, save_interval=1, ptx_coef=0.1, ptx_batch=2,
                    reward="gold")  # oracle mode: its score normalisation must use both ranks' answers
    proc = torchrun("ppo.py", *args)
    rows = metrics(out)
    assert [r["iteration"] for r in rows] == [1, 2]  # rank 0 alone wrote
    assert proc.stdout.count("win rate vs SFT") == 1  # the final evaluation ran once, on rank 0
    # detail 9 on both ranks: the first minibatch's log-probs are the rollout's
    assert rows[0]["first_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert rows[0]["first_approx_kl"] == pytest.approx(0.0, abs=1e-7)

    # rebuild each rank's first rollout (its own prompt stream and sampler, seeded by rank)
    import ppo
    import rl
    from data.formats import read_prompts
    from engine import load_reward_model
    from tokenizer import get_tokenizer
    saved = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    cfg = ppo.Config(**saved["config"])
    policy, ckpt = load_model(os.path.join(sft_run, "ckpt.pt"))
    rm, _ = load_reward_model(os.path.join(reward_run, "ckpt.pt"))
    ref = load_model(os.path.join(sft_run, "ckpt.pt"))[0].eval()
    tok, prompts = get_tokenizer(ckpt["tokenizer"]), read_prompts(tiny_world.prompts_ppo)
    ranks = []
    with one_thread():
        for rank in (0, 1):  # as ppo.train seeds them
            prompt_rng = random.Random(cfg.seed + rank)
            batch = [prompts[prompt_rng.randrange(len(prompts))] for _ in range(4)]
            gen = torch.Generator().manual_seed(cfg.seed + 1000 * rank)
            ranks.append(rl.rollout(policy, ref, rm.eval(), tok, batch, cfg, "cpu", gen))
    assert ranks[0]["texts"] != ranks[1]["texts"]  # the ranks sampled different answers
    per_rank = [ro["raw_scores"].mean().item() for ro in ranks]
    assert abs(per_rank[0] - per_rank[1]) > 1e-3  # so the mean below tells "both ranks" from "rank 0"
    both = lambda f: sum(f(ro) for ro in ranks) / 8  # noqa: E731  mean over the 8 answers of both ranks
    assert rows[0]["rm_score"] == pytest.approx(both(lambda ro: ro["raw_scores"].sum().item()), abs=1e-5)
    raw = torch.cat([ro["raw_scores"] for ro in ranks])  # (8,) gold scores of both ranks' answers
    assert saved["gold_norm"] == pytest.approx([raw.mean().item(), raw.std().item()], rel=1e-5)
    eos_trick = lambda ro: torch.where(ro["ended"], (ro["raw_scores"] - raw.mean()) / raw.std(),  # noqa: E731
                                       cfg.no_eos_score).sum().item()
    assert rows[0]["reward"] == pytest.approx(both(eos_trick), abs=1e-5)
    assert rows[0]["answer_length"] == pytest.approx(both(lambda ro: ro["resp_mask"].sum().item()), abs=1e-5)
    assert rows[0]["eos_rate"] == pytest.approx(both(lambda ro: ro["ended"].sum().item()), abs=1e-6)
    assert rows[0]["gold"] == pytest.approx(both(lambda ro: sum(j["score"] for j in ro["judged"])), abs=1e-5)

    # the checkpoint keeps every rank's sampling streams for --resume
    assert saved["iteration"] == 2 and len(saved["rank_streams"]) == 2
    assert not torch.equal(saved["rank_streams"][0]["gen_state"], saved["rank_streams"][1]["gen_state"])
    assert os.path.exists(os.path.join(out, "summary.json"))
