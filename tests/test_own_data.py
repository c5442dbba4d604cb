"""Your own task through every stage: docs/OWN_DATA.md's worked example, as a new user runs it.

1. The guide's commands are read from docs/OWN_DATA.md (every `python $REPO/...` line of its worked
   example) and run as they are, in a fresh working folder outside the repository, with the repository's
   scripts called by path; only tiny sizes are appended (TINY: later flags win) and --device=cpu
   --threads=1. The task is examples/own_task.py's (animal sounds), not the embedded world's, with its
   own judge plugged in by --judge=FILE.py:function.
2. Nothing of the embedded world or of an earlier run is read: every process runs with an audit hook
   (sitecustomize.py on PYTHONPATH, sys.addaudithook) that records each file it opens or lists under the
   repository's data/world/, runs/ or data/embedded.tiktoken, whether or not those exist on this machine;
   the record must stay empty.
3. The user's judge was called: its own facets ("concise", which the world's judge has not) are in
   every stage's summary.json, with gold numbers beside them.
4. Without a judge and with the main inputs only (the issue's commands), every stage runs, says in one
   note what it skips, prints no "nan", and PPO's summary holds the drift signals.
5. Mistakes (a missing or mistyped file, a wrong field, a judge that fails on a row or cannot be
   imported, an unnormalised reward model) are one line on stderr, exit code 2, before anything is
   written to --out_dir.
6. common.follow_data on a Config of its own: followers blanked with a note, named options kept, the
   embedded world's default untouched, a default checkpoint trained on the embedded world refused.
"""
import contextlib
import dataclasses
import io
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

from conftest import REPO

GUIDE = os.path.join(REPO, "docs", "OWN_DATA.md")
JUDGE = f"{REPO}/examples/own_task.py:judge"
FORBIDDEN = [os.path.join(REPO, "data", "world"), os.path.join(REPO, "runs"),
             os.path.join(REPO, "data", "embedded.tiktoken")]
# tiny sizes appended to the guide's commands (a later --key=value wins)
TINY = {"own_task.py": ["--corpus_chars=60000", "--n_sft=300", "--n_pairs=300", "--n_ppo=100", "--n_heldout=12"],
        "pretrain.py": ["--n_layer=1", "--n_head=2", "--n_embd=32", "--max_steps=60", "--batch_size=16",
                        "--eval_interval=60", "--eval_batches=2", "--log_interval=30"],
        "sft.py": ["--epochs=1", "--batch_size=16", "--eval_samples=2"],
        "reward.py": ["--epochs=1", "--batch_size=16", "--best_of=2"],
        "ppo.py": ["--iterations=2", "--rollout_batch=8", "--minibatch=4", "--eval_samples=1"],
        "chat.py": ["--max_new_tokens=16"]}
AUDIT = '''import os, sys
_log, _roots = os.environ.get("OWN_DATA_AUDIT"), os.environ.get("OWN_DATA_FORBIDDEN", "").split(os.pathsep)
if _log:
    _fd = os.open(_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    def _hook(event, args):
        if event in ("open", "os.listdir", "os.scandir") and args and isinstance(args[0], (str, bytes)):
            path = os.path.abspath(os.fsdecode(args[0]))
            if any(path == r or path.startswith(r + os.sep) for r in _roots):
                os.write(_fd, f"{path} ({event}, {os.path.basename(sys.argv[0])})\\n".encode())
    sys.addaudithook(_hook)
'''


def guide_commands():
    """The worked example's commands: every line of docs/OWN_DATA.md's `bash` blocks between the markers
    that starts with `python $REPO/` (a trailing backslash continues a line)."""
    text = open(GUIDE).read()
    example = text.split("<!-- worked example: start -->")[1].split("<!-- worked example: end -->")[0]
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", example, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith("python $REPO/"):
                lines.append(line.split("  #")[0].strip())
    return lines


def run(cmd_args, cwd, audit, stdin=""):
    """One command (a list: script path, then options) in `cwd`, with the audit hook; the CompletedProcess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", OWN_DATA_AUDIT=audit,
               OWN_DATA_FORBIDDEN=os.pathsep.join(FORBIDDEN), PYTHONPATH=os.path.dirname(audit))
    return subprocess.run([sys.executable, *cmd_args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env=env, input=stdin)


def with_tiny(args):
    """A guide command's arguments with the tiny sizes and (for the stages) --device=cpu --threads=1."""
    script = os.path.basename(args[0])
    extra = TINY.get(script, [])
    if script not in ("own_task.py", "tokenizer.py"):
        extra = extra + ["--device=cpu"] + ([] if script == "chat.py" else ["--threads=1"])
    return args + extra


@pytest.fixture(scope="module")
def guide(tmp_path_factory):
    """The guide's worked example, run once in a fresh folder: (folder, audit log path, {script: output})."""
    root = tmp_path_factory.mktemp("own_data")
    work, hook = root / "work", root / "hook"
    work.mkdir()
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(AUDIT)
    audit = str(hook / "opened.log")
    outputs = {}
    for line in guide_commands():
        args = [a.replace("$REPO", REPO) for a in shlex.split(line)[1:]]
        proc = run(with_tiny(args), str(work), audit, stdin="what does a cow say?\n/quit\n")
        assert proc.returncode == 0, f"{line}\n--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-3000:]}"
        assert "Traceback" not in proc.stderr, proc.stderr
        outputs.setdefault(os.path.basename(args[0]), []).append(proc.stdout + proc.stderr)
    return str(work), audit, outputs


def summary(work, stage):
    with open(os.path.join(work, "out", stage, "summary.json")) as f:
        return json.load(f)


def opened(audit):
    return open(audit).read().splitlines() if os.path.exists(audit) else []


# ----------------------------------------------------------------------------- 1-3. the guide's example

def test_the_guide_runs_every_stage_with_a_user_judge(guide):
    work, audit, outputs = guide
    commands = guide_commands()
    scripts = [os.path.basename(shlex.split(c)[1]) for c in commands]
    for script in ("own_task.py", "tokenizer.py", "pretrain.py", "sft.py", "reward.py", "ppo.py", "chat.py"):
        assert script in scripts, f"the guide has no {script} command"
    assert scripts.index("tokenizer.py") < scripts.index("pretrain.py") < scripts.index("sft.py") \
        < scripts.index("reward.py") < scripts.index("ppo.py") < scripts.index("chat.py")
    assert all("=\"\"" not in c and "=''" not in c and not re.search(r"=( |$)", c) for c in commands), \
        "the guide blanks an option"
    assert all(f"--judge={JUDGE.replace(REPO, '$REPO')}" in c for c in commands if "/sft.py" in c or "/reward.py" in c
               or "/ppo.py" in c)
    sft, rm, ppo = (summary(work, s) for s in ("sft", "reward", "ppo"))
    # the user's judge scored every evaluation: its own facet "concise" beside the gold numbers
    assert "sft_sampled_gold_mean" in sft and "rate_concise" in sft["sft_facets_sampled"]
    assert rm["heldout_acc_vs_gold"] is not None and rm["best_of_n"][0]["gold_mean"] >= 0
    assert rm["normalization"]["demo_source"] == "task/sft_train.jsonl"
    assert "heldout_expected_labeler_agreement" not in rm  # the world's simulated labelers: skipped
    assert "rate_concise" in ppo["policy_facets"] and 0 <= ppo["win_rate_vs_sft"] <= 1
    assert set(ppo["drift"]) >= {"reward", "kl_to_ref", "answer_length", "distinct_rate"}
    assert "alignment_tax" in ppo  # --pretrain_tokens named
    rows = [json.loads(line) for line in open(os.path.join(work, "out", "ppo", "metrics.jsonl"))]
    assert all("gold" in r and "distinct_rate" in r for r in rows)
    chat = "\n".join(outputs["chat.py"])
    assert re.search(r"^sft +[+-]\d", chat, re.M) and re.search(r"^ppo +[+-]\d", chat, re.M)  # a reward column
    assert "nan" not in "\n".join(o for outs in outputs.values() for o in outs)


def test_the_guide_reads_nothing_of_the_embedded_world_or_of_earlier_runs(guide):
    work, audit, _ = guide
    assert opened(audit) == []
    ckpt = torch.load(os.path.join(work, "out", "ppo", "ckpt.pt"), weights_only=True)
    assert ckpt["tokenizer"] == os.path.join(work, "task", "tok.tiktoken")  # the user's BPE, by its absolute path


def test_held_out_prompts_are_not_in_any_training_file(guide):
    work, _, _ = guide
    held = {json.loads(line)["prompt"] for line in open(os.path.join(work, "task", "heldout.jsonl"))}
    for name in ("sft_train", "sft_val", "comparisons", "ppo_prompts"):
        train = {json.loads(line)["prompt"] for line in open(os.path.join(work, "task", name + ".jsonl"))}
        assert not held & train, name


# ----------------------------------------------------------------------------- 4. main inputs only, no judge

def test_main_inputs_only_no_judge_notes_and_drift(guide):
    """The issue's commands: each stage with its main input only runs, says in a note what it skips,
    never reads the embedded world, prints no nan; PPO without a judge reports the drift signals."""
    work, audit, _ = guide
    stages = [("sft.py", ["--init_from=out/pretrain/ckpt.pt", "--train_data=task/sft_train.jsonl", "--epochs=1",
                          "--out_dir=out/sft_min"], ["--val_data not given", "--prompts not given"]),
              ("reward.py", ["--init_from=out/sft/ckpt.pt", "--comparisons=task/comparisons.jsonl", "--epochs=1",
                             "--ensemble=2", "--out_dir=out/reward_min"],
               ["--demonstrations not given", "--eval_prompts not given", "--world_dir not given",
                'has no "world" fields']),
              ("ppo.py", ["--sft=out/sft/ckpt.pt", "--reward_model=out/reward_min/ckpt.pt",
                          "--prompts=task/ppo_prompts.jsonl", "--iterations=3", "--rollout_batch=8", "--minibatch=4",
                          "--out_dir=out/ppo_min"], ["--eval_prompts not given", "--pretrain_tokens not given"]),
              ("ppo.py", ["--sft=out/sft/ckpt.pt", "--reward_model=out/reward_min/ckpt.pt",
                          "--prompts=task/ppo_prompts.jsonl", "--eval_prompts=task/heldout.jsonl", "--iterations=3",
                          "--rollout_batch=8", "--minibatch=4", "--eval_samples=2", "--out_dir=out/ppo_nojudge"],
               ['task/heldout.jsonl has no "world" fields'])]
    for script, args, notes in stages:
        proc = run([os.path.join(REPO, script), *args, "--device=cpu", "--threads=1"], work, audit)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        for note in notes:
            assert re.search(r"^note: .*" + re.escape(note), proc.stdout, re.M), (note, proc.stdout[-3000:])
        assert "nan" not in proc.stdout + proc.stderr
    assert opened(audit) == []
    rm = summary(work, "reward_min")
    assert rm["normalization"]["demo_source"] == "comparison answers" and rm["heldout_acc_vs_gold"] is None
    for name in ("ppo_min", "ppo_nojudge"):
        rows = [json.loads(line) for line in open(os.path.join(work, "out", name, "metrics.jsonl"))]
        assert not any("gold" in r for r in rows) and all("distinct_rate" in r and "rm_disagreement" in r for r in rows)
        s = summary(work, name)
        assert set(s["drift"]) == {"reward", "kl_to_ref", "answer_length", "distinct_rate", "eos_rate",
                                   "rm_disagreement"} and isinstance(s["drift_warnings"], list)
        assert "alignment_tax" not in s and "win_rate_vs_sft" not in s
    s = summary(work, "ppo_nojudge")  # the held-out evaluation without a judge: what needs none
    assert {"sft_distinct_rate", "policy_distinct_rate", "sft_answer_words", "policy_answer_words", "kl_to_ref"} <= set(s)


# ----------------------------------------------------------------------------- 5. mistakes: one line, before training

BAD_JUDGES = '''
def reads_a_missing_field(row, response, ended=True):
    return {"score": float(row["answer"] in response), "pass": False}


def returns_a_number(row, response, ended=True):
    return 0.5
'''

MISTAKES = [
    ("sft, mistyped --prompts", "sft", ["--prompts=task/heldout.json"], "task/heldout.json: no such file"),
    ("reward, mistyped --demonstrations", "reward", ["--demonstrations=task/sft_trian.jsonl"],
     "task/sft_trian.jsonl: no such file"),
    ("sft, a judge that cannot be imported", "sft", ["--judge=no_such_module:judge"], "--judge=no_such_module:judge: "
                                                                                      "cannot load it"),
    ("sft, a judge without a function", "sft", [f"--judge={REPO}/examples/own_task.py:jugde"], "cannot load it"),
    ("ppo, a judge that reads a missing field", "ppo", ["--judge=bad_judges.py:reads_a_missing_field"],
     "raised KeyError: 'answer' on the prompt"),
    ("reward, a judge that returns a number", "reward", ["--judge=bad_judges.py:returns_a_number"],
     "returned a float, not a dict"),
    ("sft, demonstrations with a wrong field", "sft", ["--train_data=wrong.jsonl"],
     'wrong.jsonl line 1: field "response" is missing'),
    ("reward, a pair without rejected", "reward", ["--comparisons=half.jsonl"], 'half.jsonl line 1: field "rejected"'),
    ("ppo, an unnormalised reward model", "ppo", ["--reward_model=unnormalised.pt"], "is not normalised"),
    ("ppo, oracle mode without a judge", "ppo", ["--judge="], "--reward=gold needs a gold judge"),
    ("ppo, a mistyped --pretrain_tokens", "ppo", ["--pretrain_tokens=out/pretrain/token"],
     "--pretrain_tokens=out/pretrain/token: PPO-ptx (on by default) needs"),
    ("ppo, a mistyped --eval_prompts", "ppo", ["--eval_prompts=task/heldout"], "task/heldout: no such file"),
]


def mistake_args(script, extra):
    """The guide's options for `script` into a fresh --out_dir, then `extra` (which wins)."""
    base = {"sft": ["--init_from=out/pretrain/ckpt.pt", "--train_data=task/sft_train.jsonl",
                    "--prompts=task/heldout.jsonl", f"--judge={JUDGE}"],
            "reward": ["--init_from=out/sft/ckpt.pt", "--comparisons=task/comparisons.jsonl",
                       "--demonstrations=task/sft_train.jsonl", f"--judge={JUDGE}"],
            "ppo": ["--sft=out/sft/ckpt.pt", "--reward_model=out/reward/ckpt.pt", "--prompts=task/ppo_prompts.jsonl",
                    "--eval_prompts=task/heldout.jsonl", f"--judge={JUDGE}"]}[script]
    gold = ["--reward=gold"] if "--judge=" in extra else []
    return base + gold + ["--out_dir=out/mistake", "--device=cpu", "--threads=1"] + extra


@pytest.mark.parametrize("case", MISTAKES, ids=[c[0] for c in MISTAKES])
def test_mistakes_are_one_line_before_training(case, guide, monkeypatch):
    _, script, extra, fragment = case
    work, _, _ = guide
    monkeypatch.chdir(work)
    with open("bad_judges.py", "w") as f:
        f.write(BAD_JUDGES)
    with open("wrong.jsonl", "w") as f:
        f.write(json.dumps({"prompt": "what does a cow say?", "answer": "moo."}) + "\n")
    with open("half.jsonl", "w") as f:
        f.write(json.dumps({"prompt": "what does a cow say?", "chosen": "moo."}) + "\n")
    if not os.path.exists("unnormalised.pt"):
        ckpt = torch.load("out/reward/ckpt.pt", weights_only=True)
        torch.save({k: v for k, v in ckpt.items() if k != "normalization"}, "unnormalised.pt")
    import common
    module = __import__(script)
    err = io.StringIO()
    threads = torch.get_num_threads()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        common.run_command(module.train, module.Config, mistake_args(script, extra))
    torch.set_num_threads(threads)
    lines = err.getvalue().strip().splitlines()
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err.getvalue()
    assert fragment in lines[0], lines[0]
    assert not os.path.exists("out/mistake")  # nothing written: it failed before training


# ----------------------------------------------------------------------------- 6. common.follow_data

def test_follow_data_blanks_world_defaults_keeps_named_ones_and_refuses_world_checkpoints(tmp_path, capsys):
    import common
    world_ckpt, own_ckpt = str(tmp_path / "world.pt"), str(tmp_path / "own.pt")
    common.save_checkpoint(world_ckpt, {"stage": "sft", "config": {"train_data": os.path.join(common.WORLD, "x.jsonl")}})
    common.save_checkpoint(own_ckpt, {"stage": "sft", "config": {"train_data": str(tmp_path / "mine.jsonl")}})

    def config_class(init_from):  # a stage's Config whose default checkpoint is init_from
        return dataclasses.make_dataclass("Config", [
            ("train_data", str, dataclasses.field(default=os.path.join(common.WORLD, "sft_train.jsonl"))),
            ("prompts", str, dataclasses.field(default=os.path.join(common.WORLD, "prompts_dev.jsonl"))),
            ("val_data", str, dataclasses.field(default=os.path.join(common.WORLD, "sft_val.jsonl"))),
            ("init_from", str, dataclasses.field(default=init_from))])

    Config = config_class(own_ckpt)

    followers = {"prompts": "the gold evaluation is skipped", "val_data": None}
    assert common.follow_data(Config(), "train_data", followers, ("init_from",)) == Config()  # the world's run
    assert capsys.readouterr().out == ""
    cfg = common.follow_data(Config(train_data="mine.jsonl"), "train_data", followers, ("init_from",))
    assert (cfg.prompts, cfg.val_data, cfg.init_from) == ("", "", own_ckpt)  # own default checkpoint: kept
    assert capsys.readouterr().out.splitlines() == [
        "note: --prompts not given with your own --train_data: the gold evaluation is skipped"]  # val_data: silent
    cfg = common.follow_data(Config(train_data="mine.jsonl", prompts="p.jsonl"), "train_data", followers)
    assert cfg.prompts == "p.jsonl"  # named: kept
    Config = config_class(world_ckpt)
    with pytest.raises(SystemExit, match="--init_from not given with your own --train_data: its default .* was "
                                         "trained on the embedded world"):
        common.follow_data(Config(train_data="mine.jsonl"), "train_data", followers, ("init_from",))
    assert common.follow_data(Config(train_data="mine.jsonl", init_from=world_ckpt + "x"), "train_data", followers,
                              ("init_from",)).init_from == world_ckpt + "x"  # named: the loader says what is wrong
