"""Trains data/arith/spm.model, the SentencePiece tokenizer of the synthetic `arith` task.

Run from the repository root (with the package installed, `pip install -e .`):
  python data/arith/make_tokenizer.py            # rewrites data/arith/spm.model
  python data/arith/make_tokenizer.py --check    # retrains in memory, fails if the file differs

The training text is deterministic: arith problems in the SFT prompt format, the pretraining
corpus, and the evaluator's comparison prompt, all from fixed seeds, with operands up to 100 so
every difficulty setting is covered. Settings: BPE, 512 pieces (256 of them byte-fallback
pieces), digits split one per token, identity normalisation with no whitespace folding and no
dummy prefix, and '\\n' as its own piece, so any string round-trips exactly. Ids: unk 0, bos 1,
eos 2, pad 3. One training thread and unshuffled input make the output file reproducible.
"""

import argparse
import io
import pathlib
import sys

import sentencepiece as spm

from ilr_jax import arith

OUT = pathlib.Path(__file__).resolve().parent / 'spm.model'
SEED = 'spm-v1'
VOCAB_SIZE = 512
# The prompt formats the tokenizer must encode compactly (tokens.py and the evaluator use them).
SFT_PROMPT = 'USER:\n{question}\n\nASSISTANT:\n'
EVALUATOR_PROMPT = (
  'QUESTION:\n{q}\n\nANSWER (A):\n{a}\n\nANSWER (B):\n{b}\n\nYou gave the answer (A) to the '
  'question. Do you accept to change it to answer (B) proposed by another model?'
)


def training_text() -> list[str]:
  """The deterministic training sentences (each may hold newlines)."""
  cfg = arith.ArithConfig(
    min_steps=1, max_steps=4, max_operand=100, max_factor=9, distractor_prob=0.5
  )
  problems = arith.generate(f'{SEED}/problems', 3000, cfg)
  text = [SFT_PROMPT.format(question=p.question) + p.answer for p in problems]
  text += arith.make_corpus(f'{SEED}/corpus', 3000, cfg)
  pairs = zip(problems[:300], problems[300:600])
  text += [EVALUATOR_PROMPT.format(q=p.question, a=p.answer, b=o.answer) for p, o in pairs]
  return text


def train() -> bytes:
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(training_text()),
    model_writer=model,
    model_type='bpe',
    vocab_size=VOCAB_SIZE,
    character_coverage=1.0,
    byte_fallback=True,
    split_digits=True,
    normalization_rule_name='identity',
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    user_defined_symbols=['\n'],
    unk_id=0,
    bos_id=1,
    eos_id=2,
    pad_id=3,
    max_sentence_length=16384,
    num_threads=1,
    shuffle_input_sentence=False,
    minloglevel=2,
  )
  return model.getvalue()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--check', action='store_true', help='compare with the committed file')
  args = parser.parse_args()
  data = train()
  if args.check:
    if OUT.read_bytes() != data:
      sys.exit(f'{OUT} differs from a fresh training run')
    print(f'{OUT} is reproducible ({len(data)} bytes)')
    return
  OUT.write_bytes(data)
  print(f'wrote {OUT} ({len(data)} bytes)')


if __name__ == '__main__':
  main()
