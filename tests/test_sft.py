"""sft.py: the loss mask token by token, right padding, gradients that ignore masked targets, an
all-masked batch, and tiny runs through the command line (the tiny world; four memorised demonstrations)."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import assert_fails_clearly, read_json, run_script
from common import read_jsonl
from data.formats import read_sft
from engine import generate_answers, load_model
from model import GPT, GPTConfig
from sft import build_example, collate, masked_nll_sum, val_loss
from tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_world):
    return get_tokenizer(tiny_world.tok)


# ----------------------------------------------------------------------------- the loss mask by hand

def test_build_example_targets_exactly_the_response_and_end(tok):
    prompt_ids, response_ids = tok.render_chat("what is 3 plus 4?", "7.")
    full = prompt_ids + response_ids  # <|user|> ... <|assistant|> | ' 7' '.' <|end|>  (BPE may split)
    x, y = build_example(tok, "what is 3 plus 4?", "7.")
    assert x == full[:-1] and len(y) == len(x)
    P = len(prompt_ids)
    for t in range(len(x)):
        if t < P - 1:  # positions t = 0 .. P-2 predict prompt tokens: masked
            assert y[t] == -100, t
        else:  # t = P-1 is <|assistant|>, which predicts the first answer token; the last predicts <|end|>
            assert y[t] == full[t + 1], t
    assert x[P - 1] == tok.assistant_id and x[0] == tok.user_id
    assert y[-1] == tok.end_id and tok.end_id not in x
    assert sum(t != -100 for t in y) == len(response_ids)
    assert tok.decode([t for t in y if t != -100]) == " 7.<|end|>"


def test_unended_demonstration_has_no_end_token(tok):
    prompt_ids, response_ids = tok.render_chat("hello!", "hi there")
    x, y = build_example(tok, "hello!", "hi there", ended=False)
    assert tok.end_id not in x and tok.end_id not in y
    assert x == (prompt_ids + response_ids[:-1])[:-1]
    assert [t for t in y if t != -100] == response_ids[:-1]  # the answer is still learned, just never stops


def test_build_example_truncates_to_block_size(tok):
    full_x, full_y = build_example(tok, "which is bigger, 12 or 40?", "40 is bigger than 12.")
    for block in (4, len(full_x) - 1, len(full_x), len(full_x) + 5):
        x, y = build_example(tok, "which is bigger, 12 or 40?", "40 is bigger than 12.", block_size=block)
        assert len(x) == len(y) == min(block, len(full_x))
        assert x == full_x[:len(x)] and y == full_y[:len(y)]


def test_collate_right_pads_with_pad_and_minus_100():
    x, y = collate([([5, 6, 7], [-100, 8, 9]), ([1, 2, 3, 4, 5], [-100, -100, 3, 4, 6])], pad_id=99)
    assert x.tolist() == [[5, 6, 7, 99, 99], [1, 2, 3, 4, 5]]
    assert y.tolist() == [[-100, 8, 9, -100, -100], [-100, -100, 3, 4, 6]]


# ----------------------------------------------------------------------------- gradients

def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=16, vocab_size=40, n_layer=1, n_head=2, n_embd=16))


def sft_grads(model, x, y):
    """The gradient train() takes: masked token sum divided by the number of target tokens."""
    model.zero_grad(set_to_none=True)
    logits, _ = model(x)
    loss_sum, n = masked_nll_sum(logits, y)
    loss = loss_sum / n.clamp(min=1)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def test_masked_targets_have_no_effect_on_the_gradient():
    model = tiny_gpt()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(40, (2, 10), generator=g)
    raw = torch.randint(40, (2, 10), generator=g)  # what the targets would be without a mask
    prompt = torch.arange(10) < 4  # the first 4 targets of each row belong to the prompt
    y = raw.masked_fill(prompt, -100)
    loss, grads = sft_grads(model, x, y)

    # reference: the mean next-token loss over the 12 response positions only, written out by hand
    model.zero_grad(set_to_none=True)
    logp = torch.log_softmax(model(x)[0], dim=-1)  # (B, T, V)
    ref = -logp[:, 4:].gather(-1, raw[:, 4:, None]).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref.detach())
    for k, p in model.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, msg=k)

    # the logits at masked positions get exactly zero gradient
    logits = model(x)[0].detach().requires_grad_(True)
    loss_sum, n = masked_nll_sum(logits, y)
    (loss_sum / n).backward()
    assert n.item() == 12
    assert torch.all(logits.grad[:, :4] == 0) and torch.all(logits.grad[:, 4:].abs().sum(-1) > 0)

    # the mask matters: unmasking the prompt targets, or changing one response target, moves the gradient
    _, unmasked = sft_grads(model, x, raw)
    y2 = y.clone()
    y2[0, 7] = (y2[0, 7] + 1) % 40
    _, changed = sft_grads(model, x, y2)
    for other in (unmasked, changed):
        assert max((other[k] - grads[k]).abs().max().item() for k in grads) > 1e-4


def test_all_masked_batch_gives_zero_loss_and_finite_gradients():
    model = tiny_gpt()
    x = torch.randint(40, (3, 8), generator=torch.Generator().manual_seed(2))
    y = torch.full_like(x, -100)
    loss, grads = sft_grads(model, x, y)
    assert loss.item() == 0.0
    assert all(torch.isfinite(gr).all() and torch.all(gr == 0) for gr in grads.values())
    # what the masked sum avoids: a plain mean over zero targets is 0/0
    assert math.isnan(F.cross_entropy(model(x)[0].view(-1, 40), y.view(-1)).item())
    assert val_loss(model, [(x[0].tolist(), y[0].tolist())], pad_id=0, batch_size=4, device="cpu") == 0.0


# ----------------------------------------------------------------------------- tiny runs

FOUR = [{"prompt": "what is 3 plus 4?", "response": "3 plus 4 is 7."},
        {"prompt": "hello!", "response": "hello! how can i help you today?"},
        {"prompt": "which is bigger, 12 or 40?", "response": "40 is bigger."},
        {"prompt": "how do i make tea?", "response": "steep a tea bag in hot water."}]


def test_tiny_model_memorises_four_demonstrations(tiny_world, pretrain_run, tmp_path):
    data = tmp_path / "four.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in FOUR))
    out = str(tmp_path / "sft4")
    run_script("sft.py", f"--init_from={pretrain_run}/ckpt.pt", f"--train_data={data}", "--val_data=", "--prompts=",
               f"--out_dir={out}", "--epochs=80", "--batch_size=4", "--lr=1e-2", "--min_lr=1e-2",
               "--warmup_steps=0", "--eval_interval=1000")
    rows = read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert len(rows) == 80 and rows[0]["train_loss"] > 2.0
    assert rows[-1]["train_loss"] < 0.05
    # and greedy decoding now answers each prompt with its demonstration, <|end|> included
    model, ckpt = load_model(os.path.join(out, "ckpt.pt"))
    tok = get_tokenizer(ckpt["tokenizer"])
    answers = generate_answers(model, tok, [r["prompt"] for r in FOUR], greedy=True, max_new_tokens=32)
    assert [a[0]["text"] for a in answers] == [r["response"] for r in FOUR]
    assert all(a[0]["ended"] for a in answers), [(a[0]["ids"][-3:], tok.end_id) for a in answers]


def test_tiny_world_run_summary_and_checkpoint(tiny_world, pretrain_run, sft_run):
    s = read_json(os.path.join(sft_run, "summary.json"))
    for name in ("base", "sft"):
        for mode in ("sampled", "greedy"):
            assert 0.0 <= s[f"{name}_{mode}_gold_mean"] <= 1.0
            assert 0.0 <= s[f"{name}_{mode}_pass_rate"] <= 1.0
    assert s["steps"] == 2 * math.ceil(270 / 16)
    rows = read_jsonl(os.path.join(sft_run, "metrics.jsonl"))
    assert len(rows) == s["steps"] and rows[-1]["train_loss"] == s["train_loss"]
    assert rows[-1]["val_loss"] == s["val_loss"] and math.isfinite(s["val_loss"])

    ckpt = torch.load(os.path.join(sft_run, "ckpt.pt"), weights_only=True)
    assert ckpt["tokenizer"] == tiny_world.tok and ckpt["step"] == s["steps"]
    # SFT learned the chat format: the held-out demonstrations' masked loss fell well below the base model's
    tok = get_tokenizer(tiny_world.tok)
    val = [build_example(tok, r["prompt"], r["response"], r.get("ended", True), block_size=96)
           for r in read_sft(tiny_world.sft_val)]
    base, _ = load_model(os.path.join(pretrain_run, "ckpt.pt"))
    sft, _ = load_model(os.path.join(sft_run, "ckpt.pt"))
    base_loss = val_loss(base, val, tok.pad_id, 64, "cpu")
    sft_loss = val_loss(sft, val, tok.pad_id, 64, "cpu")
    assert sft_loss == pytest.approx(s["val_loss"], abs=1e-4)
    assert sft_loss < base_loss - 0.5


def test_bad_command_lines_fail_with_a_clear_message(tmp_path):
    assert_fails_clearly("sft.py", ["--epoch=3"], "--epoch", "valid keys", "epochs")
    missing = str(tmp_path / "no_such_run" / "ckpt.pt")
    assert_fails_clearly("sft.py", [f"--init_from={missing}", f"--out_dir={tmp_path / 'out'}"], missing)
