"""arith: the CPU experiment. Tiny bases pretrained on the arith corpus; a small supervisor and
evaluator, a bigger student; every stage of the paper's pipeline at a size a laptop runs.

README main command (2 CPU cores, about 15 minutes; prints the results table at the end and writes
results.jsonl, report.md and accuracy.png into the workdir):

  python -m ilr_jax.main --config=configs/arith.py:compare --workdir=/tmp/arith

The arg picks the method (sft, ilr, naive, dpo, orailr, oradpo, cororailr, cororadpo, compare) and
switches:
  tiny  shrinks everything (2 rounds of 48 labels, few steps, short answers) so the whole pipeline
        runs in about a minute; the tests use `configs/arith.py:compare,tiny`. Numbers from it
        mean nothing.
  all   with compare: run all eight methods, not only sft, ilr, naive and dpo.

The 3-seed science run: `launch/arith_seeds.sh` (one workdir per seed, then a combined report).

Task tuning (the task, not the methods): problems take 2 to 3 steps with operands up to 30, so
that the small supervisor gets roughly a third of half B right and the bigger student has room
above its labels; see docs/RESULTS.md.
"""

from ilr_jax import pipeline


def get_config(arg: str = 'compare'):
  method, switches = pipeline.parse_arg(arg, known_switches=('tiny', 'all'))
  config = pipeline.base_config(method, task='arith')
  if 'all' in switches:
    config.methods = pipeline.METHODS
  config.num_rounds = 4

  config.task.seed = config.get_ref('seed')  # new seed, new problems
  config.task.num_train = 1200
  config.task.num_test = 200
  config.task.max_new_tokens = 64
  config.task.min_steps = 2
  config.task.max_steps = 3
  config.task.max_operand = 30
  config.task.max_factor = 4
  config.task.max_value = 300
  config.task.distractor_prob = 0.25

  tokenizer = 'data/arith/spm.model'
  for role, preset, steps in (('supervisor', 'tiny', 300), ('student', 'tiny-large', 600)):
    model = config[role]
    model.init = 'pretrain'
    model.preset = preset
    model.model_dir = ''
    model.tokenizer = tokenizer
    model.pretrain_steps = steps

  config.pretrain.corpus_size = 20000
  config.pretrain.lr = 3e-3
  config.pretrain.batch_size = 32
  config.pretrain.max_len = 96

  # Tiny models train fully (no LoRA) with larger rates than the paper's 7B LoRA runs.
  for train in (config.supervisor_sft, config.sft):
    train.lora_rank = 0
    train.lr = 1e-3
    train.epochs = 3
    train.batch_size = 32
    train.max_len = 192
  config.supervisor_sft.epochs = 2
  config.evaluator_train.lr = 3e-4
  config.evaluator_train.batch_size = 32
  config.evaluator_train.max_epochs = 3
  config.evaluator_train.num_checkpoints = 4
  config.evaluator_train.max_len = 320
  config.dpo.lr = 1e-5
  config.dpo.batch_size = 16
  config.dpo.optimizer = 'rmsprop'
  config.sampling.batch_size = 128
  config.sampling.score_batch_size = 64

  if 'tiny' in switches:
    config.num_rounds = 1
    config.task.num_train = 96
    config.task.num_test = 32
    config.task.max_new_tokens = 40
    config.supervisor.pretrain_steps = 20
    config.student.pretrain_steps = 20
    config.pretrain.corpus_size = 640
    config.pretrain.max_len = 64
    for train in (config.supervisor_sft, config.sft):
      train.epochs = 1
      train.batch_size = 16
    config.evaluator_train.max_epochs = 1
    config.evaluator_train.num_checkpoints = 2
    config.dpo.batch_size = 8
    config.dpo.epochs = 1
    config.sampling.batch_size = 64
  return config
