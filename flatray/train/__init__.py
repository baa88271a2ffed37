"""Training inside Ray Train workers: the driver that starts a run, the DeepSpeed engine and its Adam/SAM step,
the one epoch loop every method trains with, the run context and checkpoints."""

from flatray.train.driver import fit, init_ray, main, make_trainer

__all__ = ["fit", "init_ray", "main", "make_trainer"]
