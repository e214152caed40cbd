"""One command that checks and measures training on one GPU (H100 / H200: under 7 minutes) and prints one table.

    python3 -m benchmarks.gpu_check                      # on the GPU; --json: the rows as JSON; --out FILE too
    python3 -m benchmarks.gpu_check --peak-tflops 756    # another card's dense bf16 peak (H100 PCIe here)
    python3 -m benchmarks.gpu_check --tiny               # the same code paths on CPU in seconds (tests run it)

Rows (random weights and inputs; the models of benchmarks/train_step.py's sizes, fused AdamW):

* pretraining at full size (ViT-B/16 + BERT-base) at 256 px, bf16, eager and with the encoders compiled as
  `compile: true` does (engine.compile_encoders): samples/s, achieved TFLOP/s (FLOPs of one eager step counted
  by torch's FlopCounterMode), MFU against the card's dense bf16 peak (detected from the device name: H100 SXM and
  H200 989, H100 NVL 835, H100 PCIe 756, A100 312 TFLOP/s; --peak-tflops overrides), peak CUDA memory; the
  compiled row adds the compile time and how far its losses are from eager's on the same batch (eval mode, same
  weights and random draws);
* the same step in fp16 with the engine's loss scaler: the scale after the steps must be finite, skipped steps
  are counted;
* retrieval and VQA fine-tuning steps at 384 px, bf16, with and without gradient checkpointing, at two batch
  sizes: samples/s (larger batch), peak CUDA memory, and the largest batch that fits a 24 / 40 / 80 GB card from
  the slope between the two (memory = fixed + per sample x batch, with 1 GB of each card left for the CUDA
  context and the caching allocator: an estimate, not a measurement at that batch);
* retrieval evaluation (features, top-k_test ITM re-ranking both ways, as Retrieval.py evaluates) of 1,000
  images x 5 captions at 384 px in bf16: seconds.

--tiny: the 'toy' size at its own 64 px (fine-tuning at 96 px), 64-entry queues, one timed step per row, 8 images
for the evaluation, on CPU
(fp16 autocast allowed there for this check only), and the compile row with torch.compile's 'eager' backend
(graph capture only: inductor's C++ code generation takes minutes on CPU). Its numbers mean nothing; it proves
the script runs.

Runs under a plain CUDA image's python3 with torch, timm and transformers: configs are built in code here, and
nothing imported at module level reads YAML with ruamel (the project's utils loads it only inside load_config)
or needs OpenCV (the engine no longer imports the dataset package).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks.memory_table import CARDS_GB, build_inputs
from benchmarks.retrieval_eval import SPECIALS, RandomRetrievalSet, make_tokenizer
from benchmarks.train_step import _Tokenizer, build_config, count_flops, pretrain_inputs, training_step

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, by a substring of torch.cuda.get_device_name(); first match.
PEAK_BF16_TFLOPS = (('H200', 989.0), ('H100 NVL', 835.0), ('H100 PCIe', 756.0), ('H100', 989.0),
                    ('A100', 312.0), ('L40S', 362.0))
CARD_RESERVE_GB = 1.0  # CUDA context and allocator slack left on each card in the batch estimates

GPU = dict(size='full', pretrain_batch=64, finetune_res=384, finetune_batches=(8, 16), warmup=3, steps=10,
           finetune_steps=5, eval_images=1000, k_test=256, queue_size=65536, compile_backend='inductor')
TINY = dict(size='toy', pretrain_batch=4, finetune_res=96, finetune_batches=(2, 4), warmup=2, steps=1,
            finetune_steps=1, eval_images=8, k_test=4, queue_size=64, compile_backend='eager')
CAPTIONS = 5


def detect_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a known card (by name), else None."""
    for key, peak in PEAK_BF16_TFLOPS:
        if key in device_name:
            return peak
    return None


def fits(fixed_gb: float, per_sample_gb: float) -> dict:
    """Largest batch on each card size from memory = fixed + per_sample x batch."""
    out = {}
    for card in CARDS_GB:
        room = card - CARD_RESERVE_GB - fixed_gb
        out[f'fits_{card}gb'] = max(0, int(room // per_sample_gb)) if per_sample_gb > 0 else None
    return out


class Check:
    """Shared state of one run: device, plan, peak, and the timing / memory helpers."""

    def __init__(self, args):
        import torch
        self.torch = torch
        self.plan = TINY if args.tiny else GPU
        self.device = torch.device('cpu' if args.tiny else 'cuda')
        self.cuda = self.device.type == 'cuda'
        self.tiny = args.tiny
        if not self.cuda and not args.tiny:
            raise SystemExit('gpu_check: no CUDA device (use --tiny for the CPU smoke run)')
        self.device_name = torch.cuda.get_device_name() if self.cuda else 'cpu'
        self.peak_tflops = args.peak_tflops or (detect_peak_tflops(self.device_name) if self.cuda else None)
        self.rows: list[dict] = []
        self.start = time.perf_counter()

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_memory(self):
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gb(self) -> float | None:
        return self.torch.cuda.max_memory_allocated() / 2 ** 30 if self.cuda else None

    def timed(self, step, warmup: int, steps: int) -> tuple[float, float]:
        """(median step seconds, seconds of the warm-up steps)."""
        times = []
        for _ in range(warmup + steps):
            start = time.perf_counter()
            step()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times[warmup:]), sum(times[:warmup])

    def add(self, row: dict) -> dict:
        if row.get('tflop_s') is not None and self.peak_tflops:
            row['mfu'] = row['tflop_s'] / self.peak_tflops
        self.rows.append(row)
        print(f"  {time.perf_counter() - self.start:6.1f} s  {row['check']} {row.get('precision', '')}"
              f"{' compiled' if row.get('compiled') else ''}: done", file=sys.stderr, flush=True)
        return row


def model_and_optimizer(check: Check, task: str, config: dict):
    import models
    import utils
    from optim import create_optimizer
    torch = check.torch
    torch.manual_seed(0)
    model = models.create_model(task, config, _Tokenizer(config['bert_config']['vocab_size']))
    if hasattr(model, 'copy_params'):
        model.copy_params()
    model.to(check.device).train()
    optimizer = create_optimizer(utils.AttrDict(opt='adamW', lr=1e-5, weight_decay=0.02), model)
    return model, optimizer


def eval_losses(check: Check, model, inputs, weights: dict) -> dict:
    """The pretraining losses of `inputs` with the state `weights` (weights and queues) in eval mode (no dropout),
    seeded random draws (MLM masks, ITM negatives); the forward's momentum and queue updates are undone after."""
    torch = check.torch
    import engine
    model.load_state_dict(weights)
    model.eval()
    torch.manual_seed(123)
    with torch.no_grad(), engine.autocast(check.device, 'bf16'):
        out = {k: float(v) for k, v in model(*inputs, alpha=0.4).items()}
    model.load_state_dict(weights)
    model.train()
    return out


def pretraining_rows(check: Check) -> None:
    import engine
    torch = check.torch
    plan = check.plan
    config = build_config(plan['size'], False)
    config['queue_size'] = plan['queue_size']
    model, optimizer = model_and_optimizer(check, 'pretrain', config)
    b = plan['pretrain_batch']
    inputs = pretrain_inputs(config, b, check.device)
    common = dict(size=plan['size'], image_res=config['image_res'], batch=b)

    def step(precision, scaler=None):
        training_step(model, optimizer, inputs, {'alpha': 0.4}, check.device, precision, scaler=scaler,
                      allow_cpu_fp16=check.tiny)

    flops = count_flops(lambda: (step('bf16'), check.sync()))
    # eager and compiled losses at these weights; kept in host memory, out of the peaks measured
    snapshot = {k: v.detach().to('cpu', copy=True) for k, v in model.state_dict().items()}
    eager_losses = eval_losses(check, model, inputs, snapshot)
    for precision in ('bf16', 'fp16'):
        check.reset_memory()
        scaler = engine.grad_scaler(check.device, precision)
        skipped = []
        if scaler is not None:  # count the skips as the engine does
            def one(scaler=scaler):
                scale = scaler.get_scale()
                step('fp16', scaler)
                skipped.append(scaler.get_scale() < scale)
        else:
            def one():
                step(precision)
        median, _ = check.timed(one, plan['warmup'], plan['steps'])
        row = dict(check='pretrain step', precision=precision, compiled=False, **common, step_s=median,
                   samples_s=b / median, tflop_s=flops / median / 1e12, peak_gb=check.peak_gb())
        if scaler is not None:
            row.update(loss_scale=scaler.get_scale(), loss_scale_finite=math.isfinite(scaler.get_scale()),
                       skipped_steps=sum(skipped), steps_run=len(skipped))
        check.add(row)

    check.reset_memory()
    start = time.perf_counter()
    engine.compile_encoders(model, backend=plan['compile_backend'])
    median, warmup_s = check.timed(lambda: step('bf16'), plan['warmup'], plan['steps'])
    compiled_losses = eval_losses(check, model, inputs, snapshot)
    del snapshot
    diff = max(abs(compiled_losses[k] - v) / max(abs(v), 1e-6) for k, v in eager_losses.items())
    check.add(dict(check='pretrain step', precision='bf16', compiled=True, **common, step_s=median,
                   samples_s=b / median, tflop_s=flops / median / 1e12, peak_gb=check.peak_gb(),
                   compile_s=max(0., warmup_s - plan['warmup'] * median), compile_backend=plan['compile_backend'],
                   loss_rel_diff_vs_eager=diff, wall_s=time.perf_counter() - start))
    del model, optimizer


def finetune_rows(check: Check, task: str) -> dict:
    """Rows of one fine-tuning task at both batch sizes, without and with gradient checkpointing; returns the
    retrieval model for the evaluation (None for VQA)."""
    from models.encoder_config import apply_grad_checkpointing
    plan = check.plan
    config = build_config(plan['size'], False)
    config.update(image_res=plan['finetune_res'], distill=True, alpha=0.4,
                  queue_size=plan['queue_size'], k_test=plan['k_test'])
    model, optimizer = model_and_optimizer(check, task, config)
    text_modules = [model.text_encoder] + ([model.text_decoder] if task == 'vqa' else [])
    vocab = config['bert_config']['vocab_size']
    for ckpt in (False, True):
        apply_grad_checkpointing({'grad_checkpointing': ckpt}, model.visual_encoder, *text_modules)
        peaks, speeds = [], []
        for b in plan['finetune_batches']:
            args, kwargs = build_inputs(task, b, plan['finetune_res'], vocab)
            args = tuple(a.to(check.device) if check.torch.is_tensor(a) else a for a in args)
            check.reset_memory()
            median, _ = check.timed(lambda: training_step(model, optimizer, args, kwargs, check.device, 'bf16'),
                                    1, plan['finetune_steps'])
            peaks.append(check.peak_gb())
            speeds.append(b / median)
        row = dict(check=f'{task} fine-tune step', precision='bf16', grad_checkpointing=ckpt,
                   image_res=plan['finetune_res'], batch=plan['finetune_batches'][-1], samples_s=speeds[-1],
                   peak_gb=peaks[-1], batches=list(plan['finetune_batches']), peaks_gb=peaks)
        if check.cuda:
            (b1, b2), (m1, m2) = plan['finetune_batches'], peaks
            per_sample = (m2 - m1) / (b2 - b1)
            row.update(per_sample_gb=per_sample, fixed_gb=m1 - per_sample * b1, **fits(m1 - per_sample * b1,
                                                                                      per_sample))
        check.add(row)
    apply_grad_checkpointing({'grad_checkpointing': False}, model.visual_encoder, *text_modules)
    return model if task == 'retrieval' else None


def evaluation_row(check: Check, model) -> None:
    from torch.utils.data import DataLoader
    from evaluation.retrieval import score_matrices
    plan = check.plan
    vocab = model.text_encoder.config.vocab_size
    tokenizer = make_tokenizer(vocab, tempfile.mkdtemp(prefix='gpu_check_vocab_'))
    data = RandomRetrievalSet(plan['eval_images'], CAPTIONS, plan['finetune_res'], vocab - len(SPECIALS))
    loader = DataLoader(data, batch_size=64, shuffle=False, num_workers=0)
    model.eval()
    check.reset_memory()
    start = time.perf_counter()
    i2t, t2i = score_matrices(model, loader, tokenizer, check.device, k_test=plan['k_test'], precision='bf16',
                             progress=False)
    check.sync()
    seconds = time.perf_counter() - start
    check.add(dict(check='retrieval evaluation', precision='bf16', image_res=plan['finetune_res'],
                   images=plan['eval_images'], captions=CAPTIONS, k_test=plan['k_test'], seconds=seconds,
                   samples_s=plan['eval_images'] / seconds, peak_gb=check.peak_gb(),
                   scores_finite=bool(all(map(lambda m: (m == m).all(), (i2t, t2i))))))


def _num(v, fmt):
    return '-' if v is None else format(v, fmt)


def notes(r: dict) -> str:
    out = []
    if r.get('compiled'):
        out.append(f"compile {r['compile_s']:.0f} s ({r['compile_backend']}), losses vs eager rel. diff "
                   f"{r['loss_rel_diff_vs_eager']:.1e}")
    if 'loss_scale' in r:
        out.append(f"loss scale {r['loss_scale']:g} ({'finite' if r['loss_scale_finite'] else 'NOT FINITE'}), "
                   f"{r['skipped_steps']} of {r['steps_run']} steps skipped")
    if 'grad_checkpointing' in r:
        out.append(f"checkpointing {'on' if r['grad_checkpointing'] else 'off'}; peak at batch "
                   f"{'/'.join(map(str, r['batches']))}: {'/'.join(_num(p, '.1f') for p in r['peaks_gb'])} GB")
        if 'fits_24gb' in r:
            out.append('max batch on ' + ' / '.join(f'{c}' for c in CARDS_GB) + ' GB: '
                       + ' / '.join(str(r[f'fits_{c}gb']) for c in CARDS_GB))
    if r['check'] == 'retrieval evaluation':
        out.append(f"{r['seconds']:.1f} s for {r['images']} images x {r['captions']} captions, k_test {r['k_test']}")
    return '; '.join(out)


def table(check: Check) -> str:
    lines = [f"gpu_check on {check.device_name} (dense bf16 peak {_num(check.peak_tflops, '.0f')} TFLOP/s)",
             '| check | px | precision | compiled | batch | samples/s | TFLOP/s | MFU % | peak GB | notes |',
             '| --- ' * 10 + '|']
    for r in check.rows:
        if 'error' in r:
            lines.append(f"| {r['check']} | | | | | | | | | FAILED: {r['error']} |")
            continue
        lines.append(f"| {r['check']} | {r['image_res']} | {r['precision']} | {'yes' if r.get('compiled') else 'no'} "
                     f"| {r.get('batch', r.get('images', '-'))} | {_num(r['samples_s'], '.1f')} | "
                     f"{_num(r.get('tflop_s'), '.1f')} | {_num(r['mfu'] * 100 if 'mfu' in r else None, '.0f')} | "
                     f"{_num(r['peak_gb'], '.1f')} | {notes(r)} |")
    return '\n'.join(lines)


def run(args) -> Check:
    check = Check(args)
    torch = check.torch
    if check.tiny:
        torch.set_num_threads(1)  # tests run it beside other work: one thread contends least
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    start = time.perf_counter()
    # A failing section (out of memory, a compiler error) becomes an error row; the others still run.
    guarded(check, 'pretrain step', pretraining_rows, check)
    retrieval_model = guarded(check, 'retrieval fine-tune step', finetune_rows, check, 'retrieval')
    guarded(check, 'vqa fine-tune step', finetune_rows, check, 'vqa')
    if retrieval_model is not None:
        guarded(check, 'retrieval evaluation', evaluation_row, check, retrieval_model)
    check.total_s = time.perf_counter() - start
    return check


def guarded(check: Check, name: str, fn, *args):
    """`fn(*args)`, or None after recording an error row for `name` (first line of the exception)."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - reported in the table, the remaining sections run
        first = (str(e).strip().splitlines() or [''])[0][:200]
        check.rows.append(dict(check=name, error=f'{type(e).__name__}: {first}'))
        print(f'  {name}: FAILED ({type(e).__name__}: {first})', file=sys.stderr, flush=True)
        if check.cuda:
            check.torch.cuda.empty_cache()
        return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--tiny', action='store_true', help='toy sizes on CPU, a few steps (a smoke run)')
    p.add_argument('--peak-tflops', type=float, default=None, help="the card's dense bf16 peak (default: by name)")
    p.add_argument('--json', action='store_true', help='print the rows as one JSON line instead of the table')
    p.add_argument('--out', default=None, help='also write the rows as JSON to this file')
    args = p.parse_args(argv)
    check = run(args)
    result = dict(device=check.device_name, peak_tflops=check.peak_tflops, total_s=check.total_s, rows=check.rows)
    if args.json:
        print(json.dumps(result))
    else:
        print(table(check))
        print(f'total {check.total_s:.0f} s')
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == '__main__':
    sys.exit(main())
