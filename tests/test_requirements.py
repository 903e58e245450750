"""The lock files: every dependency of setup.cfg pinned to a version its range allows, the package
lock a subset of the test lock with equal versions, and torch pinned to 2.13.0 (the CPU build
where pip finds one)."""

import configparser
import pathlib
import re

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pins(name: str) -> dict[str, Version]:
  out = {}
  for line in (ROOT / 'requirements' / name).read_text().splitlines():
    line = line.split('#')[0].strip()
    if line:
      m = re.fullmatch(r'([A-Za-z0-9_.\-]+)==(\S+)', line)
      assert m, f'{name}: {line!r} is not an exact pin'
      out[canonicalize_name(m.group(1))] = Version(m.group(2))
  return out


def _setup_requirements(extra: str | None = None) -> list[Requirement]:
  cfg = configparser.ConfigParser()
  cfg.read(ROOT / 'setup.cfg')
  text = cfg['options']['install_requires']
  if extra:
    text += cfg['options.extras_require'][extra]
  return [Requirement(x) for x in text.split('\n') if x.strip()]


def test_locks_pin_every_dependency_within_its_range():
  main, test = _pins('cpu.lock'), _pins('cpu-test.lock')
  for lock, reqs in ((main, _setup_requirements()), (test, _setup_requirements('test'))):
    for r in reqs:
      v = lock[canonicalize_name(r.name)]
      assert r.specifier.contains(v, prereleases=True), f'{r.name}=={v} is outside {r.specifier}'
  assert all(test[k] == v for k, v in main.items())
  # torch==2.13.0: pip matches it with the CPU build 2.13.0+cpu (README, .ci/run).
  assert test['torch'] == Version('2.13.0') and 'torch' not in main
  assert not [k for k in test if k.startswith('nvidia')]  # no CUDA libraries on a CPU install
