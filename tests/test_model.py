"""Tests for model.py: hand-derived values and parity with a reference, on tiny CPU models."""
import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import pick_device  # noqa: E402
from model import GPT, PRESETS, GPTConfig, KVCache, position_ids, sample_next_token, token_logprobs  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=16)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(dataclasses.replace(TINY, **overrides)).eval()


def first_hit(row, stops):
    """Index of the first token of `row` that is in `stops`, or None."""
    hits = [i for i, t in enumerate(row.tolist()) if t in stops]
    return hits[0] if hits else None


def varied_stops_setup():
    """A 6-token model sampled hot from four left-padded prompts, and the trace it samples without
    eos (the same generator seed replays it: one draw per row per step). Returns model, idx, mask,
    the generate kwargs, the trace, and an eos that every row samples, at the most spread steps."""
    model = tiny_model(seed=3, vocab_size=6)
    idx, mask = left_padded_batch([5, 3, 4, 2], 6, seed=4)
    kw = dict(max_new_tokens=12, temperature=2.0)  # hot sampling: varied traces from a tiny model
    free, _ = model.generate(idx, mask, generator=torch.Generator().manual_seed(0), **kw)
    candidates = [t for t in range(6) if all(first_hit(free[b], {t}) is not None for b in range(4))]
    eos = max(candidates, key=lambda t: len({first_hit(free[b], {t}) for b in range(4)}))
    return model, idx, mask, kw, free, eos


def left_padded_batch(lengths, vocab, pad_id=0, seed=1):
    """Random prompts of the given lengths, left-padded with RANDOM tokens (they must not matter)."""
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    idx = torch.randint(vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, T - n:] = 1
    return idx, mask


# ----------------------------------------------------------------------------- formulas by hand

def test_position_ids_by_hand():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_token_logprobs_by_hand():
    # logits (0, ln 4, ln 9) at temperature 2 become (0, ln 2, ln 3): softmax = (1, 2, 3) / 6
    logits = torch.tensor([[[0.0, math.log(4), math.log(9)]] * 3])  # (1, 3, 3)
    tokens = torch.tensor([[0, 1, 2]])
    expected = torch.tensor([[math.log(1 / 6), math.log(2 / 6), math.log(3 / 6)]])
    torch.testing.assert_close(token_logprobs(logits, tokens, temperature=2.0), expected)
    # temperature 1: log(1/14), log(4/14), log(9/14)
    torch.testing.assert_close(token_logprobs(logits, tokens),
                               torch.tensor([[math.log(1 / 14), math.log(4 / 14), math.log(9 / 14)]]))


def test_loss_ignores_minus_100_and_all_ignored_is_zero():
    model = tiny_model()
    idx = torch.randint(TINY.vocab_size, (2, 6))
    targets = torch.randint(TINY.vocab_size, (2, 6))
    targets[0, :4] = -100
    targets[1, 5] = -100
    logits, loss = model(idx, targets)
    keep = targets != -100
    by_hand = -torch.log_softmax(logits, -1)[keep].gather(-1, targets[keep][:, None]).mean()
    torch.testing.assert_close(loss, by_hand)
    _, loss = model(idx, torch.full_like(targets, -100))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()  # a step on an empty batch must not crash or produce NaN gradients
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_param_count_gpt2_preset():
    with torch.device("meta"):  # shapes only, no memory
        model = GPT(PRESETS["gpt2"])
    assert model.num_params() == 124_439_808
    assert model.num_params(non_embedding=True) == 124_439_808 - 1024 * 768


def test_flops_per_token_by_hand():
    model = GPT(GPTConfig(block_size=16, vocab_size=10, n_layer=2, n_head=2, n_embd=8))
    C, L, V, T = 8, 2, 10, 16
    # per block: c_attn 3C^2+3C, attn c_proj C^2+C, c_fc 4C^2+4C, mlp c_proj 4C^2+C, two LayerNorms 4C
    n_block = 12 * C * C + 13 * C
    n = L * n_block + 2 * C + V * C  # + ln_f + wte (tied with lm_head); wpe excluded
    assert model.num_params(non_embedding=True) == n
    assert model.flops_per_token() == 6 * n + 12 * L * C * T
    assert model.flops_per_token(seq_len=4) == 6 * n + 12 * L * C * 4
    assert model.estimate_mfu(1000.0, 1e12) == pytest.approx(model.flops_per_token() * 1000 / 1e12)


def test_tied_weights_and_resize_vocab():
    model = tiny_model()
    assert model.lm_head.weight is model.transformer.wte.weight
    idx = torch.randint(TINY.vocab_size, (2, 7))
    before = model(idx)[0]
    old = model.transformer.wte.weight.detach().clone()
    model.resize_vocab(TINY.vocab_size + 3)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.config.vocab_size == TINY.vocab_size + 3
    new_rows = model.transformer.wte.weight[TINY.vocab_size:].detach()
    torch.testing.assert_close(new_rows, old.mean(0).expand(3, -1))
    after = model(idx)[0]
    assert after.shape == (2, 7, TINY.vocab_size + 3)
    torch.testing.assert_close(after[..., :TINY.vocab_size], before)


# ----------------------------------------------------------------------------- parity

@pytest.mark.parametrize("padded", [False, True])
def test_sdpa_equals_explicit_attention(padded):
    model = tiny_model()
    idx, mask = left_padded_batch([9, 4, 1], TINY.vocab_size)
    mask = mask if padded else None
    model.attn_impl = "sdpa"
    sdpa = model(idx, attention_mask=mask)[0]
    model.attn_impl = "explicit"
    explicit = model(idx, attention_mask=mask)[0]
    torch.testing.assert_close(sdpa, explicit, atol=1e-5, rtol=1e-5)
    assert GPT.attn_impl == "sdpa"  # set on the instance, not the class


def test_attention_maps_skip_pads():
    model = tiny_model()
    idx, mask = left_padded_batch([5, 2], TINY.vocab_size)
    maps = model.attention_maps(idx, mask)
    assert len(maps) == TINY.n_layer and maps[0].shape == (2, TINY.n_head, 5, 5)
    for att in maps:
        torch.testing.assert_close(att.sum(-1), torch.ones(2, TINY.n_head, 5))
        assert att[1, :, 3:, :3].abs().max() == 0  # real queries never look at pad keys
        assert torch.triu(att, diagonal=1).abs().max() == 0  # nor at the future


@pytest.mark.parametrize("attn_impl", ["sdpa", "explicit"])
def test_left_padded_batch_equals_each_sequence_alone(attn_impl):
    model = tiny_model()
    model.attn_impl = attn_impl
    lengths = [7, 3, 1]
    idx, mask = left_padded_batch(lengths, TINY.vocab_size)
    logits = model(idx, attention_mask=mask)[0]
    hidden = model.hidden_states(idx, mask)
    assert torch.isfinite(logits).all()  # also at pad positions
    for b, n in enumerate(lengths):
        alone = idx[b:b + 1, -n:]
        torch.testing.assert_close(logits[b, -n:], model(alone)[0][0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(hidden[b, -n:], model.hidden_states(alone)[0], atol=1e-5, rtol=1e-5)


def test_kv_cache_equals_recomputing():
    model = tiny_model()
    idx, mask = left_padded_batch([6, 2, 4], TINY.vocab_size)
    kw = dict(attention_mask=mask, max_new_tokens=10, greedy=True, return_logits=True)
    tok_c, mask_c, logits_c = model.generate(idx, use_cache=True, **kw)
    tok_u, mask_u, logits_u = model.generate(idx, use_cache=False, **kw)
    assert tok_c.shape == (3, 10) and torch.equal(tok_c, tok_u) and mask_c.all() and mask_u.all()
    torch.testing.assert_close(logits_c, logits_u, atol=1e-5, rtol=1e-5)
    # and both equal the logits of one full forward pass over prompt + continuation
    full = model(torch.cat([idx, tok_c], 1), attention_mask=torch.cat([mask, torch.ones_like(tok_c)], 1))[0]
    torch.testing.assert_close(logits_c, full[:, idx.size(1) - 1:-1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn_impl", ["sdpa", "explicit"])
def test_kv_cache_filled_in_pieces_equals_one_pass(attn_impl):
    model = tiny_model()
    model.attn_impl = attn_impl
    idx, mask = left_padded_batch([9, 4, 1], TINY.vocab_size)
    full = model.hidden_states(idx, mask)
    cache = KVCache(torch.cat([mask, torch.ones(3, 4, dtype=torch.long)], 1))  # room for 4 more positions
    pieces = [model._run(idx[:, a:b], cache=cache)[0] for a, b in [(0, 5), (5, 8), (8, 9)]]
    assert cache.filled == 9 and cache.kv[0].shape == (2, 3, TINY.n_head, 13, TINY.n_embd // TINY.n_head)
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)  # pad positions too


@pytest.mark.parametrize("attn_impl", ["sdpa", "explicit"])
def test_kv_cache_equals_recomputing_when_rows_stop_at_different_steps(attn_impl):
    model, idx, mask, kw, free, eos = varied_stops_setup()
    model.attn_impl = attn_impl
    kw = dict(kw, eos_id=eos, pad_id=5 if eos != 5 else 4, return_logits=True)
    tok_c, real_c, logits_c = model.generate(idx, mask, generator=torch.Generator().manual_seed(0), **kw)
    tok_u, real_u, logits_u = model.generate(idx, mask, generator=torch.Generator().manual_seed(0),
                                             use_cache=False, **kw)
    assert len({int(n) for n in real_c.sum(1)}) >= 3 and tok_c.size(1) < 12, "rows should stop at varied steps"
    assert torch.equal(tok_c, tok_u) and torch.equal(real_c, real_u)
    torch.testing.assert_close(logits_c, logits_u, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- generation

def test_generate_stops_at_eos_with_mask_semantics():
    model, idx, mask, kw, free, eos = varied_stops_setup()
    ends = [first_hit(free[b], {eos}) + 1 for b in range(4)]  # real tokens per sequence, eos included
    assert len(set(ends)) >= 3 and max(ends) < 12, "test setup: sequences should stop at varied steps"
    pad = 5 if eos != 5 else 4
    tok, real = model.generate(idx, mask, eos_id=eos, pad_id=pad,
                               generator=torch.Generator().manual_seed(0), **kw)
    assert tok.shape == (4, max(ends))  # the batch stops as soon as every sequence has stopped
    for b, n in enumerate(ends):
        assert real[b].tolist() == [True] * n + [False] * (max(ends) - n)
        assert tok[b, :n].tolist() == free[b, :n].tolist() and tok[b, n - 1] == eos
        assert (tok[b, n:] == pad).all()


def test_generate_stops_at_the_first_of_several_stop_tokens():
    model, idx, mask, kw, free, _ = varied_stops_setup()
    # two stop tokens, each of them the first one met in some row (so both take part)
    def met_first(stops):
        return {free[r, first_hit(free[r], stops)].item() if first_hit(free[r], stops) is not None else None
                for r in range(4)}
    stops = next(s for s in ({a, b} for a in range(6) for b in range(a + 1, 6)) if met_first(s) == s)
    ends = [first_hit(free[r], stops) + 1 for r in range(4)]
    assert max(ends) < 12
    pad = min(set(range(6)) - stops)
    for eos_id in (stops, sorted(stops), tuple(stops)):
        tok, real = model.generate(idx, mask, eos_id=eos_id, pad_id=pad,
                                   generator=torch.Generator().manual_seed(0), **kw)
        assert tok.shape == (4, max(ends))
        for b, n in enumerate(ends):
            assert real[b].tolist() == [True] * n + [False] * (max(ends) - n)
            assert tok[b, :n].tolist() == free[b, :n].tolist() and tok[b, n - 1].item() in stops
            assert (tok[b, n:] == pad).all()
    # an int and a one-element collection are the same rule
    one = [model.generate(idx, mask, eos_id=e, generator=torch.Generator().manual_seed(0), **kw)
           for e in (min(stops), [min(stops)])]
    assert torch.equal(one[0][0], one[1][0]) and torch.equal(one[0][1], one[1][1])


def test_generate_forced_eos_stops_whole_batch_at_once():
    model = tiny_model()
    with torch.no_grad():  # ln_f outputs its bias e_0, so logits = wte[:, 0]: make token 7 win everywhere
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(F.one_hot(torch.tensor(0), TINY.n_embd).float())
        model.transformer.wte.weight[:, 0] = 0.0
        model.transformer.wte.weight[7, 0] = 100.0
    idx, mask = left_padded_batch([3, 1], TINY.vocab_size)
    tok, real = model.generate(idx, mask, max_new_tokens=8, temperature=1.0, eos_id=7)
    assert tok.tolist() == [[7], [7]] and real.tolist() == [[True], [True]]


def test_top_k_1_and_tiny_top_p_equal_greedy():
    model = tiny_model()
    idx, mask = left_padded_batch([5, 2], TINY.vocab_size)
    greedy, _ = model.generate(idx, mask, max_new_tokens=8, greedy=True)
    for kw in (dict(top_k=1), dict(top_p=1e-6)):
        g = torch.Generator().manual_seed(0)
        sampled, _ = model.generate(idx, mask, max_new_tokens=8, temperature=1.5, generator=g, **kw)
        assert torch.equal(sampled, greedy), kw


def test_sampling_draws_each_token_with_its_probability():
    # inverse-CDF sampling: 200,000 draws of p = (0.5, 0.3, 0, 0.2) from one row repeated; a token of
    # probability 0 (here the third, and any top-k / top-p cuts) is never drawn
    p = torch.tensor([0.5, 0.3, 0.0, 0.2])
    logits = p.log().expand(200_000, 4)
    draws = sample_next_token(logits, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert freq[2] == 0
    torch.testing.assert_close(freq, p, atol=0.005, rtol=0)  # ~4 standard errors
    cut = sample_next_token(torch.randn(5000, 30), top_k=3, generator=torch.Generator().manual_seed(1))
    assert len(set(cut.tolist())) > 3  # rows differ, but each row draws from its own top 3 only
    logits = torch.randn(5000, 30, generator=torch.Generator().manual_seed(2))
    draws = sample_next_token(logits, top_k=3, generator=torch.Generator().manual_seed(3))
    top3 = logits.topk(3, dim=-1).indices
    assert (draws[:, None] == top3).any(-1).all()


def test_sampling_reproducible_with_generator():
    model = tiny_model()
    idx, mask = left_padded_batch([5, 2], TINY.vocab_size)
    runs = [model.generate(idx, mask, max_new_tokens=10, top_p=0.9, top_k=20,
                           generator=torch.Generator().manual_seed(s))[0] for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


def test_generate_past_block_size_is_an_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="block_size"):
        model.generate(torch.zeros(1, 30, dtype=torch.long), max_new_tokens=3)


# ----------------------------------------------------------------------------- GPT-2 weights

def hf_state_dict(cfg, seed=0):
    """Random weights in Hugging Face GPT-2 naming: Conv1D weights stored (in, out), attn.bias buffers."""
    g = torch.Generator().manual_seed(seed)
    C, V, T = cfg.n_embd, cfg.vocab_size, cfg.block_size
    r = lambda *shape: 0.1 * torch.randn(*shape, generator=g)  # noqa: E731
    sd = {"wte.weight": r(V, C), "wpe.weight": r(T, C), "ln_f.weight": 1 + r(C), "ln_f.bias": r(C)}
    for i in range(cfg.n_layer):
        p = f"h.{i}."
        sd.update({p + "ln_1.weight": 1 + r(C), p + "ln_1.bias": r(C), p + "ln_2.weight": 1 + r(C),
                   p + "ln_2.bias": r(C), p + "attn.c_attn.weight": r(C, 3 * C), p + "attn.c_attn.bias": r(3 * C),
                   p + "attn.c_proj.weight": r(C, C), p + "attn.c_proj.bias": r(C),
                   p + "mlp.c_fc.weight": r(C, 4 * C), p + "mlp.c_fc.bias": r(4 * C),
                   p + "mlp.c_proj.weight": r(4 * C, C), p + "mlp.c_proj.bias": r(C),
                   p + "attn.bias": torch.tril(torch.ones(1, 1, T, T))})
    return sd


def reference_gpt2(sd, n_layer, n_head, idx):
    """GPT-2 forward pass straight from the raw HF weights (x @ W + b with W as (in, out))."""
    T, C = idx.shape[1], sd["wte.weight"].shape[1]
    ln = lambda x, p: F.layer_norm(x, (C,), sd[p + ".weight"], sd[p + ".bias"], eps=1e-5)  # noqa: E731
    gelu = lambda x: 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))  # noqa: E731
    x = sd["wte.weight"][idx] + sd["wpe.weight"][:T]
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    for i in range(n_layer):
        p = f"h.{i}."
        q, k, v = (ln(x, p + "ln_1") @ sd[p + "attn.c_attn.weight"] + sd[p + "attn.c_attn.bias"]).split(C, -1)
        q, k, v = (t.reshape(1, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v))
        att = (q @ k.transpose(-1, -2) / math.sqrt(C // n_head)).masked_fill(future, float("-inf")).softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(1, T, C)
        x = x + y @ sd[p + "attn.c_proj.weight"] + sd[p + "attn.c_proj.bias"]
        h = gelu(ln(x, p + "ln_2") @ sd[p + "mlp.c_fc.weight"] + sd[p + "mlp.c_fc.bias"])
        x = x + h @ sd[p + "mlp.c_proj.weight"] + sd[p + "mlp.c_proj.bias"]
    return ln(x, "ln_f") @ sd["wte.weight"].T


def write_hf_folder(folder, cfg, sd, fmt):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"model_type": "gpt2", "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
                   "n_positions": cfg.block_size, "n_ctx": cfg.block_size, "vocab_size": cfg.vocab_size}, f)
    if fmt == "safetensors":  # like the Hub's gpt2 file: no "transformer." prefix
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(folder, "model.safetensors"))
    else:  # like GPT2LMHeadModel.save_pretrained: prefixed keys plus the tied lm_head
        prefixed = {"transformer." + k: v for k, v in sd.items()}
        torch.save({**prefixed, "lm_head.weight": sd["wte.weight"]}, os.path.join(folder, "pytorch_model.bin"))


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_from_pretrained_matches_reference_forward(tmp_path, fmt):
    cfg = GPTConfig(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=12)
    sd = hf_state_dict(cfg)
    write_hf_folder(str(tmp_path), cfg, sd, fmt)
    model = GPT.from_pretrained(str(tmp_path)).eval()
    assert model.config == cfg and model.lm_head.weight is model.transformer.wte.weight
    idx = torch.randint(cfg.vocab_size, (1, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], reference_gpt2(sd, cfg.n_layer, cfg.n_head, idx),
                                   atol=1e-5, rtol=1e-5)


def test_from_pretrained_by_name_reads_the_cache_without_downloading(tmp_path):
    cfg = GPTConfig(block_size=16, vocab_size=37, n_layer=1, n_head=2, n_embd=12)
    sd = hf_state_dict(cfg)
    write_hf_folder(str(tmp_path / "gpt2"), cfg, sd, "safetensors")  # what a first download leaves
    model = GPT.from_pretrained("gpt2", cache_dir=str(tmp_path))
    torch.testing.assert_close(model.transformer.wte.weight.detach(), sd["wte.weight"])


def test_from_pretrained_clear_errors(tmp_path):
    cfg = GPTConfig(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=12)
    sd = hf_state_dict(cfg)
    write_hf_folder(str(tmp_path), cfg, sd, "safetensors")
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor pytorch_model.bin"):
        GPT.from_pretrained(str(tmp_path))
    sd["h.1.mlp.c_fc.weight"] = sd["h.1.mlp.c_fc.weight"][:, :-1]  # wrong shape
    write_hf_folder(str(tmp_path), cfg, sd, "safetensors")
    with pytest.raises(ValueError, match="h.1.mlp.c_fc.weight has shape"):
        GPT.from_pretrained(str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        GPT.from_pretrained(str(tmp_path / "empty"))


def test_pick_device_on_cpu(capsys):
    dev = pick_device("cpu", compile=True)
    assert dev.device == "cpu" and dev.dtype == torch.float32 and dev.compile is False
    assert "pick_device: cpu" in capsys.readouterr().out
    with dev.autocast():
        assert not torch.is_autocast_enabled("cpu")  # fp32 on CPU: bf16 autocast measured no faster


# ----------------------------------------------------------------------------- bench.py

def test_bench_runs_through_its_command_line():
    cmd = [sys.executable, os.path.join(REPO, "bench.py"), "--config=tiny", "--device=cpu", "--batch_size=2",
           "--seq_len=8", "--steps=1", "--warmup=0", "--gen_batch=3", "--gen_prompt_len=4", "--gen_tokens=5",
           "--gen_repeats=1", "--hf=false", "--threads=1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for row in ("train ours / reference", "KV-cache speedup", "sample T=1, ours with KV cache (B3, 5 new)"):
        assert row in proc.stdout, proc.stdout
    assert re.search(r"\| cached == recomputed greedy tokens +\| yes", proc.stdout), proc.stdout


def test_bench_hf_reference_holds_our_weights():
    pytest.importorskip("transformers")  # optional, benchmark only: not in requirements.txt
    import bench
    model = tiny_model()
    hf = bench.hf_gpt2(model)
    idx, mask = left_padded_batch([9, 4, 1], TINY.vocab_size)
    with torch.no_grad():
        theirs = hf(input_ids=idx, attention_mask=mask, position_ids=position_ids(mask)).logits
    real = mask.bool()
    torch.testing.assert_close(theirs[real], model(idx, attention_mask=mask)[0][real], atol=1e-5, rtol=1e-5)
