"""The registries and task plug-ins: names validated against what is registered, a task kept
outside the repository run end to end by the unchanged runner, configs per task."""

import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, experiment
from mlflow.tracking import MlflowClient

from backends import BACKENDS, GRADIENT_METHODS, Backend
from config_schema import ConfigError, load_config
from registry import Registry, UnknownName
from sweep.plan import RunSpec, config_hash
from tasks import TASKS

PLUGIN_DIR = ROOT / "tests" / "plugins"


def test_registry_lists_the_registered_names_and_refuses_a_second_claim():
    reg: Registry[int] = Registry("widget")
    reg.register("a", 1)
    reg.register("b", 2)
    assert reg.get("b") == 2 and reg.names() == ("a", "b") and "a" in reg and list(reg) == [1, 2]
    with pytest.raises(UnknownName, match=r"'c' is not a registered widget; allowed: a, b"):
        reg.get("c")
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("a", 3)


def test_built_in_plug_ins_are_discovered():
    assert TASKS.names() == ("cartpole", "cartpole_pomdp", "pendulum", "pendulum_meta", "qubit_meta", "qubit_pulse")
    assert BACKENDS.names() == ("classical", "pennylane", "tensorcircuit")
    assert GRADIENT_METHODS.names() == ("backprop", "adjoint", "parameter-shift", "spsa", "finite-diff")
    assert [g.name for g in GRADIENT_METHODS if g.estimated] == ["spsa", "finite-diff"]
    assert BACKENDS.get("pennylane").gradients == GRADIENT_METHODS.names()


def test_a_backend_declaring_an_unknown_gradient_fails_when_declared():
    with pytest.raises(UnknownName, match="'shadow' is not a registered gradient method"):
        Backend("x", ("backprop", "shadow"), "", None)


def test_config_errors_list_the_registered_names(tmp_path):
    for field, value, allowed in (("task", "mountaincar", "cartpole, cartpole_pomdp, pendulum, pendulum_meta, qubit_meta, qubit_pulse"),
                                  ("backend", "qiskit", "classical, pennylane, tensorcircuit"),
                                  ("gradient", "shadow", "backprop, adjoint, parameter-shift, spsa, finite-diff")):
        fields = {"name": "e", "backend": "classical", "gradient": "backprop", field: value}
        with pytest.raises(ConfigError) as info:
            load_config(raw={"experiments": [fields]})
        assert len(info.value.lines) == 1, info.value.lines
        assert f"field '{field}'" in info.value.lines[0] and f"allowed: {allowed}" in info.value.lines[0]


def test_each_task_has_its_own_config_sections_and_hash():
    """A CartPole run holds no meta.* and a qubit run no training.*, so a meta default cannot
    change a CartPole run's hash (its --resume identity)."""
    raw = {"defaults": {"training": {"episodes": 7}, "meta": {"iterations": 3}},
           "experiments": [{"name": "c", "backend": "classical", "gradient": "backprop"},
                           {"name": "q", "task": "qubit_meta", "backend": "classical", "gradient": "backprop"}]}
    cartpole, qubit = load_config(raw=raw).experiments
    assert type(cartpole).__name__ == "CartPoleExperiment" and type(qubit).__name__ == "QubitMetaExperiment"
    assert "meta" not in cartpole.model_dump() and cartpole.training.episodes == 7
    assert "training" not in qubit.model_dump() and qubit.meta.iterations == 3
    changed = {**raw, "defaults": {"training": {"episodes": 7}, "meta": {"iterations": 4, "inner_lr": 0.3}}}
    cartpole2, qubit2 = load_config(raw=changed).experiments
    assert config_hash(RunSpec(cartpole, 0)) == config_hash(RunSpec(cartpole2, 0))
    assert config_hash(RunSpec(qubit, 0)) != config_hash(RunSpec(qubit2, 0))
    # A section of another task written into the experiment itself is an error, not ignored.
    with pytest.raises(ConfigError, match=r"unknown field 'meta'"):
        load_config(raw={"experiments": [{"name": "c", "backend": "classical", "gradient": "backprop", "meta": {}}]})


def test_algorithm_must_be_one_of_its_tasks():
    with pytest.raises(ConfigError, match=r"field 'algorithm': 'maml' does not apply to task 'cartpole'; allowed: reinforce, dqn"):
        experiment(backend="classical", gradient="backprop", algorithm="maml")


def test_the_model_builder_asks_the_task():
    """models.py names no task: head, input scale and default readouts come from the task's config."""
    from models import build_model
    from tasks.cartpole import INPUT_SCALE

    model = build_model(experiment(backend="classical", gradient="backprop", algorithm="dqn"), 4, 2, seed=0)
    assert model.head == "q" and model.input_scale.tolist() == list(INPUT_SCALE)


def test_a_task_plug_in_runs_end_to_end_through_the_unchanged_runner(tmp_path):
    """tests/plugins/bandit_task.py is loaded through QMLBENCH_PLUGINS: the sweep, the worker and
    the report handle it from its registration alone."""
    config = {"mlflow": {"experiment_name": "plugin"},
              "experiments": [{"name": "bandit", "task": "bandit", "backend": "classical", "gradient": "backprop",
                               "seeds": [0, 1], "bandit": {"pulls": 300}},
                              {"name": "cart", "backend": "classical", "gradient": "backprop",
                               "model": {"hidden_sizes": [4]}, "training": {"episodes": 2}}]}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "QMLBENCH_PLUGINS": "bandit_task",
           "PYTHONPATH": os.pathsep.join([str(PLUGIN_DIR), os.environ.get("PYTHONPATH", "")])}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "-c", str(path)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "avg_reward" in proc.stdout and "p_best" in proc.stdout and "final_avg_return" in proc.stdout
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("plugin").experiment_id])
    children = {r.info.run_name: r for r in runs if r.data.tags.get("kind") != "sweep"}
    assert sorted(children) == ["bandit-seed0", "bandit-seed1", "cart-seed0"]
    for name in ("bandit-seed0", "bandit-seed1"):
        run = children[name]
        assert run.data.tags["status"] == "PASSED" and run.data.tags["task"] == "bandit"
        assert run.data.params["bandit.pulls"] == "300"
        assert not any(k.startswith(("training.", "meta.")) for k in run.data.params)
        summary = json.loads(run.data.tags["summary"])
        assert summary["steps_done"] == 300
        assert summary["columns"]["p_best"] > 0.9  # the better arm (p = 0.8 against 0.2) is learnt
        assert run.data.metrics["final/avg_reward"] == summary["score"]
        history = client.get_metric_history(run.info.run_id, "bandit/avg_reward")
        assert len(history) == 30
    cart = children["cart-seed0"]
    assert cart.data.tags["status"] == "PASSED" and not any(k.startswith("meta.") for k in cart.data.params)
    # Two seeds of one plug-in draw different pulls (their own streams).
    h0, h1 = (client.get_metric_history(children[n].info.run_id, "bandit/avg_reward") for n in ("bandit-seed0", "bandit-seed1"))
    assert [m.value for m in h0] != [m.value for m in h1]


def test_a_plug_in_that_cannot_be_imported_is_one_line_and_exit_2(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({"experiments": [{"name": "c", "backend": "classical", "gradient": "backprop"}]}))
    env = {**os.environ, "QMLBENCH_PLUGINS": "no_such_plugin_module"}
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "-c", str(path), "--dry-run"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert "QMLBENCH_PLUGINS: cannot import plug-in module 'no_such_plugin_module'" in proc.stderr
