# SPDX-License-Identifier: Apache-2.0
"""`python -m fourbit demo` end to end at a tiny size: both runs, the table, the adapter (loadable by PEFT), the plot."""

import copy
import json
import subprocess
import sys

import peft
import torch
import transformers

import fourbit
from fourbit import demo


def test_demo_runs_and_writes_a_peft_adapter_and_a_plot(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "fourbit", "demo", "--steps", "3", "--batch", "2", "--seq", "32", "--rank", "4",
         "--out", str(out), "--no-progress"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "nf4 / dense: training speed" in proc.stdout
    assert (out / "loss.png").stat().st_size > 1000
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == {"nf4", "dense"}
    for r in results.values():
        assert len(r["losses"]) == 3 and all(x > 0 for x in r["losses"])
        assert r["decode_tokens_per_s"] > 0 and r["peak_rss_mib"] > 0
    assert results["nf4"]["weights_mib"] < 0.5 * results["dense"]["weights_mib"]
    # The same initial weights and batches: the first losses agree to the NF4 rounding.
    assert abs(results["nf4"]["losses"][0] - results["dense"]["losses"][0]) < 0.05
    # The saved adapter loads in PEFT over the demo's base model (dequantized weights) with fourbit's logits.
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(transformers.LlamaConfig(**demo.BUILTIN_MODEL)).eval()
    ours = fourbit.load_adapter(fourbit.quantize_model(copy.deepcopy(base), progress=False), out / "adapter")
    for name, m in ours.named_modules():
        if isinstance(m, fourbit.nn.Linear4bit):
            with torch.no_grad():
                base.get_submodule(name.replace(".base_layer", "")).weight.copy_(m.dequantize(torch.float32))
    theirs = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
    ids = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-4)


def test_demo_rejects_bad_arguments(tmp_path):
    for args, message in ((["--steps", "0"], "--steps must be positive"), (["--text", str(tmp_path / "no.txt")], "is not a file")):
        proc = subprocess.run([sys.executable, "-m", "fourbit", "demo", *args], capture_output=True, text=True)
        assert proc.returncode == 2 and message in proc.stderr
