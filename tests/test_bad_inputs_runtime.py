"""The bad-input catalogue, continued: what goes wrong while a run is under way.

Same contract as tests/test_bad_inputs.py, whose fixtures (a mini toy world, a finished tiny pretraining, its
checkpoints) and helpers this file reuses: every case runs a real entry script's main through utils.run_cli and
must end with exit status 2, ONE stderr line `error: <message>` naming the culprit (file, item, key), no
traceback, and every file that existed before the run unchanged byte for byte; checkpoints the failed run wrote
itself must load.

The cases: errors raised inside DataLoader workers (runs with --num_workers 2: the worker's traceback must not
reach the user), a full disk while a checkpoint or a log line is written (a small tmpfs where mounting works, and
simulated writes), resuming from checkpoints whose tensors, optimizer groups, scheduler, train_state or RNG state
do not fit, checkpoints with integer/complex or NaN weights, annotation files that are FIFOs or nested too deeply,
malformed RefCOCO refs pickles, image folders with symbolic links that leave image_root, and texts without a
visible character. `pytest tests/test_bad_inputs_runtime.py -rP` prints each case's line.

After the catalogue: a worker error through a real process (the workers' own stderr included), and SIGTERM (what a
cluster scheduler sends before it kills a job): one line saying what was kept and how to resume, then --resume
continues.
"""
import errno
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import Grounding
import Pretrain
import Retrieval
import utils
import VE
import VQA
from tests.test_bad_inputs import (BAD_ITEM, Ctx, Expect, assert_nothing_lost, assert_written_files_load,  # noqa: F401
                                   checkpoints, previous_run, run_case, snapshot, where, world)
from tests.toy import ROOT, TINY_SCHED

RETRIEVAL_MINI = dict(batch_size_train=4, batch_size_test=4, queue_size=8, k_test=4)
WORKERS = ('--num_workers', '2')


class RuntimeCtx(Ctx):
    """Ctx with a monkeypatch, clean-ups run after the case (unmounting a tmpfs), and helpers for tampered
    checkpoints and files that the hash check must not open (FIFOs live beside the case's folder)."""

    def __init__(self, *args, monkeypatch):
        super().__init__(*args)
        self.monkeypatch = monkeypatch
        self.cleanups: list = []

    def config(self, name='Pretrain', **overrides) -> str:
        if name == 'Retrieval':
            overrides = {**RETRIEVAL_MINI, **overrides}
        return super().config(name, **overrides)

    def outside(self, name) -> str:
        folder = self.tmp.parent / f'{self.tmp.name}_outside'
        if not folder.exists():
            folder.mkdir()
            self.cleanups.append(lambda: shutil.rmtree(folder, ignore_errors=True))
        return str(folder / name)

    def fifo(self, name) -> str:
        path = self.outside(name)
        os.mkfifo(path)  # nobody ever writes to it: a reader would block forever
        return path

    @property
    def last(self) -> str:
        return str(self.out / 'checkpoint_last.pth')

    def tampered_resume(self, mutate) -> list:
        """The previous run copied into the output folder, its checkpoint_last.pth after `mutate(checkpoint)`;
        returns the argv resuming it."""
        self.copy_previous_run()
        ckpt = torch.load(self.last, weights_only=True)
        mutate(ckpt)
        torch.save(ckpt, self.last)
        return self.argv(self.config(), '--resume')

    def unfinished_run(self, epochs=2) -> str:
        """The previous (1-epoch) run, made the first epoch of an `epochs`-epoch run: its config.yaml is what a
        resumed run of that config writes, byte for byte. Returns that config."""
        self.copy_previous_run()
        config = self.config(schedular=dict(TINY_SCHED, epochs=epochs))
        utils.save_config(utils.load_config(config), str(self.out / 'config.yaml'))
        return config

    def training_weights(self) -> dict:
        return dict(torch.load(self.checkpoints['training'], weights_only=True)['model'])

    def weights_file(self, name, sd) -> str:
        torch.save({'model': sd}, self.tmp / name)
        return str(self.tmp / name)


@pytest.fixture
def ctx(world, tmp_path, previous_run, checkpoints, monkeypatch):
    c = RuntimeCtx(world, tmp_path, previous_run, checkpoints, monkeypatch=monkeypatch)
    yield c
    for fn in reversed(c.cleanups):
        fn()


CASES: list = []


def case(func):
    CASES.append(func)
    return func


def cannot_resume(c, what):
    return f'^{re.escape(c.last)}: cannot resume, {what}'


# ----------------------------------------------------------------------------------------------------------------
# Errors inside DataLoader workers (--num_workers 2): the item's one line, not the worker's traceback
# ----------------------------------------------------------------------------------------------------------------
@case
def worker_image_corrupt(c):
    path = c.write('corrupt.jpg', b'this is not a JPEG file at all' * 10)
    ann, argv = c.image_case(path)
    return Expect(Pretrain.main, argv + list(WORKERS),
                  f'^{where(ann)}: cannot read image {re.escape(path)} \\(cannot identify image file[^\\\\]*\\)$')


@case
def worker_image_missing(c):
    path = str(c.tmp / 'no_such_image.jpg')
    ann, argv = c.image_case(path)
    return Expect(Pretrain.main, argv + list(WORKERS), f'^{where(ann)}: image file not found: {re.escape(path)}$')


@case
def worker_retrieval_training_image_truncated(c):
    items = c.items('retrieval_train.json', 16)
    data = open(os.path.join(c.world, 'images', items[3]['image']), 'rb').read()
    images = c.tmp / 'images'
    shutil.copytree(os.path.join(c.world, 'images'), images)
    (images / items[3]['image']).write_bytes(data[:len(data) // 3])
    ann = c.write('retrieval_train.json', items)
    config = c.config('Retrieval', train_file=[ann], image_root=str(images))
    return Expect(Retrieval.main, c.argv(config, *WORKERS),
                  f"^{re.escape(ann)} item 3: cannot read image {re.escape(str(images / items[3]['image']))} "
                  f"\\(.*truncated[^\\\\]*\\)$")


@case
def worker_ve_evaluation_image_corrupt(c):
    """The evaluation loaders (built by the task, not by the engine) give the same line."""
    images = c.tmp / 'images'
    shutil.copytree(os.path.join(c.world, 'images'), images)
    items = c.items('ve_dev.json', 16)
    (images / f"{items[2]['image']}.jpg").write_bytes(b'garbage' * 50)
    first = next(i for i, it in enumerate(items) if it['image'] == items[2]['image'])  # items share images
    ann = c.write('ve_dev.json', items)
    return Expect(VE.main, c.argv(c.config('VE', val_file=ann, image_root=str(images)), *WORKERS),
                  f"^{re.escape(ann)} item {first}: cannot read image {re.escape(str(images))}/.*\\(cannot identify")


@case
def worker_image_is_a_fifo(c):
    path = c.fifo('pipe.jpg')
    ann, argv = c.image_case(path)
    return Expect(Pretrain.main, argv + list(WORKERS),
                  f'^{where(ann)}: image path is not a regular file \\(a named pipe, socket or device\\): '
                  f'{re.escape(path)}$')


@case
def worker_image_file_symlink_escapes_image_root(c):
    """A file inside image_root that is a symbolic link to a file outside it: refused when the item is loaded (in
    a worker), naming the item."""
    images = c.tmp / 'images'
    shutil.copytree(os.path.join(c.world, 'images'), images)
    first_image = os.path.join(c.world, 'images', c.items('ve_train.json', 1)[0]['image'] + '.jpg')
    secret = c.write('secret.jpg', open(first_image, 'rb').read())
    items = c.items('ve_train.json', 16)
    link = images / f"{items[4]['image']}.jpg"
    link.unlink()
    link.symlink_to(secret)
    ann = c.write('ve_train.json', items)
    # Items share images, and training visits them in a shuffled order: whichever of them comes first is named.
    sharing = '|'.join(str(i) for i, it in enumerate(items) if it['image'] == items[4]['image'])
    return Expect(VE.main, c.argv(c.config('VE', train_file=ann, image_root=str(images)), *WORKERS),
                  f"^{re.escape(ann)} item ({sharing}): image path '{re.escape(items[4]['image'])}.jpg' escapes "
                  f"image_root "
                  f"{re.escape(repr(str(images)))} through a symbolic link \\(it leads to {re.escape(secret)}\\); "
                  f"pass allow_absolute_paths=True")


@case
def worker_killed_by_the_system(c):
    """A worker killed outright (what the kernel's out-of-memory killer does) while it loads item BAD_ITEM."""
    import dataset.images
    ann, argv = c.pretrain_with(lambda items: None)
    victim = c.items()[BAD_ITEM]['image']
    real_open = dataset.images.open_image_rgb

    def open_image_rgb(path, where=''):
        if path == victim and os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_open(path, where)
    parent = os.getpid()
    c.monkeypatch.setattr(dataset.images, 'open_image_rgb', open_image_rgb)
    return Expect(Pretrain.main, argv + list(WORKERS),
                  r'^a data loader worker died \(DataLoader worker \(pid(?:s|\(s\))?\)? ?\(?[\d, ]+\)? (is killed by signal: '
                  r'Killed|exited unexpectedly)\); if the system killed it for lack of memory, use fewer workers '
                  r'\(--num_workers, now 2\) or a smaller batch$')


# ----------------------------------------------------------------------------------------------------------------
# A full disk: one line naming the file, the temp file removed, earlier files intact
# ----------------------------------------------------------------------------------------------------------------
def _no_space(*_, **__):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _fail_torch_save(c, code, after=0):
    """torch.save writes part of the file, then fails with `code`, from its (after+1)-th call on."""
    real = torch.save
    calls = {'n': 0}

    def save(obj, f, *args, **kwargs):
        calls['n'] += 1
        if calls['n'] <= after:
            return real(obj, f, *args, **kwargs)
        f.write(b'PK\x03\x04' + b'\0' * 4096)
        raise OSError(code, os.strerror(code))
    c.monkeypatch.setattr(torch, 'save', save)


@case
def disk_full_on_a_tmpfs_while_saving_a_checkpoint(c):
    """A real full file system: a resumed run on a tmpfs with room for its two checkpoints and half a third."""
    size = os.path.getsize(os.path.join(c.previous_run, 'checkpoint_last.pth'))
    config = c.unfinished_run()
    saved = c.tmp / 'saved_run'
    shutil.copytree(c.out, saved)
    proc = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={2 * size + size // 2 + 256 * 1024}', 'tmpfs',
                           str(c.out)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f'cannot mount a tmpfs here ({proc.stderr.strip()}); '
                    f'disk_full_simulated_while_saving_a_checkpoint covers the same code')
    c.cleanups.append(lambda: subprocess.run(['umount', '-l', str(c.out)], check=False))
    for name in os.listdir(saved):
        shutil.copy2(saved / name, c.out / name)
    shutil.rmtree(saved)

    def only_the_old_checkpoint(c):
        assert sorted(os.listdir(c.out)) == ['checkpoint_00.pth', 'checkpoint_last.pth', 'config.yaml', 'log.txt']
    return Expect(Pretrain.main, c.argv(config, '--resume', '--save_every_steps', '1'),
                  f'^cannot write {re.escape(c.last)}: no space left on the device \\(ENOSPC\\); the files written '
                  f'before are unchanged and {re.escape(c.last)} is kept \\(it resumes at epoch 1 step 0\\); once '
                  f'the disk is fixed, continue with --resume$', only_the_old_checkpoint)


@case
def disk_full_simulated_while_saving_a_checkpoint(c):
    """The second checkpoint write of a fresh run fails half-way (what torch.save does on a full disk): the
    step-1 checkpoint stays as it was, the temp file goes."""
    _fail_torch_save(c, errno.ENOSPC, after=1)

    def step_one_kept(c):
        assert torch.load(c.last, weights_only=True)['train_state']['step_in_epoch'] == 1
    return Expect(Pretrain.main, c.argv(c.config(), '--save_every_steps', '1'),
                  f'^cannot write {re.escape(c.last)}: no space left on the device \\(ENOSPC\\); the files written '
                  f'before are unchanged and {re.escape(c.last)} is kept \\(it resumes at epoch 0 step 1\\); once '
                  f'the disk is fixed, continue with --resume$', step_one_kept)


@case
def disk_quota_exceeded_on_the_first_checkpoint(c):
    _fail_torch_save(c, errno.EDQUOT)
    return Expect(VE.main, c.argv(c.config('VE'), '--save_every_steps', '1'),
                  f'^cannot write {re.escape(c.last)}: disk quota exceeded \\(EDQUOT\\); nothing of this run was '
                  f'saved before; once the disk is fixed, rerun the same command to start over$')


@case
def disk_full_while_appending_to_log_txt(c):
    """A log line written half-way is cut back off: log.txt keeps only whole lines (here: unchanged)."""
    config = c.unfinished_run()
    real_write = os.write

    def write(fd, data):
        if os.readlink(f'/proc/self/fd/{fd}').endswith('log.txt'):
            real_write(fd, bytes(data)[:len(data) // 2])
            _no_space()
        return real_write(fd, data)
    c.monkeypatch.setattr(os, 'write', write)
    log = str(c.out / 'log.txt')
    return Expect(Pretrain.main, c.argv(config, '--resume'),
                  f'^cannot write {re.escape(log)}: no space left on the device \\(ENOSPC\\); the files written '
                  f'before are unchanged and {re.escape(c.last)} is kept \\(it resumes at epoch 1 step 0\\)')


# ----------------------------------------------------------------------------------------------------------------
# Resuming from a checkpoint that does not fit the model, the optimizer or the loop
# ----------------------------------------------------------------------------------------------------------------
@case
def resume_tensor_of_another_shape(c):
    def mutate(ckpt):
        ckpt['model']['vision_proj.weight'] = torch.zeros(16, 16)
    return Expect(Pretrain.main, c.tampered_resume(mutate),
                  cannot_resume(c, "the checkpoint's model does not match this one: vision_proj.weight is \\(16, 16\\) "
                                   "in the checkpoint, \\(16, 32\\) in the model$"))


@case
def resume_integer_weights(c):
    def mutate(ckpt):
        ckpt['model']['itm_head.weight'] = ckpt['model']['itm_head.weight'].long()
    return Expect(Pretrain.main, c.tampered_resume(mutate),
                  cannot_resume(c, "the checkpoint's model does not match this one: dtype of itm_head.weight: "
                                   "checkpoint int64 vs model float32$"))


@case
def resume_nan_weights(c):
    def mutate(ckpt):
        ckpt['model']['text_proj.bias'][3] = float('nan')
    return Expect(Pretrain.main, c.tampered_resume(mutate),
                  cannot_resume(c, 'the weights hold non-finite values \\(NaN or inf\\) in text_proj.bias$'))


@case
def resume_optimizer_with_other_parameter_groups(c):
    def mutate(ckpt):
        ckpt['optimizer']['param_groups'] = ckpt['optimizer']['param_groups'][:1]
    return Expect(Pretrain.main, c.tampered_resume(mutate),
                  cannot_resume(c, "entry 'optimizer' does not match: the checkpoint has 1 parameter group\\(s\\), "
                                   "the optimizer 2 "))


@case
def resume_optimizer_group_of_another_size(c):
    def mutate(ckpt):
        ckpt['optimizer']['param_groups'][0]['params'].pop()
    return Expect(Pretrain.main, c.tampered_resume(mutate),
                  cannot_resume(c, "entry 'optimizer' does not match: parameter group 0 holds \\d+ parameters in the "
                                   "checkpoint, \\d+ in the optimizer"))


@case
def resume_optimizer_state_of_another_shape(c):
    def mutate(ckpt):
        opt = ckpt['optimizer']
        pid = opt['param_groups'][1]['params'][0]
        opt['state'][pid]['exp_avg'] = torch.zeros(3, 5, 7)
    return Expect(Pretrain.main, c.tampered_resume(mutate),
                  cannot_resume(c, "entry 'optimizer' does not match: state 'exp_avg' of parameter \\S+ has shape "
                                   "\\(3, 5, 7\\), the parameter \\("))


@case
def resume_scheduler_state_not_a_dict(c):
    def mutate(ckpt):
        ckpt['lr_scheduler'] = [1, 2, 3]
    return Expect(Pretrain.main, c.tampered_resume(mutate),
                  cannot_resume(c, "entry 'lr_scheduler' must be a dict of settings, got list$"))


@case
def resume_train_state_of_the_wrong_type(c):
    def mutate(ckpt):
        ckpt['train_state']['step_in_epoch'] = '3'
    return Expect(Pretrain.main, c.tampered_resume(mutate),
                  cannot_resume(c, "entry 'train_state' key 'step_in_epoch' must be an int >= 0, got '3'$"))


@case
def resume_train_state_missing_a_key(c):
    def mutate(ckpt):
        del ckpt['train_state']['global_step']
    return Expect(Pretrain.main, c.tampered_resume(mutate),
                  cannot_resume(c, "entry 'train_state' has no key 'global_step'$"))


@case
def resume_rng_state_truncated(c):
    def mutate(ckpt):
        ckpt['rng']['numpy']['keys'] = ckpt['rng']['numpy']['keys'][:100]
    return Expect(Pretrain.main, c.tampered_resume(mutate),
                  cannot_resume(c, "entry 'rng' is malformed: 'numpy.keys' must be an int64 tensor of 624 values$"))


@case
def resume_rng_state_missing_python(c):
    def mutate(ckpt):
        del ckpt['rng']['python']
    return Expect(Pretrain.main, c.tampered_resume(mutate),
                  cannot_resume(c, "entry 'rng' is malformed: missing key 'python'$"))


@case
def resume_model_entry_not_a_state_dict(c):
    def mutate(ckpt):
        ckpt['model'] = torch.zeros(3)
    return Expect(Pretrain.main, c.tampered_resume(mutate),
                  cannot_resume(c, "its 'model' entry is a Tensor, not a state dict$"))


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints given with --checkpoint: dtypes, NaN, FIFOs
# ----------------------------------------------------------------------------------------------------------------
@case
def checkpoint_with_integer_weights(c):
    """Every floating weight stored as an integer: it would load 'strictly' with every weight rounded to 0."""
    sd = {k: (v.long() if v.is_floating_point() else v) for k, v in c.training_weights().items()}
    path = c.weights_file('int.pth', sd)
    return Expect(Pretrain.main, c.argv(c.config(), '--checkpoint', path),
                  f"^{re.escape(path)}: 'pretrain' checkpoint does not fit the 'pretrain' model: dtype mismatch "
                  f"\\[.*: checkpoint int64 vs model float32.*\\(integer, bool or complex values cannot stand for "
                  f"floating-point weights\\)$")


@case
def checkpoint_with_complex_weights(c):
    sd = c.training_weights()
    sd['vision_proj.bias'] = sd['vision_proj.bias'].to(torch.complex64)
    path = c.weights_file('complex.pth', sd)
    return Expect(Pretrain.main, c.argv(c.config(), '--checkpoint', path),
                  f"^{re.escape(path)}: 'pretrain' checkpoint does not fit the 'pretrain' model: dtype mismatch "
                  f"\\[vision_proj.bias: checkpoint complex64 vs model float32\\]")


@case
def checkpoint_with_nan_in_tied_weights(c):
    """NaN in the word embeddings, which the MLM decoder shares: named, instead of 'different values to shared
    tensors'."""
    sd = c.training_weights()
    key = 'text_encoder.bert.embeddings.word_embeddings.weight'
    sd[key][7, 3] = float('nan')
    path = c.weights_file('nan.pth', sd)
    return Expect(Pretrain.main, c.argv(c.config(), '--checkpoint', path),
                  f'^{re.escape(path)}: non-finite values \\(NaN or inf\\) in {re.escape(key)}: the checkpoint comes '
                  f'from a diverged run or is corrupt$')


@case
def checkpoint_with_inf_weights_into_ve(c):
    sd = c.training_weights()
    sd['visual_encoder.pos_embed'][0, 1, 2] = float('inf')
    path = c.weights_file('inf.pth', sd)
    return Expect(VE.main, c.argv(c.config('VE'), '--checkpoint', path),
                  f'^{re.escape(path)}: non-finite values \\(NaN or inf\\) in visual_encoder.pos_embed: ')


@case
def checkpoint_is_a_fifo(c):
    path = c.fifo('checkpoint.pth')
    return Expect(Pretrain.main, c.argv(c.config(), '--checkpoint', path),
                  f'^checkpoint path is not a regular file \\(a named pipe, socket or device\\): {re.escape(path)}$')


# ----------------------------------------------------------------------------------------------------------------
# Annotation files: FIFOs, deep nesting, RefCOCO refs pickles
# ----------------------------------------------------------------------------------------------------------------
@case
def annotation_file_is_a_fifo(c):
    ann = c.fifo('train.json')
    return Expect(Pretrain.main, c.argv(c.config(train_file=[ann])),
                  f'^annotation file {re.escape(ann)}: is a named pipe \\(FIFO\\), not a regular file$')


@case
def annotation_json_nested_too_deeply(c):
    ann = c.write('deep.json', '[' * 100_000 + ']' * 100_000)
    return Expect(Retrieval.main, c.argv(c.config('Retrieval', train_file=[ann])),
                  f'^{re.escape(ann)}: JSON nested too deeply to parse ')


@case
def vqa_answer_list_is_a_fifo(c):
    path = c.fifo('answer_list.json')
    return Expect(VQA.main, c.argv(c.config('VQA', answer_list=path)),
                  f'^answer_list {re.escape(path)}: is a named pipe \\(FIFO\\), not a regular file$')


def _refs_case(c, mutate, mutate_instances=None):
    """Grounding on a copy of the world's RefCOCO+ data whose refs(unc).p went through `mutate(refs)` (and
    instances.json through `mutate_instances`); returns (the refs file, instances.json, argv)."""
    data = c.tmp / 'refcoco_data'
    shutil.copytree(os.path.join(c.world, 'refcoco+'), data / 'refcoco+')
    path = data / 'refcoco+' / 'refs(unc).p'
    with open(path, 'rb') as f:
        refs = pickle.load(f)
    mutate(refs)
    with open(path, 'wb') as f:
        pickle.dump(refs, f)
    instances = data / 'refcoco+' / 'instances.json'
    if mutate_instances is not None:
        content = json.loads(instances.read_text())
        mutate_instances(content, refs)
        instances.write_text(json.dumps(content))
    return str(path), str(instances), c.argv(c.config('Grounding', refcoco_data=str(data)))


@case
def refs_pickle_id_of_the_wrong_type(c):
    def mutate(refs):
        refs[2]['ref_id'] = str(refs[2]['ref_id'])
    path, _, argv = _refs_case(c, mutate)
    return Expect(Grounding.main, argv, f"^{re.escape(path)}: ref 2 \\(ref_id '\\d+'\\): key 'ref_id' must be an int, "
                                        f"got '\\d+'$")


@case
def refs_pickle_unhashable_ann_id(c):
    def mutate(refs):
        refs[1]['ann_id'] = [refs[1]['ann_id']]
    path, _, argv = _refs_case(c, mutate)
    return Expect(Grounding.main, argv, f"^{re.escape(path)}: ref 1 \\(ref_id \\d+\\): key 'ann_id' must be an int, "
                                        f"got \\[\\d+\\]$")


@case
def refs_pickle_sentences_not_a_list(c):
    def mutate(refs):
        refs[0]['sentences'] = 7
    path, _, argv = _refs_case(c, mutate)
    return Expect(Grounding.main, argv, f"^{re.escape(path)}: ref 0 \\(ref_id \\d+\\): key 'sentences' must be a list, "
                                        f"got 7$")


@case
def refs_pickle_entry_missing_a_key(c):
    def mutate(refs):
        del refs[3]['split']
    path, _, argv = _refs_case(c, mutate)
    return Expect(Grounding.main, argv, f"^{re.escape(path)}: ref 3 \\(ref_id \\d+\\) has no 'split'$")


@case
def refs_pickle_points_to_an_annotation_without_a_box(c):
    """The box the evaluation compares with is missing from instances.json (a traceback deep in the evaluation
    before)."""
    def drop_box(instances, refs):
        ann = next(a for a in instances['annotations'] if a['id'] == refs[0]['ann_id'])
        del ann['bbox']
    _, instances, argv = _refs_case(c, lambda refs: None, drop_box)
    return Expect(Grounding.main, argv, f"^{re.escape(instances)}: the annotation \\d+ of ref_id \\d+ needs 'bbox' "
                                        f"\\[x, y, w, h\\] \\(4 finite numbers\\), got None$")


# ----------------------------------------------------------------------------------------------------------------
# Image folders with symbolic links that leave image_root
# ----------------------------------------------------------------------------------------------------------------
@case
def image_folder_symlink_escapes_image_root(c):
    """A folder inside image_root that is a symbolic link to a folder outside it: refused at load time."""
    root = c.tmp / 'root'
    root.mkdir()
    outside = c.tmp / 'elsewhere'
    shutil.copytree(os.path.join(c.world, 'images'), outside)
    (root / 'linked').symlink_to(outside, target_is_directory=True)
    items = c.items('ve_test.json', 16)
    for it in items:
        it['image'] = 'linked/' + it['image']
    ann = c.write('ve_test.json', items)
    return Expect(VE.main, c.argv(c.config('VE', test_file=ann, image_root=str(root))),
                  f"^{re.escape(ann)} item 0: image path 'linked/.*\\.jpg' escapes image_root "
                  f"{re.escape(repr(str(root)))} through a symbolic link \\(it leads to {re.escape(str(outside))}/")


# ----------------------------------------------------------------------------------------------------------------
# Texts without a visible character
# ----------------------------------------------------------------------------------------------------------------
@case
def caption_of_a_zero_width_space(c):
    ann, argv = c.pretrain_with(lambda items: items[BAD_ITEM].update(caption='\u200b'))
    return Expect(Pretrain.main, argv, f"^{where(ann)}: key 'caption' is empty \\(no visible characters after "
                                       f"normalisation: '\\\\u200b'\\)$")


@case
def caption_list_entry_of_format_characters(c):
    ann, argv = c.pretrain_with(lambda items: items[BAD_ITEM].update(caption=['a red square', '\u2060\ufeff\u00ad ']))
    return Expect(Pretrain.main, argv, f"^{where(ann)}: key 'caption' entry 1 is empty \\(no visible characters")


@case
def all_captions_empty_in_pretraining(c):
    """Captions of punctuation only normalise to nothing: MLM has nothing to mask and the loss would be NaN with
    no item named; refused at load time, naming the first item."""
    ann, argv = c.pretrain_with(lambda items: [it.update(caption='... !!') for it in items])
    return Expect(Pretrain.main, argv, f"^{re.escape(ann)} item 0: key 'caption' is empty \\(no visible characters "
                                       f"after normalisation: '... !!'\\)$")


@case
def ve_sentence_of_invisible_characters(c):
    items = c.items('ve_train.json', 16)
    items[6]['sentence'] = '\u200c\u200d\u3164'
    ann = c.write('ve_train.json', items)
    return Expect(VE.main, c.argv(c.config('VE', train_file=ann)),
                  f"^{re.escape(ann)} item 6: key 'sentence' is empty \\(no visible characters")


@case
def retrieval_evaluation_caption_invisible(c):
    items = c.items('retrieval_val.json', 8)
    items[1]['caption'] = [items[1]['caption'][0], '\u200b\u200b']
    ann = c.write('retrieval_val.json', items)
    return Expect(Retrieval.main, c.argv(c.config('Retrieval', val_file=ann)),
                  f"^{re.escape(ann)} item 1: key 'caption' entry 1 is empty \\(no visible characters")


@case
def grounding_text_invisible(c):
    items = c.items('refcoco+_train.json', 16)
    items[0]['text'] = '\u2800'
    ann = c.write('refcoco+_train.json', items)
    return Expect(Grounding.main, c.argv(c.config('Grounding', train_file=[ann])),
                  f"^{re.escape(ann)} item 0: key 'text' is empty \\(no visible characters")


@case
def vqa_question_invisible(c):
    items = c.items('vqa_train.json', 16)
    items[5]['question'] = '?\u200b'
    ann = c.write('vqa_train.json', items)
    return Expect(VQA.main, c.argv(c.config('VQA', train_file=[ann])),
                  f"^{re.escape(ann)} item 5: key 'question' is empty \\(no visible characters")


# ----------------------------------------------------------------------------------------------------------------
# Running a case (as tests/test_bad_inputs.py does)
# ----------------------------------------------------------------------------------------------------------------
def test_catalogue_size():
    assert len(CASES) >= 25


@pytest.mark.parametrize('make_case', CASES, ids=lambda f: f.__name__)
def test_bad_input(make_case, ctx, capsys):
    run_case(make_case.__name__, make_case(ctx), ctx, capsys, time_limit=240)


@pytest.mark.parametrize('name', ['image_missing', 'image_corrupt', 'image_truncated', 'image_empty_file',
                                  'image_path_is_a_directory'])
def test_image_cases_of_the_first_catalogue_with_workers(name, ctx, capsys):
    """tests/test_bad_inputs.py's image cases again, loaded by 2 DataLoader workers: the same line."""
    import tests.test_bad_inputs as first
    expect = getattr(first, name)(ctx)
    run_case(name, expect._replace(argv=expect.argv + list(WORKERS)), ctx, capsys)


# ----------------------------------------------------------------------------------------------------------------
# Real processes: a worker error and SIGTERM
# ----------------------------------------------------------------------------------------------------------------
ENV = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1')


def test_worker_error_in_a_real_process_is_one_line(ctx):
    """`python Pretrain.py --num_workers 2` with a corrupt image: the workers print nothing of their own either."""
    expect = worker_image_corrupt(ctx)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'Pretrain.py'), *expect.argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert proc.returncode == utils.EXIT_USER_ERROR, proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(expect.message, lines[0][len('error: '):]), lines


def _run_until_first_checkpoint(argv, out, group):
    """Start Pretrain.py, wait until checkpoint_last.pth exists, send SIGTERM (to the process or its whole group,
    data loader workers included); returns (exit code, stdout, stderr)."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, 'Pretrain.py'), *argv], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not os.path.exists(os.path.join(out, 'checkpoint_last.pth')):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, 'no checkpoint written'
            time.sleep(0.05)
        (os.killpg if group else os.kill)(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return proc.returncode, stdout, stderr


@pytest.mark.parametrize('group, workers', [(False, 0), (True, 2)], ids=['process', 'group_with_workers'])
def test_sigterm_says_what_was_kept_and_resume_continues(ctx, group, workers):
    import engine
    config = ctx.config(schedular=dict(TINY_SCHED, epochs=8), print_freq=1)
    argv = ctx.argv(config, '--save_every_steps', '1', '--num_workers', workers)
    code, stdout, stderr = _run_until_first_checkpoint(argv, str(ctx.out), group)
    lines = stderr.strip().splitlines()
    assert code == engine.EXIT_TERMINATED, stderr[-3000:]
    assert 'Traceback' not in stderr + stdout
    assert len(lines) == 1, lines
    m = re.match(f'error: stopped by SIGTERM at epoch (\\d+) step (\\d+); {re.escape(ctx.last)} is kept \\(it resumes '
                 f'at epoch (\\d+) step (\\d+)\\): continue with --resume$', lines[0])
    assert m, lines[0]
    kept = torch.load(ctx.last, weights_only=True)['train_state']
    assert (kept['epoch'], kept['step_in_epoch']) == (int(m.group(3)), int(m.group(4)))
    assert_written_files_load(ctx.out)
    print(lines[0])

    resumed = subprocess.run([sys.executable, os.path.join(ROOT, 'Pretrain.py'), *argv, '--resume'], cwd=ROOT,
                             env=ENV, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f'resumed from {ctx.last}: epoch {m.group(3)}, step {m.group(4)} of that epoch' in resumed.stdout
    final = torch.load(ctx.last, weights_only=True)['train_state']
    assert (final['epoch'], final['step_in_epoch']) == (8, 0)


def test_sigterm_before_any_checkpoint_says_nothing_was_kept(ctx, capsys):
    """In-process: the handler that engine.train installs, fired before the first save."""
    import engine
    guard = engine.RunGuard(str(ctx.out))
    guard.state = engine.TrainState(epoch=0, step_in_epoch=2)
    with guard.handle_sigterm(), pytest.raises(SystemExit) as exc:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
    assert exc.value.code == engine.EXIT_TERMINATED
    assert signal.getsignal(signal.SIGTERM) is not guard._on_sigterm  # the previous handler is back
    assert capsys.readouterr().err == ('error: stopped by SIGTERM at epoch 0 step 2; nothing of this run was saved '
                                       'yet: rerun the same command to start over (--save_every_steps N keeps a '
                                       'resume point every N steps)\n')


def test_sigterm_during_a_checkpoint_write_waits_for_it(ctx, capsys):
    import engine
    guard = engine.RunGuard(str(ctx.out))
    state = engine.TrainState(epoch=1, step_in_epoch=4)
    with guard.handle_sigterm(), pytest.raises(SystemExit):
        with guard.critical():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
            guard.keep(str(ctx.out / 'checkpoint_last.pth'), state)  # the write finishes before the stop
    err = capsys.readouterr().err
    assert err.strip() == (f'error: stopped by SIGTERM; {ctx.last} is kept (it resumes at epoch 1 step 4): continue '
                           f'with --resume')
