"""One training run of ``sat-train``: Hugging Face ``Trainer`` + :class:`sat_kernels.SATCallback`, timed per step,
then a dense evaluation on the held-out split.

Throughput is measured over the optimizer steps only (``on_step_begin`` to ``on_step_end``: forward, backward,
optimizer step; with a CUDA synchronisation at both ends on GPU). Model loading, data preparation, logging and
evaluation are excluded from tokens/s; the wall time of ``trainer.train()`` is reported separately. On a shared
machine the step times also carry other processes' load: the 1-minute load average is recorded before and after
each run, and the median step time is reported beside the mean.
"""
from __future__ import annotations

import copy
import gc
import math
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import sat_kernels as sk

from ..selection import DEFAULT_BACKWARD, DEFAULT_FORWARD
from .data import IGNORE_INDEX, collate
from .step_log import make_step_log, synchronize

SCHEDULERS = ("ladder", "constant", "linear")
# sat-train's --score-tokens default: the loss tokens. In sft (the loss on the answers) they gave the smallest eval-loss
# gap to dense in both seeds of the 30-step runs (+0.60% / -0.44%, against +1.34% / +0.33% for the real tokens and
# +1.61% / +0.45% for every token; docs/quality.md); in cpt (packed blocks, every token labelled) they are the real
# tokens but the last of each block. The library's default (replace_mlp, replace_attention) stays "real".
SAT_TRAIN_SCORE_TOKENS = "loss"
PRECISIONS = ("auto", "fp32", "bf16")
# every linear layer of a Llama-family decoder layer (attention and MLP); the LM head and embeddings stay frozen
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRASettings:
    """PEFT LoRA adapters of rank ``rank`` on the modules named ``targets``, trained on the frozen model
    (``sat-train --lora-rank``); ``alpha`` defaults to ``2 * rank``."""

    rank: int
    alpha: Optional[float] = None
    dropout: float = 0.0
    targets: Tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        if self.alpha is None:
            self.alpha = 2.0 * self.rank
        self.targets = tuple(self.targets)


@dataclass
class TrainConfig:
    """Settings shared by the dense and the SAT run of a comparison (see ``sat-train --help``); with ``lora`` both
    runs train the same LoRA adapters on the frozen model (:func:`add_lora`)."""

    task: str = "cpt"
    pack: bool = False               # sft: whole pairs packed into sequences of up to seq_len tokens
    steps: int = 30
    seq_len: int = 128
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int = 0
    sat_lr: Optional[float] = None   # peak learning rate of the runs SAT's schedule drives (default: lr)
    seed: int = 0
    omission_rate: float = 0.5
    attn_omission_rate: Optional[float] = None
    scheduler: str = "ladder"
    num_rungs: int = 2
    dense_fraction: float = 0.1
    dense_warmup_steps: int = 0
    metric: str = "l2"
    strategy: str = "topk"
    forward: str = DEFAULT_FORWARD
    backward: str = DEFAULT_BACKWARD
    score_tokens: str = SAT_TRAIN_SCORE_TOKENS
    skip_omitted_updates: bool = False
    per_layer_budget: bool = False
    hold_selection: bool = False
    backend: str = "auto"
    precision: str = "auto"
    eval_batch_size: int = 8
    lora: Optional[LoRASettings] = None


@dataclass
class RunResult:
    """Per-step logs and totals of one run. ``tokens_per_s`` = tokens of all steps / summed step times."""

    name: str
    sat: bool
    losses: List[float] = field(default_factory=list)
    grad_norms: List[Optional[float]] = field(default_factory=list)
    step_seconds: List[float] = field(default_factory=list)
    step_tokens: List[int] = field(default_factory=list)
    omission_rates: List[float] = field(default_factory=list)
    attn_omission_rates: List[float] = field(default_factory=list)
    layer_kept: List[List[int]] = field(default_factory=list)   # with a per-layer budget: each MLP's k per step
    train_wall_s: float = 0.0
    eval_loss: float = float("nan")
    load_avg_before: Optional[float] = None
    load_avg_after: Optional[float] = None

    @property
    def tokens_per_s(self) -> float:
        return sum(self.step_tokens) / sum(self.step_seconds)

    @property
    def tokens_per_s_median_step(self) -> float:
        """Median over steps of tokens / step time: less sensitive to other processes' load spikes."""
        return statistics.median(t / s for t, s in zip(self.step_tokens, self.step_seconds))

    @property
    def eval_perplexity(self) -> float:
        return math.exp(self.eval_loss)

    def final_train_loss(self) -> float:
        """Mean train loss over the last tenth of the steps (at least one step): a single batch is too noisy."""
        n = max(1, len(self.losses) // 10)
        return sum(self.losses[-n:]) / n

    def to_dict(self) -> Dict:
        d = asdict(self)
        d.update(tokens_per_s=self.tokens_per_s, tokens_per_s_median_step=self.tokens_per_s_median_step,
                 eval_perplexity=self.eval_perplexity,
                 final_train_loss=self.final_train_loss(), step_time_s=sum(self.step_seconds))
        return d


def make_scheduler(name: str, initial_rate: float, *, num_rungs: int = 2, dense_fraction: float = 0.1,
                   dense_warmup_steps: int = 0):
    """``ladder`` (LORS, the default; ``num_rungs`` and ``dense_fraction`` apply to it only), ``constant`` or
    ``linear``, starting at ``initial_rate`` after ``dense_warmup_steps`` dense steps; ``total_steps`` is filled in
    from the Trainer by :class:`sat_kernels.SATCallback`."""
    if name == "ladder":
        return sk.LadderOmissionScheduler(initial_rate, num_rungs=num_rungs, dense_fraction=dense_fraction,
                                          dense_warmup_steps=dense_warmup_steps)
    if name == "constant":
        return sk.ConstantOmissionScheduler(initial_rate, dense_warmup_steps=dense_warmup_steps)
    if name == "linear":
        return sk.LinearOmissionScheduler(initial_rate, dense_warmup_steps=dense_warmup_steps)
    raise ValueError(f"scheduler must be one of {list(SCHEDULERS)}, got {name!r}")


def resolve_device_precision(precision: str):
    """``(device, autocast dtype or None)``: CUDA when available; ``auto`` is bf16 autocast on a GPU that supports
    it (fp32 master weights), fp32 otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    # under torchrun each process drives the GPU of its LOCAL_RANK, the device the Trainer moves the model to
    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available()
              else torch.device("cpu"))
    if precision == "bf16" or (precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return device, torch.bfloat16
    return device, None


def add_lora(model, cfg: TrainConfig):
    """``model`` wrapped in place by ``peft.get_peft_model`` with the LoRA adapters of ``cfg.lora`` (base weights
    frozen).

    The adapters are initialised from ``cfg.seed`` (PEFT's default: ``A`` random, ``B`` zero), so the dense and the
    SAT run start from the same adapters and compute ``model``'s function at first. Raises ``ValueError`` when peft
    is missing or no module matches ``cfg.lora.targets``.
    """
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ValueError("--lora-rank needs the package peft: pip install 'peft>=0.13'") from None
    lora = cfg.lora
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.targets), task_type="CAUSAL_LM")
    torch.manual_seed(cfg.seed)
    return get_peft_model(model, config)


def _patch(model, cfg: TrainConfig):
    sk.replace_mlp(model, cfg.omission_rate, metric=cfg.metric, strategy=cfg.strategy, backend=cfg.backend,
                   forward=cfg.forward, backward=cfg.backward,
                   score_tokens=cfg.score_tokens)
    if cfg.attn_omission_rate is not None:
        sk.replace_attention(model, cfg.attn_omission_rate, metric=cfg.metric, strategy=cfg.strategy,
                             forward=cfg.forward, score_tokens=cfg.score_tokens)


def check_sat_supported(model, cfg: TrainConfig) -> None:
    """Raise a clear ValueError before any training if SAT cannot patch ``model`` (e.g. GPT-2: no SwiGLU MLP), or,
    with ``cfg.lora``, its LoRA model (checked on a copy: PEFT wraps in place)."""
    if cfg.lora is not None:
        model = add_lora(copy.deepcopy(model), cfg)
    try:
        _patch(model, cfg)
    except ValueError as e:
        base = model.get_base_model() if cfg.lora is not None else model
        raise ValueError(f"--model ({type(base).__name__}, model_type {getattr(base.config, 'model_type', '?')!r}) "
                         f"is not supported by SAT: {e}") from None
    finally:
        sk.revert(model)


def make_model(pristine, cfg: TrainConfig, *, sat: bool, device: torch.device):
    """A fresh copy of ``pristine`` on ``device`` in training mode: with LoRA adapters when ``cfg.lora`` is set
    (:func:`add_lora`), then patched with SAT (``replace_mlp``, ``replace_attention`` with a rate) when ``sat``."""
    model = copy.deepcopy(pristine).to(device)
    if cfg.lora is not None:
        model = add_lora(model, cfg)
    if sat:
        _patch(model, cfg)
    return model.train()


class _ExamplesDataset(torch.utils.data.Dataset):
    def __init__(self, examples):
        self.examples = examples

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]


def _load_average() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None


def world_size() -> int:
    """Processes of the run: ``WORLD_SIZE`` as set by ``torchrun`` (1 otherwise). Each optimizer step takes
    ``batch_size`` examples on every process, ``world_size * batch_size`` in all."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0 (or no ``torchrun``): the process that prints and writes outputs."""
    return int(os.environ.get("RANK", "0")) == 0


@torch.no_grad()
def evaluate(model, examples: Sequence[Dict], pad_id: int, *, batch_size: int = 8,
             device: Optional[torch.device] = None, autocast_dtype=None) -> float:
    """Mean next-token cross-entropy over every labelled token of ``examples`` (labels -100 are skipped), with the
    model in eval mode (SAT modules are then exactly dense). Restores the model's training flag."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[i:i + batch_size], pad_id).items()}
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            total += F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                     reduction="sum").item()
            count += int((labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("evaluate: the examples have no labelled tokens")
    return total / count


def _schedule_callbacks(cfg: TrainConfig, sat: bool):
    """``(callbacks, rate_of, attn_rate_of, kept_of)`` of a run: the :class:`sat_kernels.SATCallback` driving the SAT
    run's schedules (none for dense), and what the step log reads each step: the MLP and attention omission rates
    (``attn_rate_of`` ``None`` when attention is not patched) and the per-layer kept counts (``None`` without a
    per-layer budget)."""
    if not sat:
        return [], (lambda: 0.0), (lambda: 0.0) if cfg.attn_omission_rate is not None else None, None

    def schedule(rate):
        return make_scheduler(cfg.scheduler, rate, num_rungs=cfg.num_rungs, dense_fraction=cfg.dense_fraction,
                              dense_warmup_steps=cfg.dense_warmup_steps)

    attn = cfg.attn_omission_rate   # MLP and attention follow schedules of the same type from their own rates
    callback = sk.SATCallback(mlp=schedule(cfg.omission_rate), attention=schedule(attn) if attn is not None else None,
                              skip_omitted_updates=cfg.skip_omitted_updates, per_layer_budget=cfg.per_layer_budget,
                              hold_selection=cfg.hold_selection)
    attn_rate_of = (lambda: callback.current_attn_rate) if attn is not None else None
    # the budget of the MLP modules exists once training has begun
    kept_of = (lambda: list(callback.budgets["mlp"].kept().values())) if cfg.per_layer_budget else None
    return [callback], (lambda: callback.current_rate), attn_rate_of, kept_of


def sat_schedule_lr(cfg: TrainConfig) -> float:
    """The peak learning rate of a run on SAT's schedule: ``cfg.sat_lr``, or ``cfg.lr`` when it is not set."""
    return cfg.lr if cfg.sat_lr is None else cfg.sat_lr


def _training_arguments(training_arguments, cfg: TrainConfig, output_dir: str, device: torch.device, autocast_dtype,
                        lr: float):
    """The Trainer settings of both runs: AdamW without weight decay, linear schedule from peak ``lr``, a log line
    every step, no checkpoints, the examples in the given order (no shuffling workers); each optimizer step's
    ``batch_size`` sequences in ``grad_accum`` micro-batches."""
    return training_arguments(
        output_dir=output_dir, max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size // cfg.grad_accum,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=lr, warmup_steps=cfg.warmup_steps, lr_scheduler_type="linear", weight_decay=0.0,
        optim="adamw_torch", logging_steps=1, save_strategy="no", report_to=[], seed=cfg.seed,
        use_cpu=device.type != "cuda", bf16=autocast_dtype is torch.bfloat16, disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0, dataloader_drop_last=False,
        # SAT gives every weight a gradient (zero rows for omitted neurons): no unused parameters to search for
        ddp_find_unused_parameters=False)


def train_run(pristine, train_examples: Sequence[Dict], eval_examples: Sequence[Dict], cfg: TrainConfig, *,
              sat: bool, pad_id: int, name: Optional[str] = None, progress: bool = True):
    """Train a fresh copy of ``pristine`` on ``train_examples`` (already in training order, ``steps * batch_size`` of
    them), with SAT (``replace_mlp`` + :class:`sat_kernels.SATCallback`) or dense, then evaluate it dense. With
    ``cfg.lora`` the copy is a PEFT LoRA model (:func:`add_lora`, patched after the adapters are added) and only
    its adapters train.

    Returns ``(RunResult, trained model)``; the trained model is reverted to its original (dense) modules (a LoRA
    model keeps its adapters).
    """
    from transformers import PrinterCallback, Trainer, TrainingArguments, set_seed

    per_step = cfg.batch_size * world_size()
    if len(train_examples) != cfg.steps * per_step:
        raise ValueError(f"train_examples must hold steps * batch_size * world size = {cfg.steps * per_step} "
                         f"examples, got {len(train_examples)}")
    device, autocast_dtype = resolve_device_precision(cfg.precision)
    result = RunResult(name or ("SAT" if sat else "dense"), sat)
    # Under DDP the Trainer's data loader hands process r the batches r, r + W, r + 2W, ... of the ordered examples,
    # so optimizer step s trains on the examples [s * W * B, (s + 1) * W * B).
    result.step_tokens = [sum(len(e["input_ids"]) for e in train_examples[s * per_step:(s + 1) * per_step])
                          for s in range(cfg.steps)]
    set_seed(cfg.seed)
    model = make_model(pristine, cfg, sat=sat, device=device)
    callbacks, rate_of, attn_rate_of, kept_of = _schedule_callbacks(cfg, sat)
    callbacks.append(make_step_log(result, device, cfg.steps, rate_of, attn_rate_of, kept_of, progress=progress,
                                   verbose=is_main_process()))

    class OrderedTrainer(Trainer):
        """Takes the examples in the given order (the same for dense and SAT)."""

        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)

    with tempfile.TemporaryDirectory() as tmp:
        args = _training_arguments(TrainingArguments, cfg, tmp, device, autocast_dtype,
                                   sat_schedule_lr(cfg) if sat else cfg.lr)
        trainer = OrderedTrainer(model=model, args=args, train_dataset=_ExamplesDataset(list(train_examples)),
                                 data_collator=lambda batch: collate(batch, pad_id), callbacks=callbacks)
        trainer.remove_callback(PrinterCallback)
        result.load_avg_before = _load_average()
        start = time.perf_counter()
        trainer.train()
        synchronize(device)
        result.train_wall_s = time.perf_counter() - start
        result.load_avg_after = _load_average()
    if len(result.losses) != cfg.steps or len(result.step_seconds) != cfg.steps:
        raise RuntimeError(f"expected {cfg.steps} logged steps, got {len(result.losses)} losses and "
                           f"{len(result.step_seconds)} timings")
    if sat:
        sk.revert(model)
    del trainer
    gc.collect()
    result.eval_loss = evaluate(model, eval_examples, pad_id, batch_size=cfg.eval_batch_size, device=device,
                                autocast_dtype=autocast_dtype)
    return result, model
