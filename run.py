"""Run the sweep in a config file: every experiment x seed in its own process, logged to MLflow.

    python run.py                       # config.yaml
    python run.py -c configs/cartpole_reinforce.yaml --only tc_backprop --set training.episodes=500
    python run.py --list                # what would run
    python run.py --dry-run             # validate, resolve and print the plan; touch nothing

Exit codes: 0 every run PASSED; 1 some run FAILED or TIMED_OUT, or the tracking store failed
during the sweep; 2 invalid configuration or unusable tracking store (nothing is written to MLflow
then); 130 interrupted with Ctrl-C, 143 with SIGTERM, 129 with SIGHUP (running runs and the sweep's
parent run are marked KILLED).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from config_schema import ConfigError, load_config

MAX_ERROR_LINES = 10


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the sweep is, so it ends like Ctrl-C: running runs KILLED."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _interrupt(signum, frame):
    raise Interrupted(signum)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def connect_ray(address: str | None, tracking_uri: str):
    """(RayExecutor, None), or (None, the one-line reason it cannot be used)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return None, "--executor ray needs the ray package (pip install ray)"
    from sweep.executors import RayExecutor
    from sweep.tracking import is_local_node

    try:
        executor = RayExecutor(address)
    except Exception as exc:  # noqa: BLE001 - any failure to join the cluster ends here, in one line
        return None, f"--ray-address {address or '(local)'}: cannot connect to Ray ({' '.join(str(exc).split())[:300]})"
    nodes = executor.nodes()
    if tracking_uri.startswith("sqlite:") and not (len(nodes) == 1 and is_local_node(nodes[0])):
        executor.close()
        return None, (f"tracking URI {tracking_uri} is a file on this machine, but the Ray cluster has {len(nodes)} nodes; "
                      "give every node a tracking server: --tracking-uri http://HOST:PORT (see README 'Scaling out')")
    return executor, None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-c", "--config", default="config.yaml", help="sweep file (default: config.yaml)")
    p.add_argument("--only", nargs="+", metavar="NAME", default=[], help="run only these experiments")
    p.add_argument("--list", action="store_true", help="list the runs and exit")
    p.add_argument("--dry-run", action="store_true", help="validate and print the resolved runs; write nothing")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field in every experiment (mlflow.* for the mlflow section); repeatable")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: config, $MLFLOW_TRACKING_URI, sqlite:///mlflow.db)")
    p.add_argument("--experiment-name", help="MLflow experiment name (default: from the config)")
    p.add_argument("--jobs", type=_positive_int, metavar="N",
                   help="run up to N experiments at once, each in its own process "
                        "(default: 1; with --executor ray, the cluster's CPU count)")
    p.add_argument("--executor", choices=["local", "ray"], default="local",
                   help="local: processes on this machine (default); ray: Ray tasks on a cluster")
    p.add_argument("--ray-address", metavar="auto|HOST:PORT",
                   help="Ray cluster to join (default: start a single-node Ray on this machine)")
    p.add_argument("--system-metrics", action="store_true",
                   help="log each run's CPU, memory, disk and network use as system/* metrics (every 10 s)")
    p.add_argument("--resume", action="store_true",
                   help="skip runs that already PASSED with the same resolved config in this MLflow experiment, "
                        "continue TIMED_OUT / KILLED runs from their last checkpoint, run the rest")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Ctrl-C (SIGINT) stops the sweep with KILLED runs and exit 130, even when run.py was started
    # with SIGINT ignored (a background job of a non-interactive shell inherits that); SIGTERM and
    # SIGHUP do the same with 143 and 129.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        return _main(args)
    except BrokenPipeError:  # `run.py --list | head`: the reader has gone; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as exc:  # before the sweep started, or after it ended
        signum = getattr(exc, "signum", signal.SIGINT)
        print(f"error: interrupted ({signal.Signals(signum).name}) before the sweep started; nothing is running", file=sys.stderr)
        return 128 + signum


def _main(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, overrides=args.overrides, only=args.only)
    except ConfigError as exc:
        for line in exc.lines[:MAX_ERROR_LINES]:
            print(f"error: {line}", file=sys.stderr)
        if len(exc.lines) > MAX_ERROR_LINES:
            print(f"error: ... and {len(exc.lines) - MAX_ERROR_LINES} more problems", file=sys.stderr)
        return 2

    from sweep.plan import expand
    from sweep.tracking import check_tracking_uri, resolve_tracking_uri

    runs = expand(cfg)
    tracking_uri = resolve_tracking_uri(args.tracking_uri, cfg.mlflow.tracking_uri)
    experiment_name = args.experiment_name or cfg.mlflow.experiment_name
    if args.list or args.dry_run:
        print(f"{len(runs)} run(s) from {cfg.source} -> {tracking_uri} (experiment {experiment_name!r})")
        for r in runs:
            e = r.exp
            print(f"  {r.name:40s} {e.algorithm:9s} {e.backend:13s} {e.gradient:15s} "
                  f"{r.task.step_unit}s={e.total_steps} timeout_s={e.timeout_s:g}")
        if args.dry_run:
            import yaml

            from config_schema import applicable_fields

            for r in runs:
                print(f"--- {r.name}")
                print(yaml.safe_dump(applicable_fields(r.exp), sort_keys=False).rstrip())
        return 0
    if args.ray_address and args.executor != "ray":
        print("error: --ray-address needs --executor ray", file=sys.stderr)
        return 2
    try:
        check_tracking_uri(tracking_uri)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    executor = None
    if args.executor == "ray":
        executor, error = connect_ray(args.ray_address, tracking_uri)
        if error:
            print(f"error: {error}", file=sys.stderr)
            return 2

    from sweep.core import Sweep

    jobs = args.jobs or (executor.total_cpus() if executor is not None else 1)
    sweep = Sweep(cfg, tracking_uri, experiment_name, jobs=jobs, resume=args.resume, executor=executor,
                  system_metrics=args.system_metrics)
    try:
        outcomes = sweep.run()
    except Exception as exc:  # noqa: BLE001 - e.g. the store failed before any run could start: one line, not a traceback
        print(f"error: the sweep stopped ({tracking_uri}): {type(exc).__name__}: {' '.join(str(exc).split())[:400]}",
              file=sys.stderr)
        return 1
    if sweep.store_errors:
        first = sweep.store_errors[0]
        print(f"error: the tracking store failed {len(sweep.store_errors)} time(s) while recording the sweep "
              f"(first: {first}); runs were given their statuses where it allowed", file=sys.stderr)
    if sweep.interrupted:
        return 128 + sweep.interrupted
    return 0 if outcomes and all(o.status == "PASSED" for o in outcomes) and not sweep.store_errors else 1


if __name__ == "__main__":
    sys.exit(main())
