"""Data pipeline: token shards, EOS separators, validation split, TokenDataset sampling and resume."""

import json
import os
import random
import sysconfig

import numpy as np
import pytest
import torch

import nanoseek.data as data
from nanoseek.cli import main
from nanoseek.data import (
    DataError,
    TokenDataset,
    default_corpus_files,
    iter_documents,
    load_manifest,
    prepare_data,
    token_dtype,
)
from nanoseek.tokenizer import load_tokenizer, train_tokenizer

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu café 東京 🙂 def return".split()


def write_docs(folder, n, seed=0, prefix="doc"):
    """n text files, each a distinct document (a unique header line makes them distinguishable)."""
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        body = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60)))
        p = os.path.join(folder, f"{prefix}{i:03d}.txt")
        with open(p, "w", encoding="utf-8") as f:
            f.write(f"document {prefix} {i}\n{body}\n")
        paths.append(p)
    return paths


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return write_docs(str(tmp_path_factory.mktemp("corpus")), 30)


@pytest.fixture(scope="session")
def tok_dir(tmp_path_factory, corpus):
    out = str(tmp_path_factory.mktemp("tok") / "tokenizer")
    train_tokenizer(corpus, 320, out)
    return out


@pytest.fixture(scope="session")
def prepared(tmp_path_factory, corpus, tok_dir):
    out = str(tmp_path_factory.mktemp("data") / "d")
    manifest = prepare_data(corpus, tok_dir, out, val_fraction=0.1, shard_tokens=500, show_progress=False)
    return out, manifest


def read_split(out, manifest, split):
    dtype = np.dtype(manifest["dtype"])
    parts = [np.fromfile(os.path.join(out, s["file"]), dtype=dtype) for s in manifest["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype)


def split_docs(tok, stream):
    """Decode a token stream back into its documents (each ends with EOS)."""
    docs, cur = [], []
    for t in stream.tolist():
        if t == tok.eos_id:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(t)
    assert cur == []  # the stream ends with an EOS
    return docs


def test_token_counts_dtype_and_shards(prepared, corpus, tok_dir):
    out, m = prepared
    tok = load_tokenizer(tok_dir)
    expected = sum(len(tok.encode(open(p, encoding="utf-8").read())) + 1 for p in corpus)
    assert m["train_tokens"] + m["val_tokens"] == expected
    assert m["dtype"] == "uint16" and m["vocab_size"] == tok.vocab_size and m["eos_id"] == tok.eos_id
    assert len(m["splits"]["train"]["shards"]) > 1  # shard_tokens=500 forces several
    for split in ("train", "val"):
        shards = m["splits"][split]["shards"]
        assert all(s["tokens"] <= 500 for s in shards)
        assert sum(s["tokens"] for s in shards) == m["splits"][split]["tokens"]
        for s in shards:
            assert os.path.getsize(os.path.join(out, s["file"])) == 2 * s["tokens"]
    assert load_manifest(out) == m
    assert load_tokenizer(os.path.join(out, m["tokenizer"])).encode("café") == tok.encode("café")


def test_eos_separates_documents_and_val_is_disjoint(prepared, corpus, tok_dir):
    out, m = prepared
    tok = load_tokenizer(tok_dir)
    train_docs = split_docs(tok, read_split(out, m, "train"))
    val_docs = split_docs(tok, read_split(out, m, "val"))
    originals = [open(p, encoding="utf-8").read() for p in corpus]
    assert len(val_docs) == m["splits"]["val"]["documents"] == 3  # round(0.1 * 30)
    assert len(train_docs) == m["splits"]["train"]["documents"] == 27
    assert not set(train_docs) & set(val_docs)
    assert sorted(train_docs + val_docs) == sorted(originals)
    # train keeps the input order
    assert train_docs == [d for d in originals if d not in val_docs]


def test_prepare_is_deterministic_and_replaces_previous(tmp_path, corpus, tok_dir, prepared):
    out = str(tmp_path / "d")
    m1 = prepare_data(corpus, tok_dir, out, val_fraction=0.1, shard_tokens=500, show_progress=False)
    first = read_split(out, m1, "val")
    m2 = prepare_data(corpus, tok_dir, out, val_fraction=0.1, shard_tokens=500, show_progress=False)
    assert m1 == m2 and np.array_equal(first, read_split(out, m2, "val"))
    assert np.array_equal(read_split(*prepared, "val"), first)
    assert [n for n in os.listdir(tmp_path) if n != "d"] == []  # no temp dirs left beside it


def test_failed_prepare_leaves_old_data_intact(tmp_path, corpus, tok_dir, monkeypatch):
    out = str(tmp_path / "d")
    m = prepare_data(corpus[:5], tok_dir, out, val_fraction=0.2, show_progress=False)

    def boom(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(data, "copy_tokenizer", boom)
    with pytest.raises(RuntimeError):
        prepare_data(corpus, tok_dir, out, show_progress=False)
    assert load_manifest(out) == m
    assert os.listdir(tmp_path) == ["d"]
    with pytest.raises(RuntimeError):
        prepare_data(corpus, tok_dir, str(tmp_path / "new"), show_progress=False)
    assert os.listdir(tmp_path) == ["d"]


def test_jsonl_input(tmp_path, tok_dir):
    path = tmp_path / "c.jsonl"
    texts = [f"line {i} " + " ".join(WORDS[: i + 1]) for i in range(10)]
    path.write_text("\n".join(json.dumps({"text": t, "meta": i}) for i, t in enumerate(texts)) + "\n\n",
                    encoding="utf-8")
    assert list(iter_documents(str(path))) == texts
    out = str(tmp_path / "d")
    m = prepare_data([str(path)], tok_dir, out, val_fraction=0.2, show_progress=False)
    assert m["splits"]["train"]["documents"] == 8 and m["splits"]["val"]["documents"] == 2
    tok = load_tokenizer(tok_dir)
    assert sorted(split_docs(tok, read_split(out, m, "train")) + split_docs(tok, read_split(out, m, "val"))) \
        == sorted(texts)


def test_bad_input_errors(tmp_path, corpus, tok_dir):
    out = str(tmp_path / "d")
    with pytest.raises(DataError, match="no input files"):
        prepare_data([], tok_dir, out)
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        prepare_data([corpus[0], str(tmp_path / "nope.txt")], tok_dir, out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"content": "no text field"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: .*\"text\""):
        prepare_data([str(bad)], tok_dir, out)
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        prepare_data([str(bad)], tok_dir, out)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    empty_jsonl = tmp_path / "empty.jsonl"
    empty_jsonl.write_text('{"text": ""}\n')
    with pytest.raises(DataError, match="empty"):
        prepare_data([str(empty), str(empty_jsonl)], tok_dir, out)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DataError, match="latin1.txt: not valid UTF-8"):
        prepare_data([str(latin1)], tok_dir, out)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        prepare_data(corpus, str(tmp_path), out)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a nanoseek data directory"):
        prepare_data(corpus, tok_dir, str(foreign))
    assert (foreign / "precious.txt").read_text() == "keep me"
    assert not os.path.exists(out)


def test_single_document_holds_out_tail(tmp_path, tok_dir):
    path = write_docs(str(tmp_path), 1)[0]
    out = str(tmp_path / "d")
    m = prepare_data([path], tok_dir, out, val_fraction=0.25, show_progress=False)
    tok = load_tokenizer(tok_dir)
    whole = tok.encode(open(path, encoding="utf-8").read()) + [tok.eos_id]
    assert 0 < m["val_tokens"] < m["train_tokens"]
    assert np.concatenate([read_split(out, m, "train"), read_split(out, m, "val")]).tolist() == whole


def test_token_dtype():
    assert token_dtype(400) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32 and token_dtype(129280) == np.uint32


def test_batches_are_windows_of_the_stream(prepared):
    out, m = prepared
    stream = read_split(out, m, "train").astype(np.int64)
    ds = TokenDataset(out, "train", seq_len=32, seed=0)
    assert ds.num_tokens == len(stream)
    x, y = ds.batch(16)
    assert x.shape == y.shape == (16, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    s = stream.tobytes()
    for row in range(16):  # each row is a real window, possibly crossing shard boundaries
        window = np.concatenate([x[row].numpy(), y[row, -1:].numpy()])
        assert window.tobytes() in s
    # windows crossing every shard boundary read correctly
    for off in ds.offsets[1:-1]:
        assert np.array_equal(ds._window(int(off) - 3, 6), stream[off - 3: off + 3])


def test_batches_deterministic_and_resumable(prepared):
    out, _ = prepared
    a = TokenDataset(out, "train", seq_len=16, seed=7)
    b = TokenDataset(out, "train", seq_len=16, seed=7)
    c = TokenDataset(out, "train", seq_len=16, seed=8)
    xa, xb, xc = a.batch(8)[0], b.batch(8)[0], c.batch(8)[0]
    assert torch.equal(xa, xb) and not torch.equal(xa, xc)
    assert not torch.equal(xa, TokenDataset(out, "train", seq_len=16, seed=7, rank=1).batch(8)[0])

    run = TokenDataset(out, "train", seq_len=16, seed=3)
    for _ in range(3):
        run.batch(4)
    state = json.loads(json.dumps(run.state_dict()))  # survives a JSON round trip (saved with checkpoints)
    expected = [run.batch(4) for _ in range(3)]
    resumed = TokenDataset(out, "train", seq_len=16, seed=3)
    resumed.load_state_dict(state)
    for x, y in expected:
        rx, ry = resumed.batch(4)
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert resumed.state_dict() == run.state_dict()
    with pytest.raises(DataError, match="seq_len"):
        TokenDataset(out, "train", seq_len=8).load_state_dict(state)


def test_iter_sequential_covers_split(prepared):
    out, m = prepared
    stream = read_split(out, m, "val").astype(np.int64)
    ds = TokenDataset(out, "val", seq_len=8)
    batches = list(ds.iter_sequential(batch_size=5))
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    n = (len(stream) - 1) // 8
    assert xs.shape == (n, 8) and all(x.shape[0] <= 5 for x, _ in batches)
    assert np.array_equal(xs.reshape(-1).numpy(), stream[: n * 8])
    assert np.array_equal(ys.reshape(-1).numpy(), stream[1: n * 8 + 1])
    again = torch.cat([x for x, _ in ds.iter_sequential(batch_size=3)])
    assert torch.equal(xs, again)
    # two ranks split the windows between them
    r0 = torch.cat([x for x, _ in TokenDataset(out, "val", seq_len=8, rank=0).iter_sequential(4, world_size=2)])
    r1 = torch.cat([x for x, _ in TokenDataset(out, "val", seq_len=8, rank=1).iter_sequential(4, world_size=2)])
    assert torch.equal(r0, xs[0::2]) and torch.equal(r1, xs[1::2])


def test_dataset_errors(prepared, tmp_path):
    out, m = prepared
    with pytest.raises(DataError, match="fewer than seq_len"):
        TokenDataset(out, "val", seq_len=m["val_tokens"])
    TokenDataset(out, "val", seq_len=m["val_tokens"] - 1)  # exactly seq_len + 1 tokens is enough
    with pytest.raises(DataError, match="split must be"):
        TokenDataset(out, "test", seq_len=4)
    with pytest.raises(FileNotFoundError, match="data prepare"):
        TokenDataset(str(tmp_path), "train", seq_len=4)


def test_default_corpus_files():
    files = default_corpus_files(max_bytes=200_000)
    assert files and files == default_corpus_files(max_bytes=200_000)
    assert sum(os.path.getsize(f) for f in files) <= 200_000
    for f in files:
        parts = os.path.relpath(f, sysconfig.get_paths()["stdlib"]).replace("\\", "/").split("/")
        assert f.endswith(".py") and "site-packages" not in parts and "test" not in parts and "tests" not in parts
    assert len(default_corpus_files(max_bytes=400_000)) > len(files)


def test_cli_prepare(tmp_path, corpus, tok_dir, capsys):
    out = str(tmp_path / "d")
    main(["data", "prepare", "--input", *corpus[:4], "--tokenizer", tok_dir, "--out", out, "--json"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    m = load_manifest(out)
    assert summary["train_tokens"] == m["train_tokens"] > 0 and summary["documents"] == 4
    with pytest.raises(SystemExit) as e:  # one error style: "nanoseek CMD: error: ...", status 2
        main(["data", "prepare", "--input", str(tmp_path / "missing.txt"), "--tokenizer", tok_dir, "--out", out])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("nanoseek data: error:") and "missing.txt" in err
