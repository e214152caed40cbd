"""Building what a task script trains: tokenizer, model (initialised, frozen where asked, wrapped in DDP),
optimizer and scheduler from the config, the restored state of a --resume run, and the fine-tuned model that
--evaluate scores."""
from __future__ import annotations

import math
import os
from typing import Mapping

import torch

import models
import utils
from engine.compiled import compile_encoders
from engine.errors import TrainingError
from engine.guard import RunGuard
from engine.state import TrainState, check_resume_checkpoint, check_resume_config, restore_training
from models.checkpoint import load_checkpoint, read_checkpoint
from models.pretrained import apply_pretrained
from optim import ZeroRedundancyOptimizer, create_optimizer
from scheduler import create_scheduler


def epoch_count(schedular_cfg: Mapping) -> int:
    """Number of epochs of a schedule (the `epochs` key of the schedular block)."""
    return int(math.ceil(schedular_cfg['epochs']))


def build_tokenizer(config: Mapping):
    """The tokenizer named by config['text_encoder'] (hub name or local folder), original single-text format."""
    # Imported here: transformers takes seconds to import, which only the callers that build a tokenizer pay.
    from models.tokenization_bert import BertTokenizer
    return BertTokenizer.from_pretrained(config.get('text_encoder', 'bert-base-uncased'))


DDP_BUCKET_CAP_MB = 25  # torch's default; config 'ddp_bucket_cap_mb' (larger buckets: fewer all-reduce calls)


def build_model(task: str, config: Mapping, tokenizer, args, device: torch.device, resume: bool = False):
    """Create the task's model, initialise it (checkpoint, or pretrained BERT/ViT weights), freeze the ViT when the
    config says `freeze_vision`, move it, compile its encoders when it says `compile` (engine.compiled), wrap in
    DDP.

    With `resume` the weights come later from the run's own checkpoint (see `resume_training`).
    Returns (model, model_without_ddp).
    """
    model = models.create_model(task, config, tokenizer)
    if args.checkpoint and not resume:
        report = load_checkpoint(model, args.checkpoint, task, allow_pickle=args.unsafe_load)
        print(f'loaded checkpoint {args.checkpoint} ({report.get("source_kind", "?")} -> {task})')
    elif not resume:
        apply_pretrained(model, config)
        model.copy_params()
    if config.get('freeze_vision', False):
        # A locked image tower (LiT): the optimizer skips parameters without grad, so the ViT keeps its weights and
        # its forward builds no autograd graph; its momentum copy stays equal to it (up to rounding).
        model.visual_encoder.requires_grad_(False)
    model.to(device)
    if config.get('compile', False):
        compile_encoders(model)
    model_without_ddp = model
    if getattr(args, 'distributed', False):
        device_ids = [args.gpu] if device.type == 'cuda' else None
        # Some variants own parameters that get no gradient (the TA model's text_proj and temp). Gradients as
        # views into the all-reduce buckets: otherwise each rank holds every gradient twice (0.84 GB at full size).
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=device_ids, find_unused_parameters=(task == 'pretrain_nlvr'),
            gradient_as_bucket_view=True, bucket_cap_mb=config.get('ddp_bucket_cap_mb', DDP_BUCKET_CAP_MB))
    return model, model_without_ddp


def load_for_evaluation(task: str, config: Mapping, tokenizer, args, device: torch.device) -> torch.nn.Module:
    """The `task` model with the weights of a fine-tuned `task` checkpoint (--evaluate), on `device`.

    Any other checkpoint kind (a pretraining or TA checkpoint) would leave the classifier head random, so it is
    refused with a one-line error naming the file and its kind.
    """
    if not args.checkpoint:
        raise utils.UserError(f'--evaluate needs --checkpoint (a fine-tuned {task} checkpoint)')
    model = models.create_model(task, config, tokenizer)
    report = load_checkpoint(model, args.checkpoint, task, allow_pickle=args.unsafe_load)
    if report['source_kind'] != task:
        raise utils.UserError(f"--evaluate: {args.checkpoint} is a '{report['source_kind']}' checkpoint, not a "
                              f"fine-tuned '{task}' one (its classifier head would be random); fine-tune first")
    return model.to(device)


def build_optimizer_and_scheduler(config: Mapping, model_without_ddp):
    """Optimizer from the YAML `optimizer:` block (sharded across ranks with ZeRO-1 when the config says
    `zero: true`), scheduler from `schedular:`; returns (opt, sched, epochs)."""
    optimizer = create_optimizer(utils.AttrDict(config['optimizer']), model_without_ddp,
                                 zero=bool(config.get('zero', False)))
    lr_scheduler, _ = create_scheduler(utils.AttrDict(config['schedular']), optimizer)
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        mine = sum(p.numel() for g in optimizer.optim.param_groups for p in g['params'])
        total = sum(p.numel() for g in optimizer.param_groups for p in g['params'])
        print(f'zero: optimizer state sharded over {utils.get_world_size()} ranks; rank {utils.get_rank()} steps '
              f'{mine:,} of {total:,} parameters', flush=True)
    return optimizer, lr_scheduler, epoch_count(config['schedular'])


def resume_training(args, config: Mapping, model_without_ddp, optimizer, lr_scheduler,
                    guard: RunGuard | None = None, scaler: torch.amp.GradScaler | None = None) -> TrainState:
    """With --resume, restore everything from --checkpoint or output_dir/checkpoint_last.pth (and the fp16 loss
    scaler's state into `scaler`); else a fresh state.

    The config must agree with the checkpoint's on the model and data shape (check_resume_config); once it does,
    output_dir/config.yaml is rewritten with the config of the resumed run.
    """
    if not args.resume:
        return TrainState()
    path = args.checkpoint or os.path.join(args.output_dir, 'checkpoint_last.pth')
    if not os.path.isfile(path):
        raise TrainingError(f'--resume: no checkpoint to resume from at {path}')
    checkpoint = read_checkpoint(path, allow_pickle=args.unsafe_load)
    check_resume_checkpoint(checkpoint, model_without_ddp, path)
    if 'config' in checkpoint:
        check_resume_config(checkpoint['config'], config, path)
    state = restore_training(checkpoint, model_without_ddp, optimizer, lr_scheduler, path=path, scaler=scaler)
    guard = guard or RunGuard(args.output_dir)
    guard.keep(path, state)
    if utils.is_main_process():  # only now: a refused resume must leave the run's config.yaml as it was
        config_path = os.path.join(args.output_dir, 'config.yaml')
        try:
            utils.save_config(config, config_path)
        except Exception as e:  # noqa: BLE001 - a full or read-only disk becomes one line, anything else re-raised
            err = guard.write_error(config_path, e)
            if err is None:
                raise
            raise err from None
    print(f'resumed from {path}: epoch {state.epoch}, step {state.step_in_epoch} of that epoch')
    return state
