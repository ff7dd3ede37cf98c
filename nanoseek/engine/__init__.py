"""Inference: latent KV cache, sampling, continuous batching with prefix caching, MTP speculative decoding.

    cache.py         LatentCache: [c_kv ; k_rope] per layer and token, fp32 / bf16 / fp8
    prefix_cache.py  PrefixCache: block-hashed latents of seen prefixes, LRU, copied into a request's row
    sampling.py      SamplingParams, sample
    scheduler.py     Scheduler, Request: the request loop (admit, chunked prefill, decode, retire, abort)
    speculative.py   MTP drafting and verification (DeepSeek-V3 section 2.2)
    engine.py        Engine: the public face (generate, stream) and the forwards over cache rows
"""

from nanoseek.engine.cache import CACHE_DTYPES, LatentCache
from nanoseek.engine.engine import Engine, SpecStats, request_seed
from nanoseek.engine.prefix_cache import PrefixCache
from nanoseek.engine.sampling import SamplingParams, TokenEvent, sample
from nanoseek.engine.scheduler import Event, Request, Scheduler

__all__ = ["CACHE_DTYPES", "Engine", "Event", "LatentCache", "PrefixCache", "Request", "SamplingParams",
           "Scheduler", "SpecStats", "TokenEvent", "request_seed", "sample"]
