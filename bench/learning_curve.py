"""The learning curve that sets the offline study's step budget: dev accuracy every `--every` steps of Adam and SAM.

One optimizer per process (run two side by side), the study's model, data and engine settings, a linear lr
schedule over `--steps` steps, dropout on; the dev accuracy on the first `--dev` dev examples after every
`--every` steps. The budget is the step count where both optimizers' dev accuracy has levelled off.

    .venv/bin/python bench/learning_curve.py adam & .venv/bin/python bench/learning_curve.py sam
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from common import init_distributed  # noqa: E402  (sets DS_ACCELERATOR before deepspeed is imported)

from flatray import data, models
from flatray.config import RunConfig
from flatray.train.engine import build_engine, train_step


def source(spec) -> str:
    return "registry" if spec.registry else ("builtin" if spec.hub_path is None else "hub")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("optimizer", choices=["adam", "sam", "asam"])
    p.add_argument("--model", default="minilm-offline")
    p.add_argument("--task", default="rotten-tomatoes")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--rho", type=float, default=None)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--dev", type=int, default=400)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--group-by-length", action="store_true", help="length-grouped batches (data.group_by_length)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    init_distributed()

    spec = data.TASKS[args.task]
    tokenizer = models.load_tokenizer(args.model)
    tokenized = data.tokenize(spec, data.load_raw(spec, source(spec)), tokenizer,
                              args.max_length, max_eval_samples=args.dev)
    collate = data.collator(tokenizer)
    order = torch.randperm(len(tokenized.train), generator=torch.Generator().manual_seed(0)).tolist()
    if args.group_by_length:  # one epoch of length-grouped batches, then the next, as the study's loader draws them
        from flatray.data.sampling import LengthGroupedSampler

        sampler = LengthGroupedSampler([len(ids) for ids in tokenized.train["input_ids"]], args.batch_size)
        order = []
        while len(order) < args.steps * args.batch_size:
            sampler.set_epoch(sampler.epoch + 1)
            order += list(sampler)
    torch.manual_seed(0)
    cfg = RunConfig(model=args.model, task=args.task,
                    train={"batch_size": args.batch_size, "epochs": 1, "lr": args.lr},
                    optimizer={"name": args.optimizer, "rho": args.rho})
    engine = build_engine(copy.deepcopy(models.load_model(args.model, spec)), cfg, 1, args.steps)
    dev = tokenized.evals[spec.eval_splits[0]]

    def accuracy() -> float:
        engine.module.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(dev.features), 64):
                batch = collate([dev.features[j] for j in range(i, min(i + 64, len(dev.features)))])
                correct += int((engine.module(**batch).logits.argmax(-1).numpy() == dev.labels[i:i + 64]).sum())
        return correct / len(dev.features)

    print(f"{args.optimizer}: {args.model} on {args.task}, batch {args.batch_size}"
          f"{' length-grouped' if args.group_by_length else ''}, lr {args.lr} linear to 0 over "
          f"{args.steps} steps; dev accuracy on {len(dev.features)} examples")
    start, losses = time.time(), []
    for step in range(args.steps):
        at = step * args.batch_size if args.group_by_length else (step * args.batch_size) % (len(order) - args.batch_size)
        losses.append(train_step(engine, collate([tokenized.train[i] for i in order[at:at + args.batch_size]]), cfg))
        if (step + 1) % args.every == 0:
            print(f"{args.optimizer} step {step + 1} loss(last {args.every}) "
                  f"{sum(losses[-args.every:]) / args.every:.4f} dev {accuracy():.4f} {time.time() - start:.0f}s",
                  flush=True)


if __name__ == "__main__":
    main()
