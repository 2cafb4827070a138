"""One rank of tests/test_accelerate.py, started by torchrun with ACCELERATE_USE_CPU=true.

    worker.py OUT_DIR full    train 6 steps, save_state, train 4 more; write rank results
    worker.py OUT_DIR resume  load_state of the checkpoint, train the same 4 steps; write results

Compression comes from TRITTER_COMM in the environment; the script adds one line for it.
"""

import hashlib
import json
import os
import sys

import torch
from accelerate import Accelerator
from torch import nn

import tritter_comm
import tritter_comm.integrations.accelerate as tc_accelerate


def batch(rank, step):
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(32, 64, generator=g)
    w = torch.randn(64, 10, generator=torch.Generator().manual_seed(5))
    return x, (x @ w).argmax(1)


def main(out, phase):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                          nn.Linear(512, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    accelerator = Accelerator()
    attachment = tc_accelerate.attach(accelerator)  # the one added line
    model, opt = accelerator.prepare(model, opt)
    try:
        rank = accelerator.process_index
        ckpt = os.path.join(out, "ckpt")

        def step(i):
            x, y = batch(rank, i)
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            accelerator.backward(loss)
            opt.step()
            return loss.item()

        losses = []
        if phase == "full":
            losses += [step(i) for i in range(6)]
            accelerator.save_state(ckpt)
            start = 6
        else:
            accelerator.load_state(ckpt)
            start = 6
        losses += [step(i) for i in range(start, 10)]
        digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes()
                                         for p in model.parameters())).hexdigest()
        state = attachment.states[0]
        res = {
            "model_type": type(model).__name__,
            "states": len(attachment.states),
            "stats": state.stats(),
            "iter": state.iter,
            "residual_sum": float(sum(r.abs().sum() for r in state.residuals.values())),
            "losses": losses,
            "digest": digest,
        }
        with open(os.path.join(out, f"{phase}_rank{rank}.json"), "w") as f:
            json.dump(res, f)
    finally:  # our teardown (issue 14): the DDP model released before the group goes
        tritter_comm.shutdown(model, destroy_process_group=False)
        accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
