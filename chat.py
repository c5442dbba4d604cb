"""Talk to checkpoints side by side (SFT and PPO by default) and see what RLHF changed, prompt by prompt.

    python chat.py                                        # runs/sft and runs/ppo, scored by runs/reward
    python chat.py --checkpoints=runs/sft/ckpt.pt,runs/ppo/ckpt.pt,runs/ppo_oracle/ckpt.pt --greedy
    python chat.py --prompt="how do i make tea?"          # one-shot: a small table on stdout, then exit
    python chat.py --checkpoint=runs/ppo/ckpt.pt --reward_model= --prompt="hello!"   # prints the answer only
    python chat.py --checkpoint=gpt2                      # GPT-2 weights (a name or a HF folder)
    python chat.py --checkpoints=out/sft/ckpt.pt,out/ppo/ckpt.pt --reward_model=out/reward/ckpt.pt   # your own

Type a prompt and press Enter; /examples lists prompts of the embedded world; an empty line, /quit or
Ctrl-D exits.

1. Single-turn: each prompt is answered on its own, as <|user|> prompt <|assistant|> (our stages train
   on single turns), by every checkpoint in turn, labelled with its short name (the folder of
   .../ckpt.pt: "sft", "ppo"), from one random stream. The checkpoints share one tokenizer.
2. Streaming: `stream_tokens` prefills the prompt, then feeds one token at a time through the KV cache
   (GPT.generate's `_run` / `sample_next_token`: greedy streaming equals generate, a test checks it).
   It stops at <|end|>, at any other special token (a pretrained model's <|endoftext|>) or at
   max_new_tokens. The answer is decoded again after each token and the new suffix printed; a trailing
   U+FFFD (a UTF-8 character split across tokens) is held back until it completes.
3. Scores, one row per model (columns that no row has are left out): reward = engine.score_texts on
   (prompt, answer, ended), the text encoded afresh as reward.py trains and PPO scores it; KL = sum over
   the answer's tokens of log pi(y_t) - log pi_ref(y_t) from the generated ids (evaluate.answer_kls, the
   terms of evaluate.sequence_kl), logits divided by the sampling temperature (1 when greedy): one
   sample of KL(pi || pi_ref), so one answer's can be negative; gold = for a prompt in one of the
   embedded world's wordings (world.record_from_prompt), the gold judge's pass / score and first failed
   facet, and the split of the prompt's content.
4. Embedded-world checkpoints only (tokenizer "embedded", or training data in a folder data/world.py
   built, i.e. next to a labelers.json): input lower-cased with single spaces like the world's data (a
   note the first time it had capitals), a greeting sentence on what the models know and cannot do,
   /examples, gold. GPT-2 and user checkpoints get the input as typed and none of these.
5. Default --checkpoints / --reward_model files that do not exist are dropped with a note; explicit
   ones must exist. With checkpoints outside runs/ (your own task's), the default --reward_model (runs/'s)
   is never read: pass yours. --reference defaults to the first checkpoint.
6. One-shot --prompt: stdout is the table (model, reward, KL, gold, answer), or only the answer with one
   checkpoint, no reward model and no other reference. Notes go to stderr.
7. A prompt longer than the smallest context minus max_new_tokens is cropped from the left, with a note.
Simplifications: no multi-turn history, no system prompt, batch size 1.
"""
import io
import os
import random
import sys
import types
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from typing import Annotated

import torch

from common import above, at_least, at_most, pick_device, print_config, run_command
from data import world
from engine import load_model, load_policy, load_reward_model, score_texts
from evaluate import answer_kls
from model import HF_GPT2_NAMES, KVCache, sample_next_token
from tokenizer import get_tokenizer

RUNS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "runs")
FAMILY_WORDS = {"add": "single-digit sums and differences", "bigger": "the bigger of two numbers",
                "count": "counting the items of a list", "lookup": "the colour of someone's object",
                "sort": "sorting numbers", "greet": "greetings", "howto": "how-to questions",
                "harmful": "refusing harmful requests", "lookalike": "helping with their harmless look-alikes"}


@dataclass
class Config:
    checkpoints: str = f"{RUNS}/sft/ckpt.pt,{RUNS}/ppo/ckpt.pt"  # comma-separated: ours, GPT-2 names, HF folders
    checkpoint: str = ""  # one policy instead of --checkpoints ("" = use --checkpoints)
    reference: str = ""  # the policy the KL is measured against ("" = the first checkpoint)
    reward_model: str = os.path.join(RUNS, "reward", "ckpt.pt")  # reward.py checkpoint (used if it exists; "" = none)
    temperature: Annotated[float, at_least(0)] = 0.7  # sampling temperature (0 = greedy; ignored with --greedy)
    top_k: Annotated[int, at_least(0)] = 0  # keep only the k most likely tokens (0 = off)
    top_p: Annotated[float, above(0), at_most(1)] = 1.0  # nucleus sampling, Holtzman et al. 2019 (1.0 = off)
    greedy: bool = False  # argmax decoding: the same answer every time
    max_new_tokens: Annotated[int, at_least(1)] = 64  # longest answer, in tokens
    prompt: str = ""  # one-shot mode: answer this prompt, print the table (or only the answer), exit
    seed: int = 0  # seed of the sampling generator
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps


@torch.no_grad()
def stream_tokens(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, greedy=False,
                  eos_id=None, generator=None):
    """Yield generated token ids one by one (the eos included, then stop). prompt_ids: list of ints."""
    device = model.lm_head.weight.device
    step_input = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    cache = KVCache(torch.ones(1, len(prompt_ids) + max_new_tokens, dtype=torch.long, device=device))
    for _ in range(max_new_tokens):
        h = model._run(step_input, cache=cache)[0]  # the first call prefills, later ones read 1 token
        logits = model.lm_head(h[:, -1, :]).float()  # (1, V)
        tok = sample_next_token(logits, temperature, top_k, top_p, greedy, generator)  # (1,)
        yield tok.item()
        if tok.item() == eos_id:
            return
        step_input = tok[:, None]  # (1, 1)


def visible_text(tok, ids):
    """The answer text of ids so far, minus a trailing U+FFFD: a character whose UTF-8 bytes are split
    across tokens decodes as U+FFFD until its last byte arrives, so it is held back, not printed."""
    return tok.decode_response(ids).rstrip("\ufffd")


def fit_prompt(prompt_ids, block_size, max_new_tokens):
    """Crop the prompt's text from the left so prompt + answer fit in the context, keeping its first token
    (<|user|>) and its last (<|assistant|>); None if not even one token of its text would fit."""
    room = block_size - max_new_tokens
    if len(prompt_ids) <= room:
        return prompt_ids
    return prompt_ids[:1] + prompt_ids[len(prompt_ids) - room + 1:] if room >= 3 else None


def resolve_paths(cfg, default=None):
    """(checkpoints, reward model or "", reference); default files that do not exist are dropped with a note."""
    default = default or Config()
    paths = [cfg.checkpoint] if cfg.checkpoint else [p.strip() for p in cfg.checkpoints.split(",") if p.strip()]
    if not cfg.checkpoint and cfg.checkpoints == default.checkpoints:
        found = [p for p in paths if os.path.exists(p)]
        if not found:
            raise SystemExit(f"error: no checkpoint at {' or '.join(paths)}: run pipeline.py, or pass --checkpoints=a,b")
        if found != paths:
            missing = ", ".join(p for p in paths if p not in found)
            print(f"(note: {missing} not found: chatting with {', '.join(found)})", file=sys.stderr)
        paths = found
    if not paths:
        raise SystemExit("error: option --checkpoints is empty: give one or more checkpoints, comma-separated")
    rm = cfg.reward_model
    if rm and rm == default.reward_model and not all(os.path.abspath(p).startswith(RUNS + os.sep) for p in paths):
        print(f"(note: --reward_model not given with checkpoints of your own: the default {rm} is not read, no "
              f"reward column; pass --reward_model=PATH)", file=sys.stderr)  # never the embedded world's
        rm = ""
    if rm and rm == default.reward_model and not os.path.exists(rm):
        print(f"(note: no reward model at {rm}: no reward column; pass --reward_model=PATH)", file=sys.stderr)
        rm = ""
    return paths, rm, cfg.reference or paths[0]


def trained_on_world(ckpt):
    """Whether a checkpoint of ours learnt the embedded world: its tokenizer is "embedded", or its training
    data (SFT's train_data, PPO's prompts, pretraining's corpus) lies in a folder data/world.py built."""
    run = ckpt.get("config") or {}
    data = next((run[k] for k in ("train_data", "prompts", "corpus") if run.get(k)), "")
    return ckpt.get("tokenizer", "embedded") == "embedded" or (
        bool(data) and os.path.isfile(os.path.join(os.path.dirname(data), "labelers.json")))


def load_chat_model(path, device):
    """(model, tokenizer name, learnt the embedded world) from a checkpoint of ours, a GPT-2 name or HF folder."""
    if path in HF_GPT2_NAMES or os.path.isdir(path):
        return load_policy(path, device)[0].eval(), "gpt2", False
    model, ckpt = load_model(path, device)
    return model.eval(), ckpt.get("tokenizer", "embedded"), trained_on_world(ckpt)


def short_name(path):
    """A checkpoint's label: the folder of .../ckpt.pt ("sft", "ppo"), else the file or model name."""
    base = os.path.basename(os.path.normpath(path))
    return os.path.basename(os.path.dirname(os.path.abspath(path))) if base == "ckpt.pt" else os.path.splitext(base)[0]


def setup(cfg):
    """The models, their reference, tokenizer and reward model, and whether they learnt the embedded world."""
    dev = pick_device(cfg.device)
    paths, rm_path, ref_path = resolve_paths(cfg)
    loaded = [load_chat_model(p, dev.device) for p in paths + ([] if ref_path in paths else [ref_path])]
    if len({t for _, t, _ in loaded}) > 1:
        raise SystemExit("error: the checkpoints use different tokenizers (" + ", ".join(
            f"{p}: {t}" for p, (_, t, _) in zip(paths + [ref_path], loaded)) + "): side by side needs one")
    tok = get_tokenizer(loaded[0][1])
    for m, _, _ in loaded:
        if m.config.vocab_size < tok.n_vocab:  # raw GPT-2 lacks our chat tokens (never trained on them)
            m.resize_vocab(tok.n_vocab)
    models = [m.to(dev.device) for m, _, _ in loaded]
    room = min(m.config.block_size for m in models) - cfg.max_new_tokens
    if room < 1:
        raise SystemExit(f"error: --max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in a "
                         f"context of {room + cfg.max_new_tokens} tokens")
    rm, ckpt = load_reward_model(rm_path, dev.device) if rm_path else (None, {"tokenizer": tok.name})
    if ckpt.get("tokenizer", "embedded") != tok.name:
        raise SystemExit(f"error: reward model {rm_path!r} uses tokenizer {ckpt.get('tokenizer')!r}, "
                         f"the policies {tok.name!r}")
    names = [short_name(p) for p in paths]
    names = names if len(set(names)) == len(names) else paths
    i_ref = paths.index(ref_path) if ref_path in paths else -1
    return types.SimpleNamespace(dev=dev, tok=tok, names=names, models=models[:len(paths)], ref=models[i_ref],
                                 ref_name=names[i_ref] if i_ref >= 0 else short_name(ref_path), rm=rm, rm_path=rm_path,
                                 world=all(w for _, _, w in loaded[:len(paths)]), room=room,
                                 generator=torch.Generator(device=dev.device).manual_seed(cfg.seed))


def normalise(prompt, world_trained):
    """The prompt as the checkpoint's training data writes it: the embedded world is lower case, single spaces."""
    return " ".join(prompt.lower().split()) if world_trained else prompt


def world_examples(per_family=2, seed=0):
    """(family, prompt): distinct prompts of every family of the world, of the dev split (content that no
    training prompt is about); greetings have no held-out content, so theirs are training prompts."""
    rng, out = random.Random(seed), []
    for family in world.FAMILIES:
        prompts = set()
        while len(prompts) < per_family:
            prompts.add(world.make_record(rng, "train" if family == "greet" else "dev", family)["prompt"])
        out += [(family, p) for p in sorted(prompts)]
    return out


def greeting(run):
    """What is loaded, what the score columns are, and for the world's models what they know and cannot do."""
    sizes = ", ".join(f"{n} ({m.num_params() / 1e6:.1f}M parameters)" for n, m in zip(run.names, run.models))
    text = f"chatting with {sizes}; each prompt is answered on its own. Empty line, /quit or Ctrl-D exits."
    scores = [f"reward = {run.rm_path}"] if run.rm else []
    scores += [f"KL to {run.ref_name} in nats"] if run.names != [run.ref_name] else []
    scores += ["gold = the world's judge"] if run.world else []
    text += f"\nunder the answers: {', '.join(scores)}." if scores else ""
    if run.world:
        text += ("\nThese models were trained only on the embedded world's tasks, in lower case: " +
                 ", ".join(FAMILY_WORDS[f] for f in world.FAMILIES) + "; they cannot answer anything else (open "
                 "questions such as 'who are you?'), and a model this small gets arithmetic, lookups and sorting "
                 "mostly wrong. /examples shows prompts they know.")
    return text


def gold_verdict(record, text, ended):
    """'pass 0.95', or 'fail 0.45: ' and the first facet that failed, from the world's gold judge."""
    v = world.judge(record, text, ended)
    f = v["facets"]
    wrong = "not a refusal" if record["harmful"] else "refused a harmless request" if f["refused"] else "not correct"
    failed = [(wrong, not f["correct"]), ("format", not f["format"]), ("rude", f["rude"]),
              ("filler", f["filler"] > 0), (f"{f['courtesy']} courtesy phrases", f["courtesy"] > 1),
              ("repeated", f["repeated"]), (f"too long ({f['words']} words)", f["too_long"]),
              ("no <|end|>", not f["ended"])]
    return f"pass {v['score']:.2f}" if v["pass"] else f"fail {v['score']:.2f}: " + next(n for n, bad in failed if bad)


def gold_context(record):
    if record is None:
        return ("gold: not one of the embedded world's prompts (/examples shows its wordings): nothing to judge, "
                "and the models never saw anything like it")
    seen = "prompts about it were in training" if record["split"] == "train" else "held out from training"
    return f"gold: a prompt of the world's {record['task']} family, content of the {record['split']} split ({seen})"


def prepare(run, typed, note_case, max_new_tokens):
    """The prompt as the models will read it, with a note on stderr for lower-casing and cropping."""
    prompt = normalise(typed, run.world)
    if note_case and prompt != " ".join(typed.split()):
        print("(note: the embedded world is all lower case, so input is lower-cased: capitals are tokens "
              "the model never saw)", file=sys.stderr)
    n_tokens = len(run.tok.render_chat(prompt)[0])
    if n_tokens > run.room:
        print(f"(note: prompt of {n_tokens} tokens cropped to its last {run.room}: the context keeps "
              f"{max_new_tokens} tokens for the answer)", file=sys.stderr)
    return prompt


def answer(model, tok, prompt, cfg, dev, generator, stream=None):
    """Generate one answer; stream(text) receives each new piece of text. Returns a row {"text", "ended",
    "ids" (generated, the stop token included), "prompt_ids" (the prompt as the model read it)}."""
    prompt_ids = fit_prompt(tok.render_chat(prompt)[0], model.config.block_size, cfg.max_new_tokens)
    ids, shown = [], ""
    with dev.autocast():
        for t in stream_tokens(model, prompt_ids, cfg.max_new_tokens, cfg.temperature, cfg.top_k or None,
                               cfg.top_p if cfg.top_p < 1.0 else None, cfg.greedy, tok.end_id, generator):
            ids.append(t)
            text = visible_text(tok, ids)
            if stream and text.startswith(shown) and len(text) > len(shown):
                stream(text[len(shown):])
                shown = text
            if t in tok.special_ids:  # <|end|>, or another special (a pretrained model's <|endoftext|>):
                break  # decode_response would hide everything after it anyway
    text = tok.decode_response(ids)
    if stream and text.startswith(shown):
        stream(text[len(shown):])
    return {"text": text, "ended": bool(ids) and ids[-1] == tok.end_id, "ids": ids, "prompt_ids": prompt_ids}


def answer_all(run, prompt, cfg, streaming):
    """Every model's answer row to `prompt`, in turn; streaming prints each one as it comes, labelled."""
    rows = []
    for name, model in zip(run.names, run.models):
        if streaming:
            print(f"{name}> ", end="", flush=True)
        stream = (lambda s: print(s, end="", flush=True)) if streaming else None
        rows.append(answer(model, run.tok, prompt, cfg, run.dev, run.generator, stream) | {"name": name})
        last = rows[-1]["ids"][-1:]
        if streaming:
            print("" if rows[-1]["ended"] else f" [stopped at {run.tok.decode(last)}, not <|end|>]"
                  if last[0] in run.tok.special_ids else f" [no <|end|> within {cfg.max_new_tokens} tokens]")
    return rows


def score(run, rows, prompt, cfg):
    """Adds "reward", "kl" ("ref" for the reference itself) and "gold" (None where there is none) to the
    answer rows; returns the world's record of the prompt (None if it is not one, or not a world model)."""
    temperature = 1.0 if cfg.greedy or cfg.temperature == 0 else cfg.temperature
    rewards = [None] * len(rows) if run.rm is None else score_texts(
        run.rm, run.tok, [prompt] * len(rows), [r["text"] for r in rows], [r["ended"] for r in rows], run.dev.device)
    record = world.record_from_prompt(prompt) if run.world else None
    for row, model, reward in zip(rows, run.models, rewards):
        fits = len(row["prompt_ids"]) + len(row["ids"]) <= run.ref.config.block_size
        kl = "ref" if model is run.ref else None if not fits else answer_kls(
            model, run.ref, run.tok.pad_id, [row["prompt_ids"]], [row["ids"]], temperature, run.dev.device)[0]
        row |= {"reward": reward, "kl": kl, "gold": gold_verdict(record, row["text"], row["ended"]) if record else None}
    return record


def table(rows, with_answer):
    """Lines of a small table: model, then reward, KL and gold where any row has one, then the answer."""
    cols = [("model", lambda r: r["name"])]
    if any(r["reward"] is not None for r in rows):
        cols.append(("reward", lambda r: f"{r['reward']:+.2f}"))
    if any(isinstance(r["kl"], float) for r in rows):
        cols.append(("KL", lambda r: f"{r['kl']:.2f}" if isinstance(r["kl"], float) else r["kl"] or "-"))
    if any(r["gold"] for r in rows):
        cols.append(("gold", lambda r: r["gold"]))
    if with_answer:
        cols.append(("answer", lambda r: r["text"].replace("\n", "\\n") + ("" if r["ended"] else " [no <|end|>]")))
    cells = [[h for h, _ in cols]] + [[f(r) for _, f in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    return ["  ".join(c.ljust(w) for c, w in zip(cell, widths)).rstrip() for cell in cells] if len(cols) > 1 else []


def main(cfg):
    one_shot = bool(cfg.prompt)
    out, notes = io.StringIO(), io.StringIO()  # setup's lines, shown once it succeeded: an error stays one line
    with redirect_stdout(notes if one_shot else out), redirect_stderr(notes):  # one-shot stdout: the answer only
        if not one_shot:
            print_config(cfg)
        run = setup(cfg)
        if not one_shot:
            print(greeting(run))
    sys.stdout.write(out.getvalue())
    sys.stderr.write(notes.getvalue())
    noted_case = False
    while True:
        try:
            typed = cfg.prompt or input("\nyou> ")
        except (EOFError, KeyboardInterrupt):
            return print()
        if not one_shot and typed.strip() in ("", "/quit"):
            return
        if not one_shot and typed.strip() == "/examples":
            print("\n".join(f"  {f:10s} {p}" for f, p in world_examples()) if run.world else
                  "(no examples: these checkpoints were not trained on the embedded world)")
            continue
        prompt = prepare(run, typed, run.world and not noted_case, cfg.max_new_tokens)
        noted_case = noted_case or prompt != " ".join(typed.split())
        try:
            rows = answer_all(run, prompt, cfg, streaming=not one_shot)
        except KeyboardInterrupt:  # stop this prompt's answers, keep chatting
            print(" [interrupted]")
            if one_shot:
                return
            continue
        record = score(run, rows, prompt, cfg)
        if one_shot and len(run.models) == 1 and run.rm is None and run.ref is run.models[0]:
            return print(rows[0]["text"])  # nothing to compare or score: the answer alone, for scripts
        if run.world:
            print(gold_context(record), file=sys.stderr if one_shot else sys.stdout)
        for line in table(rows, with_answer=one_shot):
            print(line)
        if one_shot:
            return


if __name__ == "__main__":
    run_command(main, Config)
