"""Builds the tiny text model family of models/text (see README.md there).

    ~/.cache/taskpack/venv/bin/python models/text/recipe.py [--out models/text]

Writes, byte-for-byte reproducibly (fixed seeds, one thread, deterministic algorithms):
- tokenizer.json  a BERT-style WordPiece tokenizer (BertNormalizer, BertPreTokenizer,
                  "[CLS] $A [SEP]" template) over a vocabulary of a few dozen words and suffixes,
                  truncating to 16 tokens, without padding;
- base.onnx       TinyText pretrained on a toy objective (which sentence template made it);
- mood.onnx       base fine-tuned on toy sentences: negative / positive (mood.labels);
- topic.onnx      base fine-tuned on toy sentences: sports / food / tech (topic.labels);
- golden.json     for a handful of sentences per task: the token ids the python `tokenizers`
                  library gives, and the logits, class and softmax probability onnxruntime gives
                  on the task's ONNX file; once as the tokenizer is (padding the batch to its
                  longest text) and once for a graph whose sequence length is fixed to 8
                  (truncation to 8, padding to 8).

Versions: see requirements in models/recipe/requirements.txt (the same venv).
"""

import argparse
import io
import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
import tokenizers
from onnx import numpy_helper
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece

OPSET = 17
DIM = 16
MAX_LENGTH = 16
FIXED_LENGTH = 8

# --------------------------------------------------------------------------- vocabulary and data
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
FUNCTION = ["the", "a", "this", "that", "my", "our", "i", "we", "it", "was", "is", "so", "very",
            "really", "and", "me", "made", "about", "today", "!", ".", ","]
POSITIVE = ["good", "great", "happy", "love", "wonderful", "excellent", "fun", "nice"]
NEGATIVE = ["bad", "terrible", "hate", "sad", "awful", "boring", "poor", "ugly"]
TOPICS = {
    "sports": ["game", "team", "match", "goal", "player"],
    "food": ["pizza", "soup", "bread", "dinner", "cake"],
    "tech": ["phone", "computer", "app", "screen", "laptop"],
}
SUFFIXES = ["##s", "##d", "##ly", "##ing"]
NOUNS = [w for ws in TOPICS.values() for w in ws]
VOCAB = SPECIAL + FUNCTION + POSITIVE + NEGATIVE + NOUNS + SUFFIXES

MOOD_LABELS = ["negative", "positive"]
TOPIC_LABELS = list(TOPICS)

# Templates: (pattern, uses an adjective or a verb). {n} noun, {a} adjective, {v} verb.
TEMPLATES = [
    "the {n} was {a}",
    "this {n} is so {a}",
    "i {v} this {n}",
    "our {n} made me {a} today",
]
VERB = {"positive": ["love"], "negative": ["hate"]}


def sentences(seed, count):
    """`count` toy sentences with their template, mood and topic indices."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        t = int(rng.integers(len(TEMPLATES)))
        mood = int(rng.integers(2))
        topic = int(rng.integers(len(TOPICS)))
        nouns = TOPICS[TOPIC_LABELS[topic]]
        noun = nouns[int(rng.integers(len(nouns)))]
        if rng.random() < 0.3:
            noun += "s"
        adjs = POSITIVE if mood == 1 else NEGATIVE
        adjs = [a for a in adjs if a not in ("love", "hate")]
        adj = adjs[int(rng.integers(len(adjs)))]
        verb = VERB[MOOD_LABELS[mood]][0]
        text = TEMPLATES[t].format(n=noun, a=adj, v=verb)
        if rng.random() < 0.3:
            text = "really " + text
        if rng.random() < 0.3:
            text += " !"
        out.append((text, t, mood, topic))
    return out


def make_tokenizer():
    vocab = {tok: i for i, tok in enumerate(VOCAB)}
    assert len(vocab) == len(VOCAB), "duplicate vocabulary entries"
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.enable_truncation(max_length=MAX_LENGTH)
    return tok


def encode(tok, texts):
    """input_ids, attention_mask, token_type_ids as int64 [batch, seq] (python `tokenizers`)."""
    enc = tok.encode_batch(texts)
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
    types = np.array([e.type_ids for e in enc], dtype=np.int64)
    return ids, mask, types


# --------------------------------------------------------------------------- model
class TinyText(nn.Module):
    """Embedding (+ token type embedding) -> masked mean pool -> Linear -> tanh -> head."""

    def __init__(self, vocab, classes):
        super().__init__()
        self.embed = nn.Embedding(vocab, DIM)
        self.types = nn.Embedding(2, DIM)
        self.hidden = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, classes)

    def forward(self, input_ids, attention_mask, token_type_ids):
        x = self.embed(input_ids) + self.types(token_type_ids)
        m = attention_mask.unsqueeze(-1).to(x.dtype)
        pooled = (x * m).sum(1) / m.sum(1).clamp(min=1.0)
        return self.head(torch.tanh(self.hidden(pooled)))


def train(model, tok, data, labels, steps, lr, head_lr, seed):
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    head = [p for n, p in model.named_parameters() if n.startswith("head.")]
    body = [p for n, p in model.named_parameters() if not n.startswith("head.")]
    opt = torch.optim.Adam([{"params": body, "lr": lr}, {"params": head, "lr": head_lr}])
    tok = Tokenizer.from_str(tok.to_str())
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    texts = [d[0] for d in data]
    y = torch.tensor(labels)
    model.train()
    for _ in range(steps):
        idx = rng.choice(len(texts), size=32, replace=False)
        ids, mask, types = encode(tok, [texts[i] for i in idx])
        logits = model(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(types))
        loss = F.cross_entropy(logits, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return float(loss.item())


def accuracy(model, tok, data, labels):
    tok = Tokenizer.from_str(tok.to_str())
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    ids, mask, types = encode(tok, [d[0] for d in data])
    with torch.no_grad():
        pred = model(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(types))
    return float((pred.argmax(1).numpy() == np.array(labels)).mean())


# --------------------------------------------------------------------------- export
NAMES = ["embed.weight", "types.weight", "hidden.weight", "hidden.bias", "head.weight", "head.bias"]


def export_onnx(model, path):
    """Legacy exporter; initializers named after the torch state dict; dynamic batch and
    sequence."""
    buf = io.BytesIO()
    ids = torch.zeros(2, 5, dtype=torch.int64)
    axes = {"batch": 0, "sequence": 1}
    torch.onnx.export(
        model, (ids, torch.ones_like(ids), torch.zeros_like(ids)), buf,
        input_names=["input_ids", "attention_mask", "token_type_ids"],
        output_names=["logits"],
        dynamic_axes={
            "input_ids": {v: k for k, v in axes.items()},
            "attention_mask": {v: k for k, v in axes.items()},
            "token_type_ids": {v: k for k, v in axes.items()},
            "logits": {0: "batch"},
        },
        opset_version=OPSET, dynamo=False, do_constant_folding=False, external_data=False)
    m = onnx.load_from_string(buf.getvalue())
    g = m.graph
    state = {k: v.detach().numpy().astype(np.float32).copy() for k, v in model.state_dict().items()}
    assert list(state) == NAMES, list(state)
    # Every weight its own initializer, named after the state dict (the exporter may dedupe
    # bit-identical tensors behind Identity nodes).
    keep = [n for n in g.node if not (n.op_type == "Identity" and n.output[0] in state)]
    del g.node[:]
    g.node.extend(keep)
    del g.initializer[:]
    g.initializer.extend(numpy_helper.from_array(a, name=k) for k, a in state.items())
    used = {i for n in g.node for i in n.input}
    assert set(state) <= used, set(state) - used
    assert [i.name for i in g.input] == ["input_ids", "attention_mask", "token_type_ids"]
    onnx.checker.check_model(m, full_check=True)
    with open(path, "wb") as f:
        f.write(m.SerializeToString(deterministic=True))


def ort_logits(path, ids, mask, types):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return sess.run(["logits"], feed)[0]


def softmax(z):
    z = z.astype(np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


# Golden sentences: seen words, unknown words ([UNK]), capitals and accents (normalizer), plural
# and past suffixes (WordPiece pieces), punctuation, and texts longer than 8 and 16 tokens.
GOLDEN = {
    "mood": [
        "I love this pizza!",
        "The game was terrible.",
        "Our phones made me really happy today",
        "this soup is so boring",
        "The ÉXCELLENT match, really wonderful!",
        "i hate this laptop and the screen was ugly , really bad",
        "my unknown gizmo was awful",
        "the pizza was good but the game was bad",
        "really really really good and nice and fun and great and happy, "
        "the cake was wonderful today !",
    ],
    "topic": [
        "The game was terrible.",
        "I love this pizza!",
        "our computer is so nice",
        "the players and the team were great",
        "Bread, soup and cake for dinner",
        "this app made me sad today because the screen and the phone and the laptop were poor",
        "zebra quantum xylophone",
        "pizza on my phone",
    ],
}


def golden_cases(tok, out, task, labels, fixed):
    texts = GOLDEN[task]
    t = Tokenizer.from_str(tok.to_str())
    if fixed is None:
        t.enable_padding(pad_id=0, pad_token="[PAD]")          # to the longest in the batch
    else:
        t.enable_truncation(max_length=fixed)
        t.enable_padding(pad_id=0, pad_token="[PAD]", length=fixed)
    ids, mask, types = encode(t, texts)
    logits = ort_logits(os.path.join(out, f"{task}.onnx"), ids, mask, types)
    probs = softmax(logits)
    cases = []
    for i, text in enumerate(texts):
        c = int(probs[i].argmax())
        n = int(mask[i].sum())
        cases.append({
            "task": task,
            "text": text,
            "ids": [int(v) for v in ids[i][:n]],
            "class": c,
            "label": labels[c],
            "probability": float(probs[i][c]),
            "logits": [float(v) for v in logits[i]],
        })
    return cases


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    out = args.out

    tok = make_tokenizer()
    tok.save(os.path.join(out, "tokenizer.json"), pretty=True)
    for task, labels in [("mood", MOOD_LABELS), ("topic", TOPIC_LABELS)]:
        with open(os.path.join(out, f"{task}.labels"), "w") as f:
            f.write("".join(l + "\n" for l in labels))

    train_data = sentences(1, 600)
    test_data = sentences(2, 300)
    report = {}

    torch.manual_seed(0)
    base = TinyText(len(VOCAB), len(TEMPLATES))
    loss = train(base, tok, train_data, [d[1] for d in train_data], 300, 1e-2, 1e-2, seed=10)
    report["base"] = {"objective": "template (4 classes)", "loss": loss,
                      "accuracy": accuracy(base, tok, test_data, [d[1] for d in test_data])}
    export_onnx(base, os.path.join(out, "base.onnx"))
    base_state = {k: v.clone() for k, v in base.state_dict().items()}

    for task, col, labels, seed in [("mood", 2, MOOD_LABELS, 20), ("topic", 3, TOPIC_LABELS, 30)]:
        model = TinyText(len(VOCAB), len(TEMPLATES))
        model.load_state_dict(base_state)
        torch.manual_seed(seed)
        model.head = nn.Linear(DIM, len(labels))      # a fresh head of the task's width
        y = [d[col] for d in train_data]
        loss = train(model, tok, train_data, y, 400, 1e-2, 5e-2, seed=seed + 1)
        acc = accuracy(model, tok, test_data, [d[col] for d in test_data])
        export_onnx(model, os.path.join(out, f"{task}.onnx"))
        report[task] = {"labels": labels, "loss": loss, "accuracy": acc}

    golden = {
        "about": "Expected outputs of models/text: token ids from the python tokenizers "
                 "library, logits from onnxruntime on the task's ONNX file, probability = "
                 "softmax (float64) of the logits at the argmax class. `dynamic`: the tokenizer "
                 f"as is, a batch padded to its longest text; `fixed_{FIXED_LENGTH}`: truncation "
                 f"and padding to {FIXED_LENGTH} tokens (a graph whose sequence dimension is "
                 "fixed).",
        "versions": {"torch": torch.__version__.split("+")[0], "onnx": onnx.__version__,
                     "onnxruntime": ort.__version__,
                     "tokenizers": tokenizers.__version__},
        "fixed_length": FIXED_LENGTH,
        "training": report,
        "dynamic": [],
        f"fixed_{FIXED_LENGTH}": [],
    }
    for task, labels in [("mood", MOOD_LABELS), ("topic", TOPIC_LABELS)]:
        golden["dynamic"] += golden_cases(tok, out, task, labels, None)
        golden[f"fixed_{FIXED_LENGTH}"] += golden_cases(tok, out, task, labels, FIXED_LENGTH)
    # The fixed-length cases must test something: truncation changes some outputs.
    changed = [a["text"] for a, b in zip(golden["dynamic"], golden[f"fixed_{FIXED_LENGTH}"])
               if abs(a["logits"][0] - b["logits"][0]) > 1e-3]
    assert changed, "no golden sentence is long enough for truncation to matter"
    assert any(len(c["ids"]) == MAX_LENGTH for c in golden["dynamic"]), "no text hits max_length"
    assert any(1 in c["ids"] for c in golden["dynamic"]), "no [UNK] in the goldens"
    with open(os.path.join(out, "golden.json"), "w") as f:
        json.dump(golden, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(json.dumps(report, indent=1))
    for c in golden["dynamic"]:
        print(f'{c["task"]:6} {c["label"]:9} {c["probability"]:.4f}  {c["text"]}')


if __name__ == "__main__":
    main()
