"""The pairwise evaluator: the classifier's prompts, its training, and P(proposal better) scorers.

METHOD.md "Evaluator data and training". The evaluator simulates unreliable comparison feedback;
ILR and SFT+DPO both consume it through one interface, `Scorer`:

  scores = scorer(questions, currents, proposals)   # float64[N], P(proposal better than current)

Two scorers implement it: `EvaluatorScorer` (a trained 2-class score-head model) and
`OracleScorer` (ground-truth grading, the `ora` variants). The trained one comes from:

  data, counts = evaluator_data.build_comparison_data(load_base, snapshots, tok, task, half_a, ...)
  model, result = train_evaluator(with_score_head(load_base()), tok, data, workdir=..., config=...)
  scorer = EvaluatorScorer(model, tok)

`train_evaluator` runs fit.py's classifier loop with per-epoch validation loss, early stopping and
the best epoch restored, then reports validation accuracy per example and per pair
(`validation_metrics`: pairs whose two sides are the same text are left out, a tie is half a hit).

Token convention of a comparison prompt: `[BOS] + tok.encode(comparison_prompt(q, a, b))`, with
no SFT template around it (the evaluator is a classifier, not a chat model). Training examples and
scored prompts are tokenized by the same function, `comparison_ids`.

Too-long prompts: every prompt must fit `max_len` tokens (default: the model's
`max_position_embeddings`). With `too_long='error'` (default) a longer prompt is a one-line error
naming its length. With `too_long='truncate'` the tails of the two answers are cut, the longer
answer first, until the prompt fits; the question and the closing instruction are never cut, since
the score is read at the prompt's last token, right after the instruction. Both orders of a pair
use the same cut answers. The number of truncated pairs is logged.

Two-order score: for a pair (current A, proposal B) the scorer runs both prompts, (A, B) and
(B, A), in the same device call and returns mean(P(accept | A, B), P(reject | B, A)). Since a
softmax over 2 classes gives P(reject) = 1 - P(accept), score(A, B) + score(B, A) = 1 up to float
rounding. `swap_second_order=False` is the released DPO code's mistake, kept only as an explicit
ablation: the second prompt is again (A, B), so every score is 0.5 up to rounding.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx
from jax.sharding import Mesh

from ilr_jax import fit, train
from ilr_jax import sharding as shd
from ilr_jax import workdir as wd
from ilr_jax.comparisons import ACCEPT, REJECT, comparison_prompt, same_text
from ilr_jax.feedback_metrics import preference_hits
from ilr_jax.model import Decoder
from ilr_jax.tokens import Tokenizer, encode_with_bos, pad_batch

log = logging.getLogger(__name__)

TOO_LONG = ('error', 'truncate')


# -- the interface -----------------------------------------------------------------------------


class Scorer(Protocol):
  """Comparison feedback: P(proposal better than current) for each (question, current, proposal)."""

  def __call__(
    self, questions: Sequence[str], currents: Sequence[str], proposals: Sequence[str]
  ) -> np.ndarray:
    """float64[N] in [0, 1]."""
    ...


def _check_triples(questions, currents, proposals) -> None:
  if not len(questions) == len(currents) == len(proposals):
    raise ValueError(
      f'got {len(questions)} questions, {len(currents)} currents and {len(proposals)} proposals; '
      'they must have the same length'
    )


# -- tokens of a comparison prompt -------------------------------------------------------------


def comparison_ids(tok: Tokenizer, question: str, a: str, b: str) -> list[int]:
  """[BOS] + the comparison prompt "change answer (A) to (B)?"; the one tokenization of it."""
  return encode_with_bos(tok, comparison_prompt(question, a, b))


def fit_pair(
  tok: Tokenizer, question: str, a: str, b: str, max_len: int, too_long: str = 'error'
) -> tuple[list[int], list[int], bool]:
  """Token ids of both orders of a pair, (A, B) and (B, A), each at most `max_len` long.

  Returns:
    (ids of (A, B), ids of (B, A), whether the answers were truncated). See the module docstring
    for `too_long`.
  """
  if too_long not in TOO_LONG:
    raise ValueError(f'too_long must be one of {TOO_LONG}, got {too_long!r}')
  ab, ba = comparison_ids(tok, question, a, b), comparison_ids(tok, question, b, a)
  if max(len(ab), len(ba)) <= max_len:
    return ab, ba, False
  if too_long == 'error':
    raise ValueError(
      f'a comparison prompt has {max(len(ab), len(ba))} tokens, more than max_len={max_len} '
      f"(question starts {question[:40]!r}); raise max_len or pass too_long='truncate'"
    )
  a_ids, b_ids = tok.encode(a), tok.encode(b)
  while max(len(ab), len(ba)) > max_len:
    excess = max(len(ab), len(ba)) - max_len
    if not a_ids and not b_ids:
      raise ValueError(
        f'the question alone makes a comparison prompt of {len(ab)} tokens, more than '
        f'max_len={max_len} (question starts {question[:40]!r})'
      )
    # Cut the longer answer; the decode/encode round trip may shift a token, so re-measure.
    if len(a_ids) >= len(b_ids):
      a_ids = a_ids[: max(0, len(a_ids) - excess)]
    else:
      b_ids = b_ids[: max(0, len(b_ids) - excess)]
    a, b = tok.decode(a_ids), tok.decode(b_ids)
    ab, ba = comparison_ids(tok, question, a, b), comparison_ids(tok, question, b, a)
  return ab, ba, True


def encode_examples(
  tok: Tokenizer, rows: Sequence[Mapping[str, Any]], max_len: int, too_long: str = 'error'
) -> tuple[list[list[int]], np.ndarray]:
  """Token ids and int32 labels of classification rows {question, a, b, label} (as the scorer
  tokenizes, truncation included, so training and scoring see the same prompts)."""
  ids, cut = [], 0
  for r in rows:
    ab, _, was_cut = fit_pair(tok, r['question'], r['a'], r['b'], max_len, too_long)
    ids.append(ab)
    cut += was_cut
  if cut:
    log.warning('truncated the answers of %d of %d examples to max_len=%d', cut, len(ids), max_len)
  return ids, np.asarray([r['label'] for r in rows], np.int32)


# -- the model scorer --------------------------------------------------------------------------


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def with_score_head(
  model: Decoder,
  num_labels: int = 2,
  *,
  seed: int = 0,
  mesh: Mesh | None = None,
  rules=shd.TRAIN_RULES,
) -> Decoder:
  """The evaluator's starting point: `model`'s trunk with a fresh `num_labels`-class score head.

  The trunk's arrays are reused, not copied; an LM head is dropped. The head is initialised as
  HF's `*ForSequenceClassification` does (normal, std 0.02) from `seed` and placed by `rules` on
  `mesh` (default: the model's mesh). For an HF causal-LM directory:
  `with_score_head(convert.load_hf(dir, mesh=mesh))`.
  """
  if model.cfg.num_labels:
    raise ValueError(f'model already has a {model.cfg.num_labels}-class score head')
  cfg = model.cfg.replace(num_labels=num_labels)
  mesh = shd.model_mesh(model, mesh)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(seed))))
  shardings = dict(nnx.to_flat_state(shd.state_shardings(abstract, mesh, rules)))
  source = dict(nnx.to_flat_state(nnx.state(model)))
  flat = {}
  for path, var in nnx.to_flat_state(abstract):
    if path in source:
      value = source[path][...]
    else:
      kernel = 0.02 * jax.random.normal(jax.random.key(seed), var.shape, jnp.float32)
      value = jax.device_put(kernel.astype(var.dtype), shardings[path])
    flat[path] = var.replace(value)
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


class EvaluatorScorer:
  """P(proposal better than current) from a 2-class score-head Decoder, both orders, batched.

  The model's state is placed once by `rules` on `mesh` (a no-op when it already lives there) and
  the forward pass is jitted with explicit shardings: rows over the mesh's batch axes, parameters
  by their logical names, class probabilities replicated. A device call holds `batch_size` pairs,
  both orders of each, i.e. 2 x batch_size rows (rounded up so that the batch shards divide them).
  Pairs are sorted by length and each batch is right-padded to a multiple of `bucket` tokens, so
  the function compiles once per bucket length; results go back to the caller's order. A row's
  probabilities depend neither on the other rows of its batch nor on its padding (positions come
  from the mask), so batching changes no score.

  Args:
    model: a Decoder with `cfg.num_labels == 2` (index REJECT = 0, ACCEPT = 1).
    tok: the tokenizer the evaluator was trained with.
    batch_size: pairs per device call.
    bucket: padded lengths are multiples of this.
    max_len: the longest allowed prompt (default: the model's max_position_embeddings).
    too_long: 'error' or 'truncate' (module docstring).
    swap_second_order: False reproduces the released DPO code's unswapped second prompt (every
      score 0.5); an ablation only.
    mesh: where to run (default: the mesh the model lives on).
    rules: logical-axis rules for the parameters.
    progress: show a progress bar.
  """

  def __init__(
    self,
    model: Decoder,
    tok: Tokenizer,
    *,
    batch_size: int = 16,
    bucket: int = 64,
    max_len: int | None = None,
    too_long: str = 'error',
    swap_second_order: bool = True,
    mesh: Mesh | None = None,
    rules=shd.TRAIN_RULES,
    progress: bool = True,
  ):
    if model.cfg.num_labels != 2:
      raise ValueError(
        f'the evaluator needs a 2-class score head, got num_labels={model.cfg.num_labels}'
      )
    if batch_size < 1 or bucket < 1:
      raise ValueError(f'batch_size and bucket must be >= 1, got {batch_size} and {bucket}')
    if too_long not in TOO_LONG:
      raise ValueError(f'too_long must be one of {TOO_LONG}, got {too_long!r}')
    self.tok = tok
    self.batch_size = batch_size
    self.bucket = bucket
    self.max_len = max_len or model.cfg.max_position_embeddings
    self.too_long = too_long
    self.swap_second_order = swap_second_order
    self.progress = progress
    self.mesh = shd.model_mesh(model, mesh)
    self.rows = _round_up(2 * batch_size, shd.batch_size_multiple(self.mesh))
    graphdef, state = nnx.split(model)
    state_sh = shd.state_shardings(state, self.mesh, rules)
    self.state = jax.device_put(state, state_sh)
    self._rows = shd.batch_sharding(self.mesh, 2)

    def logits(state, tokens_BT, mask_BT):
      return nnx.merge(graphdef, state).score(tokens_BT, mask_BT)

    def probs(state, tokens_BT, mask_BT):
      return jax.nn.softmax(logits(state, tokens_BT, mask_BT), axis=-1)

    rows, rep = self._rows, shd.replicated(self.mesh)
    self._logits = jax.jit(logits, in_shardings=(state_sh, rows, rows), out_shardings=rows)
    self._probs = jax.jit(probs, in_shardings=(state_sh, rows, rows), out_shardings=rep)

  def place(self, x_BT: np.ndarray | jax.Array) -> jax.Array:
    """A host [B, T] int array placed with the rows' sharding (a placed array is left as is)."""
    if isinstance(x_BT, jax.Array):
      return x_BT
    return shd.put(np.asarray(x_BT, np.int32), self._rows)

  def classify(
    self, tokens_BT: np.ndarray | jax.Array, mask_BT: np.ndarray | jax.Array
  ) -> jax.Array:
    """Score-head logits [B, 2] (float32) of a right- or left-padded batch, on the device.

    Takes host arrays or arrays from `place`; B must be a multiple of the mesh's batch shards.
    """
    n = shd.batch_size_multiple(self.mesh)
    if tokens_BT.shape != mask_BT.shape or tokens_BT.ndim != 2 or tokens_BT.shape[0] % n:
      raise ValueError(
        f'tokens {tokens_BT.shape} and mask {mask_BT.shape} must be equal [B, T] with B a '
        f'multiple of {n}'
      )
    return self._logits(self.state, self.place(tokens_BT), self.place(mask_BT))

  def tokenize(
    self, questions: Sequence[str], currents: Sequence[str], proposals: Sequence[str]
  ) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of the (current, proposal) and the second-order prompt of every pair."""
    _check_triples(questions, currents, proposals)
    firsts, seconds, cut = [], [], 0
    for q, cur, prop in zip(questions, currents, proposals):
      ab, ba, was_cut = fit_pair(self.tok, q, cur, prop, self.max_len, self.too_long)
      firsts.append(ab)
      seconds.append(ba if self.swap_second_order else ab)
      cut += was_cut
    if cut:
      log.warning(
        'truncated the answers of %d of %d pairs to fit max_len=%d', cut, len(firsts), self.max_len
      )
    return firsts, seconds

  def _run(self, seqs: Sequence[Sequence[int]], groups: list[np.ndarray]) -> np.ndarray:
    """Class probabilities [len(seqs), 2] (float64), one device call per group of row indices."""
    out = np.zeros((len(seqs), 2), np.float64)
    if min((len(s) for s in seqs), default=1) == 0:
      raise ValueError('an empty prompt cannot be scored')
    start, tokens_seen = time.perf_counter(), 0
    pending = None  # one call in flight while the host pads the next batch

    def collect(item):
      idx, result = item
      out[idx] = np.asarray(result)[: len(idx)]

    for idx in tqdm.tqdm(groups, desc='evaluator', unit='batch', disable=not self.progress):
      length = _round_up(max(len(seqs[i]) for i in idx), self.bucket)
      # Filler rows hold one padding token, so that no row is empty; their results are dropped.
      rows = [seqs[i] for i in idx] + [[self.tok.pad_id]] * (self.rows - len(idx))
      tokens, mask = pad_batch(rows, length=length, pad_id=self.tok.pad_id)
      tokens_seen += tokens.size
      result = self._probs(self.state, self.place(tokens), self.place(mask))
      if pending is not None:
        collect(pending)
      pending = (idx, result)
    if pending is not None:
      collect(pending)
    elapsed = time.perf_counter() - start
    if groups:
      log.info(
        'evaluator: %d prompts in %.1f s (%.1f prompts/s, %.0f padded tokens/s, %d batches)',
        len(seqs),
        elapsed,
        len(seqs) / elapsed,
        tokens_seen / elapsed,
        len(groups),
      )
    return out

  def accept_probs(self, seqs: Sequence[Sequence[int]]) -> np.ndarray:
    """float64[N]: P(accept) of each token-id prompt on its own (for validation accuracy)."""
    order = np.argsort([-len(s) for s in seqs], kind='stable')
    groups = [order[i : i + self.rows] for i in range(0, len(seqs), self.rows)]
    return self._run(seqs, groups)[:, ACCEPT]

  def score_ids(
    self, firsts: Sequence[Sequence[int]], seconds: Sequence[Sequence[int]]
  ) -> np.ndarray:
    """float64[N]: mean(P(accept | firsts[i]), P(reject | seconds[i])), both in one batch."""
    if len(firsts) != len(seconds):
      raise ValueError(f'{len(firsts)} first-order prompts but {len(seconds)} second-order ones')
    n = len(firsts)
    lengths = [max(len(a), len(b)) for a, b in zip(firsts, seconds)]
    order = np.argsort([-x for x in lengths], kind='stable')  # longest first: memory peaks early
    groups = []
    for i in range(0, n, self.batch_size):
      chunk = order[i : i + self.batch_size]
      groups.append(np.concatenate([chunk, n + chunk]))
    p = self._run(list(firsts) + list(seconds), groups)
    return 0.5 * (p[:n, ACCEPT] + p[n:, REJECT])

  def __call__(
    self, questions: Sequence[str], currents: Sequence[str], proposals: Sequence[str]
  ) -> np.ndarray:
    """float64[N]: P(proposal better than current) = mean(P(accept | cur, prop),
    P(reject | prop, cur))."""
    return self.score_ids(*self.tokenize(questions, currents, proposals))


# -- training --------------------------------------------------------------------------------


def validation_metrics(scorer: EvaluatorScorer, rows: Sequence[Mapping[str, Any]]) -> dict:
  """Accuracy of the evaluator on classification rows {question, a, b, label, kind}.

  A pair is a REJECT row (a better than b) whose swapped ACCEPT row is present. Pairs whose two
  sides are the same text (after .strip()) have no better side: their rows are left out of every
  accuracy and not scored, the pairs counted in `val_pairs_identical`. Ties are half a hit
  (feedback_metrics.preference_hits), never an error.

  Returns:
    val_examples: rows scored, i.e. the rows of distinct answers.
    val_accuracy: each such row alone, right when P(accept) > 0.5 iff its label is ACCEPT (half
      at exactly 0.5).
    val_pairs: distinct pairs scored; val_pairs_identical: pairs of the same text, left out.
    val_pair_accuracy: each distinct pair by the two-order score, i.e. how often the evaluator
      ranks the better answer above the worse one (half at exactly 0.5); also per pair kind as
      `val_pair_accuracy/<kind>`.
  """
  rows = list(rows)
  distinct = [r for r in rows if not same_text(r['a'], r['b'])]
  p_accept = np.zeros(0, np.float64)
  if distinct:
    ids, _ = encode_examples(scorer.tok, distinct, scorer.max_len, scorer.too_long)
    p_accept = np.asarray(scorer.accept_probs(ids), np.float64)
  is_accept = np.asarray([r['label'] == ACCEPT for r in distinct], bool)
  example_hits = preference_hits(p_accept, is_accept)  # s = P(accept): "b better than a"
  metrics = dict(
    val_examples=len(distinct),
    val_accuracy=float(example_hits.mean()) if distinct else float('nan'),
  )
  p_of_accept_row = {
    (r['question'], r['a'], r['b']): p for r, p in zip(distinct, p_accept) if r['label'] == ACCEPT
  }
  accept_rows = {(r['question'], r['a'], r['b']) for r in rows if r['label'] == ACCEPT}
  identical = sum(
    r['label'] == REJECT
    and same_text(r['a'], r['b'])
    and (r['question'], r['b'], r['a']) in accept_rows
    for r in rows
  )
  kinds, worse_better = [], []  # per pair: its kind, P(worse better than better) in both orders
  for r, p in zip(distinct, p_accept):
    swapped = p_of_accept_row.get((r['question'], r['b'], r['a']))
    if r['label'] == REJECT and swapped is not None:
      kinds.append(r.get('kind', 'all'))
      worse_better.append(0.5 * (p + (1.0 - swapped)))
  # The better answer is the first side (a) of a REJECT row: right when the score is < 0.5.
  hits = preference_hits(np.asarray(worse_better, np.float64), np.zeros(len(kinds), bool))
  metrics['val_pairs'] = len(kinds)
  metrics['val_pairs_identical'] = identical
  metrics['val_pair_accuracy'] = float(hits.mean()) if kinds else float('nan')
  for kind in sorted(set(kinds)):
    metrics[f'val_pair_accuracy/{kind}'] = float(hits[np.asarray(kinds) == kind].mean())
  return metrics


def train_evaluator(
  model: Decoder,
  tok: Tokenizer,
  data: Mapping[str, Sequence[Mapping[str, Any]]],
  *,
  workdir: str | os.PathLike,
  config: train.TrainConfig,
  patience: int | None = 1,
  max_len: int | None = None,
  too_long: str = 'error',
  mesh: Mesh | None = None,
  score_batch_size: int = 16,
  progress: bool = True,
) -> tuple[Decoder, fit.FitResult]:
  """Train the 2-class evaluator on comparison data; the best validation epoch's params win.

  Runs `fit.fit(loss='classifier')` on the 'train' rows, with the mean validation loss after each
  epoch and early stopping after `patience` epochs without improvement (None: all epochs); the
  best epoch's params are restored. Resumable through `workdir` (fit.py's layout).

  Args:
    model: a Decoder with a 2-class score head (`with_score_head(base)`); its buffers may be
      donated to training, so use the returned model.
    tok: the tokenizer; prompts are `comparison_ids` (truncated per `too_long`).
    data: {'train': rows, 'validation': rows} as `comparison_dataset` makes them.
    config: the TrainConfig (the pipeline's evaluator_train section: full fine-tune, AdamW lr
      1e-6, batch 16, up to 5 epochs); max_len, if given, overrides its max_len.

  Returns:
    (the trained model, fit's FitResult whose final_metrics also hold `validation_metrics`:
    val_accuracy, val_pair_accuracy (overall and per kind) and val_loss, the best epoch's).
  """
  if model.cfg.num_labels != 2:
    raise ValueError(
      f'the evaluator needs a 2-class score head, got num_labels={model.cfg.num_labels}'
    )
  max_len = max_len or config.max_len
  config = config.replace(max_len=max_len)
  val_rows = list(data['validation'])
  if patience is not None and not val_rows:
    raise ValueError('early stopping needs validation rows; the comparison data has none')
  train_ids, train_labels = encode_examples(tok, data['train'], max_len, too_long)
  val_ids, val_labels = encode_examples(tok, val_rows, max_len, too_long)
  model, result = fit.fit(
    model,
    list(zip(train_ids, train_labels.tolist())),
    loss='classifier',
    config=config,
    workdir=workdir,
    mesh=mesh,
    val_examples=list(zip(val_ids, val_labels.tolist())) or None,
    early_stopping_patience=patience,
    progress=progress,
  )
  metrics = {}
  if val_rows:
    scorer = EvaluatorScorer(
      model,
      tok,
      batch_size=score_batch_size,
      max_len=max_len,
      too_long=too_long,
      mesh=mesh,
      progress=progress,
    )
    metrics = validation_metrics(scorer, val_rows)
    metrics['val_loss'] = min(result.val_losses) if result.val_losses else float('nan')
    log.info('evaluator validation: %s', metrics)
  if wd.is_writer():
    wd.write_json(pathlib.Path(workdir) / 'evaluator_metrics.json', metrics)
  result = dataclasses.replace(result, final_metrics={**result.final_metrics, **metrics})
  return model, result


# -- the oracle scorer -------------------------------------------------------------------------


class OracleScorer:
  """Reliable comparison feedback for the `ora` variants: the proposal's ground-truth grade.

  The score is the task's grade of the proposal against the question's reference: 1.0 / 0.0 for
  exact-match tasks (GSM8K, arith, BIRD), the judge's win probability for SaferPaca. It does not
  look at the current answer (as the released code; refine.oracle_replace thresholds it at 0.5).

  Args:
    task: a tasks.Task.
    references: the Examples of the questions that may be scored (BIRD needs Examples: they name
      the database), or a mapping question -> Example or reference text.
  """

  def __init__(self, task: Any, references: Sequence[Any] | Mapping[str, Any]):
    self.task = task
    if isinstance(references, Mapping):
      self.references = dict(references)
    else:
      self.references = {}
      for ex in references:
        known = self.references.setdefault(ex.question, ex)
        if known.answer != ex.answer:
          raise ValueError(f'two references disagree for question {ex.question[:60]!r}')

  def __call__(
    self, questions: Sequence[str], currents: Sequence[str], proposals: Sequence[str]
  ) -> np.ndarray:
    """float64[N]: the grade of each proposal (the currents are not used)."""
    _check_triples(questions, currents, proposals)
    missing = [q for q in questions if q not in self.references]
    if missing:
      raise ValueError(
        f'the oracle has no reference for {len(missing)} question(s), e.g. {missing[0][:60]!r}'
      )
    graded = self.task.grade_batch(list(proposals), [self.references[q] for q in questions])
    if graded.failures:
      log.info('oracle grading: %s', dict(graded.failures))
    return np.asarray(graded.scores, np.float64)
