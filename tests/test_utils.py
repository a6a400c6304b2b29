import pytest

from sweep.tracking import check_tracking_uri, resolve_tracking_uri
from utils import flatten_dict, jax_sees_gpu, select_device, simulation_device


@pytest.mark.parametrize("requested,cuda,mps,expected", [
    ("auto", True, True, "cuda"),
    ("auto", False, True, "mps"),
    ("auto", False, False, "cpu"),
    ("cpu", True, True, "cpu"),
    ("cuda", True, False, "cuda"),
    ("mps", False, True, "mps"),
])
def test_select_device_prefers_cuda_then_mps_then_cpu(requested, cuda, mps, expected):
    assert select_device(requested, cuda_available=cuda, mps_available=mps) == expected


def test_select_device_refuses_missing_devices():
    with pytest.raises(RuntimeError, match="cuda"):
        select_device("cuda", cuda_available=False, mps_available=True)
    with pytest.raises(RuntimeError, match="mps"):
        select_device("mps", cuda_available=True, mps_available=False)
    with pytest.raises(ValueError, match="allowed: auto, cpu, cuda, mps"):
        select_device("tpu", cuda_available=False, mps_available=False)


def test_select_device_probes_torch_on_this_machine():
    assert select_device("auto") == "cpu"  # CI machines have no GPU


def test_simulation_device_falls_back_to_cpu_with_a_note():
    assert simulation_device("torch-real", "mps") == ("mps", None)  # the classical MLP is real
    assert simulation_device("torch", "cuda") == ("cuda", None)
    device, note = simulation_device("torch", "mps")
    assert device == "cpu" and "MPS" in note
    assert simulation_device("jax", "cuda", jax_gpu=True) == ("cuda", None)
    device, note = simulation_device("jax", "cuda", jax_gpu=False)
    assert device == "cpu" and "jax sees no GPU" in note
    device, note = simulation_device("cpu", "cuda")
    assert device == "cpu" and "cpu only" in note
    assert simulation_device("jax", "cpu", jax_gpu=True) == ("cpu", None)
    with pytest.raises(ValueError, match="allowed: torch, torch-real, jax, cpu"):
        simulation_device("numpy", "cpu")


def test_this_machine_has_no_jax_gpu():
    assert jax_sees_gpu() is False  # the pinned jax wheels are CPU-only


@pytest.mark.parametrize(("fields", "engine"), [
    ({"backend": "classical"}, "torch-real"),
    ({"backend": "pennylane", "gradient": "backprop"}, "jax"),
    ({"backend": "pennylane", "gradient": "adjoint"}, "cpu"),
    ({"backend": "pennylane", "gradient": "backprop", "pennylane": {"interface": "torch"}}, "cpu"),
    ({"backend": "tensorcircuit", "gradient": "backprop"}, "jax"),
    ({"backend": "tensorcircuit", "gradient": "backprop", "tensorcircuit": {"math_backend": "pytorch"}}, "torch"),
])
def test_each_backend_names_what_simulates_it(fields, engine):
    from backends import BACKENDS
    from config_schema import parse_experiment

    exp = parse_experiment({"name": "x", "task": "cartpole", "algorithm": "reinforce", "gradient": "backprop",
                            "device": "cpu", **fields})
    assert BACKENDS.get(exp.backend).engine(exp) == engine
    assert BACKENDS.get(exp.backend).placement(exp) == ("cpu", None)


def test_flatten_dict():
    assert flatten_dict({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "x"}) == {"a.b": 1, "a.c.d": [1, 2], "e": "x"}


def test_tracking_uri_resolution_and_checks(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None, None) == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///env.db")
    assert resolve_tracking_uri(None, None) == "sqlite:///env.db"
    assert resolve_tracking_uri(None, "sqlite:///cfg.db") == "sqlite:///cfg.db"
    assert resolve_tracking_uri("sqlite:///cli.db", "sqlite:///cfg.db") == "sqlite:///cli.db"
    check_tracking_uri(f"sqlite:///{tmp_path}/x.db")
    with pytest.raises(RuntimeError, match="does not exist"):
        check_tracking_uri(f"sqlite:///{tmp_path}/nope/x.db")
    with pytest.raises(RuntimeError, match="file stores"):
        check_tracking_uri("./mlruns")
    with pytest.raises(RuntimeError, match="unreachable"):
        check_tracking_uri("http://127.0.0.1:9", timeout_s=2)


# ---------------------------------------------------------------------------------------------
# Seed streams


def test_seed_streams_of_different_seeds_and_names_never_coincide():
    """The old derivation (seed + k) made seed 0's second stream seed 1's first; spawned children do not."""
    import numpy as np
    import torch

    from meta.train import SEED_STREAMS as META_STREAMS
    from train import SEED_STREAMS as CARTPOLE_STREAMS
    from utils import seed_streams

    names = sorted(set(CARTPOLE_STREAMS) | set(META_STREAMS))
    draws, ints, torch_draws = {}, {}, {}
    for seed in range(4):
        for name, stream in seed_streams(seed, names).items():
            draws[seed, name] = tuple(stream.numpy().integers(0, 2**63, 4))
            ints[seed, name] = stream.int()
            torch_draws[seed, name] = tuple(torch.randint(0, 2**62, (4,), generator=stream.torch()).tolist())
    for table in (draws, ints, torch_draws):
        assert len(set(table.values())) == len(table) == 4 * len(names)
    # and none equals a run's root stream or the integer seeds themselves
    roots = {tuple(np.random.default_rng(seed).integers(0, 2**63, 4)) for seed in range(4)}
    assert not roots & set(draws.values()) and not set(range(4)) & set(ints.values())


def test_seed_streams_are_reproducible_and_addressed_by_name():
    from utils import SeedStream, seed_streams

    a = seed_streams(7, ["gradient", "env"])["env"]
    b = seed_streams(7, ["env"])["env"]  # other names and their order do not shift a stream
    assert a.ints(3) == b.ints(3) == SeedStream(7, "env").ints(3)
    assert list(a.numpy().random(3)) == list(b.numpy().random(3))
    assert len(set(a.ints(10))) == 10  # per-environment reset seeds are distinct
    assert a.ints(10)[:3] == a.ints(3)  # environment i's seed does not depend on the number of environments
    with pytest.raises(ValueError, match="distinct"):
        seed_streams(0, ["env", "env"])
