"""The training engine shared by every task script.

A task supplies `step_fn(model, batch, alpha) -> {loss name: scalar tensor}`; the engine sums the losses,
backpropagates (with gradient accumulation, autocast and fp16 loss scaling), steps the optimizer and the
original's warm-up schedule, logs every loss and their sum, stops on a non-finite loss, and writes atomic
checkpoints from which a run resumes exactly (model with momentum encoders and queues, optimizer, scheduler,
epoch, step, RNG states, data position).

Modules, from low to high level:

* `errors` - TrainingError, the one-line end of a run;
* `precision` - the autocast context of a precision setting, the fp16 loss scaler;
* `compiled` - torch.compile of the encoders (config `compile`);
* `rng` - RNG states saved in and restored from checkpoints;
* `state` - TrainState, building, checking and restoring a training checkpoint;
* `guard` - RunGuard (SIGTERM, failed writes), guarded checkpoint and log writes, data loader worker failures;
* `build` - tokenizer, model, optimizer and scheduler from the config, the state of a --resume run, and the
  fine-tuned model that --evaluate scores;
* `loop` - EngineConfig, one epoch, `fit` over epochs, and `train`, what a task script calls;
* `steps` - step functions shared by several task scripts (caption, retrieval, classification batches);
* `classification` - the recipe of the classification fine-tuning scripts (NLVR.py, VE.py).

The names below are the engine's public interface; import them from `engine` (`steps` and `classification`
are imported as modules by the scripts that use them).
"""
from engine.build import (DDP_BUCKET_CAP_MB, build_model, build_optimizer_and_scheduler, build_tokenizer,
                          epoch_count, load_for_evaluation, resume_training)
from engine.compiled import compile_encoders
from engine.errors import TrainingError
from engine.guard import (EXIT_TERMINATED, RunGuard, append_log_line, describe_os_error, next_batch, os_error_in,
                          save_checkpoint_file, worker_death_error)
from engine.loop import EngineConfig, StepFn, engine_config, fit, train, train_one_epoch
from engine.precision import autocast, grad_scaler, scaled_optimizer_step
from engine.rng import get_rng_state, rng_state_problem, set_rng_state
from engine.state import (TrainState, build_checkpoint, check_resume_checkpoint, check_resume_config,
                          check_training_state, first_non_finite_tensor, restore_training)

__all__ = [
    'DDP_BUCKET_CAP_MB', 'EXIT_TERMINATED', 'EngineConfig', 'RunGuard', 'StepFn', 'TrainState', 'TrainingError',
    'append_log_line', 'autocast', 'build_checkpoint', 'build_model', 'build_optimizer_and_scheduler',
    'build_tokenizer', 'check_resume_checkpoint', 'check_resume_config', 'check_training_state', 'compile_encoders',
    'describe_os_error', 'engine_config', 'epoch_count', 'fit', 'first_non_finite_tensor', 'get_rng_state',
    'grad_scaler', 'load_for_evaluation', 'next_batch', 'os_error_in', 'scaled_optimizer_step',
    'resume_training', 'restore_training', 'rng_state_problem', 'save_checkpoint_file', 'set_rng_state', 'train',
    'train_one_epoch', 'worker_death_error',
]
