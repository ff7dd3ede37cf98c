"""Token shards and samplers: text -> flat token files on disk -> random (x, y) training windows.

Layout of a prepared data directory (what `nanoseek data prepare` writes):

    manifest.json          dtype, vocab_size, eos_id, shards with their token counts, train/val totals
    train_000000.bin ...   flat token ids (uint16 when vocab_size <= 65535, else uint32), raw numpy dumps
    val_000000.bin ...     the held-out documents, same format
    tokenizer/             a copy of the tokenizer used, so the data can always be decoded

Documents are concatenated, each followed by the EOS token, as in GPT-style pretraining: the model sees
where documents end and learns to stop. Training windows are drawn uniformly at random over a split's
token stream (shards are read through np.memmap, so nothing is loaded into RAM).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from nanoseek.corpus import DataError, check_inputs, default_corpus_files, iter_documents  # noqa: F401 (re-exported)
from nanoseek.io_utils import atomic_directory, atomic_write_text
from nanoseek.tokenizer import copy_tokenizer, load_tokenizer

MANIFEST = "manifest.json"
FORMAT = "nanoseek-tokens/1"


# --------------------------------------------------------------------------------------------- writing shards
def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.uint32)


@dataclass
class _ShardWriter:
    """Append token arrays; write a `{split}_{n:06d}.bin` file every `shard_tokens` tokens."""

    out_dir: str
    split: str
    shard_tokens: int
    dtype: np.dtype
    shards: list = field(default_factory=list)
    documents: int = 0
    _buf: list = field(default_factory=list)
    _buf_len: int = 0

    def add(self, ids: np.ndarray) -> None:
        self._buf.append(ids.astype(self.dtype))
        self._buf_len += len(ids)
        self.documents += 1
        while self._buf_len >= self.shard_tokens:
            flat = np.concatenate(self._buf)
            self._write(flat[: self.shard_tokens])
            rest = flat[self.shard_tokens:]
            self._buf, self._buf_len = [rest], len(rest)

    def close(self) -> None:
        if self._buf_len:
            self._write(np.concatenate(self._buf))
        self._buf, self._buf_len = [], 0

    def _write(self, arr: np.ndarray) -> None:
        name = f"{self.split}_{len(self.shards):06d}.bin"
        arr.tofile(os.path.join(self.out_dir, name))
        self.shards.append({"file": name, "tokens": int(len(arr))})

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards)


def _count_documents(inputs: list[str]) -> int:
    """First pass: count (and validate) documents, so the val split is chosen before any tokenizing."""
    return sum(1 for path in inputs for _ in iter_documents(path))


def prepare_data(inputs: list[str], tokenizer_dir: str, out_dir: str, val_fraction: float = 0.01,
                 shard_tokens: int = 2**26, seed: int = 0, show_progress: bool = True) -> dict:
    """Tokenize `inputs` into train/val token shards in out_dir and return the manifest.

    Validation split: round(val_fraction * documents) whole documents (at least one), chosen with a seeded
    permutation, so the same inputs always give the same split. With a single document there is nothing to
    hold out by document, so its last val_fraction of tokens (at least one token) becomes val instead.
    val_fraction=0 gives no validation split.
    The whole directory is built beside out_dir and renamed into place: no half-written data directory.
    """
    _check_prepare_args(inputs, out_dir, val_fraction, shard_tokens)
    tok = load_tokenizer(tokenizer_dir)
    dtype = token_dtype(tok.vocab_size)
    n_docs = _count_documents(inputs)
    if n_docs == 0:
        raise DataError(f"all {len(inputs)} input file(s) are empty; nothing to tokenize")
    val_docs = _val_documents(n_docs, val_fraction, seed)

    with atomic_directory(out_dir) as tmp:
        train = _ShardWriter(tmp, "train", shard_tokens, dtype)
        val = _ShardWriter(tmp, "val", shard_tokens, dtype)
        _tokenize(inputs, tok, n_docs, val_docs, train, val, show_progress)
        if n_docs == 1 and val_fraction > 0:
            _split_tail(train, val, val_fraction)
        train.close()
        val.close()
        copy_tokenizer(tokenizer_dir, os.path.join(tmp, "tokenizer"))
        manifest = _manifest(inputs, tok, dtype, val_fraction, seed, train, val)
        atomic_write_text(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=2) + "\n")
    return manifest


def _check_prepare_args(inputs: list[str], out_dir: str, val_fraction: float, shard_tokens: int) -> None:
    """prepare_data's argument checks, before any tokenizer is loaded or file read."""
    check_inputs(inputs)
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens < 1:
        raise DataError(f"shard_tokens must be positive, got {shard_tokens}")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.isfile(os.path.join(out_dir, MANIFEST)):
        # atomic_directory replaces out_dir wholesale; never do that to a folder that is not ours
        raise DataError(f"output directory {out_dir!r} exists and is not a nanoseek data directory; "
                        f"choose a new --out")


def _val_documents(n_docs: int, val_fraction: float, seed: int) -> set[int]:
    """Indices of the held-out documents: a seeded choice, none for a single document."""
    n_val = 0 if val_fraction == 0 or n_docs == 1 else max(1, round(val_fraction * n_docs))
    n_val = min(n_val, n_docs - 1)  # keep at least one training document
    return set(np.random.default_rng(seed).permutation(n_docs)[:n_val].tolist())


def _tokenize(inputs: list[str], tok, n_docs: int, val_docs: set[int], train: _ShardWriter, val: _ShardWriter,
              show_progress: bool) -> None:
    """Second pass: every document, with EOS after it, into the train or val writer."""
    bar = tqdm(total=n_docs, desc="tokenizing", unit="doc", disable=not show_progress)
    eos, doc_index, batch = tok.eos_id, 0, []
    for text in (t for path in inputs for t in iter_documents(path)):
        batch.append(text)
        if len(batch) == 64:  # encode_batch tokenizes a batch in parallel (Rust threads)
            doc_index = _encode_into(tok, batch, doc_index, val_docs, eos, train, val, bar)
            batch = []
    _encode_into(tok, batch, doc_index, val_docs, eos, train, val, bar)
    bar.close()


def _manifest(inputs: list[str], tok, dtype: np.dtype, val_fraction: float, seed: int, train: _ShardWriter,
              val: _ShardWriter) -> dict:
    """manifest.json's contents: how the data was made and what each split holds."""
    return {
        "format": FORMAT,
        "dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "bos_id": tok.bos_id,
        "tokenizer": "tokenizer",
        "inputs": [os.path.abspath(p) for p in inputs],
        "val_fraction": val_fraction,
        "seed": seed,
        "train_tokens": train.tokens,
        "val_tokens": val.tokens,
        "splits": {
            "train": {"documents": train.documents, "tokens": train.tokens, "shards": train.shards},
            "val": {"documents": val.documents, "tokens": val.tokens, "shards": val.shards},
        },
    }


def _encode_into(tok, texts, doc_index, val_docs, eos, train, val, bar) -> int:
    for ids in tok.encode_batch(texts):
        arr = np.asarray(ids + [eos], dtype=np.int64)
        (val if doc_index in val_docs else train).add(arr)
        doc_index += 1
        bar.update(1)
    return doc_index


def _split_tail(train: _ShardWriter, val: _ShardWriter, val_fraction: float) -> None:
    """Single-document input: move the tail of the (still buffered or last-written) train tokens to val."""
    train.close()  # flush, so all train tokens are in shard files
    last = train.shards[-1]
    path = os.path.join(train.out_dir, last["file"])
    arr = np.fromfile(path, dtype=train.dtype)
    n_val = min(max(1, round(val_fraction * train.tokens)), len(arr) - 1)
    if n_val <= 0:
        return
    arr[:-n_val].tofile(path)
    last["tokens"] = int(len(arr) - n_val)
    val.add(arr[-n_val:].astype(np.int64))


# --------------------------------------------------------------------------------------------- reading shards
def load_manifest(data_dir: str) -> dict:
    path = os.path.join(data_dir, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {MANIFEST} in {data_dir!r}; create it with "
                                f"`nanoseek data prepare --input FILE... --tokenizer DIR --out {data_dir}`")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class TokenDataset:
    """Random or sequential (x, y) windows over one split of a prepared data directory.

    batch() draws start positions uniformly over the split's whole token stream (windows may cross shard
    and document boundaries, as in nanoGPT) from a numpy Generator seeded by (seed, rank); state_dict()
    captures that generator, so a resumed run draws exactly the batches the uninterrupted run would have.
    With several processes, pass rank so each draws different windows.
    """

    def __init__(self, data_dir: str, split: str = "train", seq_len: int = 256, seed: int = 0, rank: int = 0):
        if split not in ("train", "val"):
            raise DataError(f"split must be 'train' or 'val', got {split!r}")
        if seq_len < 1:
            raise DataError(f"seq_len must be positive, got {seq_len}")
        self.manifest = load_manifest(data_dir)
        self.data_dir, self.split, self.seq_len, self.seed, self.rank = data_dir, split, seq_len, seed, rank
        self.vocab_size = self.manifest["vocab_size"]
        self.eos_id = self.manifest["eos_id"]
        dtype = np.dtype(self.manifest["dtype"])
        shards = self.manifest["splits"][split]["shards"]
        self.shards = [np.memmap(os.path.join(data_dir, s["file"]), dtype=dtype, mode="r", shape=(s["tokens"],))
                       for s in shards if s["tokens"] > 0]
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])  # shard i holds [offsets[i], offsets[i+1])
        self.num_tokens = int(self.offsets[-1])
        if self.num_tokens < seq_len + 1:
            hint = ("prepare more data or a larger val_fraction" if split == "val" else "prepare more data")
            raise DataError(f"the {split} split of {data_dir!r} holds {self.num_tokens} tokens, fewer than "
                            f"seq_len + 1 = {seq_len + 1}; use a smaller --seq-len or {hint}")
        self.rng = np.random.default_rng([seed, rank])
        self.batches_drawn = 0

    def _window(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) of the split's stream, gathered across shards."""
        parts, i = [], int(np.searchsorted(self.offsets, start, side="right") - 1)
        while n > 0:
            lo = start - int(self.offsets[i])
            take = min(n, len(self.shards[i]) - lo)
            parts.append(self.shards[i][lo: lo + take])
            start, n, i = start + take, n - take, i + 1
        return np.concatenate(parts).astype(np.int64)

    def _stack(self, starts) -> tuple[torch.Tensor, torch.Tensor]:
        buf = torch.from_numpy(np.stack([self._window(int(s), self.seq_len + 1) for s in starts]))
        return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()

    def batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A random batch: x [batch_size, seq_len] int64, y = x shifted left by one token."""
        starts = self.rng.integers(0, self.num_tokens - self.seq_len, size=batch_size)
        self.batches_drawn += 1
        return self._stack(starts)

    def num_sequential_windows(self) -> int:
        return (self.num_tokens - 1) // self.seq_len

    def iter_sequential(self, batch_size: int, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every non-overlapping window of the split in order (for validation), batch_size at a time; the last
        batch may be smaller. With world_size > 1, this rank gets windows rank, rank + world_size, ..."""
        starts = np.arange(self.num_sequential_windows())[self.rank::world_size] * self.seq_len
        for i in range(0, len(starts), batch_size):
            yield self._stack(starts[i: i + batch_size])

    def state_dict(self) -> dict:
        """JSON-serialisable sampling position: the generator state plus what it was made for."""
        return {"split": self.split, "seq_len": self.seq_len, "seed": self.seed, "rank": self.rank,
                "batches_drawn": self.batches_drawn, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        for key in ("split", "seq_len"):
            if state.get(key) != getattr(self, key):
                raise DataError(f"cannot resume: data state was saved with {key}={state.get(key)!r}, "
                                f"this dataset has {key}={getattr(self, key)!r}")
        self.rng.bit_generator.state = state["rng"]
        self.batches_drawn = int(state.get("batches_drawn", 0))
