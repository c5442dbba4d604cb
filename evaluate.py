"""Sampling answers from a policy and scoring them: shared by sft.py, reward.py, ppo.py and pipeline.py.

    python evaluate.py --checkpoint=runs/ppo/ckpt.pt          # gold mean / pass rate on held-out prompts

1. Prompts are rendered with the chat template and LEFT-padded so that every answer starts at the
   same column; the model's position ids come from the attention mask (N implementation details #3).
2. Answers are sampled with the KV cache; an answer "ended" if it produced <|end|> within
   max_new_tokens. The gold judge (data/world.py) sees the text and whether it ended.
3. Comparisons between policies use the same prompts, the same decoding and many samples per
   prompt (one sample on 300 prompts has a standard error of ~0.03; eight have ~0.01).
4. Win rate: each prompt's answers are paired sample by sample; ties count half; a bootstrap over
   prompts gives the 95% confidence interval.
"""
import os
import random
from dataclasses import dataclass

import torch

from data.world import judge

HERE = os.path.dirname(os.path.abspath(__file__))


def left_pad(seqs, pad_id):
    """List of token lists -> (ids (B, T), attention_mask (B, T)) padded on the left."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, T - len(s):] = 1
    return ids, mask


@torch.no_grad()
def generate_answers(model, tok, prompts, n=1, temperature=1.0, greedy=False, max_new_tokens=48,
                     batch_size=256, seed=0, device="cpu", top_k=None, top_p=None):
    """Sample n answers to each prompt. Returns answers[i][j] = {"text", "ended", "ids"}."""
    was_training = model.training
    model.eval()
    jobs = [(i, tok.render_chat(p)[0]) for i, p in enumerate(prompts) for _ in range(1 if greedy else n)]
    jobs.sort(key=lambda job: len(job[1]))  # similar lengths per batch: less padding
    gen = torch.Generator(device=device).manual_seed(seed)
    answers = [[] for _ in prompts]
    for b in range(0, len(jobs), batch_size):
        chunk = jobs[b:b + batch_size]
        ids, mask = left_pad([p for _, p in chunk], tok.pad_id)
        out, out_mask = model.generate(ids.to(device), attention_mask=mask.to(device),
                                       max_new_tokens=max_new_tokens, temperature=temperature,
                                       greedy=greedy, top_k=top_k, top_p=top_p, eos_id=tok.end_id,
                                       pad_id=tok.pad_id, generator=gen)
        for (i, _), row, row_mask in zip(chunk, out.tolist(), out_mask.tolist()):
            real = [t for t, m in zip(row, row_mask) if m]
            ended = bool(real) and real[-1] == tok.end_id
            answers[i].append({"text": tok.decode_response(real), "ended": ended, "ids": real})
    if greedy and n > 1:
        answers = [a * n for a in answers]
    model.train(was_training)
    return answers


def score_answers(records, answers):
    """Gold judge on every answer: (scores[i][j], passes[i][j], facets list)."""
    scores, passes, facets = [], [], []
    for rec, ans in zip(records, answers):
        js = [judge(rec, a["text"], a["ended"]) for a in ans]
        scores.append([j["score"] for j in js])
        passes.append([j["pass"] for j in js])
        facets.extend((rec["task"], j) for j in js)
    return scores, passes, facets


def summarize(records, answers):
    """Gold mean, pass rate, per-facet rates and per-task pass rates of a set of answers."""
    scores, passes, facets = score_answers(records, answers)
    flat_s = [s for row in scores for s in row]
    flat_p = [p for row in passes for p in row]
    n = len(flat_s)
    out = {"gold_mean": sum(flat_s) / n, "pass_rate": sum(flat_p) / n, "n_answers": n}
    for key in ("correct", "format", "rude", "repeated", "too_long", "ended", "refused"):
        out[f"rate_{key}"] = sum(bool(j["facets"][key]) for _, j in facets) / n
    out["rate_filler"] = sum(j["facets"]["filler"] > 0 for _, j in facets) / n
    out["mean_courtesy"] = sum(j["facets"]["courtesy"] for _, j in facets) / n
    out["mean_words"] = sum(j["facets"]["words"] for _, j in facets) / n
    tasks = sorted({t for t, _ in facets})
    out["pass_by_task"] = {t: round(sum(j["pass"] for u, j in facets if u == t) /
                                    max(1, sum(u == t for u, _ in facets)), 4) for t in tasks}
    return out, scores


def win_rate(scores_a, scores_b, n_boot=1000, seed=0):
    """P(a beats b) on the gold judge, ties half; answers paired per prompt; bootstrap over prompts."""
    per_prompt = []
    for sa, sb in zip(scores_a, scores_b):
        wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(sa, sb)]
        per_prompt.append(sum(wins) / len(wins))
    mean = sum(per_prompt) / len(per_prompt)
    rng = random.Random(seed)
    boots = sorted(sum(rng.choice(per_prompt) for _ in per_prompt) / len(per_prompt) for _ in range(n_boot))
    return mean, (boots[int(0.025 * n_boot)], boots[int(0.975 * n_boot) - 1])


def evaluate_policy(model, tok, rows, n_samples=8, temperature=1.0, device="cpu", max_new_tokens=48,
                    seed=0, greedy_too=True):
    """Sampled (n_samples per prompt) and greedy gold metrics on prompt rows {"prompt", "record"};
    the answers and their gold scores are kept under "_sampled_answers"/"_sampled_scores" (and greedy)."""
    prompts, records = [r["prompt"] for r in rows], [r["record"] for r in rows]
    sampled = generate_answers(model, tok, prompts, n=n_samples, temperature=temperature,
                               max_new_tokens=max_new_tokens, seed=seed, device=device)
    result = {}
    result["sampled"], result["_sampled_scores"] = summarize(records, sampled)
    result["_sampled_answers"] = sampled
    if greedy_too:
        greedy = generate_answers(model, tok, prompts, greedy=True, max_new_tokens=max_new_tokens,
                                  device=device)
        result["greedy"], result["_greedy_scores"] = summarize(records, greedy)
        result["_greedy_answers"] = greedy
    return result


@dataclass
class Config:
    checkpoint: str = os.path.join(HERE, "runs", "sft", "ckpt.pt")  # a policy checkpoint (pretrain/sft/ppo)
    prompts: str = os.path.join(HERE, "data", "world", "prompts_eval.jsonl")  # prompts with gold records
    n_samples: int = 8  # samples per prompt at `temperature`
    temperature: float = 1.0
    max_new_tokens: int = 48
    seed: int = 0
    device: str = "auto"


def main():
    from common import load_model, parse_config, print_config
    from data.formats import read_prompts
    from model import pick_device
    from tokenizer import get_tokenizer
    cfg = parse_config(Config)
    print_config(cfg)
    dev = pick_device(cfg.device)
    model, ckpt = load_model(cfg.checkpoint, dev.device)
    tok = get_tokenizer(ckpt.get("tokenizer", "embedded"))
    rows = [r for r in read_prompts(cfg.prompts) if r.get("record")]
    if not rows:
        raise SystemExit(f"error: {cfg.prompts} has no prompts with a gold record to judge")
    res = evaluate_policy(model, tok, rows, cfg.n_samples, cfg.temperature, dev.device, cfg.max_new_tokens, cfg.seed)
    for mode in ("sampled", "greedy"):
        r = res[mode]
        print(f"{mode:8s} gold mean {r['gold_mean']:.3f} | pass rate {r['pass_rate']:.3f} | "
              f"by task {r['pass_by_task']}")


if __name__ == "__main__":
    main()
