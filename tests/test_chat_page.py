"""The chat page at / in a real headless browser (Debian's chromium through playwright): a message typed in the
page streams back through the API, reasoning folded apart from the answer. Skips, saying why, without a browser."""

import shutil

import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install -e '.[test]'")

from nanoseek import ModelConfig, Transformer  # noqa: E402
from nanoseek.serve.server import ServerThread, load_app  # noqa: E402
from nanoseek.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.skipif(chromium() is None, reason="no chromium on PATH (apt-get install -y chromium; .ci/run does)")
def test_chat_page_streams_an_answer(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("<think>two and two</think> four. hello world.\n" * 50)
    ckpt = str(tmp_path / "page")
    train_tokenizer([str(corpus)], 300, ckpt)
    torch.manual_seed(0)
    Transformer(ModelConfig.from_preset("tiny").replace(vocab_size=load_tokenizer(ckpt).vocab_size)).save_pretrained(ckpt)
    app, _ = load_app(ckpt, max_batch_size=2, max_seq_len=128, api_key="k")
    with ServerThread(app) as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            assert page.goto(url + "/").status == 401  # with --api-key the page too needs the key
            page.goto(url + "/?key=k")  # the page keeps the key from the address and sends it as a header
            assert page.input_value("#key") == "k" and "key=" not in page.url
            page.wait_for_function("document.getElementById('model').textContent === 'page'", timeout=10_000)
            page.fill("#input", "two and two?")
            page.press("#input", "Enter")
            page.wait_for_selector(".assistant[data-done='1']", timeout=30_000)
            reply = page.inner_text(".assistant")
            assert reply.strip() and not page.query_selector(".error")
            assert page.inner_text(".user") == "two and two?"
            for d in page.query_selector_all(".assistant details"):  # reasoning, if any, is folded away
                assert d.get_attribute("open") is None
        finally:
            browser.close()
