"""ilr_jax.main: quiet by default (no import-time advice a user cannot act on)."""

import os
import subprocess
import sys


def test_main_silences_transformers_import_advice():
  # transformers prints "PyTorch was not found ..." at import on installs without torch (the
  # package lock has none); main sets its switch before anything imports transformers.
  code = (
    'import os, sys; import ilr_jax.main; import transformers; '
    "print(os.environ.get('TRANSFORMERS_NO_ADVISORY_WARNINGS'))"
  )
  env = {k: v for k, v in os.environ.items() if k != 'TRANSFORMERS_NO_ADVISORY_WARNINGS'}
  r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env)
  assert r.returncode == 0, r.stderr
  assert r.stdout.strip() == '1' and 'PyTorch was not found' not in r.stderr
