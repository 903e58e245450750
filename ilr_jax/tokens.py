"""Tokenizers and the one token convention shared by training, scoring and sampling.

A prompt is `USER:\\n{question}\\n\\nASSISTANT:\\n`; an SFT target is the answer followed by EOS,
and the loss is taken on the target tokens only. Every sequence starts with BOS when the tokenizer
has one, in training, in scoring and in sampling alike (the released code trained without BOS
and sampled with it; we do not). Prompt and answer are tokenized separately and concatenated, so the
boundary between them is exact and the prompt tokens of an SFT example are the tokens the sampler
is given for the same question.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

import numpy as np

PROMPT_TEMPLATE = 'USER:\n{question}\n\nASSISTANT:\n'


class TokenizerError(ValueError):
  """A tokenizer that cannot be loaded or lacks a token the pipeline needs."""


class Tokenizer:
  """A thin, uniform wrapper over an HF tokenizer or a SentencePiece model."""

  def __init__(self, *, encode, decode, bos_id, eos_id, pad_id, vocab_size, source):
    self._encode, self._decode = encode, decode
    self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
    self.vocab_size = vocab_size
    self.source = source
    if eos_id is None:
      raise TokenizerError(f'tokenizer at {source} has no EOS token')

  @classmethod
  def load(cls, path: str | os.PathLike) -> Tokenizer:
    """Load an HF model directory (AutoTokenizer), a SentencePiece `.model` file, or a directory
    that holds `spm.model` and no HF tokenizer files."""
    p = pathlib.Path(path)
    if p.is_file() and p.suffix == '.model':
      return cls._sentencepiece(p)
    if not p.exists():
      raise TokenizerError(f'tokenizer path {p} does not exist')
    hf_files = ('tokenizer.json', 'tokenizer_config.json', 'tokenizer.model')
    if p.is_dir() and not any((p / f).exists() for f in hf_files) and (p / 'spm.model').exists():
      return cls._sentencepiece(p / 'spm.model')
    if p.is_dir() and not any((p / f).exists() for f in hf_files):
      raise TokenizerError(f'{p} holds no tokenizer (tokenizer.json, tokenizer.model or spm.model)')
    return cls._hf(p)

  @classmethod
  def _sentencepiece(cls, path: pathlib.Path) -> Tokenizer:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(path))
    specials = {i for i in (sp.bos_id(), sp.eos_id(), sp.pad_id(), sp.unk_id()) if i >= 0}

    def decode(ids):
      return sp.decode([int(i) for i in ids if int(i) not in specials])

    pad = sp.pad_id() if sp.pad_id() >= 0 else sp.eos_id()
    return cls(
      encode=lambda text: sp.encode(text),
      decode=decode,
      bos_id=sp.bos_id() if sp.bos_id() >= 0 else None,
      eos_id=sp.eos_id() if sp.eos_id() >= 0 else None,
      pad_id=pad,
      vocab_size=sp.get_piece_size(),
      source=str(path),
    )

  @classmethod
  def _hf(cls, path: pathlib.Path) -> Tokenizer:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(path)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return cls(
      encode=lambda text: tok.encode(text, add_special_tokens=False),
      decode=lambda ids: tok.decode([int(i) for i in ids], skip_special_tokens=True),
      bos_id=tok.bos_token_id,
      eos_id=tok.eos_token_id,
      pad_id=pad,
      vocab_size=len(tok),
      source=str(path),
    )

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without special tokens."""
    return list(self._encode(text))

  def encode_with_bos(self, text: str) -> list[int]:
    """[BOS] + encode(text), without the BOS where the tokenizer has none: how every sequence
    the models see starts."""
    return encode_with_bos(self, text)

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`, special tokens dropped."""
    return self._decode(ids)


def encode_with_bos(tok: Tokenizer, text: str) -> list[int]:
  """[BOS] + ids of `text` (no BOS for a tokenizer without one): how every sequence starts."""
  bos = [tok.bos_id] if tok.bos_id is not None else []
  return bos + tok.encode(text)


def prompt_text(question: str) -> str:
  return PROMPT_TEMPLATE.format(question=question)


def prompt_ids(tok: Tokenizer, question: str) -> list[int]:
  """[BOS] + the formatted prompt: what the sampler is given for `question`."""
  return encode_with_bos(tok, prompt_text(question))


def sft_example(tok: Tokenizer, question: str, answer: str) -> tuple[np.ndarray, np.ndarray]:
  """(ids, loss_mask) int32: prompt_ids + answer + [EOS], the mask on answer and EOS only."""
  p = prompt_ids(tok, question)
  a = tok.encode(answer) + [tok.eos_id]
  ids = np.asarray(p + a, np.int32)
  mask = np.concatenate([np.zeros(len(p), np.int32), np.ones(len(a), np.int32)])
  return ids, mask


def pad_batch(
  seqs: Sequence[Sequence[int]],
  length: int | None = None,
  side: str = 'right',
  pad_id: int = 0,
  multiple: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
  """Pad sequences into (tokens_BT, mask_BT) int32 arrays.

  Args:
    seqs: token id sequences.
    length: target length; default the longest sequence, rounded up to `multiple`.
    side: 'right' (training) or 'left' (sampling: every prompt ends at the last column).
    pad_id: the id written on padding (the mask, not this id, marks padding).
  """
  if side not in ('left', 'right'):
    raise ValueError(f"side must be 'left' or 'right', got {side!r}")
  longest = max((len(s) for s in seqs), default=0)
  if length is None:
    length = -(-max(longest, 1) // multiple) * multiple
  if longest > length:
    raise ValueError(f'a sequence of {longest} tokens does not fit length {length}')
  tokens = np.full((len(seqs), length), pad_id, np.int32)
  mask = np.zeros((len(seqs), length), np.int32)
  for i, s in enumerate(seqs):
    n = len(s)
    if n == 0:
      continue
    sl = slice(0, n) if side == 'right' else slice(length - n, length)
    tokens[i, sl] = np.asarray(s, np.int32)
    mask[i, sl] = 1
  return tokens, mask
