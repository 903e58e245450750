"""BIRD text-to-SQL: Gemma-2B weak supervisor and evaluator, Llama-3-70B student.

Command (a TPU VM with >= 16 chips or an 8xH100 host; model directories are HF checkpoints):

  python -m ilr_jax.main --config=configs/bird.py:ilr --workdir=/data/runs/bird_ilr \\
    --config.task.data_dir=/data/bird/hf --config.task.db_root=/data/bird/databases \\
    --config.supervisor.model_dir=/data/models/gemma-2b \\
    --config.student.model_dir=/data/models/llama-3-70b

The arg picks the method (sft, ilr, naive, dpo, orailr, oradpo, cororailr, cororadpo, compare).
data_dir is a datasets.save_to_disk folder with train and test splits (question, answer = gold
SQL, db_name); db_root holds `<db_name>/<db_name>.sqlite`. Agreement and grading are equal result
sets, run read-only with a time limit.

Expected run time: several days for `compare` (Llama-3-70B LoRA with Adafactor, FSDP over all
devices). It prints the results table and writes results.jsonl, report.md and accuracy.png.
"""

from ml_collections import config_dict

from ilr_jax import schema


def get_config(arg: str = 'ilr'):
  method, _ = schema.parse_arg(arg)
  config = schema.base_config(method, task='bird')
  config.task.data_dir = config_dict.placeholder(str)
  config.task.db_root = config_dict.placeholder(str)
  config.task.timeout_s = 30.0
  config.task.num_workers = 8
  config.task.max_new_tokens = 256

  config.supervisor.preset = 'gemma-2b'
  config.student.preset = 'llama-3-70b'
  config.student.dtype = 'bfloat16'
  config.student.param_dtype = 'bfloat16'
  config.student.remat = 'full'
  config.supervisor_sft.lr = 5e-4
  config.sft.lr = 1e-4
  config.sft.optimizer = 'adafactor'
  config.sft.max_len = 2048
  config.supervisor_sft.max_len = 2048
  config.evaluator_train.max_len = 4096
  # What fits (docs/SCALE.md, checked by `python -m ilr_jax.compile_check`): bfloat16 compute,
  # every layer rematerialised, micro-batches of 4. Decoding keeps the weights whole over fsdp
  # (sharding.DECODE_RULES), so the 70B student decodes only with tensor parallelism: 8-way on an
  # 8-GPU host (the default here). It does not fit a v5e-64 slice's decoding yet (docs/SCALE.md).
  for role in ('supervisor', 'evaluator'):
    config[role].dtype = 'bfloat16'
    config[role].remat = 'full'
  config.mesh.data = 1
  config.mesh.fsdp = -1
  config.mesh.tensor = 8
  for train in (config.supervisor_sft, config.sft, config.dpo, config.evaluator_train):
    train.micro_batch = 4
  return config
