"""Byte-level BPE tokenizer: our own readable trainer, tiktoken for fast encoding, chat special tokens.

Train on a text file and write the ranks in tiktoken's file format:

    python tokenizer.py --input=data/world/corpus.txt --vocab_size=1024 --output=data/embedded.tiktoken
    python tokenizer.py --input=task/corpus.txt --vocab_size=512    # writes task/corpus.tiktoken

With your own --input and no --output, the ranks go next to the input (corpus.txt -> corpus.tiktoken),
never over the embedded world's data/embedded.tiktoken; a missing or non-UTF-8 input is one error line.

Implementation details:
1. Pre-split with GPT-2's regex (Radford et al. 2019, sec. 2.2): merges never cross a word, a number
   or a punctuation run; a leading space belongs to the word that follows it. The pattern needs
   \\p{L} / \\p{N} (Unicode letters / numbers), which Python's `re` lacks (`[^\\W\\d_]` approximates
   \\p{L} but also takes '²' or '½'), so we use the `regex` module: it is what tiktoken itself uses
   to split in Python (it is one of tiktoken's dependencies), and the trainer and tiktoken then split
   with the very same pattern string.
2. Train on the counts of distinct words, not on the text: a word seen 5000 times is one list of ids
   with weight 5000. The pair counts are updated only for the words that contain the merged pair
   (about 30x faster than recounting every pair at every merge).
3. Merge the most frequent adjacent pair; ties go to the lowest pair of ids so training is
   deterministic. Merges are applied left to right without overlap ("aaa" -> "aa" "a").
4. The result is tiktoken's "mergeable ranks": the 256 single bytes ranked 0..255 (GPT-2 permutes
   these; we do not), then the bytes of merge k ranked 256 + k. tiktoken encodes by repeatedly merging
   the adjacent pair whose concatenation has the lowest rank (`bpe_encode` below, in Python), which
   reproduces the trainer's segmentation of its words; the tests check both agree with tiktoken.
5. Files use tiktoken's format (base64 token, space, rank per line). We parse them ourselves:
   `tiktoken.load.load_tiktoken_bpe` caches a local path by its name in a temp folder and then keeps
   returning the old contents after the file is retrained.
6. Special tokens (SPECIAL_TOKENS, defined here only) are tiktoken special tokens numbered right after
   the ranks; for gpt2 <|endoftext|> keeps 50256 and the four chat tokens take 50257..50260.
   `encode` never produces them: a "<|end|>" typed inside text is encoded as ordinary bytes, so a user
   cannot forge the end of a turn.
"""
import base64
import dataclasses
import os
import time
from collections import Counter, defaultdict
from typing import Annotated

import regex
import tiktoken

from common import at_least, print_config, run_command
from data.formats import read_corpus

# tiktoken's gpt2 / r50k_base pat_str: GPT-2's original
# 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+ rewritten to run faster.
GPT2_SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
SPECIAL_TOKENS = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>", "<|pad|>"]
EMBEDDED_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "embedded.tiktoken")


@dataclasses.dataclass
class Config:
    input: str = "data/world/corpus.txt"  # text file to train on (written by `python -m data.world`)
    vocab_size: Annotated[int, at_least(256 + len(SPECIAL_TOKENS))] = 1024  # total vocabulary, special tokens included
    output: str = "data/embedded.tiktoken"  # where to write the ranks, in tiktoken's format (see the docstring)
    verbose: bool = False  # print every merge


# ----------------------------------------------------------------------------- training

def merge(ids, pair, new_id):
    """Replace every occurrence of `pair` in `ids`, left to right, by `new_id`."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def learn_merges(word_counts, num_merges, verbose=False):
    """BPE on {word: count}: returns the merged pairs in order; pair k became token id 256 + k."""
    words = [list(w.encode("utf-8")) for w in word_counts]  # each distinct word as byte ids
    counts = list(word_counts.values())
    stats = Counter()  # (id, id) -> occurrences in the corpus, weighted by word counts
    where = defaultdict(set)  # (id, id) -> indices of the words that contain it (maybe stale)
    for i, (ids, c) in enumerate(zip(words, counts)):
        for pair in zip(ids, ids[1:]):
            stats[pair] += c
            where[pair].add(i)
    merges = []
    for k in range(num_merges):
        if not stats:
            print(f"stopping after {k} merges: every word is a single token")
            break
        best = max(stats.values())
        pair = min(p for p, c in stats.items() if c == best)  # ties -> lowest pair of ids
        new_id = 256 + k
        for i in where.pop(pair):  # only these words change: move their pairs out, merge, back in
            ids, c = words[i], counts[i]
            for p in zip(ids, ids[1:]):
                stats[p] -= c
                if stats[p] == 0:
                    del stats[p]
            words[i] = ids = merge(ids, pair, new_id)
            for p in zip(ids, ids[1:]):
                stats[p] += c
                where[p].add(i)
        merges.append(pair)
        if verbose:
            print(f"merge {k + 1}/{num_merges}: {pair} -> {new_id} (count {best})")
    return merges


def train_bpe(text, vocab_size, verbose=False):
    """Train byte-level BPE on `text`; returns tiktoken mergeable ranks {token bytes: rank}."""
    num_merges = vocab_size - len(SPECIAL_TOKENS) - 256
    if num_merges < 0:
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    word_counts = Counter(regex.findall(GPT2_SPLIT_PATTERN, text))
    vocab = [bytes([b]) for b in range(256)]  # token id -> bytes
    for a, b in learn_merges(word_counts, num_merges, verbose):
        vocab.append(vocab[a] + vocab[b])
    return {token: rank for rank, token in enumerate(vocab)}


def bpe_encode(word_bytes, ranks):
    """What tiktoken does to one pre-split piece, in Python: merge the lowest-rank pair until none."""
    parts = [bytes([b]) for b in word_bytes]
    while True:
        found = [(ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in ranks]
        if not found:
            return [ranks[p] for p in parts]
        _, i = min(found)  # lowest rank, then leftmost
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


# ----------------------------------------------------------------------------- files

def save_tiktoken(path, ranks):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        for token, rank in sorted(ranks.items(), key=lambda x: x[1]):
            f.write(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
    os.replace(path + ".tmp", path)


def load_tiktoken(path):
    ranks = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not 0..{len(ranks) - 1} (special tokens follow them)")
    return ranks


# ----------------------------------------------------------------------------- the tokenizer

class Tokenizer:
    """A tiktoken Encoding plus the ids of our special tokens and the chat layout."""

    def __init__(self, enc):
        self.enc = enc
        self.name = enc.name
        self.n_vocab = enc.n_vocab
        ids = [enc.encode_single_token(s) for s in SPECIAL_TOKENS]
        self.eot_id, self.user_id, self.assistant_id, self.end_id, self.pad_id = ids
        self.special_ids = set(ids)

    def encode(self, text):
        # plain text only: special-token strings in the text become ordinary bytes
        return self.enc.encode(text, allowed_special=set(), disallowed_special=())

    def decode(self, ids):
        return self.enc.decode([int(i) for i in ids])

    def decode_response(self, ids):
        """Text of a generated response: up to its first special token (<|end|>, <|pad|>, ...)."""
        ids = [int(i) for i in ids]
        n = next((t for t, i in enumerate(ids) if i in self.special_ids), len(ids))
        text = self.enc.decode(ids[:n])
        return text[1:] if text.startswith(" ") else text  # the space render_chat put in front

    def render_chat(self, prompt, response=None):
        """<|user|> prompt <|assistant|> | response <|end|>. The leading space makes the first word
        of each turn the same token as mid-sentence (GPT-2 words carry their space)."""
        prompt_ids = [self.user_id] + self.encode(" " + prompt) + [self.assistant_id]
        if response is None:
            return prompt_ids, None
        return prompt_ids, self.encode(" " + response) + [self.end_id]


def make_encoding(name, ranks, pat_str=GPT2_SPLIT_PATTERN, special_tokens=None):
    """tiktoken Encoding of `ranks`; the special tokens default to the ids right after the ranks."""
    if special_tokens is None:
        special_tokens = {s: len(ranks) + i for i, s in enumerate(SPECIAL_TOKENS)}
    return tiktoken.Encoding(name=name, pat_str=pat_str, mergeable_ranks=ranks,
                             special_tokens=special_tokens)


def get_tokenizer(name="embedded"):
    """name: 'embedded' (data/embedded.tiktoken), 'gpt2' (tiktoken's + chat tokens) or a .tiktoken path."""
    if name == "gpt2":
        try:
            base = tiktoken.get_encoding("gpt2")
        except Exception as e:
            raise SystemExit(f"error: tiktoken.get_encoding('gpt2') failed ({type(e).__name__}: {e}). "
                             f"The first use downloads GPT-2's BPE files, so it needs internet once; "
                             f"they are then cached (TIKTOKEN_CACHE_DIR)") from e
        special_tokens = {SPECIAL_TOKENS[0]: base.eot_token}  # <|endoftext|> keeps 50256
        special_tokens.update({s: base.n_vocab + i for i, s in enumerate(SPECIAL_TOKENS[1:])})
        return Tokenizer(make_encoding(name, base._mergeable_ranks, base._pat_str, special_tokens))
    path = EMBEDDED_PATH if name == "embedded" else name
    if not os.path.isfile(path):
        hint = "run `python -m data.world` to build it" if name == "embedded" else \
            "pass 'embedded', 'gpt2' or the path of a .tiktoken file"
        raise SystemExit(f"error: tokenizer file {path!r} does not exist ({hint})")
    try:
        ranks = load_tiktoken(path)
    except (ValueError, UnicodeDecodeError) as e:  # not "<base64 token> <rank>" lines
        raise SystemExit(f"error: tokenizer file {path!r} is not a .tiktoken file ({e})") from None
    return Tokenizer(make_encoding(name, ranks))


def tokens_per_word(tok, text):
    """Tokens per whitespace-separated word: ~1.3 for GPT-2 on English, ~1 on a closed vocabulary."""
    return len(tok.encode(text)) / max(1, len(text.split()))


def train_from_file(input_path, vocab_size, output_path, verbose=False):
    """Train on a text file, save the ranks to `output_path`, return the Tokenizer it loads as."""
    text = read_corpus(input_path)  # a missing or non-UTF-8 file: one error line naming it
    t0 = time.time()
    ranks = train_bpe(text, vocab_size, verbose)
    dt = time.time() - t0
    save_tiktoken(output_path, ranks)
    tok = get_tokenizer(output_path)
    print(f"trained {len(ranks) - 256} merges on {len(text) / 1e6:.2f} MB in {dt:.1f}s -> {output_path} "
          f"(n_vocab {tok.n_vocab}, {tokens_per_word(tok, text):.3f} tokens per word)")
    return tok


def main(cfg):
    if cfg.input != Config.input and cfg.output == Config.output:  # never overwrite the embedded world's BPE
        cfg = dataclasses.replace(cfg, output=os.path.splitext(cfg.input)[0] + ".tiktoken")
        print(f"note: --output not given with your own --input: writing {cfg.output}")
    print_config(cfg)
    train_from_file(cfg.input, cfg.vocab_size, cfg.output, cfg.verbose)


if __name__ == "__main__":
    run_command(main, Config)
