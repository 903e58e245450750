"""What the pipeline's stages share: the run's data, tokenizers and mesh (`Run`), and the model
operations every stage calls through it (fit, generate, evaluate on test, feedback scorers).

Every seed derives from the run's seed and the stage's name (`stage_seed`), so a stage computes
the same numbers on every process, on every resume and whichever stages ran before it.
"""

from __future__ import annotations

import shutil
import zlib

import numpy as np

from ilr_jax.workdir import is_writer, sync, write_json


def stage_seed(seed: int, stage: str) -> int:
  """A seed per (run seed, stage), the same on every process and every resume."""
  return (seed * 1_000_003 + zlib.crc32(stage.encode())) % (2**31)


def make_task(task_cfg):
  """The task of a config's `task` section (a dict, as in the workdir's config.json)."""
  from ilr_jax import tasks

  opts = {k: v for k, v in task_cfg.items() if k not in ('name', 'train_limit', 'test_limit')}
  if opts.get('data_dir') is not None:  # documented: data_dir takes precedence over the hub
    opts.pop('hub_id', None)
    opts.pop('hub_config', None)
  opts = {k: v for k, v in opts.items() if v is not None}
  return tasks.get_task(task_cfg['name'], **opts)


def train_config(tcfg, seed: int, bookkeeping, **extra):
  """train.TrainConfig from a training section of the config (schema.train_section's fields).

  DPO continues the policy's adapter, so its section has no LoRA fields; the DPO stage passes
  the policy's as `extra`.
  """
  from ilr_jax import train

  fields = dict(
    optimizer=tcfg.optimizer,
    lr=tcfg.lr,
    warmup_ratio=tcfg.warmup_frac,
    weight_decay=tcfg.weight_decay,
    epochs=tcfg.epochs,
    global_batch=tcfg.batch_size,
    max_len=tcfg.max_len,
    pad_multiple=tcfg.pad_multiple,
    micro_batch=tcfg.micro_batch,
    seed=seed,
    checkpoint_every=bookkeeping.checkpoint_every,
    log_every=bookkeeping.log_every,
  )
  if 'lora_rank' in tcfg:
    fields.update(lora_rank=tcfg.lora_rank, lora_alpha=tcfg.lora_alpha)
  fields.update(extra)
  return train.TrainConfig(**fields)


def final_metric(result, key: str) -> float | None:
  """A fit's final value of a metric, None when it has none."""
  metrics = getattr(result, 'final_metrics', None) or {}
  value = metrics.get(key)
  return None if value is None else float(value)


class Run:
  """What the stages share: the config, the workdir, the task's data, tokenizers and the mesh."""

  def __init__(self, config, wd):
    from ilr_jax import sharding, tasks, timing

    self.config, self.wd = config, wd
    self.task = timing.wrap_task(make_task(config.task.to_dict()), config)
    self.train = self.task.load('train', config.task.train_limit)
    self.test = self.task.load('test', config.task.test_limit)
    idx_a, idx_b = tasks.split_halves(len(self.train), config.seed)
    self.half_a = [self.train[i] for i in idx_a]
    self.half_b = [self.train[i] for i in idx_b]
    self.mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    self._toks = {}

  def seed(self, stage: str) -> int:
    return stage_seed(self.config.seed, stage)

  def tok(self, role: str):
    from ilr_jax.tokens import Tokenizer

    path = self.config[role].tokenizer
    if path not in self._toks:
      self._toks[path] = Tokenizer.load(path)
    return self._toks[path]

  # -- models ------------------------------------------------------------------------------------

  def base(self, role: str):
    """A fresh copy of a role's base model (no adapter), placed on the mesh."""
    from ilr_jax import convert

    m = self.config[role]
    numerics = dict(dtype=m.dtype, remat=m.remat)
    if m.init == 'pretrain':
      return convert.load_checkpoint(
        self.wd.path(pretrain_stage(role), 'model'), mesh=self.mesh, **numerics
      )
    if m.init == 'checkpoint':
      return convert.load_checkpoint(m.model_dir, mesh=self.mesh, **numerics)
    return convert.load_hf(m.model_dir, mesh=self.mesh, param_dtype=m.param_dtype, **numerics)

  def load(self, stage: str, role: str = 'student'):
    """The model a finished stage trained: its fit's final params on the role's base.

    Only the trainable params are stored per stage (the adapter under LoRA), never a second copy
    of a 7B base.
    """
    from ilr_jax import evaluator, fit

    base = self.base(role)
    if role == 'evaluator':
      base = evaluator.with_score_head(base, mesh=self.mesh)
    return fit.load_params(base, self.wd.path(stage, 'fit', 'final'))

  def save_base(self, model, stage: str) -> None:
    """Save a whole model (a pretrained arith base) as the stage's `model` checkpoint."""
    from ilr_jax import convert

    path = self.wd.path(stage, 'model')
    if path.exists() and is_writer():  # left by an attempt killed before its stage record
      shutil.rmtree(path)
    sync(f'save:{stage}')
    convert.save_checkpoint(model, path)
    sync(f'saved:{stage}')

  # -- model operations --------------------------------------------------------------------------

  def train_config(self, tcfg, stage: str, **extra):
    return train_config(tcfg, self.seed(stage), self.config.fit, **extra)

  def fit(self, stage: str, model, examples, loss: str, config, **options):
    """Train `model` on `examples` with a train.TrainConfig, resumable from the checkpoints
    under `<stage>/fit`."""
    from ilr_jax import fit

    return fit.fit(
      model,
      examples,
      loss=loss,
      config=config,
      workdir=self.wd.path(stage, 'fit'),
      mesh=self.mesh,
      after_save=self.wd.fit_hook(stage),
      **options,
    )

  def sft_examples(self, role: str, questions, answers):
    """SFT examples of the (question, answer) pairs whose answer is a valid label."""
    from ilr_jax.tokens import sft_example

    tok = self.tok(role)
    return [
      sft_example(tok, q, a) for q, a in zip(questions, answers) if self.task.is_valid_label(a)
    ]

  def generate(self, model, role: str, questions, use: str, stage: str, num_samples=None):
    """Answers per question (a list of num_samples texts each) with the task's decoding for
    `use`; `num_samples` overrides the decoding's."""
    from ilr_jax import generate, timing

    d = self.task.decoding[use]
    result = generate.generate_answers(
      model,
      self.tok(role),
      list(questions),
      d.sampler_method(),
      max_new_tokens=d.max_new_tokens,
      num_samples=d.num_samples if num_samples is None else num_samples,
      seed=self.seed(stage + '/' + use),
      batch_size=self.config.sampling.batch_size,
      mesh=self.mesh,
      desc=f'{stage} ({use})',
      scores=False,  # only the texts are used
      **timing.decode_options(self.config),
    )
    return result.texts

  def correct(self, answers, examples) -> list[bool]:
    """Per answer, whether it is right (tasks.Graded.correct)."""
    return self.task.grade_batch(list(answers), list(examples)).correct.tolist()

  def evaluate(self, model, role: str, stage: str) -> dict:
    """Test accuracy of a model (beam search), predictions saved beside the stage's model."""
    questions = [ex.question for ex in self.test]
    preds = [t[0] for t in self.generate(model, role, questions, 'eval', stage)]
    graded = self.task.grade_batch(preds, self.test)
    summary = self.task.summarize(graded.scores, self.test)
    if is_writer():
      write_json(
        self.wd.path(stage, 'test_predictions.json'),
        {
          'ids': [ex.id for ex in self.test],
          'predictions': preds,
          'scores': graded.scores.tolist(),
          'failures': dict(graded.failures),
        },
      )
    return {'test_accuracy': float(np.mean(graded.scores)), 'test_summary': summary}

  def scorer(self, feedback: str, stage: str):
    """The Scorer of a comparing feedback source (methods.COMPARING) for a stage (feedback.py)."""
    from ilr_jax import feedback as feedback_lib

    return feedback_lib.make(self, feedback, stage)


def pretrain_stage(role: str) -> str:
  """The stage that pretrains a role's base (arith); the evaluator shares the supervisor's."""
  return 'pretrain/supervisor' if role == 'evaluator' else f'pretrain/{role}'
