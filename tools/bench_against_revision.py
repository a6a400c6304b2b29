"""The jax-path policies at an earlier revision of models.py against this checkout's, beside the limit.

    OMP_NUM_THREADS=1 python tools/bench_against_revision.py 6cf4d25 [--rounds 20]

Builds the published REINFORCE policy (configs/cartpole_reinforce.yaml, seed 0) on TensorCircuit
and on PennyLane's jax path, each with ``models.py`` as it was at the given git revision (read with
``git show``) and with this checkout's, and on TensorCircuit with this checkout's
``tensorcircuit.fuse_gates: false``.
It times, interleaved in one process (medians): the forward pass without gradient at batch 10 and
1000 and one REINFORCE gradient step on 1000 recorded transitions (bench.py's own functions), with
the hand-written limit of tools/reference_statevector.py, and prints each time over the limit's.
The old module is loaded under another name, and its backend registry entry is pointed at it while
its model is built; the rest of the checkout (train.py, config_schema.py, ...) is shared, so the
revision must be one whose models.py still imports against it.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import importlib.util  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from functools import partial  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_models_at(revision: str):
    source = subprocess.run(["git", "show", f"{revision}:models.py"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    folder = Path(tempfile.mkdtemp(prefix="models-at-"))
    path = folder / f"models_{revision}.py"
    path.write_text(source)
    name = f"models_at_{revision}".replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("revision", help="git revision of the earlier models.py")
    parser.add_argument("--rounds", type=int, default=20, help="interleaved rounds (5 forward-10 calls, 2 of the others per round)")
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    import bench
    import models
    from train import GradientStep, reinforce_loss

    old = load_models_at(args.revision)
    obs_np, actions, returns, episodes = bench.recorded_batch(1000)
    obs = torch.as_tensor(obs_np, dtype=torch.float64)
    policy, params = bench.reference_policy(scan=False)
    variants = {}
    for backend in ("tensorcircuit", "pennylane"):
        exp = bench.reference_experiment(backend, "backprop")
        sys.modules["models"] = old  # the registry's factory "models:_..._circuit" resolves to the old module
        try:
            before = old.build_model(exp, 4, 2, seed=0)
        finally:
            sys.modules["models"] = models
        if type(before.circuit).__module__ != old.__name__:
            raise RuntimeError(f"the old model's circuit came from {type(before.circuit).__module__}, not {old.__name__}")
        short = {"tensorcircuit": "tc", "pennylane": "pl"}[backend]
        variants[f"{short} {args.revision}"] = (before, exp)
        variants[f"{short} now"] = (models.build_model(exp, 4, 2, seed=0), exp)
    unfused = bench.reference_experiment("tensorcircuit-unfused", "backprop")
    variants["tc now, unfused"] = (models.build_model(unfused, 4, 2, seed=0), unfused)

    loss_fn = reinforce_loss(torch.as_tensor(actions), torch.as_tensor(returns), episodes)
    calls = {"limit": [partial(policy.forward, params, obs_np[:10]), partial(policy.forward, params, obs_np),
                       partial(policy.loss_and_grad, params, obs_np, actions, returns, episodes)]}
    expected = policy.forward(params, obs_np)
    for name, (model, e) in variants.items():
        with torch.no_grad():
            error = float(np.abs(model(obs).numpy() - expected).max())
        print(f"{name}: max |logits - limit's| over 1000 rows = {error:.1e}")
        calls[name] = [partial(bench.no_grad_forward, model, obs[:10]), partial(bench.no_grad_forward, model, obs),
                       partial(GradientStep(model, e, seed=0), obs, loss_fn, "bench")]
    for fns in calls.values():
        for fn in fns:
            fn()
            fn()
    times: dict[str, list[list[float]]] = {k: [[], [], []] for k in calls}
    for _ in range(args.rounds):
        for name, fns in calls.items():
            for j, fn in enumerate(fns):
                for _ in range(5 if j == 0 else 2):
                    start = time.perf_counter()
                    fn()
                    times[name][j].append(time.perf_counter() - start)
    limit = [statistics.median(t) for t in times["limit"]]
    print(f"{'':16s} {'forward batch 10':>22s} {'forward batch 1000':>22s} {'gradient 1000 rows':>22s}")
    for name in calls:
        medians = [statistics.median(t) for t in times[name]]
        print(f"{name:16s} " + " ".join(f"{1e3 * m:10.3f} ms (x{m / l:5.2f})" for m, l in zip(medians, limit)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
