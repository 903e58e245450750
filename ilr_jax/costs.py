"""Compiled work and memory of one train step or scoring call, from abstract inputs.

XLA's own accounting of a step, with no weights allocated (the model, optimizer state and batch
are `jax.ShapeDtypeStruct`s from `nnx.eval_shape`), so real shapes (gemma-2b at 32 x 512) can be
analysed on a laptop:

  python -m ilr_jax.costs --shape=bench-small --arch=mistral
  python -m ilr_jax.costs --shape=gemma-2b --arch=gemma --dtype=bfloat16 --batch=32 \
    --seq_len=512 --workloads=sft_step --scan_layers

prints one JSON line per workload: `flops` (cost_analysis), `peak_bytes` (memory_analysis:
arguments + outputs + temporaries - aliased) and `temp_bytes`. The step is the one `make_trainer`
jits (same loss functions, AdamW, donation), on one device without sharding, with BENCH.md's
batches: loss on the last half of each sequence (sft, dpo), a 2-class score at the last token
(classify). `vocab_buffers` counts the HLO buffers of a float32 [.., V] logits shape that covers
every position of the batch, the memory the target-only loss path avoids.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from absl import app, flags
from flax import nnx

from ilr_jax import lora as lora_lib
from ilr_jax import train as train_lib
from ilr_jax.model import Decoder, ModelConfig

WORKLOADS = ('sft_step', 'dpo_step', 'classify_batched')


def _abstract_model(cfg: ModelConfig, lora_rank: int) -> Decoder:
  if lora_rank:
    cfg = cfg.replace(lora_rank=lora_rank, lora_alpha=2.0 * lora_rank)
  return nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0)))


def _batch(loss: str, b: int, t: int) -> dict[str, jax.ShapeDtypeStruct]:
  i32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.int32)
  f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
  if loss == 'sft':
    return {'tokens': i32(b, t), 'mask': i32(b, t), 'loss_mask': i32(b, t)}
  if loss == 'dpo':
    pairs = b // 2
    out = {f'{s}_{k}': i32(pairs, t) for s in ('chosen', 'rejected') for k in ('tokens', 'mask')}
    out.update({f'{s}_loss_mask': i32(pairs, t) for s in ('chosen', 'rejected')})
    return {**out, 'ref_chosen_logps': f32(pairs), 'ref_rejected_logps': f32(pairs)}
  return {'tokens': i32(b, t), 'mask': i32(b, t), 'labels': i32(b)}


def lowered_step(cfg: ModelConfig, loss: str, batch: int, seq_len: int, lora_rank: int = 0):
  """The jitted train step of `loss` lowered on abstract state and batch (nothing allocated).

  The loss covers the last half of each sequence (max_targets = seq_len // 2), as the benchmark's
  sft_step / dpo_step. For 'classifier' the model gets a 2-class score head.
  """
  if loss == 'classifier':
    cfg = cfg.replace(num_labels=2)
  model = _abstract_model(cfg, lora_rank)
  from ilr_jax.bench.train_workloads import train_config

  tcfg = train_config(lora_rank)  # the benchmark's optimizer settings (docs/BENCH.md)
  tx = train_lib.make_optimizer(tcfg, 1000)
  graphdef, params, frozen = lora_lib.split_trainable(model)
  opt_state = jax.eval_shape(tx.init, params)
  loss_fn = functools.partial(train_lib._call_loss, train_lib.LOSS_FNS[loss], tcfg)
  step = train_lib._step_fn(graphdef, loss_fn, tx, tcfg, None, accum=False)
  targets = None if loss == 'classifier' else seq_len // 2

  def split_step(dynamic, frozen, batch):
    step_, params, opt_state = dynamic
    state = train_lib.TrainState(step=step_, params=params, frozen=frozen, opt_state=opt_state)
    new, metrics = step(state, batch, targets)
    return (new.step, new.params, new.opt_state), metrics

  dynamic = (jax.ShapeDtypeStruct((), jnp.int32), params, opt_state)
  jitted = jax.jit(split_step, donate_argnums=(0,))
  return jitted.lower(dynamic, frozen, _batch(loss, batch, seq_len))


def lowered_scores(cfg: ModelConfig, batch: int, seq_len: int):
  """The evaluator's jitted scoring call (2-class score head, softmax) on abstract inputs."""
  model = _abstract_model(cfg.replace(num_labels=2), 0)
  graphdef, state = nnx.split(model)

  def probs(state, tokens_BT, mask_BT):
    return jax.nn.softmax(nnx.merge(graphdef, state).score(tokens_BT, mask_BT), axis=-1)

  tok = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
  return jax.jit(probs).lower(state, tok, tok)


def vocab_buffers(hlo_text: str, positions: int, vocab: int) -> int:
  """Number of f32 HLO values with a V axis and at least `positions` elements before it."""
  count = 0
  for dims in re.findall(r'f32\[([0-9,]+)\]', hlo_text):
    shape = [int(x) for x in dims.split(',')]
    if len(shape) >= 2 and shape[-1] == vocab:
      lead = 1
      for x in shape[:-1]:
        lead *= x
      count += lead >= positions
  return count


def analyse(lowered, positions: int, vocab: int) -> dict:
  """flops, peak_bytes, temp_bytes, vocab_buffers and the optimised HLO text ('hlo') of a
  lowered computation, compiled."""
  compiled = lowered.compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, list):  # older jax returns one dict per computation
    cost = cost[0]
  mem = compiled.memory_analysis()
  peak = (
    mem.argument_size_in_bytes
    + mem.output_size_in_bytes
    + mem.temp_size_in_bytes
    - mem.alias_size_in_bytes
  )
  return {
    'flops': float(cost['flops']),
    'peak_bytes': int(peak),
    'temp_bytes': int(mem.temp_size_in_bytes),
    'vocab_buffers': vocab_buffers(compiled.as_text(), positions, vocab),
    'hlo': compiled.as_text(),
  }


def lowered_reference(cfg: ModelConfig, batch: int, seq_len: int):
  """DPO's reference log-probs of `batch` rows (loss on the last half), as bench.py's dpo_step."""
  model = _abstract_model(cfg, 0)
  graphdef, state = nnx.split(model)

  def ref(state, tokens_BT, mask_BT, loss_mask_BT):
    logps, _ = train_lib.token_logps(
      nnx.merge(graphdef, state), tokens_BT, mask_BT, loss_mask_BT, max_targets=seq_len // 2
    )
    return logps.sum(-1)

  tok = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
  return jax.jit(ref).lower(state, tok, tok, tok)


def workload_costs(
  cfg: ModelConfig, workload: str, batch: int, seq_len: int, lora_rank: int = 0
) -> dict:
  """`analyse` of one bench workload call; dpo_step adds its reference forward (flops summed,
  peak the larger). XLA counts a while loop's body once, so FLOPs are only right with
  cfg.scan_layers=False and logits in one chunk (the CLI's default)."""
  positions = batch * seq_len
  if workload == 'classify_batched':
    return analyse(lowered_scores(cfg, batch, seq_len), positions, cfg.vocab_size)
  out = analyse(
    lowered_step(cfg, workload.removesuffix('_step'), batch, seq_len, lora_rank),
    positions,
    cfg.vocab_size,
  )
  if workload == 'dpo_step':
    ref = analyse(lowered_reference(cfg, batch, seq_len), positions, cfg.vocab_size)
    out['flops'] += ref['flops']
    out['peak_bytes'] = max(out['peak_bytes'], ref['peak_bytes'])
    out['vocab_buffers'] += ref['vocab_buffers']
    out['hlo'] += ref['hlo']
  return out


FLAGS = flags.FLAGS


def main(argv: Sequence[str]) -> None:
  del argv
  from ilr_jax import bench

  cfg = bench.model_config(FLAGS.shape, FLAGS.arch, FLAGS.dtype)
  cfg = cfg.replace(scan_layers=FLAGS.scan_layers, remat=FLAGS.remat)
  if FLAGS.attention is not None:
    cfg = cfg.replace(attention=FLAGS.attention)
  for name in FLAGS.workloads:
    if name not in WORKLOADS:
      raise app.UsageError(f'unknown workload {name!r}; expected some of {WORKLOADS}')
    default_t = 192 if name == 'classify_batched' else 128
    b, t = FLAGS.batch or (16 if name == 'classify_batched' else 8), FLAGS.seq_len or default_t
    out = workload_costs(cfg, name, b, t, FLAGS.lora_rank)
    del out['hlo']
    rec = {'name': name, 'shape': FLAGS.shape, 'arch': FLAGS.arch, 'dtype': FLAGS.dtype}
    rec.update({'batch': b, 'seq_len': t, 'lora_rank': FLAGS.lora_rank, **out})
    print(json.dumps(rec), flush=True)


if __name__ == '__main__':
  flags.DEFINE_string('shape', 'bench-small', 'bench-small, bench-tiny, gemma-2b or mistral-7b')
  flags.DEFINE_string('arch', 'mistral', 'mistral, gemma or llama')
  flags.DEFINE_string('dtype', 'float32', 'parameter and compute dtype')
  flags.DEFINE_list('workloads', list(WORKLOADS), 'some of ' + ', '.join(WORKLOADS))
  flags.DEFINE_integer('batch', None, 'rows (sequences; dpo: 2 x pairs)')
  flags.DEFINE_integer('seq_len', None, 'tokens per row')
  flags.DEFINE_integer('lora_rank', 0, 'LoRA rank (0: full fine-tune)')
  flags.DEFINE_bool('scan_layers', False, 'scan the layers (memory as run; FLOPs count 1 layer)')
  flags.DEFINE_enum('remat', 'none', ['none', 'full', 'dots'], 'rematerialisation of the layers')
  flags.DEFINE_string('attention', None, "attention implementation ('auto', 'xla', ...)")
  app.run(main)
