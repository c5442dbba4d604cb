"""Plumbing shared by every stage script: configs, run folders, metrics, checkpoints, device, optimizer, DDP.

Each stage script (pretrain.py, sft.py, reward.py, ppo.py) reads top to bottom and calls these few
helpers so that all stages follow the same conventions:

- one flat `@dataclass Config` per script, overridden by `--key=value` on the command line; each
  field declares its valid range next to it (`Annotated[int, at_least(1)]`, `one_of("rm", "gold")`), and
  parse_config checks every field, floats must be finite; an unknown key or a bad value is an error that
  names the valid keys / the option and its range (`error: option --batch_size=0: must be at least 1`);
- defaults that follow the data (`follow_data`): given the user's own main input (a corpus, demonstrations,
  comparisons, prompts), the options that default to the embedded world's files are skipped with a note,
  never read;
- `run_command` is every script's `if __name__ == "__main__":`: a bad option or input file ends the
  run with one line on stderr and exit code 2, before the run has written anything;
- one output folder per run holding `config.json`, `metrics.jsonl` (one JSON object per logged
  step), `summary.json` (final numbers), checkpoints and PNG plots drawn from metrics.jsonl;
- checkpoints are plain dicts written atomically (temp file + rename) and loaded with
  `torch.load(..., weights_only=True)`; each says which stage wrote it ("stage") and whether its run
  finished ("finished"), and `resume_checkpoint` refuses to --resume another stage's or a finished run;
  downloads (GPT-2 weights) are written the same way;
- metrics rows are written before the checkpoint that covers them; a --resume drops the rows after
  its checkpoint, so rows are never duplicated or lost across a kill; NaN and inf are written as null;
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
import typing
import urllib.request
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from data.formats import InputError


# ----------------------------------------------------------------------------- configuration

@dataclass(frozen=True)
class Rule:
    """One condition on a Config field, declared next to it: `batch_size: Annotated[int, at_least(1)] = 32`."""
    holds: object  # (value, world size) -> bool
    says: str  # what a good value is, for the error line: "at least 1"
    infinite_ok: bool = False  # a float field that may be -inf or inf (check_config refuses them otherwise)


def at_least(lo):
    return Rule(lambda v, world: v >= lo, f"at least {lo}")


def above(lo):
    return Rule(lambda v, world: v > lo, f"greater than {lo}")


def at_most(hi):
    return Rule(lambda v, world: v <= hi, f"at most {hi}")


def below(hi):
    return Rule(lambda v, world: v < hi, f"below {hi}")


def folder():
    """A folder to write into: an existing folder, or a path where one can be made (not below a file)."""
    def holds(path, world):
        path = os.path.abspath(path)
        while not os.path.exists(path):
            path = os.path.dirname(path)
        return os.path.isdir(path)
    return Rule(holds, "a folder, or a path where one can be made (this names a file)")


def or_infinite():
    """A float threshold that may also be -inf or inf (a filter that is off at infinity); nan is still refused."""
    return Rule(lambda v, world: True, "a number, -inf or inf", infinite_ok=True)


def one_of(*choices):
    return Rule(lambda v, world: v in choices, f"one of {' | '.join(choices)}")


def per_rank():
    """A global batch that torchrun splits into equal shares, one per process."""
    return Rule(lambda v, world: v % world == 0, "a multiple of the number of processes ({world})")


def _fields(config_cls):
    """{name: (type, [rules])} of a Config: the type and the rules of `Annotated[type, rule, ...]`."""
    out = {}
    for name, hint in typing.get_type_hints(config_cls, include_extras=True).items():
        if typing.get_origin(hint) is typing.Annotated:
            out[name] = (hint.__origin__, list(hint.__metadata__))
        else:
            out[name] = (hint, [])
    return out


def option_error(name, value, says):
    """The one-line error for a bad option: `error: option --batch_size=0: must be at least 1`."""
    return SystemExit(f"error: option --{name}={value}: {says}")


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
            return float(text)  # nan and inf are refused by check_config
        return str(text)
    except ValueError as e:
        raise SystemExit(f"error: option --{name}={text!r}: {e} (expected {kind.__name__})")


def check_config(cfg, world=1):
    """Every field against its declared rules, defaults and overrides alike (world: the number of processes,
    known once torchrun's are up); floats must be finite, except -inf / inf where a field declares
    or_infinite(). Returns cfg."""
    for name, (kind, rules) in _fields(type(cfg)).items():
        value = getattr(cfg, name)
        if kind is float and not math.isfinite(value) and not (math.isinf(value) and any(r.infinite_ok for r in rules)):
            raise option_error(name, value, "must be a finite number")
        if not all(rule.holds(value, world) for rule in rules):
            raise option_error(name, value, "must be " + " and ".join(r.says.format(world=world) for r in rules))
    return cfg


def one_process(script):
    """The number of processes (1) of a script written for one process, or a one-line error under torchrun
    (N copies of it would write the same --out_dir)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SystemExit(f"error: {script} runs in one process: start it with python, not torchrun")
    return 1


def parse_config(config_cls, argv=None):
    """Build `config_cls` from defaults plus `--key=value` overrides (argv defaults to sys.argv[1:]), then
    check every field against its rules (check_config)."""
    argv = sys.argv[1:] if argv is None else argv
    fields = _fields(config_cls)
    overrides = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            if arg.startswith("--") and arg[2:] in fields and fields[arg[2:]][0] is bool:
                overrides[arg[2:]] = True  # a bare `--flag` switches a boolean on
                continue
            raise SystemExit(f"error: argument {arg!r} is not of the form --key=value; "
                             f"valid keys: {', '.join(fields)}")
        key, text = arg[2:].split("=", 1)
        key = key.replace("-", "_")
        if key not in fields:
            raise SystemExit(f"error: unknown option --{key}; valid keys: {', '.join(fields)}")
        overrides[key] = _convert(key, text, fields[key][0])
    return check_config(config_cls(**overrides))


def run_command(main, config_cls, argv=None):
    """What `python <script>.py --key=value ...` runs: main(parse_config(config_cls)). A bad option or input
    (an `error: ...` SystemExit, or a reader's InputError naming the file and line) ends the run with that
    ONE line on stderr and exit code 2, no traceback; tracebacks are left to real bugs. The stages check
    options and read their inputs before they write anything, so such a run leaves --out_dir as it was."""
    try:
        main(parse_config(config_cls, argv))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        print(e.code, file=sys.stderr)
        raise SystemExit(2) from None


# ----------------------------------------------------------------------------- defaults that follow the data

WORLD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "world")  # the embedded world's files
MAIN_INPUT = {"pretrain": "corpus", "sft": "train_data", "reward": "comparisons", "ppo": "prompts"}  # per stage


def follow_data(cfg, main, followers, checkpoints=(), master=True):
    """Defaults that follow the data. With the user's own main input (cfg.<main> is not its default), an option
    of `followers` left at its default (a file of the embedded world in data/world/, or of a run in runs/) is
    never read: it becomes "", and its note is printed as one line (`note: --prompts not given with your own
    --train_data: ...`); followers = {option: what is skipped and how to have it, or None: unused, no note}.
    A checkpoint option left at its default is refused if that checkpoint's run trained on the embedded
    world (world_input). Options the user named are kept: a named file that is missing is an error where it
    is read. With the default main input (the embedded world) cfg comes back as it is."""
    defaults = type(cfg)()
    if getattr(cfg, main) == getattr(defaults, main):
        return cfg
    untouched = [k for k in [*followers, *checkpoints] if getattr(cfg, k) and getattr(cfg, k) == getattr(defaults, k)]
    for k in untouched:
        source = k in checkpoints and os.path.isfile(getattr(cfg, k)) and world_input(load_checkpoint(getattr(cfg, k)))
        if source:
            raise SystemExit(f"error: --{k} not given with your own --{main}: its default {getattr(cfg, k)} was "
                             f"trained on the embedded world ({source}); pass --{k}=<your checkpoint>")
        if k in followers and followers[k] and master:
            print(f"note: --{k} not given with your own --{main}: {followers[k]}")
    return dataclasses.replace(cfg, **{k: "" for k in untouched if k in followers})


def world_input(ckpt):
    """The embedded world's data that a checkpoint's run trained on (its stage's main input in data/world/, or
    comparisons collected in the world), or None."""
    stage = checkpoint_stage(ckpt)
    path = (ckpt.get("config") or {}).get(MAIN_INPUT.get(stage, ""), None)
    if stage == "reward" and path == "":
        return "comparisons sampled and labelled in the embedded world"
    return path if path and os.path.abspath(path).startswith(WORLD + os.sep) else None


def print_config(cfg):
    width = max(len(f.name) for f in dataclasses.fields(cfg))
    print(f"{type(cfg).__module__}.{type(cfg).__name__}:")
    for f in dataclasses.fields(cfg):
        print(f"  {f.name:<{width}} = {getattr(cfg, f.name)!r}")


# ----------------------------------------------------------------------------- run folder, metrics

def json_safe(obj):
    """obj with every NaN or infinity replaced by None: JSON has no such numbers (json.dumps would write
    NaN / Infinity, which other JSON readers reject)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


class Metrics:
    """Appends one JSON object per call to <out_dir>/metrics.jsonl (only on the main process). A fresh run
    starts the file anew. A --resume keeps the rows up to the checkpoint it continues, resumed = (key, value)
    such as ("step", 40), and drops the later ones (logged after that checkpoint by a run that was then
    killed): the resumed run logs them again, so no row is duplicated or lost."""

    def __init__(self, out_dir, resumed=None, enabled=True):
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.enabled = enabled
        if not enabled or not os.path.exists(self.path):
            return
        if resumed is None:
            os.remove(self.path)
            return
        key, last = resumed
        keep = []
        with open(self.path) as f:
            for line in filter(str.strip, f):
                try:
                    if json.loads(line).get(key, 0) > last:
                        break
                except json.JSONDecodeError:  # a row cut short by a kill: the last line, after the checkpoint
                    break
                keep.append(line)
        with open(self.path + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(self.path + ".tmp", self.path)

    def log(self, **row):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(json_safe(row)) + "\n")


def open_run(cfg, master, *notes, resumed=None):
    """Print the resolved config and a line per note (rank 0), then open the run's metrics.jsonl: a
    fresh one, or the one a --resume continues (resumed: see Metrics). The first thing a stage writes,
    called once its options and inputs are checked; it also removes a ckpt.pt.tmp left by a kill."""
    if master:
        print_config(cfg)
        for note in notes:
            print(note)
        os.makedirs(cfg.out_dir, exist_ok=True)
        if os.path.exists(os.path.join(cfg.out_dir, "ckpt.pt.tmp")):
            os.remove(os.path.join(cfg.out_dir, "ckpt.pt.tmp"))
    return Metrics(cfg.out_dir, resumed=resumed if cfg.resume else None, enabled=master)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(json_safe(obj), f, indent=2)
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
    """Write atomically: a crash mid-write leaves the previous checkpoint intact (and a ckpt.pt.tmp that the
    next save overwrites, or the next run's open_run removes)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, map_location="cpu"):
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint {path!r} does not exist (run the stage that writes it "
                         f"first, or pass its path)")
    if os.path.getsize(path) == 0:
        raise SystemExit(f"error: cannot read checkpoint {path!r}: the file is empty (0 bytes)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated file, not a torch file, ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SystemExit(f"error: cannot read checkpoint {path!r}: {reason} (a truncated file, or not a "
                         f"checkpoint of these scripts)")


def checkpoint_stage(ckpt):
    """The stage that wrote a checkpoint: its "stage" key, or in older checkpoints the keys only it writes."""
    if "stage" in ckpt:
        return ckpt["stage"]
    return ("reward" if "reward_model" in ckpt else "ppo" if "critic" in ckpt else "pretrain" if "data_rng" in ckpt
            else "sft" if "base_eval" in ckpt else "unknown")


def resume_checkpoint(path, stage, key, target):
    """The checkpoint a --resume of `stage` continues, or a one-line error: it is missing, another stage wrote
    it, or its run finished (ckpt["finished"]) with ckpt[key] >= target steps already done. A finished run
    with a larger target (more --max_steps / --iterations) continues; target None: a finished run never does."""
    if not os.path.isfile(path):
        raise SystemExit(f"error: --resume: checkpoint {path!r} does not exist (nothing to resume: drop "
                         f"--resume to start a new run, or pass the --out_dir of the run to continue)")
    ckpt = load_checkpoint(path)
    found = checkpoint_stage(ckpt)
    if found != stage:
        raise SystemExit(f"error: --resume: {path!r} is a checkpoint of {found}.py, not of {stage}.py "
                         f"(resume a {stage} run in its own --out_dir)")
    finished = ckpt.get("finished", stage == "reward" and "optimizer" not in ckpt)  # older reward checkpoints
    if finished and (target is None or ckpt[key] >= target):
        raise SystemExit(f"error: --resume: the run in {os.path.dirname(path) or '.'} has finished ({key} "
                         f"{ckpt[key]}), there is nothing to resume; start a new run in another --out_dir")
    return ckpt


def load_state(module, state, path):
    """module.load_state_dict(state) for a --resume, or a one-line error if the checkpoint at `path` holds a
    model of another shape than the current options build."""
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        detail = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), "")[:200]
        raise SystemExit(f"error: --resume: {path!r} holds a model of another shape than these options build "
                         f"({detail}); resume with the options of the run that wrote it") from None


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
    kind, _, index = device.partition(":")
    if device != "auto" and (kind not in ("cpu", "cuda", "mps") or index and not (kind == "cuda" and index.isdigit())):
        raise SystemExit(f"error: option --device={device}: must be auto, cpu, cuda, cuda:N or mps")
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
        raise SystemExit(f"error: option --dtype={dtype}: must be auto, {', '.join(names)}")
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


def token_files(folder, vocab_size, window):
    """pretrain.py's uint16 token files folder/train.bin and folder/val.bin as memmaps, or why they cannot be
    used: missing, shorter than one window of `window` + 2 tokens, or of another tokenizer (token ids of
    vocab_size or more). Returns ([train, val], None) or (None, the reason)."""
    paths = [os.path.join(folder, f) for f in ("train.bin", "val.bin")]
    if not all(os.path.isfile(p) for p in paths):
        return None, f"needs {paths[0]} and {paths[1]} (pretrain.py's out_dir/tokens)"
    if min(os.path.getsize(p) for p in paths) < 2 * (window + 2):  # uint16: 2 bytes a token
        return None, f"needs {window + 2} tokens in each of {paths[0]} and {paths[1]}, for one window"
    if int(np.memmap(paths[1], np.uint16, "r").max()) >= vocab_size:
        return None, (f"needs pretraining tokens of the policy's tokenizer: {paths[1]} holds token ids beyond its "
                      f"vocabulary ({vocab_size}); pass --pretrain_tokens of its tokenizer")
    return [np.memmap(p, np.uint16, "r") for p in paths], None


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
