"""Finished rows' KV caches, kept so that a prompt that continues a finished conversation prefills only the rest.

An agent's next-round prompt starts with its own last exchange (its prompt and its answer: about 40% of the
round-1 prompt in the quickstart's debate). The transformers backend keeps one store for its model (emptied when its weights
change); ``decode_rows`` puts every finished row in it and reads from it when it prefills. An entry
is found by the longest common token prefix (a trie over the tokens), so a prompt whose re-tokenised answer
differs from the generated tokens after some point still reuses everything before that point (keys and values of a
causal model at a position depend only on the tokens up to it). It is lent only to a prompt that goes on past the
entry's own prompt into its answer: one that merely starts alike (every prompt's system message and instructions)
is prefilled afresh, so a prompt's cache never depends on which unrelated calls ran before it in this process. In
bf16 a lent answer's keys (computed one token at a time) round differently from a fresh prefill of the same text,
so a round's tokens can depend on whether the previous exchange is in the store: a debate resumes per problem
(every round of an unfinished problem is decoded again), which keeps a resumed run equal to an uninterrupted one.
The least recently used entries go once ``budget_bytes`` is passed.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

# 1 GiB: about 45k tokens of SmolLM2-135M in bf16, 8k of a 7B model with 8 KV heads
DEFAULT_BUDGET_BYTES = 1 << 30


class PrefixStore:
    """Token sequences and each one's per-layer keys and values (``[heads, tokens, head_dim]``)."""

    def __init__(self, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
        self.budget_bytes = budget_bytes
        self.bytes = 0
        self.lent = 0  # prompt tokens whose prefill the store saved (benchmarks read it)
        # id -> (tokens, how many of them were the prompt, per-layer keys and values)
        self._entries: OrderedDict[int, tuple[tuple[int, ...], int, list[tuple[Any, Any]]]] = OrderedDict()
        self._next = 0
        self._trie: dict[int, Any] = {}  # token -> (entry id of the newest sequence through it, children)

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, tokens: list[int], prompt: int, layers: list[tuple[Any, Any]]) -> None:
        """Keep ``layers`` (one (keys, values) per layer, each ``[heads, len(tokens), head_dim]``) for ``tokens``,
        of which the first ``prompt`` were the row's prompt and the rest its answer."""
        size = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        if not tokens or size > self.budget_bytes or self._holds(tokens, prompt):
            return
        key = self._next
        self._next += 1
        self._entries[key] = (tuple(tokens), prompt, layers)
        self.bytes += size
        node = self._trie
        for t in tokens:
            entry = node.setdefault(t, [key, {}])
            entry[0] = key
            node = entry[1]
        if self.bytes > self.budget_bytes:
            self._evict()

    def _holds(self, tokens: list[int], prompt: int) -> bool:
        """Whether an entry already holds exactly ``tokens`` (rows of one prompt that answered alike: greedy
        agents that differ only in name); it is then kept longer instead of stored twice."""
        node, key = self._trie, None
        for t in tokens:
            if t not in node:
                return False
            key, node = node[t]
        held = self._entries[key]
        if len(held[0]) != len(tokens) or held[1] != prompt:
            return False
        self._entries.move_to_end(key)
        return True

    def _evict(self) -> None:
        while self.bytes > self.budget_bytes and self._entries:
            _, (_, _, layers) = self._entries.popitem(last=False)
            self.bytes -= sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)
        self._trie = {}
        for key, (tokens, _, _) in self._entries.items():  # rebuilt: rare, and simpler than unlinking nodes
            node = self._trie
            for t in tokens:
                entry = node.setdefault(t, [key, {}])
                entry[0] = key
                node = entry[1]

    def longest(self, prompt: list[int]) -> tuple[int, list[tuple[Any, Any]]]:
        """(n, layers): the most leading tokens of ``prompt`` the newest entry that holds them holds, and that
        entry's layers (whose first n positions are ``prompt[:n]``'s keys and values), where ``prompt`` goes on
        past that entry's own prompt; else (0, [])."""
        node, n, key = self._trie, 0, None
        for t in prompt:
            if t not in node:
                break
            key, node = node[t]
            n += 1
        if key is None or n <= self._entries[key][1]:
            return 0, []
        self._entries.move_to_end(key)  # used: kept longer
        return n, self._entries[key][2]
