"""Running our models on chats: batches in, answers, log-probs and reward scores out.

model.py is the Transformer; this module is everything the stages do WITH it, in one place so that
every stage pads, samples, scores and loads the same way:

1. Padding: prompts are LEFT-padded so that every answer starts in the same column (position ids come
   from the attention mask, model.py, N implementation details #3); `pack` puts left-padded prompts
   and right-padded answers side by side, `last_token_index` finds each row's last real token, and
   `sequence_logprobs` gives each answer's log pi(y|x) after its prompt (DPO's).
2. Sampling: `generate_answers` samples n answers per prompt through the chat template with the KV
   cache. An answer stops at the first special token it produces, and it "ended" if that token is
   <|end|> (within max_new_tokens): so the text the judge reads (everything before the first special
   token) and the answer's "ended" always describe the same tokens.
3. Reward models: a GPT trunk plus a scalar head read at the last real token (`RewardModel`), an
   ensemble that averages its members (`RewardEnsemble`), `score_texts` for (prompt, answer, ended)
   triples, and the encoding they all share (`encode_answers`: a sequence too long for the context
   loses the start of the prompt's text, never the chat markers; the answer only if nothing else is left).
   `prompt_too_long` / `answers_too_long` say which inputs cannot fit, for the readers to report at
   load time (data/formats.py).
4. Loading: `load_model` (a policy checkpoint of ours), `load_policy` (ours or GPT-2 weights),
   `load_reward_model` (a reward.py checkpoint; given the policy's tokenizer, it refuses a reward model
   of another tokenizer).

Shapes: B batch, P prompt length (left-padded), N answer length (right-padded), T = P + N, C channels.
"""
import math
import os

import torch
import torch.nn as nn

from common import load_checkpoint
from model import GPT, HF_GPT2_NAMES, CausalSelfAttention, GPTConfig, KVCache, token_logprobs


# ----------------------------------------------------------------------------- padding and masks

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


def pack(prompts, answers, pad_id):
    """Left-padded prompts next to right-padded answers (token lists). Returns seq (B, P + N),
    mask (B, P + N), P, resp (B, N), resp_mask (B, N): the layout a rollout produces."""
    P = max(len(p) for p in prompts)
    N = max(max(len(a) for a in answers), 1)
    pids, pmask = left_pad(prompts, pad_id)
    resp = torch.full((len(answers), N), pad_id, dtype=torch.long)
    rmask = torch.zeros((len(answers), N), dtype=torch.long)
    for i, a in enumerate(answers):
        resp[i, :len(a)], rmask[i, :len(a)] = torch.tensor(a, dtype=torch.long), 1
    return torch.cat([pids, resp], 1), torch.cat([pmask, rmask], 1), P, resp, rmask


def set_dropout(module, p):
    """Every dropout of every GPT inside `module` (a policy, a reward model, an ensemble) set to p: the
    nn.Dropout layers, the attention dropout (a float handed to SDPA) and the config that checkpoints save."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        elif isinstance(m, CausalSelfAttention):
            m.dropout = p
        elif isinstance(m, GPT):
            m.config.dropout = p
    return module


def last_token_index(attention_mask):
    """Index of the last real token of each row, for left or right padding. (B, T) -> (B,)"""
    T = attention_mask.size(1)
    return T - 1 - attention_mask.flip(1).argmax(dim=1)


def last_token_score(values, attention_mask):
    return values.gather(1, last_token_index(attention_mask)[:, None]).squeeze(1)  # (B,)


def sequence_logprobs(model, prompts, answers, pad_id, device):
    """log pi(y|x) = sum over the answer's tokens of log pi(y_t | x, y_<t) for token-id lists: (S,)."""
    seq, mask, P, resp, rmask = pack(prompts, answers, pad_id)
    logits = model(seq.to(device), attention_mask=mask.to(device))[0][:, P - 1:-1]  # (S, N, V)
    return (token_logprobs(logits, resp.to(device)) * rmask.to(device)).sum(1)


# ----------------------------------------------------------------------------- sampling

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
                                       greedy=greedy, top_k=top_k, top_p=top_p, eos_id=tok.special_ids,
                                       pad_id=tok.pad_id, generator=gen)
        for (i, _), row, row_mask in zip(chunk, out.tolist(), out_mask.tolist()):
            real = [t for t, m in zip(row, row_mask) if m]
            ended = bool(real) and real[-1] == tok.end_id
            answers[i].append({"text": tok.decode_response(real), "ended": ended, "ids": real})
    if greedy and n > 1:
        answers = [a * n for a in answers]
    model.train(was_training)
    return answers


# ----------------------------------------------------------------------------- reward models

class RewardModel(nn.Module):
    """A GPT trunk plus a scalar head. `forward` reads the head at the last real token; `values`
    reads it at every position (the PPO critic is initialised from this model)."""

    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt
        self.head = nn.Linear(gpt.config.n_embd, 1)
        nn.init.normal_(self.head.weight, std=1 / math.sqrt(gpt.config.n_embd + 1))
        nn.init.zeros_(self.head.bias)

    def values(self, idx, attention_mask):
        return self.head(self.gpt.hidden_states(idx, attention_mask)).squeeze(-1)  # (B, T)

    def forward(self, idx, attention_mask, answers=None):
        """Score at the last real token of each row of idx (B, T). With answers = (owner, ids, mask) from
        pack_answers, idx holds each PROMPT once and the scores are those of the answers (S,): every answer
        attends to its prompt's keys and values, computed once for all its K answers (the same numbers
        as scoring each prompt + answer on its own, for a fraction of the compute)."""
        if answers is None:
            return last_token_score(self.values(idx, attention_mask), attention_mask)  # (B,)
        owner, ids, mask = answers
        prompts = KVCache(attention_mask)
        self.gpt._run(idx, cache=prompts)  # the prompts' keys and values: (2, B, H, P, D) per layer
        cache = KVCache(torch.cat([attention_mask[owner], mask], 1))  # (S, P + N): each answer after its prompt
        cache.kv = [torch.cat([kv[:, owner], kv.new_zeros(*kv.shape[:1], len(owner), kv.size(2), mask.size(1),
                                                          kv.size(4))], 3) for kv in prompts.kv]  # (2, S, H, P + N, D)
        cache.filled = attention_mask.size(1)
        h = self.gpt._run(ids, cache=cache)[0]  # (S, N, C)
        return last_token_score(self.head(h).squeeze(-1), mask)  # (S,)


class RewardEnsemble(nn.Module):
    """Several reward models trained on the same comparisons from different seeds; the reward is their
    mean score. Their errors are partly independent, so the mean is more accurate and PPO finds less to
    exploit (Coste et al. 2023, "Reward Model Ensembles Help Mitigate Overoptimization")."""

    def __init__(self, members):
        super().__init__()
        self.members = nn.ModuleList(members)

    @property
    def gpt(self):  # the members share one architecture: block size, vocabulary
        return self.members[0].gpt

    def values(self, idx, attention_mask):
        return torch.stack([m.values(idx, attention_mask) for m in self.members]).mean(0)

    def member_scores(self, idx, attention_mask, answers=None):
        return torch.stack([m(idx, attention_mask, answers) for m in self.members])  # (E, B)

    def forward(self, idx, attention_mask, answers=None):
        return self.member_scores(idx, attention_mask, answers).mean(0)


def encode_answers(tok, prompt, responses, endeds, block_size):
    """Token ids of prompt + answer (+ <|end|> if the answer ended) for each answer (endeds None: all ended).
    A sequence longer than block_size loses the start of the prompt's text, keeping at least one of its
    tokens, and never its <|user|> and <|assistant|> markers; only an answer longer than all the rest of
    the context loses its own start (the score is read at its last token). reward.py refuses comparisons
    whose answers do not fit whole (answers_too_long)."""
    prompt_ids = tok.render_chat(prompt)[0]  # <|user|> text <|assistant|>
    seqs = []
    for r, e in zip(responses, endeds or [True] * len(responses)):
        answer = tok.render_chat(prompt, r)[1][:None if e else -1]
        if len(prompt_ids) + len(answer) <= block_size:
            seqs.append(prompt_ids + answer)
        else:
            answer = answer[-(block_size - 3):]  # at most what fits beside the markers and one prompt token
            text = prompt_ids[1:-1][-(block_size - 2 - len(answer)):]
            seqs.append(prompt_ids[:1] + text + prompt_ids[-1:] + answer)
    return seqs


def pack_answers(tok, prompts, responses, endeds, block_size):
    """Comparisons packed for RewardModel.forward(..., answers=...): prompts[i] with its K_i answers
    responses[i] (texts) and endeds[i]. The prompt part is the chat prompt without its final <|assistant|>
    token, which starts every answer part instead (so no answer part is empty). Returns (prompt ids
    (B, P), prompt mask, (owner (S,), answer ids (S, N), answer mask)) with S = sum K_i answers, answers
    right-padded; None when a prompt + answer would not fit in block_size (score them unpacked then)."""
    prompt_ids, owner, answers = [], [], []
    for i, (p, rs, es) in enumerate(zip(prompts, responses, endeds)):
        ids = tok.render_chat(p)[0]
        prompt_ids.append(ids[:-1])
        for r, e in zip(rs, es):
            answers.append(ids[-1:] + tok.render_chat(p, r)[1][:None if e else -1])
            owner.append(i)
            if len(ids) + len(answers[-1]) - 1 > block_size:
                return None
    pids, pmask = left_pad(prompt_ids, tok.pad_id)
    N = max(len(a) for a in answers)
    aids = torch.full((len(answers), N), tok.pad_id, dtype=torch.long)
    amask = torch.zeros((len(answers), N), dtype=torch.long)
    for j, a in enumerate(answers):
        aids[j, :len(a)], amask[j, :len(a)] = torch.tensor(a, dtype=torch.long), 1
    return pids, pmask, (torch.tensor(owner), aids, amask)


def answers_too_long(tok, prompt, responses, endeds, block_size):
    """Why a reward model with this context cannot score one of the answers (it leaves no room for one
    prompt token beside the chat markers), or None. The prompt may be any length (encode_answers crops it)."""
    for r, e in zip(responses, endeds or [True] * len(responses)):
        n = len(tok.render_chat(prompt, r)[1]) - (0 if e else 1)
        if n + 3 > block_size:
            return f"an answer of {n} tokens does not fit the reward model's context of {block_size} tokens"
    return None


def prompt_too_long(tok, prompt, max_new_tokens, block_size):
    """Why the model cannot answer this prompt (its chat tokens + max_new_tokens exceed the context), or None."""
    n = len(tok.render_chat(prompt)[0])
    if n + max_new_tokens > block_size:
        return (f"a prompt of {n} tokens plus --max_new_tokens={max_new_tokens} does not fit the model's "
                f"context of {block_size} tokens")
    return None


@torch.no_grad()
def score_texts(rm, tok, prompts, responses, endeds, device, batch_size=128):
    """Reward of each (prompt, response) pair, batched, left-padded."""
    rm.eval()
    seqs = [encode_answers(tok, p, [r], [e], rm.gpt.config.block_size)[0]
            for p, r, e in zip(prompts, responses, endeds)]
    out = []
    for b in range(0, len(seqs), batch_size):
        ids, mask = left_pad(seqs[b:b + batch_size], tok.pad_id)
        out.extend(rm(ids.to(device), mask.to(device)).float().tolist())
    return out


# ----------------------------------------------------------------------------- loading checkpoints

def load_model(path, device="cpu"):
    """A GPT from a pretrain/sft/ppo checkpoint (dict with "model" and "model_config")."""
    ckpt = load_checkpoint(path)
    if "model" not in ckpt or "model_config" not in ckpt:
        raise SystemExit(f"error: {path!r} is not a policy checkpoint (no 'model'/'model_config' keys)")
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device), ckpt


def load_gpt2(name_or_path):
    """GPT.from_pretrained, with a folder that is not a GPT-2 checkpoint or a failed download as a one-line error."""
    try:
        return GPT.from_pretrained(name_or_path)
    except (OSError, ValueError, RuntimeError) as e:
        raise SystemExit(f"error: cannot load GPT-2 weights {name_or_path!r}: {str(e).splitlines()[0]}") from None


def load_policy(init_from, device="cpu"):
    """(model, tokenizer name) from GPT-2 weights (a name such as gpt2, or a Hugging Face folder) or
    from one of our checkpoints."""
    if init_from in HF_GPT2_NAMES or os.path.isdir(init_from):
        return load_gpt2(init_from).to(device), "gpt2"
    model, ckpt = load_model(init_from, device)
    return model, ckpt.get("tokenizer", "embedded")


def same_tokenizer(a, b):
    """Whether two tokenizer names (as checkpoints store them) name the same tokenizer."""
    return a == b or (os.path.isfile(a) and os.path.isfile(b) and os.path.samefile(a, b))


def load_reward_model(path, device="cpu", tok=None, normalized=False):
    """A RewardModel (or a RewardEnsemble) from a reward.py checkpoint (normalisation folded into the heads).
    With tok (the policy's tokenizer), a reward model that reads another tokenizer's ids is an error:
    its scores of this policy's tokens would be meaningless. normalized: a checkpoint that reward.py has not
    normalised yet (one written during training) is an error: PPO's scores would have no scale."""
    ckpt = load_checkpoint(path)
    if "reward_model" not in ckpt:
        raise SystemExit(f"error: {path!r} is not a reward model checkpoint (no 'reward_model' key)")
    if normalized and "normalization" not in ckpt:
        raise SystemExit(f"error: reward model {path!r} is not normalised (reward.py writes the normalisation "
                         f"when its run finishes; this checkpoint was written during training): finish that run "
                         f"with --resume, or train one to the end")
    if tok is not None and not same_tokenizer(ckpt.get("tokenizer", "embedded"), tok.name):
        raise SystemExit(f"error: reward model {path!r} uses tokenizer {ckpt.get('tokenizer', 'embedded')!r}, "
                         f"the policy uses {tok.name!r}: use a reward model trained from this policy's SFT model")
    members = [RewardModel(GPT(GPTConfig(**ckpt["model_config"]))) for _ in range(ckpt.get("ensemble", 1))]
    rm = members[0] if len(members) == 1 else RewardEnsemble(members)
    rm.load_state_dict(ckpt["reward_model"])
    return rm.to(device), ckpt
