"""The pipeline's file formats: readers that validate every line, and atomic writers.

Stages hand data to each other through these files (JSONL = one JSON object per line, UTF-8):

    corpus.txt         plain text for pretraining, documents separated by one blank line
    sft.jsonl          {"prompt": str, "response": str, "ended": bool optional}  demonstrations
    prompts.jsonl      {"prompt": str, "world": {...} optional}                prompts for PPO and eval
    comparisons.jsonl  {"prompt": str, "responses": [str, ...], "ranking": [int, ...], "ended": [bool, ...]
                        optional, "world": {...} optional}
                       K >= 2 distinct responses and their ranking as indices, best first (InstructGPT sec. 3.5
                       has labelers rank K = 4..9 responses). The pairwise form of HH-RLHF and most DPO
                       datasets, {"prompt", "chosen", "rejected"}, is read as
                       responses = [chosen, rejected], ranking = [0, 1].

Implementation details:
1. A reader checks every line and raises InputError (a ValueError) naming the file, the 1-based line
   number and the field, e.g. `data/sft.jsonl line 12: field "response" must be a non-empty string,
   got ""`: a bad line should stop the run at load time, not as a KeyError in the middle of training.
   The stages print it as one line without a traceback (common.run_command). "ended" must be a real
   JSON boolean (the string "false" would read as true), and a comparison's answers must differ (a
   ranking between two identical answers is noise).
2. Blank lines are skipped but still counted, so line numbers match an editor's. A file with no
   rows at all is an error: every stage needs at least one example.
3. Fields beyond the required ones are kept, so a dataset can carry ids or metadata through.
4. Length against the model's context: a reader given `too_long(row)` (a message when the row cannot
   fit, else None) checks every row with it. Training rows that cannot be used (a demonstration whose
   prompt leaves no answer token to learn, an answer the reward model cannot see whole) are an error
   naming their lines. Prompts to answer that cannot fit are dropped, and the reader prints how many
   and their lines: such a prompt cannot be answered, and one overlong prompt in a large public
   dataset should not stop a run (all of them dropped is an error). read_sft's `cut(row)` only
   notes, with a count and the lines, the demonstrations that lose the end of their answer.
5. Writers are atomic (temp file + os.replace): an interrupted run never leaves a half-written file
   that a later stage would take for a complete one.
5. `split_by_prompt` holds comparisons out by prompt text (reward.py and dpo.py share it).
"""
import json
import os
import random


class InputError(ValueError):
    """A bad input file; the message names the file (and the line). common.run_command prints it as one line."""

_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number",
               bool: "boolean", type(None): "null"}


def _show(value):
    """A short JSON rendering of a bad value for error messages."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


def _error(path, lineno, message):
    return InputError(f"{path} line {lineno}: {message}")


def _open(path):
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    return open(path, "rb")


def _read_objects(path):
    """[(line number, dict)] for the non-blank lines of a JSONL file; each line must be an object."""
    rows = []
    with _open(path) as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise _error(path, lineno, f"not valid UTF-8 ({e.reason} at byte {e.start} of the line)") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise _error(path, lineno, f"invalid JSON: {e.msg} (column {e.colno})") from None
            if not isinstance(obj, dict):
                raise _error(path, lineno, f"expected a JSON object, got a JSON {_JSON_TYPES.get(type(obj))}")
            rows.append((lineno, obj))
    if not rows:
        raise InputError(f"{path}: file is empty (expected one JSON object per line)")
    return rows


def _field(path, lineno, obj, key):
    if key not in obj:
        raise _error(path, lineno, f'field "{key}" is missing')
    return obj[key]


def _string(path, lineno, obj, key, nonempty=True):
    value = _field(path, lineno, obj, key)
    if not isinstance(value, str) or (nonempty and not value.strip()):
        kind = "a non-empty string" if nonempty else "a string"
        raise _error(path, lineno, f'field "{key}" must be {kind}, got {_show(value)}')
    return value


def _record(path, lineno, obj):
    # optional: the embedded world's rows carry what its gold judge needs under "world"; other data has none
    if obj.get("world") is not None and not isinstance(obj["world"], dict):
        raise _error(path, lineno, f'field "world" must be an object, got {_show(obj["world"])}')


def _ended(path, lineno, obj, k=None):
    """Optional "ended": a boolean (k None) or a list of k booleans, one per response."""
    if "ended" not in obj:
        return
    value = obj["ended"]
    if k is None and not isinstance(value, bool):
        raise _error(path, lineno, f'field "ended" must be true or false, got {_show(value)}')
    if k is not None and not (isinstance(value, list) and len(value) == k and all(isinstance(e, bool) for e in value)):
        raise _error(path, lineno, f'field "ended" must be a list of {k} booleans (one per response), '
                                   f'got {_show(value)}')


def _fits(path, rows, too_long, action, what="rows"):
    """rows = [(line number, row)] checked by too_long(row) -> message or None. The rows it rejects are an
    error naming their lines (action "error"), dropped ("drop") or kept ("note"), with one printed line
    giving their count and lines; all of them dropped is an error. Returns the rows kept."""
    bad = [(lineno, msg) for lineno, row in rows if (msg := too_long(row))] if too_long else []
    if not bad:
        return [row for _, row in rows]
    lines = ", ".join(str(n) for n, _ in bad[:10]) + (", ..." if len(bad) > 10 else "")
    if action == "error" or (action == "drop" and len(bad) == len(rows)):
        more = f" ({len(bad) - 1} more lines too: {lines})" if len(bad) > 1 else ""
        raise _error(path, bad[0][0], bad[0][1] + more)
    print(f"{path}: {'dropped' if action == 'drop' else 'note:'} {len(bad)} of {len(rows)} {what} longer than the "
          f"context (lines {lines}; line {bad[0][0]}: {bad[0][1]})")
    skip = {n for n, _ in bad} if action == "drop" else set()
    return [row for lineno, row in rows if lineno not in skip]


def read_sft(path, too_long=None, cut=None):
    """Demonstrations: [{"prompt": str, "response": str, "ended": bool (optional), ...}]; a row that
    too_long(row) rejects is an error, the rows that cut(row) describes are kept and counted in a note."""
    rows = []
    for lineno, obj in _read_objects(path):
        _string(path, lineno, obj, "prompt")
        _string(path, lineno, obj, "response")
        _ended(path, lineno, obj)
        rows.append((lineno, obj))
    _fits(path, rows, too_long, "error")  # raises, or keeps every row
    return _fits(path, rows, cut, "note", "demonstrations")


def read_prompts(path, too_long=None):
    """Prompts for PPO / evaluation: [{"prompt": str, "world": dict (optional), ...}]; the rows that
    too_long(row) rejects are dropped, with a printed count and their lines."""
    rows = []
    for lineno, obj in _read_objects(path):
        _string(path, lineno, obj, "prompt")
        _record(path, lineno, obj)
        rows.append((lineno, obj))
    return _fits(path, rows, too_long, "drop", "prompts")


def read_comparisons(path, too_long=None, at_least=1):
    """Ranked responses: [{"prompt", "responses": [K >= 2 str], "ranking": best-first indices, ...}]; a
    row that too_long(row) rejects is an error, and so are fewer than `at_least` rows.

    A pairwise row {"prompt", "chosen", "rejected"} comes back as responses=[chosen, rejected],
    ranking=[0, 1]. Responses may be empty strings (a policy can answer with just the end token), but two
    responses of one row may not be the same answer (same text, and same "ended" if given)."""
    rows = []
    for lineno, obj in _read_objects(path):
        _string(path, lineno, obj, "prompt")
        _record(path, lineno, obj)
        if "responses" not in obj and ("chosen" in obj or "rejected" in obj):
            chosen = _string(path, lineno, obj, "chosen", nonempty=False)
            rejected = _string(path, lineno, obj, "rejected", nonempty=False)
            obj = {k: v for k, v in obj.items() if k not in ("chosen", "rejected")}
            obj.update(responses=[chosen, rejected], ranking=[0, 1])
        responses = _field(path, lineno, obj, "responses")
        if not isinstance(responses, list) or len(responses) < 2 or not all(isinstance(r, str) for r in responses):
            raise _error(path, lineno, f'field "responses" must be a list of at least 2 strings, got {_show(responses)}')
        ranking = _field(path, lineno, obj, "ranking")
        # type(i) is int: JSON true/false load as bools, which Python would happily sort as 1/0
        if (not isinstance(ranking, list) or not all(type(i) is int for i in ranking)
                or sorted(ranking) != list(range(len(responses)))):
            raise _error(path, lineno, f'field "ranking" must be a permutation of 0..{len(responses) - 1} '
                                       f'(indices into "responses", best first), got {_show(ranking)}')
        _ended(path, lineno, obj, len(responses))
        answers = list(zip(responses, obj.get("ended") or [True] * len(responses)))
        if len(set(answers)) < len(answers):
            i = next(i for i, a in enumerate(answers) if a in answers[:i])
            raise _error(path, lineno, f'field "responses": answers {answers.index(answers[i])} and {i} are the '
                                       f'same ({_show(responses[i])}); a ranking between identical answers is noise')
        rows.append((lineno, obj))
    if len(rows) < at_least:
        raise InputError(f"{path}: {len(rows)} comparison(s), at least {at_least} are needed")
    return _fits(path, rows, too_long, "error")


def split_by_prompt(comps, fraction, seed):
    """(training, held-out) comparisons, held out by prompt text: a seeded sample of `fraction` of the
    distinct prompts (at least one), every comparison of a held-out prompt held out (a prompt can recur).
    reward.py and dpo.py both split with it, so the same seed and fraction give them the same pairs."""
    prompts = sorted({c["prompt"] for c in comps})
    held = set(random.Random(seed).sample(prompts, max(1, int(len(prompts) * fraction))))
    return [c for c in comps if c["prompt"] not in held], [c for c in comps if c["prompt"] in held]


def read_corpus(path):
    """The pretraining text (UTF-8, documents separated by a blank line)."""
    with _open(path) as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = data.count(b"\n", 0, e.start) + 1
        raise _error(path, lineno, f"not valid UTF-8 text ({e.reason} at byte {e.start}); "
                                   "convert the file to UTF-8 first") from None
    text = text.removeprefix("\ufeff").replace("\r\n", "\n")  # editors on Windows add a BOM and CRLF
    if not text.strip():
        raise InputError(f"{path}: file is empty (expected the pretraining text)")
    return text


def _write_atomically(path, chunks):
    """Write an iterable of strings to a temp file, then os.replace it onto path."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp"
    try:
        # backslashreplace: a lone surrogate (legal in JSON, e.g. "\ud83d") is written back as its
        # \uXXXX escape, so any string that json.loads produced survives the round trip
        with open(tmp, "w", encoding="utf-8", errors="backslashreplace") as f:
            for chunk in chunks:
                f.write(chunk)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_jsonl(path, rows):
    """One JSON object per line, non-ASCII text kept readable, written atomically."""
    _write_atomically(path, (json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def write_corpus(path, text):
    """The pretraining text, written atomically."""
    _write_atomically(path, [text])
