"""Does the data fit the config? The longest tokenized example of every split against max_len.

A fit refuses an example longer than its `max_len` (fit.py), which on a paper-scale run would stop
hours in, at the first stage whose data holds such a row. `check_max_len` runs before any stage and
turns that into one line naming the row, its length and the value to set:

  * every split's rows as SFT examples (prompt + reference answer + EOS, tokens.sft_example) with
    each role's tokenizer, against the max_len of the fit that role runs (`supervisor_sft` for
    the supervisor, `sft` for the student);
  * the student also trains on generated labels: the longest train prompt plus the label
    decoding's max_new_tokens (and EOS) must fit `sft.max_len`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ilr_jax.schema import ConfigError
from ilr_jax.tokens import Tokenizer, prompt_ids, sft_example

# (model role, the config section of the fit it runs).
FITS = (('supervisor', 'supervisor_sft'), ('student', 'sft'))


def longest(tok: Tokenizer, examples: Sequence) -> tuple[int, int]:
  """(index, tokens) of the longest SFT example (prompt + answer + EOS); (-1, 0) when empty."""
  best = (-1, 0)
  for i, ex in enumerate(examples):
    n = len(sft_example(tok, ex.question, ex.answer)[0])
    if n > best[1]:
      best = (i, n)
  return best


def _suggest(n: int, multiple: int) -> int:
  return -(-n // max(multiple, 1)) * max(multiple, 1)


def check_max_len(config, splits: Mapping[str, Sequence], tok_of, max_new_tokens: int) -> dict:
  """Raise ConfigError (one line) when an example of `splits` cannot fit its fit's max_len.

  Args:
    config: the run's config (sections supervisor_sft and sft: max_len, pad_multiple).
    splits: split name -> tasks.Examples (e.g. {'train': ..., 'test': ...}).
    tok_of: role -> its Tokenizer.
    max_new_tokens: the longest label the supervisor or a half model may generate.
  Returns:
    {'<section>/<split>': longest tokens} for what was checked.
  """
  seen = {}
  for role, section in FITS:
    tcfg = config[section]
    tok = tok_of(role)
    for split, examples in splits.items():
      i, n = longest(tok, examples)
      seen[f'{section}/{split}'] = n
      if n > tcfg.max_len:
        ex = examples[i]
        raise ConfigError(
          f'{ex.id} ({split} split) has {n} tokens as an SFT example (prompt + answer + EOS, '
          f'{role} tokenizer) > --config.{section}.max_len={tcfg.max_len}; set '
          f'--config.{section}.max_len={_suggest(n, tcfg.pad_multiple)} or more'
        )
  tok, tcfg = tok_of('student'), config.sft
  train = splits.get('train', ())
  if train:
    j, p = max(((j, len(prompt_ids(tok, ex.question))) for j, ex in enumerate(train)), key=_key)
    need = p + max_new_tokens + 1
    seen['sft/generated'] = need
    if need > tcfg.max_len:
      raise ConfigError(
        f'{train[j].id} (train split) has a {p}-token prompt: with labels of up to '
        f'max_new_tokens={max_new_tokens} the student trains on {need} tokens > '
        f'--config.sft.max_len={tcfg.max_len}; set --config.sft.max_len='
        f'{_suggest(need, tcfg.pad_multiple)} or more (or lower --config.task.max_new_tokens)'
      )
  return seen


def _key(item: tuple[int, int]) -> int:
  return item[1]
