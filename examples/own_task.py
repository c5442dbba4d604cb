"""A task of your own, from scratch: "animal sounds", with its data files and its gold judge.

    python examples/own_task.py --out=task          # task/: corpus, demonstrations, comparisons, prompts
    python ppo.py ... --judge=examples/own_task.py:judge

This is what docs/OWN_DATA.md's worked example trains on. It stands for the data a user brings: it imports
nothing from this project, and the stages read its files only through the options the guide passes.

The task: "what sound does a cow make?" -> "a cow says moo." A prompt may add an instruction ("answer in
one word." / "answer in a full sentence."). Every row carries the task's own record under "record"
(the animal, its sound, the format asked for): the project's stages keep such extra fields and hand the
whole row to the judge.

Files written to --out:
    corpus.txt          the "internet": facts, stories, lists and forum answers about every animal (no chat)
    sft_train.jsonl     demonstrations {"prompt", "response", "ended", "record"} by an imperfect demonstrator
    sft_val.jsonl       a tenth more of them, for the validation loss
    comparisons.jsonl   pairwise preferences {"prompt", "chosen", "rejected", "record"} (HH-RLHF's form),
                        labelled by a noisy labeler who prefers the answer the judge scores higher; a
                        third of the pairs (--bad_fraction) put a demonstration against a degenerate answer
    ppo_prompts.jsonl   prompts for PPO {"prompt", "record"}
    heldout.jsonl       held-out prompts {"prompt", "record"}: prompt texts that no other file contains

The demonstrator's flaws: a wrong sound (10%), filler ("let me think.", 25%), a sentence where one word
was asked for (a majority habit: 60% of those prompts, so SFT's greedy answer inherits it and RLHF has
something to fix), a bare word where a sentence was asked for (20%), and an answer that never ends (3%).
"""
import argparse
import json
import math
import os
import random
import re
import zlib

ANIMALS = [("cow", "moo"), ("dog", "woof"), ("cat", "meow"), ("duck", "quack"), ("sheep", "baa"), ("pig", "oink"),
           ("horse", "neigh"), ("owl", "hoot"), ("frog", "ribbit"), ("lion", "roar"), ("snake", "hiss"),
           ("bee", "buzz"), ("mouse", "squeak"), ("crow", "caw"), ("hen", "cluck"), ("wolf", "howl"),
           ("donkey", "bray"), ("turkey", "gobble"), ("bear", "growl"), ("dove", "coo"), ("cricket", "chirp"),
           ("goat", "bleat"), ("elephant", "trumpet"), ("seal", "bark")]
SOUNDS = {s for _, s in ANIMALS}
QUESTIONS = ["what sound does a {a} make?", "what does a {a} say?", "which noise does the {a} make?",
             "tell me the sound of a {a}.", "how does a {a} sound?", "what noise do you hear from a {a}?"]
INSTRUCTIONS = {None: "", "word": " answer in one word.", "sentence": " answer in a full sentence."}
SENTENCES = ["a {a} says {s}.", "the {a} goes {s}.", "a {a} makes the sound {s}."]
FILLER = ["let me think.", "good question!", "animals are fun.", "i like this one."]
BAD = ["", ".", "{a}.", "i do not know.", "{t}.", "let me think.", "{other}"]  # answers a policy can drift to
MAX_WORDS = 10


def grammar(text):
    """'a owl' -> 'an owl'."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


# ----------------------------------------------------------------------------- the gold judge

def judge(row, response, ended=True):
    """The task's gold judge, in the interface every stage calls (evaluate.py, detail 1): the prompt row as
    read from its file (it reads row["record"], the task's own field), the answer text, whether it ended.

    score = 0.5 correct + 0.25 format + 0.25 concise, halved if the answer never ended, where
      correct: the answer names the animal's sound and no other animal's sound;
      format:  "word" asked: the bare sound (a final period allowed), else 0; "sentence" asked: at least
               three words naming the animal, ending in "." or "!", else 0; nothing asked: 1 for such a
               sentence, 0.8 for the bare sound, else 0.5;
      concise: no filler sentence and at most MAX_WORDS words.
    pass: correct, format 1, concise and ended."""
    rec = row["record"]
    text = response.strip().lower()
    words = re.findall(r"[a-z']+", text)
    named = [w for w in words if w in SOUNDS]
    correct = bool(named) and all(w == rec["sound"] for w in named)
    bare = re.fullmatch(rf"{rec['sound']}\.?", text) is not None
    sentence = len(words) >= 3 and rec["animal"] in words and text.endswith((".", "!"))
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if s]
    filler = sum(s in FILLER for s in sentences)
    if rec["format"] == "word":
        fmt = float(bare)
    elif rec["format"] == "sentence":
        fmt = float(sentence and not bare)
    else:
        fmt = 1.0 if sentence else 0.8 if bare else 0.5
    concise = filler == 0 and len(words) <= MAX_WORDS
    score = (0.5 * correct + 0.25 * fmt + 0.25 * concise) * (1.0 if ended else 0.5)
    return {"score": round(score, 6), "pass": correct and fmt == 1.0 and concise and ended,
            "facets": {"correct": correct, "format": fmt, "concise": concise, "filler": filler, "words": len(words),
                       "ended": bool(ended)},
            "family": rec["format"] or "free"}


# ----------------------------------------------------------------------------- prompts and the demonstrator

def all_records():
    """Every prompt text of the task with its record: animal x question x instruction."""
    return [{"animal": a, "sound": s, "format": f, "prompt": grammar(q.format(a=a)) + INSTRUCTIONS[f]}
            for a, s in ANIMALS for q in QUESTIONS for f in INSTRUCTIONS]


def held_out(record):
    """A fifth of the prompt texts, fixed by a hash of the text: they appear only in heldout.jsonl."""
    return zlib.crc32(record["prompt"].encode()) % 5 == 0


def demonstrate(record, rng):
    """One imperfect demonstration: (response, ended)."""
    animal, sound = record["animal"], record["sound"]
    if rng.random() < 0.10:
        sound = rng.choice(sorted(SOUNDS - {sound}))
    word = (record["format"] == "word" and rng.random() >= 0.6) or (record["format"] is None and rng.random() < 0.5) \
        or (record["format"] == "sentence" and rng.random() < 0.2)
    answer = f"{sound}." if word else grammar(rng.choice(SENTENCES).format(a=animal, s=sound))
    if rng.random() < 0.25:
        filler = rng.choice(FILLER)
        answer = f"{filler} {answer}" if rng.random() < 0.5 else f"{answer} {filler}"
    if rng.random() < 0.03:
        return " ".join([answer] * 4), False  # a demonstrator that repeats itself and never stops
    return answer, True


def row(record, **fields):
    return {"prompt": record["prompt"], **fields, "record": {k: record[k] for k in ("animal", "sound", "format")}}


def comparison(record, rng, bad_fraction=1 / 3, tau=0.15):
    """Two different answers ranked by a noisy labeler: P(a preferred) = sigmoid((gold a - gold b) / tau). Both
    are demonstrations, or (a share bad_fraction of the pairs) one is a degenerate answer (BAD: empty, the
    animal's name, another animal's sound, a sentence about another animal, ...), so that the reward model
    has seen what a policy might drift to. None when the two are the same answer or equally good."""
    (a, end_a), (b, end_b) = demonstrate(record, rng), demonstrate(record, rng)
    if rng.random() < bad_fraction:
        animal, sound = rng.choice([x for x in ANIMALS if x[0] != record["animal"]])  # another animal
        other = grammar(rng.choice(SENTENCES).format(a=animal, s=sound))  # right about the wrong animal
        b, end_b = rng.choice(BAD).format(a=record["animal"], t=sound, other=other), True
    ga, gb = (judge(row(record), t, e)["score"] for t, e in ((a, end_a), (b, end_b)))
    if a == b or ga == gb or not (end_a and end_b):  # pairwise rows carry no "ended": both end
        return None
    a_first = rng.random() < 1 / (1 + math.exp(-(ga - gb) / tau))
    return row(record, chosen=a if a_first else b, rejected=b if a_first else a)


# ----------------------------------------------------------------------------- the corpus

def corpus_document(rng):
    return grammar(corpus_text(rng))


def corpus_text(rng):
    a, s = rng.choice(ANIMALS)
    b, t = rng.choice(ANIMALS)
    kind = rng.randrange(5)
    if kind == 0:
        return " ".join(rng.choice(SENTENCES).format(a=x, s=y) for x, y in rng.sample(ANIMALS, rng.randint(2, 5)))
    if kind == 1:
        return (f"once upon a time there was a {a}. every morning the {a} said {s}. one day it met a {b}, "
                f"and the {b} said {t}. they became friends.")
    if kind == 2:
        opener = rng.choice([f"{s}.", *FILLER])  # forums ramble too
        return f"question: {rng.choice(QUESTIONS).format(a=a)}\nanswer: {opener} the {a} goes {s}."
    if kind == 3:
        return "animals and their sounds: " + ", ".join(f"{x} {y}" for x, y in rng.sample(ANIMALS, 6)) + "."
    return f"if you hear {s}, there is a {a} nearby. a {b} would go {t} instead."


def build(out, seed=0, corpus_chars=300_000, n_sft=1500, n_pairs=2000, n_ppo=1000, n_heldout=80, bad_fraction=1 / 3):
    """Write the task's files into `out` (see the module docstring)."""
    rng = random.Random(seed)
    records = all_records()
    train, test = [r for r in records if not held_out(r)], [r for r in records if held_out(r)]
    os.makedirs(out, exist_ok=True)
    docs, size = [], 0
    while size < corpus_chars:
        docs.append(corpus_document(rng))
        size += len(docs[-1]) + 2
    with open(os.path.join(out, "corpus.txt"), "w") as f:
        f.write("\n\n".join(docs) + "\n")
    demos = []
    for _ in range(n_sft + n_sft // 10):
        record = rng.choice(train)
        text, ended = demonstrate(record, rng)
        demos.append(row(record, response=text, ended=ended))
    pairs = []
    while len(pairs) < n_pairs:
        pairs += [c for c in [comparison(rng.choice(train), rng, bad_fraction)] if c]
    files = {"sft_train": demos[:n_sft], "sft_val": demos[n_sft:], "comparisons": pairs,
             "ppo_prompts": [row(rng.choice(train)) for _ in range(n_ppo)],
             "heldout": [row(r) for r in rng.sample(test, min(n_heldout, len(test)))]}
    for name, rows in files.items():
        with open(os.path.join(out, name + ".jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"wrote {out}: corpus {size:,} characters, " + ", ".join(f"{n} {len(r)}" for n, r in files.items()))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="task", help="folder to write the files into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corpus_chars", type=int, default=300_000)
    p.add_argument("--n_sft", type=int, default=1500, help="demonstrations (and a tenth more for validation)")
    p.add_argument("--n_pairs", type=int, default=2000, help="pairwise comparisons")
    p.add_argument("--n_ppo", type=int, default=1000, help="PPO prompts")
    p.add_argument("--n_heldout", type=int, default=80, help="held-out prompts (at most the held-out texts)")
    p.add_argument("--bad_fraction", type=float, default=1 / 3, help="share of pairs against a degenerate answer")
    a = p.parse_args()
    build(a.out, a.seed, a.corpus_chars, a.n_sft, a.n_pairs, a.n_ppo, a.n_heldout, a.bad_fraction)


if __name__ == "__main__":
    main()
