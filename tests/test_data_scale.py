"""benchmarks/data_scale.py at toy size: every store and format is measured and the table prints."""
import json

from benchmarks import data_scale


def test_data_scale_benchmark_runs_tiny(tmp_path, capsys):
    results = data_scale.main(['--captions', '300', '--images', '5', '--shard_samples', '96', '--workers', '2',
                               '--batches', '3', '--batch_size', '8', '--image_res', '8',
                               '--workdir', str(tmp_path), '--json', '--in_process'])
    printed = json.loads(capsys.readouterr().out)
    assert printed['runs'].keys() == results['runs'].keys() == {
        'baseline (small JSON)', 'list-of-dicts', 'compact (cold)', 'compact (warm)', 'JSON + loose files',
        'tar shards (cold)', 'tar shards (warm)'}
    for name, run in results['runs'].items():
        assert run['batches'] == 3 and run['pss_mib'] > 0 and run['images_per_s'] > 0, name
    assert results['runs']['list-of-dicts']['items'] == results['runs']['compact (warm)']['items'] == 300
    assert results['runs']['tar shards (warm)']['items'] == results['runs']['JSON + loose files']['items'] == 96
    assert {'pss_warm', 'pss_warm_above', 'startup_warm', 'shards_vs_loose'} <= results['ratios'].keys()
    assert 'list-of-dicts' in data_scale.table(results)
