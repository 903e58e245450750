"""The timing switch: every label valid, no stop tokens; off by default."""

from ilr_jax import schema, timing


class _Task:
  name = 'stub'

  def is_valid_label(self, label):
    return label == 'ok'


def test_timing_switch_keeps_every_label_and_drops_stop_tokens():
  config = schema.base_config('ilr', task='gsm8k')
  assert config.debug.timing is False
  assert timing.wrap_task(_Task(), config).is_valid_label('garbage') is False
  assert timing.decode_options(config) == {}
  config.debug.timing = True
  wrapped = timing.wrap_task(_Task(), config)
  assert wrapped.is_valid_label('garbage') is True
  assert wrapped.name == 'stub'  # everything else is the task's
  assert timing.decode_options(config) == {'stop_ids': ()}


def test_stage_times_parse_and_extrapolate():
  log = (
    'noise\n[ilr_jax] stage supervisor done in 10.0 s: {}\n'
    '[ilr_jax] stage halves/weak_labels/m1 done in 2.0 s: {}\n'
    '[ilr_jax] stage ilr/r1/labels done in 3.0 s: {}\n'
    '[ilr_jax] stage sft done in 5.0 s: {}\n'
  )
  stages = timing.parse_stage_times(log)
  assert stages == {
    'supervisor': 10.0,
    'halves/weak_labels/m1': 2.0,
    'ilr/r1/labels': 3.0,
    'sft': 5.0,
  }
  full = timing.extrapolate(stages, train_rows=747, rounds=1)
  scale = timing.GSM8K_TRAIN / 747
  assert abs(full['base_s'] - 15.0 * scale) < 1e-9
  assert abs(full['round_s'] - 5.0 * scale) < 1e-9
  assert abs(full['total_s'] - (15.0 + 6 * 5.0) * scale) < 1e-9


def test_char_tokenizer_has_the_exact_vocabulary(tmp_path):
  from ilr_jax.tokens import Tokenizer

  timing.char_tokenizer(tmp_path, 300)
  tok = Tokenizer.load(tmp_path)
  assert tok.vocab_size == 300
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 3, 1)
  ids = tok.encode('x = 12 + 3')
  assert tok.decode(ids) == 'x = 12 + 3'
  assert isinstance(tok.decode([299, 150]), str)  # filler ids decode too
