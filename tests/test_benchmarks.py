"""The benchmark entry points run and report what README's tables are made of (timings themselves are not
asserted: they belong to the benchmark tables, not to unit tests)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*argv: str) -> str:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def test_train_step_reports_flops_throughput_and_memory():
    out = _run('benchmarks/train_step.py', '--size', 'toy', '--batch', '4', '--warmup', '0', '--steps', '1',
               '--peak-tflops', '0.5', '--json')
    r = json.loads(out.strip().splitlines()[-1])
    # Forward + backward of the toy model on 4 samples: well over a GFLOP, far under the small size's ~230.
    assert 1 < r['step_gflop'] < 50
    assert abs(r['achieved_tflop_s'] - r['step_gflop'] / 1e3 / r['median_step_s']) < 1e-9
    assert abs(r['mfu'] - r['achieved_tflop_s'] / 0.5) < 1e-12
    assert r['peak_rss_mb'] > 100 and r['malloc_tuned'] is True
