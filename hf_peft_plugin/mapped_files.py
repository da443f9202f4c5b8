"""Give back the pages of a memory-mapped checkpoint that a prepared CPU model no longer reads.

transformers' loader reads safetensors through a private memory mapping of the file. After a
4-bit load the quantized layers no longer read it, but the tensors kept as loaded (embeddings, a
tied ``lm_head``, norms) still view the mapping, so it stays, and every page the loader read, the
float32 sources of the quantized weights included, stays in the process's RSS: 405 of the 930 MiB
a prepared SmolLM2-135M held. :func:`drop_unread_checkpoint_pages` gives those pages back with
``madvise(MADV_DONTNEED)``, under two rules that make it lossless:

* only in file mappings that hold one of the model's tensors, and only pages that none of the
  model's parameters and buffers touch, even in part;
* only pages that are still the file's own: a page someone wrote to (copy-on-write, so now
  anonymous memory) is never dropped, as ``/proc/self/pagemap`` tells. A dropped page that anyone
  reads again comes back from the file unchanged.

Nothing is copied and no tensor changes. Linux only; elsewhere nothing is done.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import mmap
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

_PAGE = mmap.PAGESIZE
_PRESENT, _FILE_PAGE = 1 << 63, 1 << 61  # /proc/self/pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst)


def file_mappings() -> list[tuple[int, int, str]]:
    """``(start, end, path)`` of this process's memory mappings of files."""
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):  # an inode: a file
            start, end = (int(v, 16) for v in fields[0].split("-"))
            found.append((start, end, fields[5]))
    return found


def _tensor_spans(model: nn.Module) -> list[tuple[int, int]]:
    """``(first byte, one past the last)`` of each of the model's CPU parameters and buffers."""
    spans = []
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type != "cpu" or tensor.numel() == 0 or type(tensor.data) is not torch.Tensor:
            continue  # other devices, and wrapper tensors (FSDP's DTensor) that hold no memory of their own
        last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
        start = tensor.data_ptr()
        spans.append((start, start + (last + 1) * tensor.element_size()))
    return spans


def _unviewed_runs(low: int, high: int, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The page-aligned ranges of ``[low, high)`` that no span touches, even in part."""
    runs, cursor = [], low
    for start, end in sorted(s for s in spans if s[0] < high and s[1] > low):
        hole_end = start // _PAGE * _PAGE
        if hole_end > cursor:
            runs.append((cursor, hole_end))
        cursor = max(cursor, -(-end // _PAGE) * _PAGE)
    if high > cursor:
        runs.append((cursor, high))
    return runs


def page_flags(start: int, end: int) -> torch.Tensor:
    """The ``/proc/self/pagemap`` entries of the pages in ``[start, end)`` (page-aligned), as int64."""
    count = (end - start) // _PAGE
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(start // _PAGE * 8)
        raw = pagemap.read(count * 8)
    return torch.frombuffer(bytearray(raw), dtype=torch.int64) if raw else torch.zeros(0, dtype=torch.int64)


def _clean_file_runs(start: int, end: int) -> list[tuple[int, int]]:
    """The ranges of resident pages in ``[start, end)`` that are still the file's own."""
    flags = page_flags(start, end)
    droppable = ((flags & _FILE_PAGE) != 0) & (flags < 0)  # bit 63 (present) is the int64 sign bit
    edges = torch.diff(torch.cat([torch.zeros(1, dtype=torch.int8), droppable.to(torch.int8), torch.zeros(1, dtype=torch.int8)]))
    firsts, lasts = (edges == 1).nonzero().flatten().tolist(), (edges == -1).nonzero().flatten().tolist()
    return [(start + a * _PAGE, start + b * _PAGE) for a, b in zip(firsts, lasts)]


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _advise(start: int, length: int) -> int:
    if _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), mmap.MADV_DONTNEED) != 0:
        logger.info("madvise(MADV_DONTNEED) refused (errno %d); the pages stay.", ctypes.get_errno())
        return 0
    return length


def drop_unread_checkpoint_pages(model: nn.Module) -> int:
    """Give back the clean pages of the file mappings holding the model's tensors that none of its
    tensors touch; returns the bytes given back (0 where there are none, or off Linux)."""
    if not hasattr(mmap, "MADV_DONTNEED"):
        return 0
    spans = _tensor_spans(model)
    mappings = [m for m in file_mappings() if any(m[0] <= s < m[1] for s, _ in spans)]
    dropped = 0
    try:
        for low, high, _ in mappings:
            for start, end in _unviewed_runs(low, high, spans):
                for a, b in _clean_file_runs(start, end):
                    dropped += _advise(a, b - a)
    except OSError as exc:  # no pagemap (a restricted /proc): leave everything as it is
        logger.info("Could not read /proc/self/pagemap (%s); checkpoint pages stay mapped.", exc)
    if dropped:
        logger.info("Gave back %d MiB of checkpoint pages the prepared model no longer reads.", dropped >> 20)
    return dropped
