"""The cost model of docs/scaling.md: per-step all-reduce volume and expected scaling efficiency
of data-parallel (replicated) and sharded (ZeRO-3/FSDP-style) training against interconnect
bandwidth. Prints the document's tables. Dev-only; no dependencies.

    python3 scripts/scaling_model.py
"""

GB = 1e9
# Sustained bus bandwidth NCCL/MPI reach per rank (GB/s), well below the link's peak.
LINKS = [
    ("NVLink 4 (H100/H200 SXM, NVSwitch)", 360.0),
    ("PCIe Gen5 x16", 40.0),
    ("InfiniBand NDR 400 Gb/s", 45.0),
    ("Ethernet 100 Gb/s (RoCE)", 11.0),
    ("Ethernet 10 Gb/s", 1.1),
]
PEAK = 989e12  # H200 dense bf16 FLOP/s
MFU = 0.40
TOKENS = 2 * 4096  # per rank and step: batch 2 x 4k tokens


def params_7b():
    # Llama-2-7B shape: 32 layers, hidden 4096, MLP 11008, vocab 32000.
    h, f, layers, vocab = 4096, 11008, 32, 32000
    per_layer = 4 * h * h + 3 * h * f
    return layers * per_layer + 2 * vocab * h, (h, f, layers)


def lora_params(r, shape):
    h, f, layers = shape
    # q, k, v, o (h x h) and gate, up (h -> f), down (f -> h): r * (in + out) each.
    return layers * r * (4 * 2 * h + 2 * (h + f) + (f + h))


def ring(nbytes, n):
    """Bytes each rank sends in a ring all-reduce of `nbytes` over `n` ranks."""
    return 2 * (n - 1) / n * nbytes


def table(title, compute_s, comm_bytes_fn, ranks=(2, 8, 16)):
    print(f"\n{title} (compute {compute_s:.2f} s per step and rank)\n")
    print("| interconnect | " + " | ".join(f"{n} ranks: comm s / efficiency" for n in ranks) + " |")
    print("|---|" + "---|" * len(ranks))
    for name, bw in LINKS:
        cells = []
        for n in ranks:
            t = comm_bytes_fn(n) / (bw * GB)
            cells.append(f"{t:.3f} s / {compute_s / (compute_s + t):.0%}")
        print(f"| {name} | " + " | ".join(cells) + " |")


def main():
    phi, shape = params_7b()
    lora = lora_params(16, shape)
    print(f"7B: {phi / 1e9:.2f} B parameters; LoRA r16 on all linears: {lora / 1e6:.1f} M")
    lora_compute = 4 * phi * TOKENS / (PEAK * MFU)  # forward + input gradients
    full_compute = 6 * phi * TOKENS / (PEAK * MFU)
    table(
        "LoRA r16, data parallel: f32 LoRA gradients all-reduced once per step",
        lora_compute,
        lambda n: ring(4 * lora, n),
    )
    table(
        "Full fine-tuning, data parallel (replicated; bf16 gradients all-reduced)",
        full_compute,
        lambda n: ring(2 * phi, n),
    )
    table(
        "Full fine-tuning, sharded (all-gather bf16 weights twice, reduce-scatter bf16 gradients)",
        full_compute,
        lambda n: 3 * (n - 1) / n * 2 * phi,
    )
    print("\nMemory per GPU for full fine-tuning of 7B / 70B (bf16 weights and gradients, f32 "
          "master, Adam m and v: 16 bytes per parameter), before activations:\n")
    print("| ranks | replicated 7B | sharded 7B | sharded 70B |")
    print("|---|---|---|---|")
    for n in (1, 2, 8, 16, 32):
        print(f"| {n} | {16 * phi / GB:.0f} GB | {16 * phi / n / GB:.0f} GB | {16 * 10 * phi / n / GB:.0f} GB |")


if __name__ == "__main__":
    main()
