"""Text inputs for the tokenizer and the data pipeline: input files, their documents, and the built-in corpus."""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterator


class DataError(ValueError):
    """Bad data input or a data directory that cannot serve the request; the message says what to change."""


def check_inputs(paths: list[str]) -> None:
    """Fail early, naming the file, when there are no inputs or one is missing."""
    if not paths:
        raise DataError("no input files given; pass --input FILE... (text files or .jsonl with a 'text' field)")
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"input file not found: {p!r}")


def _read_text(path: str) -> str:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not valid UTF-8 at byte {e.start}; convert the file to UTF-8") from None


def iter_documents(path: str) -> Iterator[str]:
    """Yield the non-empty documents of one file: a .jsonl file gives one per line ("text" field),
    any other file is one document."""
    if not path.endswith(".jsonl"):
        text = _read_text(path)
        if text:
            yield text
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{lineno}: not valid UTF-8; convert the file to UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict) or "text" not in obj:
                raise DataError(f"{path}:{lineno}: a JSONL line must be an object with a \"text\" field")
            if not isinstance(obj["text"], str):
                raise DataError(f"{path}:{lineno}: \"text\" must be a string, got {type(obj['text']).__name__}")
            if obj["text"]:
                yield obj["text"]


def default_corpus_files(max_bytes: int = 8_000_000) -> list[str]:
    """The built-in corpus: .py sources of the running Python's standard library, sorted by path, up to max_bytes.

    Why this corpus: every Python install carries it, so `make demo` trains a tokenizer and a tiny model with
    no download and no network; it is real, varied, mostly English-commented text that a small model can
    visibly learn; and it is the same bytes on every machine with the same Python version, so runs repeat.
    Test directories (often deliberately odd encodings and huge generated data), site-packages (what the user
    installed, not the stdlib), `encodings` (codec tables) and files that are not UTF-8 are skipped.
    """
    root = sysconfig.get_paths()["stdlib"]
    skip_dirs = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "encodings"}
    candidates = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip_dirs)
        candidates += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    files, total = [], 0
    for path in sorted(candidates, key=lambda p: os.path.relpath(p, root)):
        size = os.path.getsize(path)
        if size == 0 or total + size > max_bytes:
            continue
        try:
            with open(path, "rb") as f:
                f.read().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        files.append(path)
        total += size
    if not files:
        raise DataError(f"found no Python standard library sources under {root!r} for the default corpus; "
                        f"pass --input FILE... instead")
    return files
