"""Prefix caching: latents of prompt prefixes seen before, reused instead of recomputed.

Prompts are cut into blocks of `block_size` tokens; block k is named by a hash chained over blocks 0..k, so
equal hashes mean equal prefixes (the block's tokens are kept and compared too, against collisions). The pool
holds up to `max_blocks` blocks of [c_kv ; k_rope] for every layer, evicting the least recently used. The latent
is small (kv_lora_rank + qk_rope_head_dim numbers per token and layer, DeepSeek-V2 section 2.1), so a hit is
served by copying the blocks into the request's cache row; the row layout of nanoseek/engine/cache.py stays
unchanged and attention never reads from the pool."""

from __future__ import annotations

from collections import OrderedDict

import torch

from nanoseek.engine.cache import LatentCache


class PrefixCache:
    def __init__(self, cache: LatentCache, max_tokens: int, block_size: int = 16):
        if block_size < 1:
            raise ValueError(f"prefix cache block_size must be >= 1, got {block_size}")
        self.cache, self.block_size = cache, block_size
        self.max_blocks = max_tokens // block_size
        # one pool tensor per cache tensor: [max_blocks, block_size, last dim], same dtype (fp8 scales included)
        self.pool = [torch.empty(self.max_blocks, block_size, t.shape[-1], dtype=t.dtype, device=t.device)
                     for t in cache.tensors()]
        self.table: OrderedDict[int, tuple[int, tuple[int, ...]]] = OrderedDict()  # hash -> (block, tokens); LRU first
        self.free = list(range(self.max_blocks))
        self.queries = self.hits = 0  # prompt tokens looked up / found (what /metrics reports)

    def _hashes(self, tokens: list[int], n_blocks: int):
        h, bs = 0, self.block_size
        for k in range(n_blocks):
            block = tuple(tokens[k * bs: (k + 1) * bs])
            h = hash((h, block))
            yield h, block

    def match(self, tokens: list[int]) -> list[int]:
        """Pool blocks holding the longest cached prefix of `tokens`, leaving at least the last token to compute
        (its logits are needed). Counts the lookup in queries/hits."""
        blocks = []
        for h, block in self._hashes(tokens, (len(tokens) - 1) // self.block_size):
            entry = self.table.get(h)
            if entry is None or entry[1] != block:
                break
            blocks.append((h, entry[0]))
        for h, _ in reversed(blocks):  # parents end most recent: a child is never kept without its parent
            self.table.move_to_end(h)
        self.queries += len(tokens)
        self.hits += len(blocks) * self.block_size
        return [b for _, b in blocks]

    @torch.inference_mode()
    def load(self, row: int, blocks: list[int]) -> int:
        """Copy pool blocks into positions 0 .. len(blocks) * block_size - 1 of cache row `row`; returns that count."""
        n = len(blocks) * self.block_size
        if blocks:
            idx = torch.tensor(blocks, device=self.pool[0].device)
            for t, p in zip(self.cache.tensors(), self.pool):
                t[row, :n] = p[idx].reshape(n, -1)
        return n

    @torch.inference_mode()
    def store(self, row: int, tokens: list[int]) -> None:
        """Keep the full blocks of `tokens`, whose latents cache row `row` holds at positions 0 .. len - 1."""
        bs = self.block_size
        for k, (h, block) in enumerate(self._hashes(tokens, len(tokens) // bs)):
            if h in self.table:
                self.table.move_to_end(h)
                continue
            if not self.free:
                if not self.table:
                    return  # max_tokens < block_size: nothing fits
                self.free.append(self.table.popitem(last=False)[1][0])  # evict the least recently used
            b = self.free.pop()
            for t, p in zip(self.cache.tensors(), self.pool):
                p[b] = t[row, k * bs: (k + 1) * bs]
            self.table[h] = (b, block)

    def usage(self) -> float:
        return len(self.table) / self.max_blocks if self.max_blocks else 0.0
