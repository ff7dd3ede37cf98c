"""The OpenAI wire format: request schemas (pydantic), error bodies, and the text side of a generated sequence
(reasoning split by token id, stop strings, incremental UTF-8-safe decoding).

Reasoning follows DeepSeek-R1 as vLLM's deepseek_r1 parser reads it: everything before `</think>` is reasoning
(`reasoning_content`, DeepSeek's field; also `reasoning`, vLLM's newer name), the rest is `content`; an output
without `</think>` is all reasoning. `<think>` and `</think>` themselves appear in neither.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error with OpenAI's body {"error": {"message", "type", "param", "code"}} and an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": _ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Request(BaseModel):
    # unknown fields are ignored, as OpenAI's clients send more than a small server reads
    model_config = ConfigDict(extra="ignore")

    model: str
    n: int = Field(1, ge=1, le=16)
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)  # vLLM's extension; 0 is off
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # vLLM's extension
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens even past EOS (benchmarks)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    def stop_strings(self) -> list[str]:
        s = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [x for x in s if x]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Request):
    messages: list[Message]
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for completions
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: a string, a token-id list, or a list of either."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    def limit(self) -> int | None:
        return self.max_tokens


def validation_error(e) -> APIError:
    """A pydantic ValidationError as a 400 naming the first offending field."""
    err = e.errors()[0]
    param = ".".join(str(x) for x in err.get("loc", ())) or None
    return APIError(400, f"{param}: {err.get('msg')}" if param else str(err.get("msg")), param, "invalid_value")


def chat_messages(req: ChatRequest) -> list[dict]:
    """Messages for the chat template. Reasoning sent back in history is dropped, as R1 does: only an assistant
    turn's answer is kept (text after `</think>`, or the whole text when it has none)."""
    out = []
    for m in req.messages:
        text = m.text()
        if m.role == "assistant" and "</think>" in text:
            text = text.split("</think>", 1)[1].strip()
        out.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    return out


def _byte_of() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: byte-level BPE writes each byte as one printable character."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):  # the other bytes (space, controls, ...) are written as the characters after U+00FF
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_OF = _byte_of()


class TokenLogprobs:
    """Entries of OpenAI's chat `logprobs.content`: {token, logprob, bytes, top_logprobs}. `bytes` are the token's
    raw UTF-8 bytes, read from its byte-level spelling, so a token that ends inside a multi-byte character (whose
    text alone is U+FFFD) still has its exact bytes; added tokens (<think>, EOS) are spelled as themselves."""

    def __init__(self, tok):
        self.tok = tok
        self.added = set(tok.tok.get_added_tokens_decoder())

    def bytes(self, token: int) -> list[int]:
        piece = self.tok.tok.id_to_token(token)
        if token in self.added or any(c not in _BYTE_OF for c in piece):
            return list(piece.encode())
        return [_BYTE_OF[c] for c in piece]

    def one(self, token: int, logprob: float) -> dict:
        return {"token": self.tok.decode([token]), "logprob": logprob, "bytes": self.bytes(token)}

    def entry(self, token: int, logprob: float, top: list | None) -> dict:
        return {**self.one(token, logprob), "top_logprobs": [self.one(t, v) for t, v in top or []]}


class TextState:
    """The text of one generated sequence, fed a token at a time: `push(token)` returns (reasoning piece, content
    piece). `reasoning=False` (completions) sends everything to content.

    Stop strings are matched on what the client sees: the reasoning followed by the content (the `<think>` tags are
    in neither), so one may begin in the reasoning and end in the answer. A stop string ends the sequence: the text
    is cut before it, in both fields, and `stopped` is set. Text that could be the start of a stop string, or an
    incomplete UTF-8 character, is held back until later tokens decide (reasoning held at `</think>` is released
    before any content); `flush()` releases it at the end."""

    def __init__(self, tok, reasoning: bool, stop: list[str]):
        self.tok, self.stop = tok, stop
        self.think_open = tok.token_id("<think>") if reasoning else None
        self.think_close = tok.token_id("</think>") if reasoning else None
        self.in_reasoning = reasoning
        self.ids = {True: [], False: []}
        self.decoded = {True: "", False: ""}  # all text so far, per channel (True: reasoning)
        self.text = {True: "", False: ""}  # the part of it sent
        self.stopped = False
        self.reasoning_tokens = 0

    def _held(self, text: str) -> int:
        """Characters at the end of `text` that begin some stop string."""
        return max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)

    def _release(self, end: int) -> tuple[str, str]:
        """Send the visible text (reasoning + content) up to `end`: the new (reasoning, content) pieces."""
        r = len(self.decoded[True])
        out = []
        for channel, upto in ((True, min(end, r)), (False, max(end - r, 0))):
            new = self.decoded[channel][len(self.text[channel]): upto]
            self.text[channel] += new
            out.append(new)
        return out[0], out[1]

    def push(self, token: int) -> tuple[str, str]:
        if self.stopped:
            return "", ""
        if self.think_open is not None and token in (self.think_open, self.think_close):
            if token == self.think_close:
                self.in_reasoning = False
            if self.in_reasoning:
                self.reasoning_tokens += 1
            return "", ""
        channel = self.in_reasoning
        if channel:
            self.reasoning_tokens += 1
        self.ids[channel].append(token)
        self.decoded[channel] = self.tok.decode(self.ids[channel], skip_special=True)
        if self.decoded[channel].endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest of it
            return "", ""
        visible = self.decoded[True] + self.decoded[False]
        cuts = [i for i in (visible.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.stopped = True
            return self._release(min(cuts))
        return self._release(len(visible) - self._held(visible))

    def flush(self) -> tuple[str, str]:
        """At the end: what was held back (a possible stop-string start, an unfinished character), per channel."""
        if self.stopped:  # the text already ends where the stop string began
            return "", ""
        return self._release(len(self.decoded[True]) + len(self.decoded[False]))

    @property
    def reasoning(self) -> str:
        return self.text[True]

    @property
    def content(self) -> str:
        return self.text[False]


def usage(prompt_tokens: int, completion_tokens: int, cached: int, reasoning_tokens: int | None = None) -> dict:
    """OpenAI's usage, with cached prompt tokens as OpenAI and DeepSeek report them."""
    u: dict[str, Any] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens,
                         "prompt_tokens_details": {"cached_tokens": cached},
                         "prompt_cache_hit_tokens": cached, "prompt_cache_miss_tokens": prompt_tokens - cached}
    if reasoning_tokens is not None:
        u["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return u
