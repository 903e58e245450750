"""Training examples of each loss: what a fit is given, how it is checked, and the batch it makes.

One table, FORMATS, holds per loss the batch keys (with their number of dimensions) that the
loss in train.py reads and the fit loop shards, so the example, the batch and the loss agree:
  sft:        (ids, loss_mask) pairs (`tokens.sft_example`) -> tokens, mask, loss_mask [B, T]
  dpo:        `DpoPair`s with reference log-probs (`dpo_example`, then
              fit.with_reference_logps) -> chosen_/rejected_ tokens, mask, loss_mask [B, T] and
              ref_chosen_logps, ref_rejected_logps [B]
  classifier: (ids, label) pairs -> tokens, mask [B, T] and labels [B]
Batches are right-padded to a multiple of pad_multiple (at most max_len); rows beyond the
examples are empty (all-zero masks) and weigh nothing in any loss.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from ilr_jax.tokens import Tokenizer, pad_batch, sft_example

_TOKENS = {'tokens': 2, 'mask': 2}
FORMATS = {
  'sft': {**_TOKENS, 'loss_mask': 2},
  'dpo': {
    'chosen_tokens': 2,
    'chosen_mask': 2,
    'chosen_loss_mask': 2,
    'rejected_tokens': 2,
    'rejected_mask': 2,
    'rejected_loss_mask': 2,
    'ref_chosen_logps': 1,
    'ref_rejected_logps': 1,
  },
  'classifier': {**_TOKENS, 'labels': 1},
}
LOSSES = tuple(FORMATS)


@dataclasses.dataclass(frozen=True)
class DpoPair:
  """A DPO preference pair: chosen and rejected (ids, loss_mask), with reference log-probs."""

  chosen: Sequence[int]
  chosen_loss_mask: Sequence[int]
  rejected: Sequence[int]
  rejected_loss_mask: Sequence[int]
  ref_chosen_logps: float | None = None
  ref_rejected_logps: float | None = None

  @classmethod
  def from_examples(cls, chosen: tuple, rejected: tuple) -> DpoPair:
    """From two `tokens.sft_example` results (same prompt, two answers)."""
    return cls(chosen[0], chosen[1], rejected[0], rejected[1])


def dpo_example(tok: Tokenizer, question: str, chosen: str, rejected: str) -> DpoPair:
  """The pair of two answers to one question, each tokenized as an SFT example."""
  return DpoPair.from_examples(
    sft_example(tok, question, chosen), sft_example(tok, question, rejected)
  )


@dataclasses.dataclass(frozen=True)
class Encoded:
  """Checked examples as int32 arrays, with the lengths and target counts batching needs."""

  loss: str
  seqs: tuple[tuple[np.ndarray, ...], ...]  # per example: the arrays `collate` reads
  floats: np.ndarray  # [n, 2] reference log-probs (dpo) or labels (classifier, column 0)
  lengths: np.ndarray  # [n] longest sequence of the example
  targets: np.ndarray  # [n] most target positions of any of its sequences

  def __len__(self) -> int:
    return len(self.seqs)


def _as_ids(x, what: str, vocab: int) -> np.ndarray:
  a = np.asarray(x, np.int32)
  if a.ndim != 1 or a.size == 0:
    raise ValueError(f'{what} must be a non-empty 1-D sequence of token ids, got shape {a.shape}')
  if a.min() < 0 or a.max() >= vocab:
    raise ValueError(f'{what} has token ids outside [0, {vocab})')
  return a


def _sft(i, ex, vocab, num_labels):
  ids, lm = ex
  ids, lm = _as_ids(ids, f'example {i}', vocab), np.asarray(lm, np.int32)
  if lm.shape != ids.shape:
    raise ValueError(f'example {i}: loss_mask shape {lm.shape} != ids shape {ids.shape}')
  return (ids, lm), (0.0, 0.0), len(ids), int(lm[1:].sum())


def _dpo(i, ex, vocab, num_labels):
  if not isinstance(ex, DpoPair):
    raise ValueError(f'example {i} is a {type(ex).__name__}, not an examples.DpoPair')
  if ex.ref_chosen_logps is None or ex.ref_rejected_logps is None:
    raise ValueError(
      f'pair {i} has no reference log-probs; compute them with with_reference_logps()'
    )
  c = _as_ids(ex.chosen, f'pair {i} chosen', vocab)
  r = _as_ids(ex.rejected, f'pair {i} rejected', vocab)
  cm, rm = np.asarray(ex.chosen_loss_mask, np.int32), np.asarray(ex.rejected_loss_mask, np.int32)
  if cm.shape != c.shape or rm.shape != r.shape:
    raise ValueError(f'pair {i}: a loss_mask does not match its ids')
  floats = (float(ex.ref_chosen_logps), float(ex.ref_rejected_logps))
  return (c, cm, r, rm), floats, max(len(c), len(r)), max(int(cm[1:].sum()), int(rm[1:].sum()))


def _classifier(i, ex, vocab, num_labels):
  ids, label = ex
  ids = _as_ids(ids, f'example {i}', vocab)
  if not 0 <= int(label) < num_labels:
    raise ValueError(f'example {i} has label {label}, outside [0, {num_labels})')
  return (ids,), (float(label), 0.0), len(ids), 0


_CHECK = {'sft': _sft, 'dpo': _dpo, 'classifier': _classifier}


def encode(loss: str, examples: Sequence, max_len: int, vocab: int, num_labels: int = 0) -> Encoded:
  """Check the examples of a loss (token ids in range, masks of their ids' shape, at most
  `max_len` tokens) and hold them as arrays. Raises ValueError naming the bad example."""
  if not len(examples):
    raise ValueError('no training examples')
  seqs, floats, lengths, targets = [], [], [], []
  for i, ex in enumerate(examples):
    s, f, length, t = _CHECK[loss](i, ex, vocab, num_labels)
    if length > max_len:
      raise ValueError(
        f'example {i} has {length} tokens > max_len={max_len}; raise max_len or drop it'
      )
    seqs.append(s)
    floats.append(f)
    lengths.append(length)
    targets.append(t)
  return Encoded(
    loss,
    tuple(seqs),
    np.asarray(floats, np.float32),
    np.asarray(lengths, np.int64),
    np.asarray(targets, np.int64),
  )


def padded_length(longest: int, max_len: int, pad_multiple: int) -> int:
  return min(max_len, -(-longest // pad_multiple) * pad_multiple)


def target_bound(longest_targets: int, length: int) -> int:
  """Target positions a batch of padded `length` computes logits at: the smallest of T/4, T/2
  and T - 1 that covers its longest target (train.py gathers only those)."""
  for p in (length // 4, length // 2):
    if p >= max(longest_targets, 1):
      return p
  return length - 1


def collate(
  data: Encoded, idx: np.ndarray, rows: int, max_len: int, pad_multiple: int
) -> tuple[dict[str, np.ndarray], int | None]:
  """Host batch (FORMATS[data.loss]) of examples `idx` padded to `rows` rows, and its target
  bound (None: classifier)."""
  length = padded_length(int(data.lengths[idx].max()), max_len, pad_multiple)
  empty = [np.zeros(0, np.int32)] * (rows - len(idx))

  def column(k: int) -> tuple[np.ndarray, np.ndarray]:
    return pad_batch([data.seqs[i][k] for i in idx] + empty, length=length)

  f = np.zeros((rows, 2), np.float32)
  f[: len(idx)] = data.floats[idx]
  if data.loss == 'classifier':
    tokens, mask = column(0)
    return {'tokens': tokens, 'mask': mask, 'labels': f[:, 0].astype(np.int32)}, None
  if data.loss == 'sft':
    tokens, mask = column(0)
    batch = {'tokens': tokens, 'mask': mask, 'loss_mask': column(1)[0]}
  else:
    (ct, cm), (rt, rm) = column(0), column(2)
    batch = {
      'chosen_tokens': ct,
      'chosen_mask': cm,
      'chosen_loss_mask': column(1)[0],
      'rejected_tokens': rt,
      'rejected_mask': rm,
      'rejected_loss_mask': column(3)[0],
      'ref_chosen_logps': f[:, 0],
      'ref_rejected_logps': f[:, 1],
    }
  return batch, target_bound(int(data.targets[idx].max()), length)
