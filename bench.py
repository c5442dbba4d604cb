"""Throughput of model.py: training steps (ours vs an independent reference) and batched generation
(with and without the KV cache, and against Hugging Face transformers' GPT-2 on the same weights).

    python bench.py                                  # embedded preset on this machine (seconds)
    python bench.py --config=gpt2 --batch_size=16    # GPT-2 124M (on a GPU: bf16 autocast, MFU)
    python bench.py --reference=false --hf=false     # skip the reference models

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
4. Hugging Face (optional, benchmark only, not in requirements.txt; skipped with a note when
   `import transformers` fails): transformers.GPT2LMHeadModel of the same shape (gelu_new, dropout 0,
   SDPA attention) holding a copy of our weights (its Conv1D stores W as (in, out), the transpose of
   our nn.Linear), checked to give our logits on a left-padded input (and how many greedy tokens
   agree). Both then sample the same prompts at temperature 1 (no top-k): ours with the KV cache and no eos, HF's
   generate(use_cache=True, do_sample=True, top_k=0, attention_mask=...) with min_new_tokens =
   max_new_tokens, so every row of both draws exactly gen_tokens tokens. HF's config needs an eos id,
   set to the last token: min_new_tokens masks its logit, which changes what is drawn, not the cost.
Each generation runs once untimed, then gen_repeats times, the runs compared taking turns; the fastest
run is reported (other processes on the machine only ever slow a run down).
Random weights: the speed of a Transformer does not depend on what it has learned.
"""
import importlib.metadata
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import pick_device, print_config, run_command
from model import GPT, PRESETS, GPTConfig, position_ids

# the model presets plus a tiny shape for the smoke test (tests/test_model.py runs bench.py with it)
SHAPES = {**PRESETS, "tiny": GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=16)}


@dataclass
class Config:
    config: str = "embedded"   # model shape: embedded | gpt2 | gpt2-medium | gpt2-large | gpt2-xl | tiny
    device: str = "auto"       # auto | cpu | cuda | mps
    dtype: str = "auto"        # auto | float32 | bfloat16 (auto: bf16 autocast on a bf16 GPU)
    batch_size: int = 16       # training sequences per step
    seq_len: int = 0           # training sequence length (0 = the preset's block_size)
    steps: int = 10            # timed training steps
    warmup: int = 2            # untimed training steps first (allocator, cuDNN, compile)
    gen_batch: int = 32        # prompts generated in one batch
    gen_prompt_len: int = 16   # longest prompt; prompts are 1/2..1 of it, left-padded
    gen_tokens: int = 100      # new tokens per prompt (no eos: every prompt gets all of them)
    gen_repeats: int = 3       # timed runs of each generation after one untimed run; the fastest counts
    uncached: bool = True      # also time generation without the KV cache (minutes for GPT-2 shapes on CPU)
    compile: bool = False      # torch.compile the training model (CUDA only)
    reference: bool = True     # also time an nn.TransformerEncoderLayer GPT-2 of the same shape
    hf: bool = True            # also time Hugging Face transformers' GPT-2 generate on our weights, if installed
    threads: int = 0           # torch CPU threads (0 = leave torch's default)
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


def fastest(fns, repeats, device):
    """{name: fn} -> {name: (seconds, output)}: one untimed call of each (kernels, allocator), then
    `repeats` rounds that call each once in turn (so a busy spell slows all alike); the fastest counts."""
    best = {}
    for name, fn in fns.items():
        fn()
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            r = timed(fn, device)
            best[name] = min(best.get(name, r), r, key=lambda t: t[0])
    return best


def hf_gpt2(model):
    """transformers.GPT2LMHeadModel of our shape holding a copy of our weights, or None (with a note)
    when transformers is not installed. The name mapping is model.from_pretrained's, reversed."""
    try:
        import transformers
    except ImportError:
        print("note: transformers is not installed: skipping the Hugging Face generation reference "
              "(optional, benchmark only: pip install transformers)")
        return None
    mc = model.config
    hf_config = transformers.GPT2Config(
        n_positions=mc.block_size, n_embd=mc.n_embd, n_layer=mc.n_layer, n_head=mc.n_head,
        vocab_size=mc.vocab_size, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=mc.vocab_size - 1, eos_token_id=mc.vocab_size - 1, pad_token_id=0)
    try:
        hf = transformers.GPT2LMHeadModel._from_config(hf_config, attn_implementation="sdpa")
    except (ValueError, ImportError, TypeError):  # an older transformers without SDPA for GPT-2
        hf = transformers.GPT2LMHeadModel(hf_config)
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    sd = {k: w.t() if k.endswith(conv1d) else w for k, w in model.state_dict().items()}  # Conv1D: (in, out)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))]  # mask buffers
    assert not missing and not unexpected, f"weight names differ: missing {missing}, unexpected {unexpected}"
    return hf.to(model.lm_head.weight.device).eval()


@torch.no_grad()
def hf_generate(hf, prompts, mask, n, sample=True):
    """HF's generate on left-padded prompts: exactly n new tokens (min_new_tokens = n), (B, n)."""
    how = dict(do_sample=True, temperature=1.0, top_k=0) if sample else dict(do_sample=False)
    out = hf.generate(input_ids=prompts, attention_mask=mask, use_cache=True, max_new_tokens=n,
                      min_new_tokens=n, pad_token_id=0, **how)
    return out[:, prompts.size(1):]


@torch.no_grad()
def check_hf(hf, model, prompts, mask, dev):
    """HF gives our logits at the real tokens of a left-padded batch (asserted); returns the share of
    its greedy tokens that equal ours (random weights give nearly flat logits: rounding splits near-ties)."""
    prompts, mask = prompts[:4], mask[:4]
    real = mask.bool()
    with dev.autocast():
        theirs = hf(input_ids=prompts, attention_mask=mask, position_ids=position_ids(mask)).logits
        torch.testing.assert_close(theirs[real].float(), model(prompts, attention_mask=mask)[0][real].float(),
                                   atol=1e-4 if dev.dtype == torch.float32 else 5e-2, rtol=1e-4)
        theirs = hf_generate(hf, prompts, mask, 8, sample=False)
        return (theirs == model.generate(prompts, mask, max_new_tokens=8, greedy=True)[0]).float().mean().item()


def main(cfg):
    print_config(cfg)
    if cfg.config not in SHAPES:
        raise SystemExit(f"error: --config={cfg.config!r}: expected one of {', '.join(SHAPES)}")
    dev = pick_device(cfg.device, cfg.dtype, cfg.compile)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    mc = SHAPES[cfg.config]
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

    # 3. generation with and without the KV cache (greedy, so the tokens can be compared)
    del x, y
    model.eval()
    Bg, P, N = cfg.gen_batch, cfg.gen_prompt_len, cfg.gen_tokens
    prompts = torch.randint(V, (Bg, P), device=dev.device)
    lengths = torch.randint(max(1, P // 2), P + 1, (Bg,), device=dev.device)
    mask = (torch.arange(P, device=dev.device)[None, :] >= P - lengths[:, None]).long()  # left padding

    def ours(use_cache=True, greedy=True):
        with dev.autocast():
            return model.generate(prompts, mask, max_new_tokens=N, greedy=greedy, use_cache=use_cache)
    runs = {"with KV cache": lambda: ours(use_cache=True)}
    if cfg.uncached:
        runs["no cache (recompute)"] = lambda: ours(use_cache=False)
    results = fastest(runs, cfg.gen_repeats, dev.device)
    for name, (seconds, _) in results.items():
        rows.append((f"generate greedy, {name} (B{Bg}, {N} new)",
                     f"{seconds:.3f} s, {Bg * N / seconds:,.0f} tokens/s"))
    if cfg.uncached:
        cached, recomputed = results["with KV cache"], results["no cache (recompute)"]
        rows.append(("KV-cache speedup", f"{recomputed[0] / cached[0]:.1f}x"))
        same = torch.equal(cached[1][0], recomputed[1][0])
        rows.append(("cached == recomputed greedy tokens", "yes" if same else "no (expected only under bf16)"))

    # 4. sampling at temperature 1: ours vs Hugging Face's generate on the same weights and prompts
    hf = hf_gpt2(model) if cfg.hf else None
    runs = {"ours": lambda: ours(greedy=False)}
    if hf is not None:
        greedy_agree = check_hf(hf, model, prompts, mask, dev)
        runs["hf"] = lambda: hf_generate(hf, prompts, mask, N)
    results = fastest(runs, cfg.gen_repeats, dev.device)
    ours_s = results["ours"][0]
    rows.append((f"sample T=1, ours with KV cache (B{Bg}, {N} new)",
                 f"{ours_s:.3f} s, {Bg * N / ours_s:,.0f} tokens/s"))
    if hf is not None:
        hf_s, hf_out = results["hf"]
        assert hf_out.shape == (Bg, N), f"HF generated {tuple(hf_out.shape)}, expected {(Bg, N)}"
        rows.append((f"sample T=1, HF transformers {importlib.metadata.version('transformers')} generate",
                     f"{hf_s:.3f} s, {Bg * N / hf_s:,.0f} tokens/s ({hf.config._attn_implementation})"))
        rows.append(("sample ours / HF (tokens/s)", f"{hf_s / ours_s:.2f}x"))
        rows.append(("HF logits == ours; greedy tokens (4 x 8) equal", f"yes; {greedy_agree:.0%}"))

    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    print(f"\n| {'what':<{w0}} | {'value':<{w1}} |\n|{'-' * (w0 + 2)}|{'-' * (w1 + 2)}|")
    for what, value in rows:
        print(f"| {what:<{w0}} | {value:<{w1}} |")


if __name__ == "__main__":
    run_command(main, Config)
