# SPDX-License-Identifier: Apache-2.0
"""Regenerates the figures of docs/guide.md from fourbit's own code.

    python docs/make_figures.py            # everything (the demo runs take a few minutes)
    python docs/make_figures.py --no-demo  # the computed figures only (seconds)

Each figure is a markdown table written between ``<!-- figure:NAME -->`` and ``<!-- /figure:NAME -->`` in
docs/guide.md, plus PNG plots and ``figures.json`` in docs/figures/. Nothing is typed in by hand.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
import sys
from pathlib import Path

import torch

import fourbit

DOCS = Path(__file__).resolve().parent
FIGURES = DOCS / "figures"

# Llama-2-7B's shapes (from its public config: hidden 4096, MLP 11008, 32 layers, vocabulary 32000).
LLAMA_7B = dict(hidden=4096, intermediate=11008, layers=32, vocab=32000)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- memory per parameter
def _stored_bytes(shape: tuple[int, int], **kwargs) -> int:
    """Bytes fourbit stores for a linear weight of this shape (packed codes + scales), by quantizing one."""
    torch.manual_seed(0)
    w = torch.randn(shape, dtype=torch.bfloat16) * 0.02
    packed, state = fourbit.quantize_4bit(w, **kwargs)
    tensors = [packed, state.absmax, state.code]
    if state.nested:
        tensors += [state.state2.absmax, state.state2.code, state.offset]
    return sum(t.numel() * t.element_size() for t in tensors)


def memory_figure() -> tuple[str, dict]:
    h, i, n, v = LLAMA_7B["hidden"], LLAMA_7B["intermediate"], LLAMA_7B["layers"], LLAMA_7B["vocab"]
    linear_shapes = [(h, h)] * 4 + [(i, h)] * 2 + [(h, i)]  # q k v o, gate up, down
    linear_params = n * sum(a * b for a, b in linear_shapes)
    other_params = 2 * v * h + (2 * n + 1) * h  # embeddings + lm_head (kept 16-bit) + norms
    per_shape = {}
    rows, data = [], {}
    for label, kwargs in (("NF4", dict(compress_statistics=False)), ("NF4 + double quant", dict(compress_statistics=True))):
        linear_bytes = 0
        for shape in set(linear_shapes):
            key = (shape, label)
            per_shape[key] = _stored_bytes(shape, blocksize=64, quant_type="nf4", **kwargs)
        for shape in linear_shapes:
            linear_bytes += n * per_shape[(shape, label)]
        data[label] = dict(linear_bytes=linear_bytes, bits_per_weight=8 * linear_bytes / linear_params)
    total_params = linear_params + other_params
    rows.append(["float32", "32.00", f"{4 * total_params / 2**30:.1f}"])
    rows.append(["bfloat16", "16.00", f"{2 * total_params / 2**30:.1f}"])
    for label in ("NF4", "NF4 + double quant"):
        total = data[label]["linear_bytes"] + 2 * other_params
        data[label]["model_gib"] = total / 2**30
        rows.append([label, f"{data[label]['bits_per_weight']:.3f}", f"{total / 2**30:.2f}"])
    text = (
        f"Llama-2-7B's shapes: {linear_params / 1e9:.2f}B parameters in linear layers, {other_params / 1e6:.0f}M in "
        "embeddings, output layer and norms (kept in bf16 in the 4-bit rows).\n\n"
        + _table(["weights", "bits per linear weight", "model size (GiB)"], rows)
    )
    return text, data


# ---------------------------------------------------------------------------------------------- quantization error
def _int4_fake(w: torch.Tensor, group: int = 64) -> torch.Tensor:
    """Symmetric int4 per group of 64 (scale = absmax / 7, the torchao-style weight-only grid)."""
    groups = w.reshape(-1, group)
    scale = (groups.abs().amax(dim=1) / 7).clamp_min(1e-12)
    zero = torch.zeros(scale.shape, dtype=torch.int32)
    return fourbit.fake_quantize(w, scale.reshape(w.shape[0], -1), zero.reshape(w.shape[0], -1),
                                 -8, 7, group_size=group)  # fmt: skip


def error_figure() -> tuple[str, dict]:
    torch.manual_seed(0)
    weights = {
        "normal": torch.randn(1024, 4096) * 0.02,
        "Student-t (3 dof, heavy tails)": torch.distributions.StudentT(3.0).sample((1024, 4096)) * 0.02,
    }
    rows, data = [], {}
    for wname, w in weights.items():
        for label, fq in (
            ("NF4", lambda x: fourbit.fake_quantize_4bit(x, "nf4", 64)),
            ("FP4", lambda x: fourbit.fake_quantize_4bit(x, "fp4", 64)),
            ("NF4 + double quant", lambda x: fourbit.fake_quantize_4bit(x, "nf4", 64, compress_statistics=True)),
            ("int4 symmetric", _int4_fake),
        ):
            err = fq(w) - w
            rel = (err.norm() / w.norm()).item()
            sqnr = -20 * math.log10(rel)
            data[f"{wname}/{label}"] = dict(relative_rmse=rel, sqnr_db=sqnr)
            rows.append([wname, label, f"{rel:.4f}", f"{sqnr:.2f}"])
    text = ("Weights 1024 x 4096, blocks / groups of 64; relative error = ||Q(W) - W|| / ||W||, "
            "SQNR = -20 log10 of it.\n\n" + _table(["weights", "format", "relative error", "SQNR (dB)"], rows))
    return text, data


# ---------------------------------------------------------------------------------------------- merging
def merge_figure() -> tuple[str, dict]:
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=4)  # fmt: skip
    model = fourbit.quantize_model(transformers.LlamaForCausalLM(config).eval(), progress=False)
    fourbit.add_lora(model, fourbit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # an adapter of a realistic size: |scaling * B A| about 10% of |W| per layer
        for layer in fourbit.lora_layers(model).values():
            layer.lora_B["default"].weight.copy_(torch.randn(layer.lora_B["default"].weight.shape, generator=g) * 0.01)
    ids = torch.randint(0, 256, (4, 64), generator=g)
    with torch.no_grad():
        exact = model(ids).logits.double()
    exact_p = exact.softmax(-1)
    rows, data = [], {}
    # Merged into a bf16 copy (lossless up to bf16 rounding) vs requantized into NF4.
    dense = copy.deepcopy(model)
    with torch.no_grad():
        for path, layer in fourbit.lora_layers(dense).items():
            merged = layer.merged_weight(torch.bfloat16)
            linear = torch.nn.Linear(layer.in_features, layer.out_features, bias=False, dtype=torch.bfloat16)
            linear.weight.copy_(merged)
            parent, _, child = path.rpartition(".")
            setattr(dense.get_submodule(parent), child, linear)
        dense_logits = dense.to(torch.bfloat16)(ids).logits.double()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fourbit.merge_lora(model)
    with torch.no_grad():
        requant = model(ids).logits.double()
    fourbit.unmerge_lora(model)
    for label, out in (("export merged bf16 (merged_weight)", dense_logits), ("merge into NF4 (requantize)", requant)):
        kl = (exact_p * (exact.log_softmax(-1) - out.log_softmax(-1))).sum(-1).mean().item()
        top1 = (out.argmax(-1) == exact.argmax(-1)).double().mean().item()
        max_p = (out.softmax(-1) - exact_p).abs().max().item()
        data[label] = dict(kl=kl, top1_agreement=top1, max_prob_diff=max_p)
        rows.append([label, f"{kl:.2e}", f"{100 * top1:.1f}%", f"{max_p:.4f}"])
    text = ("A 4-layer Llama-style model (hidden 256) with NF4 weights and a rank-16 LoRA on every linear layer; "
            "the unmerged model is the reference. Its weights are random, so its next-token distributions are flat "
            "and the top-1 token flips at small changes; KL and the probability change are the robust measures.\n\n"
            + _table(["merge", "KL(unmerged, merged)", "same top-1 token", "max abs(p - p_ref)"], rows))
    return text, data


# ---------------------------------------------------------------------------------------------- PTQ vs QAT
def qat_figure() -> tuple[str, dict]:
    """The experiment of tests/test_qat.py: a small MLP fits a generated regression task; then either 30 more float
    steps and post-training quantization, or 30 QAT steps and conversion, from the same starting point."""
    import torch.nn.functional as F
    from torch import nn

    from fourbit import qat

    g = torch.Generator().manual_seed(0)
    d = 32
    t0, t1 = torch.randn(d, 64, generator=g) / d**0.5, torch.randn(64, 4, generator=g) / 8
    x_all = torch.randn(1024, d, generator=g)
    y_all = torch.tanh(x_all @ t0) @ t1
    x, y, x_test, y_test = x_all[:512], y_all[:512], x_all[512:], y_all[512:]

    def fit(model, steps, lr):
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()

    def mse(model):
        with torch.no_grad():
            return F.mse_loss(model(x_test), y_test).item()

    rows, data = [], {}
    for label, config in (
        ("int4 symmetric, groups of 32", qat.QATConfig(qat.IntWeightConfig(4, 32), skip_modules=())),
        ("NF4, blocks of 64", qat.QATConfig(qat.FourBitWeightConfig("nf4", 64), skip_modules=())),
    ):
        torch.manual_seed(4)
        base = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 4))
        fit(base, 120, 1e-2)
        ptq = copy.deepcopy(base)
        fit(ptq, 30, 2e-3)
        float_loss = mse(ptq)
        qat.convert_qat(qat.prepare_qat(ptq, config))
        trained = qat.prepare_qat(copy.deepcopy(base), config)
        fit(trained, 30, 2e-3)
        qat.convert_qat(trained)
        ptq_loss, qat_loss = mse(ptq), mse(trained)
        data[label] = dict(float=float_loss, ptq=ptq_loss, qat=qat_loss)
        rows.append([label, f"{float_loss:.5f}", f"{ptq_loss:.5f}", f"{qat_loss:.5f}"])
    text = ("A 3-layer MLP on a generated regression task (tests/test_qat.py asserts the direction); held-out MSE, "
            "lower is better.\n\n"
            + _table(["weights", "float model", "PTQ (train in float, then quantize)", "QAT"], rows))
    return text, data


# ---------------------------------------------------------------------------------------------- demo runs
def demo_figure(steps: int) -> tuple[str, dict]:
    from fourbit import demo

    import tempfile

    out = Path(tempfile.mkdtemp(prefix="fourbit-demo-"))  # the adapter and raw figures stay out of the repo
    config = demo.DemoConfig(out=str(out), steps=steps, progress=False)
    results = demo.run_demo(config)
    rows, data = [], {}
    for kind, r in results.items():
        label = {"nf4": "QLoRA (NF4 base)", "dense": "LoRA (float32 base)"}[kind]
        last = sum(r["losses"][-5:]) / 5
        data[kind] = {k: r[k] for k in ("train_tokens_per_s", "decode_tokens_per_s", "peak_rss_mib", "weights_mib")}
        data[kind]["last_loss"] = last
        rows.append([label, f"{r['weights_mib']:.1f}", f"{r['peak_rss_mib']:.0f}", f"{r['train_tokens_per_s']:.0f}",
                     f"{r['decode_tokens_per_s']:.1f}", f"{r['losses'][0]:.3f} -> {last:.3f}"])  # fmt: skip
    (FIGURES / "demo_loss.png").write_bytes((out / "loss.png").read_bytes())
    text = (f"`python -m fourbit demo --steps {steps}` (2 threads; each run in a fresh process; peak RSS includes "
            "Python, torch and transformers, about 1 GiB). ![loss curves](figures/demo_loss.png)\n\n"
            + _table(["run", "weights (MiB)", "peak RSS (MiB)", "train tokens/s", "decode tokens/s", "loss"], rows))
    return text, data


# ---------------------------------------------------------------------------------------------- output
def _write_block(guide: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- figure:{name} -->\n).*?(<!-- /figure:{name} -->)", re.S)
    if not pattern.search(guide):
        raise SystemExit(f"docs/guide.md has no <!-- figure:{name} --> block")
    return pattern.sub(lambda m: m.group(1) + body.strip() + "\n" + m.group(2), guide)


def _plot_errors(data: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = list(data)
    ax.barh(labels, [data[k]["sqnr_db"] for k in labels])
    ax.set_xlabel("SQNR (dB, higher is better)")
    ax.set_title("4-bit formats on synthetic weights (groups of 64)")
    fig.tight_layout()
    fig.savefig(FIGURES / "quant_error.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-demo", action="store_true", help="skip the demo runs (timed figures)")
    parser.add_argument("--demo-steps", type=int, default=60)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    FIGURES.mkdir(exist_ok=True)
    guide_path = DOCS / "guide.md"
    guide = guide_path.read_text()
    previous = json.loads((FIGURES / "figures.json").read_text()) if (FIGURES / "figures.json").exists() else {}
    figures = {"memory": memory_figure, "quant_error": error_figure, "merge": merge_figure, "qat": qat_figure}
    if not args.no_demo:
        figures["demo"] = lambda: demo_figure(args.demo_steps)
    for name, make in figures.items():
        print(f"figure {name} ...", flush=True)
        text, data = make()
        guide = _write_block(guide, name, text)
        previous[name] = data
        if name == "quant_error":
            _plot_errors(data)
    guide_path.write_text(guide)
    (FIGURES / "figures.json").write_text(json.dumps(previous, indent=1, sort_keys=True))
    print(f"updated {guide_path} and {FIGURES}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
