# SPDX-License-Identifier: Apache-2.0
"""The benchmark harness: interleaved timing, ratios, rotation sizing, the table, JSON and the plot."""

import json

import pytest
import torch

from fourbit import benchmark


def test_rotations_cover_four_times_the_last_level_cache():
    cpu = torch.device("cpu")
    llc = benchmark.last_level_cache_bytes(cpu)
    assert llc >= 1 << 20
    copies = benchmark.rotations(1 << 20, cpu)
    assert copies * (1 << 20) >= 4 * llc
    assert benchmark.rotations(1 << 40, cpu) == 2  # never fewer than two copies


def test_quant_suite_runs_and_reports_ratios(tmp_path):
    cases = benchmark.quant_cases(torch.device("cpu"), shape=(128, 512), cache_bytes=1 << 20)
    names = [c.name for c in cases]
    assert names[0].startswith("quantize_4bit") and any("into out=" in n for n in names)
    results = benchmark.run_cases(cases, torch.device("cpu"), repeats=3, warmup=1)
    for res in results:
        assert res.fourbit_ms > 0 and all(t > 0 for t in res.peer_ms.values())
        assert res.gbps > 0
    quantize = results[0]
    assert "bitsandbytes" in quantize.peer_ms
    assert quantize.ratio("bitsandbytes") == pytest.approx(quantize.peer_ms["bitsandbytes"] / quantize.fourbit_ms)
    assert quantize.meets_target() in (True, False)
    table = benchmark.format_table(results)
    assert "peer/fourbit" in table and quantize.name in table
    benchmark.write_json(results, tmp_path / "r.json", {"device": "cpu"})
    payload = json.loads((tmp_path / "r.json").read_text())
    assert payload["results"][0]["name"] == quantize.name and "ratios" in payload["results"][0]
    benchmark.plot(results, tmp_path / "r.png", "test")
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_peak_memory_is_measured_in_a_fresh_process():
    extra = benchmark.peak_memory("fourbit", torch.float32, 4, shape=(256, 512), rank=4)
    assert isinstance(extra, int) and 0 <= extra < 256 << 20
    table = benchmark.memory_report(shape=(256, 512), dtypes=(torch.float32,), batches=(4,))
    assert "fourbit MiB" in table and "% of dequantized W" in table
