"""A tiny random Llama with a word-level tokenizer built here (no downloads), saved with save_pretrained, and cpt/sft
corpus files: the model and data of the ``sat-train`` tests."""
import json

import torch

from sat_kernels.train import data as D

from helpers import tiny_config

WORDS = ("the function returns a list of values from the given sequence and raises an error when the input is "
         "empty or not a number so callers check it before use").split()
CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> {% endfor %}"
                 "{% if add_generation_prompt %}<s> assistant : {% endif %}")


def documents(n=48, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(torch.randint(12, 30, (1,),
                                                                                          generator=gen)),),
                                                               generator=gen).tolist()) for _ in range(n)]


def word_tokenizer(chat_template=None):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    extra = ["what", "does", "do", "?", "user", "assistant", ":", "`"]
    tok.train_from_iterator([" ".join(WORDS + extra)],
                            trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>", "<pad>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    if chat_template:
        fast.chat_template = chat_template
    return fast


def write_tiny_dir(root):
    """A tiny random Llama and its tokenizer saved with save_pretrained under ``root``, plus cpt/sft corpus files."""
    from transformers import AutoModelForCausalLM

    tok = word_tokenizer(CHAT_TEMPLATE)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=len(tok)))
    model.save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    docs = documents()
    (root / "corpus.txt").write_text("\n\n".join(docs) + "\n")
    with open(root / "pairs.jsonl", "w") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"prompt": f"what does `{WORDS[i % len(WORDS)]}` do ?", "response": d}) + "\n")
    return root


def tiny_setup(tiny_dir, steps, batch):
    """``(model, training order of steps * batch cpt examples of 16 tokens, held-out examples, pad id)``."""
    from sat_kernels.train.model import load_model, load_tokenizer

    tok = load_tokenizer(tiny_dir / "llama")
    corpus = D.load_corpus(tiny_dir / "corpus.txt", "cpt")
    train, held = D.tokenize(corpus, tok, 16)
    return load_model(tiny_dir / "llama"), D.training_order(train, steps * batch, 0), held, tok.pad_token_id
