"""Time VQA answer ranking (model_vqa.rank_answer): questions batched per call vs one question per call.

    python -m benchmarks.vqa_rank                                   # small model, 1000 answers, k 128: a table
    python -m benchmarks.vqa_rank --k 16 --threads 1 --json         # one JSON line
    python -m benchmarks.vqa_rank --device cuda --precision bf16 --questions 256 --repeats 5

Model: the 'small' size of benchmarks/train_step.py (ViT 384 wide, 6 deep, 6 heads at 128 px; BERT 384 x 6 with
fusion from layer 3; a 6-layer answer decoder; the 30522-token vocabulary), random weights, eval mode. Inputs:
random images and 12-token questions; a candidate list of --answers random answers of 1-4 word pieces plus [SEP].
Question states are computed once, outside the timing; each measurement times rank_answer over --questions
questions (median of --repeats runs after one warm-up), either in calls of --batch questions ("batched", what
VQA.py does) or one question per call ("per question"), and checks that both give the same answers. Most of the
time is the decoder's full-vocabulary softmax over the k candidates of every question (k x answer length x 30522
logits per question), which both ways pay; batching saves the per-call overhead and runs larger matrix products.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

QUESTION_LEN = 12
CLS, SEP = 101, 102


def build_config(size: str) -> dict:
    from benchmarks.train_step import build_config as train_config
    config = train_config(size, False)
    config.update(distill=False, vqa_decoder_layers=6)  # inference only: no momentum copies
    return config


def random_candidates(n: int, vocab_size: int, generator):
    """n distinct random answers "[CLS] 1-4 pieces [SEP] [PAD]..." as (ids, mask) [n, 6]."""
    import torch
    ids = torch.zeros(n, 6, dtype=torch.long)
    lengths = torch.randint(1, 5, (n,), generator=generator)
    for i in range(n):
        pieces = torch.randint(1000, vocab_size, (int(lengths[i]),), generator=generator)
        ids[i, :len(pieces) + 2] = torch.cat([torch.tensor([CLS]), pieces, torch.tensor([SEP])])
    return ids, (ids != 0).long()


def measure(args) -> dict:
    import torch
    import engine
    import models
    import utils
    torch.set_num_threads(args.threads)
    utils.tune_memory_allocator()  # as the task scripts do (utils.prepare_run)
    device = torch.device(args.device)
    config = build_config(args.size)
    torch.manual_seed(0)
    model = models.create_model('vqa', config, None).to(device).eval()
    vocab = model.text_decoder.config.vocab_size
    g = torch.Generator().manual_seed(0)
    cand_ids, cand_atts = (t.to(device) for t in random_candidates(args.answers, vocab, g))
    k = min(args.k, args.answers)
    res = config['image_res']
    images = torch.randn(args.questions, 3, res, res, generator=g).to(device)
    q_ids = torch.randint(1000, vocab, (args.questions, QUESTION_LEN), generator=g)
    q_ids[:, 0] = CLS
    q_ids, q_atts = q_ids.to(device), torch.ones_like(q_ids).to(device)

    def sync():
        if device.type == 'cuda':
            torch.cuda.synchronize()

    with torch.no_grad(), engine.autocast(device, args.precision):
        states = torch.cat([model.encode_question(images[i:i + args.batch], q_ids[i:i + args.batch],
                                                  q_atts[i:i + args.batch])
                            for i in range(0, args.questions, args.batch)])

        def run(per_call: int):
            best = []
            for i in range(0, args.questions, per_call):
                ids, probs = model.rank_answer(states[i:i + per_call], q_atts[i:i + per_call], cand_ids, cand_atts,
                                               k)
                best.append(ids.gather(1, probs.argmax(1, keepdim=True)).squeeze(1))
            sync()
            return torch.cat(best)

        def timed(per_call: int):
            answers = run(per_call)  # warm-up
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                run(per_call)
                times.append(time.perf_counter() - start)
            return statistics.median(times), answers

        t_batched, a_batched = timed(args.batch)
        t_single, a_single = timed(1)
    agree = float((a_batched == a_single).float().mean())
    return {'size': args.size, 'device': str(device), 'precision': args.precision, 'threads': args.threads,
            'answers': args.answers, 'k': k, 'batch': args.batch, 'questions': args.questions,
            'batched_q_per_s': args.questions / t_batched, 'per_question_q_per_s': args.questions / t_single,
            'speedup': t_single / t_batched, 'same_answers': agree}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--size', default='small', choices=['small', 'full', 'toy'])
    parser.add_argument('--answers', type=int, default=1000, help='candidate answers in the list')
    parser.add_argument('--k', type=int, default=128, help='k_test: candidates re-ranked per question')
    parser.add_argument('--batch', type=int, default=16, help='questions per rank_answer call (batched)')
    parser.add_argument('--questions', type=int, default=16, help='questions timed per run')
    parser.add_argument('--repeats', type=int, default=2)
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--precision', default='fp32', choices=['fp32', 'bf16', 'fp16'])
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--json', action='store_true', help='print one JSON line instead of the table')
    args = parser.parse_args(argv)
    r = measure(args)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"VQA ranking, {r['size']} model, {r['answers']} candidates, k {r['k']}, {r['device']} {r['precision']}, "
          f"{r['threads']} threads, {r['questions']} questions")
    print(f"{'mode':<28}{'questions/s':>12}")
    print(f"{'batched (' + str(r['batch']) + ' per call)':<28}{r['batched_q_per_s']:>12.2f}")
    print(f"{'per question (1 per call)':<28}{r['per_question_q_per_s']:>12.2f}")
    print(f"speed-up {r['speedup']:.2f}x; same answers for {100 * r['same_answers']:.0f}% of the questions")
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
