"""Wall time and peak memory of one benchmark phase.

Peak memory is the increase over the phase's starting point:

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (minus what was
  allocated at the start);
* CPU on Linux: the kernel's high-water mark of resident memory (``VmHWM``), reset at the start
  of the phase by writing ``5`` to ``/proc/self/clear_refs``; minus the RSS at the start;
* otherwise: a 5 ms psutil RSS sampler (can miss short spikes).

Before each CPU phase, freed heap is returned to the OS (``malloc_trim``) so that the starting
RSS is the live set; allocations still served from memory glibc keeps (e.g. mmap thresholds
raised by earlier phases) can make a phase read somewhat low. The numbers are what a phase needs
on top of the model and data, not an allocator trace.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is in the bench extra
    psutil = None

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


def _status_kb(key: str) -> int | None:
    try:
        with open(_STATUS) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _can_reset_hwm() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")
        return _status_kb("VmHWM") is not None
    except OSError:
        return False


def _release_free_heap() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``) so that RSS at a phase's start
    is the live set, not what earlier phases left in the allocator's free lists."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_bytes() -> int:
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb * 1024
    if psutil is not None:
        return psutil.Process().memory_info().rss
    return 0


@dataclass
class Phase:
    """One measured phase. ``peak_mb``: peak memory over the phase's start (see module doc).

    ``cpu_seconds`` is reported next to wall time because on a shared machine wall time mostly
    measures the neighbours; with ``OMP_WAIT_POLICY=PASSIVE`` idle OpenMP threads sleep instead of
    spinning, so CPU time is close to the work done. On CUDA it is host time only.
    """

    name: str
    seconds: float = 0.0  # wall clock
    cpu_seconds: float = 0.0  # this process's user+sys CPU time (robust to other load on the box)
    peak_mb: float = 0.0
    engine: str = "msif"
    note: str = ""
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class _Sampler(threading.Thread):
    def __init__(self, interval: float = 0.005):
        super().__init__(daemon=True)
        self.interval, self.peak, self._stop_event = interval, _rss_bytes(), threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return max(self.peak, _rss_bytes())


class Meter:
    """Measures phases on one device; ``with meter.phase("covariance") as p: ...``."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.method = "cuda.max_memory_allocated" if self.cuda else ("VmHWM (clear_refs)" if _can_reset_hwm() else "psutil sampler")

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str, engine: str = "msif", note: str = "") -> Iterator[Phase]:
        record = Phase(name, engine=engine, note=note)
        gc.collect()
        self._sync()
        if not self.cuda:
            _release_free_heap()
        sampler = None
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            start_mem = torch.cuda.memory_allocated(self.device)
        else:
            start_mem = _rss_bytes()
            if self.method.startswith("VmHWM"):
                with open(_CLEAR_REFS, "w") as f:
                    f.write("5")
            else:
                sampler = _Sampler()
                sampler.start()
        started, cpu_started = time.perf_counter(), time.process_time()
        try:
            yield record
        finally:
            self._sync()
            record.seconds = time.perf_counter() - started
            record.cpu_seconds = time.process_time() - cpu_started
            if self.cuda:
                peak = torch.cuda.max_memory_allocated(self.device)
            elif sampler is not None:
                peak = sampler.stop()
            else:
                peak = (_status_kb("VmHWM") or 0) * 1024
            record.peak_mb = max(0.0, (peak - start_mem) / 2**20)


def machine_info(device: torch.device) -> dict:
    """Machine, library and threading facts that a timing depends on."""
    import platform

    info = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "mkl": torch.backends.mkl.is_available(),
        "device": str(device),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "memory_total_gb": round(psutil.virtual_memory().total / 2**30, 1) if psutil is not None else None,
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor()
