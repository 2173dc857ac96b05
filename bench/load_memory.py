# SPDX-License-Identifier: Apache-2.0
"""Peak memory of loading a Hugging Face checkpoint into 4 bits: fourbit.from_pretrained against the dense load,
dense load + quantize_model, and transformers + bitsandbytes.

Each load runs in a fresh process, after the same load and a forward of a tiny model of the same architecture
(code pages, thread pools, allocator arenas in place); the figures are the growth of peak resident memory (VmHWM,
reset through /proc/self/clear_refs) over the resident memory before the load, during the load and then with a
first 8-token forward (which reads every weight: transformers maps a dense checkpoint lazily). Linux only.

    python bench/load_memory.py [--layers 12] [--hidden 768] [--intermediate 2048] [--vocab 8192]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

KINDS = {
    "fourbit.from_pretrained (dense folder)": ("fourbit", "dense"),
    "fourbit.from_pretrained (4-bit folder)": ("fourbit", "4bit"),
    "transformers dense (fp32)": ("transformers", "dense"),
    "transformers dense + fourbit.quantize_model": ("quantize_model", "dense"),
    "transformers + bitsandbytes 4-bit": ("bnb", "dense"),
}


def _status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def child(kind: str, folder: str, warmup_folder: str) -> None:
    import gc

    import torch
    import transformers

    import fourbit

    def load(path):
        if kind == "fourbit":
            return fourbit.from_pretrained(path, progress=False)
        if kind == "transformers":
            return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        if kind == "quantize_model":
            dense = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            return fourbit.quantize_model(dense, progress=False)
        config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                 bnb_4bit_use_double_quant=True,
                                                 bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
        return transformers.AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu")

    def forward(model):  # touches every weight (a lazily mapped checkpoint is read in full)
        with torch.no_grad():
            model(torch.arange(8)[None] % model.config.vocab_size)

    torch.set_num_threads(2)
    # The same load and forward on a tiny model of the same architecture first: the libraries' code pages, thread
    # pools and allocator arenas are then in place and not counted as the model's memory.
    forward(load(warmup_folder))
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _status("VmRSS:")
    model = load(folder)
    peak_load = _status("VmHWM:") - before
    forward(model)
    gc.collect()
    seen, nbytes = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            nbytes += t.numel() * t.element_size()
    print(json.dumps({"peak_load": peak_load, "peak": _status("VmHWM:") - before,
                      "resident": _status("VmRSS:") - before, "model_bytes": nbytes}))  # fmt: skip


def run(kind: str, folder: Path, warmup_folder: Path) -> dict:
    command = [sys.executable, __file__, "--child", kind, str(folder), str(warmup_folder)]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{kind}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import fourbit

    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        sizes = (("tiny", 1, 128, 256, 256), ("model", args.layers, args.hidden, args.intermediate, args.vocab))
        for size, layers, hidden, intermediate, vocab in sizes:
            config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                 num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                 num_key_value_heads=hidden // 64, tie_word_embeddings=True)  # fmt: skip
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
            params = sum(p.numel() for p in model.parameters())
            dense, four = Path(tmp) / f"{size}-dense", Path(tmp) / f"{size}-4bit"
            model.save_pretrained(dense, safe_serialization=True)  # shards of 5 GB: a single file here
            del model
            fourbit.save_pretrained(fourbit.from_pretrained(dense, progress=False), four)
            folders[size] = {"dense": dense, "4bit": four}
        dense_bytes = params * 4
        print(f"Llama-style model: {params / 1e6:.1f}M parameters, fp32 {dense_bytes / 2**20:.0f} MiB on disk "
              f"({args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, vocab {args.vocab}, "
              "tied embeddings)")  # fmt: skip
        rows = [("load", "peak in load MiB", "peak with a forward MiB", "resident MiB", "model tensors MiB",
                 "load peak / dense fp32")]  # fmt: skip
        for label, (kind, which) in KINDS.items():
            r = run(kind, folders["model"][which], folders["tiny"][which])
            rows.append((label, *[f"{r[k] / 2**20:.0f}" for k in ("peak_load", "peak", "resident", "model_bytes")],
                         f"{r['peak_load'] / dense_bytes:.2f}"))  # fmt: skip
        widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
        for row in rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))


if __name__ == "__main__":
    main()
