# SPDX-License-Identifier: Apache-2.0
"""``python -m fourbit demo``: a short QLoRA fine-tune, side by side with the same LoRA run on an unquantized base.

Offline by default: a small Llama-style model is built from a config (byte-level vocabulary, so no tokenizer
download), its linear layers are quantized to NF4 (double-quantized scales), LoRA adapters are added to every linear
layer and trained on a small text shipped with fourbit. The same run on the float32 base follows, with the same
initial weights and batches. Each run is a fresh process, so its peak memory (max RSS) is its own. The demo prints
the loss, training tokens/s, peak memory and ``generate()`` decode tokens/s of both, saves the adapter (PEFT format)
and writes a PNG plot of the two loss curves.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import resource
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import torch

__all__ = ["DemoConfig", "run_demo", "add_arguments"]

# About 13M parameters: float32 weights of 52 MiB, above a 32 MiB last-level cache, so decoding is memory-bound the
# way it is for real models (a model that fits in cache hides what 4 bits save). Sizes are multiples of 64 (the
# block size), as in real models, so every layer takes the small-batch GEMV kernel.
BUILTIN_MODEL = dict(
    vocab_size=256, hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
    num_key_value_heads=8, max_position_embeddings=512, tie_word_embeddings=False,
)  # fmt: skip


@dataclass
class DemoConfig:
    model: str | None = None  # a local Hugging Face model folder; None: the built-in small Llama
    text: str | None = None  # a text file; None: the bundled corpus
    out: str = "fourbit-demo"
    steps: int = 60
    batch: int = 8
    seq: int = 128
    lr: float = 3e-3
    rank: int = 16
    alpha: float = 32
    threads: int = 2
    seed: int = 0
    decode_tokens: int = 64
    progress: bool = True
    runs: list[str] = field(default_factory=lambda: ["nf4", "dense"])


# ---------------------------------------------------------------------------------------------- one run (child)
def _corpus_bytes(config: DemoConfig) -> bytes:
    if config.text:
        return Path(config.text).read_bytes()
    return resources.files("fourbit").joinpath("data/demo_corpus.txt").read_bytes()


def _tokenize(config: DemoConfig, vocab_size: int) -> tuple[torch.Tensor, object]:
    """Token ids of the text: the model folder's tokenizer if it has one, else bytes (vocab >= 256)."""
    text = _corpus_bytes(config)
    if config.model and any((Path(config.model) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(config.model)
        return torch.tensor(tokenizer(text.decode("utf-8", errors="replace"))["input_ids"]), tokenizer
    if vocab_size < 256:
        raise ValueError(f"the model's vocabulary ({vocab_size}) is too small for bytes and it has no tokenizer")
    return torch.tensor(list(text)), None


def _build_model(config: DemoConfig, quantized: bool):
    import transformers

    import fourbit

    transformers.logging.set_verbosity_error()
    if config.model is None:
        torch.manual_seed(config.seed)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**BUILTIN_MODEL))
        if quantized:
            fourbit.quantize_model(model, progress=False)
        return model
    if quantized:
        return fourbit.from_pretrained(config.model)
    return transformers.AutoModelForCausalLM.from_pretrained(config.model, dtype=torch.float32)


def _decode_tokens_per_second(model, prompt: torch.Tensor, new_tokens: int) -> tuple[float, torch.Tensor]:
    model.eval()
    kwargs = dict(do_sample=False, pad_token_id=0, min_new_tokens=new_tokens, max_new_tokens=new_tokens)
    with torch.inference_mode():
        model.generate(prompt, **{**kwargs, "min_new_tokens": 4, "max_new_tokens": 4})  # warm up
        seconds = []
        for _ in range(3):  # the median of three: one run on a shared machine is noisy
            start = time.perf_counter()
            out = model.generate(prompt, **kwargs)
            seconds.append(time.perf_counter() - start)
    return (out.shape[1] - prompt.shape[1]) / sorted(seconds)[1], out[0, prompt.shape[1]:]


def _run(config: DemoConfig, kind: str) -> dict:
    """One fine-tuning run in this (fresh) process; returns its figures."""
    import fourbit

    torch.set_num_threads(config.threads)
    model = _build_model(config, quantized=(kind == "nf4"))
    data, tokenizer = _tokenize(config, model.config.vocab_size)
    if len(data) < config.seq + 2:
        raise ValueError(f"the text has {len(data)} tokens; it needs more than seq={config.seq}")
    lora = fourbit.LoraConfig(r=config.rank, lora_alpha=config.alpha, target_modules="all-linear", task_type="CAUSAL_LM")
    torch.manual_seed(config.seed + 1)  # the same adapter initialisation in both runs
    fourbit.add_lora(model, lora)
    trainable, total = fourbit.trainable_parameters(model)
    weight_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed + 2)  # the same batches in both runs
    steps = range(config.steps)
    if config.progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"{kind:>5} fine-tune", unit="step", leave=True)
    losses = []
    model.train()
    start = time.perf_counter()
    for _ in steps:
        offsets = torch.randint(0, len(data) - config.seq - 1, (config.batch,), generator=generator).tolist()
        ids = torch.stack([data[o : o + config.seq] for o in offsets])
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if config.progress:
            steps.set_postfix(loss=f"{losses[-1]:.3f}")
    train_seconds = time.perf_counter() - start
    result = dict(kind=kind, losses=losses, train_tokens_per_s=config.steps * config.batch * config.seq / train_seconds,
                  trainable=trainable, total=total, weights_mib=weight_bytes / 2**20)  # fmt: skip
    if kind == "nf4":
        result["adapter"] = str(fourbit.save_adapter(model, Path(config.out) / "adapter"))
    prompt = data[: min(16, config.seq)].unsqueeze(0)
    result["decode_tokens_per_s"], sample = _decode_tokens_per_second(model, prompt, config.decode_tokens)
    result["sample"] = (tokenizer.decode(sample) if tokenizer is not None
                        else bytes(int(t) % 256 for t in sample).decode("utf-8", errors="replace"))  # fmt: skip
    result["prompt"] = (tokenizer.decode(prompt[0]) if tokenizer is not None
                        else bytes(prompt[0].tolist()).decode("utf-8", errors="replace"))  # fmt: skip
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return result


# ---------------------------------------------------------------------------------------------- driver
def _in_fresh_process(config: DemoConfig, kind: str) -> dict:
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_run, config, kind).result()


def _mean_tail(losses: list[float], n: int = 5) -> float:
    tail = losses[-n:]
    return sum(tail) / len(tail)


def _plot(results: dict[str, dict], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = {"nf4": "QLoRA (NF4 base, fourbit)", "dense": "LoRA (float32 base)"}
    for kind, r in results.items():
        ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=labels.get(kind, kind), linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title("fourbit demo: LoRA fine-tune of a small Llama-style model")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_demo(config: DemoConfig) -> dict[str, dict]:
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    what = config.model or "a small Llama-style model built from a config ({:.1f}M parameters, byte vocabulary)".format(
        _builtin_parameter_count() / 1e6)  # fmt: skip
    print(f"fourbit demo: LoRA r={config.rank} on every linear layer of {what}")
    print(f"  text: {config.text or 'the bundled corpus'}; {config.steps} steps of {config.batch} x {config.seq} "
          f"tokens, AdamW lr {config.lr}, {config.threads} threads; each run in a fresh process", flush=True)
    results = {}
    for kind in config.runs:
        results[kind] = _in_fresh_process(config, kind)
    _report(results)
    plot = _plot(results, out / "loss.png")
    (out / "results.json").write_text(json.dumps({"config": asdict(config), "results": results}, indent=1))
    if "nf4" in results:
        print(f"adapter (PEFT format): {results['nf4']['adapter']}")
    if plot:
        print(f"loss curves: {plot}")
    print(f"figures: {out / 'results.json'}")
    return results


def _builtin_parameter_count() -> int:
    c = BUILTIN_MODEL
    h, i, v, n = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    return n * (4 * h * h + 3 * h * i + 2 * h) + 2 * v * h + h


def _report(results: dict[str, dict]) -> None:
    rows = [("", "first loss", "last 5 (mean)", "drop", "train tok/s", "weights", "peak RSS", "decode tok/s")]
    for kind, r in results.items():
        first, last = r["losses"][0], _mean_tail(r["losses"])
        rows.append((kind, f"{first:.3f}", f"{last:.3f}", f"{100 * (1 - last / first):.0f}%",
                     f"{r['train_tokens_per_s']:.0f}", f"{r['weights_mib']:.1f} MiB", f"{r['peak_rss_mib']:.0f} MiB",
                     f"{r['decode_tokens_per_s']:.1f}"))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    for row in rows:
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
    if "nf4" in results and "dense" in results:
        q, d = results["nf4"], results["dense"]
        print(f"nf4 / dense: training speed {q['train_tokens_per_s'] / d['train_tokens_per_s']:.2f}x, "
              f"decode speed {q['decode_tokens_per_s'] / d['decode_tokens_per_s']:.2f}x, "
              f"weights {q['weights_mib'] / d['weights_mib']:.2f}x, "
              f"peak memory {q['peak_rss_mib'] / d['peak_rss_mib']:.2f}x (whole process, Python and torch included)")
    for kind, r in results.items():
        print(f"{kind} sample after {r['prompt']!r}: {r['sample']!r}")
    print()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = DemoConfig()
    parser.add_argument("--model", default=None, help="a local Hugging Face model folder (default: a built-in model)")
    parser.add_argument("--text", default=None, help="a text file to fine-tune on (default: the bundled corpus)")
    parser.add_argument("--out", default=d.out, help="folder for the adapter, plot and figures (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=d.steps, help="training steps (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=d.batch, help="sequences per step (default: %(default)s)")
    parser.add_argument("--seq", type=int, default=d.seq, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=d.lr, help="learning rate (default: %(default)s)")
    parser.add_argument("--rank", type=int, default=d.rank, help="LoRA rank (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=d.threads, help="CPU threads (default: %(default)s)")
    parser.add_argument("--only", choices=["nf4", "dense"], default=None, help="run only one of the two")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(args: argparse.Namespace) -> DemoConfig:
    for name in ("steps", "batch", "seq", "rank", "threads"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name} must be positive, got {getattr(args, name)}")
    if args.model is not None and not Path(args.model).is_dir():
        raise ValueError(f"--model {args.model!r} is not a folder")
    if args.text is not None and not Path(args.text).is_file():
        raise ValueError(f"--text {args.text!r} is not a file")
    if not math.isfinite(args.lr) or args.lr <= 0:
        raise ValueError(f"--lr must be a positive number, got {args.lr}")
    return DemoConfig(model=args.model, text=args.text, out=args.out, steps=args.steps, batch=args.batch,
                      seq=args.seq, lr=args.lr, rank=args.rank, alpha=2 * args.rank, threads=args.threads,
                      progress=not args.no_progress, runs=[args.only] if args.only else ["nf4", "dense"])  # fmt: skip

