# SPDX-License-Identifier: Apache-2.0
"""generate() decode tokens/s: fourbit's NF4 model against the dense float32 model and bitsandbytes' NF4 model.

    python bench/bench_decode.py                 # the demo's model (python -m fourbit demo)
    python bench/bench_decode.py --hidden 2048 --intermediate 5632 --layers 8   # weights well above the L3 cache

The same random weights in all three; bitsandbytes' model is transformers' own 4-bit path (bnb.nn.Linear4bit with
NF4, double quantization, float32 compute). Greedy decoding of --new tokens after a 16-token prompt, batch 1,
2 threads; the three models are timed in turn, --repeats times, and the medians compared.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
import transformers

import fourbit
from fourbit.demo import BUILTIN_MODEL


def bitsandbytes_model(dense: torch.nn.Module) -> torch.nn.Module:
    """The dense model with every linear layer but lm_head replaced by bitsandbytes' NF4 Linear4bit."""
    import bitsandbytes as bnb

    model = copy.deepcopy(dense)
    for name, module in list(model.named_modules()):
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                      compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")  # fmt: skip
            layer.weight = bnb.nn.Params4bit(module.weight.data.clone(), requires_grad=False, quant_type="nf4",
                                             compress_statistics=True)  # fmt: skip
            layer = layer.to("cpu")  # quantizes
            if module.bias is not None:
                layer.bias = torch.nn.Parameter(module.bias.data.clone(), requires_grad=False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
    return model


def decode_seconds(model, prompt, new_tokens):
    kwargs = dict(do_sample=False, pad_token_id=0, min_new_tokens=new_tokens, max_new_tokens=new_tokens)
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(prompt, **kwargs)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=BUILTIN_MODEL["hidden_size"])
    parser.add_argument("--intermediate", type=int, default=BUILTIN_MODEL["intermediate_size"])
    parser.add_argument("--layers", type=int, default=BUILTIN_MODEL["num_hidden_layers"])
    parser.add_argument("--heads", type=int, default=BUILTIN_MODEL["num_attention_heads"])
    parser.add_argument("--new", type=int, default=64, help="tokens to generate")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-bnb", action="store_true", help="skip bitsandbytes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    config = dict(BUILTIN_MODEL, hidden_size=args.hidden, intermediate_size=args.intermediate,
                  num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads)  # fmt: skip
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()
    models = {"dense fp32": dense, "fourbit nf4": fourbit.quantize_model(copy.deepcopy(dense), progress=False)}
    if not args.no_bnb:
        models["bitsandbytes nf4"] = bitsandbytes_model(dense)
    weights = sum(p.numel() * p.element_size() for p in dense.parameters()) / 2**20
    print(f"Llama-style model: hidden {args.hidden}, MLP {args.intermediate}, {args.layers} layers "
          f"({weights:.0f} MiB of float32 weights); batch 1, {args.new} new tokens, {args.threads} threads")
    prompt = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(1))
    times = {name: [] for name in models}
    for model in models.values():
        decode_seconds(model, prompt, 4)  # warm up
    for _ in range(args.repeats):
        for name, model in models.items():
            times[name].append(decode_seconds(model, prompt, args.new))
    tps = {name: args.new / statistics.median(t) for name, t in times.items()}
    ours = tps["fourbit nf4"]
    for name, value in tps.items():
        ratio = "" if name == "fourbit nf4" else f"   fourbit is {ours / value:.2f}x"
        print(f"  {name:>17}: {value:8.1f} tokens/s{ratio}")


if __name__ == "__main__":
    main()
