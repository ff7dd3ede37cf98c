"""Shared test setup: one torch thread (tiny models gain nothing from threads, CI has 2 cores, and single-threaded
CPU kernels are deterministic), and one small tokenizer + prepared corpus for the training tests."""

import os

import pytest
import torch

# the suite runs the plain eager decode path; tests/test_decode.py turns the compiled one on where it checks it
os.environ.setdefault("NANOSEEK_COMPILE", "0")


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A 384-token tokenizer and token shards over ~200 KB of the standard library's sources."""
    from nanoseek.data import default_corpus_files, prepare_data
    from nanoseek.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("corpus")
    files = default_corpus_files(max_bytes=200_000)
    train_tokenizer(files, 384, str(root / "tok"))
    prepare_data(files, str(root / "tok"), str(root / "data"), show_progress=False)
    return str(root / "data")
