"""CPU dry run of the prepared accelerator benchmark script on bench-tiny shapes."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


# Every run of the script on CPU costs a bench process and its compiles (minutes on 2 cores):
# the default suite runs one train step and one decoding through it, ILR_JAX_FULL_DRY_RUNS=1 all.
FULL = os.environ.get('ILR_JAX_FULL_DRY_RUNS') == '1'


@pytest.mark.slow
def test_bench_accelerator_dry_run_writes_every_record(tmp_path):
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    XLA_FLAGS='--xla_force_host_platform_device_count=1',
    PATH=f'{pathlib.Path(sys.executable).parent}:{os.environ["PATH"]}',
    GEMMA='bench-tiny',
    MISTRAL='bench-tiny',
    DTYPE='float32',
    SFT_BATCH='2',
    DPO_BATCH='2',
    SEQ_LEN='16',
    DECODE_LEN='8',
    ROWS='4',
    MIN_REPS='1',
    LIMIT_S='300',
    ONLY='' if FULL else 'sft_gemma2b decode_rows4',
  )
  r = subprocess.run(
    ['bash', str(ROOT / 'launch' / 'bench_accelerator.sh'), str(tmp_path)],
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert r.returncode == 0, r.stderr[-3000:]
  recs = [json.loads(x) for x in (tmp_path / 'all.jsonl').read_text().splitlines()]
  names = {(x['name'], x['arch']) for x in recs}
  wanted = [('sft_step', 'gemma'), ('generate_greedy', 'mistral')]
  if FULL:
    wanted += [
      ('sft_step_lora', 'mistral'),
      ('dpo_step_lora', 'mistral'),
      ('generate_beam4', 'mistral'),
      ('classify_batched', 'gemma'),
    ]
  for want in wanted:
    assert want in names, (want, sorted(names))
  assert all(x['median_s'] > 0 for x in recs)


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.skipif(
  not FULL, reason='a whole GSM8K ILR round on CPU (over 5 minutes): set ILR_JAX_FULL_DRY_RUNS=1'
)
def test_round_accelerator_dry_run_prints_stage_times(tmp_path, shared_data):
  """One ILR round of configs/gsm8k.py on tiny random checkpoints it writes, under the timing
  switch: every stage finishes and the report extrapolates the full run."""
  small = [
    '--config.supervisor_sft.batch_size=4',
    '--config.sft.batch_size=4',
    '--config.evaluator_train.batch_size=4',
    '--config.supervisor_sft.micro_batch=4',
    '--config.sft.micro_batch=4',
    '--config.evaluator_train.micro_batch=4',
    '--config.evaluator_train.num_checkpoints=1',
    '--config.evaluator_train.epochs=1',
    '--config.sampling.batch_size=8',
    '--config.sampling.score_batch_size=8',
    '--config.supervisor_sft.epochs=1',
    '--config.sft.epochs=1',
    f'--config.compile_cache_dir={tmp_path / "cache"}',
  ]
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    XLA_FLAGS='--xla_force_host_platform_device_count=1',
    PATH=f'{pathlib.Path(sys.executable).parent}:{os.environ["PATH"]}',
    DATA_DIR=str(shared_data / 'gsm8k'),
    SUPERVISOR='tiny',
    STUDENT='tiny',
    DTYPE='float32',
    TRAIN_ROWS='8',
    TEST_ROWS='2',
    MAX_NEW='2',
    LIMIT_S='1500',
    EXTRA=' '.join(small),
  )
  r = subprocess.run(
    ['bash', str(ROOT / 'launch' / 'round_accelerator.sh'), str(tmp_path)],
    env=env,
    capture_output=True,
    text=True,
    timeout=1600,
  )
  assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
  recs = [json.loads(x) for x in (tmp_path / 'times.jsonl').read_text().splitlines()]
  stages = {x['stage'] for x in recs if 'stage' in x}
  assert {
    'supervisor',
    'weak_labels',
    'evaluator',
    'sft',
    'ilr/r1/labels',
    'ilr/r1/model',
  } <= stages
  full = recs[-1]['extrapolated_full_6_round_run']
  assert full['total_s'] > full['base_s'] > 0
