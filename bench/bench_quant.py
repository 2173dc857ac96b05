#!/usr/bin/env python
# SPDX-License-Identifier: Apache-2.0
"""Quantize / dequantize benchmark against bitsandbytes (same as `python -m fourbit bench`).

    python bench/bench_quant.py                     # CPU, 2 threads, 4096x4096 NF4 blocksize 64, median of 11
    python bench/bench_quant.py --json out.json --plot out.png
    python bench/bench_quant.py --device cuda       # on a GPU machine (peer: the device copy bandwidth)
"""

import sys

from fourbit.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
