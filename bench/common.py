"""What the bench scripts share: the device, a single-process DeepSpeed world, synthetic BERT inputs."""

import logging
import os
import socket
import time
from collections.abc import Callable

import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402


def sync() -> None:
    """CUDA kernels run asynchronously: wait for them before reading the clock."""
    if CUDA:
        torch.cuda.synchronize()


def bert_config(size: str) -> BertConfig:
    """bert-base, or a small 4-layer BERT for quick runs."""
    if size == "small":
        return BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024, num_labels=2)
    return BertConfig(num_labels=2)


def start(threads: int, model_size: str) -> BertForSequenceClassification:
    """Thread count and quiet DeepSpeed logging for the whole run, then the contenders' shared initial model."""
    torch.set_num_threads(threads)  # once, the same for every contender
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # engine set-up chatter would bury the table
    torch.manual_seed(0)
    return BertForSequenceClassification(bert_config(model_size))


def synthetic_batch(vocab_size: int, batch: int, seq: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(0, vocab_size, (batch, seq), generator=g),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "labels": torch.randint(0, 2, (batch,), generator=g),
    }


def init_distributed() -> str:
    """A world of one, as DeepSpeed needs a process group even for a single process."""
    with socket.socket() as s:  # a free port, so that two runs side by side do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    backend = "nccl" if CUDA else "gloo"
    if CUDA:
        torch.cuda.set_device(0)
    dist.init_process_group(backend, rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend=backend)
    return backend


def time_calls(step: Callable[[], object], n: int) -> list[float]:
    """Wall seconds of each of n calls of `step`, the device synchronised around each."""
    times = []
    for _ in range(n):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    return times
