"""Metric logging: smoothed values and periodic progress lines with rate and ETA (the original's MetricLogger)."""
from __future__ import annotations

import datetime
import time
from collections import defaultdict, deque
from typing import Iterable

import numpy as np
import torch
import torch.distributed as dist

from utils.distributed import is_dist_avail_and_initialized

# ----------------------------------------------------------------------------------------------------------------
class SmoothedValue:
    """Track a series of values; windowed median/avg plus global average (synchronisable across ranks)."""

    def __init__(self, window_size: int = 20, fmt: str | None = None):
        self.deque: deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or '{median:.4f} ({global_avg:.4f})'

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self) -> None:
        """All-reduce count and total (the window stays local, as in the original)."""
        if not is_dist_avail_and_initialized():
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64)
        if dist.get_backend() == 'nccl':
            t = t.cuda()
        dist.all_reduce(t)
        self.count, self.total = int(t[0].item()), float(t[1].item())

    @property
    def median(self) -> float:
        return float(np.median(list(self.deque))) if self.deque else 0.0

    @property
    def avg(self) -> float:
        return float(np.mean(list(self.deque))) if self.deque else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / self.count if self.count else 0.0

    @property
    def max(self) -> float:
        return max(self.deque) if self.deque else 0.0

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else 0.0

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg,
                               max=self.max, value=self.value)


class MetricLogger:
    """A set of named SmoothedValues with periodic progress lines (rate and ETA)."""

    def __init__(self, delimiter: str = '  ', window_size: int = 20):
        self.meters: dict[str, SmoothedValue] = defaultdict(lambda: SmoothedValue(window_size))
        self.delimiter = delimiter

    def update(self, **kwargs) -> None:
        for k, v in kwargs.items():
            if v is None:
                continue
            if isinstance(v, torch.Tensor):
                v = v.item()
            self.meters[k].update(float(v))

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def __getattr__(self, attr):
        meters = self.__dict__.get('meters', {})
        if attr in meters:
            return meters[attr]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __str__(self) -> str:
        return self.delimiter.join(f'{name}: {meter}' for name, meter in self.meters.items())

    def global_avg(self) -> str:
        return self.delimiter.join(f'{name}: {meter.global_avg:.4f}' for name, meter in self.meters.items())

    def averages(self) -> dict[str, float]:
        """Global averages of every meter as floats (for JSON logs)."""
        return {name: meter.global_avg for name, meter in self.meters.items()}

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def log_every(self, iterable: Iterable, print_freq: int, header: str = '', total: int | None = None):
        """Yield from `iterable`, printing progress (meters, s/it, data time, ETA) every `print_freq` items."""
        total = len(iterable) if total is None else total
        width = len(str(total))
        start = end = time.time()
        iter_time, data_time = SmoothedValue(fmt='{avg:.4f}'), SmoothedValue(fmt='{avg:.4f}')
        i = 0
        for obj in iterable:
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i - 1)))
                parts = [header, f'[{i:>{width}}/{total}]', f'eta: {eta}', str(self),
                         f'time: {iter_time}', f'data: {data_time}']
                if torch.cuda.is_available():
                    parts.append(f'max mem: {torch.cuda.max_memory_allocated() / 2 ** 20:.0f}')
                print(self.delimiter.join(p for p in parts if p), flush=True)
            i += 1
            end = time.time()
        total_time = time.time() - start
        print(f'{header} Total time: {datetime.timedelta(seconds=int(total_time))} '
              f'({total_time / max(i, 1):.4f} s / it)', flush=True)
