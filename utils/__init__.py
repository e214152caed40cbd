"""Shared helpers, one module per concern; every public name is re-exported here (`import utils; utils.X`).

errors (UserError, ConfigError, exit codes, one-line printing), distributed (rank / world helpers, process group
start-up), device (device, autocast, determinism, seeding), memory (malloc tuning), metric_logging (MetricLogger),
schema (Spec), config (loading, validation, the blocks' registry), files (atomic writes, output folder),
cli (shared flags, run_cli), run (prepare_run).

Patching a name here does not reach the code that uses it inside the package: patch it in its home module
(e.g. `utils.distributed.get_rank`).
"""
from utils.cli import (SEED_RANGE, STEP_COUNT, UsageError, config_flag, device_flag, get_parent_parser, input_file,
                       lost_peer_reason, one_line_errors, run_cli)
from utils.config import (CONFIG_SCHEMA, MAX_CONFIG_DEPTH, MAX_CONFIG_VALUES, AttrDict, config_text, load_config,
                          parse_override, register_block, register_check, registered_blocks, save_config,
                          validate_config)
from utils.device import autocast, resolve_device, seed_everything, use_deterministic_algorithms
from utils.distributed import (all_gather_object, all_reduce_sum, barrier, get_rank, get_world_size,
                               init_distributed_mode, is_dist_avail_and_initialized, is_main_process,
                               setup_for_distributed)
from utils.errors import (EXIT_INTERRUPTED, EXIT_PEER_LOST, EXIT_TERMINATED, EXIT_USER_ERROR, ConfigError, UserError,
                          WriteError, print_error, unwrap_worker_error, worker_error_message)
from utils.files import (MAX_CONFIG_BYTES, RUN_MARKERS, RUN_OUTPUTS, TMP_SUFFIX, append_json_line, atomic_save,
                         atomic_write_text, describe_os_error, os_error_in, prepare_output_dir, read_limited,
                         remove_partial_files)
from utils.memory import MALLOC_TUNING_ENV, tune_memory_allocator
from utils.metric_logging import MetricLogger, SmoothedValue
from utils.run import DEFAULT_TEXT_ENCODER, check_text_folder, prepare_run
from utils.schema import Spec
