"""A KV cache layer that a decode step writes in place: keys and values are views of buffers with room to grow.

transformers' ``DynamicLayer`` grows by ``torch.cat`` at every step, which copies the whole cache to add one
column: for 96 rows over 300 cached tokens that is 660 MB a step on SmolLM2-135M, more traffic than its weights
(profile in #29). ``RoomyLayer`` keeps each layer's keys and values in buffers with ``room`` spare columns; a step
writes its column into the spare room and the cache is copied only when the room runs out (once every ``room``
steps), when rows leave (their rows copied, room included) or when a caller replaces ``keys`` / ``values``
outright (a join, a stored prefix: the next step copies them into a new buffer). Attention reads the same numbers
from a view as from a copy: tokens are the ones ``DynamicLayer`` gives, to the bit (tests/data/test_kv_cache.py).
"""

from __future__ import annotations

from typing import Any

from transformers.cache_utils import DynamicLayer


class RoomyLayer(DynamicLayer):
    """A ``DynamicLayer`` written in place, ``room`` columns at a time (see the module docstring)."""

    def __init__(self, room: int = 64) -> None:
        super().__init__()
        self.room = max(1, room)
        self._buffers: tuple[Any, Any] | None = None
        self._view: Any = None  # the ``keys`` this layer handed out last; another object there was set from outside

    def _writable(self, length: int, key_states: Any) -> bool:
        if self._buffers is None or self.keys is not self._view:
            return False
        buffer = self._buffers[0]
        return buffer.shape[-2] >= length and buffer.shape[:2] == key_states.shape[:2]

    def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = self.keys.shape[-2] if self.keys.dim() == 4 else 0  # lazy initialization leaves an empty 1-d tensor
        length = n + key_states.shape[-2]
        if not self._writable(length, key_states):
            self._buffers = (_with_room(self.keys, n, key_states, length + self.room),
                             _with_room(self.values, n, value_states, length + self.room))
        keys, values = self._buffers
        keys[:, :, n:length] = key_states
        values[:, :, n:length] = value_states
        self._show(length)
        return self.keys, self.values

    def _show(self, length: int) -> None:
        keys, values = self._buffers  # type: ignore[misc]
        self.keys, self.values = keys[:, :, :length], values[:, :, :length]
        self._view = self.keys

    def batch_select_indices(self, indices: Any) -> None:
        """Keep the rows at ``indices``, their spare room with them."""
        if self._buffers is None or self.keys is not self._view:
            super().batch_select_indices(indices)
            return
        length = self.keys.shape[-2]
        self._buffers = (self._buffers[0][indices], self._buffers[1][indices])
        self._show(length)

    def drop_columns(self, first: int) -> None:
        """Drop the ``first`` leading columns (no row attends to them), without a copy."""
        if first <= 0:
            return
        if self._buffers is None or self.keys is not self._view:
            self.keys, self.values = self.keys[..., first:, :], self.values[..., first:, :]
            return
        length = self.keys.shape[-2] - first
        self._buffers = (self._buffers[0][:, :, first:], self._buffers[1][:, :, first:])
        self._show(length)

    def reset(self) -> None:
        self._buffers = self._view = None
        super().reset()


def _with_room(old: Any, n: int, new: Any, width: int) -> Any:
    """A buffer of ``width`` columns for rows shaped like ``new``, holding ``old``'s ``n`` columns first."""
    buffer = new.new_empty((*new.shape[:2], width, new.shape[-1]))
    if n:
        buffer[:, :, :n] = old
    return buffer


def roomy(cache: Any, room: int) -> Any:
    """``cache`` with each of its plain ``DynamicLayer`` layers (none filled yet) replaced by a ``RoomyLayer``."""
    layers = getattr(cache, "layers", None)
    if layers:
        for i, layer in enumerate(layers):
            if type(layer) is DynamicLayer and not layer.is_initialized:
                layers[i] = RoomyLayer(room)
    return cache


def drop_columns(layer: Any, first: int) -> None:
    """Drop ``layer``'s ``first`` leading columns, in place where it can."""
    if isinstance(layer, RoomyLayer):
        layer.drop_columns(first)
    else:
        layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
