"""Time one ALBEF pretraining step (zero grad, forward with alpha 0.4, backward, AdamW step) and its peak memory.

    python -m benchmarks.train_step --size small --batch 16 --precision bf16          # one row, this process
    python -m benchmarks.train_step --size small --batch 16 --compare                 # baseline vs fast, a table
    python -m benchmarks.train_step --size full --batch 4 --grad-checkpointing --json # one JSON line
    python -m benchmarks.train_step --size small --batch 16 --compile                 # eager vs compiled encoders

Inputs are random images and 25-token texts. Each measurement is the median of --steps timed steps after
--warmup untimed ones, with 2 threads. Peak memory is the process's peak RSS, so a clean comparison runs each
configuration in its own process: `--compare` does that and prints our fp32 eager path with explicit
(manual) attention beside the requested fast path, so the ratio is measured on the same machine and moment.

The FLOPs of one step (forward and backward of every matmul, convolution and attention, counted by torch's
FlopCounterMode on one extra untimed step) give the achieved TFLOP/s; with `--peak-tflops` (the device's dense peak
for the precision, e.g. 989 for an H100 SXM in bf16, 0.41 for the 2-core reference CPU in bf16) also the model
FLOPs utilisation. On CUDA `--device cuda` adds the peak allocated GPU memory.

`--compile` compiles the encoders as training does with `compile: true` (engine.compile_encoders, inductor) and
prints the compiled row beside eager, each in its own process, with the compile time: the time the warm-up steps
took beyond as many steady-state steps (the first compiled steps trace and generate code; the MLM mask's varying
size makes the second step recompile once with dynamic shapes, so use --warmup 2 or more). FLOPs are counted on an
eager step in both rows (the same arithmetic).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SIZES = {
    # ViT-B/16 + BERT-base at 256 px: the paper's model.
    'full': dict(image_res=256, patch_size=16, vision_width=768, vision_depth=12, vision_num_heads=12,
                 bert=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                           fusion_layer=6)),
    'small': dict(image_res=128, patch_size=16, vision_width=384, vision_depth=6, vision_num_heads=6,
                  bert=dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536,
                            fusion_layer=3)),
    'toy': dict(image_res=64, patch_size=8, vision_width=128, vision_depth=4, vision_num_heads=4,
                bert=dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                          fusion_layer=2, vocab_size=200)),
}
TEXT_LEN = 25


def build_config(size: str, grad_checkpointing: bool) -> dict:
    spec = SIZES[size]
    with open(os.path.join(ROOT, 'configs', 'config_bert.json')) as f:
        bert = json.load(f)
    bert.update(spec['bert'])
    bert['encoder_width'] = spec['vision_width']
    config = {k: v for k, v in spec.items() if k != 'bert'}
    config.update(bert_config=bert, embed_dim=256, queue_size=65536, temp=0.07, momentum=0.995,
                  mlm_probability=0.15, alpha=0.4, grad_checkpointing=grad_checkpointing)
    return config


class _Tokenizer:
    """The special ids the MLM masking reads (bert-base-uncased layout); no vocabulary needed here."""
    pad_token_id, cls_token_id, sep_token_id, mask_token_id, unk_token_id = 0, 101, 102, 103, 100

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def __len__(self):
        return self.vocab_size


def use_manual_attention(model) -> None:
    """Compute every attention explicitly (softmax(QK^T)V), like the original code, instead of fused SDPA."""
    for module in model.modules():
        if hasattr(module, 'save_attention'):
            module.save_attention = True


def training_step(model, optimizer, inputs: tuple, kwargs: dict, device, precision: str, scaler=None,
                  allow_cpu_fp16: bool = False) -> None:
    """Zero grad, forward under `precision` autocast (the model returns a loss or a dict of losses), backward, step;
    with `scaler` (fp16) the loss is scaled and the step goes through the scaler as in the engine."""
    import engine
    optimizer.zero_grad(set_to_none=True)
    with engine.autocast(device, precision, allow_cpu_fp16=allow_cpu_fp16):
        out = model(*inputs, **kwargs)
    loss = sum(out.values()) if isinstance(out, dict) else out
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        engine.scaled_optimizer_step(scaler, optimizer)


def count_flops(fn) -> int:
    """FLOPs of one call of `fn` (matmuls, convolutions, attention; forward and backward), by FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def pretrain_inputs(config: dict, batch: int, device) -> tuple:
    """Random images and 25-token texts of one pretraining batch (ids past the special ones, [CLS] first)."""
    import torch
    vocab, r = config['bert_config']['vocab_size'], config['image_res']
    images = torch.randn(batch, 3, r, r, device=device)
    ids = torch.randint(1000, vocab, (batch, TEXT_LEN), device=device) if vocab > 1000 else \
        torch.randint(5, vocab, (batch, TEXT_LEN), device=device)
    ids[:, 0] = 101 if vocab > 1000 else 2
    return images, ids, torch.ones_like(ids)


def measure(args) -> dict:
    import torch
    import models
    import utils
    from optim import create_optimizer
    from utils import AttrDict
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    malloc_tuned = utils.tune_memory_allocator()  # as the task scripts do (utils.prepare_run)
    device = torch.device(args.device)
    config = build_config(args.size, args.grad_checkpointing)
    vocab = config['bert_config']['vocab_size']
    model = models.create_model('pretrain', config, _Tokenizer(vocab))
    model.copy_params()
    if args.manual_attention:
        use_manual_attention(model)
    model.to(device).train()
    optimizer = create_optimizer(AttrDict(opt='adamW', lr=1e-4, weight_decay=0.02), model)
    b = args.batch
    images, ids, mask = pretrain_inputs(config, b, device)

    def step():
        training_step(model, optimizer, (images, ids, mask), {'alpha': 0.4}, device, args.precision)
        if device.type == 'cuda':
            torch.cuda.synchronize()

    step_flops = count_flops(step)  # eager, before any compilation: the same arithmetic either way
    if args.compile:
        import engine
        engine.compile_encoders(model)

    times = []
    for i in range(args.warmup + args.steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    warmup_s, times = sum(times[:args.warmup]), times[args.warmup:]
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = dict(size=args.size, batch=b, precision=args.precision, device=args.device,
                  grad_checkpointing=args.grad_checkpointing, attention='manual' if args.manual_attention else 'sdpa',
                  compile=args.compile, malloc_tuned=malloc_tuned, median_step_s=statistics.median(times),
                  min_step_s=min(times), max_step_s=max(times), samples_per_s=b / statistics.median(times), peak_rss_mb=peak_rss_mb,
                  step_gflop=step_flops / 1e9, achieved_tflop_s=step_flops / statistics.median(times) / 1e12,
                  warmup_s=warmup_s, compile_s=max(0., warmup_s - args.warmup * statistics.median(times))
                  if args.compile else None)
    if args.peak_tflops:
        result['mfu'] = result['achieved_tflop_s'] / args.peak_tflops
    if device.type == 'cuda':
        result['peak_cuda_mb'] = torch.cuda.max_memory_allocated() / 2 ** 20
    return result


def row(r: dict) -> str:
    variant = f"{r['precision']} {r['attention']}" + (' ckpt' if r['grad_checkpointing'] else '') + \
              (' compile' if r['compile'] else '')
    return (f"| {r['size']} | {r['batch']} | {variant} | {r['median_step_s']:.3f} | {r['min_step_s']:.3f} / "
            f"{r['max_step_s']:.3f} | {r['samples_per_s']:.1f} | {r['step_gflop']:.0f} | "
            f"{r['achieved_tflop_s']:.3f} | {r['mfu'] * 100 if 'mfu' in r else float('nan'):.0f} | "
            f"{r['peak_rss_mb']:.0f} |" + (f" {r['peak_cuda_mb']:.0f} |" if 'peak_cuda_mb' in r else ''))


def header(cuda: bool) -> str:
    columns = ['size', 'batch', 'variant', 'median s/step', 'min / max', 'samples/s', 'GFLOP/step', 'TFLOP/s',
               'MFU %', 'peak RSS MB'] + (['peak CUDA MB'] if cuda else [])
    return '| ' + ' | '.join(columns) + ' |\n' + '| --- ' * len(columns) + '|'



def run_subprocess(argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, '-m', 'benchmarks.train_step', *argv, '--json'], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--size', choices=sorted(SIZES), default='small')
    p.add_argument('--batch', type=int, default=None, help='default: 4 (full), 16 (small), 32 (toy)')
    p.add_argument('--precision', choices=['fp32', 'bf16'], default='fp32')
    p.add_argument('--grad-checkpointing', action='store_true')
    p.add_argument('--manual-attention', action='store_true', help='explicit softmax attention (baseline)')
    p.add_argument('--compile', action='store_true',
                   help='compile the encoders (as `compile: true`); alone: eager and compiled rows, compile time')
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--peak-tflops', type=float, default=None,
                   help="the device's dense peak TFLOP/s for --precision: adds model FLOPs utilisation")
    p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--steps', type=int, default=5)
    p.add_argument('--json', action='store_true', help='print one JSON line (one measurement, this process)')
    p.add_argument('--compare', action='store_true',
                   help='measure the fp32 manual-attention baseline and the requested variant, each in a subprocess')
    p.add_argument('--out', default=None, help='also write the results as JSON to this file')
    args = p.parse_args(argv)
    if args.batch is None:
        args.batch = {'full': 4, 'small': 16, 'toy': 32}[args.size]
    common = ['--size', args.size, '--batch', str(args.batch), '--device', args.device, '--threads',
              str(args.threads), '--warmup', str(args.warmup), '--steps', str(args.steps)] + \
        (['--peak-tflops', str(args.peak_tflops)] if args.peak_tflops else [])
    if args.compare:
        fast = common + ['--precision', args.precision] + (['--grad-checkpointing'] if args.grad_checkpointing
                                                           else []) + (['--compile'] if args.compile else [])
        results = [run_subprocess(common + ['--precision', 'fp32', '--manual-attention']), run_subprocess(fast)]
        print(header(args.device.startswith('cuda')))
        for r in results:
            print(row(r))
        speedup = results[0]['median_step_s'] / results[1]['median_step_s']
        print(f'\nspeed-up of the fast path over the fp32 manual-attention baseline: {speedup:.2f}x; '
              f"peak memory ratio {results[1]['peak_rss_mb'] / results[0]['peak_rss_mb']:.2f}")
    elif args.compile and not args.json:
        variant = common + ['--precision', args.precision] + (['--grad-checkpointing'] if args.grad_checkpointing
                                                              else [])
        results = [run_subprocess(variant), run_subprocess(variant + ['--compile'])]
        print(header(args.device.startswith('cuda')))
        for r in results:
            print(row(r))
        eager, compiled = results
        print(f"\ncompile time (warm-up beyond steady-state steps): {compiled['compile_s']:.1f} s; step time "
              f"compiled / eager: {compiled['median_step_s'] / eager['median_step_s']:.2f}")
    else:
        results = [measure(args)]
        if args.json:
            print(json.dumps(results[0]))
        else:
            print(header(args.device.startswith('cuda')))
            print(row(results[0]))
    if args.out:
        import utils
        utils.atomic_write_text(args.out, json.dumps(results, indent=1))
    return 0


if __name__ == '__main__':
    sys.exit(main())
