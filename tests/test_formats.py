"""data/formats.py readers and writers, data/convert.py converters: offline, on small hand-written files."""
import gzip
import io
import json
import os
import re
import urllib.request

import pytest

from data import convert
from data.convert import alpaca_to_sft, dolly_to_sft, download, hh_to_comparisons, tinystories_to_corpus
from data.formats import read_comparisons, read_corpus, read_prompts, read_sft, write_corpus, write_jsonl


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD_SFT = '{"prompt": "Say hi.", "response": "Hi!"}'
GOOD_PROMPT = '{"prompt": "Say hi.", "world": {"task": "greet"}}'
GOOD_CMP = '{"prompt": "Say hi.", "responses": ["Hi!", "No."], "ranking": [0, 1]}'

# (reader, first good line, bad line 2, field the message must name)
BAD_LINES = [
    (read_sft, GOOD_SFT, '{"prompt": "Say hi."}', "response"),
    (read_sft, GOOD_SFT, '{"prompt": "Say hi.", "response": 3}', "response"),
    (read_sft, GOOD_SFT, '{"prompt": "Say hi.", "response": ""}', "response"),
    (read_sft, GOOD_SFT, '{"prompt": "  ", "response": "Hi!"}', "prompt"),
    (read_prompts, GOOD_PROMPT, '{"world": {}}', "prompt"),
    (read_prompts, GOOD_PROMPT, '{"prompt": "Say hi.", "world": [1, 2]}', "world"),
    (read_comparisons, GOOD_CMP, '{"prompt": "Say hi.", "responses": ["Hi!"], "ranking": [0]}', "responses"),
    (read_comparisons, GOOD_CMP, '{"prompt": "Say hi.", "responses": ["Hi!", 7], "ranking": [0, 1]}', "responses"),
    (read_comparisons, GOOD_CMP, '{"prompt": "Say hi.", "responses": "Hi!", "ranking": [0, 1]}', "responses"),
    (read_comparisons, GOOD_CMP, '{"prompt": "Say hi.", "ranking": [0, 1]}', "responses"),
    (read_comparisons, GOOD_CMP, '{"prompt": "Say hi.", "responses": ["a", "b"], "ranking": [0, 0]}', "ranking"),
    (read_comparisons, GOOD_CMP, '{"prompt": "Say hi.", "responses": ["a", "b", "c"], "ranking": [0, 1]}', "ranking"),
    (read_comparisons, GOOD_CMP, '{"prompt": "Say hi.", "responses": ["a", "b"], "ranking": [1, 2]}', "ranking"),
    (read_comparisons, GOOD_CMP, '{"prompt": "Say hi.", "responses": ["a", "b"], "ranking": [false, true]}', "ranking"),
    (read_comparisons, GOOD_CMP, '{"prompt": "Say hi.", "responses": ["a", "b"]}', "ranking"),
    (read_comparisons, GOOD_CMP, '{"prompt": "Say hi.", "chosen": "Hi!"}', "rejected"),
    (read_comparisons, GOOD_CMP, '{"prompt": "Say hi.", "chosen": null, "rejected": "No."}', "chosen"),
    (read_comparisons, GOOD_CMP, '{"prompt": "Say hi.", "chosen": "a", "rejected": "b", "world": "x"}', "world"),
]


@pytest.mark.parametrize("reader, good, bad, field", BAD_LINES)
def test_error_names_file_line_and_field(tmp_path, reader, good, bad, field):
    path = write_lines(tmp_path / "data.jsonl", [good, bad])
    with pytest.raises(ValueError) as e:
        reader(path)
    assert str(e.value).startswith(f"{path} line 2: field \"{field}\"")


def test_message_example_from_the_spec(tmp_path):
    path = write_lines(tmp_path / "sft.jsonl", [GOOD_SFT] * 11 + ['{"prompt": "p", "response": ""}'])
    with pytest.raises(ValueError, match=r'sft\.jsonl line 12: field "response" must be a non-empty string, got ""$'):
        read_sft(path)


@pytest.mark.parametrize("reader", [read_sft, read_prompts, read_comparisons])
def test_invalid_json_and_non_objects_name_file_and_line(tmp_path, reader):
    # the blank line 2 is skipped but counted, so line numbers match an editor's
    path = write_lines(tmp_path / "bad.jsonl", [GOOD_SFT, "", '{"prompt": "oops",'])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} line 3: invalid JSON"):
        reader(path)
    write_lines(path, ['["prompt", "response"]'])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} line 1: expected a JSON object, got a JSON array"):
        reader(path)
    path.write_bytes(GOOD_SFT.encode() + b'\n{"prompt": "caf\xe9"}\n')  # latin-1, not UTF-8
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} line 2: not valid UTF-8"):
        reader(path)


@pytest.mark.parametrize("reader", [read_sft, read_prompts, read_comparisons, read_corpus])
@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_file_is_an_error_naming_it(tmp_path, reader, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: file is empty"):
        reader(path)


def test_pairwise_form_is_normalised(tmp_path):
    path = write_lines(tmp_path / "pairs.jsonl", [
        '{"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away.", "id": 7}',
        '{"prompt": "Pick.", "responses": ["b", "c", "a"], "ranking": [2, 0, 1], "world": {"k": 1}}',
    ])
    assert read_comparisons(path) == [
        {"prompt": "Say hi.", "id": 7, "responses": ["Hi!", "Go away."], "ranking": [0, 1]},
        {"prompt": "Pick.", "responses": ["b", "c", "a"], "ranking": [2, 0, 1], "world": {"k": 1}},
    ]


def test_write_read_round_trip(tmp_path):
    sft = [{"prompt": "Café?\nSure", "response": "Oui ☕ \"quoted\" \\ \u2028 end", "id": 1},
           {"prompt": "lone surrogate", "response": "\ud83d"}]
    cmp = [{"prompt": "p", "responses": ["", "x", "y"], "ranking": [1, 2, 0], "world": {"task": "t", "args": {}}}]
    prompts = [{"prompt": "p", "world": {"task": "t"}}, {"prompt": "q"}]
    path = tmp_path / "sub" / "rows.jsonl"  # the folder is created
    for rows, reader in [(sft, read_sft), (cmp, read_comparisons), (prompts, read_prompts)]:
        write_jsonl(path, rows)
        assert reader(path) == rows
    write_jsonl(path, sft)
    assert "Café" in path.read_text(encoding="utf-8")  # non-ASCII stays readable in the file
    assert os.listdir(path.parent) == ["rows.jsonl"]  # no temp file left behind


def test_write_jsonl_is_atomic(tmp_path):
    path = tmp_path / "sft.jsonl"
    write_jsonl(path, [{"prompt": "a", "response": "b"}])
    with pytest.raises(TypeError):  # the second row cannot be serialised: the old file must survive
        write_jsonl(path, [{"prompt": "c", "response": "d"}, {"prompt": object()}])
    assert read_sft(path) == [{"prompt": "a", "response": "b"}]
    assert os.listdir(tmp_path) == ["sft.jsonl"]


def test_corpus_round_trip_and_bad_encoding(tmp_path):
    path = tmp_path / "corpus.txt"
    write_corpus(path, "Once upon a time.\n\nThe end ✓\n")
    assert read_corpus(path) == "Once upon a time.\n\nThe end ✓\n"
    path.write_bytes(b"\xef\xbb\xbfline one\r\nline two\r\n")  # BOM + CRLF from a Windows editor
    assert read_corpus(path) == "line one\nline two\n"
    path.write_bytes(b"fine\nalso fine\nna\xefve\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))} line 3: not valid UTF-8 text"):
        read_corpus(path)


# ----------------------------------------------------------------------------- converters

def hh_line(chosen, rejected):
    return json.dumps({"chosen": chosen, "rejected": rejected})


HH_MULTI = "\n\nHuman: Name a cat?\n\nAssistant: Whiskers.\n\nHuman: Something rarer?"
HH_LINES = [
    hh_line(HH_MULTI + "\n\nAssistant: Pumpernickel.", HH_MULTI + "\n\nAssistant: No."),
    hh_line("\n\nHuman: How do I boil an egg?\n\nAssistant: Simmer it for 9 minutes.",
            "\n\nHuman: How do I boil an egg?\n\nAssistant: Eggs are bad."),
    "",  # blank line in the file
    hh_line("\n\nHuman: A\n\nAssistant: x", "\n\nHuman: B\n\nAssistant: y"),  # prompts differ
    hh_line("\n\nHuman: A\n\nAssistant: x", "\n\nHuman: A\n\nAssistant:"),  # empty rejected response
    hh_line("\n\nHuman: A\n\nAssistant: same", "\n\nHuman: A\n\nAssistant: same"),  # no preference
    hh_line("\n\nHuman: A", "\n\nHuman: A"),  # no Assistant turn
]
HH_EXPECTED = [
    {"prompt": "Human: Name a cat?\n\nAssistant: Whiskers.\n\nHuman: Something rarer?",
     "responses": ["Pumpernickel.", "No."], "ranking": [0, 1]},
    {"prompt": "How do I boil an egg?", "responses": ["Simmer it for 9 minutes.", "Eggs are bad."], "ranking": [0, 1]},
]

ALPACA_ROWS = [
    {"instruction": "Give three tips for staying healthy.", "input": "",
     "output": "1. Eat well.\n2. Exercise.\n3. Sleep."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour "},
    {"instruction": "Say nothing.", "input": "", "output": ""},  # no response: dropped
]
ALPACA_EXPECTED = [
    {"prompt": "Give three tips for staying healthy.", "response": "1. Eat well.\n2. Exercise.\n3. Sleep."},
    {"prompt": "Translate to French.\n\nGood morning", "response": "Bonjour"},
]

DOLLY_ROWS = [
    {"instruction": "When was Tomoaki Komorida born?", "context": "Tomoaki Komorida (born July 10, 1981) is a "
     "Japanese football player.", "response": "July 10, 1981", "category": "closed_qa"},
    {"instruction": "Name a primary colour.", "context": "", "response": "Red.", "category": "open_qa"},
]
DOLLY_EXPECTED = [
    {"prompt": "When was Tomoaki Komorida born?\n\nTomoaki Komorida (born July 10, 1981) is a Japanese football "
     "player.", "response": "July 10, 1981", "category": "closed_qa"},
    {"prompt": "Name a primary colour.", "response": "Red.", "category": "open_qa"},
]

TINYSTORIES_TEXT = ("Once upon a time, there was a cat.\n\nThe cat was happy.\n<|endoftext|>\n"
                    "Tom had a red ball.  \nHe liked it.\n<|endoftext|>\n\n"
                    "Sue ran home.\n<|endoftext|>\n")
TINYSTORIES_EXPECTED = ("Once upon a time, there was a cat.\nThe cat was happy.\n\n"
                        "Tom had a red ball.\nHe liked it.\n\n"
                        "Sue ran home.\n")


def test_hh_to_comparisons():
    assert hh_to_comparisons(HH_LINES) == HH_EXPECTED
    assert hh_to_comparisons([json.loads(line) for line in HH_LINES[:2]]) == HH_EXPECTED  # dicts work too


def test_alpaca_and_dolly_to_sft():
    assert alpaca_to_sft(ALPACA_ROWS) == ALPACA_EXPECTED
    assert dolly_to_sft(DOLLY_ROWS) == DOLLY_EXPECTED


def test_tinystories_to_corpus():
    assert tinystories_to_corpus(TINYSTORIES_TEXT) == TINYSTORIES_EXPECTED
    assert tinystories_to_corpus(TINYSTORIES_TEXT, limit=1) == "Once upon a time, there was a cat.\nThe cat was happy.\n"


def test_download_uses_the_cache_without_network(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("urlopen called although the file is cached")
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    cached = tmp_path / "alpaca_data.json"
    cached.write_text("[]")
    assert download(convert.ALPACA_URL, str(cached)) == str(cached)
    assert cached.read_text() == "[]"


def test_download_fetches_then_caches(tmp_path, monkeypatch):
    calls = []

    class FakeResponse(io.BytesIO):
        headers = {"Content-Length": "11"}

    def fake_urlopen(request, timeout):
        calls.append(request.full_url)
        return FakeResponse(b"hello world")
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    path = str(tmp_path / "raw" / "file.txt")
    for _ in range(2):
        assert download("https://example.com/file.txt", path) == path
    assert calls == ["https://example.com/file.txt"]  # the second call used the cache
    assert open(path).read() == "hello world" and os.listdir(tmp_path / "raw") == ["file.txt"]


RAW_FILES = {  # what the real sources serve, as files a user could have placed in OUT/raw
    "tinystories": ("TinyStoriesV2-GPT4-valid.txt", TINYSTORIES_TEXT.encode()),
    "alpaca": ("alpaca_data.json", json.dumps(ALPACA_ROWS, indent=4).encode()),
    "dolly": ("databricks-dolly-15k.jsonl", "".join(json.dumps(r) + "\n" for r in DOLLY_ROWS).encode()),
    "hh": ("hh-helpful-base-train.jsonl.gz", gzip.compress("\n".join(HH_LINES).encode())),
}


@pytest.mark.parametrize("dataset", list(RAW_FILES))
def test_command_line_converts_cached_raw_files(tmp_path, monkeypatch, capsys, dataset):
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("network used"))
    name, data = RAW_FILES[dataset]
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / name).write_bytes(data)
    args = [dataset, f"--out={tmp_path}"] + (["--subsets=helpful-base"] if dataset == "hh" else [])
    convert.main(args)
    if dataset == "tinystories":
        assert read_corpus(tmp_path / "corpus.txt") == TINYSTORIES_EXPECTED
    elif dataset == "hh":
        assert read_comparisons(tmp_path / "comparisons.jsonl") == HH_EXPECTED
        assert read_prompts(tmp_path / "prompts.jsonl") == [{"prompt": r["prompt"]} for r in HH_EXPECTED]
    else:
        assert read_sft(tmp_path / "sft.jsonl") == {"alpaca": ALPACA_EXPECTED, "dolly": DOLLY_EXPECTED}[dataset]
    convert.main(args + ["--limit=1"])
    assert "wrote" in capsys.readouterr().out
    if dataset == "tinystories":
        assert read_corpus(tmp_path / "corpus.txt") == "Once upon a time, there was a cat.\nThe cat was happy.\n"
    else:
        out = "comparisons.jsonl" if dataset == "hh" else "sft.jsonl"
        assert len([line for line in open(tmp_path / out) if line.strip()]) == 1


@pytest.mark.parametrize("argv", [["dolly", "--split=train"], ["hh", "--split=valid"], ["hh", "--subsets=nope"],
                                  ["alpaca", "--limit=0"], ["imagenet"]])
def test_command_line_rejects_bad_options(argv, capsys):
    with pytest.raises(SystemExit):
        convert.main(argv)
    assert "error:" in capsys.readouterr().err
