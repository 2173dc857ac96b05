# SPDX-License-Identifier: Apache-2.0
"""Hypothesis fuzzing of the ops, QuantState.from_dict, Linear4bit.load_state_dict, load_adapter and from_pretrained
with random shapes, blocksizes, special values and corrupted inputs.

Properties: valid inputs give the reference's bytes; corrupted inputs give a Python exception of an expected kind (or
a result that is consistent with the data), never a crash, and a failed load leaves the model as it was. Under
scripts/sanitize.sh the same examples run with AddressSanitizer, so an out-of-bounds access is a failure too.

CI runs a fixed, derandomized set of examples (a few hundred in total, bounded in time). scripts/fuzz.py runs the same
targets for as long as it is given, with fresh random seeds, and reports how many cases ran.
"""

from __future__ import annotations

import collections
import json
import math
import os
import struct
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fourbit
from fourbit import QuantState, reference
from fourbit.nn import Linear4bit

# Examples per target in CI; scripts/fuzz.py scales them (FOURBIT_FUZZ_SCALE) and draws fresh seeds.
SCALE = float(os.environ.get("FOURBIT_FUZZ_SCALE", "1"))
RANDOM = os.environ.get("FOURBIT_FUZZ_RANDOM") == "1"
COUNTS: collections.Counter = collections.Counter()  # examples run per target (scripts/fuzz.py reports them)

# Exceptions a corrupted input may raise. RuntimeError only for direct torch.ops calls (pybind's argument casts) and
# for nn.Module.load_state_dict, which gathers the layers' ValueError/TypeError messages into one RuntimeError.
CLEAN = (ValueError, TypeError)


def fuzz(examples: int):
    return settings(
        max_examples=max(1, int(examples * SCALE)),
        derandomize=not RANDOM,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        print_blob=True,
    )


BLOCKSIZES = [32, 64, 128, 256, 512, 1024, 2048, 4096]
SPECIAL = [0.0, -0.0, float("nan"), float("inf"), -float("inf"), 3e38, -3e38, 1e-40, 65504.0, 1e-8, 0.5]

json_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(["../../etc/passwd", "/abs/path", "nf4", "fp4", "float32", "LORA", ""]),
)  # fmt: skip
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)),
    max_leaves=8,
)


def mutate_json(data, value: dict) -> dict:
    """A JSON object with 1-3 random edits: keys removed, set to random values, or added."""
    out = dict(value)
    for _ in range(data.draw(st.integers(1, 3), label="json edits")):
        action = data.draw(st.sampled_from(["drop", "set", "add"]), label="json action")
        if action == "add" or not out:
            out[data.draw(st.text(max_size=10), label="new key")] = data.draw(json_values, label="new value")
        else:
            key = data.draw(st.sampled_from(sorted(out)), label="key")
            if action == "drop":
                del out[key]
            else:
                out[key] = data.draw(json_values, label="value")
    return out


def mutate_bytes(data, raw: bytes) -> bytes:
    """Byte-level corruption: flips, truncation, insertion."""
    b = bytearray(raw)
    for _ in range(data.draw(st.integers(1, 3), label="byte edits")):
        action = data.draw(st.sampled_from(["flip", "truncate", "insert", "set"]), label="byte action")
        pos = data.draw(st.integers(0, max(len(b) - 1, 0)), label="position")
        if action == "flip" and b:
            b[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif action == "truncate":
            del b[pos:]
        elif action == "insert":
            b[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
        elif b:
            b[pos] = data.draw(st.integers(0, 255))
    return bytes(b)


def random_tensor(data) -> torch.Tensor:
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.uint8, torch.int32, torch.float64]))
    n = data.draw(st.integers(0, 300))
    t = torch.randn(n).mul(10).to(dtype) if dtype.is_floating_point else torch.randint(0, 200, (n,)).to(dtype)
    if dtype.is_floating_point and n and data.draw(st.booleans()):
        t[data.draw(st.integers(0, n - 1))] = data.draw(st.sampled_from(SPECIAL))
    if data.draw(st.booleans()) and n > 1:
        t = t.reshape(-1, 1) if data.draw(st.booleans()) else t[::2]  # another rank, or non-contiguous
    return t


def mutate_tensors(data, tensors: dict, protect: tuple = ()) -> dict:
    """1-3 edits of a dict of tensors: drop, replace by a random tensor or a non-tensor, truncate, NaN, rename, add."""
    out = dict(tensors)
    for _ in range(data.draw(st.integers(1, 3), label="tensor edits")):
        keys = sorted(k for k in out if k not in protect)
        action = data.draw(st.sampled_from(["drop", "replace", "truncate", "nan", "rename", "add", "non-tensor"]))
        if action == "add" or not keys:
            out[data.draw(st.sampled_from(["evil", "../evil", "weight.absmax", "x.weight.nested_absmax"]))] = random_tensor(data)
            continue
        key = data.draw(st.sampled_from(keys), label="tensor key")
        v = out[key]
        if action == "drop":
            del out[key]
        elif action == "replace":
            out[key] = random_tensor(data)
        elif action == "truncate" and isinstance(v, torch.Tensor) and v.numel():
            out[key] = v.reshape(-1)[: data.draw(st.integers(0, v.numel() - 1))].clone()
        elif action == "nan" and isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel():
            v = v.clone()
            v.reshape(-1)[data.draw(st.integers(0, v.numel() - 1))] = data.draw(st.sampled_from(SPECIAL[2:5]))
            out[key] = v
        elif action == "rename":
            out[data.draw(st.sampled_from(["../" + key, key + ".x", key.replace("weight", "wieght"), "/" + key]))] = out.pop(key)
        elif action == "non-tensor":
            out[key] = data.draw(json_scalars)
    return out


def mutate_blob(data, tensors: dict) -> dict:
    """Edits inside the packed quant_state JSON blob (as JSON, or as raw bytes)."""
    out = dict(tensors)
    keys = [k for k in out if "quant_state" in k and isinstance(out[k], torch.Tensor)]
    if not keys:
        return out
    key = keys[0]
    raw = bytes(out[key].tolist())
    if data.draw(st.booleans(), label="blob as json"):
        raw = json.dumps(mutate_json(data, json.loads(raw))).encode()
    else:
        raw = mutate_bytes(data, raw)
    out[key] = torch.tensor(list(raw), dtype=torch.uint8)
    return out


# ---------------------------------------------------------------------------------------------------------- ops
@fuzz(120)
@given(st.data())
def test_fuzz_quantize_matches_reference(data):
    COUNTS["quantize"] += 1
    torch.manual_seed(0)  # every value below derives from the draws, so hypothesis can replay examples
    ndim = data.draw(st.integers(1, 3), label="ndim")
    shape = data.draw(st.lists(st.integers(0, 70), min_size=ndim, max_size=ndim), label="shape")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), label="dtype")
    blocksize = data.draw(st.sampled_from(BLOCKSIZES), label="blocksize")
    quant_type = data.draw(st.sampled_from(["nf4", "fp4"]), label="quant_type")
    nested = data.draw(st.booleans(), label="nested")
    scale = data.draw(st.sampled_from([1.0, 1e-30, 1e30, 1e4]), label="scale")
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))) * scale).to(dtype)
    n = x.numel()
    for _ in range(data.draw(st.integers(0, 3), label="specials") if n else 0):
        x.view(-1)[data.draw(st.integers(0, n - 1))] = data.draw(st.sampled_from(SPECIAL))
    if ndim >= 2 and data.draw(st.booleans(), label="transposed"):
        x = x.transpose(0, 1)  # non-contiguous (the same values in another order)
    packed, state = fourbit.quantize_4bit(x, blocksize, quant_type, nested)
    assert packed.shape == ((n + 1) // 2, 1) and state.absmax.numel() == math.ceil(n / blocksize)
    out = fourbit.dequantize_4bit(packed, state)
    assert out.shape == x.shape and out.dtype == dtype
    fake = fourbit.fake_quantize_4bit(x, quant_type, blocksize, nested)
    assert torch.equal(torch.isnan(fake), torch.isnan(out)) and torch.equal(fake.nan_to_num(), out.nan_to_num())
    finite = bool(torch.isfinite(x).all())
    if not nested:
        ref_packed, ref_absmax = reference.quantize_4bit(x, blocksize, quant_type)
        if finite:
            assert torch.equal(packed, ref_packed) and torch.equal(state.absmax, ref_absmax)
        ref = reference.dequantize_4bit(packed, state.absmax, blocksize, quant_type, x.shape, dtype)
        assert torch.equal(torch.isnan(ref), torch.isnan(out)) and torch.equal(ref.nan_to_num(), out.nan_to_num())
    if finite:
        state.validate()  # a state the ops built from finite input is valid


def _op_call(data, packed, state):
    """dequantize_4bit (or _into) and, for 2-D shapes, matmul_4bit with 1-3 of the arguments corrupted."""
    absmax, na, nc, off, nbs = state.op_args()
    a = dict(packed=packed, absmax=absmax, blocksize=state.blocksize, quant_type=state.quant_type,
             shape=list(state.shape), nested_absmax=na, nested_code=nc, offset=off, nested_blocksize=nbs)  # fmt: skip
    ints = st.one_of(st.sampled_from([-1, 0, 1, 16, 31, 100, 1 << 40, (1 << 62) + 1]), st.sampled_from(BLOCKSIZES))
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        field = data.draw(st.sampled_from(sorted(a)), label="field")
        v = a[field]
        if field in ("blocksize", "nested_blocksize"):
            a[field] = data.draw(ints)
        elif field == "quant_type":
            a[field] = data.draw(st.sampled_from(["nf4", "fp4", "int4", "", "dynamic"]))
        elif field == "shape":
            a[field] = data.draw(st.lists(st.one_of(st.integers(-3, 300), st.sampled_from([1 << 31, 1 << 40])), max_size=4))
        elif v is None or data.draw(st.booleans()):
            a[field] = None if v is not None and data.draw(st.booleans()) else random_tensor(data)
        else:
            a[field] = v.reshape(-1)[: data.draw(st.integers(0, v.numel()))].clone() if v.numel() else v
    into = data.draw(st.booleans(), label="into")
    try:
        n = math.prod(a["shape"]) if all(isinstance(d, int) and d >= 0 for d in a["shape"]) else -1
        if into and 0 <= n <= 1 << 20:
            out = torch.empty(n, dtype=data.draw(st.sampled_from([torch.float32, torch.bfloat16, torch.int32])))
            torch.ops.fourbit.dequantize_4bit_into(a["packed"], a["absmax"], a["blocksize"], a["quant_type"], a["shape"], out,
                                                   a["nested_absmax"], a["nested_code"], a["offset"], a["nested_blocksize"])  # fmt: skip
        else:
            out = torch.ops.fourbit.dequantize_4bit(a["packed"], a["absmax"], a["blocksize"], a["quant_type"], a["shape"],
                                                    torch.float32, a["nested_absmax"], a["nested_code"], a["offset"],
                                                    a["nested_blocksize"])  # fmt: skip
            assert list(out.shape) == a["shape"]
    except (*CLEAN, RuntimeError):
        return "raised"
    # Accepted: then the metadata must have been consistent with the buffers.
    assert a["packed"].numel() * a["packed"].element_size() >= (n + 1) // 2
    assert a["absmax"].numel() == math.ceil(n / a["blocksize"])
    assert a["quant_type"] in ("nf4", "fp4") and a["blocksize"] in BLOCKSIZES
    if len(a["shape"]) == 2 and a["shape"][1] <= 4096:
        x = torch.randn(data.draw(st.sampled_from([1, 3, 70])), a["shape"][1])
        try:
            torch.ops.fourbit.matmul_4bit(x, a["packed"], a["absmax"], a["blocksize"], a["quant_type"], a["shape"], None,
                                          a["nested_absmax"], a["nested_code"], a["offset"], a["nested_blocksize"])  # fmt: skip
        except (*CLEAN, RuntimeError):
            pass
    return "accepted"


@fuzz(150)
@given(st.data())
def test_fuzz_ops_with_corrupted_arguments(data):
    COUNTS["corrupted-op"] += 1
    torch.manual_seed(0)
    rows = data.draw(st.integers(1, 40), label="rows")
    cols = data.draw(st.sampled_from([64, 96, 130, 256]), label="cols")
    nested = data.draw(st.booleans(), label="nested")
    blocksize = data.draw(st.sampled_from([32, 64, 256]), label="blocksize")
    packed, state = fourbit.quantize_4bit(torch.randn(rows, cols), blocksize, "nf4", nested)
    _op_call(data, packed, state)


# ---------------------------------------------------------------------------------------------------------- QuantState
@fuzz(150)
@given(st.data())
def test_fuzz_quant_state_from_dict(data):
    COUNTS["from_dict"] += 1
    torch.manual_seed(0)
    nested = data.draw(st.booleans(), label="nested")
    quant_type = data.draw(st.sampled_from(["nf4", "fp4"]))
    packed, state = fourbit.quantize_4bit(torch.randn(37, 64), 64, quant_type, nested)
    prefix = data.draw(st.sampled_from(["", "model.layers.0.mlp.weight."]), label="prefix")
    d = {prefix + k: v for k, v in state.as_dict(packed=True).items()}
    if data.draw(st.booleans(), label="edit blob"):
        d = mutate_blob(data, d)
    if data.draw(st.booleans(), label="edit tensors"):
        d = mutate_tensors(data, d)
    try:
        loaded = QuantState.from_dict(d)
    except CLEAN:
        return
    assert isinstance(loaded, QuantState)
    blocks = math.ceil(math.prod(loaded.shape) / loaded.blocksize)
    assert loaded.absmax.numel() == blocks and bool(torch.isfinite(loaded.absmax.float()).all())
    try:
        out = fourbit.dequantize_4bit(packed, loaded)
    except CLEAN:
        assert (math.prod(loaded.shape) + 1) // 2 > packed.numel() or loaded.dtype not in (torch.float32, torch.float16, torch.bfloat16)
        return
    assert out.shape == loaded.shape


@fuzz(60)
@given(st.data())
def test_fuzz_linear4bit_load_state_dict(data):
    COUNTS["Linear4bit.load_state_dict"] += 1
    torch.manual_seed(0)
    nested = data.draw(st.booleans(), label="nested")
    layer = Linear4bit.from_linear(torch.nn.Linear(64, 24), compress_statistics=nested)
    sd = layer.state_dict()
    if data.draw(st.booleans(), label="edit blob"):
        sd = mutate_blob(data, sd)
    sd = mutate_tensors(data, sd) if data.draw(st.booleans(), label="edit tensors") else sd
    target = Linear4bit(64, 24, compress_statistics=nested)
    try:
        target.load_state_dict(sd)
    except (*CLEAN, RuntimeError):
        # torch's semantics: the valid parts may have been loaded before the error is raised; the layer must still
        # be consistent (never a new packed weight with the old scales).
        pass
    target.quant_state.validate()
    assert (target.weight.numel() * target.weight.element_size()) * 2 >= 64 * 24
    assert target(torch.randn(3, 64)).shape == (3, 24)  # a layer that loaded (or refused) still works


# ---------------------------------------------------------------------------------------------------------- files
def _tiny_llama():
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
    return transformers.LlamaForCausalLM(config).eval()


def _read_safetensors_raw(raw: bytes):
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _write_safetensors_raw(header: dict, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + body


def mutate_safetensors(data, raw: bytes) -> bytes:
    """Corrupts a safetensors file: its header (names, dtypes, shapes, offsets) or its bytes."""
    kind = data.draw(st.sampled_from(["header", "entry", "bytes", "length"]), label="safetensors edit")
    header, body = _read_safetensors_raw(raw)
    if kind == "bytes":
        return mutate_bytes(data, raw)
    if kind == "length":
        return struct.pack("<Q", data.draw(st.sampled_from([0, 1, len(raw), 1 << 40, (1 << 64) - 1]))) + raw[8:]
    names = sorted(k for k in header if k != "__metadata__")
    if kind == "header" or not names:
        header = mutate_json(data, header)
    else:
        name = data.draw(st.sampled_from(names), label="tensor")
        entry = dict(header[name])
        field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", "rename"]), label="entry field")
        if field == "dtype":
            entry["dtype"] = data.draw(st.sampled_from(["F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3", "XX"]))
        elif field == "shape":
            entry["shape"] = data.draw(st.lists(st.integers(-1, 1 << 33), max_size=3))
        elif field == "data_offsets":
            entry["data_offsets"] = data.draw(st.lists(st.integers(-1, len(body) + 10), min_size=2, max_size=2))
        else:
            header[data.draw(st.sampled_from(["../" + name, "/etc/" + name, name + ".weight", "base_model.x"]))] = entry
            del header[name]
            return _write_safetensors_raw(header, body)
        header[name] = entry
    return _write_safetensors_raw(header, body)


def _write_folder(folder: Path, files: dict) -> Path:
    """A folder holding these files (name -> bytes), as a user would hand it to a loader."""
    folder.mkdir()
    for name, raw in files.items():
        (folder / name).write_bytes(raw)
    return folder


@pytest.fixture(scope="module")
def adapter_files():
    model = fourbit.add_lora(_tiny_llama(), fourbit.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)
    with tempfile.TemporaryDirectory() as d:
        fourbit.save_adapter(model, d)
        return {name: (Path(d) / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")}


@fuzz(40)
@given(data=st.data())
def test_fuzz_load_adapter(adapter_files, data):
    COUNTS["load_adapter"] += 1
    torch.manual_seed(0)
    files = dict(adapter_files)
    what = data.draw(st.sampled_from(["config", "weights", "both"]), label="corrupt")
    if what in ("config", "both"):
        files["adapter_config.json"] = json.dumps(mutate_json(data, json.loads(files["adapter_config.json"]))).encode()
    if what in ("weights", "both"):
        files["adapter_model.safetensors"] = mutate_safetensors(data, files["adapter_model.safetensors"])
    model = _tiny_llama()
    ids = torch.arange(10).reshape(1, 10)
    with torch.no_grad():
        before = model(ids).logits
    with tempfile.TemporaryDirectory() as d:
        folder = _write_folder(Path(d) / "adapter", files)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                fourbit.load_adapter(model, folder)
            except (*CLEAN, FileNotFoundError):
                assert not fourbit.lora_layers(model)  # a refused load leaves the model as it was
                with torch.no_grad():
                    assert torch.equal(model(ids).logits, before)
                return
        assert sorted(p.name for p in Path(d).iterdir()) == ["adapter"]  # nothing written from names inside files
    with torch.no_grad():
        assert model(ids).logits.shape == before.shape


@pytest.fixture(scope="module")
def checkpoint_files():
    model = fourbit.quantize_model(_tiny_llama(), compress_statistics=True, progress=False)
    with tempfile.TemporaryDirectory() as d:
        fourbit.save_pretrained(model, d)
        return {p.name: p.read_bytes() for p in Path(d).iterdir() if p.is_file()}


@fuzz(30)
@given(data=st.data())
def test_fuzz_from_pretrained(checkpoint_files, data):
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    COUNTS["from_pretrained"] += 1
    torch.manual_seed(0)
    files = dict(checkpoint_files)
    what = data.draw(st.sampled_from(["config", "file", "tensors", "quant_state"]), label="corrupt")
    if what == "config":
        # The quantization_config that fourbit reads (the architecture fields are transformers' to validate).
        config = json.loads(files["config.json"])
        config["quantization_config"] = mutate_json(data, config["quantization_config"])
        files["config.json"] = json.dumps(config).encode()
    elif what == "file":
        files["model.safetensors"] = mutate_safetensors(data, files["model.safetensors"])
    else:
        tensors = st_load(files["model.safetensors"])
        layer = data.draw(st.sampled_from(sorted({k.rsplit(".weight", 1)[0] for k in tensors if k.endswith(".absmax")})))
        own = {k: v for k, v in tensors.items() if k.startswith(layer + ".weight")}
        rest = {k: v for k, v in tensors.items() if k not in own}
        own = mutate_blob(data, own) if what == "quant_state" else mutate_tensors(data, own)
        own = {k: v for k, v in own.items() if isinstance(v, torch.Tensor)}  # what a safetensors file can hold
        files["model.safetensors"] = st_save({**rest, **{k: v.contiguous() for k, v in own.items()}})
    with tempfile.TemporaryDirectory() as d:
        folder = _write_folder(Path(d) / "ckpt", files)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                model = fourbit.from_pretrained(folder, progress=False)
            except (*CLEAN, FileNotFoundError):
                return
        assert sorted(p.name for p in Path(d).iterdir()) == ["ckpt"]
    with torch.no_grad():
        assert model(torch.arange(8).reshape(1, 8)).logits.shape[:2] == (1, 8)
