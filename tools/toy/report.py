"""What the toy measuring aids share: refusing missing inputs and printing a report as a table or one JSON line."""
from __future__ import annotations

import json
import os
import sys
from typing import Iterable, Sequence


def missing_input(files: Iterable[tuple[str, str]]) -> bool:
    """For (path, argument) pairs: print an error naming the argument of the first path that is not a file and
    return True (the caller exits 2); False when all exist."""
    for path, argument in files:
        if not os.path.isfile(path):
            print(f'error: {argument}: no file {path}', file=sys.stderr)
            return True
    return False


def emit(report, as_json: bool, title: str, header: Sequence[str], rows: Iterable[Sequence]) -> None:
    """Print `report` as one JSON line, or `title` and a Markdown table of `rows` (floats with one decimal)."""
    if as_json:
        print(json.dumps(report))
        return
    print(title)
    print('| ' + ' | '.join(header) + ' |')
    print('|' + ' --- |' * len(header))
    for row in rows:
        print('| ' + ' | '.join(f'{v:.1f}' if isinstance(v, float) else str(v) for v in row) + ' |')
