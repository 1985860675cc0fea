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
        self.room = max(1, room)
        self._buffers: tuple[Any, Any] | None = None
        self._views: tuple[Any, Any] = (None, None)  # the keys and values this layer handed out last
        super().__init__()

    # keys or values set from outside (a join, a stored prefix, ``crop``) drop the buffers at once: no stale
    # buffer is written or kept alive beside the new tensors
    @property
    def keys(self) -> Any:
        return self._keys

    @keys.setter
    def keys(self, tensor: Any) -> None:
        if tensor is not self._views[0]:
            self._buffers, self._views = None, (None, None)
        self._keys = tensor

    @property
    def values(self) -> Any:
        return self._values

    @values.setter
    def values(self, tensor: Any) -> None:
        if tensor is not self._views[1]:
            self._buffers, self._views = None, (None, None)
        self._values = tensor

    def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = self.keys.shape[-2] if self.keys.dim() == 4 else 0  # lazy initialization leaves an empty 1-d tensor
        length = n + key_states.shape[-2]
        buffers = self._buffers
        if buffers is None or buffers[0].shape[-2] < length or buffers[0].shape[:2] != key_states.shape[:2]:
            buffers = (_with_room(self.keys, n, key_states, length + self.room),
                       _with_room(self.values, n, value_states, length + self.room))
        buffers[0][:, :, n:length] = key_states
        buffers[1][:, :, n:length] = value_states
        self._show(buffers, length)
        return self.keys, self.values

    def _show(self, buffers: tuple[Any, Any], length: int) -> None:
        """Make ``length`` columns of ``buffers`` the layer's keys and values."""
        views = (buffers[0][:, :, :length], buffers[1][:, :, :length])
        self._buffers, self._views = buffers, views
        self._keys, self._values = views

    def batch_select_indices(self, indices: Any) -> None:
        """Keep the rows at ``indices``, their spare room with them."""
        if self._buffers is None:
            super().batch_select_indices(indices)
            return
        self._show((self._buffers[0][indices], self._buffers[1][indices]), self.keys.shape[-2])

    def drop_columns(self, first: int) -> None:
        """Drop the ``first`` leading columns (no row attends to them), without a copy."""
        if first <= 0:
            return
        if self._buffers is None:
            self.keys, self.values = self.keys[..., first:, :], self.values[..., first:, :]
            return
        self._show((self._buffers[0][:, :, first:], self._buffers[1][:, :, first:]), self.keys.shape[-2] - first)

    def reset(self) -> None:
        self._buffers, self._views = None, (None, None)
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
