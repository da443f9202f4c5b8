"""Let go of the checkpoint file transformers' loader leaves memory-mapped on a CPU model.

``from_pretrained`` reads safetensors through ``mmap``. After a 4-bit load the quantized layers no
longer use the file, but the tensors kept as they were (the embedding and the tied ``lm_head``,
the norms) still view it, so the whole mapping stays, and every page the loader read (the float32
sources of the quantized weights included) counts in the process's RSS: for SmolLM2-135M, 405 of
the 930 MiB a prepared model holds. :func:`release_checkpoint_mapping` copies the tensors that
still view a mapped checkpoint into ordinary memory, after first dropping the mapped pages no
tensor views, and dropping each copied tensor's source pages as the copy proceeds, so that the
copy adds little to the peak; the mapping then goes away with its last view.

Only clean file pages are dropped (``MADV_DONTNEED`` on ranges that no parameter or buffer of the
model views), and a read of such a page again would fetch it from the file unchanged. Linux only;
elsewhere, and for tensors on other devices, nothing is done.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

_MADV_DONTNEED = 4
_SUFFIX = ".safetensors"
_CHUNK = 16 << 20


def mapped_checkpoints() -> list[tuple[int, int, str]]:
    """``(start, end, path)`` of this process's memory mappings of safetensors files."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].endswith(_SUFFIX):
            start, end = (int(v, 16) for v in fields[0].split("-"))
            found.append((start, end, fields[5]))
    return found


def _views(model: nn.Module, ranges: list[tuple[int, int, str]]) -> dict[tuple, list[torch.Tensor]]:
    """The model's CPU parameters and buffers inside a mapping, grouped by the memory they view."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    seen: set[int] = set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen or tensor.device.type != "cpu" or tensor.numel() == 0:
            continue
        seen.add(id(tensor))
        start = tensor.data_ptr()
        if any(low <= start < high for low, high, _ in ranges):
            groups.setdefault((start, tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype), []).append(tensor)
    return groups


def _extent(tensor: torch.Tensor) -> int:
    """Bytes from a tensor's first element to just past its last."""
    if tensor.numel() == 0:
        return 0
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return (last + 1) * tensor.element_size()


def _copy_out(tensor: torch.Tensor, libc: ctypes.CDLL | None) -> torch.Tensor:
    """A copy of ``tensor`` in ordinary memory, made ``_CHUNK`` bytes at a time; with ``libc``, the
    source pages copied so far are dropped as it goes, so the copy never holds both in full."""
    if libc is None or not tensor.is_contiguous():
        return tensor.clone()
    source, copy = tensor.reshape(-1), torch.empty_like(tensor).reshape(-1)
    page, base, size = mmap.PAGESIZE, tensor.data_ptr(), tensor.element_size()
    done = -(-base // page) * page  # the first page wholly inside the tensor
    step = max(1, _CHUNK // size)
    for first in range(0, source.numel(), step):
        last = min(source.numel(), first + step)
        copy[first:last].copy_(source[first:last])
        upto = (base + last * size) // page * page
        if upto > done:
            _advise(libc, done, upto - done)
            done = upto
    return copy.view_as(tensor)


def _drop_unviewed_pages(ranges: list[tuple[int, int, str]], kept: list[tuple[int, int]], libc: ctypes.CDLL) -> int:
    """``MADV_DONTNEED`` on each mapping's pages outside ``kept``; returns the bytes advised."""
    page = mmap.PAGESIZE
    dropped = 0
    for low, high, _ in ranges:
        cursor = low
        for start, end in sorted(k for k in kept if k[0] < high and k[1] > low):
            hole_end = start // page * page  # pages a view touches, even partly, stay
            if hole_end > cursor:
                dropped += _advise(libc, cursor, hole_end - cursor)
            cursor = max(cursor, -(-end // page) * page)
        if high > cursor:
            dropped += _advise(libc, cursor, high - cursor)
    return dropped


def _advise(libc: ctypes.CDLL, start: int, length: int) -> int:
    if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV_DONTNEED) != 0:
        return 0  # advice only: a refusal leaves the pages where they were
    return length


def release_checkpoint_mapping(model: nn.Module) -> int:
    """Copy the model's tensors that view a memory-mapped safetensors file into ordinary memory;
    returns the bytes copied (0 when nothing viewed one)."""
    ranges = mapped_checkpoints()
    if not ranges:
        return 0
    groups = _views(model, ranges)
    if not groups:
        return 0
    extents = {key: (t.data_ptr(), t.data_ptr() + _extent(t)) for key, (t, *_) in groups.items()}
    libc = ctypes.CDLL(None, use_errno=True)
    dropped = _drop_unviewed_pages(ranges, list(extents.values()), libc)
    copied = 0
    with torch.no_grad():
        for key, tensors in groups.items():
            start, end = extents[key]
            alone = not any(s < end and start < e for k, (s, e) in extents.items() if k != key)
            copy = _copy_out(tensors[0].data, libc if alone else None)
            for tensor in tensors:
                tensor.data = copy
            copied += copy.numel() * copy.element_size()
    logger.info("Copied %d MiB of frozen tensors out of the mapped checkpoint (%d MiB of its pages dropped first).",
                copied >> 20, dropped >> 20)
    return copied
