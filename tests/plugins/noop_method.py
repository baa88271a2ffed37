"""A method defined outside flatray, as a plugin: one module with `run(ctx)` plus one registry entry.

It trains nothing: it evaluates its parent's model and reports that, with a checkpoint of its run files. Loaded in
every Ray process through FLATRAY_METHODS=noop_method (tests/test_methods.py)."""

from flatray import methods
from flatray.train.checkpoint import write_run_files


def run(ctx) -> None:
    from flatray import models

    model = models.load_model(ctx.cfg.model, ctx.spec).to(ctx.device)
    metrics = {**ctx.evaluate(model), "noop": 1.0}
    ctx.report(metrics, lambda folder: write_run_files(folder, ctx.cfg, metrics))


methods.register(methods.Method("noop", "noop_method:run", "evaluate the parent's model, train nothing",
                                needs=("model",)))
