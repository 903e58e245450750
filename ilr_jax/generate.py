"""Generation over any list of prompts, and the `python -m ilr_jax.generate` command.

The driver sorts prompts by length and cuts them into batches of a fixed set of shapes: a prompt is
left-padded to the smallest bucket length that holds it (powers of two by default) and a batch has
`batch_size` prompts, or for a bucket's last, partial batch the next power of two (a multiple of
the mesh's batch shards), filled with one-token dummy prompts. So a run compiles at most
(#buckets x log2(batch_size)) shapes, each once per process, whatever the prompts.

Every prompt's randomness depends only on (seed, its index in the input list), so results do not
depend on the batching. Outputs come back in input order. Multi-host: every process calls
`generate` with the same prompts; arrays are sharded over the mesh and the results gathered.

Command (an HF directory or one of our checkpoints; prompts are questions put into the prompt
template unless --raw):
  python -m ilr_jax.generate --model=DIR --prompt="What is 2+3?" --method=beam --num_beams=4
  python -m ilr_jax.generate --model=DIR --prompts_file=questions.txt --method=sample \\
      --temperature=0.7 --num_samples=6
It prints one JSON line per prompt: {"prompt", "outputs", "scores"}.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence

import jax
import numpy as np

from ilr_jax import sharding as shd
from ilr_jax import tokens as tokens_lib
from ilr_jax.decoding import GREEDY, Method, method_from_name
from ilr_jax.model import Decoder
from ilr_jax.sampler import Sampler

DEFAULT_BUCKETS = tuple(2**k for k in range(4, 15))  # 16 .. 16384 prompt tokens


@dataclasses.dataclass(frozen=True)
class GenerationResult:
  """Per prompt, in input order, a list of its answers: `x[i][j]` is answer j of prompt i, with
  j < num_samples (one answer, the best beam, under beam search), whatever num_samples is."""

  ids: list[list[list[int]]]  # new token ids before the first stop token
  texts: list[list[str]] | None  # decoded ids, special tokens dropped (None without a tokenizer)
  scores: list[list[float]] | None  # sum of log-probs, or the beam score (None if not asked)
  stopped: list[list[bool]]  # ended by a stop token (not cut by max_new_tokens)


@dataclasses.dataclass(frozen=True)
class Batch:
  """Prompts `indices` (into the input list) padded to `batch` rows of `length` tokens."""

  indices: tuple[int, ...]
  length: int
  batch: int


def _pow2_at_least(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def plan_batches(
  lengths: Sequence[int], batch_size: int, buckets: Sequence[int], row_multiple: int = 1
) -> list[Batch]:
  """Sort prompts by length and cut them into batches of bucketed shapes (longest first, so a
  progress bar's rate is pessimistic and memory peaks at the start)."""
  if batch_size < 1 or batch_size % row_multiple:
    raise ValueError(f'batch_size={batch_size} must be a positive multiple of {row_multiple}')
  buckets = sorted(set(int(b) for b in buckets))
  if not buckets or buckets[0] < 1:
    raise ValueError(f'buckets must be positive lengths, got {buckets}')
  by_bucket: dict[int, list[int]] = {}
  for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
    n = lengths[i]
    if n < 1:
      raise ValueError(f'prompt {i} is empty; a prompt needs at least one token (BOS)')
    fit = [b for b in buckets if b >= n]
    if not fit:
      raise ValueError(f'prompt {i} has {n} tokens, more than the largest bucket {buckets[-1]}')
    by_bucket.setdefault(fit[0], []).append(i)
  plan = []
  for length in sorted(by_bucket, reverse=True):
    idx = by_bucket[length]
    for start in range(0, len(idx), batch_size):
      chunk = tuple(idx[start : start + batch_size])
      rows = min(batch_size, max(_pow2_at_least(len(chunk)), row_multiple))
      rows = -(-rows // row_multiple) * row_multiple
      plan.append(Batch(chunk, length, rows))
  return plan


def default_stop_ids(model_cfg, tokenizer) -> tuple[int, ...]:
  """The tokenizer's EOS and the model config's EOS ids."""
  ids = set(model_cfg.eos_token_ids)
  if tokenizer is not None:
    ids.add(tokenizer.eos_id)
  return tuple(sorted(ids))


def encode_prompts(tokenizer, prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
  """Token ids of already formatted prompts: a string becomes [BOS] + encode(string) (the
  tokens.prompt_ids convention); a list of ids is used as it is."""
  out = []
  for i, p in enumerate(prompts):
    if isinstance(p, str):
      if tokenizer is None:
        raise ValueError(f'prompt {i} is a string, but no tokenizer was given')
      out.append(tokenizer.encode_with_bos(p))
    else:
      out.append([int(t) for t in p])
  return out


def generate(
  model: Decoder | Sampler,
  tokenizer,
  prompts: Sequence[str] | Sequence[Sequence[int]],
  method: Method = GREEDY,
  *,
  max_new_tokens: int,
  num_samples: int = 1,
  seed: int = 0,
  batch_size: int = 64,
  buckets: Sequence[int] = DEFAULT_BUCKETS,
  mesh=None,
  stop_ids: Sequence[int] | None = None,
  pad_id: int | None = None,
  desc: str = 'generate',
  progress: bool = True,
  scores: bool = True,
) -> GenerationResult:
  """Generate for every prompt; results in input order.

  Args:
    model: a Decoder (placed for decoding on `mesh`) or a Sampler (reused as it is).
    tokenizer: a tokens.Tokenizer, or None when prompts are ids and no texts are wanted.
    prompts: formatted prompt strings, or token id lists (used as they are).
    method: Greedy(), Sample(...) or BeamSearch(...).
    max_new_tokens: the most new tokens per answer.
    num_samples: answers per prompt (sampling); beam search returns its best beam.
    seed: with the prompt's input index, the only source of a prompt's randomness.
    batch_size: prompts per call (each expands to num_samples or num_beams cache rows).
    buckets: allowed padded prompt lengths.
    stop_ids: tokens that end an answer; default the tokenizer's and the model's EOS.
    pad_id: id written on padding; default the tokenizer's pad id (else the model's, else 0).
    desc, progress: the progress bar's label, and whether to show it (process 0 only).
    scores: sum each answer's log-probs (greedy and sampling; beam search always scores);
      without them `GenerationResult.scores` is None and each step skips a logsumexp.
  """
  sampler = model if isinstance(model, Sampler) else Sampler(model, mesh=mesh)
  cfg = sampler.cfg
  ids = encode_prompts(tokenizer, prompts)
  if stop_ids is None:
    stop_ids = default_stop_ids(cfg, tokenizer)
  if pad_id is None:
    pad_id = tokenizer.pad_id if tokenizer is not None else (cfg.pad_token_id or 0)
  plan = plan_batches([len(p) for p in ids], batch_size, buckets, sampler.row_multiple)
  n = num_samples
  out_ids: list = [None] * len(ids)
  out_scores: list = [None] * len(ids)
  out_stopped: list = [None] * len(ids)
  scored = scores  # the sampler's answer: beam search scores its beams either way
  from tqdm import tqdm

  bar = tqdm(
    total=len(ids), desc=desc, unit='prompt', disable=not progress or jax.process_index() != 0
  )
  for batch in plan:
    rows = [ids[i] for i in batch.indices]
    # Dummy rows (one token) fill a partial batch; their row id -1 is never a prompt's.
    rows += [[pad_id]] * (batch.batch - len(rows))
    toks, mask = tokens_lib.pad_batch(rows, length=batch.length, side='left', pad_id=pad_id)
    row_ids = np.full((batch.batch,), -1, np.int32)
    row_ids[: len(batch.indices)] = batch.indices
    res = sampler(
      toks,
      mask,
      method,
      max_new_tokens=max_new_tokens,
      num_samples=n,
      stop_ids=tuple(stop_ids),
      pad_id=pad_id,
      seed=seed,
      row_ids=row_ids,
      scores=scores,
    )
    scored = res.scores is not None
    for r, i in enumerate(batch.indices):
      seqs, row_scores, stopped = [], [], []
      for j in range(res.tokens.shape[1]):
        length = int(res.lengths[r, j])
        stop = bool(res.stopped[r, j])
        seqs.append([int(t) for t in res.tokens[r, j, : length - 1 if stop else length]])
        row_scores.append(float(res.scores[r, j]) if scored else None)
        stopped.append(stop)
      out_ids[i], out_scores[i], out_stopped[i] = seqs, row_scores, stopped
    bar.update(len(batch.indices))
  bar.close()
  texts = None
  if tokenizer is not None:
    texts = [[tokenizer.decode(s) for s in x] for x in out_ids]
  return GenerationResult(
    ids=out_ids,
    texts=texts,
    scores=out_scores if scored else None,
    stopped=out_stopped,
  )


def generate_answers(model, tokenizer, questions: Sequence[str], method: Method = GREEDY, **kw):
  """`generate` on the prompts `tokens.prompt_ids(tokenizer, q)` of raw questions.

  The texts are answers: stripped of surrounding whitespace, as the released code strips every
  generated text before grading or storing it (`ids` keep every generated token).
  """
  prompts = [tokens_lib.prompt_ids(tokenizer, q) for q in questions]
  result = generate(model, tokenizer, prompts, method, **kw)
  if result.texts is None:
    return result
  texts = [t.strip() if isinstance(t, str) else [s.strip() for s in t] for t in result.texts]
  return dataclasses.replace(result, texts=texts)


# -- command line ------------------------------------------------------------------------------


def method_from_flags(f) -> Method:
  """The decoding method of --method and the flags of its fields."""
  return method_from_name(
    f.method,
    temperature=f.temperature,
    top_k=f.top_k,
    top_p=f.top_p,
    num_beams=f.num_beams,
    length_penalty=f.length_penalty,
    early_stopping={'true': True, 'false': False, 'never': 'never'}[f.early_stopping],
  )


def main(argv) -> None:
  from absl import flags

  from ilr_jax import convert

  f = flags.FLAGS
  if len(argv) > 1:
    raise SystemExit(f'generate: unexpected arguments {argv[1:]}')
  prompts = list(f.prompt or [])
  if f.prompts_file:
    path = pathlib.Path(f.prompts_file)
    if not path.is_file():
      raise SystemExit(f'generate: --prompts_file {path} does not exist')
    lines = path.read_text().splitlines()
    if not any(line.strip() for line in lines):
      raise SystemExit(f'generate: --prompts_file {path} holds no prompt (one per line)')
    prompts += [line for line in lines if line.strip()]
  if not prompts:
    raise SystemExit('generate: give --prompt (repeatable) or --prompts_file')
  # Decoding arguments before the model loads (minutes for a big one).
  for name in ('max_new_tokens', 'num_samples', 'batch_size'):
    if getattr(f, name) < 1:
      raise SystemExit(f'generate: --{name} must be >= 1, got {getattr(f, name)}')
  try:
    method = method_from_flags(f)
  except ValueError as e:
    raise SystemExit(f'generate: bad decoding arguments: {e}') from None
  mesh = shd.make_mesh(f.mesh_data, f.mesh_fsdp, f.mesh_tensor)
  overrides = {'dtype': f.dtype} if f.dtype else {}
  try:
    model = convert.load_model(f.model, mesh=mesh, rules=shd.DECODE_RULES, **overrides)
  except (convert.CheckpointError, convert.ArtifactError) as e:
    raise SystemExit(f'generate: {e}') from None
  tok = tokens_lib.Tokenizer.load(f.tokenizer or f.model)
  texts = prompts if f.raw else [tokens_lib.prompt_text(q) for q in prompts]
  result = generate(
    model,
    tok,
    texts,
    method,
    max_new_tokens=f.max_new_tokens,
    num_samples=f.num_samples,
    seed=f.seed,
    batch_size=f.batch_size,
    mesh=mesh,
  )
  if jax.process_index() == 0:
    for p, outputs, scores in zip(prompts, result.texts, result.scores):
      print(json.dumps({'prompt': p, 'outputs': outputs, 'scores': scores}, ensure_ascii=False))


if __name__ == '__main__':
  from absl import app, flags

  from ilr_jax.decoding import METHODS

  flags.DEFINE_string(
    'model', None, 'an HF model directory or one of our checkpoints', required=True
  )
  flags.DEFINE_string('tokenizer', None, 'tokenizer path (default: the model directory)')
  flags.DEFINE_multi_string('prompt', None, 'a question (or a raw prompt with --raw); repeatable')
  flags.DEFINE_string('prompts_file', None, 'a text file with one question per line')
  flags.DEFINE_bool('raw', False, 'use prompts as they are instead of the USER/ASSISTANT template')
  flags.DEFINE_enum('method', 'greedy', list(METHODS), 'decoding method')
  flags.DEFINE_integer('max_new_tokens', 256, 'the most new tokens per answer')
  flags.DEFINE_float('temperature', 1.0, 'sampling temperature')
  flags.DEFINE_integer('top_k', 0, 'sample among the k most likely tokens (0: all)')
  flags.DEFINE_float('top_p', 1.0, 'nucleus sampling mass (1.0: off)')
  flags.DEFINE_integer('num_samples', 1, 'answers per prompt (sampling)')
  flags.DEFINE_integer('num_beams', 4, 'beams (beam search)')
  flags.DEFINE_float('length_penalty', 1.0, 'beam score = sum log-probs / length ** this')
  flags.DEFINE_enum('early_stopping', 'false', ['false', 'true', 'never'], "transformers' rule")
  flags.DEFINE_integer('seed', 0, 'sampling seed')
  flags.DEFINE_integer('batch_size', 64, 'prompts per compiled call')
  flags.DEFINE_string('dtype', None, 'compute dtype override (float32, bfloat16)')
  flags.DEFINE_integer('mesh_data', -1, 'mesh data axis (-1: all devices)')
  flags.DEFINE_integer('mesh_fsdp', 1, 'mesh fsdp axis')
  flags.DEFINE_integer('mesh_tensor', 1, 'mesh tensor axis')
  app.run(main)
