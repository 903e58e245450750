"""CPU dry run of the prepared accelerator benchmark script on bench-tiny shapes."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


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
  for want in [
    ('sft_step', 'gemma'),
    ('sft_step_lora', 'mistral'),
    ('dpo_step_lora', 'mistral'),
    ('generate_greedy', 'mistral'),
    ('generate_beam4', 'mistral'),
    ('classify_batched', 'gemma'),
  ]:
    assert want in names, (want, sorted(names))
  assert all(x['median_s'] > 0 for x in recs)
