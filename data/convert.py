"""Convert public datasets into the pipeline's file formats (see data/formats.py).

    python -m data.convert tinystories                    # data/public/tinystories/corpus.txt      (pretrain)
    python -m data.convert alpaca --limit=5000            # data/public/alpaca/sft.jsonl           (SFT)
    python -m data.convert dolly                          # data/public/dolly/sft.jsonl            (SFT)
    python -m data.convert hh --limit=20000               # data/public/hh/comparisons.jsonl       (reward model)
                                                          #   and data/public/hh/prompts.jsonl     (PPO)
    options: --out=DIR (default data/public/<dataset>), --limit=N, --split=..., --subsets=... (hh)

The raw files are plain JSON / JSONL / text fetched with urllib (no `datasets` library, no parquet)
and cached in OUT/raw/: a second run, or a file you put there by hand, needs no network.

Sources:
- TinyStories (Eldan & Li 2023): short stories in the vocabulary of a 3-4 year old, written by
  GPT-4 (the V2 files), one per block and separated by "<|endoftext|>" lines. valid is 22 MB,
  train 2.2 GB.
- Alpaca (Taori et al. 2023): 52k {"instruction", "input", "output"} records generated with
  self-instruct from text-davinci-003, as one JSON list.
- Dolly 15k (Conover et al. 2023): 15k {"instruction", "context", "response", "category"} records
  written by Databricks employees, as JSONL.
- Anthropic HH-RLHF (Bai et al. 2022): pairs of full transcripts "\\n\\nHuman: ...\\n\\nAssistant: ..."
  that share every turn but the last Assistant reply; "chosen" was preferred by the crowdworker.
  helpful-base + harmless-base train is about 86k pairs, as gzipped JSONL.

Implementation details:
1. Each conversion is a pure function of the raw rows (tested offline on hand-written samples of the
   real formats); only `download` touches the network.
2. SFT prompt = instruction, then a blank line and the Alpaca "input" / Dolly "context" when there is
   one. We do not use Alpaca's "### Instruction: ... ### Response:" template: the chat template of
   tokenizer.render_chat already marks who speaks.
3. HH: the prompt is everything before the last "\\n\\nAssistant:", the responses are the two final
   replies. A single-turn prompt loses its "Human:" label (it then reads like an Alpaca prompt); a
   multi-turn prompt keeps the transcript text, so earlier turns stay readable. Pairs are skipped when
   the two prompts differ, a response is empty, the responses are identical (nothing to learn), or
   there is no Assistant turn.
4. TinyStories: blank lines inside a story are removed, so that in corpus.txt a blank line always
   means "next document".
Simplifications: no deduplication, no length or quality filtering, no train/validation split (the
stage scripts hold out their own). HH transcripts are far longer than the embedded model's 128-token
context: use them with a GPT-2 preset.
"""
import argparse
import gzip
import json
import os
import urllib.error
import urllib.request

from data.formats import read_comparisons, read_corpus, read_prompts, read_sft, write_corpus, write_jsonl

TINYSTORIES_URL = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-{split}.txt"
ALPACA_URL = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"
DOLLY_URL = "https://huggingface.co/datasets/databricks/databricks-dolly-15k/resolve/main/databricks-dolly-15k.jsonl"
HH_URL = "https://huggingface.co/datasets/Anthropic/hh-rlhf/resolve/main/{subset}/{split}.jsonl.gz"
HH_SUBSETS = ["harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled"]
SPLITS = {"tinystories": ["valid", "train"], "hh": ["train", "test"]}  # first = default
END_OF_STORY = "<|endoftext|>"
HH_ASSISTANT = "\n\nAssistant:"


# ----------------------------------------------------------------------------- pure conversions

def tinystories_to_corpus(text, limit=None):
    """TinyStories text -> corpus text: one story per document, documents separated by a blank line."""
    stories = []
    for block in text.split(END_OF_STORY):
        lines = [line.strip() for line in block.splitlines() if line.strip()]
        if lines:
            stories.append("\n".join(lines))
        if limit is not None and len(stories) >= limit:
            break
    return "\n\n".join(stories) + "\n"


def join_prompt(instruction, extra):
    """Instruction, then a blank line and the extra input / context if there is one."""
    instruction, extra = instruction.strip(), (extra or "").strip()
    return f"{instruction}\n\n{extra}" if extra else instruction


def alpaca_to_sft(rows):
    """Alpaca records {"instruction", "input", "output"} -> SFT rows (records with an empty side dropped)."""
    out = []
    for row in rows:
        prompt, response = join_prompt(row["instruction"], row.get("input")), row["output"].strip()
        if prompt and response:
            out.append({"prompt": prompt, "response": response})
    return out


def dolly_to_sft(rows):
    """Dolly records {"instruction", "context", "response", "category"} -> SFT rows, category kept."""
    out = []
    for row in rows:
        prompt, response = join_prompt(row["instruction"], row.get("context")), row["response"].strip()
        if prompt and response:
            out.append({"prompt": prompt, "response": response, "category": row.get("category")})
    return out


def split_hh(transcript):
    """HH transcript -> (prompt, final Assistant reply), or (None, None) without an Assistant turn."""
    i = transcript.rfind(HH_ASSISTANT)
    if i < 0:
        return None, None
    prompt, response = transcript[:i].strip(), transcript[i + len(HH_ASSISTANT):].strip()
    if HH_ASSISTANT not in prompt and prompt.startswith("Human:"):
        prompt = prompt[len("Human:"):].strip()  # single turn: the chat template marks the user already
    return prompt, response


def hh_to_comparisons(lines):
    """HH-RLHF JSONL lines (or parsed dicts) {"chosen", "rejected"} -> comparison rows."""
    out = []
    for line in lines:
        if isinstance(line, str) and not line.strip():
            continue
        row = json.loads(line) if isinstance(line, (str, bytes)) else line
        prompt, chosen = split_hh(row["chosen"])
        rejected_prompt, rejected = split_hh(row["rejected"])
        if not prompt or prompt != rejected_prompt or not chosen or not rejected or chosen == rejected:
            continue
        out.append({"prompt": prompt, "responses": [chosen, rejected], "ranking": [0, 1]})
    return out


# ----------------------------------------------------------------------------- download + command line

def download(url, path):
    """Fetch url into path unless path already exists (the cache). Returns path."""
    if os.path.exists(path):
        return path
    from tqdm import tqdm
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    print(f"downloading {url} -> {path}")
    tmp = f"{path}.tmp"
    request = urllib.request.Request(url, headers={"User-Agent": "rlhf-from-scratch"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response, open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(path)) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        os.replace(tmp, path)  # only a complete file may count as the cache
    except urllib.error.URLError as e:
        raise SystemExit(f"error: could not download {url}: {e}\n"
                         f"(no internet? download it elsewhere and put it at {path})")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def convert(dataset, out, limit=None, split=None, subsets=("helpful-base", "harmless-base")):
    """Download (cached) and convert one dataset into `out`; returns {file name: number of rows}."""
    raw = os.path.join(out, "raw")
    if dataset == "tinystories":
        path = download(TINYSTORIES_URL.format(split=split), os.path.join(raw, f"TinyStoriesV2-GPT4-{split}.txt"))
        with open(path, encoding="utf-8") as f:
            write_corpus(os.path.join(out, "corpus.txt"), tinystories_to_corpus(f.read(), limit))
        return {"corpus.txt": read_corpus(os.path.join(out, "corpus.txt")).count("\n\n") + 1}
    if dataset in ("alpaca", "dolly"):
        if dataset == "alpaca":
            with open(download(ALPACA_URL, os.path.join(raw, "alpaca_data.json")), encoding="utf-8") as f:
                rows = alpaca_to_sft(json.load(f))
        else:
            with open(download(DOLLY_URL, os.path.join(raw, "databricks-dolly-15k.jsonl")), encoding="utf-8") as f:
                rows = dolly_to_sft(json.loads(line) for line in f if line.strip())
        write_jsonl(os.path.join(out, "sft.jsonl"), rows[:limit])
        return {"sft.jsonl": len(read_sft(os.path.join(out, "sft.jsonl")))}
    rows = []
    for subset in subsets:
        path = download(HH_URL.format(subset=subset, split=split), os.path.join(raw, f"hh-{subset}-{split}.jsonl.gz"))
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.readlines()
        kept = hh_to_comparisons(lines)
        print(f"{subset}/{split}: {len(kept)} of {len(lines)} pairs kept")
        rows += kept[:limit]  # --limit is per subset, so a small run still mixes helpful and harmless
    write_jsonl(os.path.join(out, "comparisons.jsonl"), rows)
    write_jsonl(os.path.join(out, "prompts.jsonl"), [{"prompt": p} for p in dict.fromkeys(r["prompt"] for r in rows)])
    return {"comparisons.jsonl": len(read_comparisons(os.path.join(out, "comparisons.jsonl"))),
            "prompts.jsonl": len(read_prompts(os.path.join(out, "prompts.jsonl")))}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m data.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=["tinystories", "alpaca", "dolly", "hh"])
    parser.add_argument("--out", help="output folder; raw downloads are cached in OUT/raw (default data/public/DATASET)")
    parser.add_argument("--limit", type=int, help="keep only the first N stories / examples (hh: N per subset)")
    parser.add_argument("--split", help="tinystories: valid (default, 22 MB) or train (2.2 GB); hh: train (default) or test")
    parser.add_argument("--subsets", default="helpful-base,harmless-base",
                        help=f"hh only, comma-separated from {','.join(HH_SUBSETS)}")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit={args.limit}: must be a positive number of examples")
    choices = SPLITS.get(args.dataset, [])
    if args.split is not None and args.split not in choices:
        parser.error(f"--split={args.split}: {args.dataset} has splits {choices or 'none (one file)'}")
    subsets = [s for s in args.subsets.split(",") if s]
    if args.dataset == "hh" and (not subsets or any(s not in HH_SUBSETS for s in subsets)):
        parser.error(f"--subsets={args.subsets}: choose from {','.join(HH_SUBSETS)}")
    out = args.out or os.path.join("data", "public", args.dataset)
    counts = convert(args.dataset, out, args.limit, args.split or (choices[0] if choices else None), subsets)
    for name, n in counts.items():
        print(f"wrote {os.path.join(out, name)}: {n} {'documents' if name.endswith('.txt') else 'rows'}")


if __name__ == "__main__":
    main()
