"""What a config value may be: `Spec` (types and range, declared together) and the specs many keys share."""
from __future__ import annotations

import difflib
from typing import Iterable

import numpy as np

NUM = (int, float)
NONE = type(None)
_MEMORY = 'larger would not fit in memory'


class Spec(tuple):
    """What a config key accepts: its types (the tuple itself, so `isinstance(value, spec)` works and iterating it
    gives the types) and, for numbers, their range, declared once beside the type.

    `lo` / `hi` bound the meaningful values (`lo_open` / `hi_open`: the bound itself is excluded); `cap` is a
    sanity limit on a size (`why` says what goes wrong above it); `items` is the Spec of a list's entries and
    `choices` the accepted values.
    """

    def __new__(cls, types, lo=None, hi=None, *, lo_open=False, hi_open=False, cap=None, why=_MEMORY, items=None,
                choices=None):
        self = super().__new__(cls, types if isinstance(types, tuple) else (types,))
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open
        self.cap, self.why, self.items, self.choices = cap, why, items, choices
        return self

    def range_text(self) -> str:
        """'> 0', '>= 0', 'in [0, 1]', 'in [0, 1)' ... ('' when unbounded)."""
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo}"
        if self.hi is not None:
            return f"{'<' if self.hi_open else '<='} {self.hi}"
        return ''

    def problem(self, value) -> str | None:
        """What is wrong with `value` ('must be ..., got ...'), or None when it fits."""
        # bool is an int subclass: 'image_res: true' must not pass as an int.
        if not isinstance(value, self) or (isinstance(value, bool) and bool not in self and int in self):
            return f'must be {_type_names(self)}, got {type(value).__name__} {value!r}'
        if self.choices is not None and value not in self.choices:
            return f"must be one of {', '.join(map(str, self.choices))}, got {value!r}"
        if isinstance(value, NUM) and not isinstance(value, bool):
            if isinstance(value, float) and not np.isfinite(value):
                return f'must be a finite number, got {value}'
            low = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
            high = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
            if low or high:
                return f'must be {self.range_text()}, got {value}'
            if self.cap is not None and value > self.cap:
                return f'must be <= {self.cap} ({self.why}), got {value}'
        if isinstance(value, list) and self.items is not None:
            for i, item in enumerate(value):
                found = self.items.problem(item)
                if found is not None:
                    return f'entry {i} {found}'
        return None


def size_spec(cap, why=_MEMORY) -> Spec:
    """An integer size: > 0 and at most `cap`."""
    return Spec((int,), 0, lo_open=True, cap=cap, why=why)


FILES = Spec((str, list), items=Spec((str,)))   # a path or a list of paths
SHARE = Spec(NUM, 0, 1)                         # shares and rates in [0, 1]
RATE = Spec(NUM + (NONE,), 0)                   # learning rates, weight decay: >= 0 (null: the default)
ANY = Spec((object,))                           # a key whose value its owner checks itself


def _type_names(types: tuple) -> str:
    return ' or '.join('null' if t is type(None) else t.__name__ for t in types)


def suggest(key: str, known: Iterable[str]) -> str:
    """The hint " (did you mean 'x'?)" naming the known key closest to a misspelt `key`, else ''."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.75)
    return f" (did you mean '{close[0]}'?)" if close else ''
