"""The benchmark entry points run and report what README's tables are made of (timings themselves are not
asserted: they belong to the benchmark tables, not to unit tests)."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*argv: str) -> str:
    return subprocess.run([sys.executable, *argv], cwd=ROOT, check=True, capture_output=True, text=True).stdout


def test_train_step_reports_flops_throughput_and_memory():
    out = _run('-m', 'benchmarks.train_step', '--size', 'toy', '--batch', '4', '--warmup', '0', '--steps', '1',
               '--peak-tflops', '0.5', '--json')
    r = json.loads(out.strip().splitlines()[-1])
    # Forward + backward of the toy model on 4 samples: well over a GFLOP, far under the small size's ~230.
    assert 1 < r['step_gflop'] < 50
    assert abs(r['achieved_tflop_s'] - r['step_gflop'] / 1e3 / r['median_step_s']) < 1e-9
    assert abs(r['mfu'] - r['achieved_tflop_s'] / 0.5) < 1e-12
    assert r['peak_rss_mb'] > 100 and r['malloc_tuned'] is True


@pytest.mark.parametrize('task', ['pretrain', 'retrieval', 'vqa', 'nlvr_pretrain', 'nlvr', 've'])
def test_memory_table_inputs_drive_a_training_step_of_each_task(task):
    """The memory table measures real training steps: its random batches fit each task's forward."""
    from benchmarks import memory_table
    import models
    from tests.toy import TINY
    from benchmarks.train_step import _Tokenizer
    config = {**TINY, 'queue_size': 8, 'distill': True, 'alpha': 0.4}
    model = models.create_model(memory_table.TASKS[task][1], config, _Tokenizer(TINY['bert_config']['vocab_size']))
    if hasattr(model, 'copy_params'):
        model.copy_params()
    batch = memory_table.MIN_BATCH.get(task, 2)
    args, kwargs = memory_table.build_inputs(task, batch, TINY['image_res'], TINY['bert_config']['vocab_size'])
    out = model(*args, **kwargs)
    loss = sum(out.values()) if isinstance(out, dict) else out
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for n, p in model.visual_encoder.named_parameters() if 'blocks.0.' in n)


def test_memory_table_summary_arithmetic():
    from benchmarks import memory_table
    row = memory_table.summarise({'task': 've', 'image_res': 384, 'grad_checkpointing': False, 'precision': 'fp32',
                                  'batches': [2, 4], 'peak_rss_mb': [5000., 5600.]})
    assert row['per_sample_mb'] == 300. and row['fixed_mb'] == 4400.
    assert row['fits_24gb'] == (24 * 1024 - 4400) // 300 == 67
    assert '| ve | 384 | no | 4.30 | 300 | 67 |' in memory_table.row(row)


def test_inference_benchmark_memory_and_search_at_toy_size():
    """benchmarks/inference.py: the inference model holds fewer state floats than the training model and less
    memory; the second folder query reads the cache."""
    mem = json.loads(_run('-m', 'benchmarks.inference', 'memory', '--size', 'toy', '--image-res', '64',
                          '--json').strip().splitlines()[-1])
    rows = {r['way']: r for r in mem['rows']}
    assert rows['inference']['state_floats_m'] < 0.6 * rows['training']['state_floats_m']
    assert rows['inference']['rss_gb'] < rows['training']['rss_gb'] <= rows['training+adamw']['rss_gb']
    search = json.loads(_run('-m', 'benchmarks.inference', 'search', '--size', 'toy', '--image-res', '64', '--images',
                             '6', '--json').strip().splitlines()[-1])
    assert search['second_cached'] is True and search['images_per_s'] > 0 and search['first_query_s'] > 0
