"""lengths.check_max_len: the longest tokenized row of each split against each fit's max_len."""

import ml_collections
import pytest

from ilr_jax import lengths, schema, tokens
from ilr_jax.tasks import Example

# One token per character (plus BOS / EOS): lengths are easy to count by hand.
TOK = tokens.Tokenizer(
  encode=lambda s: [3 + ord(c) % 60 for c in s],
  decode=lambda ids: '',
  bos_id=1,
  eos_id=2,
  pad_id=0,
  vocab_size=64,
  source='chars',
)
PROMPT = len(tokens.prompt_ids(TOK, ''))  # BOS + the template around an empty question


def _config(sup_len, sft_len):
  c = ml_collections.ConfigDict()
  c.supervisor_sft = dict(max_len=sup_len, pad_multiple=64)
  c.sft = dict(max_len=sft_len, pad_multiple=64)
  return c


def _splits():
  train = [Example(f't/train/{i}', 'q' * 10, 'a' * 20) for i in range(3)]
  test = [Example('t/test/0', 'q', 'a'), Example('t/test/1', 'q' * 50, 'a' * 100)]
  return {'train': train, 'test': test}


def test_fitting_data_passes_and_reports_the_longest():
  got = lengths.check_max_len(_config(512, 512), _splits(), lambda role: TOK, max_new_tokens=16)
  assert got['sft/test'] == PROMPT + 50 + 100 + 1
  assert got['supervisor_sft/train'] == PROMPT + 10 + 20 + 1
  assert got['sft/generated'] == PROMPT + 10 + 16 + 1


def test_too_long_row_is_one_line_naming_row_and_value():
  n = PROMPT + 50 + 100 + 1
  with pytest.raises(schema.ConfigError) as e:
    lengths.check_max_len(_config(512, 128), _splits(), lambda role: TOK, max_new_tokens=16)
  msg = str(e.value)
  assert '\n' not in msg
  assert msg.startswith(f't/test/1 (test split) has {n} tokens')
  assert '--config.sft.max_len=128; set --config.sft.max_len=192 or more' in msg
  with pytest.raises(schema.ConfigError, match='--config.supervisor_sft.max_len=64'):
    lengths.check_max_len(_config(64, 512), _splits(), lambda role: TOK, max_new_tokens=16)


def test_generated_labels_must_fit_the_student():
  with pytest.raises(schema.ConfigError, match=r't/train/0 .*max_new_tokens=200 .*sft.max_len=256'):
    lengths.check_max_len(_config(512, 200), _splits(), lambda role: TOK, max_new_tokens=200)
