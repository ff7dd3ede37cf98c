"""`nanoseek serve`: a live server on a free local port, driven by the real `openai` client (chat streaming and
not, completions with logprobs) and by raw HTTP for every bad input. Every server a test starts is stopped by it."""

import asyncio
import json
import logging
import time

import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
openai = pytest.importorskip("openai", reason="the openai client is not installed: pip install -e '.[test]'")
httpx = pytest.importorskip("httpx")

from nanoseek import ModelConfig, Transformer  # noqa: E402
from nanoseek.engine import Engine, SamplingParams  # noqa: E402
from nanoseek.serve.app import create_app  # noqa: E402
from nanoseek.serve.server import ServerThread, load_app  # noqa: E402
from nanoseek.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402

NAME = "tiny"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    corpus = root / "corpus.txt"
    corpus.write_text("<think>the answer is four</think> four. héllo wörld ✓ two and two.\n" * 50)
    train_tokenizer([str(corpus)], 300, str(root / NAME))
    tok = load_tokenizer(str(root / NAME))
    torch.manual_seed(0)
    Transformer(ModelConfig.from_preset("tiny").replace(vocab_size=tok.vocab_size)).save_pretrained(root / NAME)
    return str(root / NAME)


@pytest.fixture(scope="module")
def server(checkpoint):
    """One server for the module: 4 rows, 256-token context, a short queue."""
    app, engine = load_app(checkpoint, max_batch_size=4, max_seq_len=256, max_queue=8, prefix_cache_tokens=1024)
    with ServerThread(app) as url:
        yield url, engine
    assert not app.state.loop.thread.is_alive()  # the engine thread went down with the server


def client(url, **kw):
    return openai.OpenAI(base_url=url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


def offline(checkpoint, prompt_ids, n):
    """Greedy tokens for one prompt on a fresh engine (no server): what the server must return."""
    model = Transformer.from_pretrained(checkpoint)
    tok = load_tokenizer(checkpoint)
    engine = Engine(model, max_batch_size=1, max_seq_len=256, prefix_cache_tokens=0)
    return engine.generate([prompt_ids], SamplingParams(n, temperature=0, stop_token_ids=(tok.eos_id,)))[0]


def split_ids(tok, ids):
    """(reasoning, content) text of generated ids, split by token id as the server does."""
    close, opened = tok.token_id("</think>"), tok.token_id("<think>")
    cut = ids.index(close) if close in ids else len(ids)
    keep = lambda xs: [t for t in xs if t not in (opened, close)]
    return tok.decode(keep(ids[:cut]), skip_special=True), tok.decode(keep(ids[cut + 1:]), skip_special=True)


def metric(url, name):
    text = httpx.get(url + "/metrics").text
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


# ---------------------------------------------------------------------------------------------- happy paths
def test_chat_matches_offline_generation_and_splits_reasoning(server, checkpoint):
    url, _ = server
    tok = load_tokenizer(checkpoint)
    msgs = [{"role": "user", "content": "two and two?"}]
    r = client(url).chat.completions.create(model=NAME, messages=msgs, max_tokens=12, temperature=0)
    ids = offline(checkpoint, tok.encode_chat(msgs, add_generation_prompt=True), 12)
    reasoning, content = split_ids(tok, ids)
    m = r.choices[0].message
    assert m.content == content and m.model_extra["reasoning_content"] == reasoning == m.model_extra["reasoning"]
    assert r.usage.completion_tokens == len(ids)
    close = tok.token_id("</think>")
    assert r.usage.completion_tokens_details.reasoning_tokens == (ids.index(close) if close in ids else len(ids))
    assert r.choices[0].finish_reason == ("stop" if ids[-1] == tok.eos_id else "length")


def test_chat_stream_equals_non_stream(server):
    url, _ = server
    kw = {"model": NAME, "messages": [{"role": "user", "content": "héllo"}], "max_tokens": 16, "temperature": 0}
    full = client(url).chat.completions.create(**kw).choices[0].message
    reasoning, content, usage, finish = "", "", None, None
    for chunk in client(url).chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            reasoning += (c.delta.model_extra or {}).get("reasoning_content") or ""
            content += c.delta.content or ""
            finish = c.finish_reason or finish
    assert (reasoning, content) == (full.model_extra["reasoning_content"], full.content)
    assert usage is not None and usage.completion_tokens > 0 and finish in ("stop", "length")


def test_concurrent_greedy_requests_equal_offline(server, checkpoint):
    """Seven requests at once on four rows (continuous batching, queueing): each equals its offline run."""
    url, _ = server
    tok = load_tokenizer(checkpoint)
    questions = [f"question {i}: " + "two " * i for i in range(7)]

    async def ask_all():
        c = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        rs = await asyncio.gather(*[c.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": q}], max_tokens=10, temperature=0) for q in questions])
        await c.close()
        return rs

    for q, r in zip(questions, asyncio.run(ask_all())):
        ids = offline(checkpoint, tok.encode_chat([{"role": "user", "content": q}], add_generation_prompt=True), 10)
        assert (r.choices[0].message.model_extra["reasoning_content"], r.choices[0].message.content) == \
            split_ids(tok, ids)


def test_n_seed_stop_and_history_reasoning_dropped(server):
    url, _ = server
    c = client(url)
    kw = {"model": NAME, "max_tokens": 8, "temperature": 1.0, "seed": 3, "n": 3,
              "messages": [{"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "<think>secret</think>four"},
                        {"role": "user", "content": "again"}]}
    a, b = c.chat.completions.create(**kw), c.chat.completions.create(**kw)
    assert [x.message.model_extra["reasoning_content"] for x in a.choices] == \
        [x.message.model_extra["reasoning_content"] for x in b.choices]
    assert sorted(x.index for x in a.choices) == [0, 1, 2]
    text = a.choices[0].message.model_extra["reasoning_content"] + (a.choices[0].message.content or "")
    if len(text) > 2:  # a stop string cuts the text before it and reports finish_reason "stop"
        stop = text[1:3]
        r = c.chat.completions.create(**{**kw, "n": 1, "stop": [stop]}).choices[0]
        assert stop not in (r.message.model_extra["reasoning_content"] + (r.message.content or ""))
        assert r.finish_reason == "stop"


def chat_text(c, **kw):
    """(reasoning, content, finish_reason) of one chat choice, non-streaming and streamed (pieces joined)."""
    full = c.chat.completions.create(**kw).choices[0]
    reasoning, content, finish = "", "", None
    for chunk in c.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            reasoning += (ch.delta.model_extra or {}).get("reasoning_content") or ""
            content += ch.delta.content or ""
            finish = ch.finish_reason or finish
    return (full.message.model_extra["reasoning_content"], full.message.content or "", full.finish_reason), \
        (reasoning, content, finish)


def test_chat_stop_strings_across_think_and_token_boundaries(server, checkpoint):
    """Stop strings are matched on reasoning followed by content, the text the client sees: one that begins in the
    reasoning and ends in the answer cuts both, and one across a token boundary inside the reasoning cuts there."""
    url, _ = server
    tok = load_tokenizer(checkpoint)
    close = tok.token_id("</think>")
    for q in ("hi", "two and two?", "héllo", "four", "a", "the answer", "wörld", "two"):  # a reply with </think>
        msgs = [{"role": "user", "content": q}]
        ids = offline(checkpoint, tok.encode_chat(msgs, add_generation_prompt=True), 24)
        reasoning, content = split_ids(tok, ids)
        if close in ids and len(reasoning) >= 2 and len(content) >= 2:
            break
    else:
        raise AssertionError("no prompt's greedy reply closes its reasoning mid-way: add prompts to the list")
    think = ids[: ids.index(close)]
    for k in range(len(think) - 1, 0, -1):  # the last token boundary in the reasoning with whole characters around
        at = len(left := tok.decode(think[:k], skip_special=True))
        if 0 < at < len(reasoning) and reasoning.startswith(left) and "\ufffd" not in reasoning[at - 1: at + 1]:
            break
    else:
        raise AssertionError(f"no clean token boundary in the reasoning {reasoning!r}")
    visible = reasoning + content
    for stop in (reasoning[-2:] + content[:2], reasoning[at - 1: at + 1]):  # spans </think>; spans two tokens
        cut = visible.find(stop)
        want = (visible[: min(cut, len(reasoning))], visible[len(reasoning): max(cut, len(reasoning))], "stop")
        full, streamed = chat_text(client(url), model=NAME, messages=msgs, max_tokens=24, temperature=0, stop=[stop])
        assert full == streamed == want, (stop, full, streamed, want)


def test_completions_logprobs_echo(server, checkpoint):
    """lm-evaluation-harness's local-completions scoring: token-id prompts, echo, logprobs=1."""
    url, _ = server
    tok = load_tokenizer(checkpoint)
    prompt = tok.encode("two and two is four", add_bos=True)
    r = client(url).completions.create(model=NAME, prompt=[prompt, prompt[:4]], max_tokens=1, temperature=0,
                                       logprobs=1, echo=True)
    model = Transformer.from_pretrained(checkpoint)
    with torch.no_grad():
        ref = model(torch.tensor([prompt]))[0].float().log_softmax(-1)
    ch = sorted(r.choices, key=lambda x: x.index)
    lp = ch[0].logprobs
    assert len(lp.token_logprobs) == len(prompt) + 1 and lp.token_logprobs[0] is None
    want = [float(ref[i, prompt[i + 1]]) for i in range(len(prompt) - 1)] + [float(ref[-1].max())]
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:], want)) < 1e-3
    assert lp.top_logprobs[1] and abs(max(lp.top_logprobs[-1].values()) - lp.token_logprobs[-1]) < 1e-6
    assert ch[0].text.startswith(tok.decode(prompt)) and len(ch[1].logprobs.token_logprobs) == 5
    # a plain string prompt, streamed
    text = "".join(c.choices[0].text for c in client(url).completions.create(
        model=NAME, prompt="two", max_tokens=5, temperature=0, stream=True) if c.choices)
    assert text == client(url).completions.create(model=NAME, prompt="two", max_tokens=5, temperature=0).choices[0].text
    # logprobs streamed: each chunk carries its tokens' entries; together they are the non-streamed object
    kw = dict(model=NAME, prompt="two", max_tokens=6, temperature=0, logprobs=2)
    whole = client(url).completions.create(**kw).choices[0].logprobs
    parts = [c.choices[0].logprobs for c in client(url).completions.create(stream=True, **kw)
             if c.choices and c.choices[0].logprobs]
    assert [t for p in parts for t in p.tokens] == whole.tokens and len(whole.tokens) == 6
    assert [o for p in parts for o in p.text_offset] == whole.text_offset
    assert max(abs(a - b) for a, b in zip([v for p in parts for v in p.token_logprobs], whole.token_logprobs)) < 1e-5
    assert error_of(httpx.post(url + "/v1/completions", json={**kw, "stream": True, "echo": True}), 400)["param"] \
        == "echo"


def test_chat_logprobs_match_the_model_streamed_and_not(server, checkpoint):
    """logprobs / top_logprobs in OpenAI's chat format: one entry per generated token of the offline greedy run,
    its log-probability and top alternatives those of the model's own log-softmax; the raw bytes spell the text."""
    url, _ = server
    tok = load_tokenizer(checkpoint)
    msgs = [{"role": "user", "content": "two and two?"}]
    kw = {"model": NAME, "messages": msgs, "max_tokens": 12, "temperature": 0, "logprobs": True, "top_logprobs": 3}
    r = client(url).chat.completions.create(**kw)
    prompt = tok.encode_chat(msgs, add_generation_prompt=True)
    ids = offline(checkpoint, prompt, 12)
    with torch.no_grad():
        ref = Transformer.from_pretrained(checkpoint)(torch.tensor([prompt + ids]))[0].float().log_softmax(-1)
    ref = ref[len(prompt) - 1: len(prompt) - 1 + len(ids)]  # position i predicts generated token i
    content = r.choices[0].logprobs.content
    assert [e.token for e in content] == [tok.decode([t]) for t in ids]
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace") == tok.decode(ids)
    for e, t, row in zip(content, ids, ref):
        assert abs(e.logprob - float(row[t])) < 1e-3
        top_v, top_i = row.topk(3)
        assert [x.token for x in e.top_logprobs] == [tok.decode([i]) for i in top_i.tolist()]
        assert max(abs(x.logprob - float(v)) for x, v in zip(e.top_logprobs, top_v)) < 1e-3
        assert e.top_logprobs[0].logprob == e.logprob  # greedy: the chosen token is the most likely one
    streamed = []
    for chunk in client(url).chat.completions.create(stream=True, **kw):
        for c in chunk.choices:
            streamed += c.logprobs.content if c.logprobs else []
    assert [(e.token, e.bytes) for e in streamed] == [(e.token, e.bytes) for e in content]
    assert max(abs(a.logprob - b.logprob) for a, b in zip(streamed, content)) < 1e-5
    assert client(url).chat.completions.create(**{**kw, "logprobs": False, "top_logprobs": None}).choices[0].logprobs \
        is None
    assert error_of(httpx.post(url + "/v1/chat/completions", json={**kw, "logprobs": False}), 400)["param"] == \
        "top_logprobs"


def test_prefix_cache_hit_reported_in_usage(server):
    url, _ = server
    system = "you are a careful assistant. " * 4
    c = client(url)
    kw = {"model": NAME, "max_tokens": 2, "temperature": 0}
    c.chat.completions.create(messages=[{"role": "system", "content": system}, {"role": "user", "content": "a"}], **kw)
    r = c.chat.completions.create(messages=[{"role": "system", "content": system}, {"role": "user", "content": "b"}],
                                  **kw)
    u = r.usage.model_dump()
    assert u["prompt_tokens_details"]["cached_tokens"] >= 32
    assert u["prompt_cache_hit_tokens"] + u["prompt_cache_miss_tokens"] == u["prompt_tokens"]
    assert metric(url, "vllm:prefix_cache_hits_total") >= 32


def test_models_health_metrics(server):
    url, _engine = server
    models = client(url).models.list().data
    assert [m.id for m in models] == [NAME] and models[0].model_extra["max_model_len"] == 256
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    text = httpx.get(url + "/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_count"):
        assert name in text, name


# ---------------------------------------------------------------------------------------------- bad input
def error_of(r, status):
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    return err


def test_bad_inputs_get_openai_errors_and_the_server_survives(server):
    url, _ = server
    chat = url + "/v1/chat/completions"
    ok = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    error_of(httpx.post(chat, content=b"{not json", headers={"content-type": "application/json"}), 400)
    assert error_of(httpx.post(chat, json={**ok, "max_tokens": "many"}), 400)["param"] == "max_tokens"
    error_of(httpx.post(chat, json={**ok, "messages": "hi"}), 400)
    error_of(httpx.post(chat, json={**ok, "temperature": -1}), 400)
    error_of(httpx.post(chat, json=[1, 2]), 400)
    assert error_of(httpx.post(chat, json={**ok, "model": "gpt-5"}), 404)["code"] == "model_not_found"
    assert error_of(httpx.post(chat, json={**ok, "messages": []}), 400)["param"] == "messages"
    err = error_of(httpx.post(chat, json={**ok, "max_tokens": 300}), 400)
    assert "256" in err["message"] and "300" in err["message"] and err["code"] == "context_length_exceeded"
    long = {**ok, "messages": [{"role": "user", "content": "two " * 400}], "max_tokens": None}
    assert error_of(httpx.post(chat, json=long), 400)["code"] == "context_length_exceeded"
    error_of(httpx.post(chat, json={**ok, "messages": [{"role": "user", "content": "x" * 2_000_000}]}), 413)
    err = error_of(httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": [1, 99999], "max_tokens": 1}),
                   400)
    assert "vocabulary" in err["message"]
    error_of(httpx.post(chat, json={**ok, "n": 9}), 429)  # 9 rows asked of an 8-deep queue
    error_of(httpx.get(url + "/v1/nothing"), 404)
    assert httpx.post(chat, json=ok).status_code == 200  # still serving


def test_full_queue_answers_429(checkpoint):
    app, _ = load_app(checkpoint, max_batch_size=1, max_seq_len=256, max_queue=2)
    body = {"model": NAME, "prompt": "two", "max_tokens": 200, "ignore_eos": True}
    with ServerThread(app) as url:
        async def flood():
            async with httpx.AsyncClient(timeout=60) as c:
                return await asyncio.gather(*[c.post(url + "/v1/completions", json=body) for _ in range(6)])
        codes = sorted(r.status_code for r in asyncio.run(flood()))
        assert 200 in codes and 429 in codes, codes


def test_disconnect_frees_the_row(server):
    url, _ = server
    body = {"model": NAME, "messages": [{"role": "user", "content": "talk"}], "max_tokens": 220, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
        it = r.iter_lines()
        for _ in range(3):
            next(it)
        assert metric(url, "vllm:num_requests_running") == 1
    deadline = time.time() + 10
    while metric(url, "vllm:num_requests_running") != 0:
        assert time.time() < deadline, "the disconnected request still holds its row"
        time.sleep(0.05)
    # and a non-streaming request whose client times out
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json={**body, "stream": False}, timeout=0.3)
    deadline = time.time() + 10
    while metric(url, "vllm:num_requests_running") != 0:
        assert time.time() < deadline, "the timed-out request still holds its row"
        time.sleep(0.05)


def test_api_key(checkpoint):
    app, _ = load_app(checkpoint, max_batch_size=1, max_seq_len=64, api_key="sekrit")
    with ServerThread(app) as url:
        assert httpx.get(url + "/health").status_code == 200
        for path in ("/v1/models", "/metrics", "/", "/?key=wrong", "/v1/models?key=sekrit"):
            assert error_of(httpx.get(url + path), 401)["code"] == "invalid_api_key", path
        # the page: with the header, or with ?key= (a browser's address bar cannot send a header)
        for r in (httpx.get(url + "/", headers={"Authorization": "Bearer sekrit"}), httpx.get(url + "/?key=sekrit")):
            assert r.status_code == 200 and "<textarea" in r.text
        # and uvicorn's access log (on in `nanoseek serve`) does not write the key down
        rec = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                                ("127.0.0.1:1", "GET", "/?key=sekrit&x=1", "1.1", 200), None)
        assert all(f.filter(rec) for f in logging.getLogger("uvicorn.access").filters)
        assert "sekrit" not in rec.getMessage() and "x=1" in rec.getMessage()
        error_of(httpx.post(url + "/v1/chat/completions", json={}), 401)
        with pytest.raises(openai.AuthenticationError):
            client(url, api_key="wrong").models.list()
        assert client(url, api_key="sekrit").models.list().data[0].id == NAME


def flaky_engine(checkpoint, failures):
    """An engine whose prefill forward raises (inside a scheduler step, after admission) while failures[0] > 0,
    counting down, then works."""
    engine = Engine(Transformer.from_pretrained(checkpoint), max_batch_size=1, max_seq_len=256)
    prefill = engine.prefill

    def flaky(*args, **kw):
        if failures[0] > 0:
            failures[0] -= 1
            raise RuntimeError("boom")
        return prefill(*args, **kw)

    engine.prefill = flaky
    return engine


def test_a_failed_step_fails_its_requests_and_the_server_serves_on(checkpoint):
    """A step that raises once: the request in it gets a 500 (an error event when streaming), its row is freed,
    the request waiting beside it is served, and so is every later one; /health stays 200."""
    failures = [0]
    engine = flaky_engine(checkpoint, failures)
    app = create_app(engine, load_tokenizer(checkpoint), NAME)
    tok = load_tokenizer(checkpoint)
    msgs = [{"role": "user", "content": "two and two?"}]
    body = {"model": NAME, "messages": msgs, "max_tokens": 8, "temperature": 0}
    want = split_ids(tok, offline(checkpoint, tok.encode_chat(msgs, add_generation_prompt=True), 8))
    with ServerThread(app) as url:
        chat = url + "/v1/chat/completions"

        async def two():  # one row: the first step holds one request, the other waits
            async with httpx.AsyncClient(timeout=60) as c:
                return await asyncio.gather(c.post(chat, json=body), c.post(chat, json=body))

        failures[0] = 1
        rs = sorted(asyncio.run(two()), key=lambda r: r.status_code)
        assert [r.status_code for r in rs] == [200, 500]
        assert error_of(rs[1], 500)["code"] == "engine_error" and "boom" in rs[1].json()["error"]["message"]
        m = rs[0].json()["choices"][0]["message"]
        assert (m["reasoning_content"], m["content"]) == want
        failures[0] = 1
        with httpx.stream("POST", chat, json={**body, "stream": True}, timeout=60) as r:
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert r.status_code == 200 and json.loads(events[-1])["error"]["code"] == "engine_error", events
        with pytest.raises(openai.APIError, match="boom"):
            failures[0] = 1
            list(client(url).chat.completions.create(stream=True, **body))
        sched = engine.scheduler
        assert not sched.running and sched.free_rows == [0] and app.state.loop.queued == 0  # rows and queue freed
        assert httpx.get(url + "/health").status_code == 200 and metric(url, "vllm:num_requests_running") == 0
        r = client(url).chat.completions.create(**body)
        assert (r.choices[0].message.model_extra["reasoning_content"], r.choices[0].message.content) == want


def test_health_503_when_the_engine_loop_dies(checkpoint):
    """A step that always raises: each request fails with a 500 until MAX_FAILED_STEPS in a row say the engine cannot
    go on; then /health is 503 and later requests are refused at once."""
    from nanoseek.serve.worker import MAX_FAILED_STEPS

    engine = flaky_engine(checkpoint, [10**9])
    with ServerThread(create_app(engine, load_tokenizer(checkpoint), NAME)) as url:
        body = {"model": NAME, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
        rs = [httpx.post(url + "/v1/chat/completions", json=body, timeout=30) for _ in range(MAX_FAILED_STEPS)]
        assert [r.status_code for r in rs] == [500] * (MAX_FAILED_STEPS - 1) + [503]
        assert all(error_of(r, r.status_code)["code"] == "engine_error" and "boom" in r.text for r in rs)
        assert httpx.get(url + "/health").status_code == 503
        r = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": "hi", "max_tokens": 2}, timeout=10)
        assert error_of(r, 503)["code"] == "engine_error"  # later requests are refused, not left hanging


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_flags():
    from nanoseek.cli import build_parser
    from nanoseek.cli import serve as mod

    p = build_parser()
    a = p.parse_args(["serve", "--model", "m", "--port", "8123", "--max-batch-size", "2", "--kv-cache-dtype", "fp8",
                      "--max-queue", "4", "--api-key", "k"])
    assert (a.func, a.port, a.max_batch_size, a.kv_cache_dtype, a.max_queue, a.api_key, a.host) == \
        (mod.run, 8123, 2, "fp8", 4, "k", "127.0.0.1")
    with pytest.raises(ValueError, match="--port"):
        mod.check(p.parse_args(["serve", "--model", "m", "--port", "0"]))
    assert json.dumps(vars(a), default=str)


def test_text_state_stop_strings_and_reasoning_split(checkpoint):
    """Streamed pieces never show a stop string, even one that spans tokens; reasoning ends at </think>."""
    from nanoseek.serve.protocol import TextState

    tok = load_tokenizer(checkpoint)
    ids = tok.encode("<think>two and</think> four. héllo wörld")
    st = TextState(tok, True, ["llo w"])
    pieces = [st.push(t) for t in ids] + [st.flush()]
    reasoning, content = "".join(p[0] for p in pieces), "".join(p[1] for p in pieces)
    assert (reasoning, content) == ("two and", " four. hé") == (st.reasoning, st.content) and st.stopped
    # reasoning + content is one text for stop strings: one across </think> cuts both, never leaving a piece of it
    ids = tok.encode("<think>two and</think> four. héllo")
    for stop, want in (("d fo", ("two an", "")), ("wo a", ("t", "")), ("and f", ("two ", "")),
                       ("and then", ("two and", " four. héllo"))):
        st = TextState(tok, True, [stop])
        pieces = [st.push(t) for t in ids] + [st.flush()]
        assert ("".join(p[0] for p in pieces), "".join(p[1] for p in pieces)) == want == (st.reasoning, st.content)
        assert st.stopped == (want[1] == "")
        # reasoning held back at </think> (it may begin the stop) is released before any content
        first_content = next((i for i, p in enumerate(pieces) if p[1]), len(pieces))
        assert not any(p[0] for p in pieces[first_content + 1:]), (stop, pieces)
    st = TextState(tok, True, [])
    for t in tok.encode("no closing tag"):
        st.push(t)
    st.flush()
    assert (st.reasoning, st.content) == ("no closing tag", "")  # no </think>: all reasoning, as R1 parsers do
    st = TextState(tok, False, ["zz"])
    assert "".join(st.push(t)[1] for t in tok.encode("a z b")) + st.flush()[1] == "a z b" and not st.stopped
