"""Faults a workdir must survive, in process: a fit killed or out of disk at its commit points,
two processes on one workdir, an override that must not change another field, resource checks
before any stage, corrupted files named in one line with `--redo`, and every kind of bad input as
one line with exit status 2. The whole-pipeline versions are in test_faults_e2e.py.
"""

import errno
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys

import datasets
import jax
import numpy as np
import pytest
from absl import flags
from test_fit import _cfg, gsm8k_examples
from test_labels import _labels
from test_train import _mesh, fast_model

import ilr_jax
from ilr_jax import context, fit, pipeline, report, schema
from ilr_jax import labels as labels_lib
from ilr_jax import workdir as wdlib
from ilr_jax.train import TrainConfig

# lock and preflight are imported where used, so that every test of this file runs (and fails
# for its own reason) against a tree that lacks them.

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE_ROOT = pathlib.Path(ilr_jax.__file__).resolve().parents[1]  # the ilr_jax under test
ARITH = 'configs/arith.py:sft,tiny'

# -- 1. a fit's checkpoint and snapshot ------------------------------------------------------------

# 12 steps, checkpoints at 4, 6 (the 0.5 snapshot), 8, 12; snapshots at 6 and 12.
FIT_CFG = TrainConfig(
  lr=1e-2,
  epochs=3,
  global_batch=4,
  max_len=160,
  pad_multiple=160,
  log_every=1,
  checkpoint_every=4,
  checkpoint_fractions=(0.5, 1.0),
)


class Killed(Exception):
  """Stands in for SIGKILL: raised at a write, it leaves the disk as a kill there would."""


def _leaves(model):
  return jax.device_get(jax.tree.leaves(fit.lora_lib.split_trainable(model)[1]))


@pytest.fixture(scope='module')
def fit_setup(tmp_path_factory):
  examples = gsm8k_examples(16, seed=2)
  small = dict(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1)
  base = fast_model(_cfg(**small), _mesh(1, 2, 1))
  root = tmp_path_factory.mktemp('fit')

  def run(name, **kw):
    return fit.fit(
      base, examples, loss='sft', config=FIT_CFG, workdir=root / name, progress=False, **kw
    )

  whole, _ = run('whole')
  snaps = {s: _leaves(fit.load_params(base, p)) for s, p in fit.fit_checkpoints(root / 'whole')}
  return dict(run=run, root=root, base=base, whole=_leaves(whole), snaps=snaps)


def _fail_at(kind, step):
  def hook(k, s):
    if (k, s) == (kind, step):
      raise Killed(f'{k} {s}')

  return hook


@pytest.mark.slow
@pytest.mark.parametrize('fault', ['disk_full_at_snapshot', 'killed_after_snapshot', 'old'])
def test_fit_fault_at_a_commit_point_reruns_to_the_same_params(fit_setup, fault, monkeypatch):
  run, wd = fit_setup['run'], fit_setup['root'] / fault
  if fault == 'disk_full_at_snapshot':
    real = fit.save_params

    def full_disk(model, path, **kw):  # the disk fills up exactly at the step-6 snapshot
      if pathlib.Path(path).name == 'step_6':
        monkeypatch.setattr(fit, 'save_params', real)  # "space freed" for the rerun
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
      return real(model, path, **kw)

    monkeypatch.setattr(fit, 'save_params', full_disk)
    with pytest.raises(OSError, match='No space left'):
      run(fault)
  elif fault == 'old':  # a workdir a kill left before the snapshot came first: checkpoints 4, 6
    with pytest.raises(Killed):  # and 8 on disk, the step-6 snapshot missing
      run(fault, after_save=_fail_at('checkpoint', 8))
    wdlib.shutil.rmtree(wd / 'snapshots' / 'step_6')
  else:  # between the snapshot and the checkpoint of step 6
    with pytest.raises(Killed):
      run(fault, after_save=_fail_at('snapshot', 6))
  model, result = run(fault)
  assert [s for s, _ in fit.fit_checkpoints(wd)] == [6, 12]
  assert [s for s, _ in result.snapshots] == [6, 12]
  for a, b in zip(fit_setup['whole'], _leaves(model)):
    np.testing.assert_array_equal(a, b)
  for step, path in fit.fit_checkpoints(wd):
    for a, b in zip(fit_setup['snaps'][step], _leaves(fit.load_params(fit_setup['base'], path))):
      np.testing.assert_array_equal(a, b)


def test_truncated_checkpoint_is_one_error_naming_it(fit_setup):
  snap = dict(fit.fit_checkpoints(fit_setup['root'] / 'whole'))[6]
  broken = fit_setup['root'] / 'broken_snapshot'
  wdlib.shutil.copytree(snap, broken)
  for f in (broken / 'params').rglob('*'):
    if f.is_file() and f.stat().st_size > 64 and 'd' in f.parent.name:
      f.write_bytes(f.read_bytes()[:16])
  with pytest.raises(wdlib.ArtifactError) as e:
    fit.load_params(fit_setup['base'], broken)
  assert str(broken) in str(e.value) and '\n' not in str(e.value)
  (broken / 'model_config.json').write_text('{"arch": ')
  with pytest.raises(wdlib.ArtifactError, match='model_config.json: the model config'):
    fit.load_params(fit_setup['base'], broken)


# -- 2. the workdir lock ---------------------------------------------------------------------------

_HOLD = """
import sys, time
from ilr_jax import lock
with lock.locked(sys.argv[1]):
  print('held', flush=True)
  time.sleep(600)
"""


def _env(devices=1):
  return dict(
    os.environ,
    PYTHONPATH=str(PACKAGE_ROOT),
    JAX_PLATFORMS='cpu',
    XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
  )


@pytest.mark.slow
def test_a_second_process_on_a_workdir_is_refused_and_a_killed_holder_never_blocks(tmp_path):
  from ilr_jax import lock

  wd = tmp_path / 'wd'
  holder = subprocess.Popen(
    [sys.executable, '-c', _HOLD, str(wd)], stdout=subprocess.PIPE, env=_env(), text=True
  )
  try:
    assert holder.stdout.readline().strip() == 'held'
    # Another process: the pipeline's command line, refused at once with the holder named.
    r = subprocess.run(
      [sys.executable, '-m', 'ilr_jax.main', f'--config={ARITH}', f'--workdir={wd}'],
      cwd=ROOT,
      env=_env(2),
      capture_output=True,
      text=True,
      timeout=300,
    )
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-2000:]
    assert f'pid {holder.pid} on host {socket.gethostname()}' in lines[-1]
    assert not (wd / 'stages').exists()  # refused before any stage
    with pytest.raises(lock.WorkdirBusyError, match=f'pid {holder.pid}'):
      with lock.locked(wd):
        pass
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # The killed holder's lock file is still there, naming it; it does not block.
  assert json.loads((wd / '.lock').read_text())['pid'] == holder.pid
  with lock.locked(wd):
    assert json.loads((wd / '.lock').read_text())['pid'] == os.getpid()


# -- 3. tokenizer and model_dir --------------------------------------------------------------------


def test_setting_the_tokenizer_never_changes_model_dir():
  c = schema.base_config('sft', 'gsm8k')
  c.student.model_dir = '/models/a'
  c.student.tokenizer = '/tokenizers/b'
  assert c.student.model_dir == '/models/a'
  c.supervisor.model_dir = '/models/s'
  schema.resolve(c)
  assert (c.student.model_dir, c.student.tokenizer) == ('/models/a', '/tokenizers/b')
  # Unset, the tokenizer is its model's directory (the evaluator's follows the supervisor's).
  assert c.supervisor.tokenizer == c.evaluator.tokenizer == '/models/s'
  c.student.model_dir = '/models/c'
  assert c.student.tokenizer == '/tokenizers/b'


# -- 4. resources before any stage; fingerprints of result keys only -------------------------------


def _bird_data(path, db_name='shop'):
  rows = {'question': ['How many?', 'Which?'], 'answer': ['SELECT 1'] * 2, 'db_name': [db_name] * 2}
  datasets.DatasetDict(
    {s: datasets.Dataset.from_dict(rows) for s in ('train', 'test')}
  ).save_to_disk(os.fspath(path))
  return path


def _bird_config(tmp_path, **task):
  from configs import bird

  c = bird.get_config('sft')
  c.task.data_dir = os.fspath(_bird_data(tmp_path / 'bird'))
  for k, v in task.items():
    c.task[k] = v
  return c


def test_preflight_checks_databases_and_judges_before_any_stage(tmp_path):
  from ilr_jax import preflight

  with pytest.raises(schema.ConfigError, match=r'--config\.task\.db_root'):
    preflight.check(_bird_config(tmp_path))
  (tmp_path / 'dbs').mkdir()
  with pytest.raises(schema.ConfigError, match=r"'shop' not found at .*shop\.sqlite"):
    preflight.check(_bird_config(tmp_path, db_root=os.fspath(tmp_path / 'dbs')))
  (tmp_path / 'dbs' / 'shop').mkdir()
  (tmp_path / 'dbs' / 'shop' / 'shop.sqlite').write_bytes(b'')
  preflight.check(_bird_config(tmp_path, db_root=os.fspath(tmp_path / 'dbs')))
  from configs import saferpaca

  s = saferpaca.get_config('ilr')
  with pytest.raises(schema.ConfigError, match=r'--config\.task\.judge\.backend'):
    preflight._graders(s, context.make_task({'name': 'saferpaca'}), [])
  s.task.judge.backend = 'local'
  s.task.judge.model_dir = os.fspath(tmp_path / 'no_judge')
  with pytest.raises(schema.ConfigError, match='no_judge does not exist'):
    preflight._graders(s, context.make_task({'name': 'saferpaca'}), [])


def test_resource_keys_are_not_fingerprinted_and_a_started_stage_is_not_called_computed(tmp_path):
  c = _bird_config(tmp_path)
  wd = pipeline.check_workdir(c, tmp_path / 'wd')
  wd.finish('supervisor', {'test_accuracy': 0.5}, 1.0)
  wd.start('weak_labels')
  wd.start('sft')
  # Where the databases are, how many workers and how long a query may take: not results.
  again = _bird_config(tmp_path, db_root='/data/bird/dbs', num_workers=1, timeout_s=5.0)
  assert pipeline.check_workdir(again, tmp_path / 'wd').done('supervisor')
  changed = _bird_config(tmp_path)
  changed.sft.lr = 0.5
  with pytest.raises(wdlib.ConfigChangedError, match=r"'sft' in .* was started \(not finished\)"):
    pipeline.check_workdir(changed, tmp_path / 'wd')
  changed.supervisor_sft.lr = 0.5
  with pytest.raises(wdlib.ConfigChangedError, match=r"'supervisor' in .* was computed with"):
    pipeline.check_workdir(changed, tmp_path / 'wd')


# -- 5. one loader for records, label sets and checkpoints; --redo ---------------------------------

STAGES = (
  wdlib.Stage('a', keys=('seed',)),
  wdlib.Stage('b', after=('a',)),
  wdlib.Stage('c', after=('b',)),
  wdlib.Stage('d', after=('a',)),
)


@pytest.mark.parametrize(
  'corruption',
  ['truncated', 'no_config', 'not_json', 'missing_label_set', 'truncated_label_set'],
)
def test_a_corrupted_record_or_label_set_is_one_line_naming_the_path(tmp_path, corruption):
  wd = wdlib.Workdir(tmp_path, {'seed': 0}, STAGES)
  for st in STAGES:
    wd.run(st.name, lambda: {'x': 1})
  rec = tmp_path / 'stages' / 'b.json'
  labels_lib.save_label_set(tmp_path / 'b' / 'labels', _labels())
  if corruption == 'truncated':
    rec.write_text(rec.read_text()[:20])
  elif corruption == 'no_config':
    rec.write_text('{"name": "b"}')
  elif corruption == 'not_json':
    rec.write_bytes(os.urandom(64))
  if corruption in ('truncated', 'no_config', 'not_json'):
    for read in (lambda: wd.record('b'), wd.check):
      with pytest.raises(wdlib.ArtifactError) as e:
        read()
      assert str(rec) in str(e.value) and "stage 'b'" in str(e.value)
      assert '\n' not in str(e.value) and wd.stage_of(e.value.path) == 'b'
    return
  target = tmp_path / 'b' / 'labels'
  if corruption == 'truncated_label_set':
    arrow = next(target.glob('*.arrow'))
    arrow.write_bytes(arrow.read_bytes()[:100])
  else:
    wdlib.shutil.rmtree(target)
  with pytest.raises(wdlib.ArtifactError) as e:
    labels_lib.load_label_set(target)
  assert str(target) in str(e.value) and 'label set' in str(e.value)
  assert wd.stage_of(e.value.path) == 'b'


def test_a_finished_stage_whose_output_is_gone_is_not_trusted(tmp_path):
  wd = wdlib.Workdir(tmp_path, {'seed': 0}, STAGES)
  snap = tmp_path / 'a' / 'fit' / 'snapshots' / 'step_45'
  wd.run('a', lambda: snap.mkdir(parents=True) or {})
  assert wd.done('a') and 'fit/snapshots/step_45' in wd.record('a')['outputs']
  snap.rmdir()
  with pytest.raises(wdlib.ArtifactError, match="step_45: an output of finished stage 'a' is gone"):
    wd.done('a')


def test_redo_forgets_the_stage_and_everything_downstream(tmp_path):
  wd = wdlib.Workdir(tmp_path, {'seed': 0}, STAGES)
  for st in STAGES:
    wd.run(st.name, lambda: {'x': 1})
    (tmp_path / st.name).mkdir(exist_ok=True)
  assert wd.redo('b') == ['b', 'c']
  assert [s.name for s in STAGES if wd.done(s.name)] == ['a', 'd']
  assert not (tmp_path / 'b').exists() and not (tmp_path / 'c').exists()
  assert (tmp_path / 'a').exists() and (tmp_path / 'd').exists()
  with pytest.raises(wdlib.WorkdirError, match="--redo='x' names no stage"):
    wd.redo('x')


def test_runs_of_other_methods_keep_their_results(tmp_path):
  def rows(method):
    return [{'seed': 0, 'method': m, 'round': r} for m in ('supervisor', method) for r in (0, 1)]

  report.write_results(tmp_path / 'results.jsonl', rows('ilr'))
  got = report.with_other_methods(tmp_path / 'results.jsonl', rows('naive'))
  assert sorted({(r['method'], r['round']) for r in got}) == sorted(
    {(m, r) for m in ('supervisor', 'ilr', 'naive') for r in (0, 1)}
  )
  assert len(got) == 6  # this run's supervisor rows replace the old ones


# -- 6. every kind of bad input: one line, exit status 2, nothing lost -----------------------------


def _gsm8k_dirs(tmp_path):
  models = tmp_path / 'model'
  models.mkdir(exist_ok=True)
  dirs = {}
  zero = {
    'train': {'question': [], 'answer': []},
    'test': {'question': ['q'], 'answer': ['#### 1']},
  }
  datasets.DatasetDict({s: datasets.Dataset.from_dict(v) for s, v in zero.items()}).save_to_disk(
    os.fspath(tmp_path / 'zero')
  )
  dirs['zero'] = tmp_path / 'zero'
  datasets.Dataset.from_dict(zero['test']).save_to_disk(os.fspath(tmp_path / 'plain'))
  dirs['plain'] = tmp_path / 'plain'
  (tmp_path / 'empty').mkdir()
  dirs['empty'] = tmp_path / 'empty'
  return models, dirs


GSM8K = 'configs/gsm8k.py:sft'
BAD_INPUTS = {
  'config_file_missing': (['--config=configs/nope.py:sft'], 'nope.py'),
  'unknown_method': (['--config=configs/arith.py:bogus'], "unknown method 'bogus'"),
  'unknown_switch': (['--config=configs/arith.py:sft,huge'], "switches ['huge']"),
  'unknown_key': ([f'--config={ARITH}', '--config.task.nope=1'], 'config.task.nope'),
  'kill_at_typo': ([f'--config={ARITH}', '--config.debug.kill_at=supervsor'], "'supervsor'"),
  'train_limit_0': ([f'--config={ARITH}', '--config.task.train_limit=0'], 'train_limit'),
  'max_new_tokens_0': ([f'--config={ARITH}', '--config.task.max_new_tokens=0'], 'max_new_tokens'),
  'zero_row_split': ([f'--config={GSM8K}', 'DATA=zero'], 'split with 0 rows'),
  'empty_data_dir': ([f'--config={GSM8K}', 'DATA=empty'], 'not a datasets.save_to_disk'),
  'plain_dataset': ([f'--config={GSM8K}', 'DATA=plain'], 'not a DatasetDict'),
  'bird_no_db_root': (['--config=configs/bird.py:sft', 'DATA=bird'], '--config.task.db_root'),
  'corrupt_record': ([f'--config={ARITH}', 'RECORD=truncated'], '--redo=supervisor'),
  'record_without_config': ([f'--config={ARITH}', 'RECORD={"name": "supervisor"}'], 'lacks'),
  'unknown_redo': ([f'--config={ARITH}', '--redo=spervisor'], "--redo='spervisor'"),
}


@pytest.fixture(scope='module')
def bad_dirs(tmp_path_factory):
  base = tmp_path_factory.mktemp('bad')
  models, dirs = _gsm8k_dirs(base)
  dirs['bird'] = _bird_data(base / 'bird')
  return base, models, dirs


def _forget_overrides():
  """In-process reruns of main: drop the `--config.<field>` flags the last parse defined."""
  for name in [n for n in flags.FLAGS if n.startswith('config.')]:
    delattr(flags.FLAGS, name)
  flags.FLAGS.unparse_flags()


@pytest.mark.parametrize('case', sorted(BAD_INPUTS))
def test_bad_input_is_one_line_with_exit_status_2(case, bad_dirs, tmp_path, capsys, monkeypatch):
  from ilr_jax import main

  base, models, dirs = bad_dirs
  args, expected = BAD_INPUTS[case]
  wd = tmp_path / 'wd'
  (wd / 'stages').mkdir(parents=True)
  (wd / 'keep.txt').write_text('earlier work')
  argv = ['ilr_jax.main', f'--workdir={wd}']
  for a in args:
    if a.startswith('DATA='):
      argv.append(f'--config.task.data_dir={dirs[a[5:]]}')
      argv += [f'--config.{r}.model_dir={models}' for r in ('supervisor', 'student')]
    elif a.startswith('RECORD='):
      body = a[7:]
      (wd / 'stages' / 'supervisor.json').write_text(
        '{"name": "sup' if body == 'truncated' else body
      )
    else:
      argv.append(a)
  before = {p: p.read_bytes() for p in wd.rglob('*') if p.is_file()}
  _forget_overrides()
  monkeypatch.setattr(sys, 'argv', argv)  # config_flags reads the overrides from sys.argv

  def no_stage(*args, **kwargs):
    raise AssertionError('the run got past its checks to pipeline.run')

  monkeypatch.setattr(pipeline, 'run', no_stage)
  with pytest.raises(SystemExit) as e:
    main.main(main._parse(argv))
  lines = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2, lines
  assert len(lines) == 1 and lines[0].startswith('ilr_jax.main: '), lines
  assert expected in lines[0] and 'Traceback' not in lines[0], lines[0]
  assert len(lines[0]) < 600
  after = {p: p.read_bytes() for p in wd.rglob('*') if p.is_file() and p.name != '.lock'}
  assert after == before  # nothing lost, nothing half-written
  _forget_overrides()


def _cli(module, *args):
  return subprocess.run(
    [sys.executable, '-m', f'ilr_jax.{module}', *args],
    cwd=ROOT,
    env=_env(),
    capture_output=True,
    text=True,
    timeout=300,
  )


@pytest.mark.slow
def test_convert_and_generate_bad_inputs_are_one_line(tmp_path, tiny_hf):
  import concurrent.futures

  path, _ = tiny_hf('llama')
  truncated = tmp_path / 'truncated'
  wdlib.shutil.copytree(path, truncated)
  st = truncated / 'model.safetensors'
  st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
  garbage = tmp_path / 'garbage'
  wdlib.shutil.copytree(path, garbage)
  (garbage / 'model.safetensors').write_bytes(np.random.default_rng(0).bytes(4096))
  (tmp_path / 'empty.txt').write_text('\n  \n')
  cases = {
    'truncated': (('convert', f'--from_hf={truncated}', f'--out={tmp_path}/o1'), 'truncated'),
    'garbage': (('convert', f'--from_hf={garbage}', f'--out={tmp_path}/o2'), 'model.safetensors'),
    'no_prompts': (
      ('generate', f'--model={path}', f'--prompts_file={tmp_path}/none.txt'),
      'none.txt does not exist',
    ),
    'empty_prompts': (
      ('generate', f'--model={path}', f'--prompts_file={tmp_path}/empty.txt'),
      'empty.txt holds no prompt',
    ),
    'decoding': (
      ('generate', '--model=/no/such/model', '--prompt=hi', '--method=sample', '--temperature=0'),
      'temperature must be > 0',
    ),
  }
  with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
    runs = {k: pool.submit(_cli, *args) for k, (args, _) in cases.items()}
  for name, (_, expected) in cases.items():
    r = runs[name].result()
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and expected in lines[0], (name, r.stderr[-2000:])
  assert not (tmp_path / 'o1').exists() and not (tmp_path / 'o2').exists()
