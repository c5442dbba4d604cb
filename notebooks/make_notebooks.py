"""Writes the five course notebooks (and, with --execute, runs them in place so they carry outputs).

    python notebooks/make_notebooks.py             # regenerate the .ipynb files from the cells below
    python notebooks/make_notebooks.py --execute   # ... and execute them top to bottom, saving outputs

The notebooks are the course text: plain language first, then the maths, then code that IMPORTS the
stage scripts (a cell that rebuilds a formula for teaching ends with torch.testing.assert_close against
the script's own function). Each ends with exercises whose check cells skip politely while the stub
still raises NotImplementedError, so the notebooks run top to bottom in the test suite
(tests/test_notebooks.py). Edit the cells here, not in the .ipynb files.
"""
import os
import sys
import tempfile
import time
from textwrap import dedent

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))



def md(src):
    return ("md", src)


def code(src):
    return ("code", src)


SETUP = """
import os
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F

import tiny  # notebooks/tiny.py: puts the repository root on sys.path, finds or builds the checkpoints

torch.set_num_threads(1)  # tiny models: one thread is as fast as two here, and runs are bitwise reproducible
torch.manual_seed(0)
plt.rcParams["figure.dpi"] = 80
"""

# ============================================================================= 01 the GPT

GPT = [
    md(r'''
    # 1. The GPT: tokens, attention, sampling and pretraining

    This course builds the InstructGPT recipe (Ouyang et al. 2022) from scratch on a small "embedded
    world" where the truth is known: a generated internet to pretrain on, imperfect demonstrations, simulated
    labelers and a programmatic **gold judge**. Five notebooks, one per stage:

    | notebook | stage | script |
    |---|---|---|
    | **01 (this one)** | the language model itself: tokens, attention, sampling, pretraining | `model.py`, `tokenizer.py`, `pretrain.py` |
    | 02 | step 1: supervised fine-tuning on demonstrations | `sft.py` |
    | 03 | step 2: a reward model from rankings | `reward.py` |
    | 04 | step 3: PPO against the reward model | `ppo.py` |
    | 05 | what goes wrong when you optimise a proxy too hard | `reward.py`, `ppo.py` |

    Every notebook **imports** the scripts instead of copying them. When a cell rebuilds a formula by hand
    to show how it works, it ends by checking its result against the script's function with
    `torch.testing.assert_close`: the notebook and the code you would run can never drift apart.

    The checkpoints come from `notebooks/tiny.py`: if `python pipeline.py` has been run, its models in
    `runs/` are used; otherwise a tiny chain (a 2-layer GPT) is built once in about a minute and shared by
    all five notebooks. Numbers in the text are therefore described, not promised: read the printed ones.
    '''),
    code(SETUP + '''
chain = tiny.ensure("pretrain")  # the world's files and a pretrained checkpoint
'''),
    md(r'''
    ## 1.1 Tokens: text as a list of integers

    A neural network reads numbers, not letters. A **tokenizer** cuts text into pieces (tokens) and gives
    each piece an integer id. Single characters would make sequences long; whole words would need a huge
    vocabulary and could not spell a word they never saw. **Byte-pair encoding** (BPE) sits in between:
    start from the 256 possible bytes, then repeatedly *merge the most frequent adjacent pair* into a new
    token. Frequent words end up as one token, rare words as a few pieces, and any text can still be
    written with the 256 bytes.

    `tokenizer.py` has our own readable trainer (`train_bpe`) and hands the result to
    [tiktoken](https://github.com/openai/tiktoken) for fast encoding. Watch it learn on a toy text:
    '''),
    code('''
from tokenizer import SPECIAL_TOKENS, get_tokenizer, train_bpe

toy = "the cat sat on the mat. the cat ate the rat. " * 20
ranks = train_bpe(toy, vocab_size=256 + len(SPECIAL_TOKENS) + 8)  # room for 8 merges
learned = sorted((r, t) for t, r in ranks.items() if r >= 256)
for rank, token in learned:
    print(f"merge {rank - 255}: token {rank} = {token!r}")
'''),
    md(r'''
    The first merges glue the most frequent pairs of the toy text (`a`+`t`, `h`+`e`, then `t`+`he`), and GPT-2's
    pre-splitting rule keeps a leading space attached to the word after it (`' cat'`), so a word is the
    same token in the middle of every sentence.

    Now the real thing: our BPE with 1024 tokens trained on the embedded world's corpus
    (`get_tokenizer("embedded")`).
    '''),
    code('''
tok = get_tokenizer("embedded")
text = "mia has a red hat and a blue cup. what color is the hat?"
ids = tok.encode(text)
print(f"{len(text.split())} words -> {len(ids)} tokens, vocabulary of {tok.n_vocab}")
print(ids)
print([tok.decode([i]) for i in ids])
assert tok.decode(ids) == text  # encoding loses nothing
'''),
    md(r'''
    **Special tokens.** Five ids are reserved for markers that ordinary text can never produce:
    `<|endoftext|>` separates documents in pretraining, and the chat template of the later notebooks is
    `<|user|> prompt <|assistant|> answer <|end|>`. Because `encode` never emits them, a user who *types*
    "<|end|>" gets ordinary bytes, not the real end-of-turn token: nobody can forge the end of a turn.
    '''),
    code('''
print({s: tok.enc.encode_single_token(s) for s in SPECIAL_TOKENS})
prompt_ids, answer_ids = tok.render_chat("what is 3 plus 4?", "7.")
print("prompt:", [tok.decode([i]) for i in prompt_ids])
print("answer:", [tok.decode([i]) for i in answer_ids])
typed = tok.encode("<|end|>")
print("'<|end|>' typed as text ->", typed, "(", len(typed), "ordinary tokens, not", tok.end_id, ")")
assert tok.end_id not in typed
'''),
    md(r'''
    GPT-2's own tokenizer (50,257 tokens, trained on real web text) is available through the same function
    as `get_tokenizer("gpt2")`; tiktoken downloads its files once. Where that is possible we compare
    token counts: GPT-2 needs about 1.3 tokens per English word; our BPE, 50 times smaller, gets a similar
    rate on the world's text because the embedded world only uses a few hundred distinct words.
    '''),
    code('''
from tokenizer import tokens_per_word

gpt2 = tiny.gpt2_tokenizer()  # None (with a one-line note) when the files cannot be downloaded
sample = "question: how do i boil an egg?\\nanswer: put the egg in a pot of boiling water and wait ten minutes."
print(f"embedded BPE: {tokens_per_word(tok, sample):.2f} tokens per word")
if gpt2 is not None:
    print(f"GPT-2 BPE:    {tokens_per_word(gpt2, sample):.2f} tokens per word")
    print([gpt2.decode([i]) for i in gpt2.encode(sample)][:16])
'''),
    md(r'''
    ## 1.2 Embeddings: from ids to vectors

    The model we load below is the one the pretraining stage produced. (The tiny chain trains its own
    small BPE, so we switch to the tokenizer stored in the checkpoint.) Its first layer is a lookup table:
    token id $t$ selects row $t$ of the **token embedding** $W_E \in \mathbb{R}^{V \times C}$, and the
    position $p$ selects row $p$ of the **position embedding** $W_P \in \mathbb{R}^{T_{max} \times C}$:

    $$x_p^{(0)} = W_E[t_p] + W_P[p] \qquad (C \text{ numbers per token: the "residual stream"})$$

    Attention by itself cannot tell positions apart (it treats its input as a set), so the position
    embedding is the only place where word order enters. GPT-2 learns it like any other weight.
    '''),
    code('''
from common import load_model
from model import position_ids

model, ckpt = load_model(chain.pretrain)
model.eval()
mtok = get_tokenizer(ckpt["tokenizer"])  # the tokenizer this model was trained with
print(model.config, f"-> {model.num_params():,} parameters")

idx = torch.tensor([[mtok.eot_id] + mtok.encode("mia has a red hat and a blue cup. the hat is")])  # (B=1, T)
B, T = idx.shape
C, H = model.config.n_embd, model.config.n_head
D = C // H  # channels per attention head
labels = [mtok.decode([i]) for i in idx[0].tolist()]
x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(T))  # (B, T, C)
print("x:", tuple(x.shape), "= (batch, time, channels)")
'''),
    md(r'''
    ## 1.3 One attention head, by hand

    Attention lets every position gather information from earlier positions. In plain words: each token
    asks a question (its **query**), every token advertises what it holds (its **key**), and a token
    collects the **values** of the tokens whose keys best match its query. With $a = \mathrm{LayerNorm}(x)$
    and the head's slices of the weight matrices,

    $$q = a W_Q,\quad k = a W_K,\quad v = a W_V,\qquad
      A = \mathrm{softmax}\!\left(\frac{q k^\top}{\sqrt{D}} + M\right),\qquad y = A v$$

    where $D$ is the head size and $M$ is the **causal mask**: $M_{ij} = 0$ if $j \le i$ and
    $-\infty$ if $j > i$, so a token never sees the future (after the softmax, those weights are exactly
    0). Each row of $A$ is a probability distribution over the positions a token may look at. Dividing by
    $\sqrt{D}$ keeps the scores at unit scale so the softmax does not saturate (Vaswani et al. 2017).

    GPT-2 stores $W_Q, W_K, W_V$ side by side in one linear layer `c_attn` (output $3C$), and the $H$ heads
    are consecutive slices of $D$ channels. Here is head 0 of layer 0, computed from those weights:
    '''),
    code('''
from model import attention_mask_4d, explicit_attention

block = model.transformer.h[0]
a = block.ln_1(x)                                          # (B, T, C)
W, b = block.attn.c_attn.weight, block.attn.c_attn.bias    # (3C, C), (3C,): q, k, v stacked
q, k, v = (a @ W.T + b).split(C, dim=-1)                   # each (B, T, C)
head = 0
qh, kh, vh = (t[..., head * D:(head + 1) * D] for t in (q, k, v))  # (B, T, D)
scores = qh @ kh.transpose(-2, -1) / D ** 0.5              # (B, T, T): query i against key j
causal = torch.tril(torch.ones(T, T, dtype=torch.bool))    # True where j <= i
A = scores.masked_fill(~causal, float("-inf")).softmax(dim=-1)  # (B, T, T), rows sum to 1
y = A @ vh                                                 # (B, T, D)

# the same numbers from model.py: its explicit path returns the weights of every layer and head
maps = model.attention_maps(idx)  # list over layers of (B, H, T, T)
torch.testing.assert_close(A, maps[0][:, head])
y_model, _ = explicit_attention(*(t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v)),
                                attention_mask_4d(torch.ones(B, T), T))  # (B, H, T, D)
torch.testing.assert_close(y, y_model[:, head])
print("head 0 of layer 0 by hand == model.py; every row sums to 1:", torch.allclose(A.sum(-1), torch.ones(B, T)))
'''),
    md(r'''
    ### The attention pattern as a picture

    Row $i$ shows where token $i$ looks. Everything above the diagonal is exactly zero: that is the causal
    mask. Different heads learn different habits (look at the previous token, at the start of the text,
    at the last noun, ...).
    '''),
    code('''
fig, axes = plt.subplots(1, 2, figsize=(12, 5.2), constrained_layout=True)
for ax, (layer, title) in zip(axes, [(0, "layer 0, head 0 (the one computed by hand)"),
                                     (model.config.n_layer - 1, f"layer {model.config.n_layer - 1}, head 0")]):
    im = ax.imshow(maps[layer][0, 0].numpy(), cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(T), labels, rotation=90, fontsize=8)
    ax.set_yticks(range(T), labels, fontsize=8)
    ax.set_xlabel("key (looked at)")
    ax.set_ylabel("query (looking)")
    ax.set_title(title)
fig.colorbar(im, ax=axes, shrink=0.8)
plt.show()

fig, axes = plt.subplots(1, H, figsize=(3 * H, 3))
for h, ax in enumerate(np.atleast_1d(axes)):
    ax.imshow(maps[-1][0, h].numpy(), cmap="viridis", vmin=0, vmax=1)
    ax.set_title(f"last layer, head {h}")
    ax.axis("off")
plt.show()
'''),
    md(r'''
    ### The causal mask in action

    Because of the mask, the output at position $i$ depends on tokens $0..i$ only. So changing the *last*
    token must leave the logits at every earlier position untouched. This is what lets one forward pass
    train on all $T$ next-token predictions of a sequence at once.
    '''),
    code('''
idx2 = idx.clone()
idx2[0, -1] = (idx2[0, -1] + 1) % model.config.vocab_size  # change only the last token
with torch.no_grad():
    l1, l2 = model(idx)[0], model(idx2)[0]                  # (B, T, V)
torch.testing.assert_close(l1[:, :-1], l2[:, :-1])          # the past never sees the future
print("max change at earlier positions:", (l1[:, :-1] - l2[:, :-1]).abs().max().item())
print("max change at the last position:", (l1[:, -1] - l2[:, -1]).abs().max().item())
'''),
    md(r'''
    ## 1.4 The whole forward pass, by hand

    A GPT-2 block is two sub-layers, each added to the residual stream (pre-LayerNorm, GPT-2 sec. 2.3):

    $$x \leftarrow x + \mathrm{Attn}(\mathrm{LN}_1(x)), \qquad x \leftarrow x + \mathrm{MLP}(\mathrm{LN}_2(x)),\qquad
      \mathrm{MLP}(a) = W_2\,\mathrm{GELU}(W_1 a + b_1) + b_2$$

    Attention mixes information *across positions*, the MLP transforms each position on its own. After
    the last block a final LayerNorm and the output layer $W_E^\top$ (the token embedding again:
    **weight tying**) give one logit per vocabulary entry. All heads at once, then the output projection
    `c_proj`:
    '''),
    code('''
def forward_by_hand(model, idx):
    B, T = idx.shape
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))
    x = model.transformer.wte(idx) + model.transformer.wpe(torch.arange(T))  # (B, T, C)
    for block in model.transformer.h:
        q, k, v = block.attn.c_attn(block.ln_1(x)).split(C, dim=-1)
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in (q, k, v))     # (B, H, T, D)
        att = (q @ k.transpose(-2, -1) / D ** 0.5).masked_fill(~mask, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, C)                         # heads side by side again
        x = x + block.attn.c_proj(y)
        x = x + block.mlp.c_proj(F.gelu(block.mlp.c_fc(block.ln_2(x)), approximate="tanh"))
    return model.transformer.ln_f(x) @ model.transformer.wte.weight.T          # (B, T, V), tied output layer

with torch.no_grad():
    logits = model(idx)[0]
    torch.testing.assert_close(forward_by_hand(model, idx), logits)
assert model.lm_head.weight is model.transformer.wte.weight  # weight tying (Press & Wolf 2017)
probs = logits[0, -1].softmax(-1)
top = probs.topk(5)
print(f"after {mtok.decode(idx[0, 1:].tolist())!r} the model expects:")
for p, i in zip(top.values.tolist(), top.indices.tolist()):
    print(f"  {mtok.decode([i])!r:12} {p:.3f}")
'''),
    md(r'''
    ## 1.5 Sampling, and why the KV cache matters

    To generate, take the distribution over the next token, draw one, append it, repeat. The
    **temperature** $\tau$ reshapes the distribution, $p_i \propto \exp(z_i / \tau)$: $\tau < 1$
    sharpens it (towards greedy argmax), $\tau > 1$ flattens it. Top-k and top-p (nucleus) sampling cut
    off the unlikely tail.
    '''),
    code('''
z = logits[0, -1]
order = z.argsort(descending=True)[:8]
fig, ax = plt.subplots(figsize=(8, 3))
for i, t in enumerate([0.5, 1.0, 2.0]):
    ax.bar(np.arange(8) + (i - 1) * 0.27, (z / t).softmax(-1)[order].numpy(), width=0.27, label=f"temperature {t}")
ax.set_xticks(range(8), [repr(mtok.decode([j])) for j in order.tolist()], rotation=30)
ax.set_ylabel("probability")
ax.legend()
plt.show()
'''),
    md(r'''
    Generating $N$ tokens naively runs the whole sequence through the model $N$ times, and attention
    costs grow with the length each time. But the keys and values of past tokens never change (the mask
    again!), so `model.generate` keeps them in a **KV cache**: it runs the prompt once, then feeds only
    the newest token, whose query attends to the cached keys. Same result, much less work. With greedy
    decoding the two must produce *identical* tokens:
    '''),
    code('''
prompt = torch.tensor([[mtok.eot_id] + mtok.encode("question: what is 3 plus 4?\\nanswer:")] * 16)  # (16, P)
n_new = model.config.block_size - prompt.size(1)
outs, timings = {}, {}
for use_cache in (True, False):
    t0 = time.perf_counter()
    outs[use_cache], _ = model.generate(prompt, max_new_tokens=n_new, greedy=True, use_cache=use_cache)
    timings[use_cache] = time.perf_counter() - t0
assert torch.equal(outs[True], outs[False]), "the cache must not change the result"
print(f"{n_new} new tokens x 16 sequences: with cache {timings[True]:.2f}s, without {timings[False]:.2f}s "
      f"({timings[False] / timings[True]:.1f}x slower)")
print("greedy continuation:", repr(mtok.decode(outs[True][0].tolist())[:120]))
'''),
    md(r'''
    ## 1.6 Pretraining

    Pretraining minimises the average **cross entropy** of the next token over a corpus:

    $$\mathcal{L}(\theta) = -\frac{1}{BT}\sum_{b,t} \log p_\theta\!\left(x_{b,t+1} \mid x_{b,\le t}\right)$$

    Two reference points: a model that guesses uniformly scores $\log V$; a model that knows only how
    often each token occurs (no context) scores the corpus's **unigram entropy**. Everything below that
    line is learned from context. Here is a short run of `pretrain.train` (the same function as
    `python pretrain.py`) on a fresh 2-layer model, a few hundred thousand tokens:
    '''),
    code('''
import pretrain
from model import pick_device

cfg = pretrain.Config(corpus=chain.corpus, tokenizer=chain.tokenizer, out_dir=os.path.join(chain.work, "01_pretrain"),
                      n_layer=2, n_head=4, n_embd=64, block_size=96, batch_size=16, max_steps=200, lr=5e-3,
                      min_lr=5e-4, warmup_steps=20, eval_interval=25, eval_batches=4, log_interval=50,
                      device="cpu", threads=1, seed=1337)
t0 = time.time()
with tiny.quiet() as log:  # the script prints its config and samples; keep the loss lines
    small, history = pretrain.train(cfg)
tiny.grep(log, "step", "done")
print(f"({time.time() - t0:.0f}s)")
'''),
    code('''
train_tokens, _ = pretrain.tokenize_corpus(cfg.corpus, mtok, cfg.out_dir, cfg.val_fraction)  # cached by the run
fig, ax = plt.subplots(figsize=(7, 3.5))
ax.plot([h["step"] for h in history], [h["train_loss"] for h in history], label="train loss", alpha=0.7)
val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
ax.plot(*zip(*val), "o-", label="validation loss")
ax.axhline(np.log(mtok.n_vocab), color="gray", ls=":", label="uniform guess: log V")
ax.axhline(pretrain.unigram_entropy(train_tokens), color="k", ls="--", label="unigram entropy")
ax.set_xlabel("step")
ax.set_ylabel("cross entropy (nats)")
ax.legend()
plt.show()
'''),
    md(r'''
    Samples from this short run and from the chain's longer-trained base model. Both have learned the
    *language* of the world, its forum threads with "question:" and "answer:", but neither knows the
    chat markers yet: the corpus never contains them. Teaching the assistant format is the job of SFT
    (notebook 02).
    '''),
    code('''
dev = pick_device("cpu")
for name, m in [("200-step model", small), ("chain's base model", model)]:
    for seed in range(2):
        text = pretrain.sample_text(m, mtok, "question: what is 3 plus 4?\\nanswer:", dev, max_new_tokens=30, seed=seed)
        print(f"{name:20s} | {text!r}")
'''),
    md(r'''
    ## Exercises

    Each exercise has a stub that raises `NotImplementedError` and a check cell. Fill in the stub, run
    both cells; the check compares your function with the one in `model.py`.

    **1. One attention head.** Write `my_attention_weights(x, block, head)` returning the $(B, T, T)$
    attention weights of one head of a block for the residual stream `x` (B, T, C). Remember the
    LayerNorm, the bias, the scaling and the causal mask.
    '''),
    code('''
def my_attention_weights(x, block, head):
    raise NotImplementedError  # your code here
'''),
    code('''
try:
    for h in range(H):
        torch.testing.assert_close(my_attention_weights(x, model.transformer.h[0], h), maps[0][:, h])
    print("exercise 1: correct, for every head of layer 0")
except NotImplementedError:
    print("exercise 1: not implemented yet; fill in my_attention_weights above and re-run this cell")
'''),
    md(r'''
    **2. Log-probabilities of given tokens.** RLHF needs $\log \pi(y_t)$ of tokens that were *already*
    sampled. Write `my_token_logprobs(logits, tokens, temperature)`: logits (B, T, V), tokens (B, T),
    result (B, T), the log-softmax of `logits / temperature` read at each token. (Notebook 04 explains why
    the temperature must be the sampling temperature.)
    '''),
    code('''
def my_token_logprobs(logits, tokens, temperature=1.0):
    raise NotImplementedError  # your code here
'''),
    code('''
from model import token_logprobs

try:
    toks = idx[:, 1:]
    for temp in (1.0, 0.7):
        torch.testing.assert_close(my_token_logprobs(logits[:, :-1], toks, temp), token_logprobs(logits[:, :-1], toks, temp))
    print("exercise 2: correct")
except NotImplementedError:
    print("exercise 2: not implemented yet")
'''),
    md(r'''
    **3. Position ids under left padding.** To generate for several prompts at once, shorter prompts are
    padded *on the left* so all answers start in the same column. Pads must not shift the positions of
    the real tokens. Write `my_position_ids(attention_mask)`: mask (B, T) with 1 for real tokens and 0 for
    pads; real tokens get 0, 1, 2, ... and pads get 0.
    '''),
    code('''
def my_position_ids(attention_mask):
    raise NotImplementedError  # your code here
'''),
    code('''
try:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    torch.testing.assert_close(my_position_ids(mask), position_ids(mask))
    print("exercise 3: correct")
except NotImplementedError:
    print("exercise 3: not implemented yet")
'''),
]

# ============================================================================= 02 SFT

SFT = [
    md(r'''
    # 2. Supervised fine-tuning: teaching the assistant format

    The base model of notebook 01 continues text. Ask it a question and it may continue with another
    question, a forum thread, a story: it has never seen a *conversation with an assistant*. InstructGPT's
    first step is **supervised fine-tuning (SFT)**: collect demonstrations (a prompt and a good answer
    written by a labeler) and keep training the language model on them.

    Our demonstrations come from a simulated, *imperfect* demonstrator (`data/world.py`): most answers are
    fine, but it has habits. It ignores "reply with only the answer" more often than not, refuses harmless
    look-alike requests ("how do i kill a python process?"), breaks word limits, and is sometimes wrong,
    rude or wordy. SFT copies the demonstrator, habits included. That ceiling is what the reward model and
    PPO (notebooks 03 and 04) try to break through.
    '''),
    code(SETUP + '''
from common import load_model, read_jsonl
from data.formats import read_prompts, read_sft, write_jsonl
from data.world import judge
from evaluate import generate_answers, summarize
from tokenizer import get_tokenizer
import sft

chain = tiny.ensure("sft")
base, ckpt = load_model(chain.pretrain)
tok = get_tokenizer(ckpt["tokenizer"])
sft_model, _ = load_model(chain.sft)
for m in (base, sft_model):
    m.eval()
demos = read_sft(chain.sft_train)
eval_rows = read_prompts(chain.prompts_eval)
print(f"{len(demos)} demonstrations, {len(eval_rows)} held-out evaluation prompts")
'''),
    md(r'''
    ## 2.1 The demonstrations and the chat template

    Each demonstration is a prompt and a response; the world also stores a *record* (the structured task
    behind the prompt, which only the gold judge reads) and whether the demonstrator ever stopped.
    '''),
    code('''
for d in demos[:6]:
    print(f"{d['record']['task']:9s} | {d['prompt']}\\n{'':9s} -> {d['response']}")
'''),
    md(r'''
    A conversation becomes one token sequence with the special tokens of notebook 01:

    `<|user|>` *prompt* `<|assistant|>` *response* `<|end|>`

    The model learns to write the response after `<|assistant|>` and to **stop** by emitting `<|end|>`.
    The base model cannot do either yet: it never saw these tokens (their embeddings are untrained), so it
    rambles on until the length limit.
    '''),
    code('''
prompt = eval_rows[0]["prompt"]
for name, m in [("base", base), ("SFT", sft_model)]:
    ans = generate_answers(m, tok, [prompt], greedy=True, max_new_tokens=chain.max_new_tokens)[0][0]
    print(f"{name:4s} ended={ans['ended']!s:5s} | {prompt} -> {ans['text']!r}")
'''),
    md(r'''
    ## 2.2 The loss mask

    SFT uses the same next-token cross entropy as pretraining, with one change: only the **response**
    tokens (and the final `<|end|>`) are targets. The prompt is given, not something the model should learn
    to produce. With the set $R$ of response positions,

    $$\mathcal{L}_{\mathrm{SFT}}(\theta) = -\frac{1}{|R|} \sum_{t \in R} \log \pi_\theta(x_{t+1} \mid x_{\le t})$$

    `sft.build_example` returns the model input and the targets, with `-100` ("ignore") at every masked
    position, the value PyTorch's `cross_entropy` skips. Input and targets are the same sequence shifted by
    one: the target at position $t$ is the token at $t + 1$.
    '''),
    code('''
d = demos[0]
x_ids, y_ids = sft.build_example(tok, d["prompt"], d["response"], d.get("ended", True))
rows = [(t, repr(tok.decode([x])), "-100 (masked)" if y == -100 else repr(tok.decode([y])), "yes" if y != -100 else "")
        for t, (x, y) in enumerate(zip(x_ids, y_ids))]
tiny.print_table(rows, ["t", "input token", "target (next token)", "in the loss"])
'''),
    code('''
from matplotlib.colors import ListedColormap

def draw_mask(ax, x_ids, y_ids, title):
    """One box per input token: green if its next token is a target, grey if masked."""
    counted = np.array([[y != -100 for y in y_ids]], dtype=float)
    ax.imshow(counted, cmap=ListedColormap(["lightgrey", "mediumseagreen"]), vmin=0, vmax=1, aspect="auto")
    for t, x in enumerate(x_ids):
        ax.text(t, 0, tok.decode([x]).replace(" ", "\\u2423"), rotation=90, ha="center", va="center", fontsize=8)
    ax.set_yticks([])
    ax.set_xticks(range(len(x_ids)))
    ax.set_title(title, fontsize=10)

fig, axes = plt.subplots(2, 1, figsize=(11, 4.2))
draw_mask(axes[0], x_ids, y_ids, "demonstration: green positions predict a response token (counted), grey ones a prompt token (masked)")
x2, y2 = sft.build_example(tok, demos[3]["prompt"], demos[3]["response"], demos[3].get("ended", True))
draw_mask(axes[1], x2, y2, "another one")
fig.tight_layout()
plt.show()
'''),
    md(r'''
    Now the loss by hand: take the log-softmax of the logits, read it at each target, keep only the
    unmasked positions, average. It must equal both `sft.masked_nll_sum` (sum and count, which the script
    divides over the whole global batch) and the model's own `lm_loss`. A batch is **right-padded**
    (`sft.collate`): the causal mask means a real token never sees the padding that comes after it.
    '''),
    code('''
batch = [sft.build_example(tok, d["prompt"], d["response"], d.get("ended", True)) for d in demos[:4]]
X, Y = sft.collate(batch, tok.pad_id)  # (B, T), right-padded; Y is -100 on prompt and padding
with torch.no_grad():
    logits, model_loss = sft_model(X, Y)  # (B, T, V)

logp = F.log_softmax(logits, dim=-1)                                   # (B, T, V)
keep = Y != -100                                                       # (B, T)
nll = -logp.gather(-1, Y.clamp(min=0).unsqueeze(-1)).squeeze(-1)       # (B, T); clamp: -100 is no index
by_hand = nll[keep].mean()

total, count = sft.masked_nll_sum(logits, Y)
torch.testing.assert_close(by_hand, total / count)
torch.testing.assert_close(by_hand, model_loss)
print(f"SFT loss on 4 demonstrations: {by_hand:.4f} over {int(count)} target tokens "
      f"(of {Y.numel()} positions; the rest are prompt or padding)")
'''),
    md(r'''
    ## 2.3 A short fine-tune

    `sft.train` is `python sft.py` as a function. We start from the base model and train for one epoch on
    800 demonstrations with a validation loss every few steps. (The chain's own SFT model was trained
    longer on all of them; we compare the two below.)
    '''),
    code('''
subset = os.path.join(chain.work, "02_sft_subset.jsonl")
write_jsonl(subset, demos[:800])
cfg = sft.Config(init_from=chain.pretrain, train_data=subset, val_data=chain.sft_val, prompts="",
                 out_dir=os.path.join(chain.work, "02_sft"), epochs=1, batch_size=16, lr=1e-3, min_lr=1e-4,
                 warmup_steps=5, eval_interval=10, device="cpu", threads=1, seed=1337)
t0 = time.time()
with tiny.quiet() as log:
    short_sft, history = sft.train(cfg)
short_sft.eval()
tiny.grep(log, "step")
print(f"({time.time() - t0:.0f}s)")

fig, ax = plt.subplots(figsize=(7, 3.2))
ax.plot([h["step"] for h in history], [h["train_loss"] for h in history], label="train loss (response tokens)", alpha=0.7)
ax.plot(*zip(*[(h["step"], h["val_loss"]) for h in history if "val_loss" in h]), "o-", label="validation loss")
ax.set_xlabel("step")
ax.set_ylabel("cross entropy (nats)")
ax.legend()
plt.show()
'''),
    md(r'''
    ## 2.4 The gold judge

    In the real world we could only ask people whether an answer is good. The embedded world has a
    **gold judge** (`data.world.judge`): it reads the prompt's hidden record and scores an answer in
    $[0, 1]$,

    $$\text{score} = 0.5\cdot\text{correct} + 0.2\cdot\text{format} + 0.15\cdot\text{tone} + 0.15\cdot\text{concision}
      \quad(\text{halved if the answer never ends})$$

    plus a strict **pass**: correct, format obeyed, polite, no filler, at most one courtesy phrase, within
    the length limit, ended. One courtesy phrase scores a little better than none; two or more are
    penalised. Keep that in mind for notebook 05.
    '''),
    code('''
row = next(r for r in eval_rows if r["record"]["task"] == "add" and r["record"]["format"] is None)
a, b_, op = row["record"]["args"]["a"], row["record"]["args"]["b"], row["record"]["args"]["op"]
right = a + b_ if op == "plus" else a - b_
print("prompt:", row["prompt"])
for answer in [f"{right}", f"{a} {op} {b_} is {right}.", f"sure! {a} {op} {b_} is {right}.",
               f"sure! of course! happy to help! {a} {op} {b_} is {right}.", f"{a} {op} {b_} is {right + 1}.",
               f"ugh, fine. {a} {op} {b_} is {right}."]:
    j = judge(row["record"], answer)
    print(f"  {j['score']:.3f} pass={j['pass']!s:5s} | {answer}")
'''),
    md(r'''
    ## 2.5 Base vs SFT, side by side

    Greedy answers to held-out prompts (argument combinations that never appear in training), with their
    gold scores:
    '''),
    code('''
models = {"base": base, "short SFT": short_sft, "chain SFT": sft_model}
show = eval_rows[:8]
greedy = {name: generate_answers(m, tok, [r["prompt"] for r in show], greedy=True, max_new_tokens=chain.max_new_tokens)
          for name, m in models.items()}
for i, r in enumerate(show):
    print(f"[{r['record']['task']}] {r['prompt']}")
    for name in models:
        ans = greedy[name][i][0]
        print(f"   {name:9s} gold {judge(r['record'], ans['text'], ans['ended'])['score']:.2f} | {ans['text'][:90]!r}")
'''),
    md(r'''
    One answer per prompt is noisy. `evaluate.summarize` scores several sampled answers per prompt (at
    temperature 1, the way the RL stages will sample) on all held-out prompts and breaks the pass rate
    down by task:
    '''),
    code('''
summaries = {}
for name, m in models.items():
    answers = generate_answers(m, tok, [r["prompt"] for r in eval_rows], n=4, max_new_tokens=chain.max_new_tokens, seed=0)
    summaries[name], _ = summarize([r["record"] for r in eval_rows], answers)
keys = ["gold_mean", "pass_rate", "rate_correct", "rate_format", "rate_ended", "rate_refused", "mean_courtesy", "mean_words"]
tiny.print_table([[name] + [s[k] for k in keys] for name, s in summaries.items()], ["model"] + keys,
                 [""] + [".3f"] * len(keys))

tasks = sorted(summaries["chain SFT"]["pass_by_task"])
fig, ax = plt.subplots(figsize=(10, 3.2))
for i, name in enumerate(models):
    ax.bar(np.arange(len(tasks)) + (i - 1) * 0.27, [summaries[name]["pass_by_task"].get(t, 0) for t in tasks],
           width=0.27, label=name)
ax.set_xticks(range(len(tasks)), tasks)
ax.set_ylabel("pass rate (sampled)")
ax.legend()
plt.show()
'''),
    md(r'''
    What to look for: the base model almost never ends its answer (`rate_ended` near 0), which alone halves
    its gold score; SFT learns the format and to stop, and some of the content (how much depends on the
    model: the tiny chain's 2-layer GPT gets little right, the pipeline's models more). More SFT steps
    help. But SFT imitates: whatever the demonstrator does most of the time, the SFT model does too. Here
    is its habit on "reply with only the answer":
    '''),
    code('''
short_rows = [r for r in eval_rows if r["record"]["format"] == "short"]
answers = generate_answers(sft_model, tok, [r["prompt"] for r in short_rows], n=4, max_new_tokens=chain.max_new_tokens, seed=1)
obeyed = [judge(r["record"], a["text"], a["ended"])["facets"]["format"] for r, ans in zip(short_rows, answers) for a in ans]
demo_short = [d for d in demos if d["record"]["format"] == "short"]
demo_obeyed = [judge(d["record"], d["response"], d.get("ended", True))["facets"]["format"] for d in demo_short]
print(f"'only the answer' obeyed: demonstrator {np.mean(demo_obeyed):.2f}, SFT model {np.mean(obeyed):.2f} "
      f"({len(obeyed)} answers to {len(short_rows)} prompts)")
'''),
    md(r'''
    The SFT model cannot beat its teacher's habit by imitation alone. Notebook 03 asks labelers to *rank*
    answers instead (judging is easier than demonstrating) and learns a reward model from their rankings.

    ## Exercises

    **1. Build an example.** Write `my_build_example(tok, prompt, response)` returning `(inputs, targets)`
    like `sft.build_example` for an answer that ended: the chat template, inputs without the last token,
    and targets that are the next tokens with `-100` wherever the next token belongs to the prompt.
    '''),
    code('''
def my_build_example(tok, prompt, response):
    raise NotImplementedError  # your code here
'''),
    code('''
try:
    for d in demos[:20]:
        assert my_build_example(tok, d["prompt"], d["response"]) == sft.build_example(tok, d["prompt"], d["response"])
    print("exercise 1: correct")
except NotImplementedError:
    print("exercise 1: not implemented yet")
'''),
    md(r'''
    **2. The masked loss.** Write `my_sft_loss(logits, targets)`: the mean negative log-likelihood over
    the positions whose target is not -100 (use `F.cross_entropy` with `ignore_index`, or do it by hand).
    What should it return for a batch in which *every* target is masked? (The script's answer: see
    `sft.masked_nll_sum` and `model.lm_loss`; a NaN here would poison every weight.)
    '''),
    code('''
def my_sft_loss(logits, targets):
    raise NotImplementedError  # your code here
'''),
    code('''
try:
    total, count = sft.masked_nll_sum(logits, Y)
    torch.testing.assert_close(my_sft_loss(logits, Y), total / count)
    all_masked = torch.full_like(Y, -100)
    assert torch.isfinite(my_sft_loss(logits, all_masked)), "an all-masked batch must not give NaN"
    print("exercise 2: correct")
except NotImplementedError:
    print("exercise 2: not implemented yet")
'''),
    md(r'''
    **3. Right padding.** Write `my_collate(examples, pad_id)` that turns a list of `(inputs, targets)`
    pairs of different lengths into two (B, T) tensors: inputs padded on the right with `pad_id`, targets
    with `-100`.
    '''),
    code('''
def my_collate(examples, pad_id):
    raise NotImplementedError  # your code here
'''),
    code('''
try:
    mine, theirs = my_collate(batch, tok.pad_id), sft.collate(batch, tok.pad_id)
    for a_, b_ in zip(mine, theirs):
        torch.testing.assert_close(a_, b_)
    print("exercise 3: correct")
except NotImplementedError:
    print("exercise 3: not implemented yet")
'''),
]

# ============================================================================= 03 the reward model

REWARD_MODEL = [
    md(r'''
    # 3. The reward model: learning what labelers prefer

    Writing a perfect answer is hard; saying which of two answers is better is much easier ("I can't build
    a fridge, but I can judge one"). InstructGPT's second step exploits this: sample several answers from
    the SFT model, have a labeler **rank** them, and train a **reward model** (RM) $r_\phi(x, y)$, a network
    that reads a prompt $x$ and an answer $y$ and outputs one number, to agree with the rankings. The RM
    then stands in for the labelers, millions of times, during RL (notebook 04).

    Our labelers are simulated (`data/world.py`): each ranks the answers by the gold score plus noise,
    with the noise calibrated so that two labelers agree on about 73% of answer pairs, as InstructGPT's
    did (72.6%). The RM never sees the gold judge, only the rankings.
    '''),
    code(SETUP + '''
import itertools
import math
import random

from common import load_model, read_jsonl
from data import world as W
from data.formats import read_prompts
from evaluate import generate_answers
from tokenizer import get_tokenizer
import reward

chain = tiny.ensure("reward")
policy, ckpt = load_model(chain.sft)  # the SFT model: it writes the answers to be ranked
policy.eval()
tok = get_tokenizer(ckpt["tokenizer"])
rm, rm_ckpt = reward.load_reward_model(chain.reward)
rm.eval()
pool = W.load_labelers(chain.world)  # {"tau": ..., "bias": ..., "labelers": [{"id", "tau"}, ...]}
label_rows, eval_rows = read_prompts(chain.prompts_label), read_prompts(chain.prompts_eval)
print(f"{len(pool['labelers'])} labelers, base noise tau = {pool['tau']:.3f}; the RM learned from "
      f"{len(read_jsonl(chain.comparisons))} ranked prompts (a few of them held out for validation)")
'''),
    md(r'''
    ## 3.1 K answers and a labeler's ranking

    One labelling prompt, $K = 6$ answers sampled at temperature 1 from the SFT model, and one labeler from
    the pool ranks them. Identical answers (and exact ties in the labeler's utility) are dropped first:
    a labeler cannot say which of two identical answers is better.
    '''),
    code('''
K = 6
labeler = pool["labelers"][0]
for row in label_rows[3:]:  # the first prompt whose answers leave at least 4 distinct ones to rank
    answers = generate_answers(policy, tok, [row["prompt"]], n=K, max_new_tokens=chain.max_new_tokens, seed=3)[0]
    texts, endeds = [a["text"] for a in answers], [a["ended"] for a in answers]
    kept, ranking = W.label(row["record"], texts, endeds, labeler, random.Random(0), pool["bias"])
    if len(kept) >= 4:
        break
texts, endeds = [texts[i] for i in kept], [endeds[i] for i in kept]  # ranking indexes these kept answers
gold = [W.judge(row["record"], t, e)["score"] for t, e in zip(texts, endeds)]
print("prompt:", row["prompt"])
for place, i in enumerate(ranking):
    print(f"  rank {place + 1}: answer {i}  (gold {gold[i]:.2f}) {texts[i]!r}")
'''),
    md(r'''
    A ranking of $K$ answers contains $\binom{K}{2}$ **pairwise comparisons**: every answer ranked above
    another "wins" that pair. InstructGPT collected $K = 4$ to $9$ answers per prompt because ranking $K$
    answers costs a labeler little more than comparing two, yet yields up to 36 pairs.
    '''),
    code('''
pairs = list(itertools.combinations(ranking, 2))  # (winner, loser): the earlier one in the ranking wins
print(f"K = {len(ranking)} answers -> C(K, 2) = {math.comb(len(ranking), 2)} pairs:")
print("  " + ", ".join(f"{w}>{l}" for w, l in pairs))
assert len(pairs) == math.comb(len(ranking), 2)
'''),
    md(r'''
    ## 3.2 The Bradley-Terry loss

    The **Bradley-Terry** model says that the probability a labeler prefers answer $y_w$ to $y_l$ is a
    sigmoid of the difference of their scores:

    $$P(y_w \succ y_l \mid x) = \sigma\big(r_\phi(x, y_w) - r_\phi(x, y_l)\big), \qquad \sigma(z) = \frac{1}{1 + e^{-z}}$$

    Only differences matter, so the RM's scale is arbitrary up to a constant. Maximum likelihood over a
    prompt's pairs gives InstructGPT's loss (eq. 1):

    $$\mathcal{L}(\phi) = -\frac{1}{\binom{K}{2}} \sum_{(y_w, y_l)} \log \sigma\big(r_\phi(x, y_w) - r_\phi(x, y_l)\big)$$

    All $\binom{K}{2}$ pairs of one prompt form **one** batch element: each answer goes through the network
    once, and the prompt counts once however many pairs it has. (Treating the pairs as independent examples
    made InstructGPT's RM overfit: each answer would be seen $K - 1$ times per epoch.)

    The RM itself is the SFT Transformer with a scalar **head** on the final hidden state of the last real
    token (`<|end|>`), where the model has read the whole answer. Our simulated labelers follow exactly
    this model: for two answers with gold scores $G_w, G_l$, $P(w \succ l) = \sigma((G_w - G_l)/\tau)$.
    '''),
    code('''
scores = torch.tensor(reward.score_texts(rm, tok, [row["prompt"]] * len(texts), texts, endeds, "cpu"))  # (K,)
by_hand = -torch.stack([F.logsigmoid(scores[w] - scores[l]) for w, l in pairs]).mean()
loss, accuracy, margin = reward.bradley_terry_loss(scores, ranking)
torch.testing.assert_close(by_hand, loss)
for i in ranking:
    print(f"  answer {i}: RM score {scores[i]:+.2f}  gold {gold[i]:.2f}")
print(f"loss {loss:.4f}: the RM orders {accuracy:.0%} of the {len(pairs)} pairs like the labeler (mean margin {margin:+.2f})")
'''),
    code('''
z = np.linspace(-5, 5, 200)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.3))
axes[0].plot(z, -np.log(1 / (1 + np.exp(-z))))
axes[0].set_xlabel("margin r(x, y_w) - r(x, y_l)")
axes[0].set_ylabel("-log sigmoid(margin)")
axes[0].set_title("the loss of one pair: wrong order costs a lot, right order a little")
g = np.linspace(-0.5, 0.5, 200)
for lab in pool["labelers"][:3]:
    axes[1].plot(g, 1 / (1 + np.exp(-g / lab["tau"])), label=f"labeler {lab['id']}, tau {lab['tau']:.3f}")
axes[1].set_xlabel("gold difference G_w - G_l")
axes[1].set_ylabel("P(labeler prefers w)")
axes[1].set_title("simulated labelers: Bradley-Terry in the gold score")
axes[1].legend(fontsize=8)
fig.tight_layout()
plt.show()
'''),
    md(r'''
    ## 3.3 Accuracy and calibration on held-out prompts

    To test the RM honestly we collect fresh comparisons on the **held-out** evaluation prompts with the
    script's own `reward.collect_comparisons` (sample $K$ answers, one labeler ranks, a second labeler ranks
    a copy so we can measure how often two labelers agree). Three accuracies to compare:

    * labeler vs labeler: the ceiling, because labels are noisy;
    * labels vs gold: how often a label matches the truth;
    * RM vs labels and RM vs gold: how well the RM learned.
    '''),
    code('''
cfg = reward.Config(k=4, max_new_tokens=chain.max_new_tokens, double_label=len(eval_rows), seed=7)
comps, stats = reward.collect_comparisons(policy, tok, eval_rows, cfg, "cpu", pool["labelers"], pool["bias"])
ev = reward.evaluate_rm(rm, tok, comps, "cpu")
print(f"{len(comps)} held-out ranked prompts, {stats['n_pairs']} pairs")
print(f"  labeler vs labeler agreement   {stats['labeler_agreement']:.3f}")
print(f"  labels vs gold                 {stats['label_vs_gold_accuracy']:.3f}")
print(f"  RM vs labels                   {ev['acc_vs_labels']:.3f}")
print(f"  RM vs gold                     {ev['acc_vs_gold']:.3f}")
print(f"  correlation of reward with answer length {ev['length_corr']:+.2f}")
'''),
    md(r'''
    **Calibration.** The RM does not just order answers, it claims a probability:
    $\sigma(r_A - r_B)$ is its belief that the labeler prefers $A$. A calibrated RM is right 70% of the
    time when it says 70%. We bin the held-out pairs by predicted probability and compare with how often
    the labeler actually preferred $A$ (points on the diagonal = calibrated). Right: accuracy by the size
    of the RM's margin; a useful RM is more often right when it is more confident.
    '''),
    code('''
calib = np.array(ev["_calibration"])  # (pairs, 2): predicted P(A preferred), 1 if the labeler preferred A
pred, won = np.clip(calib[:, 0], 1e-6, 1 - 1e-6), calib[:, 1]
bins = np.linspace(0, 1, 6)
which = np.clip(np.digitize(pred, bins) - 1, 0, len(bins) - 2)
xs = [pred[which == b].mean() for b in range(len(bins) - 1) if (which == b).any()]
ys = [won[which == b].mean() for b in range(len(bins) - 1) if (which == b).any()]
ns = [int((which == b).sum()) for b in range(len(bins) - 1) if (which == b).any()]

margin_abs = np.abs(np.log(pred / (1 - pred)))  # |r_A - r_B|
correct = (pred > 0.5) == (won == 1)
edges = np.quantile(margin_abs, [0, 0.25, 0.5, 0.75, 1.0])
mb = np.clip(np.digitize(margin_abs, edges[1:-1]), 0, 3)

fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
axes[0].plot([0, 1], [0, 1], "k--", lw=1, label="perfectly calibrated")
axes[0].plot(xs, ys, "o-", label="reward model")
for x_, y_, n_ in zip(xs, ys, ns):
    axes[0].annotate(f"{n_}", (x_, y_), fontsize=7, xytext=(3, -10), textcoords="offset points")
axes[0].set_xlabel("predicted P(labeler prefers A) = sigmoid(r_A - r_B)")
axes[0].set_ylabel("fraction the labeler preferred A")
axes[0].legend(fontsize=8)
axes[1].bar(range(4), [correct[mb == b].mean() for b in range(4)])
axes[1].set_xticks(range(4), [f"{edges[b]:.1f}-{edges[b + 1]:.1f}" for b in range(4)])
axes[1].axhline(stats["labeler_agreement"], color="k", ls=":", label="labeler vs labeler")
axes[1].set_xlabel("|r_A - r_B| (quartiles)")
axes[1].set_ylabel("RM accuracy vs labels")
axes[1].set_ylim(0, 1)
axes[1].legend(fontsize=8)
fig.tight_layout()
plt.show()
'''),
    md(r'''
    **Reward against gold.** Every held-out answer as a point. The RM was trained on noisy pairwise labels
    only, yet it should order answers roughly by gold. The scatter also shows where it is wrong: answers
    it likes that the judge does not. (The head was shifted and scaled after training so that the
    demonstrations score 0 on average and SFT samples have standard deviation 1; InstructGPT does the
    same before RL, so only the *relative* scores mean anything.)
    '''),
    code('''
flat = [(c["prompt"], r, e, c["record"]) for c in comps for r, e in zip(c["responses"], c["ended"])]
rm_scores = np.array(reward.score_texts(rm, tok, [f[0] for f in flat], [f[1] for f in flat], [f[2] for f in flat], "cpu"))
gold_scores = np.array([W.judge(f[3], f[1], f[2])["score"] for f in flat])
r = np.corrcoef(rm_scores, gold_scores)[0, 1]
fig, ax = plt.subplots(figsize=(5.5, 4))
ax.scatter(gold_scores + np.random.default_rng(0).normal(0, 0.005, len(flat)), rm_scores, s=10, alpha=0.5)
ax.set_xlabel("gold score (jittered)")
ax.set_ylabel("RM score")
ax.set_title(f"{len(flat)} held-out answers, correlation {r:.2f}")
plt.show()
norm = rm_ckpt.get("normalization", {})
print(f"normalisation in the checkpoint: raw scores of demonstrations averaged {norm.get('demo_mean_before', float('nan')):+.3f}, "
      f"raw SFT samples had std {norm.get('sample_std_before', float('nan')):.3f}; the head now maps them to 0 and 1")
'''),
    md(r'''
    ## 3.4 Best-of-n: the simplest use of a reward model

    Before any RL: sample $n$ answers, keep the one the RM likes best. This already improves the policy
    without touching its weights, at the price of $n$ samples per prompt. It moves the answer distribution
    away from the SFT policy by a known amount (Stiennon et al. 2020, appendix):

    $$\mathrm{KL}(\pi_{\mathrm{BoN}} \,\|\, \pi_{\mathrm{SFT}}) = \log n - \frac{n - 1}{n}$$

    `reward.best_of_n` splits each prompt's samples into groups of $n$ and scores the RM's pick with the
    gold judge; it also reports the pick of an *oracle* that chooses by gold, the ceiling for a perfect RM.
    '''),
    code('''
rows = eval_rows[:40]
n_max = 16
samples = generate_answers(policy, tok, [r["prompt"] for r in rows], n=n_max, max_new_tokens=chain.max_new_tokens, seed=11)
flat_rewards = reward.score_texts(rm, tok, [r["prompt"] for r, s in zip(rows, samples) for _ in s],
                                  [a["text"] for s in samples for a in s], [a["ended"] for s in samples for a in s], "cpu")
rewards = [flat_rewards[i * n_max:(i + 1) * n_max] for i in range(len(rows))]
bon = reward.best_of_n([r["record"] for r in rows], samples, rewards, [1, 2, 4, 8, 16])
tiny.print_table([[b["n"], b["kl"], b["proxy_reward"], b["gold_mean"], b["pass_rate"], b["oracle_gold_mean"]] for b in bon],
                 ["n", "KL", "RM score", "gold", "pass", "oracle gold"], ["d", ".2f", "+.3f", ".3f", ".3f", ".3f"])

fig, ax = plt.subplots(figsize=(6, 3.5))
ns = [b["n"] for b in bon]
ax.plot(ns, [b["gold_mean"] for b in bon], "o-", label="best-of-n by the RM")
ax.plot(ns, [b["oracle_gold_mean"] for b in bon], "s--", label="best-of-n by gold (ceiling)")
ax.set_xscale("log", base=2)
ax.set_xlabel("n")
ax.set_ylabel("gold score of the chosen answer")
ax.legend()
plt.show()
'''),
    md(r'''
    The gap between the two curves is what the RM gets wrong. Notebook 05 pushes $n$ much higher and asks
    whether the RM's pick keeps getting better. First, notebook 04 trains a policy against the RM with PPO.

    ## Exercises

    **1. The ranking loss.** Write `my_bradley_terry_loss(scores, ranking)`: scores (K,) of one prompt's
    answers, ranking = answer indices best first; return the mean over all $\binom{K}{2}$ pairs of
    $-\log\sigma(r_w - r_l)$. Try to do it without a Python loop over pairs (hint: `torch.triu_indices`).
    '''),
    code('''
def my_bradley_terry_loss(scores, ranking):
    raise NotImplementedError  # your code here
'''),
    code('''
try:
    g = torch.Generator().manual_seed(0)
    for K_ in (2, 4, 7):
        s = torch.randn(K_, generator=g)
        rk = torch.randperm(K_, generator=g).tolist()
        torch.testing.assert_close(my_bradley_terry_loss(s, rk), reward.bradley_terry_loss(s, rk)[0])
    print("exercise 1: correct")
except NotImplementedError:
    print("exercise 1: not implemented yet")
'''),
    md(r'''
    **2. Where to read the score.** The head must read the hidden state of the *last real token* of each
    sequence, whatever the padding. Write `my_last_token_index(attention_mask)` for a (B, T) mask (1 =
    real) that works for left padding *and* right padding.
    '''),
    code('''
def my_last_token_index(attention_mask):
    raise NotImplementedError  # your code here
'''),
    code('''
try:
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 1]])
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    for m_ in (left, right):
        torch.testing.assert_close(my_last_token_index(m_), reward.last_token_index(m_))
    print("exercise 2: correct")
except NotImplementedError:
    print("exercise 2: not implemented yet")
'''),
    md(r'''
    **3. The KL of best-of-n.** Derive and implement `my_best_of_n_kl(n)`. Hint: if answers are ranked by
    reward, the quantile $u \in [0, 1]$ of the best of $n$ has density $n u^{n-1}$ while the quantile of one
    SFT sample is uniform; the KL is $\int_0^1 n u^{n-1} \log(n u^{n-1})\,du$.
    '''),
    code('''
def my_best_of_n_kl(n):
    raise NotImplementedError  # your code here
'''),
    code('''
try:
    for b in bon:
        assert abs(my_best_of_n_kl(b["n"]) - b["kl"]) < 1e-9, (b["n"], my_best_of_n_kl(b["n"]), b["kl"])
    print("exercise 3: correct")
except NotImplementedError:
    print("exercise 3: not implemented yet")
'''),
]

# ============================================================================= 04 PPO

PPO = [
    md(r'''
    # 4. PPO: reinforcement learning against the reward model

    InstructGPT's third step treats answering as a game: the **policy** (initialised from SFT) writes an
    answer token by token, the reward model scores the finished answer, and **PPO** (Schulman et al. 2017)
    nudges the policy towards answers that score higher. Four models take part:

    | model | initialised from | trained? | role |
    |---|---|---|---|
    | policy $\pi_\theta$ | SFT | yes | writes the answers |
    | reference $\pi_{\mathrm{ref}}$ | SFT | frozen | the leash: a KL penalty keeps the policy near it |
    | reward model $r_\phi$ | notebook 03 | frozen | scores finished answers |
    | value model $V_\psi$ | the reward model | yes | predicts the final reward from a partial answer |

    One PPO iteration: **rollout** (sample answers, score them) -> **per-token rewards** -> **advantages**
    (GAE) -> a few epochs of **clipped** policy-gradient steps. This notebook takes one rollout apart token
    by token with the functions of `ppo.py`, then runs the real loop (`ppo.train`) for a few iterations.
    '''),
    code(SETUP + '''
import copy

from common import load_checkpoint, load_model, read_jsonl
from data.formats import read_prompts
from data.world import judge
from evaluate import generate_answers, summarize
from model import token_logprobs
from tokenizer import get_tokenizer
import ppo
import reward

chain = tiny.ensure("reward")
policy, ckpt = load_model(chain.sft)
tok = get_tokenizer(ckpt["tokenizer"])
ref = copy.deepcopy(policy).eval().requires_grad_(False)       # frozen copy of SFT
rm, _ = reward.load_reward_model(chain.reward)
rm.eval().requires_grad_(False)
critic = copy.deepcopy(rm)                                     # value model starts as the RM (N details #8)
for m in (policy, ref, rm, critic):
    ppo.disable_dropout(m)                                     # N details #1: dropout would make log-probs noisy

cfg = ppo.Config(sft=chain.sft, reward_model=chain.reward, prompts=chain.prompts_ppo, eval_prompts="",
                 pretrain_tokens=chain.pretrain_tokens, out_dir=os.path.join(chain.work, "04_ppo"),
                 max_new_tokens=chain.max_new_tokens, iterations=25, rollout_batch=48, minibatch=12,
                 # the tiny chain's 2-layer GPT needs bigger steps to move in 25 iterations; the pipeline's
                 # models use the script's default learning rates
                 lr=1e-4 if chain.kind == "tiny" else ppo.Config.lr,
                 value_lr=3e-4 if chain.kind == "tiny" else ppo.Config.value_lr, device="cpu", threads=1, seed=1337)
print(f"beta (KL coefficient) {cfg.beta}, clip range {cfg.clip_range}, gamma {cfg.gamma}, lambda {cfg.lam}, "
      f"temperature {cfg.temperature}")
'''),
    md(r'''
    ## 4.1 A rollout

    `ppo.rollout` left-pads the prompts (so every answer starts in the same column), samples answers with
    the KV cache at temperature $T$, scores each finished sequence with the reward model, and computes the
    reference model's log-probabilities of the sampled tokens. Answers stop at `<|end|>`; what follows is
    padding with mask 0. An answer that never ends gets the fixed score `no_eos_score` instead of the RM's
    (the "EOS trick", N implementation details #5): otherwise the policy could learn to ramble.
    '''),
    code('''
rows = read_prompts(chain.prompts_ppo)[:8]
ro = ppo.rollout(policy, ref, rm, tok, rows, cfg, "cpu", torch.Generator().manual_seed(0))
scores = torch.where(ro["ended"], ro["raw_scores"], torch.full_like(ro["raw_scores"], cfg.no_eos_score))
seq, mask, P, resp, rmask = ro["seq"], ro["mask"], ro["P"], ro["resp"], ro["resp_mask"].float()
print(f"seq {tuple(seq.shape)} = prompts padded to P={P} + answers padded to N={resp.size(1)}")
for i, r in enumerate(rows):
    print(f"{i} RM {scores[i]:+.2f} gold {ro['judged'][i]['score']:.2f} ended={bool(ro['ended'][i])!s:5s} | "
          f"{r['prompt'][:45]!r} -> {ro['texts'][i][:60]!r}")
'''),
    md(r'''
    ## 4.2 Log-probabilities and the KL to the reference

    PPO needs $\log \pi_\theta(y_t \mid x, y_{<t})$ for every answer token. One forward pass over
    prompt + answer gives them all: the logits at position $t$ predict token $t+1$, so the logits that
    predict the answer are those from the last prompt position to the second-to-last position
    (`ActorCritic.forward` slices `[P-1:-1]`). The same forward gives the value $V(s_t)$ of each state.

    Every log-prob is computed from `logits / T`, with the temperature $T$ used for sampling (N details #2):
    the tokens were drawn from that distribution. The per-token KL estimate is

    $$\mathrm{kl}_t = \log \pi_\theta(y_t \mid \cdot) - \log \pi_{\mathrm{ref}}(y_t \mid \cdot), \qquad
      \mathbb{E}_{y \sim \pi_\theta}\Big[\sum_t \mathrm{kl}_t\Big] = \mathrm{KL}(\pi_\theta \,\|\, \pi_{\mathrm{ref}})$$

    Before any update the policy *is* the reference, so every $\mathrm{kl}_t$ is exactly zero: a good test.
    '''),
    code('''
ac = ppo.ActorCritic(policy, critic, shared=False)
with torch.no_grad():
    logits, values = ac(seq, mask, P)                            # (B, N, V), (B, N)
logprobs = token_logprobs(logits, resp, cfg.temperature)        # (B, N)
by_hand = F.log_softmax(logits / cfg.temperature, dim=-1).gather(-1, resp.unsqueeze(-1)).squeeze(-1)
torch.testing.assert_close(by_hand, logprobs)
ref_logprobs = ro["ref_logprobs"]
kl = (logprobs - ref_logprobs) * rmask
torch.testing.assert_close(kl, torch.zeros_like(kl))
print("log-probs by hand == model.token_logprobs; KL to the reference before any update:", kl.abs().max().item())
'''),
    md(r'''
    ## 4.3 Where the reward lands

    The RM scores a *finished* answer, so the task reward arrives once, at the last real token (the
    `<|end|>` token, never a padding slot). Every token also pays a KL penalty (Ziegler et al. 2019;
    InstructGPT eq. 2), so a token the reference finds unlikely costs reward:

    $$r_t = -\beta\,\big(\log \pi_\theta(y_t) - \log \pi_{\mathrm{ref}}(y_t)\big) + \mathbb{1}[t = \text{last}]\; r_\phi(x, y)$$
    '''),
    code('''
beta = cfg.beta
rewards = ppo.per_token_rewards(scores, logprobs, ref_logprobs, rmask, beta)  # (B, N)

by_hand = -beta * (logprobs - ref_logprobs) * rmask
for i in range(len(rows)):
    last = int(rmask[i].nonzero().max())  # the last real answer token of row i
    by_hand[i, last] += scores[i]
torch.testing.assert_close(by_hand, rewards)
print("row 0: reward", rewards[0, :int(rmask[0].sum()) + 2].numpy().round(3), " (the last two are padding)")
'''),
    md(r'''
    ## 4.4 Advantages: GAE

    The **advantage** $A_t$ says how much better the token $y_t$ turned out than the value model expected.
    The one-step surprise is the TD error, and **generalised advantage estimation** (Schulman et al. 2016)
    sums the surprises ahead, discounted by $\gamma\lambda$:

    $$\delta_t = r_t + \gamma V(s_{t+1}) - V(s_t), \qquad A_t = \sum_{l \ge 0} (\gamma\lambda)^l\, \delta_{t+l}
      \qquad (\text{with } V = 0 \text{ after the last token})$$

    $\lambda = 1$ would be the plain Monte-Carlo return minus $V$ (unbiased, noisy); $\lambda = 0$ trusts the
    value model completely (low variance, biased). RLHF uses $\gamma = 1$, $\lambda = 0.95$ (N details #6).
    The value model learns to predict the **returns** $A_t + V(s_t)$. `ppo.compute_gae` runs the sum as a
    backward recursion $A_t = \delta_t + \gamma\lambda A_{t+1}$; here is the sum written out, token by token:
    '''),
    code('''
def gae_brute_force(rewards, values, mask, gamma, lam):
    A = torch.zeros_like(rewards)
    for i in range(rewards.size(0)):
        n = int(mask[i].sum())                               # real tokens form a prefix of the answer
        V = torch.cat([values[i, :n], torch.zeros(1)])       # the episode ends after token n-1: V = 0
        delta = [rewards[i, t] + gamma * V[t + 1] - V[t] for t in range(n)]
        for t in range(n):
            A[i, t] = sum((gamma * lam) ** l * delta[t + l] for l in range(n - t))
    return A, (A + values) * mask

advantages, returns = ppo.compute_gae(rewards, values, rmask, cfg.gamma, cfg.lam)
A_bf, R_bf = gae_brute_force(rewards, values, rmask, cfg.gamma, cfg.lam)
torch.testing.assert_close(advantages, A_bf)
torch.testing.assert_close(returns, R_bf)

# whitening (masked): mean 0, std 1 over the REAL tokens only, padding stays 0
real = advantages[rmask.bool()]
whitened_by_hand = (advantages - real.mean()) / torch.sqrt(real.var(unbiased=False) + 1e-8) * rmask
whitened = ppo.masked_whiten(advantages, rmask)
torch.testing.assert_close(whitened, whitened_by_hand)
print("GAE == brute-force sum; masked whitening matches; whitened mean/std over real tokens:",
      f"{whitened[rmask.bool()].mean():.2e} / {whitened[rmask.bool()].std(unbiased=False):.3f}")
'''),
    md(r'''
    All of it for one answer, token by token. Read down the columns: the KL and its penalty are zero
    before training; the reward sits on the last token; the value model's guesses move as the answer
    unfolds; the advantage is what the policy gradient will push on.
    '''),
    code('''
def take_apart(policy, critic, ro, beta):
    """Everything PPO computes from one rollout, as in one iteration of ppo.train."""
    scores = torch.where(ro["ended"], ro["raw_scores"], torch.full_like(ro["raw_scores"], cfg.no_eos_score))
    rmask = ro["resp_mask"].float()
    with torch.no_grad():
        logits, values = ppo.ActorCritic(policy, critic, shared=False)(ro["seq"], ro["mask"], ro["P"])
    logprobs = token_logprobs(logits, ro["resp"], cfg.temperature)
    rewards = ppo.per_token_rewards(scores, logprobs, ro["ref_logprobs"], rmask, beta)
    advantages, returns = ppo.compute_gae(rewards, values, rmask, cfg.gamma, cfg.lam)
    return dict(logprobs=logprobs, ref_logprobs=ro["ref_logprobs"], kl=(logprobs - ro["ref_logprobs"]) * rmask,
                rewards=rewards, values=values * rmask, returns=returns,
                advantages=ppo.masked_whiten(advantages, rmask), rmask=rmask)

def token_table(parts, ro, i):
    n = int(parts["rmask"][i].sum())
    cols = ["logprobs", "ref_logprobs", "kl", "rewards", "values", "returns", "advantages"]
    table = [[t, repr(tok.decode([ro["resp"][i, t].item()]))] + [parts[c][i, t].item() for c in cols] for t in range(n)]
    tiny.print_table(table, ["t", "token", "log pi", "log pi_ref", "kl", "reward", "value", "return", "advantage"],
                     ["d", ""] + ["+.3f"] * len(cols))

parts0 = take_apart(policy, critic, ro, beta)
print("prompt:", rows[0]["prompt"], "| RM score", f"{scores[0]:+.3f}")
token_table(parts0, ro, 0)
'''),
    md(r'''
    ## 4.5 The clipped objective

    The policy gradient raises the log-prob of tokens with positive advantage and lowers it for negative
    ones. PPO reuses each rollout for several epochs of minibatch steps, so the policy drifts away from
    the one that sampled the data. The probability **ratio** $\rho_t = \pi_\theta(y_t) / \pi_{\mathrm{old}}(y_t)$
    measures the drift, and PPO **clips** the objective so that moving the ratio beyond
    $[1 - \epsilon, 1 + \epsilon]$ earns nothing more:

    $$L^{\mathrm{CLIP}}(\theta) = \mathbb{E}_t\Big[\min\big(\rho_t A_t,\ \mathrm{clip}(\rho_t, 1 - \epsilon, 1 + \epsilon)\, A_t\big)\Big]$$

    With $A > 0$ the objective stops growing at $\rho = 1 + \epsilon$ (no reason to push further); with
    $A < 0$ it stops at $\rho = 1 - \epsilon$. The $\min$ keeps the *pessimistic* side: a step that made things
    worse is never clipped away. `ppo.ppo_losses` returns the loss $-L^{\mathrm{CLIP}}$ (and a value loss
    clipped the same way); here it is evaluated token by token on a grid of ratios and checked against the
    formula:
    '''),
    code('''
eps = cfg.clip_range
ratios = torch.linspace(0.2, 2.0, 91)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5), sharey=True)
for ax, A in zip(axes, (1.0, -1.0)):
    objective = []
    for r in ratios:
        lp, zero = torch.log(r).view(1, 1), torch.zeros(1, 1)
        pg_loss, _, _ = ppo.ppo_losses(lp, zero, torch.full((1, 1), A), zero, zero, zero, torch.ones(1, 1), eps, cfg.vf_clip)
        objective.append(-pg_loss)
    objective = torch.stack(objective)
    torch.testing.assert_close(objective, torch.minimum(ratios * A, ratios.clamp(1 - eps, 1 + eps) * A))
    ax.plot(ratios, ratios * A, "k:", label="unclipped  rho * A")
    ax.plot(ratios, objective, lw=2.5, label="PPO: min(rho A, clip(rho) A)")
    ax.axvspan(1 - eps, 1 + eps, color="C2", alpha=0.15, label="trust region [1-eps, 1+eps]")
    ax.set_xlabel("ratio rho = pi_theta / pi_old")
    ax.set_title(f"A = {A:+.0f}")
    ax.legend(fontsize=8)
axes[0].set_ylabel("objective (to maximise)")
plt.show()
'''),
    md(r'''
    Flat pieces have zero gradient: those tokens no longer move the policy. The **clip fraction** (the
    share of tokens outside the region) and **approx_kl** (an estimate of $\mathrm{KL}(\pi_{\mathrm{old}}\|\pi_\theta)$,
    the $k_3$ estimator $(\rho - 1) - \log \rho$) tell whether the steps are the right size. Note the two
    different KLs: approx_kl measures one update's step; the KL *penalty* measures the distance to the
    frozen reference, which accumulates over the whole run.

    ## 4.6 A short run

    `ppo.train` is `python ppo.py` as a function; a short run with the settings of the `cfg` above. It logs
    one line per iteration to `metrics.jsonl`. In the embedded world we also know the gold score of every
    rollout answer, which the policy never sees.
    '''),
    code('''
print(f"{cfg.iterations} iterations x {cfg.rollout_batch} prompts; {cfg.ppo_epochs} epochs of minibatches of "
      f"{cfg.minibatch}; lr {cfg.lr}")
t0 = time.time()
with tiny.quiet() as log:
    trained, summary = ppo.train(cfg)
trained.eval()
lines = [l for l in log.getvalue().splitlines() if l.startswith("iter")]
print("\\n".join(lines[:3] + ["..."] + lines[-3:]))
print(f"({time.time() - t0:.0f}s)")
metrics = read_jsonl(os.path.join(cfg.out_dir, "metrics.jsonl"))
# N details #9: the first minibatch of every iteration sees the very policy that sampled the rollout
assert all(abs(m["first_ratio"] - 1) < 1e-5 and abs(m["first_approx_kl"]) < 1e-5 for m in metrics)
'''),
    code('''
it = [m["iteration"] for m in metrics]
panels = [("reward", "RM score (proxy)"), ("gold", "gold score (never seen)"), ("kl_to_ref", "KL to the reference (nats)"),
          ("approx_kl", "approx_kl per update"), ("clipfrac", "clip fraction"), ("entropy", "entropy per token")]
fig, axes = plt.subplots(2, 3, figsize=(12, 5.5))
for ax, (key, title) in zip(axes.flat, panels):
    ys = [m.get(key, np.nan) for m in metrics]
    ax.plot(it, ys, ".", alpha=0.4)
    ax.plot(it, [np.mean(ys[max(0, i - 4):i + 1]) for i in range(len(ys))], "-", color="C0")  # mean of the last 5
    ax.set_title(title)
    ax.set_xlabel("iteration")
fig.tight_layout()
plt.show()
'''),
    md(r'''
    ## 4.7 The same rollout after training

    The same eight prompts, sampled from the trained policy and taken apart with the trained value model.
    Now the policy differs from the reference: the per-token KL is no longer zero, and the heat-maps show
    *where* in the answers it moved (red = more likely than under SFT) and where the advantages push.
    '''),
    code('''
trained_critic = copy.deepcopy(rm)
trained_critic.load_state_dict(load_checkpoint(os.path.join(cfg.out_dir, "ckpt.pt"))["critic"])
ro1 = ppo.rollout(trained, ref, rm, tok, rows, cfg, "cpu", torch.Generator().manual_seed(0))
parts1 = take_apart(trained, trained_critic, ro1, beta)
print("prompt:", rows[0]["prompt"], "| RM score", f"{ro1['raw_scores'][0]:+.3f}")
token_table(parts1, ro1, 0)
'''),
    code('''
def heatmap(ax, values, ro, rmask, title, cmap="RdBu_r"):
    """Answers as rows, tokens as columns, each cell showing its token; padding left blank."""
    v = values.masked_fill(rmask == 0, float("nan")).numpy()
    lim = np.nanpercentile(np.abs(v), 95) or 1.0  # a robust colour scale: one outlier must not wash out the rest
    ax.imshow(v, cmap=cmap, vmin=-lim, vmax=lim, aspect="auto")
    for i in range(v.shape[0]):
        for t in range(int(rmask[i].sum())):
            ax.text(t, i, tok.decode([ro["resp"][i, t].item()]).strip()[:6], ha="center", va="center", fontsize=6)
    ax.set_yticks(range(v.shape[0]), [f"{s:+.1f}" for s in ro["raw_scores"].tolist()], fontsize=7)
    ax.set_ylabel("answer (RM score)")
    ax.set_xlabel("answer token t")
    ax.set_title(title, fontsize=10)

N = int(parts1["rmask"].sum(1).max())
fig, axes = plt.subplots(2, 1, figsize=(14, 7))
heatmap(axes[0], parts1["kl"][:, :N], ro1, parts1["rmask"][:, :N], "per-token KL: log pi_theta - log pi_ref")
heatmap(axes[1], parts1["advantages"][:, :N], ro1, parts1["rmask"][:, :N], "whitened advantages")
fig.tight_layout()
plt.show()
'''),
    md(r'''
    ## 4.8 SFT vs PPO

    Several sampled answers per held-out prompt from the reference (SFT) and from the trained policy,
    scored by the reward model and by the gold judge. With a KL penalty and a short run the policy stays
    close to SFT; what changes is printed below. (`ppo.train` with `eval_prompts` set does this evaluation
    itself, with win rates and confidence intervals.)
    '''),
    code('''
eval_rows = read_prompts(chain.prompts_eval)
results = {}
for name, m in [("SFT", ref), ("PPO", trained)]:
    answers = generate_answers(m, tok, [r["prompt"] for r in eval_rows], n=4, max_new_tokens=chain.max_new_tokens, seed=5)
    proxy = reward.score_texts(rm, tok, [r["prompt"] for r, a in zip(eval_rows, answers) for _ in a],
                               [x["text"] for a in answers for x in a], [x["ended"] for a in answers for x in a], "cpu")
    s, _ = summarize([r["record"] for r in eval_rows], answers)
    results[name] = dict(answers=answers, rm=float(np.mean(proxy)), **s)
keys = ["rm", "gold_mean", "pass_rate", "rate_correct", "rate_format", "rate_ended", "mean_courtesy", "mean_words"]
tiny.print_table([[n] + [r[k] for k in keys] for n, r in results.items()], ["policy"] + keys, [""] + [".3f"] * len(keys))
print()
for i, r in enumerate(eval_rows[:8]):
    print(f"[{r['record']['task']}] {r['prompt']}")
    for name in results:
        a = results[name]["answers"][i][0]
        print(f"   {name} gold {judge(r['record'], a['text'], a['ended'])['score']:.2f} | {a['text'][:90]!r}")
'''),
    md(r'''
    ## Exercises

    **1. GAE.** Implement `my_gae(rewards, values, mask, gamma, lam)` returning `(advantages, returns)` with
    the backward recursion $A_t = \delta_t + \gamma\lambda A_{t+1}$ (one loop over $t$, vectorised over
    the batch). Padding after an answer must contribute nothing.
    '''),
    code('''
def my_gae(rewards, values, mask, gamma=1.0, lam=0.95):
    raise NotImplementedError  # your code here
'''),
    code('''
try:
    for g_, l_ in [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0)]:
        mine = my_gae(parts1["rewards"], parts1["values"], parts1["rmask"], g_, l_)
        theirs = ppo.compute_gae(parts1["rewards"], parts1["values"], parts1["rmask"], g_, l_)
        for a_, b_ in zip(mine, theirs):
            torch.testing.assert_close(a_, b_)
    print("exercise 1: correct")
except NotImplementedError:
    print("exercise 1: not implemented yet")
'''),
    md(r'''
    **2. The clipped policy loss.** Implement `my_pg_loss(logprobs, old_logprobs, advantages, mask, clip_range)`:
    the masked mean over real tokens of $-\min(\rho A, \mathrm{clip}(\rho, 1-\epsilon, 1+\epsilon) A)$.
    '''),
    code('''
def my_pg_loss(logprobs, old_logprobs, advantages, mask, clip_range):
    raise NotImplementedError  # your code here
'''),
    code('''
try:
    g = torch.Generator().manual_seed(0)
    lp_old = parts1["logprobs"]
    lp_new = lp_old + 0.3 * torch.randn(lp_old.shape, generator=g)  # a policy that drifted
    adv, m_ = parts1["advantages"], parts1["rmask"]
    theirs = ppo.ppo_losses(lp_new, lp_old, adv, parts1["values"], parts1["values"], parts1["returns"], m_, 0.2, 0.2)[0]
    torch.testing.assert_close(my_pg_loss(lp_new, lp_old, adv, m_, 0.2), theirs)
    print("exercise 2: correct")
except NotImplementedError:
    print("exercise 2: not implemented yet")
'''),
    md(r'''
    **3. Per-token rewards.** Implement `my_per_token_rewards(scores, logprobs, ref_logprobs, mask, beta)`
    without a Python loop over the batch. Then answer: why must the score go to the last *real* token and
    not simply to the last column?
    '''),
    code('''
def my_per_token_rewards(scores, logprobs, ref_logprobs, mask, beta):
    raise NotImplementedError  # your code here
'''),
    code('''
try:
    s_ = ro1["raw_scores"]
    args = (s_, parts1["logprobs"], parts1["ref_logprobs"], parts1["rmask"], 0.05)
    torch.testing.assert_close(my_per_token_rewards(*args), ppo.per_token_rewards(*args))
    print("exercise 3: correct")
except NotImplementedError:
    print("exercise 3: not implemented yet")
'''),
]

# ============================================================================= 05 over-optimisation

OVEROPTIMIZATION = [
    md(r'''
    # 5. Over-optimisation: when the proxy keeps rising and the truth falls

    *"When a measure becomes a target, it ceases to be a good measure"* (Goodhart's law). The reward model
    is a **proxy** for what labelers want, learned from a few thousand noisy comparisons of SFT answers. As
    the policy optimises it harder, it drifts to answers unlike anything the RM was trained on, where the
    RM's errors are large and *systematically exploitable*.

    Gao et al. 2022 ("Scaling Laws for Reward Model Overoptimization") measured this with a big "gold" RM
    standing in for humans and a smaller proxy RM trained on the gold RM's labels. Plotting the gold score
    against the distance from the initial policy, $d = \sqrt{\mathrm{KL}(\pi \,\|\, \pi_{\mathrm{init}})}$,
    they found that the gold score first rises, then falls, following

    $$R_{\mathrm{BoN}}(d) = d\,(\alpha_{\mathrm{bon}} - \beta_{\mathrm{bon}}\, d), \qquad
      R_{\mathrm{RL}}(d) = d\,(\alpha_{\mathrm{RL}} - \beta_{\mathrm{RL}} \log d)$$

    for best-of-n and for RL ($R$ measured relative to the initial policy, so $R(0) = 0$). The embedded
    world has a true gold judge, so we can draw the same curves: gold and proxy against $d$, for best-of-n
    and for PPO *without* its KL leash ($\beta = 0$). `overopt.py` runs the larger version of this study.
    '''),
    code(SETUP + '''
import math

from common import load_model, read_jsonl
from data import world as W
from data.formats import read_prompts
from evaluate import generate_answers
from tokenizer import get_tokenizer
import overopt
import ppo
import reward

chain = tiny.ensure("reward")
policy, ckpt = load_model(chain.sft)
policy.eval()
tok = get_tokenizer(ckpt["tokenizer"])
rm, _ = reward.load_reward_model(chain.reward)
rm.eval()
eval_rows = read_prompts(chain.prompts_eval)

def rm_scores(rows, answers):
    """The proxy: RM score of every answer, in the nested [prompt][sample] layout of `answers`."""
    flat = reward.score_texts(rm, tok, [r["prompt"] for r, a in zip(rows, answers) for _ in a],
                              [x["text"] for a in answers for x in a], [x["ended"] for a in answers for x in a], "cpu")
    out, k = [], 0
    for a in answers:
        out.append(flat[k:k + len(a)])
        k += len(a)
    return out
'''),
    md(r'''
    ## 5.1 Best-of-n, up to n = 64

    Sample 64 answers per prompt from the SFT policy, score them with the RM, and for each $n$ keep the
    RM's favourite of every group of $n$. The KL of best-of-n to the sampling policy is
    $\log n - (n-1)/n$ (notebook 03), so $n = 64$ is $d \approx 1.8$.
    '''),
    code('''
rows = eval_rows[:32]
n_max = 64
samples = generate_answers(policy, tok, [r["prompt"] for r in rows], n=n_max, max_new_tokens=chain.max_new_tokens, seed=2)
proxy = rm_scores(rows, samples)
ns = [1, 2, 4, 8, 16, 32, 64]
bon = reward.best_of_n([r["record"] for r in rows], samples, proxy, ns)
tiny.print_table([[b["n"], b["kl"], math.sqrt(b["kl"]), b["proxy_reward"], b["gold_mean"], b["pass_rate"]] for b in bon],
                 ["n", "KL", "d", "proxy (RM)", "gold", "pass"], ["d", ".2f", ".2f", "+.3f", ".3f", ".3f"])
'''),
    md(r'''
    **Fitting the curve.** $R(d) = \alpha d - \beta d^2$ is *linear* in the unknowns $(\alpha, \beta)$, so
    least squares solves it: stack the columns $[d, -d^2]$ into a matrix $X$ and solve
    $\min \|X w - R\|^2$, whose solution satisfies the normal equations $X^\top X w = X^\top R$.
    `overopt.fit_bon` calls `np.linalg.lstsq`; we check it against the normal equations.
    '''),
    code('''
d_bon = np.array([math.sqrt(b["kl"]) for b in bon])
gain_bon = np.array([b["gold_mean"] - bon[0]["gold_mean"] for b in bon])  # R(0) = 0: gold relative to SFT
a_bon, b_bon = overopt.fit_bon(d_bon, gain_bon)
X = np.stack([d_bon, -d_bon ** 2], axis=1)
np.testing.assert_allclose(np.linalg.solve(X.T @ X, X.T @ gain_bon), [a_bon, b_bon], rtol=1e-6, atol=1e-9)

def bon_curve(d):  # the fitted gold gain over SFT
    return d * (a_bon - b_bon * d)

def describe_peak(curve, d_max):
    """Where a fitted gold curve is highest, found on a grid (exercise 3 derives it in closed form)."""
    dd = np.linspace(1e-3, d_max, 4001)
    g = curve(dd)
    i = int(np.argmax(g))
    if g[i] <= 0:
        return "below SFT at every distance"
    where = f"beyond d = {d_max:.1f}" if i == len(dd) - 1 else f"d = {dd[i]:.2f} (KL {dd[i] ** 2:.2f})"
    return f"highest at {where}, {g[i]:+.3f} above SFT"

print(f"best-of-n: gold - gold(0) = d ({a_bon:.3f} - {b_bon:.3f} d); {describe_peak(bon_curve, 3 * d_bon.max())}")
'''),
    md(r'''
    ## 5.2 PPO without the KL penalty

    Notebook 04 kept a leash on the policy, $-\beta \log(\pi/\pi_{\mathrm{ref}})$ per token. Here we drop
    it ($\beta = 0$) and let PPO chase the proxy for longer. Every iteration logs the proxy reward, the
    gold score of the rollout answers and the sampled KL to the reference (still measured, no longer
    penalised).
    '''),
    code('''
cfg = ppo.Config(sft=chain.sft, reward_model=chain.reward, prompts=chain.prompts_ppo, eval_prompts="",
                 pretrain_tokens=chain.pretrain_tokens, out_dir=os.path.join(chain.work, "05_ppo_beta0"),
                 max_new_tokens=chain.max_new_tokens, beta=0.0, iterations=36, rollout_batch=64, minibatch=16,
                 lr=1e-4 if chain.kind == "tiny" else overopt.Config.ppo_lr,  # as in notebook 04: tiny needs bigger steps
                 value_lr=3e-4 if chain.kind == "tiny" else ppo.Config.value_lr, device="cpu", threads=1, seed=1337)
t0 = time.time()
with tiny.quiet() as log:
    hacked, _ = ppo.train(cfg)
hacked.eval()
print(f"{cfg.iterations} iterations x {cfg.rollout_batch} prompts, lr {cfg.lr}, beta {cfg.beta}: {time.time() - t0:.0f}s")
rl = read_jsonl(os.path.join(cfg.out_dir, "metrics.jsonl"))
tiny.print_table([[m["iteration"], m["kl_to_ref"], m["reward"], m["gold"]] for m in [rl[i] for i in sorted(set(range(0, len(rl), 5)) | {len(rl) - 1})]],
                 ["iteration", "KL to ref", "proxy", "gold"], ["d", ".2f", "+.3f", ".3f"])
'''),
    md(r'''
    The RL form $R = \alpha d - \beta\, d \log d$ is linear in $(\alpha, \beta)$ too. Each iteration's gold is
    a mean over only 64 answers, so the points are noisy; like `overopt.py` we fit on the iterations with
    $d \ge 0.3$ (at $d \to 0$ every curve is 0 anyway, and $\log d$ blows up).
    '''),
    code('''
d_rl = np.sqrt(np.maximum([m["kl_to_ref"] for m in rl], 0))
gold_rl = np.array([m["gold"] for m in rl])
proxy_rl = np.array([m["reward"] for m in rl])
keep = d_rl >= 0.3
a_rl, b_rl = overopt.fit_rl(d_rl[keep], gold_rl[keep] - gold_rl[0])
X = np.stack([d_rl[keep], -d_rl[keep] * np.log(d_rl[keep])], axis=1)
np.testing.assert_allclose(np.linalg.solve(X.T @ X, X.T @ (gold_rl[keep] - gold_rl[0])), [a_rl, b_rl], rtol=1e-6, atol=1e-9)

def rl_curve(d):
    return d * (a_rl - b_rl * np.log(np.maximum(d, 1e-9)))

print(f"RL (beta = 0): gold - gold(0) = d ({a_rl:.3f} - {b_rl:.3f} log d); {describe_peak(rl_curve, 3 * d_rl.max())}")
'''),
    code('''
fig, axes = plt.subplots(1, 2, figsize=(12, 4))
panels = [(axes[0], "best-of-n (n = 1 .. 64)", d_bon, np.array([b["gold_mean"] for b in bon]),
           np.array([b["proxy_reward"] for b in bon]), bon_curve),
          (axes[1], "PPO with beta = 0", d_rl, gold_rl, proxy_rl, rl_curve)]
for ax, title, d, gold, prox, fit in panels:
    dd = np.linspace(0, d.max() * 1.05, 200)
    ax.plot(d, gold, "o", color="C0", alpha=0.7, label="gold (judge)")
    ax.plot(dd, gold[0] + fit(dd), "-", color="C0", label="Gao et al. functional form, fitted")
    ax.set_xlabel("d = sqrt(KL to SFT)")
    ax.set_ylabel("gold score", color="C0")
    ax.set_title(title)
    ax2 = ax.twinx()
    ax2.plot(d, prox, "s", color="C3", alpha=0.5, ms=4, label="proxy (RM)")
    ax2.set_ylabel("proxy reward (RM)", color="C3")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="lower right")
fig.tight_layout()
plt.show()
'''),
    md(r'''
    How to read it: the proxy (red) keeps climbing with $d$, because it is what is optimised. The gold
    score (blue) is what we actually wanted. Where the blue fit bends down, further optimisation makes the
    policy *worse* while the RM says it is getting better. RL travels much further in KL than best-of-n
    can with 64 samples: best-of-n's KL grows only like $\log n$. (With the tiny chain the curves are
    noisy, and whether the bend falls inside the plotted range depends on the run; the fitted peak is
    printed above. The KL penalty of notebook 04 exists to stop the policy before the bend.)

    ## 5.3 What the over-optimised policy says

    The answers with the highest proxy scores, and what the gold judge thinks of them. Look for the tricks
    a proxy rewards but the judge does not: stacked courtesy phrases, formulaic replies that fit any
    prompt, answers that drop the actual content.
    '''),
    code('''
answers = {"SFT": generate_answers(policy, tok, [r["prompt"] for r in eval_rows], n=4, max_new_tokens=chain.max_new_tokens, seed=4),
           "PPO beta=0": generate_answers(hacked, tok, [r["prompt"] for r in eval_rows], n=4, max_new_tokens=chain.max_new_tokens, seed=4)}
stats, judged = {}, {}
for name, ans in answers.items():
    prox = rm_scores(eval_rows, ans)
    judged[name] = [(p, W.judge(r["record"], a["text"], a["ended"]), r, a)
                    for r, a_list, p_list in zip(eval_rows, ans, prox) for a, p in zip(a_list, p_list)]
    j = judged[name]
    stats[name] = [np.mean([x[0] for x in j]), np.mean([x[1]["score"] for x in j]), np.mean([x[1]["pass"] for x in j]),
                   np.mean([x[1]["facets"]["correct"] for x in j]), np.mean([x[1]["facets"]["courtesy"] for x in j]),
                   np.mean([x[1]["facets"]["courtesy"] >= 2 for x in j]), np.mean([x[1]["facets"]["words"] for x in j])]
tiny.print_table([[n] + s for n, s in stats.items()],
                 ["policy", "proxy", "gold", "pass", "correct", "courtesy/answer", ">=2 courtesy", "words"],
                 [""] + [".3f"] * 7)
ranked, seen = [], set()
for x in sorted(judged["PPO beta=0"], key=lambda x: -x[0]):  # highest proxy first, each (prompt, answer) once
    if (x[2]["prompt"], x[3]["text"]) not in seen:
        seen.add((x[2]["prompt"], x[3]["text"]))
        ranked.append(x)
for title, chosen in [("highest-proxy answers of the beta = 0 policy", ranked[:5]),
                      ("highest-proxy answers that the judge scores below 0.5", [x for x in ranked if x[1]["score"] < 0.5][:8])]:
    print(f"\\n{title}:")
    for p, j, r, a in chosen:
        print(f"  proxy {p:+.2f} gold {j['score']:.2f} courtesy {j['facets']['courtesy']} correct {j['facets']['correct']!s:5s} | "
              f"{r['prompt'][:38]!r} -> {a['text'][:64]!r}")
'''),
    md(r'''
    **A controlled probe.** Take *correct* full-sentence answers to held-out questions and stack
    $k = 0, 1, 2, 3, 4$ courtesy phrases in front. The judge rewards one courtesy phrase a little and
    penalises two or more; the labelers ranked by the judge, so a perfect RM would follow the gold curve.
    Our RM saw few answers with several courtesy phrases (the demonstrator stacks two only 5% of the time),
    so whatever it does out there is extrapolation, and that is exactly where an optimiser goes looking.
    '''),
    code('''
qa = [r for r in eval_rows if r["record"]["task"] in W.QA and r["record"]["format"] != "short"][:20]
curves = {"proxy (RM)": [], "gold": []}
for k in range(5):
    texts = [" ".join(W.COURTESY[:k] + [W.content_sentences(r["record"], W.answer(r["record"]))[0]]) for r in qa]
    curves["proxy (RM)"].append(np.mean(reward.score_texts(rm, tok, [r["prompt"] for r in qa], texts, [True] * len(qa), "cpu")))
    curves["gold"].append(np.mean([W.judge(r["record"], t)["score"] for r, t in zip(qa, texts)]))
print("example with k = 4:", repr(texts[0]))
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(range(5), curves["gold"], "o-", color="C0", label="gold")
ax.set_xticks(range(5))
ax.set_xlabel("courtesy phrases stacked in front of a correct answer")
ax.set_ylabel("gold score", color="C0")
ax2 = ax.twinx()
ax2.plot(range(5), curves["proxy (RM)"], "s--", color="C3", label="proxy (RM)")
ax2.set_ylabel("RM score", color="C3")
ax.set_title(f"{len(qa)} held-out questions, correct answers")
plt.show()
tiny.print_table([[k, curves["gold"][k], curves["proxy (RM)"][k]] for k in range(5)], ["k", "gold", "RM"], ["d", ".3f", "+.3f"])
'''),
    md(r'''
    Remedies: the KL penalty (`ppo.py --beta`, or Ziegler's adaptive controller `--adaptive_kl`), early
    stopping on a held-out gold or human evaluation, more and more diverse comparison data (labelling the
    *policy's* new answers, as InstructGPT did over several rounds), and larger reward models, which
    Gao et al. found over-optimise more slowly.

    ## Exercises

    **1. Best-of-n KL on a discrete distribution.** The formula $\log n - (n-1)/n$ assumes that no two
    answers tie. For a distribution $p$ over $m$ distinct outcomes sorted by reward (all rewards
    different), best-of-n picks outcome $j$ with probability $q_j = F_j^n - F_{j-1}^n$ where $F$ is the
    CDF. Write `my_exact_bon_kl(p, n)` returning $\mathrm{KL}(q\|p)$. The check verifies that it approaches
    the formula for many equally likely outcomes and stays below it for few.
    '''),
    code('''
def my_exact_bon_kl(p, n):
    raise NotImplementedError  # your code here: p is a 1-D numpy array of probabilities, sorted by reward
'''),
    code('''
try:
    for n in (2, 8, 64):
        formula = math.log(n) - (n - 1) / n
        fine = my_exact_bon_kl(np.full(20000, 1 / 20000), n)
        coarse = my_exact_bon_kl(np.array([0.5, 0.3, 0.2]), n)
        assert abs(fine - formula) < 0.01, (n, fine, formula)
        assert coarse < formula, (n, coarse, formula)
    print("exercise 1: correct")
except NotImplementedError:
    print("exercise 1: not implemented yet")
'''),
    md(r'''
    **2. The RL fit.** Write `my_fit_rl(d, gain)` returning $(\alpha, \beta)$ of $\mathrm{gain} = d(\alpha - \beta \log d)$
    by least squares, without calling `overopt`. The check feeds it noiseless synthetic data.
    '''),
    code('''
def my_fit_rl(d, gain):
    raise NotImplementedError  # your code here
'''),
    code('''
try:
    d_ = np.linspace(0.3, 6, 40)
    np.testing.assert_allclose(my_fit_rl(d_, d_ * (0.12 - 0.05 * np.log(d_))), [0.12, 0.05], rtol=1e-6)
    np.testing.assert_allclose(my_fit_rl(d_rl[keep], gold_rl[keep] - gold_rl[0]), [a_rl, b_rl], rtol=1e-6, atol=1e-9)
    print("exercise 2: correct")
except NotImplementedError:
    print("exercise 2: not implemented yet")
'''),
    md(r'''
    **3. Where is the peak?** For both functional forms, derive the $d$ at which the gold score peaks
    (set $dR/dd = 0$) and the KL there. Write `my_peak_kl_bon(a, b)` and `my_peak_kl_rl(a, b)` returning
    the KL (not $d$) at the peak.
    '''),
    code('''
def my_peak_kl_bon(a, b):
    raise NotImplementedError  # your code here

def my_peak_kl_rl(a, b):
    raise NotImplementedError  # your code here
'''),
    code('''
try:
    dd = np.linspace(1e-4, 20, 400001)
    for a_, b_ in [(0.1, 0.04), (0.3, 0.2)]:
        assert abs(my_peak_kl_bon(a_, b_) - dd[np.argmax(dd * (a_ - b_ * dd))] ** 2) < 1e-3
        assert abs(my_peak_kl_rl(a_, b_) - dd[np.argmax(dd * (a_ - b_ * np.log(dd)))] ** 2) < 1e-3
    print("exercise 3: correct")
except NotImplementedError:
    print("exercise 3: not implemented yet")
'''),
]


NOTEBOOKS = {"01_gpt.ipynb": GPT, "02_sft.ipynb": SFT, "03_reward_model.ipynb": REWARD_MODEL,
             "04_ppo.ipynb": PPO, "05_overoptimization.ipynb": OVEROPTIMIZATION}


def build(cells):
    """[(kind, source)] -> a notebook object; kind is "md" or "code"."""
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for kind, src in cells:
        src = dedent(src).strip("\n")
        nb.cells.append(nbformat.v4.new_markdown_cell(src) if kind == "md" else nbformat.v4.new_code_cell(src))
    return nb


def kernel_dir(root):
    """Write into `root` a kernelspec folder whose 'python3' runs THIS interpreter (the venv's, with torch
    and ipykernel). Put first on JUPYTER_PATH, it wins over any other 'python3' kernel (a user-level one
    could point to an interpreter without torch), and nothing needs `ipykernel install`."""
    import json
    spec = os.path.join(root, "kernels", "python3")
    os.makedirs(spec, exist_ok=True)
    with open(os.path.join(spec, "kernel.json"), "w") as f:
        json.dump({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                   "display_name": "Python 3 (rlhf)", "language": "python"}, f)
    return root


def execute(nb, cwd=HERE, timeout=600):
    """Run every cell of `nb` (in place, in memory) in a fresh kernel; raises on the first cell error."""
    import nbclient
    old = os.environ.get("JUPYTER_PATH")
    with tempfile.TemporaryDirectory(prefix="rlhf-kernel-") as root:
        os.environ["JUPYTER_PATH"] = kernel_dir(root) + (os.pathsep + old if old else "")
        try:
            nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                    resources={"metadata": {"path": cwd}}).execute()
        finally:
            if old is None:
                os.environ.pop("JUPYTER_PATH", None)
            else:
                os.environ["JUPYTER_PATH"] = old
    return nb


def main():
    run = "--execute" in sys.argv[1:]
    for name, cells in NOTEBOOKS.items():
        if len(sys.argv) > 1 and any(a.endswith(".ipynb") for a in sys.argv[1:]) and name not in sys.argv[1:]:
            continue  # only the notebooks named on the command line
        nb = build(cells)
        if run:
            t0 = time.time()
            execute(nb)
            print(f"executed {name} in {time.time() - t0:.0f}s")
        nbformat.write(nb, os.path.join(HERE, name))
        print(f"wrote notebooks/{name}")


if __name__ == "__main__":
    main()
