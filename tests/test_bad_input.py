"""Bad input gets one clear error and loses nothing; every stage resumes exactly.

1. CASES, one row per bad input or option: the script, its arguments (on top of a valid tiny command
   line), files to write first, the finished run whose folder is copied into --out_dir beforehand, the
   expected exit code and a fragment of the message. Each row checks: exit code 2, ONE line on stderr
   starting with "error:" that contains the fragment, no traceback, and every file of the earlier run
   in --out_dir unchanged (hashed before and after). Rows run in this process through
   common.run_command, the code every script's `__main__` runs; the rows marked SUBPROCESS also run
   through the real command line (exit status, stderr, no traceback).
2. RANGE_ROWS: every option with a declared range, given a value just outside it, fails at parse time
   naming the option and its range.
3. Loading: what the readers drop, cut or refuse, with line numbers; the reward model's cropping.
4. Checkpoints: kill -9 during saves leaves a loadable checkpoint and the resumed run equals the
   uninterrupted one; a crash in the middle of writing keeps the previous checkpoint; stale .tmp removed.
5. Resume equality, bitwise at one thread, for pretrain, SFT (also a kill in the final evaluation),
   PPO-ptx, GRPO, DPO and rejection sampling: a run crashed just before a checkpoint (so metrics.jsonl
   holds rows the checkpoint does not cover) and resumed equals the uninterrupted run: metrics rows
   (timing keys aside), the history, the summary and the final weights. The reward ensemble's is in
   test_reward.py; RLOO's (a finished run continued) in test_methods.py.
The step-3 methods beside PPO (grpo.py, dpo.py, rejection.py) and compare.py have rows of their own.
"""
import contextlib
import hashlib
import importlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import types

import pytest
import torch

import common
from conftest import MAX_NEW_TOKENS, REPO, ppo_args, pretrain_args, run_script
from data.formats import read_prompts
from engine import encode_answers, load_model
from tokenizer import get_tokenizer

TIMING = {"tokens_per_sec", "rollout_seconds", "update_seconds", "elapsed", "seconds", "train_seconds",
          "collect_seconds", "eval_seconds", "ref_logprob_seconds", "sample_seconds", "sft_seconds"}
METHODS = ("grpo", "dpo", "rejection", "compare")  # the step-3 methods beside PPO, and their comparison


# ----------------------------------------------------------------------------- helpers

@pytest.fixture(autouse=True)
def keep_threads():
    """In-process runs set torch's thread count (--threads=1): give the rest of the suite its own back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def base_args(script, world, runs, out):
    """A valid tiny command line of each script, into `out` (the same options as the conftest fixtures)."""
    if script == "pretrain":
        return pretrain_args(world, out)
    if script == "sft":
        return [f"--init_from={runs.pretrain}/ckpt.pt", f"--train_data={world.sft_train}",
                f"--val_data={world.sft_val}", f"--prompts={world.prompts_dev}", f"--out_dir={out}", "--epochs=2",
                "--batch_size=16", "--eval_samples=2", f"--max_new_tokens={MAX_NEW_TOKENS}"]
    if script == "reward":
        return [f"--init_from={runs.sft}/ckpt.pt", f"--label_prompts={world.prompts_label}",
                f"--demonstrations={world.sft_train}", f"--eval_prompts={world.prompts_dev}",
                f"--world_dir={world.dir}", f"--out_dir={out}", "--k=4", "--double_label=20", "--epochs=2",
                "--batch_size=8", "--best_of=4", f"--max_new_tokens={MAX_NEW_TOKENS}"]
    if script == "ppo":
        return ppo_args(world, runs.sft, runs.reward, runs.pretrain, out, iterations=2, rollout_batch=8,
                        minibatch=4, eval_samples=1, ptx_coef=0.1, ptx_batch=4)
    models = [f"--sft={runs.sft}/ckpt.pt", f"--reward_model={runs.reward}/ckpt.pt", f"--eval_prompts={world.prompts_dev}",
              f"--out_dir={out}", "--eval_samples=1", f"--max_new_tokens={MAX_NEW_TOKENS}"]
    if script == "grpo":
        return models + [f"--prompts={world.prompts_ppo}", "--iterations=2", "--prompts_per_iter=4", "--k=2",
                         "--minibatch=4"]
    if script == "dpo":
        return models + [f"--comparisons={runs.reward}/comparisons.jsonl", "--batch_size=8", "--eval_interval=3"]
    if script == "rejection":
        return models + [f"--prompts={world.prompts_ppo}", "--prompts_per_round=8", "--n=2", "--chunk=8",
                         "--epochs=1", "--batch_size=4"]
    if script == "compare":
        return models + [f"--prompts={world.prompts_ppo}", "--results=", "--plot=", "--readme=", "--budget=64",
                         "--best_of=2", "--methods=grpo,dpo"]
    return [f"--checkpoint={runs.sft}/ckpt.pt", "--prompt=hello!", "--max_new_tokens=8"]  # chat


def run_in_process(script, args):
    """`python <script>.py args --device=cpu [--threads=1]` in this process: (exit code, stdout, stderr)."""
    module = importlib.import_module(script)
    argv = ["--device=cpu"] + ([] if script == "chat" else ["--threads=1"]) + list(args)  # args may override these
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            common.run_command(module.main if script in ("chat", "compare") else module.train, module.Config, argv)
            code = 0
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def tree_hashes(folder):
    """{relative path: sha256} of every file under folder ({} if it does not exist)."""
    hashes = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                hashes[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return hashes


def jsonl(*rows):
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


LONG = "please " * 120 + "say hi."  # ~120+ tokens: longer than the tiny context of 96
SFT_ROW = {"prompt": "say hi.", "response": "hi!"}
CMP_ROW = {"prompt": "say hi.", "responses": ["hi!", "no."], "ranking": [0, 1]}

# (id, script, extra args, {file: contents} written first ("out/..." goes into --out_dir), the stage whose
#  finished run is copied into --out_dir first (or None), expected message fragment)
# Placeholders: {out} the --out_dir, {tmp} a scratch folder, {pretrain} {sft} {reward} {ppo} the finished
# runs' folders, {world} the tiny world's folder.
CASES = [
    # 1. --resume of another stage's checkpoint, of a finished run, of nothing
    ("sft resumes a pretrain ckpt", "sft", ["--resume"], {}, "pretrain", "a checkpoint of pretrain.py, not of sft.py"),
    ("pretrain resumes an sft ckpt", "pretrain", ["--resume"], {}, "sft", "is a checkpoint of sft.py, not of pretrain"),
    ("reward resumes an sft ckpt", "reward", ["--resume"], {}, "sft", "is a checkpoint of sft.py, not of reward.py"),
    ("ppo resumes a reward ckpt", "ppo", ["--resume"], {}, "reward", "is a checkpoint of reward.py, not of ppo.py"),
    ("ppo resumes an sft ckpt", "ppo", ["--resume"], {}, "sft", "is a checkpoint of sft.py, not of ppo.py"),
    ("pretrain resumes a finished run", "pretrain", ["--resume"], {}, "pretrain", "has finished (step 150)"),
    ("sft resumes a finished run", "sft", ["--resume"], {}, "sft", "has finished (step 34)"),
    ("reward resumes a finished run", "reward", ["--resume"], {}, "reward", "has finished"),
    ("ppo resumes a finished run", "ppo", ["--resume"], {}, "ppo", "has finished (iteration 2)"),
    ("pretrain resumes nothing", "pretrain", ["--resume"], {}, None, "ckpt.pt' does not exist (nothing to resume"),
    ("sft resumes nothing", "sft", ["--resume"], {}, None, "does not exist (nothing to resume"),
    ("reward resumes nothing", "reward", ["--resume"], {}, None, "does not exist (nothing to resume"),
    ("ppo resumes nothing", "ppo", ["--resume"], {}, None, "does not exist (nothing to resume"),
    ("resume of a 0-byte ckpt", "pretrain", ["--resume"], {"out/ckpt.pt": ""}, None, "the file is empty (0 bytes)"),
    ("sft resumes a ppo ckpt", "sft", ["--resume"], {"out/ckpt.pt": "COPY:{ppo}/ckpt.pt"}, None,
     "is a checkpoint of ppo.py, not of sft.py"),
    ("resume with another shape", "pretrain", ["--resume", "--n_embd=64"], {}, "pretrain", "has finished"),
    ("resume with another shape, more steps", "pretrain", ["--resume", "--n_embd=64", "--max_steps=160"], {},
     "pretrain", "holds a model of another shape"),
    # 2. PPO / chat with a reward model of another tokenizer
    ("ppo, RM of another tokenizer", "ppo", ["--reward_model={tmp}/rm_gpt2.pt"], {}, "ppo", "uses tokenizer 'gpt2'"),
    ("chat, RM of another tokenizer", "chat", ["--reward_model={tmp}/rm_gpt2.pt"], {}, None, "uses tokenizer 'gpt2'"),
    # 3. runs that would train zero steps, or would empty the comparisons
    ("pretrain --max_steps=0", "pretrain", ["--max_steps=0"], {}, "pretrain", "--max_steps=0: must be at least 1"),
    ("sft --epochs=0", "sft", ["--epochs=0"], {}, "sft", "--epochs=0: must be at least 1"),
    ("pretrain --val_fraction=1", "pretrain", ["--val_fraction=1"], {}, "pretrain", "must be at least 0 and below 1"),
    ("reward --val_fraction=1", "reward", ["--val_fraction=1"], {}, "reward", "must be at least 0 and below 1"),
    ("reward --k=1", "reward", ["--k=1"], {}, "reward", "--k=1: must be at least 2"),
    ("reward, one comparison", "reward", ["--comparisons={tmp}/one.jsonl"], {"one.jsonl": jsonl(CMP_ROW)}, "reward",
     "one.jsonl: 1 comparison(s), at least 2 are needed"),
    ("ppo --iterations=0", "ppo", ["--iterations=0"], {}, "ppo", "--iterations=0: must be at least 1"),
    # 6. errors in data files: one line, file and line named, at load time
    ("sft, invalid JSON", "sft", ["--train_data={tmp}/bad.jsonl"], {"bad.jsonl": jsonl(SFT_ROW, "{oops")}, "sft",
     "bad.jsonl line 2: invalid JSON"),
    ("sft, missing data file", "sft", ["--val_data={tmp}/nope.jsonl"], {}, "sft", "nope.jsonl: no such file"),
    ("ppo, prompt longer than the context", "ppo", ["--prompts={tmp}/long.jsonl"],
     {"long.jsonl": jsonl({"prompt": LONG}, {"prompt": LONG})}, "ppo",
     "long.jsonl line 1: a prompt of"),
    ("ppo eval prompt longer than the context", "ppo", ["--eval_prompts={tmp}/long.jsonl"],
     {"long.jsonl": jsonl({"prompt": LONG})}, "ppo", "long.jsonl line 1: a prompt of"),
    ("reward --ensemble=0 (before sampling)", "reward", ["--ensemble=0"], {}, "reward", "--ensemble=0: must be at"),
    ("ppo --reward=gold without records", "ppo", ["--reward=gold", "--prompts={tmp}/p.jsonl"],
     {"p.jsonl": jsonl({"prompt": "say hi."})}, "ppo", "--reward=gold needs a gold judge"),
    ("ppo-ptx without pretraining tokens", "ppo", ["--pretrain_tokens={tmp}/none"], {}, "ppo",
     "--ptx_coef=0.1 needs"),
    ("ppo-ptx, tokens of another tokenizer", "ppo", ["--pretrain_tokens={tmp}/big"],
     {"big/train.bin": "BIN:60000", "big/val.bin": "BIN:60000"}, "ppo", "holds token ids beyond its vocabulary"),
    ("ppo-ptx, too few tokens", "ppo", ["--pretrain_tokens={tmp}/short"],
     {"short/train.bin": "BIN:5", "short/val.bin": "BIN:5"}, "ppo", "needs 98 tokens in each"),
    ("reward, no labelers.json", "reward", ["--world_dir={tmp}"], {}, "reward", "labelers.json: cannot read the labeler"),
    ("reward, labelers.json not JSON", "reward", ["--world_dir={tmp}"], {"labelers.json": "{oops"}, "reward",
     "labelers.json: cannot read the labeler pool (Expecting property name"),
    ("pretrain, not a .tiktoken file", "pretrain", ["--tokenizer={tmp}/bad.tiktoken"], {"bad.tiktoken": "oops\n"},
     "pretrain", "bad.tiktoken' is not a .tiktoken file"),
    ("sft, a folder that is not GPT-2", "sft", ["--init_from={tmp}"], {}, "sft",
     "cannot load GPT-2 weights"),
    ("pretrain, --out_dir names a file", "pretrain", ["--out_dir={tmp}/rm_gpt2.pt/run"], {}, "pretrain",
     "rm_gpt2.pt/run: must be a folder, or a path where one can be made"),
    ("sft, a reward ckpt as init", "sft", ["--init_from={reward}/ckpt.pt"], {}, "sft", "is not a policy checkpoint"),
    ("ppo, a policy as reward model", "ppo", ["--reward_model={sft}/ckpt.pt"], {}, "ppo",
     "is not a reward model checkpoint"),
    ("sft, 0-byte init ckpt", "sft", ["--init_from={tmp}/empty.pt"], {"empty.pt": ""}, "sft", "the file is empty"),
    ("sft, truncated init ckpt", "sft", ["--init_from={tmp}/cut.pt"], {"cut.pt": "HEAD:{pretrain}/ckpt.pt"}, "sft",
     "cannot read checkpoint"),
    ("pretrain, missing tokenizer", "pretrain", ["--tokenizer={tmp}/nope.tiktoken"], {}, "pretrain",
     "nope.tiktoken' does not exist"),
    ("pretrain, missing corpus", "pretrain", ["--corpus={tmp}/nope.txt"], {}, "pretrain", "nope.txt' does not exist"),
    # 7. options
    ("pretrain --lr=inf", "pretrain", ["--lr=inf"], {}, "pretrain", "--lr=inf: must be a finite number"),
    ("sft --lr=nan", "sft", ["--lr=nan"], {}, "sft", "--lr=nan: must be a finite number"),
    ("reward --lr=-inf", "reward", ["--lr=-inf"], {}, "reward", "--lr=-inf: must be a finite number"),
    ("ppo --lr=inf", "ppo", ["--lr=inf"], {}, "ppo", "--lr=inf: must be a finite number"),
    ("pretrain --batch_size=0", "pretrain", ["--batch_size=0"], {}, "pretrain", "--batch_size=0: must be at least 1"),
    ("ppo --save_interval=0", "ppo", ["--save_interval=0"], {}, "ppo", "--save_interval=0: must be at least 1"),
    ("reward --n_norm=0", "reward", ["--n_norm=0"], {}, "reward", "--n_norm=0: must be at least 1"),
    ("sft --max_new_tokens=0", "sft", ["--max_new_tokens=0"], {}, "sft", "--max_new_tokens=0: must be at least 1"),
    ("ppo --max_new_tokens=0", "ppo", ["--max_new_tokens=0"], {}, "ppo", "--max_new_tokens=0: must be at least 1"),
    ("chat --max_new_tokens=0", "chat", ["--max_new_tokens=0"], {}, None, "--max_new_tokens=0: must be at least 1"),
    ("chat --max_new_tokens past the context", "chat", ["--max_new_tokens=200"], {}, None,
     "--max_new_tokens=200 leaves no room for a prompt"),
    ("pretrain --block_size=0", "pretrain", ["--block_size=0"], {}, "pretrain", "--block_size=0: must be at least 1"),
    ("chat --temperature=-1", "chat", ["--temperature=-1"], {}, None, "--temperature=-1.0: must be at least 0"),
    ("chat --top_k=-1", "chat", ["--top_k=-1"], {}, None, "--top_k=-1: must be at least 0"),
    ("chat --top_p=0", "chat", ["--top_p=0"], {}, None, "--top_p=0.0: must be greater than 0 and at most 1"),
    ("chat --top_p=1.5", "chat", ["--top_p=1.5"], {}, None, "must be greater than 0 and at most 1"),
    ("pretrain --device=tpu", "pretrain", ["--device=tpu"], {}, "pretrain", "--device=tpu: must be auto, cpu, cuda"),
    ("sft --device=cuda:x", "sft", ["--device=cuda:x"], {}, "sft", "--device=cuda:x: must be auto"),
    ("chat --device=tpu", "chat", ["--device=tpu"], {}, None, "--device=tpu: must be auto"),
    ("sft --dtype=fp16", "sft", ["--dtype=fp16"], {}, "sft", "--dtype=fp16: must be auto, float32"),
    ("ppo --reward=judge", "ppo", ["--reward=judge"], {}, "ppo", "--reward=judge: must be one of rm | gold"),
    ("ppo --value_model=tied", "ppo", ["--value_model=tied"], {}, "ppo", "must be one of separate | shared"),
    ("ppo rollout vs minibatch", "ppo", ["--minibatch=3"], {}, "ppo", "--rollout_batch=8: must split into 1 rank(s)"),
    ("pretrain batch vs grad_accum", "pretrain", ["--grad_accum=3"], {}, "pretrain",
     "--batch_size=16: must divide by world size x grad_accum (1 x 3)"),
    ("pretrain n_embd vs n_head", "pretrain", ["--n_embd=31"], {}, "pretrain", "--n_embd=31: must be a multiple of"),
    ("pretrain --init_from=gpt3", "pretrain", ["--init_from=gpt3"], {}, "pretrain", "--init_from=gpt3: must be"),
    ("unknown option", "sft", ["--epoch=3"], {}, "sft", "unknown option --epoch; valid keys"),
    ("not --key=value", "reward", ["k=4"], {}, "reward", "is not of the form --key=value"),
    ("bad boolean", "ppo", ["--adaptive_kl=maybe"], {}, "ppo", "expected true or false"),
    ("bad integer", "pretrain", ["--max_steps=1.5"], {}, "pretrain", "(expected int)"),
    # 8. silent misreads and truncation
    ("sft, ended as a string", "sft", ["--train_data={tmp}/e.jsonl"],
     {"e.jsonl": jsonl(SFT_ROW, SFT_ROW | {"ended": "false"})}, "sft", 'line 2: field "ended" must be true or false'),
    ("reward, ended as strings", "reward", ["--comparisons={tmp}/e.jsonl"],
     {"e.jsonl": jsonl(CMP_ROW, CMP_ROW | {"ended": ["false", True]})}, "reward",
     'line 2: field "ended" must be a list of 2 booleans'),
    ("reward, duplicate answers", "reward", ["--comparisons={tmp}/d.jsonl"],
     {"d.jsonl": jsonl(CMP_ROW, CMP_ROW | {"responses": ["hi!", "hi!"]})}, "reward",
     'line 2: field "responses": answers 0 and 1 are the same'),
    ("reward, answer longer than the context", "reward", ["--comparisons={tmp}/l.jsonl"],
     {"l.jsonl": jsonl(CMP_ROW, CMP_ROW | {"responses": ["hi!", LONG]})}, "reward",
     "l.jsonl line 2: an answer of"),
    ("sft, prompt longer than the context", "sft", ["--train_data={tmp}/p.jsonl"],
     {"p.jsonl": jsonl(SFT_ROW, {"prompt": LONG, "response": "hi!"})}, "sft",
     "p.jsonl line 2: the prompt takes"),
    ("pretrain, corpus not UTF-8", "pretrain", ["--corpus={tmp}/latin1.txt"],
     {"latin1.txt": "BYTES:caf\xe9 au lait\n"}, "pretrain", "latin1.txt line 1: not valid UTF-8 text"),
    ("pretrain, corpus shorter than a batch", "pretrain", ["--corpus={tmp}/short.txt"],
     {"short.txt": "once upon a time.\n"}, "pretrain", "a window of --block_size=96 needs 98"),
    ("pretrain, empty corpus", "pretrain", ["--corpus={tmp}/empty.txt"], {"empty.txt": "\n\n"}, "pretrain",
     "empty.txt: file is empty"),
    # 9. the step-3 methods beside PPO and compare.py: resume, options, inputs (read before anything is written)
    ("grpo resumes a ppo ckpt", "grpo", ["--resume"], {}, "ppo", "is a checkpoint of ppo.py, not of grpo.py"),
    ("grpo resumes a finished run", "grpo", ["--resume"], {}, "grpo", "has finished (iteration 2)"),
    ("grpo resumes nothing", "grpo", ["--resume"], {}, None, "does not exist (nothing to resume"),
    ("grpo --estimator=ppo", "grpo", ["--estimator=ppo"], {}, "grpo", "must be one of rloo | grpo | drgrpo"),
    ("grpo --kl=both", "grpo", ["--kl=both"], {}, "grpo", "--kl=both: must be one of reward | loss"),
    ("grpo --k=1", "grpo", ["--k=1"], {}, "grpo", "--k=1: must be at least 2"),
    ("grpo --lr=nan", "grpo", ["--lr=nan"], {}, "grpo", "--lr=nan: must be a finite number"),
    ("grpo rollout vs minibatch", "grpo", ["--minibatch=3"], {}, "grpo",
     "--minibatch=3: must divide the rollout's --prompts_per_iter x --k = 8 answers"),
    ("grpo, missing prompts", "grpo", ["--prompts={tmp}/nope.jsonl"], {}, "grpo", "nope.jsonl: no such file"),
    ("grpo, missing eval prompts", "grpo", ["--eval_prompts={tmp}/nope.jsonl"], {}, "grpo", "nope.jsonl: no such file"),
    ("grpo, every prompt too long", "grpo", ["--prompts={tmp}/long.jsonl"], {"long.jsonl": jsonl({"prompt": LONG})},
     "grpo", "long.jsonl line 1: a prompt of"),
    ("grpo --reward=gold without records", "grpo", ["--reward=gold", "--prompts={tmp}/p.jsonl"],
     {"p.jsonl": jsonl({"prompt": "say hi."})}, "grpo", "--reward=gold needs a gold judge"),
    ("grpo, a policy as reward model", "grpo", ["--reward_model={sft}/ckpt.pt"], {}, "grpo",
     "is not a reward model checkpoint"),
    ("grpo, RM of another tokenizer", "grpo", ["--reward_model={tmp}/rm_gpt2.pt"], {}, "grpo", "uses tokenizer 'gpt2'"),
    ("dpo resumes a reward ckpt", "dpo", ["--resume"], {}, "reward", "is a checkpoint of reward.py, not of dpo.py"),
    ("dpo resumes a finished run", "dpo", ["--resume"], {}, "dpo", "has finished (step"),
    ("dpo --beta=0", "dpo", ["--beta=0"], {}, "dpo", "--beta=0.0: must be greater than 0"),
    ("dpo --val_fraction=1", "dpo", ["--val_fraction=1"], {}, "dpo", "must be at least 0 and below 1"),
    ("dpo --eval_interval=0", "dpo", ["--eval_interval=0"], {}, "dpo", "--eval_interval=0: must be at least 1"),
    ("dpo, missing comparisons", "dpo", ["--comparisons={tmp}/nope.jsonl"], {}, "dpo", "nope.jsonl: no such file"),
    ("dpo, missing eval prompts", "dpo", ["--eval_prompts={tmp}/nope.jsonl"], {}, "dpo", "nope.jsonl: no such file"),
    ("dpo, one comparison", "dpo", ["--comparisons={tmp}/one.jsonl"], {"one.jsonl": jsonl(CMP_ROW)}, "dpo",
     "one.jsonl: 1 comparison(s), at least 2 are needed"),
    ("dpo, every comparison held out", "dpo", ["--comparisons={tmp}/c.jsonl", "--reward_model="],
     {"c.jsonl": jsonl(CMP_ROW, CMP_ROW | {"responses": ["hello!", "no."]})}, "dpo",
     "every comparison has the one held-out prompt"),
    ("dpo, answer longer than the context", "dpo", ["--comparisons={tmp}/l.jsonl"],
     {"l.jsonl": jsonl(CMP_ROW, CMP_ROW | {"responses": ["hi!", LONG]})}, "dpo", "l.jsonl line 2: an answer of"),
    ("dpo, a policy as reward model", "dpo", ["--reward_model={sft}/ckpt.pt"], {}, "dpo",
     "is not a reward model checkpoint"),
    ("rejection resumes an sft ckpt", "rejection", ["--resume"], {}, "sft", "is a checkpoint of sft.py, not of rejection"),
    ("rejection resumes a finished run", "rejection", ["--resume"], {}, "rejection", "has finished (round 1)"),
    ("rejection --reward=human", "rejection", ["--reward=human"], {}, "rejection", "--reward=human: must be one of rm"),
    ("rejection --n=0", "rejection", ["--n=0"], {}, "rejection", "--n=0: must be at least 1"),
    ("rejection --batch_size=0", "rejection", ["--batch_size=0"], {}, "rejection", "--batch_size=0: must be at least 1"),
    ("rejection --min_score=nan", "rejection", ["--min_score=nan"], {}, "rejection", "--min_score=nan: must be a finite"),
    ("rejection, missing prompts", "rejection", ["--prompts={tmp}/nope.jsonl"], {}, "rejection",
     "nope.jsonl: no such file"),
    ("rejection, missing eval prompts", "rejection", ["--eval_prompts={tmp}/nope.jsonl"], {}, "rejection",
     "nope.jsonl: no such file"),
    ("rejection, a policy as reward model", "rejection", ["--reward_model={sft}/ckpt.pt"], {}, "rejection",
     "is not a reward model checkpoint"),
    ("compare --methods=ppo,sac", "compare", ["--methods=ppo,sac"], {}, "compare", "--methods=ppo,sac: must list some"),
    ("compare --seeds=one", "compare", ["--seeds=one"], {}, "compare", "--seeds=one: must be one or more"),
    ("compare --budget=100", "compare", ["--budget=100"], {}, "compare", "--budget=100: must be a multiple of 64"),
    ("compare --best_of=3", "compare", ["--best_of=3"], {}, "compare", "--best_of=3: must be a power of 2"),
    ("compare --eval_samples=0", "compare", ["--eval_samples=0"], {}, "compare", "--eval_samples=0: must be at least"),
    ("compare, missing eval prompts", "compare", ["--eval_prompts={tmp}/nope.jsonl"], {}, "compare",
     "nope.jsonl: no such file"),
    ("compare, missing SFT checkpoint", "compare", ["--sft={tmp}/nope.pt"], {}, "compare", "nope.pt' does not exist"),
    ("compare, missing comparisons", "compare", ["--comparisons={tmp}/nope.jsonl"], {}, "compare",
     "nope.jsonl: no such file"),
    ("compare, README without the block", "compare", ["--readme={tmp}/README.md"], {"README.md": "# no block\n"},
     "compare", "README.md has no methods block"),
]
# rows that also run through the real command line (a subprocess): one of each kind
SUBPROCESS = {"sft resumes a pretrain ckpt", "sft, invalid JSON", "ppo --lr=inf", "chat --top_k=-1",
              "grpo --k=1", "dpo, missing comparisons", "rejection resumes a finished run", "compare --budget=100"}


@pytest.fixture(scope="module")
def runs(tiny_world, pretrain_run, sft_run, reward_run, ppo_run, tmp_path_factory):
    """The finished tiny runs (the four stages', and grpo.py's, dpo.py's, rejection.py's from their base command
    lines; compare.py's folder holds the grpo and dpo runs), and a reward model checkpoint that claims another
    tokenizer."""
    tmp = str(tmp_path_factory.mktemp("bad_input_shared"))
    ckpt = torch.load(os.path.join(reward_run, "ckpt.pt"), weights_only=True)
    common.save_checkpoint(os.path.join(tmp, "rm_gpt2.pt"), ckpt | {"tokenizer": "gpt2"})
    found = types.SimpleNamespace(pretrain=pretrain_run, sft=sft_run, reward=reward_run, ppo=ppo_run, shared=tmp)
    for script in METHODS[:3]:
        setattr(found, script, os.path.join(tmp, script))
        run_script(f"{script}.py", *base_args(script, tiny_world, found, getattr(found, script)))
    found.compare = os.path.join(tmp, "compare")
    for script in ("grpo", "dpo"):
        shutil.copytree(getattr(found, script), os.path.join(found.compare, "seed_1337", script))
    return found


def write_file(path, contents, names):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if contents.startswith("COPY:"):
        shutil.copy(contents[5:].format(**names), path)
    elif contents.startswith("HEAD:"):  # the first 2,000 bytes of a file: a truncated checkpoint
        with open(contents[5:].format(**names), "rb") as f, open(path, "wb") as g:
            g.write(f.read(2000))
    elif contents.startswith("BIN:"):  # 1,000 uint16 tokens of value N (or N tokens of value 1 when N < 100)
        n = int(contents[4:])
        (torch.full((1000,), n) if n >= 100 else torch.ones(n)).numpy().astype("uint16").tofile(path)
    elif contents.startswith("BYTES:"):
        with open(path, "wb") as f:
            f.write(contents[6:].encode("latin-1"))
    else:
        with open(path, "w") as f:
            f.write(contents)


def prepare(case, world, runs, tmp_path):
    """The case's --out_dir (a copy of a finished run, or empty) and its full argument list."""
    name, script, args, files, copy, _ = case
    out, tmp = str(tmp_path / "out"), str(tmp_path / "tmp")
    os.makedirs(tmp)
    if copy:
        shutil.copytree(getattr(runs, copy), out)
    names = dict(out=out, tmp=tmp, world=world.dir, pretrain=runs.pretrain, sft=runs.sft, reward=runs.reward,
                 ppo=runs.ppo)  # the rows of the step-3 methods need no placeholders of their own
    shutil.copy(os.path.join(runs.shared, "rm_gpt2.pt"), tmp)
    for rel, contents in files.items():
        write_file(os.path.join(out, rel[4:]) if rel.startswith("out/") else os.path.join(tmp, rel), contents, names)
    return out, base_args(script, world, runs, out) + [a.format(**names) for a in args]


def assert_one_clear_line(code, stderr, fragment):
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_clearly_and_changes_nothing(case, tiny_world, runs, tmp_path):
    out, args = prepare(case, tiny_world, runs, tmp_path)
    before = tree_hashes(out)
    code, _, stderr = run_in_process(case[1], args)
    assert_one_clear_line(code, stderr, case[5])
    assert tree_hashes(out) == before  # the earlier run's files: none deleted, none changed, none added


def test_bad_input_through_the_real_command_line(tiny_world, runs, tmp_path):
    """The SUBPROCESS rows as `python <script>.py ...`, all started at once (each mostly imports torch)."""
    procs = []
    for i, case in enumerate(c for c in CASES if c[0] in SUBPROCESS):
        out, args = prepare(case, tiny_world, runs, tmp_path / str(i))
        cmd = [sys.executable, f"{case[1]}.py", "--device=cpu", *args]
        procs.append((case, out, tree_hashes(out), subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=dict(os.environ, OMP_NUM_THREADS="1"))))
    assert len(procs) == len(SUBPROCESS)
    for case, out, before, proc in procs:
        _, stderr = proc.communicate(timeout=120)
        assert_one_clear_line(proc.returncode, stderr, case[5])
        assert tree_hashes(out) == before


def range_rows():
    """(script, option, a value just outside its declared range) for every option with a range."""
    rows = []
    for script in ("pretrain", "sft", "reward", "ppo", "chat") + METHODS:
        for name, (kind, rules) in common._fields(importlib.import_module(script).Config).items():
            for rule in rules:
                says = rule.says
                if says.startswith(("at least", "greater than", "at most", "below")):
                    bound = float(says.split()[-1])
                    step = 1 if kind is int else 0.5
                    value = bound - step if says.startswith(("at least", "greater")) else bound + step
                    if says.startswith(("greater", "below")):
                        value = bound
                    rows.append((script, name, int(value) if kind is int else value))
                elif says.startswith("one of"):
                    rows.append((script, name, "nonsense"))
    return rows


RANGE_ROWS = range_rows()


@pytest.mark.parametrize("script, name, value", RANGE_ROWS, ids=[f"{s}-{n}={v}" for s, n, v in RANGE_ROWS])
def test_every_declared_range_is_enforced(script, name, value, tmp_path):
    out = [] if script == "chat" else [f"--out_dir={tmp_path / 'out'}"]
    code, _, stderr = run_in_process(script, [f"--{name}={value}", *out])
    assert_one_clear_line(code, stderr, f"error: option --{name}=")
    assert "must be" in stderr and not os.path.exists(tmp_path / "out")


def test_every_stage_declares_ranges_and_uses_run_command():
    assert len(RANGE_ROWS) >= 120
    for script in ("pretrain", "sft", "reward", "ppo", "chat") + METHODS:
        with open(os.path.join(REPO, f"{script}.py")) as f:
            assert "run_command(" in f.read().split('if __name__ == "__main__":')[-1], script


def test_config_objects_built_in_code_are_checked_too(tmp_path):
    import sft
    with pytest.raises(SystemExit, match=r"--batch_size=0: must be at least 1"):
        sft.train(sft.Config(batch_size=0, out_dir=str(tmp_path / "out"), device="cpu"))
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("script", METHODS)
def test_the_step3_methods_refuse_torchrun(script, tmp_path, monkeypatch):
    """They run in one process: under torchrun, N copies would write the same --out_dir."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, stderr = run_in_process(script, [f"--out_dir={tmp_path / 'out'}"])
    assert_one_clear_line(code, stderr, f"{script}.py runs in one process")
    assert not os.path.exists(tmp_path / "out")


def test_rejection_min_score_may_be_infinite_but_not_nan():
    import rejection
    assert common.parse_config(rejection.Config, ["--min_score=-inf"]).min_score == float("-inf")
    assert common.parse_config(rejection.Config, ["--min_score=inf"]).min_score == float("inf")
    with pytest.raises(SystemExit, match="--min_score=nan: must be a finite number"):
        common.parse_config(rejection.Config, ["--min_score=nan"])


# ----------------------------------------------------------------------------- loading: dropped, cut, cropped

def test_overlong_prompts_are_dropped_at_load_time_with_their_lines(tiny_world, runs, tmp_path, capsys):
    import ppo
    path = tmp_path / "prompts.jsonl"
    path.write_text(jsonl({"prompt": "say hi."}, {"prompt": LONG}, "", {"prompt": "what is 2 plus 3?"},
                          {"prompt": LONG}))
    cfg = ppo.Config(prompts=str(path), eval_prompts="", max_new_tokens=MAX_NEW_TOKENS)
    rows, *_ = ppo.read_prompt_files(cfg, get_tokenizer(tiny_world.tok), 96)
    assert [r["prompt"] for r in rows] == ["say hi.", "what is 2 plus 3?"]
    out = capsys.readouterr().out
    assert f"{path}: dropped 2 of 4 prompts longer than the context (lines 2, 5; line 2: a prompt of" in out


def test_sft_notes_answers_cut_by_the_context(tiny_world, capsys):
    import sft
    tok = get_tokenizer(tiny_world.tok)
    examples = sft.read_examples(tiny_world.sft_train, tok, 96)
    assert len(examples) == 270 and max(len(x) for x, _ in examples) == 96
    out = capsys.readouterr().out
    assert "demonstrations longer than the context (lines " in out and "the answer loses" in out


def test_reward_model_crop_keeps_the_chat_markers_and_the_answer(tiny_world):
    tok = get_tokenizer(tiny_world.tok)
    (seq,) = encode_answers(tok, LONG, ["hi there!"], [True], 40)
    answer = tok.render_chat(LONG, "hi there!")[1]
    assert len(seq) == 40 and seq[0] == tok.user_id and seq[-len(answer):] == answer
    assert seq[-len(answer) - 1] == tok.assistant_id
    assert seq[1:-len(answer) - 1] == tok.render_chat(LONG)[0][1:-1][-(40 - 2 - len(answer)):]  # the prompt's end
    short = encode_answers(tok, "say hi.", ["hi!", "hello!"], None, 40)  # fits: unchanged
    assert short == [sum(tok.render_chat("say hi.", a), []) for a in ("hi!", "hello!")]


def test_metrics_rows_are_valid_json_and_resume_drops_rows_after_the_checkpoint(tmp_path):
    m = common.Metrics(str(tmp_path))
    for step in (1, 2, 3):
        m.log(step=step, loss=float("nan") if step == 2 else 1.0, grad=float("inf"))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line, parse_constant=lambda c: pytest.fail(c)) for line in lines][1] == \
        {"step": 2, "loss": None, "grad": None}
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # a row cut short by a kill
    common.Metrics(str(tmp_path), resumed=("step", 2))  # a --resume from the checkpoint of step 2
    assert (tmp_path / "metrics.jsonl").read_text().splitlines() == lines[:2]
    common.Metrics(str(tmp_path))  # a fresh run
    assert not (tmp_path / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------- checkpoints

def test_crash_in_the_middle_of_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    common.save_checkpoint(path, {"step": 1})
    real_save = torch.save

    def half_save(obj, f):
        real_save(obj, f)
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
        raise KeyboardInterrupt  # killed half way through the write
    monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises(KeyboardInterrupt):
        common.save_checkpoint(path, {"step": 2})
    monkeypatch.setattr(torch, "save", real_save)
    assert common.load_checkpoint(path)["step"] == 1 and os.path.exists(path + ".tmp")
    with pytest.raises(SystemExit, match="cannot read checkpoint .*ckpt.pt.tmp"):
        common.load_checkpoint(path + ".tmp")  # the half-written file: a reason, not an empty message
    common.save_checkpoint(path, {"step": 3})  # the next save replaces the stale temp file
    assert common.load_checkpoint(path)["step"] == 3 and not os.path.exists(path + ".tmp")


def clean(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def read_rows(out):
    return common.read_jsonl(os.path.join(out, "metrics.jsonl"))


def read_summary(out):
    with open(os.path.join(out, "summary.json")) as f:
        return {k: v for k, v in json.load(f).items() if k not in TIMING}


def assert_same_run(a, b, weights=("model",)):
    """Two run folders hold the same run: metrics rows (timing keys aside), summary, history, weights."""
    assert clean(read_rows(a)) == clean(read_rows(b))
    assert read_summary(a) == read_summary(b)
    ca, cb = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True) for d in (a, b))
    assert ca.get("history") == cb.get("history") and ca["finished"] and cb["finished"]
    for key in weights:
        assert ca[key].keys() == cb[key].keys() and all(torch.equal(ca[key][k], cb[key][k]) for k in ca[key])


def test_kill_9_during_saves_then_resume_equals_the_uninterrupted_run(tiny_world, tmp_path):
    """Pretraining that saves at every step, killed with SIGKILL at some point after its first checkpoint
    (often in the middle of writing one): the checkpoint loads, and --resume finishes the same run as an
    uninterrupted one (run in this process meanwhile, at the same thread count)."""
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    args = pretrain_args(tiny_world, killed, max_steps=30, eval_interval=1, eval_batches=1, log_interval=1000)
    victim = subprocess.Popen([sys.executable, "pretrain.py", *args, "--device=cpu", "--threads=1"], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 60
    while not os.path.exists(os.path.join(killed, "ckpt.pt")) and time.time() < deadline:
        time.sleep(0.005)
    time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    ckpt = common.load_checkpoint(os.path.join(killed, "ckpt.pt"))  # loadable, whatever the timing
    assert ckpt["step"] >= 1 and len(read_rows(killed)) >= ckpt["step"]  # rows up to the checkpoint, maybe more
    assert run_in_process("pretrain", [a.replace(killed, straight) for a in args])[0] == 0
    if not ckpt["finished"]:  # almost always: the kill came before the end
        assert run_in_process("pretrain", args + ["--resume"])[0] == 0
    assert not os.path.exists(os.path.join(killed, "ckpt.pt.tmp"))  # a temp file of a killed save is removed
    assert_same_run(straight, killed)


class Crash(Exception):
    pass


def crash_before_save(monkeypatch, module, when):
    """Make module.save raise (a kill) just before it writes the checkpoint of step/iteration/round `when`,
    after the rows up to `when` went to metrics.jsonl; the previous checkpoint is what a --resume finds."""
    real = module.save

    def save(run, cfg, *args, **kwargs):
        done = next((getattr(run, k) for k in ("step", "it", "round") if hasattr(run, k)), None)
        if done == when and not kwargs.get("finished"):
            raise Crash
        real(run, cfg, *args, **kwargs)
    monkeypatch.setattr(module, "save", save)
    return lambda: monkeypatch.setattr(module, "save", real)


def test_pretrain_resume_after_a_kill_equals_the_uninterrupted_run(tiny_world, tmp_path, monkeypatch):
    import pretrain

    def cfg(out, resume=False):
        return pretrain.Config(corpus=tiny_world.corpus, tokenizer=tiny_world.tok, out_dir=out, n_layer=1, n_head=2,
                               n_embd=32, block_size=96, batch_size=16, max_steps=24, lr=1e-2, min_lr=1e-3,
                               warmup_steps=4, eval_interval=8, eval_batches=2, log_interval=100, device="cpu",
                               threads=1, resume=resume)
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    pretrain.train(cfg(straight))
    restore = crash_before_save(monkeypatch, pretrain, 16)
    with pytest.raises(Crash):
        pretrain.train(cfg(split))
    restore()
    assert [r["step"] for r in read_rows(split)] == list(range(1, 17))  # rows 9..16 beyond the checkpoint of 8
    with open(os.path.join(split, "ckpt.pt.tmp"), "w") as f:
        f.write("half a checkpoint")  # as a kill in the middle of a save leaves it
    pretrain.train(cfg(split, resume=True))
    assert not os.path.exists(os.path.join(split, "ckpt.pt.tmp"))
    assert [r["step"] for r in read_rows(split)] == list(range(1, 25))  # none duplicated, none lost
    assert_same_run(straight, split)


def test_sft_resume_after_kills_in_training_and_in_the_final_evaluation(tiny_world, runs, tmp_path, monkeypatch):
    import sft
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(jsonl(*read_prompts(tiny_world.prompts_dev)[:3]))

    def cfg(out, resume=False):
        return sft.Config(init_from=f"{runs.pretrain}/ckpt.pt", train_data=tiny_world.sft_train,
                          val_data=tiny_world.sft_val, prompts=str(prompts), out_dir=out, epochs=1, batch_size=32,
                          lr=3e-3, warmup_steps=2, eval_interval=3, eval_samples=1, eval_base=False,
                          max_new_tokens=MAX_NEW_TOKENS, device="cpu", threads=1, resume=resume)
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    sft.train(cfg(straight))
    assert len(read_rows(straight)) == 9
    restore = crash_before_save(monkeypatch, sft, 6)  # rows 4..6 beyond the checkpoint of step 3
    with pytest.raises(Crash):
        sft.train(cfg(split))
    restore()
    real_eval = sft.evaluate_before_after

    def killed_in_evaluation(run, cfg):
        raise Crash
    monkeypatch.setattr(sft, "evaluate_before_after", killed_in_evaluation)
    with pytest.raises(Crash):  # resumed, then killed in the final evaluation (after the last checkpoint)
        sft.train(cfg(split, resume=True))
    monkeypatch.setattr(sft, "evaluate_before_after", real_eval)
    sft.train(cfg(split, resume=True))
    assert read_summary(split)["train_loss"] == read_rows(straight)[-1]["train_loss"]
    assert_same_run(straight, split)


def test_ppo_ptx_resume_after_a_kill_equals_the_uninterrupted_run(tiny_world, runs, tmp_path, monkeypatch):
    import ppo

    def cfg(out, resume=False):
        args = ppo_args(tiny_world, runs.sft, runs.reward, runs.pretrain, out, eval_prompts="", iterations=6,
                        rollout_batch=8, minibatch=4, ppo_epochs=2, ptx_coef=0.1, ptx_batch=4, save_interval=2,
                        adaptive_kl="true")
        return common.parse_config(ppo.Config, args + ["--device=cpu", "--threads=1"] + ["--resume"] * resume)
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    ppo.train(cfg(straight))
    restore = crash_before_save(monkeypatch, ppo, 4)  # iterations 3, 4 logged beyond the checkpoint of 2
    with pytest.raises(Crash):
        ppo.train(cfg(split))
    restore()
    ppo.train(cfg(split, resume=True))
    assert [r["iteration"] for r in read_rows(split)] == [1, 2, 3, 4, 5, 6]
    assert all("ptx_loss" in r for r in read_rows(split))
    assert_same_run(straight, split, weights=("model", "critic"))  # alignment tax included: measured on SFT
    summary = read_summary(split)
    ref = load_model(f"{runs.sft}/ckpt.pt")[0]
    assert summary["pretrain_val_loss_sft"] == pytest.approx(ppo.heldout_ptx_loss(ref, ppo.load_ptx_tokens(
        cfg(split), ref.config), "cpu"), rel=1e-6)


def crash_and_resume(monkeypatch, tmp_path, module, args, when):
    """`module` run straight and run crashed before its checkpoint of `when`, then resumed: both folders."""
    def cfg(out, resume=False):
        return common.parse_config(module.Config, args + [f"--out_dir={out}", "--device=cpu", "--threads=1"]
                                   + ["--resume"] * resume)
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    module.train(cfg(straight))
    restore = crash_before_save(monkeypatch, module, when)
    with pytest.raises(Crash):
        module.train(cfg(split))
    restore()
    module.train(cfg(split, resume=True))
    return straight, split


def test_grpo_resume_after_a_kill_equals_the_uninterrupted_run(tiny_world, runs, tmp_path, monkeypatch):
    import grpo
    args = [a for a in base_args("grpo", tiny_world, runs, "") if not a.startswith("--out_dir")]
    straight, split = crash_and_resume(monkeypatch, tmp_path, grpo, args + [
        "--eval_prompts=", "--iterations=5", "--save_interval=2", "--kl=loss", "--ppo_epochs=2"], when=4)
    assert [r["iteration"] for r in read_rows(split)] == [1, 2, 3, 4, 5]
    assert_same_run(straight, split)


def test_dpo_resume_after_a_kill_equals_the_uninterrupted_run(tiny_world, runs, tmp_path, monkeypatch):
    import dpo
    args = [a for a in base_args("dpo", tiny_world, runs, "") if not a.startswith("--out_dir")]
    straight, split = crash_and_resume(monkeypatch, tmp_path, dpo, args + ["--eval_prompts=", "--eval_interval=2",
                                                                           "--epochs=2"], when=4)
    assert [r["step"] for r in read_rows(split)] == list(range(0, len(read_rows(straight))))  # step 0: before training
    assert_same_run(straight, split)


def test_rejection_resume_after_a_kill_equals_the_uninterrupted_run(tiny_world, runs, tmp_path, monkeypatch):
    import rejection
    args = [a for a in base_args("rejection", tiny_world, runs, "") if not a.startswith("--out_dir")]
    straight, split = crash_and_resume(monkeypatch, tmp_path, rejection, args + ["--eval_prompts=", "--rounds=2"],
                                       when=2)  # round 2 logged and fine-tuned, then killed before its checkpoint
    assert [r["round"] for r in read_rows(split)] == [1, 2]
    assert_same_run(straight, split)
