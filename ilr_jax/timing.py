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
