"""`nanoseek generate` and `nanoseek chat`: text in, streamed text out, through the Engine and the checkpoint's
own tokenizer. Chat shows the model's reasoning (<think> ... </think>) apart from its answer and, as R1 does, keeps
only the answer in the conversation history."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TextIO

import torch

from nanoseek.engine import Engine
from nanoseek.model import Transformer
from nanoseek.tokenizer import load_tokenizer

DIM, RESET = "\033[2m", "\033[0m"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_model(model_dir: str, max_seq_len: int, dtype: str = "float32", command: str = "generate"):
    """(model, tokenizer, max_seq_len capped at the model's positions) for a checkpoint directory that holds a
    tokenizer, as every inference command needs them."""
    if not os.path.exists(os.path.join(model_dir, "tokenizer.json")):
        raise ValueError(f"{model_dir} has no tokenizer.json: {command} needs the checkpoint's tokenizer "
                         "(training runs copy it into every checkpoint)")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    model = Transformer.from_pretrained(model_dir, dtype=DTYPES[dtype])
    return model, load_tokenizer(model_dir), min(max_seq_len, model.config.max_position_embeddings)


def load(model_dir: str, max_seq_len: int, dtype: str = "float32"):
    """(engine, tokenizer) for a checkpoint directory that holds a tokenizer."""
    model, tok, max_seq_len = load_model(model_dir, max_seq_len, dtype)
    return Engine(model, max_batch_size=1, max_seq_len=max_seq_len), tok


class StreamDecoder:
    """Turns a token stream into text pieces. Decoding the whole sequence each time and printing the new suffix
    keeps multi-byte characters intact when one character spans several byte-level tokens."""

    def __init__(self, tok):
        self.tok, self.ids, self.text = tok, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special=True)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest of the character
            return ""
        new, self.text = text[len(self.text):], text
        return new


@dataclass
class Reply:
    thinking: str
    answer: str
    tokens: int


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning inside <think>...</think>, the rest): what chat shows dimmed and what it keeps in history."""
    if "<think>" in text:
        before, _, rest = text.partition("<think>")
        thinking, closed, after = rest.partition("</think>")
        return thinking.strip(), (before + after).strip() if closed else before.strip()
    return "", text.strip()


def stream_text(engine, tok, prompt_ids: list[int], params, write: Callable[[str, bool], None],
                echo: str = "") -> Reply:
    """Generate for one prompt, calling write(piece, inside_think) as text arrives; `echo` (the prompt, for plain
    generation) is written once the request has been accepted."""
    think_open, think_close = tok.token_id("<think>"), tok.token_id("</think>")
    dec = StreamDecoder(tok)
    inside, n = False, 0
    events = engine.stream([prompt_ids], params)  # raises on a bad request, before anything is printed
    if echo:
        write(echo, False)
    for ev in events:
        n += 1
        if ev.token == think_open:
            inside = True
        piece = dec.push(ev.token)
        if piece:
            write(piece, inside)
        if ev.token == think_close:
            inside = False
    thinking, answer = split_reasoning(dec.text)
    return Reply(thinking, answer, n)


def terminal_writer(out: TextIO, color: bool) -> Callable[[str, bool], None]:
    def write(piece: str, thinking: bool) -> None:
        out.write(f"{DIM}{piece}{RESET}" if thinking and color else piece)
        out.flush()
    return write


def chat_loop(engine, tok, params, lines: Iterable[str], out: TextIO, system: str | None = None,
              color: bool = False) -> list[dict]:
    """The interactive loop over input lines ('/reset' clears history, '/exit' quits); returns the history."""
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    write = terminal_writer(out, color)
    out.write("nanoseek chat: type a message; /reset clears the history, /exit quits.\n> ")
    out.flush()
    for line in lines:
        line = line.rstrip("\n")
        if line.strip() == "/exit":
            break
        if line.strip() == "/reset":
            history = history[:1] if system else []
            out.write("(history cleared)\n> ")
            out.flush()
            continue
        if not line.strip():
            out.write("> ")
            continue
        history.append({"role": "user", "content": line})
        ids = tok.encode_chat(history, add_generation_prompt=True)
        if len(ids) + params.max_new_tokens > engine.max_seq_len:
            out.write(f"(the conversation is {len(ids)} tokens, too long for max_seq_len {engine.max_seq_len}: "
                      "/reset to start over)\n> ")
            history.pop()
            continue
        reply = stream_text(engine, tok, ids, params, write)
        history.append({"role": "assistant", "content": reply.answer})  # R1 keeps only the answer
        out.write("\n> ")
        out.flush()
    return history
