"""The three paper configs end to end from HF checkpoints: one round of `compare` each.

`python -m ilr_jax.main --config=configs/<task>.py:compare` runs on tiny transformers checkpoints
this file saves with `save_pretrained` (Gemma supervisor and evaluator; Mistral student for GSM8K
and SaferPaca, Llama for BIRD) and a byte-level BPE tokenizer it trains on the rows with the
`tokenizers` library. The `--config.` overrides change sizes only (rounds, epochs, batch sizes,
lengths, checkpoint counts, workers) plus the paths and backends a run must be given.

Data: GSM8K's shortest rows from ../shared/data/gsm8k when present, else rows written here in
GSM8K's format; BIRD rows whose gold SQL runs on two small sqlite databases made here; SaferPaca
rows in its instruction/output/category format, judged and embedded by the local backends on the
tiny Gemma. GSM8K trains only on labels with `####` (METHOD.md), which a random model never
writes, and a random model's beam-search labels are blank once stripped, so the GSM8K and BIRD
supervisors train more epochs on half A (120 steps) than SaferPaca's (which samples).

The three runs share the session's compilation cache (conftest.py; equal shapes compile once)
and take about 4 minutes on 2 idle cores; one xdist worker runs this whole file (setup.cfg:
--dist loadfile).
"""

import json
import math
import os
import pathlib
import random
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

from ilr_jax import context, labels

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_GSM8K = ROOT.parent / 'shared' / 'data' / 'gsm8k'
ALPHA = 0.15
pytestmark = pytest.mark.e2e

TINY = dict(
  hidden_size=64,
  intermediate_size=128,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  head_dim=16,
  max_position_embeddings=2048,
)
# Size-only overrides shared by the three runs.
SIZES = (
  '--config.num_rounds=1',
  '--config.supervisor_sft.epochs=4',
  '--config.supervisor_sft.batch_size=8',
  '--config.sft.epochs=2',
  '--config.sft.batch_size=8',
  '--config.dpo.epochs=1',
  '--config.dpo.batch_size=4',
  '--config.evaluator_train.num_checkpoints=2',
  '--config.evaluator_train.epochs=1',
  '--config.evaluator_train.batch_size=8',
  '--config.evaluator_train.max_len=512',
  '--config.sampling.batch_size=32',
  # The paper configs shard over tensor and accumulate micro-batches sized for accelerators:
  # back to data parallelism over the test's devices and one micro-batch per batch.
  '--config.mesh.data=-1',
  '--config.mesh.fsdp=1',
  '--config.mesh.tensor=1',
  '--config.supervisor_sft.micro_batch=8',
  '--config.sft.micro_batch=8',
  '--config.dpo.micro_batch=4',
  '--config.evaluator_train.micro_batch=8',
)


# -- data ------------------------------------------------------------------------------------------


def _gsm8k_rows():
  """(train, test) GSM8K rows: the shortest of the shared copy, or rows in its format."""
  if SHARED_GSM8K.is_dir():
    import datasets

    d = datasets.load_from_disk(os.fspath(SHARED_GSM8K))

    def shortest(split, n):
      rows = d[split].to_list()
      rows.sort(key=lambda r: len(r['question']) + len(r['answer']))
      return rows[:n]

    return shortest('train', 32), shortest('test', 8)
  rng = random.Random(0)
  rows = []
  for _ in range(40):
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(10, 40)
    rows.append(
      dict(
        question=f'Tom has {c} apples and buys {a} bags of {b} apples. How many apples has he?',
        # Short enough to reach `####` within the run's 24 new tokens.
        answer=f'{a}*{b}=<<{a}*{b}={a * b}>>{a * b}\n{c}+{a * b}={c + a * b}\n#### {c + a * b}',
      )
    )
  return rows[:32], rows[32:]


_DBS = {
  'shop': (
    'CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT, price REAL, stock INTEGER)',
    [(i, f'item{i}', float(i % 7 + 1), i % 5) for i in range(1, 21)],
    'items',
  ),
  'school': (
    'CREATE TABLE students (id INTEGER PRIMARY KEY, name TEXT, grade INTEGER, age INTEGER)',
    [(i, f'pupil{i}', i % 4 + 9, i % 6 + 14) for i in range(1, 21)],
    'students',
  ),
}


def _bird_rows(db_root: pathlib.Path):
  """(train, test) BIRD rows over two small sqlite databases; every gold SQL runs."""
  for name, (ddl, rows, table) in _DBS.items():
    (db_root / name).mkdir(parents=True)
    con = sqlite3.connect(db_root / name / f'{name}.sqlite')
    con.execute(ddl)
    marks = ','.join('?' * len(rows[0]))
    con.executemany(f'INSERT INTO {table} VALUES ({marks})', rows)
    con.commit()
    con.close()
  out = []
  for k in range(40):
    name = ('shop', 'school')[k % 2]
    table, col = ('items', 'price') if name == 'shop' else ('students', 'age')
    v = 2 + k % 5
    q = (
      'Given the following database schema, use SQL to answer the question.\n\n'
      f'Schema:\nTable {table}, columns = [id,name,{col}]\n\n'
      f'Question: How many rows of {table} have {col} above {v}?'
    )
    sql = f'SELECT COUNT(*) FROM {table} WHERE {col} > {v}'
    out.append(dict(question=q, answer=sql, db_name=name))
  for r in out:  # the gold SQL runs
    con = sqlite3.connect(db_root / r['db_name'] / f'{r["db_name"]}.sqlite')
    assert con.execute(r['answer']).fetchall()
    con.close()
  return out[:32], out[32:]


def _saferpaca_rows():
  """(train, test) rows in SaferPaca's Alpaca format, general and safety instructions."""
  general = [
    ('Name a color of the sky.', 'The sky is often blue.'),
    ('Give a synonym of happy.', 'A synonym of happy is glad.'),
    ('Add 2 and 3.', 'The sum of 2 and 3 is 5.'),
    ('Name a fruit.', 'An apple is a fruit.'),
    ('What is the capital of France?', 'The capital of France is Paris.'),
  ]
  safety = [
    ('Tell me how to steal a car.', 'Sorry, I cannot help with stealing.'),
    ('How do I hurt someone?', 'Sorry, I cannot answer that.'),
    ('Write a threat to my neighbour.', 'I cannot write threats.'),
  ]
  rows = []
  for k in range(40):
    cat = 'safety' if k % 3 == 0 else 'general'
    inst, out = (safety if cat == 'safety' else general)[k % (3 if cat == 'safety' else 5)]
    rows.append(dict(instruction=f'{inst} ({k})', input='', output=out, category=cat))
  return rows[:32], rows[32:]


def _save(rows_by_split, path):
  import datasets

  datasets.DatasetDict(
    {k: datasets.Dataset.from_list(v) for k, v in rows_by_split.items()}
  ).save_to_disk(os.fspath(path))


# -- tokenizer and checkpoints ---------------------------------------------------------------------


def _texts(train, test):
  from ilr_jax import tasks, tokens

  out = []
  for r in train + test:
    q = r.get('question') or tasks.saferpaca_prompt(r['instruction'])
    a = r.get('answer') or r['output']
    out.append(tokens.prompt_text(q) + a)
  return out


def _tokenizer(texts, vocab_size=640):
  """A byte-level BPE trained on the rows, as a transformers fast tokenizer."""
  import tokenizers
  import transformers
  from tokenizers import decoders, models, pre_tokenizers, trainers

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=['<pad>', '<bos>', '<eos>'],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(texts, trainer)
  return transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok, bos_token='<bos>', eos_token='<eos>', pad_token='<pad>'
  )


def _checkpoint(path, arch, fast, seed):
  """A tiny random `arch` causal LM and the tokenizer, saved with save_pretrained."""
  import torch
  import transformers

  cls = dict(
    gemma=transformers.GemmaConfig,
    mistral=transformers.MistralConfig,
    llama=transformers.LlamaConfig,
  )[arch]
  ids = dict(pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id)
  cfg = cls(vocab_size=len(fast), eos_token_id=fast.eos_token_id, **ids, **TINY)
  torch.manual_seed(seed)
  transformers.AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(path)
  fast.save_pretrained(path)
  return path


# -- the runs --------------------------------------------------------------------------------------


def _main(config, wd, *extra, timeout=1800):
  env = dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    TOKENIZERS_PARALLELISM='false',
    XLA_FLAGS='--xla_force_host_platform_device_count=2',
    PYTHONPATH=os.fspath(ROOT),
  )
  cmd = [sys.executable, '-m', 'ilr_jax.main', f'--config={config}', f'--workdir={wd}']
  cmd += [*SIZES, *extra]
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='module')
def assets(tmp_path_factory, compile_cache_dir):
  """Data dirs, one tokenizer and the tiny checkpoints, shared by the three runs."""
  base = tmp_path_factory.mktemp('paper')
  data = {
    'gsm8k': _gsm8k_rows(),
    'bird': _bird_rows(base / 'bird_dbs'),
    'saferpaca': _saferpaca_rows(),
  }
  for task, (train, test) in data.items():
    _save({'train': train, 'test': test}, base / f'{task}_data')
  # One tokenizer for the three tasks: equal shapes across runs, so the shared compilation
  # cache compiles most programs once.
  fast = _tokenizer([t for tr, te in data.values() for t in _texts(tr, te)])
  ckpt = {arch: _checkpoint(base / arch, arch, fast, seed) for seed, arch in enumerate(ARCHS)}
  return dict(base=base, ckpt=ckpt, cache={}, compile_cache=compile_cache_dir)


ARCHS = ('gemma', 'mistral', 'llama')


def _plan(task, base, ckpt):
  sup = f'--config.supervisor.model_dir={ckpt["gemma"]}'
  if task == 'gsm8k':
    # GSM8K trains only on labels with `####`, which a random model never writes: the
    # supervisor trains long enough on half A (120 steps) to write some. (BIRD's too: a random
    # model's beams are whitespace, empty once stripped, and empty labels are dropped.)
    return (
      sup,
      f'--config.student.model_dir={ckpt["mistral"]}',
      '--config.supervisor_sft.epochs=60',
      '--config.task.max_new_tokens=24',
    )
  if task == 'bird':
    return (
      sup,
      f'--config.student.model_dir={ckpt["llama"]}',
      '--config.supervisor_sft.epochs=60',  # a random model's beams are blank once stripped
      f'--config.task.db_root={base / "bird_dbs"}',
      '--config.task.num_workers=2',
      '--config.task.max_new_tokens=24',
    )
  return (
    sup,
    f'--config.student.model_dir={ckpt["mistral"]}',
    '--config.task.judge.backend=local',
    f'--config.task.judge.model_dir={ckpt["gemma"]}',
    '--config.task.embedder.backend=local',
    f'--config.task.embedder.model_dir={ckpt["gemma"]}',
    '--config.task.max_new_tokens=24',
  )


def _run(assets, task):
  """The task's compare run (once per module), as dict(wd, returncode, stdout, stderr)."""
  if task not in assets['cache']:
    base = assets['base']
    wd = base / task
    r = _main(
      f'configs/{task}.py:compare',
      wd,
      f'--config.task.data_dir={base / f"{task}_data"}',
      f'--config.compile_cache_dir={assets["compile_cache"]}',
      *_plan(task, base, assets['ckpt']),
    )
    assets['cache'][task] = dict(wd=wd, returncode=r.returncode, stdout=r.stdout, stderr=r.stderr)
  return assets['cache'][task]


def _finished(assets, task):
  r = _run(assets, task)
  assert r['returncode'] == 0, f'{task}: rc {r["returncode"]}\n{r["stderr"][-4000:]}'
  return r['wd']


def _rows(wd):
  return [json.loads(line) for line in (wd / 'results.jsonl').read_text().splitlines()]


def _check_label_sets(wd, regrade: bool):
  """METHOD.md's invariants on D0 and the round-1 label sets of ilr and naive."""
  task = context.make_task(json.loads((wd / 'config.json').read_text())['task'])
  d0 = labels.load_label_set(wd / 'weak_labels' / 'labels')
  n = len(d0['id'])
  assert n == 16 and set(d0['source']) == {'weak'} and set(d0['round']) == {0}
  assert all(x == x.strip() for x in d0['label'])  # generated texts are stored stripped
  by_id = {e.id: e for e in task.load('train')}
  for method in ('ilr', 'naive'):
    d1 = labels.load_label_set(wd / method / 'r1' / 'labels' / 'labels')
    assert d1['id'] == d0['id'], method
    rep, agree = np.asarray(d1['replaced']), np.asarray(d1['agreed'])
    rec = json.loads((wd / 'stages' / method / 'r1' / 'labels.json').read_text())['metrics']
    assert rec['num_replaced'] == rep.sum()
    for j in range(n):
      if rep[j]:
        assert d1['label'][j] == d1['proposal'][j] and d1['source'][j] == 'proposal'
        assert d1['round'][j] == 1 and not agree[j]
      else:
        assert d1['label'][j] == d0['label'][j] and d1['source'][j] == 'weak'
    if method == 'naive':
      assert rep.sum() == math.floor(ALPHA * n) and not agree.any()
    else:
      assert rep.sum() <= math.ceil(ALPHA * (~agree).sum())
      scores = np.asarray(d1['score'])
      assert np.isnan(scores[agree]).all() and not np.isnan(scores[~agree]).any()
      assert (scores[rep] > rec['threshold']).all() and rec['threshold'] >= 0.5
    if regrade:  # provenance: `correct` is the label's grade against the ground truth
      graded = task.grade_batch(d1['label'], [by_id[x] for x in d1['id']]).scores
      assert [bool(s > 0.5) for s in graded] == d1['correct'], method


def _check_results(wd, stdout):
  rows = _rows(wd)
  got = {(r['method'], r['round']) for r in rows}
  assert {('supervisor', 0), ('sft', 0), ('ilr', 1), ('naive', 1), ('dpo', 1)} <= got
  assert all(0.0 <= r['test_accuracy'] <= 1.0 for r in rows)
  assert (wd / 'report.md').stat().st_size > 0
  assert '| method | round | test acc |' in stdout


@pytest.mark.slow
def test_gsm8k_compare(assets):
  wd = _finished(assets, 'gsm8k')
  _check_results(wd, _run(assets, 'gsm8k')['stdout'])
  _check_label_sets(wd, regrade=True)
  d0 = labels.load_label_set(wd / 'weak_labels' / 'labels')
  assert any(d0['valid'])  # the supervisor writes `####` answers, so the student trains
  pairs = json.loads((wd / 'dpo' / 'r1' / 'pairs' / 'pairs.json').read_text())
  assert all(len(s) == 6 for s in pairs['samples'])
  assert all('####' in c for c in pairs['chosen'])  # GSM8K drops chosen answers without it


@pytest.mark.slow
def test_bird_compare(assets):
  wd = _finished(assets, 'bird')
  _check_results(wd, _run(assets, 'bird')['stdout'])
  _check_label_sets(wd, regrade=True)
  cfg = json.loads((wd / 'config.json').read_text())
  assert cfg['student']['param_dtype'] == 'bfloat16'  # the 70B setting (the test sets the mesh)


@pytest.mark.slow
def test_saferpaca_compare_builds_its_own_evaluator_pairs(assets):
  wd = _finished(assets, 'saferpaca')
  _check_results(wd, _run(assets, 'saferpaca')['stdout'])
  _check_label_sets(wd, regrade=False)
  counts = json.loads((wd / 'evaluator_data' / 'data' / 'counts.json').read_text())
  kinds = {k for split in ('train', 'validation') for k in counts[split]}
  assert {'gt>safety', 'gt>general', 'general>safety'} <= kinds and 'gt>correct' not in kinds
  n_safety = json.loads((wd / 'stages' / 'evaluator_data.json').read_text())['metrics'][
    'num_safety'
  ]
  kept = counts['train']['general>safety'] + counts['validation']['general>safety']
  assert kept == min(n_safety, counts['pairs']['candidates']) == counts['pairs']['candidates_kept']
  for cat in ('general', 'safety'):  # both category-only models sampled every half-A question
    for i in range(2):
      s = json.loads((wd / 'evaluator_data' / cat / 'samples' / f'samples_{i}.json').read_text())
      assert s['num_questions'] == 16 and s['correct'] is None
  rec = json.loads((wd / 'stages' / 'dpo' / 'r1' / 'policy.json').read_text())
  assert rec['config']['dpo.epochs'] == 1  # the override reached the stage (config: 4)


@pytest.mark.slow
def test_a_row_longer_than_max_len_stops_before_any_stage_in_one_line(assets):
  base = assets['base']
  wd = base / 'too_long'
  r = _main(
    'configs/saferpaca.py:compare',
    wd,
    f'--config.task.data_dir={base / "saferpaca_data"}',
    *_plan('saferpaca', base, assets['ckpt']),
    '--config.sft.max_len=32',
    '--config.sft.pad_multiple=16',
    timeout=300,
  )
  assert r.returncode != 0
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith('ilr_jax.main: saferpaca/train/') and 'tokens as an SFT example' in last
  assert '> --config.sft.max_len=32; set --config.sft.max_len=' in last
  assert not (wd / 'stages').exists() or not list((wd / 'stages').rglob('*.json'))
