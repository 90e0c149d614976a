"""Peak CPU memory of a call, from the torch profiler's allocation events."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile


def peak_cpu_bytes(fn: Callable[[], Any]) -> int:
    """Highest number of bytes held by tensors allocated during ``fn()`` on the CPU, above what was held before.

    Walks the profiler's memory events (``+nbytes`` per allocation, ``-nbytes`` per free) in time order and
    tracks the running total's maximum. Only the torch CPU allocator is seen: memory a library allocates by
    itself (e.g. BLAS workspace) is not counted. The result of ``fn`` is dropped inside the profiled region.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [event for event in prof.profiler.kineto_results.events()
              if event.name() == "[memory]" and event.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda event: event.start_ns())
    held = peak = 0
    for event in events:
        held += event.nbytes()
        peak = max(peak, held)
    return peak
