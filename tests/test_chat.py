"""generate / chat front ends: streaming text, reasoning kept apart from the answer, R1-style history."""

import io
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from nanoseek import ModelConfig, Transformer
from nanoseek.chat import StreamDecoder, chat_loop, split_reasoning, stream_text
from nanoseek.engine import SamplingParams
from nanoseek.tokenizer import load_tokenizer, train_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    corpus = root / "corpus.txt"
    corpus.write_text("the answer is four. héllo wörld, ünïcode ✓ text.\n" * 50)
    train_tokenizer([str(corpus)], 300, str(root / "ckpt"))
    tok = load_tokenizer(str(root / "ckpt"))
    torch.manual_seed(0)
    Transformer(ModelConfig.from_preset("tiny").replace(vocab_size=tok.vocab_size)).save_pretrained(root / "ckpt")
    return str(root / "ckpt")


def test_split_reasoning():
    assert split_reasoning("<think> a b </think> 42") == ("a b", "42")
    assert split_reasoning("no tags") == ("", "no tags")
    assert split_reasoning("<think>unfinished") == ("unfinished", "")


def test_stream_decoder_keeps_multibyte_characters_whole(checkpoint):
    tok = load_tokenizer(checkpoint)
    text = "ünïcode ✓ héllo"
    dec = StreamDecoder(tok)
    pieces = [dec.push(t) for t in tok.encode(text)]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)


class ScriptedEngine:
    """Stands in for the Engine: replies with fixed text, so the loop's bookkeeping is what is tested."""

    max_seq_len = 4096

    def __init__(self, tok, replies):
        self.tok, self.replies, self.prompts = tok, list(replies), []

    def stream(self, prompts, params):
        self.prompts.append(prompts[0])
        for t in self.tok.encode(self.replies.pop(0)) + [self.tok.eos_id]:
            yield SimpleNamespace(seq=0, token=t)


def test_chat_shows_reasoning_apart_and_keeps_only_answers(checkpoint):
    tok = load_tokenizer(checkpoint)
    engine = ScriptedEngine(tok, ["<think>two and two</think><answer>four</answer>", "<think>x</think>ok"])
    out = io.StringIO()
    params = SamplingParams(max_new_tokens=32, temperature=0)
    history = chat_loop(engine, tok, params, ["what is 2+2?", "", "thanks", "/exit", "never read"], out, color=True)
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[1]["content"] == "<answer>four</answer>" and history[3]["content"] == "ok"
    shown = out.getvalue()
    assert "\033[2m" in shown and "two and two" in shown.replace("\033[2m", "").replace("\033[0m", "")  # dimmed
    second_prompt = tok.decode(engine.prompts[1])
    assert "four" in second_prompt and "two and two" not in second_prompt  # history without reasoning


def test_stream_text_reports_inside_think(checkpoint):
    tok = load_tokenizer(checkpoint)
    engine = ScriptedEngine(tok, ["<think>hmm</think>yes"])
    seen = []
    reply = stream_text(engine, tok, [0], None, lambda piece, thinking: seen.append((piece, thinking)))
    assert reply.thinking == "hmm" and reply.answer == "yes"
    assert "".join(p for p, thinking in seen if thinking) == "<think>hmm</think>"
    assert "".join(p for p, thinking in seen if not thinking) == "yes"


def test_generate_cli_streams_a_continuation(checkpoint, tmp_path, capsys):
    run = [sys.executable, "-m", "nanoseek", "generate", "--model", checkpoint, "--prompt", "the answer",
           "--max-new-tokens", "8", "--temperature", "0"]
    out = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("the answer") and len(out.stdout.strip()) > len("the answer")
    again = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert again.stdout == out.stdout  # greedy is deterministic
    from nanoseek.cli import main  # the bad directory in-process: the same error, without a third interpreter
    with pytest.raises(SystemExit) as bad:
        main(run[3:5] + [str(tmp_path)] + run[6:])
    assert bad.value.code != 0 and "no tokenizer.json" in capsys.readouterr().err
