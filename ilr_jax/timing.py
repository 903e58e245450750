"""The timing switch (`--config.debug.timing=True`): a run shaped like a real one, for stage times.

With random weights (an accelerator dry run of configs/gsm8k.py) a model writes no valid label
and stops at arbitrary EOS tokens, so the stages after decoding would see no data and decoding
would be far shorter than a trained model's. The switch makes every label count as valid and
every sequence decode to its length limit (no stop tokens). The accuracies of such a run are
meaningless; its stage times are realistic (upper bounds for decoding).
"""

from __future__ import annotations

from typing import Any


class TimingTask:
  """A task whose every label is valid; everything else is the wrapped task's."""

  def __init__(self, task: Any):
    self._task = task

  def __getattr__(self, name: str) -> Any:
    return getattr(self._task, name)

  def is_valid_label(self, label: str) -> bool:
    del label
    return True


def wrap_task(task: Any, config) -> Any:
  """`task`, or a TimingTask of it under debug.timing."""
  return TimingTask(task) if config.debug.timing else task


def decode_options(config) -> dict[str, Any]:
  """Extra generate() keywords: under debug.timing no stop tokens, so every sequence runs to its
  max_new_tokens."""
  return {'stop_ids': ()} if config.debug.timing else {}


# -- a timing round with random weights (launch/round_accelerator.sh) ----------------------------


def char_tokenizer(out_dir, vocab_size: int) -> None:
  """Save a character-level HF tokenizer of exactly `vocab_size` ids into `out_dir`: <unk>,
  <pad>, <s>, </s>, the printable ASCII characters, then filler tokens (what random weights
  mostly sample; they decode to text like any token). Built offline, no download."""
  import string

  import tokenizers
  import transformers

  vocab = {'<unk>': 0, '<pad>': 1, '<s>': 2, '</s>': 3}
  for c in string.printable:
    vocab.setdefault(c, len(vocab))
  if vocab_size < len(vocab):
    raise ValueError(f'vocab_size {vocab_size} is below the {len(vocab)} base tokens')
  for i in range(vocab_size - len(vocab)):
    vocab[f'<f{i}>'] = len(vocab)
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[], unk_token='<unk>'))
  tok.decoder = tokenizers.decoders.Fuse()
  transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok,
    bos_token='<s>',
    eos_token='</s>',
    pad_token='<pad>',
    unk_token='<unk>',
  ).save_pretrained(out_dir)


def write_random_checkpoint(preset: str, out_dir, dtype: str = 'bfloat16', seed: int = 0) -> None:
  """An HF directory of preset `preset` (its real shapes) with random weights, initialised
  already sharded on the local devices, and a `char_tokenizer` of its vocabulary; ids of BOS,
  EOS and padding follow that tokenizer. An existing non-empty `out_dir` is kept as it is."""
  import pathlib
  import tempfile

  from flax import nnx

  from ilr_jax import convert, presets
  from ilr_jax import sharding as shd
  from ilr_jax.model import Decoder

  out = pathlib.Path(out_dir)
  if out.exists() and any(out.iterdir()):
    return
  cfg = presets.get_preset(
    preset,
    dtype=dtype,
    param_dtype=dtype,
    bos_token_id=2,
    eos_token_ids=(3,),
    pad_token_id=1,
  )
  mesh = shd.make_mesh(-1, 1, 1)
  model = shd.create_sharded(lambda: Decoder(cfg, rngs=nnx.Rngs(seed)), mesh)
  with tempfile.TemporaryDirectory() as tmp:
    char_tokenizer(tmp, cfg.vocab_size)
    convert.save_hf(model, out, tokenizer_dir=tmp)


# Rows of GSM8K's splits, and what a timing run's stage times scale by to the full run.
GSM8K_TRAIN, GSM8K_TEST = 7473, 1319


def extrapolate(
  stage_s: dict[str, float], train_rows: int, rounds: int, full_rounds: int = 6
) -> dict[str, float]:
  """Seconds of the full run from a scaled run's stage times: every stage scales with the train
  rows (GSM8K_TRAIN / train_rows; its test evaluation scales less, so this errs high) and the
  round stages (names with '/r<k>/', and the half models 'halves/...') repeat
  full_rounds / rounds times. Returns per-group seconds and 'total'."""
  scale = GSM8K_TRAIN / train_rows
  base = sum(t for n, t in stage_s.items() if not _is_round(n))
  per_round = sum(t for n, t in stage_s.items() if _is_round(n)) / max(rounds, 1)
  out = {'base_s': base * scale, 'round_s': per_round * scale}
  out['total_s'] = out['base_s'] + full_rounds * out['round_s']
  return out


def _is_round(name: str) -> bool:
  return '/r' in name or name.startswith('halves/')


def parse_stage_times(log_text: str) -> dict[str, float]:
  """{stage: seconds} from the '[ilr_jax] stage NAME done in X s' lines of a run's output."""
  import re

  found = re.findall(r'\[ilr_jax\] stage (\S+) done in ([0-9.]+) s', log_text)
  return {name: float(s) for name, s in found}


def main(argv) -> None:
  """`python -m ilr_jax.timing write PRESET DIR [DTYPE]` or `... report LOG TRAIN_ROWS ROUNDS`."""
  import json

  if len(argv) >= 4 and argv[1] == 'write':
    write_random_checkpoint(argv[2], argv[3], *(argv[4:5] or ['bfloat16']))
    return
  if len(argv) == 5 and argv[1] == 'report':
    with open(argv[2]) as f:
      stages = parse_stage_times(f.read())
    if not stages:
      raise SystemExit(f'no "[ilr_jax] stage ... done in" lines in {argv[2]}')
    for name, s in stages.items():
      print(json.dumps({'stage': name, 'wall_s': s}))
    full = extrapolate(stages, int(argv[3]), int(argv[4]))
    print(json.dumps({'extrapolated_full_6_round_run': full}))
    return
  raise SystemExit(main.__doc__)


if __name__ == '__main__':
  import sys

  main(sys.argv)
