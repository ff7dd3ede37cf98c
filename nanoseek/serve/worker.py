"""The engine loop: one background thread owns the Engine and steps its scheduler; asyncio handlers talk to it
through a thread-safe inbox (submit, abort) and get tokens back on per-request asyncio queues. Prometheus metrics
are updated here, where the numbers are known.

A step that raises (a bug, or a request that slipped validation) fails only the requests it held: each gets a 500,
their rows are freed, and the loop serves on. The loop dies (/health 503, every open request a 503) only when it
cannot go on: the failure was not an ordinary Exception, the rows could not be recovered, or MAX_FAILED_STEPS steps
failed in a row (a broken device rather than one bad request).

Metric names are vLLM's (see Metrics), so its dashboards read them. Prefix-cache hits count tokens; a GRPO-style
group member copying its leader's prompt counts as a hit.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from nanoseek.engine import Engine, Request
from nanoseek.serve.protocol import APIError

log = logging.getLogger("nanoseek.serve")
MAX_FAILED_STEPS = 3
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class QueueFull(Exception):
    pass


class Metrics:
    def __init__(self, model_name: str):
        self.registry = r = CollectorRegistry()
        lab = ["model_name"]
        self.running = Gauge("vllm:num_requests_running", "Requests holding a cache row", lab, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting for a row", lab, registry=r)
        self.usage = Gauge("vllm:kv_cache_usage_perc", "Fraction of latent-cache token slots in use", lab, registry=r)
        self.pc_queries = Counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", lab,
                                  registry=r)
        self.pc_hits = Counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", lab, registry=r)
        self.prompt = Counter("vllm:prompt_tokens", "Prompt tokens admitted", lab, registry=r)
        self.generation = Counter("vllm:generation_tokens", "Tokens generated", lab, registry=r)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Submit to first token", lab, buckets=_LATENCY,
                              registry=r)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Between consecutive tokens", lab,
                             buckets=_LATENCY, registry=r)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Submit to finish", lab, buckets=_LATENCY,
                             registry=r)
        self.name = model_name

    def child(self, metric):
        return metric.labels(model_name=self.name)


class EngineLoop:
    """Runs `engine.scheduler` in a daemon thread. submit() and abort() are safe from any thread; each request's
    sink receives ("token", Event), then ("done", Request) or ("error", (Request, APIError))."""

    def __init__(self, engine: Engine, model_name: str, max_queue: int = 256):
        self.engine, self.max_queue = engine, max_queue
        self.metrics = Metrics(model_name)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.sinks: dict[int, tuple] = {}  # request id -> (Request, asyncio loop, asyncio.Queue)
        self.times: dict[int, list[float]] = {}  # request id -> [submitted, last token]
        self.queued = 0  # submitted and not yet admitted (inbox + scheduler's waiting), read by handlers
        self._lock = threading.Lock()  # guards `queued`, changed by handler and engine threads
        self._counted: set[int] = set()  # requests whose prompt is in the token counters
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)

    # ------------------------------------------------------------------ any thread
    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.inbox.put(("wake", None, None))
        self.thread.join(timeout=30)

    def alive(self) -> bool:
        return self.thread.is_alive() and self.error is None

    def submit(self, req: Request, sink: asyncio.Queue) -> None:
        with self._lock:
            if self.queued >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting): retry later")
            self.queued += 1
        self.inbox.put(("add", req, (asyncio.get_running_loop(), sink)))

    def abort(self, req: Request) -> None:
        self.inbox.put(("abort", req, None))

    # ------------------------------------------------------------------ engine thread
    def _send(self, req: Request, item) -> None:
        sink = self.sinks.get(req.id)
        if sink is not None:
            _, loop, q = sink
            try:
                loop.call_soon_threadsafe(q.put_nowait, item)
            except RuntimeError:  # the handler's loop is gone
                pass

    def _drain(self, block: bool) -> None:
        sched = self.engine.scheduler
        while True:
            try:
                op, req, sink = self.inbox.get(timeout=0.5) if block else self.inbox.get_nowait()
            except queue.Empty:
                return
            block = False
            if op == "add":
                self.sinks[req.id] = (req, *sink)
                self.times[req.id] = [time.perf_counter()] * 2
                sched.add(req)
            elif op == "abort" and req.id in self.sinks:
                if req in sched.waiting:
                    self._dequeued(1)
                sched.abort(req)
                self._close(req)

    def _dequeued(self, k: int) -> None:
        with self._lock:
            self.queued -= k

    def _close(self, req: Request) -> None:
        self.sinks.pop(req.id, None)
        self.times.pop(req.id, None)
        self._counted.discard(req.id)

    def _count_prompt(self, r: Request) -> None:
        """Prompt and prefix-cache counters, once per request, when its cached_tokens are final."""
        if r.id in self._counted:
            return
        self._counted.add(r.id)
        m = self.metrics
        m.child(m.prompt).inc(len(r.prompt))
        m.child(m.pc_queries).inc(len(r.prompt))
        m.child(m.pc_hits).inc(r.cached_tokens)

    def _run(self) -> None:
        sched, m = self.engine.scheduler, self.metrics
        failed = 0  # steps failed in a row
        try:
            while not self._stop.is_set():
                self._drain(block=not sched.has_work())
                if self._stop.is_set():
                    break
                if not sched.has_work():
                    self._gauges()
                    continue
                waiting_before = len(sched.waiting)
                try:
                    events, finished = sched.step()
                except Exception as e:
                    self._dequeued(waiting_before - len(sched.waiting))
                    failed += 1
                    if failed >= MAX_FAILED_STEPS:
                        raise
                    self._fail_step(e)
                    self._gauges()
                    continue
                failed = 0
                self._dequeued(waiting_before - len(sched.waiting))
                now = time.perf_counter()
                for ev in events:
                    r, t = ev.request, self.times.get(ev.request.id)
                    if t is not None:
                        self._count_prompt(r)
                        if t[0] == t[1]:
                            m.child(m.ttft).observe(now - t[0])
                        elif now > t[1]:
                            m.child(m.itl).observe(now - t[1])
                        t[1] = now
                    self._send(r, ("token", ev))
                m.child(m.generation).inc(len(events))
                for r in finished:
                    t = self.times.get(r.id)
                    if t is not None:
                        m.child(m.e2e).observe(now - t[0])
                        self._count_prompt(r)
                    self._send(r, ("done", r))
                    self._close(r)
                self._gauges()
        except BaseException as e:  # the loop is dead: /health says 503, every open request gets an error
            log.exception("engine loop died")
            self.error = e
            for req, _, _ in list(self.sinks.values()):
                self._send(req, ("error", (req, APIError(503, f"the engine loop died: {e!r}", code="engine_error"))))

    def _fail_step(self, e: Exception) -> None:
        """A step raised: fail the requests it held (admitted ones; waiting ones were not in it) with a 500 and free
        their rows. Raises when the scheduler's rows cannot be recovered, which kills the loop."""
        sched = self.engine.scheduler
        waiting = set(sched.waiting)
        held = [req for req, _, _ in self.sinks.values() if req not in waiting]
        log.exception("engine step failed: failing its %d request(s) and serving on", len(held))
        err = APIError(500, f"the engine failed on this request: {e!r}", code="engine_error")
        for req in held:
            sched.abort(req)  # frees its row (a no-op for one that finished inside the failed step)
            self._send(req, ("error", (req, err)))
            self._close(req)
        if sched.running or len(sched.free_rows) != self.engine.max_batch_size:
            raise RuntimeError("the engine's cache rows could not be recovered after a failed step") from e

    def _gauges(self) -> None:
        sched, m = self.engine.scheduler, self.metrics
        m.child(m.running).set(len(sched.running))
        m.child(m.waiting).set(len(sched.waiting))
        m.child(m.usage).set(sched.usage())
