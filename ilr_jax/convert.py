"""Hugging Face checkpoints <-> our model, and our own model checkpoint format.

Import: config.json (through transformers' AutoConfig) and single or sharded safetensors, read
without torch through a memory map, checked against the model (missing, extra or mis-shaped
tensors are a one-line error before anything is allocated), then placed parameter by parameter
straight into the requested sharding. Host memory holds one parameter (all layers of it) at a time.

Export: the inverse map, written parameter by parameter as safetensors shards that transformers'
PyTorch `from_pretrained` loads with the same outputs.

Command:
  python -m ilr_jax.convert --from_hf=HF_DIR --out=CKPT_DIR
  python -m ilr_jax.convert --checkpoint=CKPT_DIR --to_hf=HF_DIR
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from ilr_jax import sharding as shd
from ilr_jax.model import Decoder, ModelConfig, RopeScaling, num_params
from ilr_jax.workdir import ArtifactError, load

TOKENIZER_FILES = tuple(
  'tokenizer.json tokenizer_config.json tokenizer.model special_tokens_map.json '
  'generation_config.json chat_template.jinja spm.model'.split()
)
_ST_DTYPES = {
  'F32': np.dtype(np.float32),
  'F16': np.dtype(np.float16),
  'BF16': np.dtype(ml_dtypes.bfloat16),
  'F64': np.dtype(np.float64),
}
_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}
_SHARD_BYTES = 4 << 30


class CheckpointError(ValueError):
  """A checkpoint that cannot be read into, or written from, the model (message is one line)."""


# -- config ------------------------------------------------------------------------------------


def config_from_hf(hf, **overrides) -> ModelConfig:
  """ModelConfig from a transformers config object (Gemma, Mistral or Llama)."""
  mt = hf.model_type
  if mt not in ('gemma', 'mistral', 'llama'):
    raise CheckpointError(f'unsupported model_type {mt!r}; supported: gemma, mistral, llama')
  for flag in ('attention_bias', 'mlp_bias'):
    if getattr(hf, flag, False):
      raise CheckpointError(f'{flag}=True is not supported (model_type {mt!r})')
  act = getattr(hf, 'hidden_activation', None) or hf.hidden_act
  if mt == 'gemma':
    # transformers maps Gemma's legacy 'gelu' to the tanh approximation too.
    if act not in ('gelu_pytorch_tanh', 'gelu', 'gelu_new'):
      raise CheckpointError(f'unsupported Gemma activation {act!r}')
    act = 'gelu_tanh'
  elif act != 'silu':
    raise CheckpointError(f'unsupported activation {act!r} for model_type {mt!r}')
  rope = dict(getattr(hf, 'rope_parameters', None) or {})
  theta = rope.get('rope_theta', getattr(hf, 'rope_theta', 10000.0))
  rope_type = rope.get('rope_type', 'default')
  scaling = None
  if rope_type == 'llama3':
    scaling = RopeScaling(
      factor=float(rope['factor']),
      low_freq_factor=float(rope['low_freq_factor']),
      high_freq_factor=float(rope['high_freq_factor']),
      original_max_position_embeddings=int(rope['original_max_position_embeddings']),
    )
  elif rope_type != 'default':
    raise CheckpointError(f'unsupported rope_type {rope_type!r}; supported: default, llama3')
  eos = hf.eos_token_id
  eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
  archs = getattr(hf, 'architectures', None) or []
  is_cls = any(a.endswith('ForSequenceClassification') for a in archs)
  head_dim = getattr(hf, 'head_dim', None) or hf.hidden_size // hf.num_attention_heads
  kw = dict(
    arch=mt,
    vocab_size=hf.vocab_size,
    hidden_size=hf.hidden_size,
    intermediate_size=hf.intermediate_size,
    num_layers=hf.num_hidden_layers,
    num_heads=hf.num_attention_heads,
    num_kv_heads=getattr(hf, 'num_key_value_heads', None) or hf.num_attention_heads,
    head_dim=head_dim,
    activation=act,
    norm_eps=hf.rms_norm_eps,
    norm_offset=mt == 'gemma',
    embed_scale=mt == 'gemma',
    tie_embeddings=bool(getattr(hf, 'tie_word_embeddings', False)),
    rope_theta=float(theta),
    rope_scaling=scaling,
    sliding_window=getattr(hf, 'sliding_window', None) if mt == 'mistral' else None,
    max_position_embeddings=hf.max_position_embeddings,
    bos_token_id=hf.bos_token_id,
    eos_token_ids=eos,
    pad_token_id=hf.pad_token_id,
    num_labels=hf.num_labels if is_cls else None,
  )
  kw.update(overrides)
  return ModelConfig(**kw)


def hf_config_dict(cfg: ModelConfig) -> dict:
  """The config.json fields transformers needs to rebuild `cfg`."""
  cls = {'gemma': 'Gemma', 'mistral': 'Mistral', 'llama': 'Llama'}[cfg.arch]
  head = 'ForSequenceClassification' if cfg.num_labels else 'ForCausalLM'
  rope = {'rope_type': 'default', 'rope_theta': cfg.rope_theta}
  if cfg.rope_scaling is not None:
    rope = {
      'rope_type': 'llama3',
      'rope_theta': cfg.rope_theta,
      **dataclasses.asdict(cfg.rope_scaling),
    }
  d = dict(
    model_type=cfg.arch,
    architectures=[cls + head],
    vocab_size=cfg.vocab_size,
    hidden_size=cfg.hidden_size,
    intermediate_size=cfg.intermediate_size,
    num_hidden_layers=cfg.num_layers,
    num_attention_heads=cfg.num_heads,
    num_key_value_heads=cfg.num_kv_heads,
    head_dim=cfg.head_dim,
    rms_norm_eps=cfg.norm_eps,
    tie_word_embeddings=cfg.tie_embeddings,
    rope_parameters=rope,
    max_position_embeddings=cfg.max_position_embeddings,
    bos_token_id=cfg.bos_token_id,
    eos_token_id=list(cfg.eos_token_ids)
    if len(cfg.eos_token_ids) > 1
    else (cfg.eos_token_ids[0] if cfg.eos_token_ids else None),
    pad_token_id=cfg.pad_token_id,
    dtype=cfg.param_dtype,
  )
  d['hidden_activation' if cfg.arch == 'gemma' else 'hidden_act'] = (
    'gelu_pytorch_tanh' if cfg.activation == 'gelu_tanh' else 'silu'
  )
  if cfg.arch == 'mistral':
    d['sliding_window'] = cfg.sliding_window
  if cfg.num_labels:
    d['num_labels'] = cfg.num_labels
  return d


# -- the parameter map -------------------------------------------------------------------------
# Our parameter path -> (HF tensor name, with {i} for the layer, to_ours, to_hf). HF linear
# weights are [out, in]; ours are in_shape + out_shape.


def _lin_in(cfg: ModelConfig, out_shape: Callable[[ModelConfig], tuple[int, ...]]):
  def to_ours(w):
    return w.T.reshape((w.shape[1],) + out_shape(cfg))

  def to_hf(k):
    return k.reshape(k.shape[0], -1).T

  return to_ours, to_hf


def _lin_out(cfg: ModelConfig):
  def to_ours(w):
    return w.T.reshape(cfg.num_heads, cfg.head_dim, w.shape[0])

  def to_hf(k):
    return k.reshape(-1, k.shape[-1]).T

  return to_ours, to_hf


def _t():
  return (lambda w: w.T), (lambda k: k.T)


def _id():
  return (lambda w: w), (lambda k: k)


def param_map(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[str, Callable, Callable]]:
  """Our parameter path -> (HF name, to_ours, to_hf) for every base parameter of `cfg`."""
  heads = lambda c: (c.num_heads, c.head_dim)  # noqa: E731
  kv = lambda c: (c.num_kv_heads, c.head_dim)  # noqa: E731
  pre = 'model.layers.{i}.'
  m = {
    ('embedding',): ('model.embed_tokens.weight', *_id()),
    ('final_norm', 'scale'): ('model.norm.weight', *_id()),
    ('layers', 'attn_norm', 'scale'): (pre + 'input_layernorm.weight', *_id()),
    ('layers', 'mlp_norm', 'scale'): (pre + 'post_attention_layernorm.weight', *_id()),
    ('layers', 'q', 'kernel'): (pre + 'self_attn.q_proj.weight', *_lin_in(cfg, heads)),
    ('layers', 'k', 'kernel'): (pre + 'self_attn.k_proj.weight', *_lin_in(cfg, kv)),
    ('layers', 'v', 'kernel'): (pre + 'self_attn.v_proj.weight', *_lin_in(cfg, kv)),
    ('layers', 'o', 'kernel'): (pre + 'self_attn.o_proj.weight', *_lin_out(cfg)),
    ('layers', 'gate', 'kernel'): (pre + 'mlp.gate_proj.weight', *_t()),
    ('layers', 'up', 'kernel'): (pre + 'mlp.up_proj.weight', *_t()),
    ('layers', 'down', 'kernel'): (pre + 'mlp.down_proj.weight', *_t()),
  }
  if cfg.num_labels:
    m[('score_head', 'kernel')] = ('score.weight', *_t())
  elif not cfg.tie_embeddings:
    m[('lm_head', 'kernel')] = ('lm_head.weight', *_t())
  return m


def _hf_names(name: str, cfg: ModelConfig) -> list[str]:
  return [name.format(i=i) for i in range(cfg.num_layers)] if '{i}' in name else [name]


# -- safetensors without torch -----------------------------------------------------------------


def _read_header(fp: pathlib.Path) -> tuple[int, dict]:
  """(header length, header) of a safetensors file; a truncated or foreign one: CheckpointError."""
  size, raw = fp.stat().st_size, fp.open('rb')
  with raw:  # a foreign file's "length" is garbage and its "header" no JSON object
    n = struct.unpack('<Q', raw.read(8))[0] if size >= 8 else size
    try:
      header = json.loads(raw.read(n)) if 8 + n <= size else None
      end = max(8 + n + v['data_offsets'][1] for k, v in header.items() if k != '__metadata__')
    except (UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError, IndexError):
      end = size + 1
  if end > size:
    raise CheckpointError(f'{fp} is not a complete safetensors file (truncated or not one)')
  return n, header


class SafetensorsDir:
  """The tensors of a model directory's safetensors files, memory-mapped, read one at a time."""

  def __init__(self, path: pathlib.Path):
    index = path / 'model.safetensors.index.json'
    if index.exists():
      files = sorted(set(json.loads(index.read_text())['weight_map'].values()))
    else:
      files = sorted(p.name for p in path.glob('*.safetensors'))
    if not files:
      raise CheckpointError(f'no *.safetensors files in {path}')
    self.entries: dict[str, tuple[pathlib.Path, int, str, tuple[int, ...], int]] = {}
    for f in files:
      fp = path / f
      if not fp.exists():
        raise CheckpointError(f'{fp} is named in the safetensors index but does not exist')
      n, header = _read_header(fp)
      for name, info in header.items():
        if name == '__metadata__':
          continue
        if info['dtype'] not in _ST_DTYPES:
          raise CheckpointError(f'tensor {name} in {fp} has unsupported dtype {info["dtype"]}')
        begin, _ = info['data_offsets']
        self.entries[name] = (fp, 8 + n + begin, info['dtype'], tuple(info['shape']), n)

  def shape(self, name: str) -> tuple[int, ...]:
    return self.entries[name][3]

  def get(self, name: str) -> np.ndarray:
    fp, offset, dtype, shape, _ = self.entries[name]
    return np.memmap(fp, dtype=_ST_DTYPES[dtype], mode='r', offset=offset, shape=shape)


def write_safetensors(
  out_dir: pathlib.Path,
  tensors: Iterator[tuple[str, np.ndarray]],
  specs: list[tuple[str, tuple[int, ...], np.dtype]],
) -> None:
  """Stream tensors (in the order of `specs`) into size-bounded safetensors shards + index."""
  shards, cur, size = [], [], 0
  for spec in specs:
    nbytes = int(np.prod(spec[1])) * spec[2].itemsize
    if cur and size + nbytes > _SHARD_BYTES:
      shards.append(cur)
      cur, size = [], 0
    cur.append(spec)
    size += nbytes
  shards.append(cur)
  names = (
    ['model.safetensors']
    if len(shards) == 1
    else [f'model-{k + 1:05d}-of-{len(shards):05d}.safetensors' for k in range(len(shards))]
  )
  it = iter(tensors)
  weight_map, total = {}, 0
  for fname, shard in zip(names, shards):
    header, off = {'__metadata__': {'format': 'pt'}}, 0
    for name, shape, dt in shard:
      nbytes = int(np.prod(shape)) * dt.itemsize
      header[name] = {
        'dtype': _ST_NAMES[dt],
        'shape': list(shape),
        'data_offsets': [off, off + nbytes],
      }
      off += nbytes
      weight_map[name] = fname
    raw = json.dumps(header, separators=(',', ':')).encode()
    raw += b' ' * (-len(raw) % 8)
    with open(out_dir / fname, 'wb') as fh:
      fh.write(struct.pack('<Q', len(raw)) + raw)
      for name, shape, dt in shard:
        got_name, arr = next(it)
        if got_name != name or tuple(arr.shape) != tuple(shape):
          raise CheckpointError(f'export order broke at {name} (got {got_name})')
        fh.write(np.ascontiguousarray(arr, dtype=dt).tobytes())
    total += off
  if len(shards) > 1:
    index = {'metadata': {'total_size': total}, 'weight_map': weight_map}
    (out_dir / 'model.safetensors.index.json').write_text(json.dumps(index, indent=2))


# -- import ------------------------------------------------------------------------------------


def _flat(state) -> dict[tuple[str, ...], nnx.Variable]:
  return {tuple(str(k) for k in path): var for path, var in nnx.to_flat_state(state)}


def _check(cfg: ModelConfig, st: SafetensorsDir) -> None:
  """Missing / extra / mis-shaped tensors, as one line, before anything is allocated."""
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
  flat = _flat(abstract)
  expected: dict[str, tuple[int, ...]] = {}
  for path, (name, _, to_hf) in param_map(cfg).items():
    shape = flat[path].shape
    names = _hf_names(name, cfg)
    one = shape[1:] if len(names) > 1 else shape
    hf_shape = jax.eval_shape(to_hf, jax.ShapeDtypeStruct(one, np.float32)).shape
    for n in names:
      expected[n] = tuple(hf_shape)
  present = set(st.entries)
  # Tied models may still carry a copy of the embedding as lm_head; rotary buffers are derived.
  ignorable = {n for n in present if n.endswith('rotary_emb.inv_freq')}
  if cfg.tie_embeddings:
    ignorable.add('lm_head.weight')
  missing = sorted(set(expected) - present)
  extra = sorted(present - set(expected) - ignorable)
  if missing:
    raise CheckpointError(
      f'checkpoint is missing tensor {missing[0]}'
      + (f' (and {len(missing) - 1} more)' if len(missing) > 1 else '')
    )
  if extra:
    raise CheckpointError(
      f'checkpoint has unexpected tensor {extra[0]}'
      + (f' (and {len(extra) - 1} more)' if len(extra) > 1 else '')
      + f' for model_type {cfg.arch!r}'
    )
  for n, shape in expected.items():
    if st.shape(n) != shape:
      raise CheckpointError(
        f'tensor {n} has shape {st.shape(n)}, expected {shape} from config.json'
      )


def read_hf_config(model_dir: str | os.PathLike):
  """transformers' config object of an HF model directory, with one-line errors."""
  import transformers

  path = pathlib.Path(model_dir)
  if not path.is_dir():
    raise CheckpointError(f'model directory {path} does not exist')
  if not (path / 'config.json').exists():
    raise CheckpointError(f'{path} has no config.json')
  model_type = json.loads((path / 'config.json').read_text()).get('model_type')
  if model_type not in ('gemma', 'mistral', 'llama'):
    raise CheckpointError(
      f'unsupported model_type {model_type!r} in {path / "config.json"}; '
      'supported: gemma, mistral, llama'
    )
  return transformers.AutoConfig.from_pretrained(path)


def load_hf(
  model_dir: str | os.PathLike, *, mesh=None, rules=shd.TRAIN_RULES, **overrides
) -> Decoder:
  """Load an HF model directory into a Decoder, each parameter placed into its sharding.

  Args:
    model_dir: directory with config.json and *.safetensors.
    mesh: a device mesh; parameters are created sharded by `rules` over it (default: one device).
    **overrides: ModelConfig fields to change (dtype, param_dtype, remat, scan_layers, ...).
  """
  path = pathlib.Path(model_dir)
  cfg = config_from_hf(read_hf_config(path), **overrides)
  if cfg.lora_rank:
    raise CheckpointError('load the base model with lora_rank=0, then add an adapter')
  st = SafetensorsDir(path)
  _check(cfg, st)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
  mesh = mesh if mesh is not None else shd.single_device_mesh()
  shardings = _flat(shd.state_shardings(abstract, mesh, rules))
  flat = _flat(abstract)
  pmap = param_map(cfg)
  values = {}
  for path_, var in flat.items():
    name, to_ours, _ = pmap[path_]
    dtype = var.dtype
    names = _hf_names(name, cfg)
    if len(names) > 1:
      host = np.stack([to_ours(np.asarray(st.get(n))) for n in names]).astype(dtype)
    else:
      host = np.asarray(to_ours(np.asarray(st.get(names[0])))).astype(dtype)
    sharding = shardings[path_]
    values[path_] = jax.make_array_from_callback(host.shape, sharding, lambda idx, h=host: h[idx])
    del host
  state = nnx.from_flat_state({k: flat[k].replace(values[k]) for k in flat})
  return nnx.merge(graphdef, state)


# -- export ------------------------------------------------------------------------------------


def save_hf(model: Decoder, out_dir: str | os.PathLike, *, tokenizer_dir=None) -> None:
  """Write `model` as an HF directory (config.json + safetensors) that transformers loads.

  A model with a LoRA adapter must be merged first. The directory is written next to its final
  place and renamed into it, so an interrupted export leaves nothing half-written behind.
  """
  cfg = model.cfg
  if cfg.lora_rank:
    raise CheckpointError('merge the LoRA adapter into the base before exporting')
  out = pathlib.Path(out_dir)
  if out.exists() and any(out.iterdir()):
    raise CheckpointError(f'output directory {out} exists and is not empty')
  import transformers

  flat = _flat(nnx.state(model))
  pmap = param_map(cfg)
  dtype = (
    np.dtype(ml_dtypes.bfloat16) if cfg.param_dtype == 'bfloat16' else np.dtype(cfg.param_dtype)
  )
  specs, order = [], []
  for path_, (name, _, to_hf) in pmap.items():
    names = _hf_names(name, cfg)
    one = flat[path_].shape[1:] if len(names) > 1 else flat[path_].shape
    hf_shape = jax.eval_shape(to_hf, jax.ShapeDtypeStruct(one, np.float32)).shape
    for i, n in enumerate(names):
      specs.append((n, tuple(hf_shape), dtype))
      order.append((path_, i if len(names) > 1 else None))

  def tensors():
    cache_path, cache = None, None
    for (path_, i), (n, _, _) in zip(order, specs):
      if path_ != cache_path:
        cache_path, cache = path_, shd.to_host(flat[path_][...])
      one = cache if i is None else cache[i]
      yield n, np.asarray(pmap[path_][2](one))

  out.parent.mkdir(parents=True, exist_ok=True)
  # Only process 0 writes the export, so only it makes the temporary directory.
  writer = jax.process_index() == 0
  tmp = (
    pathlib.Path(tempfile.mkdtemp(prefix=out.name + '.tmp-', dir=out.parent)) if writer else None
  )
  written = False
  try:
    if writer:
      write_safetensors(tmp, tensors(), specs)
      hf_cfg = transformers.AutoConfig.for_model(**hf_config_dict(cfg))
      hf_cfg.save_pretrained(tmp)
      if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, tmp)
    else:
      for _ in tensors():  # every process joins the gathers
        pass
    written = True
  finally:
    if not written and tmp is not None:  # an interrupted export leaves no half-written directory
      shutil.rmtree(tmp, ignore_errors=True)
  if jax.process_index() == 0:
    if out.exists():
      out.rmdir()
    tmp.rename(out)


def copy_tokenizer(src, dst) -> list[str]:
  """Copy the tokenizer files that exist in `src` into `dst`; returns their names."""
  copied = []
  for name in TOKENIZER_FILES:
    f = pathlib.Path(src) / name
    if f.exists():
      shutil.copy2(f, pathlib.Path(dst) / name)
      copied.append(name)
  return copied


# -- our checkpoint format ---------------------------------------------------------------------
# CKPT_DIR/model_config.json (ModelConfig fields) + CKPT_DIR/params (an orbax checkpoint of the
# parameter pytree) + tokenizer files when known. Written into a temporary sibling and renamed.

MODEL_CONFIG = 'model_config.json'


def save_checkpoint(model: Decoder, out_dir: str | os.PathLike, *, tokenizer_dir=None) -> None:
  """Save `model` (any sharding, LoRA included) in our format; atomic on the final rename."""
  import orbax.checkpoint as ocp

  out = pathlib.Path(out_dir).absolute()
  if out.exists():
    raise CheckpointError(f'checkpoint directory {out} already exists')
  out.parent.mkdir(parents=True, exist_ok=True)
  # One temporary path for every process: orbax writes each process's shards into the same
  # checkpoint (a per-process name would leave each waiting for the others' shards).
  tmp = out.parent / f'{out.name}.tmp'
  if tmp.exists() and jax.process_index() == 0:  # left by a killed attempt
    shutil.rmtree(tmp)
  _sync(f'save_checkpoint:{out}')
  params = nnx.to_pure_dict(nnx.state(model))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp / 'params', params)
    ckptr.wait_until_finished()
  if jax.process_index() == 0:
    (tmp / MODEL_CONFIG).write_text(json.dumps(model.cfg.to_dict(), indent=2))
    if tokenizer_dir is not None:
      copy_tokenizer(tokenizer_dir, tmp)
    tmp.rename(out)
  _sync(f'saved_checkpoint:{out}')


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def load_checkpoint(
  ckpt_dir: str | os.PathLike, *, mesh=None, rules=shd.TRAIN_RULES, **overrides
) -> Decoder:
  """Load a checkpoint written by `save_checkpoint`, parameters restored into their shardings.

  `overrides` may change numerics-only fields (dtype, remat, scan_layers), not shapes.
  """
  import orbax.checkpoint as ocp

  path = pathlib.Path(ckpt_dir).absolute()
  if not (path / MODEL_CONFIG).exists() or not (path / 'params').is_dir():
    raise CheckpointError(f'{path} is not an ilr_jax checkpoint (no {MODEL_CONFIG} or params/)')
  cfg = ModelConfig.from_dict(json.loads((path / MODEL_CONFIG).read_text())).replace(**overrides)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Decoder(cfg, rngs=nnx.Rngs(0))))
  mesh = mesh if mesh is not None else shd.single_device_mesh()
  shardings = shd.state_shardings(abstract, mesh, rules)
  target = jax.tree.map(
    lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
    abstract.to_pure_dict(),
    shardings.to_pure_dict(),
  )
  with ocp.StandardCheckpointer() as ckptr:
    restored = load(path / 'params', lambda p: ckptr.restore(p, target), 'checkpoint params')
  nnx.replace_by_pure_dict(abstract, restored)
  return nnx.merge(graphdef, abstract)


def load_model(path: str | os.PathLike, *, mesh=None, rules=shd.TRAIN_RULES, **overrides):
  """An HF directory or one of our checkpoints, told apart by the files it holds."""
  p = pathlib.Path(path)
  if (p / MODEL_CONFIG).exists():
    return load_checkpoint(p, mesh=mesh, rules=rules, **overrides)
  return load_hf(p, mesh=mesh, rules=rules, **overrides)


# -- command line ------------------------------------------------------------------------------


def main(argv) -> None:
  from absl import flags

  f = flags.FLAGS
  if len(argv) > 1:
    raise SystemExit(f'convert: unexpected arguments {argv[1:]}')
  try:
    if f.from_hf and f.out and not (f.checkpoint or f.to_hf):
      model = load_hf(f.from_hf, param_dtype=f.param_dtype) if f.param_dtype else load_hf(f.from_hf)
      save_checkpoint(model, f.out, tokenizer_dir=f.from_hf)
      print(f'wrote {f.out} ({model.cfg.arch}, {num_params(nnx.state(model)):,} parameters)')
    elif f.checkpoint and f.to_hf and not (f.from_hf or f.out):
      model = load_checkpoint(f.checkpoint)
      save_hf(model, f.to_hf, tokenizer_dir=f.checkpoint)
      print(f'wrote {f.to_hf} ({model.cfg.arch}, {num_params(nnx.state(model)):,} parameters)')
    else:
      raise SystemExit('convert: give either --from_hf and --out, or --checkpoint and --to_hf')
  except (CheckpointError, ArtifactError) as e:
    raise SystemExit(f'convert: {e}') from None


if __name__ == '__main__':
  from absl import app, flags

  flags.DEFINE_string('from_hf', None, 'HF model directory to import')
  flags.DEFINE_string('out', None, 'our checkpoint directory to write (with --from_hf)')
  flags.DEFINE_string('checkpoint', None, 'our checkpoint directory to export')
  flags.DEFINE_string('to_hf', None, 'HF directory to write (with --checkpoint)')
  flags.DEFINE_string('param_dtype', None, 'float32 or bfloat16 for the imported parameters')
  app.run(main)
