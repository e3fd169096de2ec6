"""`engram bench train-throughput`: training tokens/s, model FLOPs utilisation, and the cost
of keeping the Engram tables in host RAM while training.

One model is trained for `steps` timed steps (after `warmup` untimed ones) on random
token batches (throughput does not depend on the data), twice in one run: with its
Engram tables on the compute device and with them in host RAM (`memory/host_trainable.py`,
the `--memory ram` of `engram train`, with its optimizer step overlapped on a worker), the
same batches and seed each way. Reported per
placement: median step time, tokens/s, and MFU = model FLOPs per second / the device's
peak, with model FLOPs per token = 6 x active non-embedding parameters + 12 x layers x dim x
seq (attention scores and values, forward and backward: the PaLM accounting); the output
head counts (a real matmul), the embedding lookup does not. bf16 autocast
on CUDA (the training loop's), fp32 on CPU. The step-time ratio ram/device is the cost
of the host placement.

`size="gpu"`: 171M active parameters (plus a 32k x 1024 head), 12 layers of dim 1024,
DeepSeekMoE with 16 routed experts (top 2) + 1 shared, Engram at layers 1 and 6 (8 heads,
2/3-grams, 2^19 slots per column: 1.07B table parameters), seq 1024, batch 16: sized for
one large GPU and for a check of a few minutes. `size="cpu"`: the quickstart
backbone, for a laptop or a test.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from engram_lm.bench.offload import _sync
from engram_lm.config import EngramConfig
from engram_lm.memory.host_trainable import HostTableStepper, tables_to_host
from engram_lm.models.accounting import count_params
from engram_lm.models.config import ModelConfig
from engram_lm.models.transformer import EngramLM
from engram_lm.training.loop import autocast
from engram_lm.training.optim import OptimConfig, build_optimizers

PEAK_BF16_TFLOPS = {"H200": 989.5, "H100": 989.5, "A100": 312.0, "L40S": 362.0, "A10": 125.0}  # dense, no sparsity


def sized_config(size: str) -> tuple[ModelConfig, int, int]:
    """(model config, batch, seq) of a named size."""
    if size == "gpu":
        model = ModelConfig(vocab_size=32768, dim=1024, num_layers=12, num_heads=16, max_seq_len=1024,
                            ffn_hidden=4096, num_routed_experts=16, num_shared_experts=1, top_k=2,
                            expert_hidden=1024)  # fmt: skip
        engram = EngramConfig(tokenizer="identity:32768", table_sizes=(1 << 19, 1 << 19), max_ngram=3, num_heads=8,
                              layer_ids=(1, 6), pad_id=0, embed_per_ngram=512, zero_init_output=True)  # fmt: skip
        return model.with_(engram=engram), 16, 1024
    if size == "cpu":
        model = ModelConfig(vocab_size=4096, dim=128, num_layers=4, num_heads=4, max_seq_len=256, ffn_hidden=512,
                            num_routed_experts=16, num_shared_experts=1, top_k=2, expert_hidden=128)  # fmt: skip
        engram = EngramConfig(tokenizer="identity:4096", table_sizes=(1 << 15, 1 << 15), max_ngram=3, num_heads=4,
                              layer_ids=(1,), pad_id=0, embed_per_ngram=128, zero_init_output=True)  # fmt: skip
        return model.with_(engram=engram), 8, 128
    raise ValueError(f"size must be 'gpu' or 'cpu', got {size!r}")


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def flops_per_token(model: EngramLM, seq: int) -> float:
    counts = count_params(model)
    cfg = model.config
    return 6 * (counts.active + model.head.weight.numel()) + 12 * cfg.num_layers * cfg.dim * seq


def _run(cfg: ModelConfig, memory: str, batches, device: torch.device, warmup: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = EngramLM(cfg)
    if memory == "ram":
        tables_to_host(model, device)
    model.to(device)
    model.train()
    optimizers = build_optimizers(model, OptimConfig(lr=1e-3))
    stepper = HostTableStepper.for_model(model, optimizers) if memory == "ram" else None  # as `engram train` does
    in_place = stepper.others(optimizers) if stepper else optimizers
    times, losses = [], []
    for i, (x, y) in enumerate(batches):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        _sync(device)
        t0 = time.perf_counter()
        with autocast(device):
            _, loss = model(x, y)
        loss.backward()
        if stepper is not None:
            stepper.launch(1.0)  # the host tables' step overlaps the dense steps and the next forward
        for opt in in_place.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        model.update_route_biases()
        _sync(device)
        if i >= warmup:  # the first steps allocate optimizer state and compile kernels
            times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    if stepper is not None:
        stepper.wait()
        stepper.close()
    step = statistics.median(times)
    tokens = batches[0][0].numel()
    result = {"step_ms": 1e3 * step, "tokens_per_s": tokens / step, "losses": losses,
              "flops_per_token": flops_per_token(model, batches[0][0].shape[1])}  # fmt: skip
    peak = peak_flops(device)
    result["mfu"] = result["flops_per_token"] * result["tokens_per_s"] / peak if peak else None
    if device.type == "cuda":
        result["max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        torch.cuda.reset_peak_memory_stats(device)
    del model, optimizers
    return result


def bench_train_throughput(size: str = "gpu", steps: int = 10, warmup: int = 3, device: str = "cuda") -> dict[str, Any]:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("this PyTorch build has no CUDA device; use --device cpu (and --size cpu)")
    cfg, batch, seq = sized_config(size)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(steps + warmup):
        x = torch.randint(1, cfg.vocab_size, (batch, seq), generator=gen)
        batches.append((x, torch.roll(x, -1, dims=1)))
    with torch.device("meta"):
        counts = count_params(EngramLM(cfg))
    placements = {memory: _run(cfg, memory, batches, device, warmup) for memory in ("device", "ram")}
    return {"size": size, "device": str(device), "batch": batch, "seq": seq, "steps": steps, "warmup": warmup,
            "dtype": "bf16 autocast" if device.type == "cuda" else "fp32",
            "params_total": counts.total, "params_active": counts.active, "params_table": counts.engram,
            "peak_flops": peak_flops(device), "placements": placements,
            "host_vs_device_step_ratio": placements["ram"]["step_ms"] / placements["device"]["step_ms"],
            "same_losses": placements["ram"]["losses"] == placements["device"]["losses"]}  # fmt: skip
