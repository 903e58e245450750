"""GSM8K: Gemma-2B weak supervisor and evaluator, Mistral-7B student (the paper's main setting).

Command (a TPU VM or a GPU host; model directories are HF checkpoints, see launch/):

  python -m ilr_jax.main --config=configs/gsm8k.py:ilr --workdir=/data/runs/gsm8k_ilr \\
    --config.supervisor.model_dir=/data/models/gemma-2b \\
    --config.evaluator.model_dir=/data/models/gemma-2b \\
    --config.student.model_dir=/data/models/mistral-7b

The arg picks the method: sft, ilr, naive, dpo, orailr, oradpo, cororailr, cororadpo, or compare
(sft, ilr, naive and dpo on the same weak labels and evaluator). Switch `mistral7b-llama70b`
(`configs/gsm8k.py:ilr,mistral7b-llama70b`) gives the Mistral-7B -> Llama-3-70B pair (a Mistral-7B
supervisor trains at lr 1e-4 as in the released scripts; the student uses Adafactor, FSDP over all
devices). Data: the HF hub (openai/gsm8k, main), or, taking precedence,
`--config.task.data_dir=DIR` (a datasets.save_to_disk folder, e.g. ../shared/data/gsm8k).

Expected run time: about 30 h for `compare` on one 8-chip v4 host (three LoRA runs of Mistral-7B
and about 11k beam-search generations per ILR round). It prints the results table at the end and
writes results.jsonl, report.md and accuracy.png into the workdir.
"""

from ml_collections import config_dict

from ilr_jax import schema


def get_config(arg: str = 'ilr'):
  method, switches = schema.parse_arg(arg, known_switches=('mistral7b-llama70b', '1gpu'))
  config = schema.base_config(method, task='gsm8k')
  config.task.data_dir = config_dict.placeholder(str)  # set: used instead of the hub
  config.task.hub_id = 'openai/gsm8k'
  config.task.hub_config = 'main'
  config.task.max_new_tokens = 256

  config.supervisor.preset = 'gemma-2b'
  config.evaluator.preset = 'gemma-2b'
  config.student.preset = 'mistral-7b'
  config.supervisor_sft.lr = 5e-4
  config.sft.lr = 1e-4
  config.sft.epochs = 2

  # What fits the paper's hardware (docs/SCALE.md, checked by `python -m ilr_jax.compile_check`):
  # bfloat16 compute with float32 parameters, every layer rematerialised in the backward pass,
  # batches of 32 sequences in micro-batches of 8 (the same gradient, accumulated), and tensor
  # parallelism over all devices: decoding keeps the weights whole over fsdp
  # (sharding.DECODE_RULES), so on a v4-8 fsdp=4 leaves Mistral-7B's 29 GB whole on every chip.
  for role in ('supervisor', 'evaluator', 'student'):
    config[role].dtype = 'bfloat16'
    config[role].remat = 'full'
  config.mesh.data = 1
  config.mesh.fsdp = 1
  config.mesh.tensor = -1
  for train in (config.supervisor_sft, config.sft, config.dpo):
    train.micro_batch = 8
  config.evaluator_train.micro_batch = 8

  if '1gpu' in switches:
    # One 80 GB GPU holds the LoRA model and, while decoding, its merged copy: both in bfloat16
    # (the adapter too), and 32 prompts per decoding call.
    for role in ('supervisor', 'evaluator', 'student'):
      config[role].param_dtype = 'bfloat16'
    config.sampling.batch_size = 32

  if 'mistral7b-llama70b' in switches:
    config.supervisor.preset = 'mistral-7b'
    config.evaluator.preset = 'mistral-7b'
    config.student.preset = 'llama-3-70b'
    config.supervisor_sft.lr = 1e-4  # METHOD.md: a Mistral-7B supervisor trains at 1e-4
    config.sft.optimizer = 'adafactor'
    config.student.param_dtype = 'bfloat16'
    # Decoding keeps the weights whole over fsdp (sharding.DECODE_RULES), so a 70B model decodes
    # only with tensor parallelism: 8-way on an 8-GPU host (the default here). It does not fit a
    # v5e-64 slice's decoding yet (docs/SCALE.md).
    config.mesh.tensor = 8
    config.mesh.fsdp = -1
    for train in (config.supervisor_sft, config.sft, config.dpo, config.evaluator_train):
      train.micro_batch = 4
  return config
