"""Kill test: SIGKILL toy training at random moments, resume it each time, and compare with an uninterrupted run.

    python -m benchmarks.kill_test                          # pretraining and VE fine-tuning, 20 kills each
    python -m benchmarks.kill_test --trials 5 --tasks pretrain --keep /tmp/kill_test

For each task (Pretrain.py; VE.py, which also evaluates and keeps a best checkpoint every epoch) on a mini toy
world with a tiny model, CPU, --deterministic, a step checkpoint after every step (--save_every_steps 1):

1. a reference run goes through uninterrupted;
2. a second run in its own output folder is killed with SIGKILL (the whole process group) N times, at moments
   drawn with a fixed seed: mostly a random fraction of a step after a random training step (inside the next
   step, its checkpoint write, or the end-of-epoch evaluation and saves), sometimes during start-up. After each
   kill every checkpoint*.pth present must load with torch.load(weights_only=True), log.txt must hold whole JSON
   lines and config.yaml must parse. Then the run is restarted as a user would: with --resume when
   checkpoint_last.pth exists, else from scratch (--overwrite when the folder already holds run files). Temp
   files of a write the kill cut short (*.tmp-partial) must be gone once the restarted process reaches training;
   one is planted before the second restart so that this path is always exercised;
3. after the N kills the run is resumed to the end, and its final checkpoint_last.pth (model, optimizer,
   scheduler, training state, RNG states) must be bit-identical to the reference's (for VE also
   checkpoint_best.pth and the accuracies in results.json).

Prints one row per kill and a summary line per task; exits 1 when any check fails. `run_kill_test` is the
library entry point (tests/test_hardening.py runs it with a few kills).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import torch

import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEP_LINE = re.compile(r'Train epoch \[(\d+)\]\s+\[\s*(\d+)/(\d+)\]')
RESUMED_LINE = re.compile(r'^resumed from ')
PLANTED_PARTIAL = 'checkpoint_last.pth.planted-by-kill-test' + utils.TMP_SUFFIX
STARTUP_KILL_PROBABILITY = 0.15

# Per task: script, toy config name, config overrides on top of the tiny model (tests/toy.py), extra flags.
TASKS = {
    'pretrain': ('Pretrain.py', 'Pretrain', {'batch_size': 4, 'queue_size': 8}, []),
    've': ('VE.py', 'VE', {'batch_size_train': 8, 'batch_size_test': 8}, ['--max_steps_per_epoch', '6']),
}


@dataclasses.dataclass
class Trial:
    """One start of the interrupted run and how it ended."""
    number: int
    start: str                       # fresh | overwrite | resume
    resumed_at: int | None           # global step of the checkpoint it resumed from
    plan: str                        # what the kill aimed at
    last_step_seen: int | None       # last training step the process reported before it died
    exit_code: int | None
    partial_files_left: list[str]
    partials_cleaned: bool | None    # partial files present at this start were removed (None: none, or not reached)
    ok: bool                         # no problem found (files after the kill, clean-up, exit status)
    problems: list[str]


@dataclasses.dataclass
class KillTestReport:
    task: str
    trials: list[Trial]
    kills: int
    completed: bool
    identical: bool
    differences: list[str]
    partials_seen: int
    partials_cleaned: int
    seconds: float
    final: Trial | None = None       # the last start, which runs to the end

    @property
    def ok(self) -> bool:
        return (self.completed and self.identical and all(t.ok for t in self.trials)
                and (self.final is None or self.final.ok)
                and self.partials_cleaned == self.partials_seen and self.kills == len(self.trials))


# ----------------------------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------------------------
class Run:
    """A task script in its own process group, its output read line by line (and copied to a log file)."""

    def __init__(self, argv: list[str], env: dict, log_path: str):
        self.started = time.monotonic()
        self.lines: list[tuple[float, str]] = []
        self.changed = threading.Condition()
        self.log = open(log_path, 'a', encoding='utf-8')
        self.proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.log.write(line)
            with self.changed:
                self.lines.append((time.monotonic(), line.rstrip('\n')))
                self.changed.notify_all()
        with self.changed:
            self.changed.notify_all()

    def wait_for(self, predicate, timeout: float) -> tuple[float, str] | None:
        """The first output line satisfying `predicate` (waiting up to `timeout` s); None when the process ended."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self.changed:
            while True:
                for stamp, line in self.lines[seen:]:
                    if predicate(line):
                        return stamp, line
                seen = len(self.lines)
                if self.proc.poll() is not None and not self.reader.is_alive():
                    return None
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f'no matching output within {timeout} s: {self.proc.args}')
                self.changed.wait(min(left, 0.5))

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the whole group: data loader workers included
        except ProcessLookupError:
            pass

    def finish(self, timeout: float = 600) -> int:
        code = self.proc.wait(timeout=timeout)
        self.reader.join()
        self.log.close()
        return code

    def output(self) -> list[str]:
        return [line for _, line in self.lines]


def _env(threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE='1',
               PYTHONHASHSEED='0', PYTHONUNBUFFERED='1')
    env.pop('RANK', None)
    env.pop('WORLD_SIZE', None)
    return env


def _steps_done(line: str, steps_per_epoch: int) -> int | None:
    """Global index of the training step a progress line reports (log_every counts from the resume point)."""
    m = STEP_LINE.search(line)
    if not m:
        return None
    epoch, i, total = int(m.group(1)), int(m.group(2)), int(m.group(3))
    return epoch * steps_per_epoch + (steps_per_epoch - total) + i


# ----------------------------------------------------------------------------------------------------------------
# Checks on an output folder
# ----------------------------------------------------------------------------------------------------------------
def check_output_files(out: str) -> list[str]:
    """Problems with the files a killed run left: unloadable checkpoints, torn log lines, unreadable config."""
    problems = []
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        if name.startswith('checkpoint') and name.endswith('.pth'):
            try:
                torch.load(path, map_location='cpu', weights_only=True)
            except Exception as e:  # noqa: BLE001 - any failure to load is the finding
                problems.append(f'{name} does not load: {type(e).__name__}: {str(e)[:120]}')
        elif name == 'log.txt':
            with open(path, encoding='utf-8') as f:
                for n, line in enumerate(f):
                    try:
                        json.loads(line)
                    except json.JSONDecodeError:
                        problems.append(f'log.txt line {n + 1} is not a whole JSON object')
        elif name == 'config.yaml':
            try:
                utils.load_config(path)
            except utils.ConfigError as e:
                problems.append(f'config.yaml: {e}')
        elif name.endswith('.json'):
            try:
                with open(path, encoding='utf-8') as f:
                    json.load(f)
            except json.JSONDecodeError as e:
                problems.append(f'{name} is not valid JSON ({e.msg})')
    return problems


def partial_files(out: str) -> list[str]:
    return sorted(n for n in os.listdir(out) if n.endswith(utils.TMP_SUFFIX)) if os.path.isdir(out) else []


def compare(a, b, where: str = '') -> list[str]:
    """Paths at which two loaded checkpoints (nested dicts/lists of tensors and scalars) differ, bit for bit."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f'{where}: keys differ ({sorted(set(a) ^ set(b), key=str)[:3]})']
        return [d for k in a for d in compare(a[k], b[k], f'{where}.{k}' if where else str(k))]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f'{where}: lengths differ']
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in compare(x, y, f'{where}[{i}]')]
    return [] if a == b else [where]


def compare_runs(reference: str, run: str, task: str) -> list[str]:
    """Differences between the final state of two output folders (empty: bit-identical)."""
    diffs = []
    names = ['checkpoint_last.pth'] + (['checkpoint_best.pth'] if task == 've' else [])
    for name in names:
        a = torch.load(os.path.join(reference, name), map_location='cpu', weights_only=True)
        b = torch.load(os.path.join(run, name), map_location='cpu', weights_only=True)
        a.pop('config', None), b.pop('config', None)  # holds the output paths, which differ by design
        diffs += [f'{name}:{d}' for d in compare(a, b)]
    if task == 've':
        with open(os.path.join(reference, 'results.json')) as f, open(os.path.join(run, 'results.json')) as g:
            ra, rb = json.load(f), json.load(g)
        acc = lambda r: {e: (m['val']['acc'], m['test']['acc']) for e, m in r['epochs'].items()}  # noqa: E731
        if acc(ra) != acc(rb) or ra.get('best_epoch') != rb.get('best_epoch'):
            diffs.append('results.json: accuracies or best epoch differ')
    return diffs


# ----------------------------------------------------------------------------------------------------------------
# The test
# ----------------------------------------------------------------------------------------------------------------
def prepare(task: str, world: str, work: str) -> list[str]:
    """Write the task's tiny config; returns the command line shared by every start (without --output_dir)."""
    from tests.toy import TINY_SCHED, mini_config
    script, name, overrides, extra = TASKS[task]
    config = mini_config(name, world, os.path.join(work, f'{task}.yaml'), print_freq=1,
                         schedular=dict(TINY_SCHED, epochs=2), **overrides)
    return [sys.executable, os.path.join(ROOT, script), '--config', config, '--device', 'cpu', '--no-distributed',
            '--deterministic', '--seed', '0', '--save_every_steps', '1', *extra]


def run_kill_test(task: str, world: str, work: str, trials: int = 20, seed: int = 0, threads: int = 1,
                  log=print) -> KillTestReport:
    """Run the kill test of `task` ('pretrain' or 've') on the toy world `world`, in folder `work`."""
    t0 = time.monotonic()
    os.makedirs(work, exist_ok=True)
    base = prepare(task, world, work)
    env = _env(threads)
    rng = random.Random(f'{task}-{seed}')

    # 1. the reference, timed so that kill moments can be placed
    ref_out = os.path.join(work, f'{task}_reference')
    ref = Run(base + ['--output_dir', ref_out, '--overwrite'], env, os.path.join(work, f'{task}_reference.log'))
    code = ref.finish()
    if code != 0:
        raise RuntimeError(f'{task}: the reference run failed (exit {code}); see {work}/{task}_reference.log')
    steps = [(stamp, STEP_LINE.search(line)) for stamp, line in ref.lines if STEP_LINE.search(line)]
    steps_per_epoch = int(steps[0][1].group(3))
    total_steps = len(steps)
    startup_s = steps[0][0] - ref.started
    step_s = (steps[-1][0] - steps[0][0]) / max(total_steps - 1, 1)
    # Kill targets spread over the run: after step t the kill falls in step t + 1 (or its checkpoint write, or the
    # end-of-epoch evaluation and saves), never after the last step, where it could come after the run ended.
    targets = sorted(rng.randrange(0, max(total_steps - 1, 1)) for _ in range(trials))

    # 2. the interrupted run
    out = os.path.join(work, f'{task}_killed')
    shutil.rmtree(out, ignore_errors=True)
    results: list[Trial] = []
    for number in range(trials + 1):
        final = number == trials
        resume_point = None
        last = os.path.join(out, 'checkpoint_last.pth')
        if os.path.isfile(last):
            ts = torch.load(last, map_location='cpu', weights_only=True)['train_state']
            resume_point = ts['epoch'] * steps_per_epoch + ts['step_in_epoch']
            start, argv = 'resume', ['--resume']
        elif os.path.isdir(out) and any(n in utils.RUN_MARKERS or n.startswith('checkpoint_') for n in os.listdir(out)):
            start, argv = 'overwrite', ['--overwrite']
        else:
            start, argv = 'fresh', []
        if number == 1:  # make sure the clean-up of a cut-short write is exercised at least once
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, PLANTED_PARTIAL), 'wb') as f:
                f.write(os.urandom(64))
        partials_before = partial_files(out)
        run = Run(base + ['--output_dir', out] + argv, env, os.path.join(work, f'{task}_killed.log'))
        reached = lambda line: STEP_LINE.search(line) or RESUMED_LINE.match(line)  # noqa: E731
        cleaned = None
        if final:
            plan = 'run to the end'
            if run.wait_for(reached, 600) is not None and partials_before:
                cleaned = not set(partials_before) & set(partial_files(out))
            code = run.finish()
            last_step = None
        else:
            if rng.random() < STARTUP_KILL_PROBABILITY:
                delay = rng.uniform(0, startup_s)
                plan = f'start-up +{delay:.2f}s'
                time.sleep(delay)
            else:
                target = max(targets[number], resume_point or 0)
                delay = rng.uniform(0, step_s)
                if target < total_steps - 1:  # the kill falls in the step after `target` or its checkpoint write
                    plan = f'step {target} +{delay:.3f}s'
                    hit = run.wait_for(lambda line: (_steps_done(line, steps_per_epoch) or -1) >= target
                                       or 'Training time' in line, 600)
                else:  # only the last step is left: from its start, so the kill cannot come after the run ended
                    plan = f'resumed +{delay:.3f}s'
                    hit = run.wait_for(reached, 600)
                if hit is not None:
                    time.sleep(delay)
            run.kill()
            code = run.finish()
            # Once a start reached training it had passed prepare_output_dir, which removes partial files.
            if partials_before and any(reached(line) for line in run.output()):
                cleaned = not set(partials_before) & set(partial_files(out))
            steps_seen = [n for n in (_steps_done(line, steps_per_epoch) for line in run.output()) if n is not None]
            last_step = steps_seen[-1] if steps_seen else None
        problems = check_output_files(out) if os.path.isdir(out) else []
        if partials_before and cleaned is False:
            problems.append(f'partial files from before this start were not removed: {partials_before}')
        if not final and code != -signal.SIGKILL:
            problems.append(f'exited with {code} before the kill (see {task}_killed.log)')
        if final and code != 0:
            problems.append(f'the final resume exited with {code} (see {task}_killed.log)')
        results.append(Trial(number + 1, start, resume_point, plan, last_step, code, partial_files(out), cleaned,
                             not problems, problems))
        log(format_trial(task, results[-1]))

    kills = sum(1 for t in results[:-1] if t.exit_code == -signal.SIGKILL)
    completed = results[-1].exit_code == 0
    diffs = compare_runs(ref_out, out, task) if completed else ['the interrupted run did not complete']
    seen = sum(1 for t in results if t.partials_cleaned is not None)
    cleaned = sum(1 for t in results if t.partials_cleaned)
    final_trial = results.pop()
    return KillTestReport(task, results, kills, completed, not diffs, diffs, seen, cleaned, time.monotonic() - t0,
                          final_trial)


# ----------------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------------
HEADER = (f'{"task":<9} {"#":>5} {"start":<9} {"resumed@":>8} {"kill plan":<20} {"died after":>10} '
          f'{"exit":>5} {"partial left":>12} {"cleaned":>7} {"ok":>4}')


def format_trial(task: str, t: Trial) -> str:
    dash = '-'
    return (f'{task:<9} {t.number:>5} {t.start:<9} {dash if t.resumed_at is None else t.resumed_at:>8} '
            f'{t.plan:<20} {dash if t.last_step_seen is None else "step " + str(t.last_step_seen):>10} '
            f'{t.exit_code!s:>5} {len(t.partial_files_left):>12} '
            f'{dash if t.partials_cleaned is None else ("yes" if t.partials_cleaned else "NO"):>7} '
            f'{"yes" if t.ok else "NO":>4}' + ('' if t.ok else '  ' + '; '.join(t.problems)))


def summary(r: KillTestReport) -> str:
    return (f'{r.task}: {r.kills}/{len(r.trials)} kills delivered, resumed to the end: '
            f'{"yes" if r.completed else "NO"}, final state bit-identical to the uninterrupted run: '
            f'{"yes" if r.identical else "NO " + str(r.differences[:5])}, files sound after every kill: '
            f'{"yes" if all(t.ok for t in r.trials) else "NO"}, partial files cleaned on restart: '
            f'{r.partials_cleaned}/{r.partials_seen}, {r.seconds:.0f} s')


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--trials', type=int, default=20, help='kills per task')
    parser.add_argument('--tasks', nargs='+', choices=sorted(TASKS), default=['pretrain', 've'])
    parser.add_argument('--seed', type=int, default=0, help='seed of the kill moments (and of the toy world)')
    parser.add_argument('--threads', type=int, default=1, help='torch threads of the training processes')
    parser.add_argument('--keep', default=None, help='work folder to keep (default: a temp folder, removed)')
    args = parser.parse_args(argv)

    from tests.toy import MINI_WORLD_SIZES, generate_world
    work = args.keep or tempfile.mkdtemp(prefix='albef_kill_test_')
    try:
        world = os.path.join(work, 'world')
        if not os.path.isfile(os.path.join(world, 'manifest.json')):
            generate_world(world, 3 + args.seed, **MINI_WORLD_SIZES)
        print(HEADER, flush=True)
        reports = [run_kill_test(task, world, work, args.trials, args.seed, args.threads,
                                 log=lambda line: print(line, flush=True)) for task in args.tasks]
        print()
        for r in reports:
            print(summary(r))
        return 0 if all(r.ok for r in reports) else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == '__main__':
    sys.exit(main())
