"""`flatray`: one command for the four jobs, beside their `python -m` forms (which stay).

    flatray sweep sweeps/smoke.yaml --dry-run     = python -m flatray.sweep ...
    flatray train smoke --set optimizer.name=sam  = python -m flatray.train ...
    flatray report results/sweeps/smoke           = python -m flatray.report ...
    flatray sync results/sweeps/smoke/wandb       = python -m flatray.tracking sync ...
"""

from __future__ import annotations

import importlib
import sys

# command -> (module whose main(argv) runs it, what it does, an example)
COMMANDS = {
    "sweep": ("flatray.sweep.cli", "run a sweep file as Ray Tune trials (re-running skips finished trials)",
              "flatray sweep sweeps/smoke.yaml --dry-run"),
    "train": ("flatray.train.driver", "fine-tune one model on one task (Ray Train + DeepSpeed)",
              "flatray train smoke --set optimizer.name=sam"),
    "report": ("flatray.report", "build a sweep's report: tables, figures, README (and log it to W&B)",
               "flatray report results/sweeps/smoke"),
    "sync": ("flatray.tracking.offline", "upload a sweep's offline W&B runs, parents before children",
             "flatray sync results/sweeps/smoke/wandb"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: flatray {" + ",".join(COMMANDS) + "} ...", "", "commands (each has --help):"]
    lines += [f"  {name:<{width}}  {what}" for name, (_, what, _) in COMMANDS.items()]
    lines += ["", "examples:"] + [f"  {example}" for _, _, example in COMMANDS.values()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"flatray: unknown command {name!r}; expected one of {', '.join(COMMANDS)}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(["sync", *rest] if name == "sync" else rest)


if __name__ == "__main__":
    sys.exit(main())
