"""Throughput of model.py: training steps (ours vs an independent reference) and batched generation
with and without the KV cache.

    python bench.py                                  # embedded preset on this machine (seconds)
    python bench.py --config=gpt2 --batch_size=16    # GPT-2 124M (on a GPU: bf16 autocast, MFU)
    python bench.py --reference=false                # skip the reference model

What it measures:
1. Training: forward + backward + AdamW on random tokens (batch_size x seq_len), after `warmup`
   untimed steps; tokens/s and, on CUDA, model FLOPs utilisation (MFU, PaLM appendix B) against the
   GPU's bf16 dense peak (989 TFLOP/s for H100 SXM, 312 for A100).
2. Reference: the same training step (same batch, seq_len, vocab, loss, AdamW, dtype, compile) on a
   GPT-2 of the same shape built only from PyTorch's own modules: token + position embeddings,
   n_layer x nn.TransformerEncoderLayer(norm_first=True, activation="gelu", dropout=0,
   dim_feedforward=4*n_embd) with a causal mask, a final LayerNorm and an output head tied to the token
   embedding. Its parameter count equals ours (checked). It shares no code with model.py (its attention
   is nn.MultiheadAttention, which with is_causal=True also reaches F.scaled_dot_product_attention's
   causal kernel), so ours / reference near or above 1.0 says our step has no avoidable overhead; well
   below 1.0 says there is some. Differences that remain: exact (erf) GELU instead of GPT-2's tanh
   one, PyTorch's default init (speed does not depend on the weights).
3. Generation: gen_batch left-padded random prompts, gen_tokens new tokens, greedy, no eos (every
   sequence runs to the end): with the KV cache and by recomputing the whole sequence at each step.
   The greedy tokens of both should match (exactly in fp32; bf16 rounding may split near-ties).
Random weights: the speed of a Transformer does not depend on what it has learned.
"""
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import pick_device, print_config, run_command
from model import GPT, PRESETS


@dataclass
class Config:
    config: str = "embedded"   # model preset: embedded | gpt2 | gpt2-medium | gpt2-large | gpt2-xl
    device: str = "auto"       # auto | cpu | cuda | mps
    dtype: str = "auto"        # auto | float32 | bfloat16 (auto: bf16 autocast on a bf16 GPU)
    batch_size: int = 16       # training sequences per step
    seq_len: int = 0           # training sequence length (0 = the preset's block_size)
    steps: int = 10            # timed training steps
    warmup: int = 2            # untimed training steps first (allocator, cuDNN, compile)
    gen_batch: int = 32        # prompts generated in one batch
    gen_prompt_len: int = 16   # longest prompt; prompts are 1/2..1 of it, left-padded
    gen_tokens: int = 64       # new tokens per prompt
    compile: bool = False      # torch.compile the training model (CUDA only)
    reference: bool = True     # also time an nn.TransformerEncoderLayer GPT-2 of the same shape
    seed: int = 0              # seed for weights and random tokens


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}  # dense


def peak_flops(device):
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


class ReferenceGPT(nn.Module):
    """GPT-2's shape from PyTorch's own building blocks, independent of model.py (see the docstring)."""

    def __init__(self, mc):
        super().__init__()
        self.wte = nn.Embedding(mc.vocab_size, mc.n_embd)
        self.wpe = nn.Embedding(mc.block_size, mc.n_embd)
        layer = nn.TransformerEncoderLayer(mc.n_embd, mc.n_head, dim_feedforward=4 * mc.n_embd, dropout=0.0,
                                           activation="gelu", batch_first=True, norm_first=True, bias=mc.bias)
        # nested tensors are an inference-only fast path that norm_first disables anyway
        self.h = nn.TransformerEncoder(layer, mc.n_layer, enable_nested_tensor=False)  # n_layer deep copies
        self.ln_f = nn.LayerNorm(mc.n_embd, bias=mc.bias)
        self.lm_head = nn.Linear(mc.n_embd, mc.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as in GPT-2

    def forward(self, idx, targets):
        T = idx.size(1)
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))  # (B, T, C)
        causal = nn.Transformer.generate_square_subsequent_mask(T, device=idx.device)  # (T, T), -inf above
        x = self.h(x, mask=causal, is_causal=True)  # is_causal lets SDPA use its causal kernel
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def train_tokens_per_s(model, x, y, cfg, dev):
    """forward + backward + AdamW steps on (x, y): `warmup` untimed, then `steps` timed -> (tokens/s, s)."""
    train_model = torch.compile(model) if dev.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_steps(n):
        for _ in range(n):
            with dev.autocast():
                _, loss = train_model(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    train_steps(cfg.warmup)
    seconds, _ = timed(lambda: train_steps(cfg.steps), dev.device)
    return cfg.steps * x.numel() / seconds, seconds


def timed(fn, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


def main(cfg):
    print_config(cfg)
    if cfg.config not in PRESETS:
        raise SystemExit(f"error: --config={cfg.config!r}: expected one of {', '.join(PRESETS)}")
    dev = pick_device(cfg.device, cfg.dtype, cfg.compile)
    torch.manual_seed(cfg.seed)
    mc = PRESETS[cfg.config]
    model = GPT(mc).to(dev.device)
    B, T, V = cfg.batch_size, cfg.seq_len or mc.block_size, mc.vocab_size
    rows = [("model", f"{cfg.config}: {model.num_params() / 1e6:.2f}M params, L{mc.n_layer} H{mc.n_head} "
                      f"C{mc.n_embd} V{V}"),
            ("device", f"{dev.device}, {str(dev.dtype).replace('torch.', '')}, "
                       f"{torch.get_num_threads()} CPU threads, compile={dev.compile}")]

    # 1. training: forward + backward + AdamW
    x = torch.randint(V, (B, T), device=dev.device)
    y = torch.randint(V, (B, T), device=dev.device)
    tok_s, seconds = train_tokens_per_s(model, x, y, cfg, dev)
    rows.append((f"train tokens/s (B{B} x T{T}, fwd+bwd+AdamW)",
                 f"{tok_s:,.0f}  ({1000 * seconds / cfg.steps:.1f} ms/step)"))
    peak = peak_flops(dev.device)
    mfu = f"{100 * model.estimate_mfu(tok_s, peak, seq_len=T):.1f}% of {peak / 1e12:.0f} TFLOP/s bf16" if peak \
        else "n/a (CPU or unknown GPU)"
    rows.append(("train MFU", mfu))
    rows.append(("train TFLOP/s achieved", f"{model.flops_per_token(T) * tok_s / 1e12:.3f}"))

    # 2. the same step on an independent implementation of the same shape
    if cfg.reference:
        ref = ReferenceGPT(mc).to(dev.device)
        n_ref = sum(p.numel() for p in ref.parameters())
        assert n_ref == model.num_params(), f"reference has {n_ref} params, ours {model.num_params()}"
        ref_tok_s, ref_seconds = train_tokens_per_s(ref, x, y, cfg, dev)
        del ref
        rows.append(("reference: torch.nn.TransformerEncoderLayer, same shape",
                     f"{ref_tok_s:,.0f}  ({1000 * ref_seconds / cfg.steps:.1f} ms/step)"))
        rows.append(("train ours / reference (tokens/s)", f"{tok_s / ref_tok_s:.2f}x"))

    # 3. generation with and without the KV cache
    del x, y
    model.eval()
    Bg, P, N = cfg.gen_batch, cfg.gen_prompt_len, cfg.gen_tokens
    prompts = torch.randint(V, (Bg, P), device=dev.device)
    lengths = torch.randint(max(1, P // 2), P + 1, (Bg,), device=dev.device)
    mask = (torch.arange(P, device=dev.device)[None, :] >= P - lengths[:, None]).long()  # left padding
    results = {}
    for use_cache in (True, False):
        def gen():
            with dev.autocast():
                return model.generate(prompts, mask, max_new_tokens=N, greedy=True, use_cache=use_cache)
        gen()  # warm up (kernels, allocator)
        results[use_cache] = timed(gen, dev.device)
        name = "with KV cache" if use_cache else "no cache (recompute)"
        rows.append((f"generate {name} (B{Bg}, {N} new)",
                     f"{results[use_cache][0]:.3f} s, {Bg * N / results[use_cache][0]:,.0f} tokens/s"))
    rows.append(("KV-cache speedup", f"{results[False][0] / results[True][0]:.1f}x"))
    same = torch.equal(results[True][1][0], results[False][1][0])
    rows.append(("cached == recomputed greedy tokens", "yes" if same else "no (expected only under bf16)"))

    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    print(f"\n| {'what':<{w0}} | {'value':<{w1}} |\n|{'-' * (w0 + 2)}|{'-' * (w1 + 2)}|")
    for what, value in rows:
        print(f"| {what:<{w0}} | {value:<{w1}} |")


if __name__ == "__main__":
    run_command(main, Config)
