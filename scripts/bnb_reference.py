"""Dev-only: bitsandbytes' 4-bit quantization of fixed inputs, for `trainer/tests/quant.rs`.

    python scripts/bnb_reference.py   # writes tests/fixtures/quant/bnb4.json

Needs `pip install torch bitsandbytes` (0.50 runs on the CPU; not used in CI or at run time).
The input is `x[i] = sin(0.37 i) * 3 + ((i % 7) - 3) / 10`, cast to float32, so the test makes
the same values; 260 blocks of 64 and a partial block of 13 cover double quantization's blocks
of 256 and bitsandbytes' handling of a last, short block.
"""
import json
import math
from pathlib import Path

import bitsandbytes
import bitsandbytes.functional as F
import torch

N = 64 * 260 + 13
x = torch.tensor([math.sin(0.37 * i) * 3 + ((i % 7) - 3) / 10 for i in range(N)], dtype=torch.float32)

cases = {}
for quant_type in ["nf4", "fp4"]:
    for double in [False, True]:
        q, state = F.quantize_4bit(x, blocksize=64, quant_type=quant_type, compress_statistics=double)
        y = F.dequantize_4bit(q, state)
        case = {
            "packed": bytes(q.flatten().tolist()).hex(),
            "dequantized_head": y[:512].tolist(),
            "dequantized_tail": y[-512:].tolist(),
        }
        if double:
            case["absmax_codes"] = bytes(state.absmax.flatten().tolist()).hex()
            case["absmax2"] = state.state2.absmax.tolist()
            case["offset"] = float(state.offset)
        else:
            case["absmax"] = state.absmax.tolist()
        cases[f"{quant_type}{'_double' if double else ''}"] = case

out = Path(__file__).resolve().parent.parent / "tests/fixtures/quant/bnb4.json"
out.write_text(json.dumps({"bitsandbytes": bitsandbytes.__version__, "n": N, "cases": cases}))
print(f"wrote {out} ({out.stat().st_size} bytes)")
