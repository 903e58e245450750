"""The PyTorch peer of the benchmarks: transformers' models and the steps the workloads time.

Each function builds or runs the PyTorch side of one workload as the released code would run it
(transformers' model classes, PEFT-style LoRA, HF Trainer-like SFT and DPO losses), with the same
shapes, seed rule and optimizer settings as the JAX side (docs/BENCH.md). This module is the only
one of ilr_jax that imports torch; the workloads import it only with `--peer=torch`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
import transformers

from ilr_jax import convert
from ilr_jax.decoding import BeamSearch, Sample
from ilr_jax.model import ModelConfig

DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16}
LR = 5e-5  # docs/BENCH.md: AdamW, no weight decay, no clipping, no schedule


def device() -> str:
  return 'cuda' if torch.cuda.is_available() else 'cpu'


def sync() -> None:
  """Wait for the device, so that a timed call ends when its work does."""
  if torch.cuda.is_available():
    torch.cuda.synchronize()


def _from_config(auto_cls, cfg: ModelConfig, seed: int):
  torch.manual_seed(seed)
  hf_cfg = transformers.AutoConfig.for_model(**convert.hf_config_dict(cfg))
  return auto_cls.from_config(hf_cfg, dtype=DTYPES[cfg.param_dtype]).to(device())


def causal_lm(cfg: ModelConfig, seed: int, lora_rank: int = 0, lora_alpha: float = 0.0):
  """transformers' causal LM of `cfg`, random init (seeded), train mode, on the device."""
  model = _from_config(transformers.AutoModelForCausalLM, cfg, seed)
  if lora_rank:
    add_lora(model, lora_rank, lora_alpha)
  return model.train()


def classifier(cfg: ModelConfig, seed: int):
  """transformers' sequence classifier of `cfg` (cfg.num_labels classes), eval mode."""
  return _from_config(transformers.AutoModelForSequenceClassification, cfg, seed).eval()


def add_lora(model, rank: int, alpha: float) -> None:
  """PEFT's LoRA on every linear layer of the decoder blocks (A kaiming-uniform, B zero)."""

  class LoraLinear(torch.nn.Module):
    def __init__(self, base: torch.nn.Linear):
      super().__init__()
      self.base = base
      self.lora_a = torch.nn.Linear(base.in_features, rank, bias=False, dtype=base.weight.dtype)
      self.lora_b = torch.nn.Linear(rank, base.out_features, bias=False, dtype=base.weight.dtype)
      torch.nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
      torch.nn.init.zeros_(self.lora_b.weight)
      self.scale = alpha / rank

    def forward(self, x):
      return self.base(x) + self.lora_b(self.lora_a(x)) * self.scale

  for p in model.parameters():
    p.requires_grad_(False)
  for layer in model.model.layers:
    for parent in (layer.self_attn, layer.mlp):
      for name, child in list(parent.named_children()):
        if isinstance(child, torch.nn.Linear):
          setattr(parent, name, LoraLinear(child).to(child.weight.device))


def _optimizer(model):
  params = [p for p in model.parameters() if p.requires_grad]
  return torch.optim.AdamW(params, lr=LR, weight_decay=0.0)


def _answer_logps(model, ids, answer_len: int):
  """Log-probs [B, answer_len] of each row's last `answer_len` tokens. The model computes logits
  at every position, as HF's Trainer does."""
  t = ids.shape[1]
  logits = model(input_ids=ids).logits.float()
  lp = torch.log_softmax(logits[:, t - answer_len - 1 : t - 1], dim=-1)
  return lp.gather(-1, ids[:, t - answer_len :, None])[..., 0]


def sft_step(model, tokens_BT: np.ndarray, answer_len: int) -> Callable[[], torch.Tensor]:
  """One AdamW step of the SFT loss (mean NLL of the last `answer_len` tokens) per call."""
  opt = _optimizer(model)
  ids = torch.as_tensor(tokens_BT, dtype=torch.long, device=device())

  def step():
    opt.zero_grad(set_to_none=True)
    loss = -_answer_logps(model, ids, answer_len).mean(-1).mean()
    loss.backward()
    opt.step()
    return loss

  return step


def dpo_step(
  policy, chosen_BT: np.ndarray, rejected_BT: np.ndarray, answer_len: int, beta: float = 0.1
) -> Callable[[], torch.Tensor]:
  """One AdamW step of the DPO loss per call; the reference is a frozen copy of the policy and
  its log-probs are computed in the step, as TRL does without precomputed reference log-probs."""
  reference = copy.deepcopy(policy).eval()
  opt = _optimizer(policy)
  pairs = chosen_BT.shape[0]
  both = torch.as_tensor(
    np.concatenate([chosen_BT, rejected_BT]), dtype=torch.long, device=device()
  )

  def step():
    with torch.no_grad():
      ref = _answer_logps(reference, both, answer_len).sum(-1)
    opt.zero_grad(set_to_none=True)
    pol = _answer_logps(policy, both, answer_len).sum(-1)
    margin = (pol[:pairs] - ref[:pairs]) - (pol[pairs:] - ref[pairs:])
    loss = -F.logsigmoid(beta * margin).mean()
    loss.backward()
    opt.step()
    return loss

  return step


def classify(model, ids_BT: np.ndarray) -> torch.Tensor:
  """Class probabilities [B, C] of one batch of prompts."""
  with torch.inference_mode():
    ids = torch.as_tensor(ids_BT, dtype=torch.long, device=device())
    return torch.softmax(model(input_ids=ids).logits.float(), dim=-1)


def generate(
  cfg: ModelConfig, seed: int, tokens_BP: np.ndarray, method, new_tokens: int
) -> Callable[[], torch.Tensor]:
  """transformers' `generate` of exactly `new_tokens` tokens per row (min = max new tokens) with
  the settings of a sampler method (Greedy, Sample or BeamSearch)."""
  model = causal_lm(cfg, seed).eval()
  ids = torch.as_tensor(tokens_BP, dtype=torch.long, device=device())
  mask = torch.ones_like(ids)
  if isinstance(method, Sample):
    kw = dict(do_sample=True, temperature=method.temperature, top_k=0, top_p=method.top_p)
  elif isinstance(method, BeamSearch):
    kw = dict(
      do_sample=False,
      num_beams=method.num_beams,
      length_penalty=method.length_penalty,
      early_stopping=method.early_stopping,
    )
  else:
    kw = dict(do_sample=False)

  def run():
    with torch.inference_mode():
      return model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=0,
        **kw,
      )

  return run
