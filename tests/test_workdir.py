"""Workdir: atomic writes, stage records, fingerprints and the changed-config refusal."""

import pytest

from ilr_jax import workdir as wdlib

CONFIG = {'seed': 0, 'sft': {'lr': 1e-3, 'epochs': 2}, 'ilr': {'alpha': 0.15}, 'debug': {'x': 1}}
STAGES = (
  wdlib.Stage('supervisor', keys=('seed', 'sft')),
  wdlib.Stage('ilr/r1/labels', keys=('ilr',), after=('supervisor',)),
)


def test_atomic_dir_leaves_nothing_on_error(tmp_path):
  with pytest.raises(RuntimeError):
    with wdlib.atomic_dir(tmp_path / 'out') as tmp:
      (tmp / 'half').write_text('x')
      raise RuntimeError('killed')
  assert list(tmp_path.iterdir()) == []


def test_run_skips_finished_stages_and_keeps_metrics(tmp_path):
  calls = []
  wd = wdlib.Workdir(tmp_path, CONFIG, STAGES)
  assert wd.check() == []
  m = wd.run('supervisor', lambda: calls.append(1) or {'acc': 0.5})
  assert m == {'acc': 0.5} and calls == [1]
  wd2 = wdlib.Workdir(tmp_path, CONFIG, STAGES)
  assert wd2.run('supervisor', lambda: calls.append(2) or {'acc': 0.0}) == {'acc': 0.5}
  assert calls == [1]
  rec = wd2.record('supervisor')
  assert rec['config'] == {'seed': 0, 'sft.lr': 1e-3, 'sft.epochs': 2}
  assert len(rec['fingerprint']) == 16
  # Downstream stages carry their upstream stages' keys.
  assert set(wd2.values('ilr/r1/labels')) == {'seed', 'sft.lr', 'sft.epochs', 'ilr.alpha'}


def test_changed_key_is_refused_with_its_name_and_recomputed_on_request(tmp_path):
  wdlib.Workdir(tmp_path, CONFIG, STAGES).run('supervisor', lambda: {'acc': 0.5})
  changed = dict(CONFIG, sft={'lr': 2e-3, 'epochs': 2})
  with pytest.raises(wdlib.ConfigChangedError, match=r'config key sft\.lr changed from 0\.001'):
    wdlib.Workdir(tmp_path, changed, STAGES).check()
  # A key no stage depends on may change freely.
  wdlib.Workdir(tmp_path, dict(CONFIG, debug={'x': 2}), STAGES).check()
  wd = wdlib.Workdir(tmp_path, changed, STAGES, recompute_changed=True)
  assert wd.check() == ['supervisor']
  assert not wd.done('supervisor')
  assert wd.run('supervisor', lambda: {'acc': 0.7}) == {'acc': 0.7}


def test_started_stage_with_other_config_is_refused(tmp_path):
  wd = wdlib.Workdir(tmp_path, CONFIG, STAGES)
  wd.start('supervisor')  # as if killed mid-stage: its checkpoints belong to this config
  changed = dict(CONFIG, seed=1)
  with pytest.raises(wdlib.ConfigChangedError, match='config key seed changed'):
    wdlib.Workdir(tmp_path, changed, STAGES).check()


def test_unknown_key_and_order_errors(tmp_path):
  with pytest.raises(KeyError, match='nope'):
    wdlib.Workdir(tmp_path, CONFIG, (wdlib.Stage('a', keys=('nope',)),))
  with pytest.raises(ValueError, match='not registered before'):
    wdlib.Workdir(tmp_path, CONFIG, (wdlib.Stage('a', after=('b',)),))
  with pytest.raises(ValueError, match='kill_at'):
    wdlib.Workdir(tmp_path, CONFIG, STAGES, kill_at='nostage')
