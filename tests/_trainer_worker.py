"""One rank of tests/test_accelerate.py's Trainer case, started by torchrun (CPU, gloo).

    worker.py OUT_DIR full     Trainer.train for 8 steps, checkpoint every 4
    worker.py OUT_DIR resume   Trainer.train(resume_from_checkpoint=OUT_DIR/run/checkpoint-4)
"""

import hashlib
import json
import os
import sys

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

import tritter_comm
import tritter_comm.integrations.accelerate as tc_accelerate


class Data(torch.utils.data.Dataset):
    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(512, 64, generator=g)
        w = torch.randn(64, 10, generator=torch.Generator().manual_seed(5))
        self.y = (self.x @ w).argmax(1)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                                  nn.Linear(512, 10))

    def forward(self, x, labels=None):
        logits = self.body(x)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class Probe(TrainerCallback):
    """Records the hook state's iteration when training begins (after a resume loaded it)."""

    def __init__(self, attachment):
        self.attachment, self.iter_at_begin = attachment, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.iter_at_begin = self.attachment.states[0].iter


def main(out, phase):
    torch.manual_seed(0)
    args = TrainingArguments(
        output_dir=os.path.join(out, "run"), max_steps=8, save_steps=4, save_strategy="steps",
        per_device_train_batch_size=16, learning_rate=1e-3, use_cpu=True, report_to=[],
        logging_steps=100, disable_tqdm=True, seed=0, data_seed=0, dataloader_num_workers=0,
        )
    trainer = Trainer(model=Net(), args=args, train_dataset=Data())
    attachment = tc_accelerate.attach(trainer)  # the one added line
    probe = Probe(attachment)
    trainer.add_callback(probe)
    try:
        resume = os.path.join(out, "run", "checkpoint-4") if phase == "resume" else None
        trainer.train(resume_from_checkpoint=resume)
        rank = trainer.args.process_index
        model = trainer.model_wrapped
        digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes()
                                         for p in trainer.model.parameters())).hexdigest()
        state = attachment.states[0]
        res = {"model_type": type(model).__name__, "states": len(attachment.states),
               "stats": state.stats(), "iter": state.iter, "iter_at_begin": probe.iter_at_begin,
               "digest": digest}
        with open(os.path.join(out, f"trainer_{phase}_rank{rank}.json"), "w") as f:
            json.dump(res, f)
    finally:  # our teardown (issue 14): Trainer leaves the DDP model and the group alive
        tritter_comm.shutdown(trainer.model_wrapped)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
