"""Corpora, splits, arithmetic, tokenizer and LM packing."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from transformers import AutoTokenizer

from rkl.data import (
    SPECIAL_TOKENS, arithmetic_problems, describe_source, encode_documents, lm_batch, load_documents,
    split_of, stdlib_files, train_tokenizer,
)
from rkl.data.corpora import _shakespeare_documents, shakespeare_files, stdlib_root, text_blocks
from rkl.errors import UserError

SPLITS = ("train", "val", "test")


@pytest.fixture
def no_network(monkeypatch):
    """Fail any socket connection, and record it even if the caller swallows the error."""
    attempts = []

    def refuse(self, address, *args, **kwargs):
        attempts.append(address)
        raise OSError(f"network disabled in tests: {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield attempts
    assert attempts == [], f"network attempted: {attempts}"


@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


@pytest.fixture(scope="module")
def tokenizer():
    docs = load_documents("stdlib+shakespeare+arithmetic", "val", max_chars=300_000)
    return train_tokenizer(docs, 384)


# --- splits and corpora ---------------------------------------------------------------------------------
def test_split_of_is_deterministic_and_proportioned():
    keys = [f"key-{i}" for i in range(20000)]
    splits = [split_of(k) for k in keys]
    assert splits == [split_of(k) for k in keys]
    frac = {s: splits.count(s) / len(keys) for s in SPLITS}
    assert abs(frac["train"] - 0.9) < 0.01 and abs(frac["val"] - 0.05) < 0.01 and abs(frac["test"] - 0.05) < 0.01


def test_stdlib_split_is_stable_and_disjoint():
    files = stdlib_files()
    root = stdlib_root()
    assert files == sorted(files) and len(files) > 100
    assert not any(part in ("site-packages", "test", "tests") for p in files for part in p.relative_to(root).parts)
    val = load_documents("stdlib", "val")
    assert val == load_documents("stdlib", "val") and len(val) > 0
    expected = [p.read_text(encoding="utf-8", errors="replace") for p in files
                if split_of(p.relative_to(root).as_posix()) == "val"]
    assert val == expected
    train, test = load_documents("stdlib", "train"), load_documents("stdlib", "test")
    assert len(train) + len(val) + len(test) == len(files)


def test_shakespeare_splits_nonempty_and_disjoint():
    docs = {s: load_documents("shakespeare", s) for s in SPLITS}
    assert all(docs[s] for s in SPLITS)
    assert len(docs["train"]) + len(docs["val"]) + len(docs["test"]) == len(shakespeare_files()) == 42
    assert not set(docs["train"]) & (set(docs["val"]) | set(docs["test"]))


def test_shakespeare_block_fallback_when_a_split_is_empty():
    files = shakespeare_files()[:8]  # by work hash these eight fill only train and val
    assert {split_of(p.name) for p in files} != set(SPLITS)
    docs = {s: _shakespeare_documents(files, s) for s in SPLITS}
    assert all(docs[s] for s in SPLITS)
    blocks = [b for p in files for b in text_blocks(p.read_text(encoding="utf-8"))]
    assert sorted(docs["train"] + docs["val"] + docs["test"]) == sorted(blocks)
    assert docs == {s: _shakespeare_documents(files, s) for s in SPLITS}


def test_text_blocks_are_lossless():
    text = "".join(f"line {i}\n" + ("\n" if i % 7 == 0 else "") for i in range(3000))
    blocks = text_blocks(text, size=500)
    assert "".join(blocks) == text and len(blocks) > 10
    assert "".join(text_blocks("x" * 50_000 + "\n", size=100)) == "x" * 50_000 + "\n"


def test_max_chars_caps_each_source():
    full = load_documents("shakespeare", "train")
    capped = load_documents("shakespeare", "train", max_chars=10_000)
    assert sum(map(len, capped)) == 10_000 and "".join(capped) == "".join(full)[:10_000]
    mix = load_documents("mix", "val", max_chars=5_000)
    assert sum(map(len, mix)) == 15_000


def test_describe_source_is_json_and_stable():
    a, b = describe_source("mix"), describe_source("mix")
    json.dumps(a)
    assert a == b
    assert a["stdlib"]["n_files"] == len(a["stdlib"]["files"]) == len(stdlib_files())
    assert "CC-BY 2.5" in a["shakespeare"]["licence"] and len(a["shakespeare"]["works"]) == 42
    assert a["arithmetic"]["split_sizes"] == {"train": 20000, "val": 500, "test": 500}
    assert describe_source("arithmetic", arithmetic_digits=2)["split_hash"] != describe_source("arithmetic")["split_hash"]


def test_unknown_source_and_split_raise_user_error(no_network, datasets_cache):
    with pytest.raises(UserError, match="unknown data source"):
        load_documents("stdlb", "train")
    with pytest.raises(UserError, match="unknown data source"):
        load_documents("stdlib+nonsense source!", "train")
    with pytest.raises(UserError, match="not found"):
        load_documents("/nonexistent/data.jsonl", "train")
    with pytest.raises(UserError, match="unknown split"):
        load_documents("stdlib", "validation")


def test_local_txt_file_offline(tmp_path, no_network, datasets_cache):
    paragraphs = [f"Paragraph {i}.\n" + "".join(f"    line {i}.{j} of some text\n" for j in range(30))
                  for i in range(600)]
    text = "\n".join(paragraphs)
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    docs = {s: load_documents(str(path), s) for s in SPLITS}
    assert all(docs[s] for s in SPLITS)
    assert sorted(docs["train"] + docs["val"] + docs["test"]) == sorted(text_blocks(text))
    assert all(split_of(d) == s for s in SPLITS for d in docs[s])


def test_local_jsonl_file_offline(tmp_path, no_network, datasets_cache):
    rows = [f"document number {i}\n  with indentation" for i in range(1000)]
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": r, "id": i}) + "\n" for i, r in enumerate(rows)))
    docs = {s: load_documents(str(path), s) for s in SPLITS}
    assert sorted(docs["train"] + docs["val"] + docs["test"]) == sorted(rows)
    assert all(split_of(d) == s for s in SPLITS for d in docs[s])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(UserError, match="no 'text' column"):
        load_documents(str(bad), "train")


def test_local_folder_uses_native_splits_and_hashes_the_missing_one(tmp_path, no_network, datasets_cache):
    train_rows = [f"train row {i}" for i in range(600)]
    test_rows = [f"test row {i}" for i in range(30)]
    folder = tmp_path / "data"  # apart from the datasets cache under tmp_path
    folder.mkdir()
    for name, rows in (("train", train_rows), ("test", test_rows)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    docs = {s: load_documents(str(folder), s) for s in SPLITS}
    assert docs["test"] == test_rows  # the folder's own test split, untouched
    assert docs["val"] and all(split_of(d) == "val" for d in docs["val"])  # no validation file: hashed from train
    assert sorted(docs["train"] + docs["val"]) == sorted(train_rows)
    assert describe_source(str(folder))["split_hash"] == describe_source(str(folder))["split_hash"]


# --- arithmetic -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("digits", [1, 2, 3])
def test_arithmetic_answers_and_disjoint_splits(digits):
    by_split = {s: arithmetic_problems(s, digits) for s in SPLITS}
    prompts = {s: {p.prompt for p in ps} for s, ps in by_split.items()}
    assert not prompts["train"] & prompts["val"] and not prompts["train"] & prompts["test"]
    assert not prompts["val"] & prompts["test"]
    for s, problems in by_split.items():
        assert len(prompts[s]) == len(problems) > 0  # no duplicates
        for p in problems:
            a, b = map(int, p.prompt.removesuffix("=").split("+"))
            assert p.prompt.endswith("=") and int(p.answer) == a + b and p.text == p.prompt + p.answer
            assert 0 <= a < 10**digits and 0 <= b < 10**digits and split_of(p.prompt) == s
            assert p.answer == str(a + b)  # most significant digit first, no padding


def test_arithmetic_is_deterministic_with_default_sizes():
    assert arithmetic_problems("val", 3) == arithmetic_problems("val", 3)
    assert [len(arithmetic_problems(s, 3)) for s in SPLITS] == [20000, 500, 500]
    assert arithmetic_problems("train", 3, n=100) == arithmetic_problems("train", 3)[:100]
    assert len(arithmetic_problems("train", 2)) == sum(split_of(f"{a}+{b}=") == "train"
                                                       for a in range(100) for b in range(100))


# --- tokenizer ------------------------------------------------------------------------------------------
def test_tokenizer_vocab_and_specials(tokenizer):
    assert len(tokenizer) == 384
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert len(train_tokenizer(load_documents("shakespeare", "test"), 300)) == 300


def test_every_digit_is_a_single_token(tokenizer):
    for token in tokenizer.get_vocab():
        if any(c.isdigit() for c in token):
            assert len(token) == 1, f"token {token!r} merges a digit"
    for d in "0123456789":
        assert len(tokenizer.encode(d, add_special_tokens=False)) == 1
    ids = tokenizer.encode("12345+67890=80235", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids) == list("12345+67890=80235")


def test_tokenizer_round_trip_and_save_load(tokenizer, tmp_path):
    texts = [
        "def f(x):\n    if x:\n\t\treturn [x, 'y']  # comment\n\n    return None\n",
        "  leading spaces, trailing spaces  \n\n\nHAMLET. To be, or not to be .\n",
        "347+685=1032\n" + "".join(chr(c) for c in range(32, 127)),
    ] + load_documents("stdlib", "test")[:3]
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(loaded) == 384 and loaded.eos_token_id == 2 and loaded.pad_token_id == 0
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.decode(ids) == text
        assert loaded.encode(text, add_special_tokens=False) == ids
        assert loaded.decode(ids) == text


def test_tokenizer_rejects_impossible_vocab():
    with pytest.raises(UserError, match="too small"):
        train_tokenizer(["abc"], 100)
    with pytest.raises(UserError, match="only supports"):
        train_tokenizer(["abab abab"], 1000)


# --- packing --------------------------------------------------------------------------------------------
def test_encode_documents_puts_eos_after_each_doc(tokenizer):
    docs = ["hello world", "x = 1\n", "a literal <eos> stays text", "7+8=15"]
    stream = encode_documents(tokenizer, docs)
    assert stream.dtype == torch.long and stream.ndim == 1
    expected = []
    for d in docs:
        expected += tokenizer.encode(d, add_special_tokens=False, split_special_tokens=True) + [2]
    assert stream.tolist() == expected
    assert (stream == 2).sum().item() == len(docs) and stream[-1].item() == 2
    assert (stream == 1).sum().item() == 0  # no BOS
    pieces = [tokenizer.decode(p) for p in torch.tensor_split(stream, (stream == 2).nonzero().flatten() + 1)[:-1]]
    assert pieces == [d + "<eos>" for d in docs]


def test_lm_batch_is_a_pure_function_of_seed_and_step():
    stream = torch.arange(10_000)
    a = lm_batch(stream, step=5, batch_size=8, seq_len=32, seed=0)
    assert a.shape == (8, 33) and a.dtype == torch.long
    assert torch.equal(a, lm_batch(stream, step=5, batch_size=8, seq_len=32, seed=0))
    assert not torch.equal(a, lm_batch(stream, step=6, batch_size=8, seq_len=32, seed=0))
    assert not torch.equal(a, lm_batch(stream, step=5, batch_size=8, seq_len=32, seed=1))
    # each row is a contiguous window of the stream
    assert torch.equal(a - a[:, :1], torch.arange(33).expand(8, 33))
    assert int(a.max()) < 10_000
    with pytest.raises(UserError):
        lm_batch(torch.arange(10), step=0, batch_size=2, seq_len=10, seed=0)
