"""launch/train.py's training, written the accelerate way: one added line turns compression on.

    # GPUs (accelerate launch; the config sets the processes, the environment the compression):
    TRITTER_COMM_CONFIG=launch/tritter_comm.yaml \
        accelerate launch --config_file launch/accelerate_config.yaml launch/train_accelerate.py
    # CPU ranks, or any machine (accelerate's own CPU launcher wants mpirun): torchrun
    bash launch/accelerate.sh --steps 300

Without TRITTER_COMM_CONFIG / TRITTER_COMM the same script trains uncompressed. Checkpoints go
through accelerator.save_state / load_state, which carry the hook state (one file per rank).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed

import tritter_comm
import tritter_comm.integrations.accelerate as tc_accelerate
from tritter_comm._demo import CharTransformer, TextData, lr_lambda


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--checkpoint-dir", default=None, help="accelerator.save_state here at the end")
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--resume", default=None, help="a folder written by save_state")
    args = p.parse_args()

    accelerator = Accelerator()
    model = None
    try:
        attachment = tc_accelerate.attach(accelerator)  # <- the one line tritter-comm needs
        set_seed(args.seed)
        data = TextData(seed=args.seed)
        model = CharTransformer()
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.steps))
        model, opt, sched = accelerator.prepare(model, opt, sched)

        start = 0
        if args.resume:
            accelerator.load_state(args.resume)
            with open(os.path.join(args.resume, "step.txt")) as f:
                start = int(f.read())
            accelerator.print(f"resumed from {args.resume} at step {start}")

        def checkpoint(step: int) -> None:
            path = os.path.join(args.checkpoint_dir, f"step_{step}")
            accelerator.save_state(path)  # model, optimizer, scheduler, RNG and the hook state
            if accelerator.is_main_process:
                with open(os.path.join(path, "step.txt"), "w") as f:
                    f.write(str(step))
            accelerator.print(f"step {step:>5}  checkpoint {path}")

        rank, world = accelerator.process_index, accelerator.num_processes
        for step in range(start, args.steps):
            x, y = (t.to(accelerator.device) for t in data.batch(rank, world, step))
            loss = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            opt.step()
            sched.step()
            if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
                sent = sum(s["bytes_sent"] for s in attachment.stats())
                ratio = [f"{s['compression_ratio']:.1f}x" for s in attachment.stats()]
                accelerator.print(f"step {step + 1:>5}/{args.steps}  loss {loss.item():.4f}  "
                                  f"sent {sent / 1e6:.2f} MB/rank {' '.join(ratio) or '(no hook)'}")
            every = args.checkpoint_every
            if args.checkpoint_dir and every and (step + 1) % every == 0:
                checkpoint(step + 1)
        every = args.checkpoint_every
        if args.checkpoint_dir and not (every and args.steps % every == 0):
            checkpoint(args.steps)
    finally:
        # Our teardown (issue 14). end_training() finishes the trackers and destroys the
        # process group, but accelerate still holds the DDP model, whose reducer keeps the
        # group's works alive into interpreter finalization (an abort at exit): release it
        # and collect garbage first. In `finally`, so that a step that raises ends the same.
        tritter_comm.shutdown(*[m for m in (model,) if m is not None],
                              destroy_process_group=False)
        accelerator.end_training()


if __name__ == "__main__":
    main()
