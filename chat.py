"""Talk to a checkpoint of any stage (pretrain, SFT, PPO) in the terminal, through the chat template.

    python chat.py                                          # the PPO policy, runs/ppo/ckpt.pt
    python chat.py --checkpoint=runs/sft/ckpt.pt --greedy   # the SFT model, argmax decoding
    python chat.py --reward_model=runs/reward/ckpt.pt       # also print the reward of each answer
    python chat.py --prompt="What is 2 plus 3?"             # one-shot: print the answer and exit
    python chat.py --checkpoint=gpt2                        # GPT-2 weights (a name or a HF folder)

Type a prompt and press Enter; an empty line, /quit or Ctrl-D exits.

1. Single-turn: every prompt is answered on its own, rendered as <|user|> prompt <|assistant|>
   (tokenizer.render_chat). Earlier turns are not in the context: all our stages train on single
   turns, so a multi-turn context would be out of distribution.
2. The answer is streamed: `stream_tokens` prefills the prompt once and then feeds one token at a time
   through the KV cache (the same `_run` / `sample_next_token` path as GPT.generate, so greedy
   streaming equals generate token for token; a test checks it). It stops at <|end|> or max_new_tokens;
   chat also stops at any other special token (e.g. <|endoftext|> from a pretrained-only model), since
   decode_response shows nothing after it.
3. Incremental decoding: after each token the whole answer so far is decoded and only the new suffix is
   printed; a trailing U+FFFD (a UTF-8 character split across tokens) is held back until it completes.
   The final text is tok.decode_response of the generated ids, exactly what the reward model scores.
4. With --reward_model, each answer gets `[reward +0.42]`: reward.score_texts on (prompt, answer,
   ended), where ended = whether <|end|> was produced (an unfinished answer is scored without it).
5. A prompt longer than block_size - max_new_tokens is cropped from the left, with a note.
Simplifications: no multi-turn history, no system prompt, batch size 1.
"""
import os
import sys
from contextlib import redirect_stdout
from dataclasses import dataclass

import torch

from common import parse_config, pick_device, print_config
from engine import load_policy, load_reward_model, score_texts
from model import KVCache, sample_next_token
from tokenizer import get_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Config:
    checkpoint: str = os.path.join(HERE, "runs", "ppo", "ckpt.pt")  # policy ckpt, GPT-2 name or HF folder
    temperature: float = 0.7  # sampling temperature (ignored with --greedy)
    top_k: int = 0  # keep only the k most likely tokens (0 = off)
    top_p: float = 1.0  # nucleus sampling, Holtzman et al. 2019 (1.0 = off)
    greedy: bool = False  # argmax decoding: the same answer every time
    max_new_tokens: int = 64  # longest answer, in tokens
    reward_model: str = ""  # reward.py checkpoint to score each answer ("" = none)
    prompt: str = ""  # one-shot mode: answer this prompt, print only the answer, exit
    seed: int = 0  # seed of the sampling generator
    device: str = "auto"  # auto | cpu | cuda | mps


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
    """Crop the prompt from the left so prompt + answer fit in the context; None if nothing fits."""
    room = block_size - max_new_tokens
    if room < 1:
        return None
    return prompt_ids[-room:]


def load_chat_model(path, device):
    """(model, tokenizer) from a pretrain/sft/ppo checkpoint, a GPT-2 name or a Hugging Face folder."""
    model, tok_name = load_policy(path, device)
    tok = get_tokenizer(tok_name)
    if model.config.vocab_size < tok.n_vocab:  # raw GPT-2 lacks our chat tokens (never trained on them)
        model.resize_vocab(tok.n_vocab)
    return model.to(device).eval(), tok


def load_scorer(path, tok, device):
    rm, ckpt = load_reward_model(path, device)
    if ckpt.get("tokenizer", "embedded") != tok.name:
        raise SystemExit(f"error: reward model {path!r} uses tokenizer {ckpt.get('tokenizer')!r}, "
                         f"the policy uses {tok.name!r}")
    return rm


def answer(model, tok, prompt, cfg, dev, generator, stream=None):
    """Generate one answer; stream(text) receives each new piece of text. Returns (text, ended, ids)."""
    block_size = model.config.block_size
    full = tok.render_chat(prompt)[0]
    prompt_ids = fit_prompt(full, block_size, cfg.max_new_tokens)
    if prompt_ids is None:
        raise SystemExit(f"error: --max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in "
                         f"the model's context of {block_size} tokens")
    if len(prompt_ids) < len(full):
        print(f"(note: prompt of {len(full)} tokens cropped to its last {len(prompt_ids)}: the context holds "
              f"{block_size} tokens and {cfg.max_new_tokens} are kept for the answer)", file=sys.stderr)
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
    return text, bool(ids) and ids[-1] == tok.end_id, ids


def reward_line(rm, tok, prompt, text, ended, device):
    r = score_texts(rm, tok, [prompt], [text], [ended], device)[0]
    return f"[reward {r:+.2f}{'' if ended else ', no <|end|>'}]"


def main():
    cfg = parse_config(Config)
    one_shot = bool(cfg.prompt)
    with redirect_stdout(sys.stderr if one_shot else sys.stdout):  # one-shot stdout = the answer only
        if not one_shot:
            print_config(cfg)
        dev = pick_device(cfg.device)
        model, tok = load_chat_model(cfg.checkpoint, dev.device)
        rm = load_scorer(cfg.reward_model, tok, dev.device) if cfg.reward_model else None
    generator = torch.Generator(device=dev.device).manual_seed(cfg.seed)
    if one_shot:
        text, ended, _ = answer(model, tok, cfg.prompt, cfg, dev, generator)
        print(text)
        if rm is not None:
            print(reward_line(rm, tok, cfg.prompt, text, ended, dev.device))
        return
    print(f"chatting with {cfg.checkpoint} ({model.num_params() / 1e6:.1f}M parameters, context "
          f"{model.config.block_size}); each prompt is answered on its own. Empty line, /quit or Ctrl-D exits.")
    while True:
        try:
            prompt = input("\nyou> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if prompt.strip() in ("", "/quit"):
            return
        print("bot> ", end="", flush=True)
        try:
            text, ended, ids = answer(model, tok, prompt, cfg, dev, generator,
                                      stream=lambda s: print(s, end="", flush=True))
        except KeyboardInterrupt:  # stop this answer, keep chatting
            print(" [interrupted]")
            continue
        if ended:
            print()
        elif ids and ids[-1] in tok.special_ids:
            print(f" [stopped at {tok.decode(ids[-1:])}, not <|end|>]")
        else:
            print(f" [no <|end|> within {cfg.max_new_tokens} tokens]")
        if rm is not None:
            print(reward_line(rm, tok, prompt, text, ended, dev.device))


if __name__ == "__main__":
    main()
