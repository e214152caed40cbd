"""Command-line plumbing shared by the task scripts: the common flags and their types, one-line errors with exit
codes (run_cli), and a SIGTERM handler for the time outside training."""
from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
from typing import Sequence

import torch
import torch.distributed as dist

from utils.config import CONFIG_SCHEMA
from utils.distributed import is_dist_avail_and_initialized
from utils.errors import (EXIT_INTERRUPTED, EXIT_PEER_LOST, EXIT_TERMINATED, EXIT_USER_ERROR, UserError,
                          print_error)
from utils.files import drop_pending_config, write_pending_config
from utils.schema import Spec

def _positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f'must be > 0, got {value}')
    return value


def _int_flag(spec: Spec):
    """argparse type: an integer that `spec` (a Spec, e.g. CONFIG_SCHEMA's entry of the key the flag sets) accepts."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got '{text}'") from None
        found = spec.problem(value)
        if found is not None:
            raise argparse.ArgumentTypeError(found)
        return value
    parse.__name__ = 'int'
    return parse


def config_flag(key: str):
    """argparse type of a flag that sets config key `key`: checked against the key's range in CONFIG_SCHEMA."""
    return _int_flag(CONFIG_SCHEMA[key])


SEED_RANGE = Spec((int,), 0, 2 ** 32 - 1)  # numpy's seed range; torch and the samplers add rank and epoch to it
STEP_COUNT = Spec((int,), 0)


def device_flag(text: str) -> str:
    """argparse type of --device: cpu, cuda or cuda:N, where N names a CUDA device of this machine. Without CUDA
    a cuda device falls back to cpu (resolve_device), as the default does."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise argparse.ArgumentTypeError(f"'{text}' is not a device (use cpu, cuda or cuda:N)") from None
    if device.type not in ('cpu', 'cuda'):
        raise argparse.ArgumentTypeError(f"'{text}': only cpu and cuda devices are supported")
    if device.type == 'cuda' and device.index is not None and torch.cuda.is_available():
        count = torch.cuda.device_count()
        if device.index >= count:
            raise argparse.ArgumentTypeError(f"'{text}': this machine has {count} CUDA device(s) "
                                             f"(cuda:0{f' .. cuda:{count - 1}' if count > 1 else ''})")
    return text


def input_file(text: str) -> str:
    """argparse type: an existing regular file (not a folder, a FIFO or a device)."""
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f'file not found: {text}')
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f'{text} is not a regular file')
    return text


def get_parent_parser(default_config: str, default_output_dir: str) -> argparse.ArgumentParser:
    """The flags every task script shares, training-loop ones included (use as `parents=[...]`). Numeric flags are
    range-checked as they are parsed; a flag that sets a config key uses that key's range (CONFIG_SCHEMA)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument('--config', default=default_config, help='YAML config file')
    p.add_argument('--output_dir', default=default_output_dir)
    p.add_argument('--checkpoint', default='', help='checkpoint to start from (path or URL)')
    p.add_argument('--resume', action='store_true',
                   help='continue the run in --output_dir from its latest checkpoint (or --checkpoint)')
    p.add_argument('--overwrite', action='store_true',
                   help='allow an output_dir that holds another run, or files this run would replace')
    # Read by engine.train, which every task script trains through.
    p.add_argument('--save_every_steps', default=0, type=_int_flag(STEP_COUNT),
                   help='also write checkpoint_last.pth every N steps within an epoch (exact resume; 0: off)')
    p.add_argument('--max_steps_per_epoch', default=0, type=_int_flag(STEP_COUNT),
                   help='cut epochs short (smoke tests; 0: whole epochs)')
    p.add_argument('--text_encoder', default=None,
                   help='tokenizer and BERT weights: hub name or local folder (default: from config)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', type=device_flag,
                   help='cpu, cuda or cuda:N')
    p.add_argument('--seed', default=42, type=_int_flag(SEED_RANGE))
    p.add_argument('--deterministic', action='store_true',
                   help='use only deterministic torch kernels (bit-exact reruns and resumes; slower on GPU)')
    p.add_argument('--distributed', action=argparse.BooleanOptionalAction, default=True,
                   help='use torch.distributed when launched by torchrun (--no-distributed to force off)')
    p.add_argument('--world_size', default=1, type=int)
    p.add_argument('--dist_url', default='env://')
    p.add_argument('--dist_timeout', default=1800, type=_positive_int, metavar='SECONDS',
                   help='how long a rank waits for the others (start-up and each collective) before it fails')
    p.add_argument('--local_rank', '--local-rank', default=0, type=int, help=argparse.SUPPRESS)
    p.add_argument('--precision', default=None, choices=['fp32', 'bf16', 'fp16'],
                   help='autocast precision (default: config, else fp32)')
    p.add_argument('--compile', action='store_true', default=None,
                   help='torch.compile the encoders for training (config key compile; default: config, else off)')
    p.add_argument('--num_workers', default=None, type=config_flag('num_workers'),
                   help='data loader workers (default: config, else 4)')
    p.add_argument('--unsafe_load', action='store_true',
                   help='allow checkpoints that contain pickled code (only for files you trust)')
    p.add_argument('--opt', action='append', default=[], metavar='KEY=VALUE',
                   help='override a config key, e.g. --opt batch_size=8 (repeatable)')
    p.add_argument('--debug', action='store_true', help='show full tracebacks for errors')
    return p


class UsageError(SystemExit):
    """A command-line error found by argparse, already printed as one line (see one_line_errors)."""


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Make `parser` report a command-line error (unknown flag, bad value) like every other user error: one line
    `error: <message>` on stderr and exit status 2, instead of argparse's usage block. Returns the parser."""
    def error(message: str):
        print_error(f'{message} (see --help)')
        raise UsageError(EXIT_USER_ERROR)
    parser.error = error
    return parser


# What torch.distributed backends say when the other end of a collective is gone (gloo raises plain RuntimeErrors
# from its transport, e.g. "Read error ...: Connection reset by peer"; other code paths raise DistError).
_LOST_PEER_PATTERN = re.compile(r'connection (reset|closed|refused)|closed by peer|broken pipe|socket|timed out|'
                                r'timeout|pair closure', re.IGNORECASE)


def lost_peer_reason(exc: BaseException) -> str | None:
    """If `exc` means another rank of the process group is gone, a short reason from its message; else None."""
    if not isinstance(exc, RuntimeError):
        return None
    is_dist_error = isinstance(exc, dist.DistError)
    if not is_dist_error and not (is_dist_avail_and_initialized() and _LOST_PEER_PATTERN.search(str(exc))):
        return None
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    first = re.sub(r'^\[[^\]]*\]\s*', '', first)  # gloo prefixes the C++ source location
    first = first.split(' This is typically caused')[0]
    return first[:200]


def run_cli(main, argv: Sequence[str] | None = None) -> int:
    """Run `main(argv)` and return the exit code; errors meant for the user become one line on stderr.

    UserError -> `error: <message>` and EXIT_USER_ERROR (2). Losing another rank of a distributed run (it crashed
    or was killed, so a collective fails here) -> one line and EXIT_PEER_LOST (3), instead of a traceback from
    deep inside the backend. In a distributed run the line starts with 'rank R of W: '. With --debug both are
    re-raised with their traceback. Anything else is a bug and keeps its traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    previous_sigterm = _install_sigterm_fallback()
    try:
        main(argv)
        write_pending_config()  # a run that wrote nothing into its folder still gets its config.yaml
        return 0
    except UsageError:  # argparse's, already printed as one line
        return EXIT_USER_ERROR
    except UserError as e:
        if '--debug' in argv:
            raise
        print_error(str(e))
        return EXIT_USER_ERROR
    except RuntimeError as e:
        reason = lost_peer_reason(e)
        if reason is None or '--debug' in argv:
            raise
        print_error(f'lost contact with the other processes ({reason}); another rank failed or was killed, '
                     f'see its output')
        return EXIT_PEER_LOST
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        drop_pending_config()  # a run that failed before writing anything leaves its folder as it found it
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


def _on_sigterm_outside_training(signum, frame) -> None:
    # Training installs its own handler (engine.RunGuard), which says what was kept; this one covers start-up,
    # --evaluate runs and the evaluation after training, where nothing is being written that could be lost.
    print_error('stopped by SIGTERM (no training step was running; files written before are kept)')
    raise SystemExit(EXIT_TERMINATED)


def _install_sigterm_fallback():
    """Make SIGTERM end a script with one line instead of silently; returns the handler it replaced (None when
    not in the main thread, where signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _on_sigterm_outside_training)

