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
