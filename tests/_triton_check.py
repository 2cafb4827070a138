"""Run by tests/test_triton_codec.py under TRITON_INTERPRET=1 (set before triton is imported):
the Triton encoder against the torch codec, on CPU tensors. Prints one JSON line."""

import json
import os
import sys

import torch

from tritter_comm import _torch_codec as tc
from tritter_comm import _triton_codec as tt


def main() -> None:
    cases = []
    for block_log2 in map(int, sys.argv[1].split(",")):
        b = 1 << block_log2
        for mode in (0, 1, 2):
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                for res in (False, True):
                    for n in (2 * b, 3 * b + 77):  # no tail (the kernel alone), and a tail
                        g = torch.Generator().manual_seed(block_log2 * 100 + mode * 10 + n % 7)
                        x = (torch.randn(n, generator=g) * 3).to(dtype)
                        x[5] = 0.0  # a zero, and a block of zeros (cnt = 0: scale 0)
                        x[b: 2 * b] = 0.0
                        e = (torch.randn(n, generator=g) * 0.3).to(dtype)
                        kw = dict(seed=11, stream=2**40 + n, mode=mode, block_log2=block_log2)
                        e1, e2 = e.clone(), e.clone()
                        os.environ["TRITTER_COMM_TRITON"] = "0"
                        b1 = tc.encode_body(x, residual=e1 if res else None, **kw)
                        os.environ["TRITTER_COMM_TRITON"] = "1"
                        before = tt.launches
                        b2 = tc.encode_body(x, residual=e2 if res else None, **kw)
                        cases.append({
                            "case": [block_log2, mode, str(dtype), res, n],
                            "body_equal": torch.equal(b1, b2),
                            "residual_equal": torch.equal(e1, e2),
                            "kernel_ran": tt.launches == before + 1,
                        })
    print(json.dumps({"cases": cases, "broken": {str(k): v for k, v in tt._broken.items()}}))


if __name__ == "__main__":
    main()
