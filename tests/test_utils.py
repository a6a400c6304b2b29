import pytest

from sweep.tracking import check_tracking_uri, resolve_tracking_uri
from utils import flatten_dict, select_device, simulation_device


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
    assert simulation_device("classical", "mps") == ("mps", None)
    assert simulation_device("pennylane", "cuda") == ("cuda", None)
    device, note = simulation_device("pennylane", "mps")
    assert device == "cpu" and "MPS" in note
    device, note = simulation_device("tensorcircuit", "cuda", "jax")
    assert device == "cpu" and "jax" in note
    assert simulation_device("tensorcircuit", "cuda", "pytorch") == ("cuda", None)


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
