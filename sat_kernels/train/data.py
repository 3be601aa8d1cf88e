"""Training data for ``sat-train``: the offline default corpus, user files, tokenization, packing, batching.

The default corpus is built from the docstrings of a fixed, sorted list of Python standard-library modules
(:data:`STDLIB_MODULES`), read from the running interpreter: nothing is downloaded. Docstrings change between Python
versions, so the corpus is deterministic for a given Python version (``corpus_fingerprint`` records a SHA-256 of it
in every summary). Each documented public object (module, class, function, method) is one document:

* ``cpt`` (continual pre-training): ``"{kind} {name}\\n\\n{docstring}"``, documents joined with the EOS token and
  packed into blocks of ``seq_len`` tokens; the loss is on every token.
* ``sft`` (supervised fine-tuning): prompt ``"What does the Python {kind} `{name}` do?"``, response = the first
  paragraph of the docstring; formatted with the tokenizer's chat template when it has one; the loss is on the
  response tokens only (labels ``-100`` on the prompt). One pair per sequence, or with ``pack=True`` consecutive
  whole pairs concatenated into sequences of up to ``seq_len`` tokens (:func:`pack_sft`).

Train and held-out eval are split by document: documents are de-duplicated by text, ordered by the SHA-256 of their
key (the qualified name for the default corpus, the text for user files) and the first ``eval_fraction`` of them are
held out, so no document, and no text, is in both splits.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

# Platform-independent modules (no os/sys/socket/subprocess/tempfile: their public API differs between operating
# systems). Sorted; the order of the corpus follows it.
STDLIB_MODULES = (
    "abc", "argparse", "base64", "bisect", "calendar", "cmd", "code", "codecs", "collections", "colorsys",
    "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "doctest", "email.message", "enum", "filecmp", "fileinput", "fnmatch", "fractions", "ftplib",
    "functools", "getopt", "gettext", "glob", "graphlib", "gzip", "heapq", "hmac", "html", "html.parser",
    "http.client", "imaplib", "inspect", "io", "ipaddress", "itertools", "json", "linecache", "logging", "mailbox",
    "math", "mimetypes", "netrc", "numbers", "operator", "optparse", "pathlib", "pdb", "pickle", "plistlib", "poplib",
    "pprint", "queue", "random", "re", "sched", "secrets", "shelve", "shlex", "smtplib", "statistics", "string",
    "struct", "tarfile", "textwrap", "timeit", "tokenize", "traceback", "typing", "unittest", "urllib.parse", "uuid",
    "warnings", "wave", "weakref", "xml.etree.ElementTree", "zipfile", "zoneinfo",
)
TASKS = ("cpt", "sft")
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Doc:
    """One documented object: ``kind`` is ``module``, ``class``, ``function`` or ``method``."""

    name: str
    kind: str
    doc: str

    @property
    def text(self) -> str:
        return f"{self.kind} {self.name}\n\n{self.doc}"

    @property
    def prompt(self) -> str:
        return f"What does the Python {self.kind} `{self.name}` do?"

    @property
    def response(self) -> str:
        return first_paragraph(self.doc)


def first_paragraph(doc: str) -> str:
    """The text up to the first blank line, with its lines joined by single spaces."""
    para = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0]
    return " ".join(line.strip() for line in para.splitlines())


def _kind(obj) -> Optional[str]:
    if inspect.isclass(obj):
        return "class"
    if inspect.isroutine(obj):
        return "function"
    return None


def _public_names(module) -> List[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n in vars(module) if not n.startswith("_")]
    return sorted(set(names))


def _own_doc(obj) -> Optional[str]:
    """The object's own docstring, cleaned; ``None`` when it has none (inherited docstrings are not used)."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    if not isinstance(doc, str) or not doc.strip():
        return None
    return inspect.cleandoc(doc)


def stdlib_docs(modules: Sequence[str] = STDLIB_MODULES) -> List[Doc]:
    """The documented public objects of ``modules``, in a deterministic order, de-duplicated by object and text.

    Public names are a module's ``__all__`` (or its names without a leading underscore, restricted to objects defined
    in it); classes contribute their own public methods. Objects without their own docstring, and objects that a
    non-standard-library package has put in place of the original, are skipped.
    """
    docs: List[Doc] = []
    seen_objects, seen_texts = set(), set()

    def add(name, kind, obj):
        doc = _own_doc(obj)
        if doc is None or id(obj) in seen_objects or doc in seen_texts:
            return
        seen_objects.add(id(obj))
        seen_texts.add(doc)
        docs.append(Doc(name, kind, doc))

    for mod_name in modules:
        module = importlib.import_module(mod_name)
        add(mod_name, "module", module)
        explicit = getattr(module, "__all__", None) is not None
        for attr in _public_names(module):
            obj = getattr(module, attr, None)
            kind = _kind(obj)
            if kind is None:
                continue
            owner = getattr(obj, "__module__", None) or ""
            if not explicit and owner != mod_name:
                continue  # imported from elsewhere
            if owner.split(".")[0] not in sys.stdlib_module_names:
                continue  # replaced at run time by a third-party package (e.g. pytest patches pdb.set_trace)
            add(f"{mod_name}.{attr}", kind, obj)
            if kind == "class":
                for meth in sorted(n for n in obj.__dict__ if not n.startswith("_")):
                    member = obj.__dict__[meth]
                    if isinstance(member, (staticmethod, classmethod)):
                        member = member.__func__
                    member_owner = (getattr(member, "__module__", None) or mod_name).split(".")[0]
                    if inspect.isroutine(member) and member_owner in sys.stdlib_module_names:
                        # transformers adds Logger.warning_once & co to logging.Logger when imported: skip such
                        add(f"{mod_name}.{attr}.{meth}", "method", member)
    return docs


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def split_train_eval(items: Sequence, keys: Sequence[str], eval_fraction: float = 0.1) -> Tuple[list, list]:
    """``(train, eval)``: the items whose key has one of the ``max(1, round(eval_fraction * n))`` smallest SHA-256
    digests are held out; both lists keep the input order. Keys must be unique."""
    if len(items) != len(keys) or len(set(keys)) != len(keys):
        raise ValueError("split_train_eval: keys must be unique, one per item")
    if len(items) < 2:
        raise ValueError(f"need at least 2 documents to hold one out for evaluation, got {len(items)}")
    n_eval = min(len(items) - 1, max(1, round(eval_fraction * len(items))))
    held = set(sorted(range(len(items)), key=lambda i: _sha(keys[i]))[:n_eval])
    return ([x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held])


@dataclass
class Corpus:
    """Raw train and eval records: ``{"text"}`` (cpt) or ``{"prompt", "response"}`` (sft), plus a description."""

    task: str
    train: List[Dict[str, str]]
    eval: List[Dict[str, str]]
    source: str

    def fingerprint(self) -> str:
        """SHA-256 of the records (both splits), to identify the exact corpus in a summary."""
        return _sha(json.dumps([self.task, self.train, self.eval], sort_keys=True))


def _records(task: str, docs: Sequence[Doc]) -> List[Dict[str, str]]:
    if task == "cpt":
        return [{"text": d.text} for d in docs]
    return [{"prompt": d.prompt, "response": d.response} for d in docs if len(d.response) >= 16]


def default_corpus(task: str, eval_fraction: float = 0.1) -> Corpus:
    """The offline default corpus from standard-library docstrings (deterministic for a given Python version)."""
    _check_task(task)
    docs = stdlib_docs()
    train, held = split_train_eval(docs, [d.name for d in docs], eval_fraction)
    source = (f"docstrings of {len(STDLIB_MODULES)} standard-library modules, Python "
              f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}")
    return Corpus(task, _records(task, train), _records(task, held), source)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")


def load_corpus(path, task: str, eval_fraction: float = 0.1) -> Corpus:
    """Records from a user file, split into train and eval like the default corpus.

    ``cpt``: a ``.jsonl`` file of ``{"text": ...}`` lines, or any other text file whose documents are separated by
    blank lines. ``sft``: a ``.jsonl`` file of ``{"prompt": ..., "response": ...}`` lines. Identical records are kept
    once.
    """
    _check_task(task)
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist or is not a file")
    fields = ("text",) if task == "cpt" else ("prompt", "response")
    if path.suffix == ".jsonl":
        records = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict) or not all(isinstance(rec.get(k), str) and rec[k] for k in fields):
                    raise ValueError(f"{path}:{lineno}: expected an object with non-empty string field(s) "
                                     f"{list(fields)} for --task {task}")
                records.append({k: rec[k] for k in fields})
    elif task == "cpt":
        text = path.read_text(encoding="utf-8")
        records = [{"text": p.strip()} for p in re.split(r"\n\s*\n", text) if p.strip()]
    else:
        raise ValueError(f"--task sft needs a .jsonl file of {{\"prompt\": ..., \"response\": ...}} lines, got {path}")
    unique = list({json.dumps(r, sort_keys=True): r for r in records}.values())
    train, held = split_train_eval(unique, [json.dumps(r, sort_keys=True) for r in unique], eval_fraction)
    return Corpus(task, train, held, str(path))


# ----------------------------------------------------------------------------------------------------------------
# tokenization


def _eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no EOS token; it is needed to separate documents")
    return int(eos)


def pack_cpt(texts: Sequence[str], tokenizer, seq_len: int) -> List[Dict[str, List[int]]]:
    """Tokenize ``texts``, join them with EOS and cut the stream into full blocks of ``seq_len`` tokens (the tail that
    does not fill a block is dropped). Labels are the input ids (the model shifts them)."""
    eos = _eos_id(tokenizer)
    stream: List[int] = []
    for text in texts:
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        stream.append(eos)
    return [{"input_ids": stream[i:i + seq_len], "labels": stream[i:i + seq_len]}
            for i in range(0, len(stream) - seq_len + 1, seq_len)]


def _chat_parts(tokenizer, prompt: str, response: str) -> Tuple[str, str]:
    """``(prompt text, response text)`` such that their concatenation is the chat-formatted conversation."""
    head = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    full = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": response}], tokenize=False)
    if not full.startswith(head):
        raise ValueError("the tokenizer's chat template does not render the prompt as a prefix of the conversation")
    return head, full[len(head):]


def tokenize_sft(pairs: Sequence[Dict[str, str]], tokenizer, seq_len: int) -> List[Dict[str, List[int]]]:
    """Prompt/response pairs as ``input_ids`` and ``labels`` with ``-100`` on every prompt token.

    With a chat template the pair is rendered as a user turn and an assistant turn; otherwise as ``prompt + "\\n"``
    (with the tokenizer's special tokens) followed by ``response`` and EOS. Prompt and response are tokenized
    separately so the boundary is exact. Responses are truncated to fit ``seq_len``; a pair whose prompt alone does not
    leave room for one response token is dropped.
    """
    templated = getattr(tokenizer, "chat_template", None) is not None
    eos = _eos_id(tokenizer)
    out = []
    for pair in pairs:
        if templated:
            head, tail = _chat_parts(tokenizer, pair["prompt"], pair["response"])
            p_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
            r_ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
        else:
            p_ids = tokenizer(pair["prompt"] + "\n", add_special_tokens=True)["input_ids"]
            r_ids = tokenizer(pair["response"], add_special_tokens=False)["input_ids"] + [eos]
        if len(p_ids) >= seq_len:
            continue
        r_ids = r_ids[:seq_len - len(p_ids)]
        out.append({"input_ids": p_ids + r_ids, "labels": [IGNORE_INDEX] * len(p_ids) + r_ids})
    return out


def pack_sft(examples: Sequence[Dict[str, List[int]]], seq_len: int) -> List[Dict[str, List[int]]]:
    """Tokenized sft pairs concatenated, in order, into sequences of at most ``seq_len`` tokens: each pair whole in
    one sequence, a new sequence started when the next pair does not fit. Labels keep ``-100`` on every prompt, so the
    loss is on the answers as before. Attention is causal over the whole sequence, so a pair's tokens also attend to
    the pairs before it in its sequence (packing without per-pair attention masks, as TRL's ``packing=True`` does
    without ``padding_free``); in exchange every step holds about ``seq_len`` tokens instead of one short pair."""
    out: List[Dict[str, List[int]]] = []
    ids: List[int] = []
    labels: List[int] = []
    for e in examples:
        if len(e["input_ids"]) > seq_len:
            raise ValueError(f"pack_sft: an example of {len(e['input_ids'])} tokens exceeds seq_len {seq_len}")
        if ids and len(ids) + len(e["input_ids"]) > seq_len:
            out.append({"input_ids": ids, "labels": labels})
            ids, labels = [], []
        ids.extend(e["input_ids"])
        labels.extend(e["labels"])
    if ids:
        out.append({"input_ids": ids, "labels": labels})
    return out


def tokenize(corpus: Corpus, tokenizer, seq_len: int, *, pack: bool = False) -> Tuple[list, list]:
    """``(train examples, eval examples)`` of ``corpus``, each a dict of ``input_ids`` and ``labels`` lists.
    ``pack``: sft pairs packed into sequences of up to ``seq_len`` tokens (:func:`pack_sft`); cpt is always packed."""
    if corpus.task == "cpt":
        train = pack_cpt([r["text"] for r in corpus.train], tokenizer, seq_len)
        held = pack_cpt([r["text"] for r in corpus.eval], tokenizer, seq_len)
    else:
        train = tokenize_sft(corpus.train, tokenizer, seq_len)
        held = tokenize_sft(corpus.eval, tokenizer, seq_len)
        if pack:
            train, held = pack_sft(train, seq_len), pack_sft(held, seq_len)
    for name, split in (("train", train), ("eval", held)):
        if not split:
            raise ValueError(f"the {name} split of {corpus.source} gives no {corpus.task} example of --seq-len "
                             f"{seq_len} tokens; use more data or a shorter --seq-len")
    return train, held


def evenly_spaced(items: Sequence, n: Optional[int]) -> list:
    """``n`` items spread evenly over ``items`` (all of them when ``n`` is ``None`` or not smaller)."""
    if n is None or n >= len(items):
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def training_order(examples: Sequence, num: int, seed: int) -> list:
    """``num`` examples: successive seeded permutations of ``examples`` (epochs), so dense and SAT runs with the same
    seed see exactly the same batches in the same order."""
    gen = torch.Generator().manual_seed(seed)
    out: list = []
    while len(out) < num:
        out.extend(examples[i] for i in torch.randperm(len(examples), generator=gen).tolist())
    return out[:num]


def collate(examples: Sequence[Dict[str, List[int]]], pad_id: int) -> Dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids`` with ``pad_id``, ``labels`` with -100, ``attention_mask`` 0 on padding."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
