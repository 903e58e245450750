"""SaferPaca: Gemma-2B weak supervisor and evaluator, Mistral-7B student; win rate by a judge.

Command (a TPU VM or a GPU host; model directories are HF checkpoints):

  python -m ilr_jax.main --config=configs/saferpaca.py:ilr --workdir=/data/runs/saferpaca_ilr \\
    --config.task.data_dir=/data/saferpaca/hf \\
    --config.supervisor.model_dir=/data/models/gemma-2b \\
    --config.student.model_dir=/data/models/mistral-7b \\
    --config.task.judge.backend=http --config.task.judge.base_url=http://localhost:8000/v1 \\
    --config.task.judge.model=judge-model \\
    --config.task.embedder.backend=local --config.task.embedder.model_dir=/data/models/embedder

The arg picks the method (sft, ilr, naive, dpo, orailr, oradpo, cororailr, cororadpo, compare).
Labels and proposals are sampled at temperature 1.0, DPO samples too; agreement is embedding
similarity above the median; test win rate is judged against the reference answers in both
orders by a pluggable judge (task.judge; see ilr_jax/judge.py for the backends, one of
which needs no network).

Expected run time: about 20 h for `compare` on one 8-chip v4 host (4 SFT and DPO epochs, 512-token
answers).
It prints the results table and writes results.jsonl, report.md and accuracy.png.
"""

import ml_collections
from ml_collections import config_dict

from ilr_jax import schema


def get_config(arg: str = 'ilr'):
  method, _ = schema.parse_arg(arg)
  config = schema.base_config(method, task='saferpaca')
  config.task.data_dir = config_dict.placeholder(str)
  config.task.max_new_tokens = 512
  # Judge and embedder backends (ilr_jax/judge.py): 'http' (an OpenAI-compatible endpoint:
  # base_url, model, key in $OPENAI_API_KEY) or 'local' (model_dir: an HF LM, no network).
  for name in ('judge', 'embedder'):
    config.task[name] = ml_collections.ConfigDict()
    config.task[name].backend = config_dict.placeholder(str)
    config.task[name].base_url = config_dict.placeholder(str)
    config.task[name].model = config_dict.placeholder(str)
    config.task[name].model_dir = config_dict.placeholder(str)

  config.supervisor.preset = 'gemma-2b'
  config.student.preset = 'mistral-7b'
  config.supervisor_sft.lr = 5e-4
  config.sft.lr = 1e-4
  config.supervisor_sft.epochs = 4
  config.sft.epochs = 4
  config.dpo.epochs = 4  # METHOD.md: SaferPaca's DPO rounds run 4 epochs, as its SFT
  # Question + answer rows reach about 4,500 characters (about 1,100 Gemma tokens, more with a
  # smaller vocabulary); 2048 fits every row of the shared splits with either tokenizer, and
  # pipeline.run checks the longest example of every split against it before any stage.
  config.supervisor_sft.max_len = 2048
  config.sft.max_len = 2048
  return config
