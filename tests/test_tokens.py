"""The one token convention: BOS, prompt template, target + EOS, loss mask, padding."""

import pathlib

import numpy as np
import pytest

from ilr_jax import tokens

SPM = pathlib.Path(__file__).resolve().parents[1] / 'data' / 'arith' / 'spm.model'


@pytest.fixture(scope='module')
def spm_tok():
  return tokens.Tokenizer.load(SPM)


@pytest.fixture
def hf_tok_dir(tmp_path):
  """A tiny byte-level BPE tokenizer saved as an HF directory (built offline)."""
  import tokenizers
  import transformers

  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token='<unk>'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
    vocab_size=300,
    special_tokens=['<unk>', '<s>', '</s>', '<pad>'],
    initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(['USER: what is 2 + 3?\n\nASSISTANT: 5 #### 5'] * 10, trainer)
  fast = transformers.PreTrainedTokenizerFast(
    tokenizer_object=tok, bos_token='<s>', eos_token='</s>', pad_token='<pad>', unk_token='<unk>'
  )
  fast.save_pretrained(tmp_path)
  return tmp_path


def test_sft_example_layout(spm_tok):
  ids, mask = tokens.sft_example(spm_tok, 'What is 2+3?', '2+3=5\n#### 5')
  p = tokens.prompt_ids(spm_tok, 'What is 2+3?')
  assert ids[0] == spm_tok.bos_id == 1
  assert list(ids[: len(p)]) == p  # the sampler's prompt is exactly the training prompt
  assert ids[-1] == spm_tok.eos_id == 2
  assert mask[: len(p)].sum() == 0 and mask[len(p) :].all()
  assert spm_tok.decode(ids[len(p) :]) == '2+3=5\n#### 5'
  assert spm_tok.decode(ids[: len(p)]) == 'USER:\nWhat is 2+3?\n\nASSISTANT:\n'


def test_hf_tokenizer_directory(hf_tok_dir):
  tok = tokens.Tokenizer.load(hf_tok_dir)
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
  ids, mask = tokens.sft_example(tok, 'what is 2 + 3?', '5 #### 5')
  assert ids[0] == 1 and ids[-1] == 2 and mask.sum() == len(tok.encode('5 #### 5')) + 1
  assert tok.decode(ids) == tokens.prompt_text('what is 2 + 3?') + '5 #### 5'


def test_pad_batch_left_and_right():
  t, m = tokens.pad_batch([[5, 6, 7], [8]], side='right', pad_id=0)
  np.testing.assert_array_equal(t, [[5, 6, 7], [8, 0, 0]])
  np.testing.assert_array_equal(m, [[1, 1, 1], [1, 0, 0]])
  t, m = tokens.pad_batch([[5, 6, 7], [8]], side='left', pad_id=9, multiple=4)
  np.testing.assert_array_equal(t, [[9, 5, 6, 7], [9, 9, 9, 8]])
  np.testing.assert_array_equal(m, [[0, 1, 1, 1], [0, 0, 0, 1]])
  with pytest.raises(ValueError, match='does not fit length 2'):
    tokens.pad_batch([[1, 2, 3]], length=2)


def test_missing_tokenizer_is_a_clear_error(tmp_path):
  with pytest.raises(tokens.TokenizerError, match='does not exist'):
    tokens.Tokenizer.load(tmp_path / 'nope')
  with pytest.raises(tokens.TokenizerError, match='holds no tokenizer'):
    tokens.Tokenizer.load(tmp_path)


def test_encode_with_bos_only_where_the_tokenizer_has_one():
  chars = dict(encode=lambda s: [ord(c) for c in s], decode=str, eos_id=2, pad_id=0)
  with_bos = tokens.Tokenizer(bos_id=1, vocab_size=256, source='test', **chars)
  without = tokens.Tokenizer(bos_id=None, vocab_size=256, source='test', **chars)
  assert with_bos.encode_with_bos('ab') == [1, 97, 98]
  assert without.encode_with_bos('ab') == [97, 98]
  assert tokens.prompt_ids(without, 'q') == without.encode(tokens.prompt_text('q'))
