"""Plumbing shared by every stage script: configs, run folders, metrics, checkpoints, device, optimizer, DDP.

Each stage script (pretrain.py, sft.py, reward.py, ppo.py) reads top to bottom and calls these few
helpers so that all stages follow the same conventions:

- one flat `@dataclass Config` per script, overridden by `--key=value` on the command line;
  an unknown key or a bad value is an error that names the valid keys / the option;
- one output folder per run holding `config.json`, `metrics.jsonl` (one JSON object per logged
  step), `summary.json` (final numbers), checkpoints and PNG plots drawn from metrics.jsonl;
- checkpoints are plain dicts written atomically (temp file + rename) and loaded with
  `torch.load(..., weights_only=True)`; downloads (GPT-2 weights) are cached the same way;
- one helper picks the device and dtype and says why (`pick_device`);
- one optimizer and one learning-rate schedule for every stage (AdamW, warmup then cosine);
- under `torchrun`, DistributedDataParallel with one process per device; rank 0 logs and saves;
  statistics cross ranks as named dicts (`reduce_stats`).
"""
import contextlib
import dataclasses
import datetime
import json
import math
import os
import random
import shutil
import sys
import urllib.request
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


# ----------------------------------------------------------------------------- configuration

def _convert(name, text, kind):
    """Turn the text of `--name=text` into a value of the field's type, or explain the problem."""
    try:
        if kind is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true or false")
        if kind is int:
            return int(text)
        if kind is float:
            value = float(text)
            if math.isnan(value):
                raise ValueError("nan is not allowed")
            return value
        return str(text)
    except ValueError as e:
        raise SystemExit(f"error: option --{name}={text!r}: {e} (expected {kind.__name__})")


def parse_config(config_cls, argv=None):
    """Build `config_cls` from defaults plus `--key=value` overrides (argv defaults to sys.argv[1:])."""
    argv = sys.argv[1:] if argv is None else argv
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    overrides = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            if arg.startswith("--") and arg[2:] in fields and fields[arg[2:]].type is bool:
                overrides[arg[2:]] = True  # a bare `--flag` switches a boolean on
                continue
            raise SystemExit(f"error: argument {arg!r} is not of the form --key=value; "
                             f"valid keys: {', '.join(fields)}")
        key, text = arg[2:].split("=", 1)
        key = key.replace("-", "_")
        if key not in fields:
            raise SystemExit(f"error: unknown option --{key}; valid keys: {', '.join(fields)}")
        overrides[key] = _convert(key, text, fields[key].type)
    return config_cls(**overrides)


def print_config(cfg):
    width = max(len(f.name) for f in dataclasses.fields(cfg))
    print(f"{type(cfg).__module__}.{type(cfg).__name__}:")
    for f in dataclasses.fields(cfg):
        print(f"  {f.name:<{width}} = {getattr(cfg, f.name)!r}")


# ----------------------------------------------------------------------------- run folder, metrics

class Metrics:
    """Appends one JSON object per call to <out_dir>/metrics.jsonl (only on the main process)."""

    def __init__(self, out_dir, resume=False, enabled=True):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.enabled = enabled
        if enabled and not resume and os.path.exists(self.path):
            os.remove(self.path)

    def log(self, **row):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def open_run(cfg, master, *notes):
    """Print the resolved config and a line per note (rank 0), then open the run's metrics.jsonl: a
    fresh one, or the one a --resume continues."""
    if master:
        print_config(cfg)
        for note in notes:
            print(note)
    return Metrics(cfg.out_dir, resume=cfg.resume, enabled=master)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def pyplot():
    """matplotlib.pyplot, with the file-only Agg backend unless pyplot is already in use (a notebook's
    inline backend must survive a script's plotting)."""
    if "matplotlib.pyplot" not in sys.modules:
        import matplotlib
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_metrics(metrics_path, png_path, keys, x="step", title=None):
    """Draw one small panel per metric in `keys` from a metrics.jsonl file into a PNG."""
    plt = pyplot()
    rows = read_jsonl(metrics_path)
    keys = [k for k in keys if any(k in r for r in rows)]
    if not keys:
        return None
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r[x], r[key]) for r in rows if key in r and x in r and r[key] is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if len(pts) < 40 else None)
        ax.set_title(key)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
    return png_path


def plot_calibration(calib, path, bins=10):
    """Reliability diagram of a reward model: calib = [(predicted P(A preferred), 1.0 if A was preferred)]."""
    plt = pyplot()
    xs, ys, ns = [], [], []
    for k in range(bins):
        pts = [(p, y) for p, y in calib if k / bins <= p < (k + 1) / bins or (k == bins - 1 and p == 1)]
        if pts:
            xs.append(sum(p for p, _ in pts) / len(pts))
            ys.append(sum(y for _, y in pts) / len(pts))
            ns.append(len(pts))
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.plot(xs, ys, "o-", label="reward model")
    ax.set_xlabel("predicted P(labeler prefers A) = sigmoid(r_A - r_B)")
    ax.set_ylabel("fraction the labeler preferred A")
    ax.set_title("reward model calibration (held out)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)

# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(path, ckpt):
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint {path!r} does not exist (run the stage that writes it "
                         f"first, or pass its path)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, not a torch file, ...
        raise SystemExit(f"error: cannot read checkpoint {path!r}: {e}")


def download(url, path):
    """Fetch url into path unless path exists (the cache); a partial download never looks complete."""
    if os.path.isfile(path):
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    print(f"downloading {url} -> {path}")
    try:
        with urllib.request.urlopen(url) as response, open(path + ".tmp", "wb") as f:
            shutil.copyfileobj(response, f)
    except OSError as e:
        raise RuntimeError(f"could not download {url} ({e}); put the file in {os.path.dirname(path)} "
                           f"by hand or pass a local folder") from e
    os.replace(path + ".tmp", path)


def download_from_hub(repo, files, cache_dir=None):
    """Files of a Hugging Face Hub repo (e.g. gpt2), downloaded once into {cache_dir}/{repo}
    (~/.cache/rlhf-from-scratch/{repo} by default). Returns that folder."""
    folder = os.path.join(cache_dir or os.path.expanduser("~/.cache/rlhf-from-scratch"), repo)
    for file in files:
        download(f"https://huggingface.co/{repo}/resolve/main/{file}", os.path.join(folder, file))
    return folder


def rng_state():
    """Everything random in our loops comes from these two generators: save both for --resume."""
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))


def set_seed(seed):
    random.seed(seed)
    torch.manual_seed(seed)


def config_dict(cfg):
    return dataclasses.asdict(cfg)


# ----------------------------------------------------------------------------- device and dtype

@dataclass
class Device:
    device: str         # "cuda", "cuda:1", "mps" or "cpu"
    dtype: torch.dtype  # torch.float32 or the autocast dtype (torch.bfloat16)
    compile: bool       # whether to torch.compile the training model

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.split(":")[0], dtype=self.dtype)


def pick_device(device="auto", dtype="auto", compile=False):
    """cuda > mps > cpu; bf16 autocast only on a GPU that supports it; TF32 matmuls on CUDA;
    torch.compile only on CUDA. Prints one line saying what it chose and why."""
    why = "asked for"
    if device == "auto":
        device, why = (("cuda", "CUDA available") if torch.cuda.is_available() else
                       ("mps", "Apple MPS, no CUDA") if torch.backends.mps.is_available() else ("cpu", "no CUDA or MPS"))
    kind = device.split(":")[0]
    if (kind == "cuda" and not torch.cuda.is_available()) or (kind == "mps" and not torch.backends.mps.is_available()):
        raise SystemExit(f"error: device {device!r} asked for but it is not available here")
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype == "auto" and kind == "cuda" and torch.cuda.is_bf16_supported():
        dt, dwhy = torch.bfloat16, "bf16 autocast, supported by this GPU"
    elif dtype == "auto":
        dt, dwhy = torch.float32, {"cpu": "fp32, bf16 autocast measured no faster on CPU",
                                   "mps": "fp32, bf16 autocast not relied on for MPS",
                                   "cuda": "fp32, GPU lacks bf16 (fp16 would need a loss scaler)"}[kind]
    elif dtype in names:
        dt, dwhy = names[dtype], f"{dtype} asked for"
    else:
        raise SystemExit(f"error: dtype {dtype!r}: expected auto, {', '.join(names)}")
    if kind == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls left outside autocast
        torch.backends.cudnn.allow_tf32 = True
        dwhy += ", TF32 matmuls on"
    use_compile = bool(compile) and kind == "cuda"
    print(f"pick_device: {device} ({why}); {dwhy}; torch.compile "
          f"{'on' if use_compile else 'off (only used on CUDA)' if compile else 'off'}")
    return Device(device=device, dtype=dt, compile=use_compile)


# ----------------------------------------------------------------------------- optimizer, schedule, token batches

def make_optimizer(model, lr, weight_decay, device_type="cpu"):
    """AdamW with decay on matrices (2-D) only, not on biases and LayerNorm gains (nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device_type == "cuda")


def lr_at(step, lr, min_lr, warmup_steps, max_steps):
    """Linear warmup, then cosine decay from lr to min_lr over the remaining steps (0-based step)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        group["lr"] = lr


def get_batch(data, batch_size, block_size, generator):
    """Random windows of a token array: x = tokens[i : i+T], y = tokens[i+1 : i+T+1]."""
    ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator)
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix.tolist()])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix.tolist()])
    return x, y  # (B, T), (B, T)


# ----------------------------------------------------------------------------- distributed (torchrun)

def ddp_setup(device="auto"):
    """Returns (rank, world_size). Under torchrun, starts the process group: NCCL when the run uses
    CUDA, gloo on CPU. CPU ranks get an equal share of the cores (one thread each on 2 cores): N
    processes with torch's default thread count each oversubscribe the machine (2 x 2 threads on
    2 cores run ~3x slower: docs/EXPERIMENTS.md). An explicit --threads set after this call still wins."""
    if "RANK" not in os.environ:
        return 0, 1
    cuda = torch.cuda.is_available() and device.split(":")[0] in ("auto", "cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))  # before NCCL starts (one GPU per rank)
    else:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        torch.set_num_threads(max(1, cores // local_world))
    # rank 0 alone runs the final evaluations while the others wait at ddp_cleanup's barrier:
    # allow that an hour instead of NCCL's default 10 minutes
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=60))
    return dist.get_rank(), dist.get_world_size()


def ddp_barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def ddp_cleanup():
    if dist.is_available() and dist.is_initialized():
        ddp_barrier()  # without it, ~15% of gloo runs abort at exit (docs/EXPERIMENTS.md)
        dist.destroy_process_group()


@contextlib.contextmanager
def rank0_first():
    """Rank 0 runs the block first (downloads, tokenises, writes caches); the other ranks wait, then
    run it and find the files complete. A no-op in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        yield
        return
    if dist.get_rank() != 0:
        dist.barrier()
    yield
    if dist.get_rank() == 0:
        dist.barrier()


def ddp_wrap(model, world):
    """DistributedDataParallel around `model` under torchrun, the model itself in a single process."""
    return torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model


def all_reduce_sum(x):
    """Sum a tensor over ranks (no-op in a single process). Returns the tensor."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_mean(x):
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= dist.get_world_size()
    return x


def reduce_stats(stats, op="sum", device="cpu"):
    """A dict of numbers summed (or averaged, op="mean") over ranks in one all-reduce; the values
    travel as one float32 tensor, so a single process gets them back rounded to float32 too."""
    keys = list(stats)  # every rank must send the same keys in the same order
    t = torch.tensor([float(stats[k]) for k in keys], device=device)
    t = all_reduce_mean(t) if op == "mean" else all_reduce_sum(t)
    return dict(zip(keys, t.tolist()))


def all_gather_object(obj):
    """[obj of rank 0, obj of rank 1, ...] (picklable objects); [obj] in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
