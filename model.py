"""GPT-2 in one file: the Transformer, its KV-cache generation and its weight import.

One model serves every stage: pretraining, SFT, the reward model (a scalar head on `hidden_states`,
engine.RewardModel), the PPO policy / reference / value model and chat; engine.py runs it on chats.
The structure is nanoGPT's; what RLHF adds is left-padded batches, log-probs of given tokens, fast
batched sampling and loading OpenAI's GPT-2 weights.

    python bench.py        # training and generation throughput (with and without the KV cache)

Shapes: B batch, T time, C channels (n_embd), V vocab, H heads, D head size (C // H).

Implementation details (GPT-2 = Radford et al. 2019; code follows nanoGPT):
1. Pre-LayerNorm blocks x + attn(ln_1(x)), x + mlp(ln_2(x)), a final ln_f (GPT-2 sec. 2.3); GELU with
   the tanh approximation (as in OpenAI's GPT-2 code); learned absolute position embeddings.
2. Weight tying: lm_head.weight IS transformer.wte.weight (Press & Wolf 2017). Parameter names follow
   Hugging Face GPT-2 so its weights map 1:1 (its Conv1D stores W as (in, out): transposed on load).
3. Init: N(0, 0.02) for Linear and Embedding, zero biases, c_proj weights scaled by 1/sqrt(2*n_layer)
   (GPT-2 sec. 2.3: the residual stream accumulates one attention and one MLP output per layer).
4. Two attention paths side by side, chosen by `model.attn_impl`: "sdpa" calls
   F.scaled_dot_product_attention (FlashAttention / memory-efficient kernels on CUDA); "explicit"
   writes softmax(QK^T/sqrt(D) + mask)V out and can return the weights (`attention_maps`).
   The tests check that they agree to 1e-5 in fp32, with and without padding.
5. Left padding (N implementation details #3): attention_mask (B, T) is 1 for real tokens and 0 for
   pads; position ids are cumsum(mask)-1 (pads get 0); a query attends to earlier real keys AND always
   to itself (a pad query with no key to attend to would softmax over nothing: NaN). So every real
   token gets the logits its sequence gets when run alone.
6. Loss: mean cross entropy over targets != -100; a batch without any target gives 0.0 with a grad_fn
   (never NaN), so a step on it is a harmless no-op.
7. Generation prefills the prompt once, then feeds one token at a time through a KVCache: per-layer
   buffers of prompt + max_new_tokens positions written in place (no torch.cat per token), attention
   reading only the filled part; the position ids and the boolean mask of the whole sequence are built
   once and sliced per step. The query is then shorter than the keys, so an explicit mask is always
   passed: SDPA's is_causal=True aligns its mask top-left and a single query would see only the first key.
8. Sampling: temperature, top-k, top-p (nucleus, Holtzman et al. 2019), greedy; by inverse CDF (one
   uniform number per row: the first token whose cumulative probability exceeds it); a sequence stops
   at the first of its stop ids (kept and marked real; later slots are pad_id and masked), the batch
   when all have stopped. An optional torch.Generator makes it reproducible.
9. resize_vocab appends rows for our chat special tokens, initialised to the mean embedding (Hewitt 2021).
10. flops_per_token = 6N + 12*L*H*D*T (PaLM appendix B, nanoGPT); N excludes position embeddings only.

Deviations from GPT-2: dropout defaults to 0 (also for loaded GPT-2 weights, whose config says 0.1;
RLHF wants it off, N implementation details #1); generation errors out instead of cropping past block_size.
"""
import dataclasses
import json
import math
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 128   # longest sequence the model can read (number of position embeddings)
    vocab_size: int = 1024  # callers set this to the tokenizer's n_vocab
    n_layer: int = 4        # Transformer blocks
    n_head: int = 4         # attention heads per block
    n_embd: int = 128       # channels C of the residual stream
    dropout: float = 0.0    # 0 for RLHF: dropout makes policy and reference log-probs disagree
    bias: bool = True       # biases in Linear and LayerNorm layers, as in GPT-2


PRESETS = {  # dataclasses.replace(PRESETS[name], vocab_size=tok.n_vocab) rather than editing these in place
    "embedded": GPTConfig(block_size=128, vocab_size=2016, n_layer=4, n_head=4, n_embd=128),  # ~1M, CPU
    "gpt2": GPTConfig(block_size=1024, vocab_size=50257, n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": GPTConfig(block_size=1024, vocab_size=50257, n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": GPTConfig(block_size=1024, vocab_size=50257, n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": GPTConfig(block_size=1024, vocab_size=50257, n_layer=48, n_head=25, n_embd=1600),  # 1558M
}
HF_GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")


# ----------------------------------------------------------------------------- pure functions

def position_ids(attention_mask):
    """(B, T) mask, 1 = real, 0 = pad (left padding) -> (B, T) positions: pads 0, real tokens 0, 1, 2..."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def attention_mask_4d(attention_mask, q_len):
    """(B, Tk) key mask -> (B, 1, Tq, Tk) bool, True = may attend. The Tq queries are the LAST Tq of the
    Tk positions (Tq < Tk with a KV cache). Causal AND key is real, OR the key is the query itself."""
    Tk = attention_mask.size(1)
    q_pos = torch.arange(Tk - q_len, Tk, device=attention_mask.device)[:, None]  # (Tq, 1)
    k_pos = torch.arange(Tk, device=attention_mask.device)[None, :]  # (1, Tk)
    real = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, Tk)
    return ((k_pos <= q_pos) & real) | (k_pos == q_pos)  # (B, 1, Tq, Tk)


def explicit_attention(q, k, v, mask, dropout_p=0.0):
    """softmax(QK^T / sqrt(D) + mask) V (Vaswani et al. 2017, eq. 1) written out.
    q (B, H, Tq, D), k and v (B, H, Tk, D), mask (B, 1, Tq, Tk) bool. Returns y (B, H, Tq, D), weights."""
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, H, Tq, Tk)
    att = F.softmax(att.masked_fill(~mask, float("-inf")), dim=-1)
    return F.dropout(att, p=dropout_p) @ v, att


def lm_loss(logits, targets):
    """Mean cross entropy of logits (B, T, V) at targets (B, T), skipping targets == -100.
    sum / max(count, 1): with no target at all this is 0.0 with a grad_fn instead of 0/0 = NaN."""
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                            ignore_index=-100, reduction="sum")
    return total / (targets != -100).sum().clamp(min=1)


def token_logprobs(logits, tokens, temperature=1.0):
    """log softmax(logits / temperature) at `tokens`: (B, T, V), (B, T) -> (B, T), in fp32.
    PPO must divide by the temperature it sampled with, or the "KL" can go negative (N details #2)."""
    logits = logits.float() / temperature
    # gather - logsumexp equals log_softmax(...).gather without a second (B, T, V) tensor
    return logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, greedy=False, generator=None):
    """logits (B, V) -> next token ids (B,). greedy (or temperature 0) takes the argmax."""
    if greedy or temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # nucleus (Holtzman et al. 2019): the smallest set of top tokens whose mass reaches top_p
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # the tokens before this one already hold > top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    cdf = logits.softmax(-1).cumsum(-1)  # (B, V); inverse-CDF sampling: one uniform number per row
    u = torch.rand(cdf.size(0), 1, generator=generator, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


class KVCache:
    """Every layer's keys and values in buffers of `size` positions: update() writes new ones in place and
    returns views of the `filled` part, all that attention reads. The position ids and (B, 1, size, size)
    mask of the whole sequence are built once from its (B, size) attention_mask; each step slices them."""

    def __init__(self, attention_mask):
        self.size, self.filled, self.kv = attention_mask.size(1), 0, []
        self.pos, self.mask = position_ids(attention_mask), attention_mask_4d(attention_mask, self.size)

    def update(self, layer, k, v):  # k, v (B, H, T, D) -> (B, H, filled + T, D)
        if layer == len(self.kv):  # first write: a (2, B, H, size, D) buffer in the layer's (autocast) dtype
            self.kv.append(k.new_empty(2, *k.shape[:2], self.size, k.size(3)))
        kv, t = self.kv[layer], self.filled + k.size(2)
        kv[0, :, :, self.filled:t], kv[1, :, :, self.filled:t] = k, v
        return kv[0, :, :, :t], kv[1, :, :, :t]


# ----------------------------------------------------------------------------- the Transformer

class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be a multiple of n_head"
        self.n_head, self.dropout = config.n_head, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x, mask, explicit, cache=None, layer=0):
        """x (B, T, C); mask (B, 1, T, Tk) bool or None for plain causal; cache: a KVCache or None."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H, Tk, D): the cached keys and values, then these
        p = self.dropout if self.training else 0.0
        if explicit:
            y, att = explicit_attention(q, k, v, mask, p)
        else:  # mask None only without a cache: then is_causal is right (and allows FlashAttention)
            y, att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                                    is_causal=mask is None), None
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y)), att


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, mask, explicit, cache=None, layer=0):
        y, att = self.attn(self.ln_1(x), mask, explicit, cache, layer)
        x = x + y
        return x + self.mlp(self.ln_2(x)), att


class GPT(nn.Module):
    attn_impl = "sdpa"  # "sdpa" (fused) or "explicit"; set per instance: model.attn_impl = "explicit"

    def __init__(self, config):
        super().__init__()
        self.config = config = dataclasses.replace(config)  # our own copy: resize_vocab edits it
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied (Press & Wolf 2017)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2 sec. 2.3: scale residual projections by 1/sqrt(N)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def _run(self, idx, attention_mask=None, cache=None, return_attn=False):
        """The Transformer body on idx (B, T) with attention_mask (B, T) or None (no padding); or, with a
        KVCache (which holds the whole sequence's mask), on the T tokens after its filled part, adding them.
        Returns (hidden states after ln_f (B, T, C), per-layer attention weights or None)."""
        B, T = idx.shape
        T_past = 0 if cache is None else cache.filled
        if T_past + T > self.config.block_size:
            raise ValueError(f"sequence length {T_past + T} > block_size {self.config.block_size}")
        if self.attn_impl not in ("sdpa", "explicit"):
            raise ValueError(f"attn_impl must be 'sdpa' or 'explicit', not {self.attn_impl!r}")
        explicit = return_attn or self.attn_impl == "explicit"
        if cache is not None:  # rows T_past.. of the whole sequence's positions and mask
            pos, mask = cache.pos[:, T_past:T_past + T], cache.mask[:, :, T_past:T_past + T, :T_past + T]
        elif attention_mask is None and not explicit:  # plain causal: SDPA's is_causal path
            pos, mask = torch.arange(T, device=idx.device).expand(B, T), None
        else:
            attention_mask = torch.ones_like(idx) if attention_mask is None else attention_mask
            if attention_mask.shape != (B, T):
                raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, T)}")
            pos, mask = position_ids(attention_mask), attention_mask_4d(attention_mask, T)  # (B, T), (B, 1, T, T)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        attns = []
        for i, block in enumerate(self.transformer.h):
            x, att = block(x, mask, explicit, cache, i)
            attns.append(att)
        if cache is not None:
            cache.filled += T
        return self.transformer.ln_f(x), attns

    def hidden_states(self, idx, attention_mask=None):
        """(B, T) -> (B, T, C) final hidden states after ln_f (the reward / value heads read these)."""
        return self._run(idx, attention_mask)[0]

    def forward(self, idx, targets=None, attention_mask=None):
        """idx (B, T) -> logits (B, T, V) and the loss at targets (B, T) (-100 = ignore) or None."""
        logits = self.lm_head(self.hidden_states(idx, attention_mask))  # (B, T, V)
        return logits, None if targets is None else lm_loss(logits, targets)

    @torch.no_grad()
    def attention_maps(self, idx, attention_mask=None):
        """Attention weights of every layer through the explicit path: a list of n_layer (B, H, T, T)."""
        return self._run(idx, attention_mask, return_attn=True)[1]

    @torch.no_grad()
    def generate(self, idx, attention_mask=None, max_new_tokens=32, temperature=1.0, top_k=None, top_p=None,
                 greedy=False, eos_id=None, pad_id=0, generator=None, use_cache=True, return_logits=False):
        """Continue the left-padded prompts idx (B, T) (attention_mask (B, T), 1 = real).
        Returns new_tokens (B, N) long and new_mask (B, N) bool with N <= max_new_tokens: True for real
        generated tokens including the eos itself; after a sequence's eos come pad_id and False.
        eos_id: one token id or a collection of them; a sequence stops at the first it generates.
        use_cache=False recomputes the whole sequence at each step (bench, parity test).
        return_logits=True also returns the raw logits (B, N, V) each token was drawn from (fp32).
        Leaves train/eval mode to the caller (dropout is 0 by default)."""
        B, T = idx.shape
        if T + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt length {T} + max_new_tokens {max_new_tokens} > block_size "
                             f"{self.config.block_size}: crop the prompt or ask for fewer tokens")
        mask = torch.ones_like(idx) if attention_mask is None else attention_mask.to(idx.dtype)
        stops = None if eos_id is None else torch.tensor([eos_id] if isinstance(eos_id, int) else sorted(eos_id),
                                                         dtype=torch.long, device=idx.device)
        # the cache's mask counts every new token as real: a row's tokens after its eos only feed that row
        cache = KVCache(torch.cat([mask, mask.new_ones(B, max_new_tokens)], 1)) if use_cache else None
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        tokens, real, step_logits = [], [], []
        seq = step_input = idx
        for _ in range(max_new_tokens):
            h = self._run(step_input, cache=cache)[0] if use_cache else self._run(seq, mask)[0]
            logits = self.lm_head(h[:, -1, :]).float()  # (B, V)
            tok = sample_next_token(logits, temperature, top_k, top_p, greedy, generator).masked_fill(done, pad_id)
            tokens.append(tok)
            real.append(~done)
            if return_logits:
                step_logits.append(logits)
            if stops is not None:
                done = done | torch.isin(tok, stops)
            step_input = tok[:, None]  # (B, 1)
            if not use_cache:  # the reference path re-reads the whole sequence
                seq, mask = torch.cat([seq, step_input], dim=1), torch.cat([mask, torch.ones_like(step_input)], dim=1)
            if done.all():
                break
        if not tokens:
            return idx.new_zeros(B, 0), torch.zeros(B, 0, dtype=torch.bool, device=idx.device)
        out = (torch.stack(tokens, dim=1), torch.stack(real, dim=1))  # (B, N), (B, N)
        return out + (torch.stack(step_logits, dim=1),) if return_logits else out

    # ------------------------------------------------------------------------- weights and sizes

    @classmethod
    def from_pretrained(cls, name_or_path, cache_dir=None):
        """Load GPT-2 weights from a local Hugging Face folder (config.json + model.safetensors or
        pytorch_model.bin), or by name (gpt2, gpt2-medium, gpt2-large, gpt2-xl): config.json and
        model.safetensors are downloaded once into {cache_dir}/{name} (~/.cache/rlhf-from-scratch/{name})."""
        if os.path.isdir(name_or_path):
            folder = name_or_path
        elif name_or_path in HF_GPT2_NAMES:
            from common import download_from_hub  # plumbing, needed only to download
            folder = download_from_hub(name_or_path, ("config.json", "model.safetensors"), cache_dir)
        else:
            raise FileNotFoundError(f"{name_or_path!r} is neither a folder nor one of {HF_GPT2_NAMES}")
        config_path = os.path.join(folder, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{config_path} is missing: a GPT-2 folder needs config.json and "
                                    f"model.safetensors or pytorch_model.bin")
        with open(config_path) as f:
            hf = json.load(f)
        if missing := [k for k in ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd") if k not in hf]:
            raise ValueError(f"{config_path} lacks {missing}")
        config = GPTConfig(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                           n_head=hf["n_head"], n_embd=hf["n_embd"])
        path = os.path.join(folder, "model.safetensors")
        if os.path.isfile(path):
            from safetensors.torch import load_file
            sd_hf = load_file(path)
        elif os.path.isfile(path := os.path.join(folder, "pytorch_model.bin")):
            sd_hf = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"{folder} has neither model.safetensors nor pytorch_model.bin")
        model = cls(config)
        sd = model.state_dict()
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        loaded = {"lm_head.weight"}  # tied to wte: GPT-2 files hold it once or twice, we read wte
        for key, w in sd_hf.items():
            if key.endswith((".attn.bias", ".attn.masked_bias")) or key == "lm_head.weight":
                continue  # causal-mask buffers, not weights
            ours = key if key.startswith("transformer.") else "transformer." + key
            if ours not in sd:
                raise ValueError(f"{path}: unexpected weight {key!r} for a GPT-2 model")
            w = w.t() if key.endswith(conv1d) else w  # HF Conv1D stores (in, out); nn.Linear stores (out, in)
            if w.shape != sd[ours].shape:
                raise ValueError(f"{path}: {key} has shape {tuple(w.shape)}, expected {tuple(sd[ours].shape)} "
                                 f"from {config_path}")
            sd[ours].copy_(w)  # state_dict() tensors are detached views of the parameters
            loaded.add(ours)
        if missing := sorted(set(sd) - loaded):
            raise ValueError(f"{path}: missing {len(missing)} weights, e.g. {missing[:3]}")
        return model

    def resize_vocab(self, new_vocab_size):
        """Grow the (tied) token embedding to new_vocab_size rows; new rows = mean of the old ones
        (Hewitt 2021), so new tokens start with an average, not a random, output logit."""
        old = self.transformer.wte.weight
        V = old.size(0)
        if new_vocab_size < V:
            raise ValueError(f"resize_vocab only grows the vocabulary ({V} -> {new_vocab_size})")
        wte = nn.Embedding(new_vocab_size, old.size(1), device=old.device, dtype=old.dtype)
        with torch.no_grad():
            wte.weight[:V] = old
            wte.weight[V:] = old.mean(dim=0)
        self.transformer.wte = wte
        self.lm_head.weight = wte.weight  # keep the tie
        self.lm_head.out_features = self.config.vocab_size = new_vocab_size
        return self

    def num_params(self, non_embedding=False):
        """Parameter count (the tied wte/lm_head once); non_embedding drops only the position embeddings."""
        n = sum(p.numel() for p in self.parameters())  # parameters() yields a shared tensor once
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12*L*H*D*T."""
        c = self.config
        L, H, D, T = c.n_layer, c.n_head, c.n_embd // c.n_head, seq_len or c.block_size
        return 6 * self.num_params(non_embedding=True) + 12 * L * H * D * T

    def estimate_mfu(self, tokens_per_sec, device_peak_flops, seq_len=None):
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak (PaLM sec. B)."""
        return self.flops_per_token(seq_len) * tokens_per_sec / device_peak_flops

