# SPDX-License-Identifier: Apache-2.0
"""QLoRA under torch.distributed, 2 processes on the CPU with gloo over loopback: DDP and FSDP2 (fourbit.distributed)
against the single-process run on the concatenated batch, per-rank storage of the sharded 4-bit weights, the bytes
on the wire, mixed precision that leaves the packed data and scales alone, and saves read back in one process.

Each test spawns its 2 workers once and checks several things in them (process start-up dominates the time); a
worker that hangs is killed after a hard timeout and the test fails instead of blocking CI."""

import copy
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers

import fourbit
from fourbit import distributed as fd
from fourbit.nn import Linear4bit, LoRALinear

WORLD = 2
TIMEOUT_S = 180  # generous: CI machines are shared; a hang still fails
BATCH = 4  # split in halves over the two ranks
SEQ = 8


def tiny_qlora(seed=0, quant_storage=torch.uint8, compress_statistics=True):
    """A 2-layer Llama (vocab 256, hidden 64), quantized to NF4, LoRA r=4 on every linear, lora_B non-zero so every
    adapter gets a gradient."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config)
    fourbit.quantize_model(model, compress_statistics=compress_statistics, quant_storage=quant_storage, progress=False)
    fourbit.add_lora(model, fourbit.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():
        for layer in fourbit.lora_layers(model).values():
            layer.lora_B["default"].weight.normal_(0, 0.05)
    return model


def batch():
    ids = torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))
    return ids


def adapter_params(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------------------------------- process plumbing
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, worker, port, tmp):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        worker(rank, tmp)
    finally:
        dist.destroy_process_group()


def spawn(worker, tmp):
    """Runs ``worker(rank, tmp)`` in WORLD fresh processes; fails (killing them) after TIMEOUT_S."""
    ctx = mp.start_processes(_entry, args=(worker, _free_port(), str(tmp)), nprocs=WORLD, join=False,
                             start_method="spawn")  # fmt: skip
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()


# ---------------------------------------------------------------------------------------------------------- DDP
def _ddp_worker(rank, tmp):
    ids = batch()
    model = tiny_qlora()
    ref = copy.deepcopy(model)
    ref(ids, labels=ids).loss.backward()

    synced = []

    def record(state, bucket):  # what DDP all-reduces: must be exactly the adapters
        synced.extend(bucket.parameters())
        fut = dist.all_reduce(bucket.buffer().div_(WORLD), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])

    ddp = torch.nn.parallel.DistributedDataParallel(model)
    ddp.register_comm_hook(None, record)
    half = ids.chunk(WORLD)[rank]
    ddp(half, labels=half).loss.backward()

    trainable = adapter_params(model)
    assert trainable and all("lora_" in n for n in trainable)
    assert {id(p) for p in synced} == {id(p) for p in trainable.values()}
    assert not any(p.dtype == torch.uint8 for p in synced)
    ref_params = dict(ref.named_parameters())
    for name, p in trainable.items():
        torch.testing.assert_close(p.grad, ref_params[name].grad, rtol=1e-4, atol=1e-6, msg=name)

    # A training step keeps the ranks identical and equal to the single-process step.
    for m in (model, ref):
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
        opt.step()
    for name, p in trainable.items():
        torch.testing.assert_close(p, ref_params[name], rtol=1e-4, atol=1e-6, msg=name)

    path = os.path.join(tmp, "ddp_adapter")
    fd.save_adapter_distributed(ddp, path)
    if rank == 0:
        fresh = fourbit.quantize_model(tiny_qlora_base(), progress=False)
        fourbit.load_adapter(fresh, path)
        torch.testing.assert_close(fresh(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def tiny_qlora_base():
    """The same base model as tiny_qlora, not quantized (load_adapter adds the LoRA layers)."""
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def test_ddp_syncs_only_adapters_and_matches_single_process(tmp_path):
    spawn(_ddp_worker, tmp_path)


# -------------------------------------------------------------------------------------------------------- FSDP2
def _mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (WORLD,))


def _fsdp_worker(rank, tmp):
    from torch.distributed.tensor import DTensor

    ids = batch()
    half = ids.chunk(WORLD)[rank]
    model = tiny_qlora()
    ref = copy.deepcopy(model)
    ref_out = ref(ids, labels=ids)
    ref_out.loss.backward()
    ref_params = dict(ref.named_parameters())
    total = fd.sharded_bytes(ref)

    fd.shard_model(model, mesh=_mesh())

    # Storage: each rank holds about half of the packed weights and of the per-block scales.
    mine = fd.sharded_bytes(model)
    units = fd.quantized_units(model)
    assert len(units) == 14
    for unit in units.values():
        base = unit.base_layer
        assert isinstance(base.weight, DTensor) and isinstance(base.weight_absmax, DTensor)
        assert base.weight.to_local().dtype == torch.uint8 and base.weight_absmax.to_local().dtype == torch.uint8
    both = torch.tensor([mine["packed"], mine["scales"], mine["adapters"]])
    dist.all_reduce(both)
    assert both[0] == total["packed"]
    assert mine["packed"] <= total["packed"] // 2 + len(units)  # at most one padding row per tensor
    assert mine["adapters"] <= total["adapters"] // 2 + 4 * 64 * len(units)
    assert mine["scales"] < total["scales"]

    # On the wire: one forward all-gathers the packed bytes as they are, never a dequantized copy.
    gathered = []
    original = dist.all_gather_into_tensor

    def counting(output, input, *args, **kwargs):
        gathered.append(output.numel() * output.element_size())
        return original(output, input, *args, **kwargs)

    dist.all_gather_into_tensor = counting
    try:
        out = model(half, labels=half)
    finally:
        dist.all_gather_into_tensor = original
    dense_bf16 = sum(2 * m.base_layer.in_features * m.base_layer.out_features for m in units.values())
    others = sum(p.numel() * p.element_size() for n, p in ref.named_parameters() if ".base_layer." not in n)
    assert sum(gathered) <= total["packed"] + total["scales"] + others + 64 * len(gathered)
    assert sum(gathered) - others < dense_bf16 / 3

    # Forward and backward match the single-process model on the concatenated batch.
    torch.testing.assert_close(out.logits, ref_out.logits.chunk(WORLD)[rank], rtol=1e-5, atol=1e-5)
    out.loss.backward()
    trainable = adapter_params(model)
    assert trainable and all("lora_" in n for n in trainable)
    for name, p in trainable.items():
        torch.testing.assert_close(p.grad.full_tensor(), ref_params[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)

    # Optimizer state for the adapters only; a step equals the single-process step.
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ref_opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=1e-2)
    opt.step()
    ref_opt.step()
    assert all(id(p) in {id(q) for q in trainable.values()} for p in opt.state)
    for name, p in trainable.items():
        torch.testing.assert_close(p.full_tensor(), ref_params[name], rtol=1e-5, atol=1e-6, msg=name)
    with torch.no_grad():
        expected = ref(ids).logits
        torch.testing.assert_close(model(half).logits, expected.chunk(WORLD)[rank], rtol=1e-5, atol=1e-5)

    # Saves: the PEFT adapter once; the full checkpoint gathered (bitsandbytes keys); DCP shards.
    adapter_path = os.path.join(tmp, "adapter")
    fd.save_adapter_distributed(model, adapter_path)
    ckpt_path = os.path.join(tmp, "full")
    fd.save_quantized_checkpoint(model, ckpt_path)
    dcp_path = os.path.join(tmp, "dcp")
    fd.save_checkpoint_dcp(model, dcp_path, opt)
    # torch.distributed.checkpoint's own state-dict API resolves bitsandbytes' keys too (what accelerate calls).
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    dsd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    gathered = fd.gather_full_state_dict(model)
    if rank == 0:
        assert dsd.keys() == gathered.keys() and all(torch.equal(dsd[k], gathered[k]) for k in dsd)
    if rank == 0:
        assert sorted(os.listdir(adapter_path)) == ["adapter_config.json", "adapter_model.safetensors"]
        single = fourbit.quantize_model(tiny_qlora_base(), progress=False)
        fourbit.load_adapter(single, adapter_path)
        torch.testing.assert_close(single(ids).logits, expected, rtol=1e-5, atol=1e-5)

        from safetensors.torch import load_file

        keys = set(load_file(os.path.join(ckpt_path, fd.CHECKPOINT_WEIGHTS)))
        q = "model.layers.0.self_attn.q_proj.base_layer.weight"
        assert {q, q + ".absmax", q + ".quant_map", q + ".nested_absmax", q + ".quant_state.bitsandbytes__nf4"} <= keys
        full = fd.load_quantized_checkpoint(tiny_qlora(seed=1), ckpt_path)
        torch.testing.assert_close(full(ids).logits, expected, rtol=1e-5, atol=1e-5)
        for name, t in ref.state_dict().items():
            assert torch.equal(full.state_dict()[name], t) or "lora_" in name, name

    # DCP: a fresh model (different random weights) sharded the same way reads the shards in place.
    other = fd.shard_model(tiny_qlora(seed=1), mesh=_mesh())
    other_opt = torch.optim.AdamW([p for p in other.parameters() if p.requires_grad], lr=1e-2)
    fd.load_checkpoint_dcp(other, dcp_path, other_opt)
    with torch.no_grad():
        torch.testing.assert_close(other(half).logits, expected.chunk(WORLD)[rank], rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(trainable.items(), (q for q in other.parameters() if q.requires_grad)):
        assert torch.equal(opt.state[p]["exp_avg"].to_local(), other_opt.state[q]["exp_avg"].to_local()), name


def _fsdp_workers(rank, tmp):
    _fsdp_worker(rank, tmp)
    _mixed_precision_worker(rank, tmp)


def test_fsdp2_shards_4bit_weights_matches_single_process_and_keeps_them_out_of_mixed_precision(tmp_path):
    """Two parts in one pair of processes (start-up is most of the time): without mixed precision (quantized units
    in their block's FSDP group), then with a bf16 policy (quantized units in their own, non-casting groups)."""
    spawn(_fsdp_workers, tmp_path)


def _mixed_precision_worker(rank, tmp):
    """bf16 mixed precision with the packed data stored as bf16 (quant_storage): random 4-bit codes viewed as bf16
    include NaN bit patterns that any cast would canonicalize; the compute must see the original bytes."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    ids = batch()
    half = ids.chunk(WORLD)[rank]
    model = tiny_qlora(compress_statistics=False)
    ref = copy.deepcopy(model)
    fd.set_quant_storage(model, torch.bfloat16)
    original = {name: (u.base_layer.weight.detach().view(torch.uint8).clone(), u.base_layer.weight_absmax.clone())
                for name, u in fd.quantized_units(model).items()}  # fmt: skip
    assert any(torch.isnan(u.base_layer.weight).any() for u in fd.quantized_units(model).values())
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    fd.shard_model(model, mesh=_mesh(), mp_policy=policy)

    seen = {}

    def check(name):
        def hook(module, args):
            base = module.base_layer
            seen[name] = (base.weight.dtype, base.weight_absmax.dtype)
            packed, absmax = original[name]
            assert torch.equal(base.weight.view(torch.uint8)[: packed.numel()], packed), name
            assert torch.equal(base.weight_absmax, absmax), name

        return hook

    for name, unit in fd.quantized_units(model).items():
        unit.register_forward_pre_hook(check(name))
    out = model(half, labels=half)
    assert seen and all(v == (torch.bfloat16, torch.float32) for v in seen.values()), seen
    out.loss.backward()
    assert model.model.norm.weight.dtype == torch.float32  # the sharded master copy, cast for compute only
    with torch.no_grad():
        expected = ref(ids).logits.chunk(WORLD)[rank]
    error = (out.logits.float() - expected).norm() / expected.norm()
    assert error < 0.02, error  # bf16 compute against the fp32 single-process model
    assert all(p.grad.dtype == torch.float32 for p in adapter_params(model).values())



# ---------------------------------------------------------------------------------------- single-process pieces
def test_scales_as_parameters_keeps_keys_forward_and_dtypes():
    layer = Linear4bit.from_linear(torch.nn.Linear(64, 48), compress_statistics=False)
    x = torch.randn(3, 64)
    before, state = layer(x), layer.state_dict()
    layer.scales_as_parameters()
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias", "weight_absmax"]
    assert not layer.weight_absmax.requires_grad
    assert layer.state_dict().keys() == state.keys() and torch.equal(layer(x), before)
    layer.half()  # the fp32 absmax, now a Parameter, is still never cast
    assert layer.weight_absmax.dtype == torch.float32 and isinstance(layer.weight_absmax, torch.nn.Parameter)
    other = Linear4bit.from_linear(torch.nn.Linear(64, 48), compress_statistics=False).scales_as_parameters()
    other.load_state_dict(state)
    assert isinstance(other.weight_absmax, torch.nn.Parameter) and torch.equal(other(x), before)


def test_set_quant_storage_keeps_the_bytes():
    model = torch.nn.Sequential(Linear4bit.from_linear(torch.nn.Linear(63, 5)))  # odd element count: padded
    x = torch.randn(2, 63)
    before, raw = model(x), model[0].weight.detach().view(torch.uint8).reshape(-1).clone()
    fd.set_quant_storage(model, torch.bfloat16)
    assert model[0].weight.dtype == torch.bfloat16
    assert torch.equal(model[0].weight.view(torch.uint8).reshape(-1)[: raw.numel()], raw)
    assert torch.equal(model(x), before)
    fd.set_quant_storage(model, torch.uint8)
    assert model[0].weight.shape == (raw.numel(), 1) and torch.equal(model[0].weight.reshape(-1), raw)
    assert torch.equal(model(x), before)
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        fd.set_quant_storage(model, "bf16")


def test_shard_model_rejects_bad_input():
    with pytest.raises(ValueError, match="no Linear4bit layers"):
        fd.shard_model(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match="mp_policy must be"):
        fd.shard_model(torch.nn.Sequential(Linear4bit(64, 8)), mp_policy="bf16")


def test_dcp_state_dict_api_resolves_bitsandbytes_keys():
    """torch.distributed.checkpoint's get/set_model_state_dict walk every key by getattr; bitsandbytes' keys
    (weight.absmax, weight.quant_state.bitsandbytes__nf4, ...) must resolve, as bitsandbytes #1405 needed."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    model = torch.nn.Sequential(Linear4bit.from_linear(torch.nn.Linear(64, 32)), torch.nn.ReLU())
    state = get_model_state_dict(model)
    assert state.keys() == model.state_dict().keys() and "0.weight.quant_state.bitsandbytes__nf4" in state
    other = torch.nn.Sequential(Linear4bit(64, 32), torch.nn.ReLU())
    set_model_state_dict(other, state)
    x = torch.randn(2, 64)
    assert torch.equal(other(x), model(x))
