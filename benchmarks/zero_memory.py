"""Per-rank peak memory of data-parallel pretraining with and without ZeRO-1 (config `zero: true`).

    python -m benchmarks.zero_memory                          # full size, batch 4 per rank, 2 gloo CPU ranks
    python -m benchmarks.zero_memory --size toy --json        # one JSON line (tests use the toy size)

For each mode (plain DDP, then ZeRO-1) `--ranks` processes of this script start as torchrun would (gloo on CPU),
each building the pretraining model of benchmarks/train_step.py's `--size` (momentum copies, 65,536-entry queues),
wrapping it in DDP as the engine does (gradients as bucket views, 25 MB buckets) and taking `--steps` training
steps (forward, backward, AdamW step) on random batches of `--batch`, the optimizer built by the project's
factory (`create_optimizer(..., zero=...)`: fused AdamW, the weight-decay groups). Each rank reports its peak RSS
and the bytes of optimizer state it holds. One thread per rank; malloc tuned as in the task scripts.

The table adds what ZeRO-1 holds per rank at 8 ranks, by arithmetic: the optimizer state is partitioned by
parameter, so each rank keeps about 1/8 of the plain run's state (the largest shard is a little over that), and
the saving per rank is the rest.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks.train_step import SIZES, _Tokenizer, build_config, pretrain_inputs, training_step

MODES = ('plain', 'zero')


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of the tensors in this rank's optimizer state (a ZeroRedundancyOptimizer: its local shard)."""
    import torch
    from optim import ZeroRedundancyOptimizer
    inner = optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer
    return sum(t.numel() * t.element_size() for st in inner.state.values() if st
               for t in st.values() if torch.is_tensor(t))


def rank_main(mode: str, size: str, batch: int, steps: int) -> dict:
    """One rank: build, wrap, train `steps` steps; returns its measurements."""
    import torch
    import torch.distributed as dist
    import engine
    import models
    import utils
    from optim import create_optimizer
    torch.set_num_threads(1)
    utils.tune_memory_allocator()
    dist.init_process_group('gloo')
    rank = dist.get_rank()
    torch.manual_seed(0)
    config = build_config(size, False)
    model = models.create_model('pretrain', config, _Tokenizer(config['bert_config']['vocab_size']))
    model.copy_params()
    model.train()
    ddp = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=True,
                                                    bucket_cap_mb=engine.DDP_BUCKET_CAP_MB)
    optimizer = create_optimizer(utils.AttrDict(opt='adamW', lr=1e-4, weight_decay=0.02), model,
                                 zero=mode == 'zero')
    torch.manual_seed(1 + rank)
    inputs = pretrain_inputs(config, batch, torch.device('cpu'))
    for _ in range(steps):
        training_step(ddp, optimizer, inputs, {'alpha': 0.4}, torch.device('cpu'), 'fp32')
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result = dict(mode=mode, rank=rank, world_size=dist.get_world_size(), size=size, batch=batch, steps=steps,
                  optimizer_class=type(optimizer).__name__, trained_params=trained,
                  optimizer_state_mb=optimizer_state_bytes(optimizer) / 2 ** 20,
                  peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    dist.destroy_process_group()
    return result


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_mode(mode: str, args) -> list[dict]:
    """Start `args.ranks` ranks of `mode` and collect their JSON lines (rank order)."""
    port = str(free_port())
    procs = []
    for rank in range(args.ranks):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(args.ranks), LOCAL_RANK=str(rank),
                   MASTER_ADDR='127.0.0.1', MASTER_PORT=port, OMP_NUM_THREADS='1')
        procs.append(subprocess.Popen([sys.executable, '-m', 'benchmarks.zero_memory', '--_rank', mode, '--size', args.size, '--batch',
                                       str(args.batch), '--steps', str(args.steps)], env=env, cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            for q in procs:
                if q.poll() is None:
                    q.kill()
            raise RuntimeError(f'{mode} rank failed:\n' + '\n'.join(err.strip().splitlines()[-8:]))
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def summarise(results: dict[str, list[dict]], at_ranks: int = 8) -> dict:
    """Worst-rank peaks of both modes, their ratio, and the per-rank optimizer state at `at_ranks` ranks."""
    plain, zero = results['plain'], results['zero']
    full_state = max(r['optimizer_state_mb'] for r in plain)
    return dict(plain_peak_mb=max(r['peak_rss_mb'] for r in plain), zero_peak_mb=max(r['peak_rss_mb'] for r in zero),
                ratio=max(r['peak_rss_mb'] for r in zero) / max(r['peak_rss_mb'] for r in plain),
                plain_state_mb=full_state, zero_state_mb=[r['optimizer_state_mb'] for r in zero],
                at_ranks=at_ranks, zero_state_at_ranks_mb=full_state / at_ranks,
                saved_at_ranks_mb=full_state - full_state / at_ranks)


def table(results: dict[str, list[dict]], s: dict) -> str:
    r0 = results['plain'][0]
    lines = [f"size {r0['size']}, batch {r0['batch']} per rank, {r0['world_size']} gloo CPU ranks, "
             f"{r0['steps']} steps, {r0['trained_params'] / 1e6:.1f} M trained parameters",
             '| mode | rank | optimizer | optimizer state MB | peak RSS MB |', '| --- | --- | --- | --- | --- |']
    for mode in MODES:
        for r in results[mode]:
            lines.append(f"| {mode} | {r['rank']} | {r['optimizer_class']} | {r['optimizer_state_mb']:.0f} | "
                         f"{r['peak_rss_mb']:.0f} |")
    lines.append(f"\nworst-rank peak RSS, zero / plain: {s['zero_peak_mb']:.0f} / {s['plain_peak_mb']:.0f} MB = "
                 f"{s['ratio']:.2f}x")
    lines.append(f"at {s['at_ranks']} ranks (arithmetic): optimizer state per rank {s['plain_state_mb']:.0f} MB "
                 f"plain, about {s['zero_state_at_ranks_mb']:.0f} MB with zero (saves "
                 f"{s['saved_at_ranks_mb']:.0f} MB per rank)")
    return '\n'.join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--size', choices=sorted(SIZES), default='full')
    p.add_argument('--batch', type=int, default=4, help='per rank')
    p.add_argument('--ranks', type=int, default=2)
    p.add_argument('--steps', type=int, default=3, help='training steps per rank (the 2nd has the AdamW state)')
    p.add_argument('--json', action='store_true', help='one JSON line: every rank of both modes and the summary')
    p.add_argument('--out', default=None, help='also write that JSON to this file')
    p.add_argument('--_rank', choices=MODES, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._rank:
        print(json.dumps(rank_main(args._rank, args.size, args.batch, args.steps)))
        return 0
    results = {mode: run_mode(mode, args) for mode in MODES}
    s = summarise(results)
    if args.json:
        print(json.dumps({'ranks': results, 'summary': s}))
    else:
        print(table(results, s))
    if args.out:
        with open(args.out, 'w') as f:
            json.dump({'ranks': results, 'summary': s}, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
