"""Continuous control (issue 14): QubitPulse-v0, SB3's SAC / TD3 / DDPG with this project's actor,
the actor's gradient methods, determinism, resume, config errors, the sweep end to end."""

import io
import math
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from conftest import experiment

from config_schema import ConfigError, load_config
from control.sb3 import (
    SEED_STREAMS,
    ActorBody,
    ProjectSACActor,
    ProjectTD3Actor,
    ReporterOutput,
    episode_fidelity,
    train_continuous,
)
from envs.qubit_pulse import QubitPulseEnv, infidelity_reward
from models import ReUploadingPQC
from train import NullReporter, train
from utils import NonFiniteError, seed_streams

#: A tiny Pendulum budget: 40 steps, 20 of them random warm-up, then one update per step.
TINY_PENDULUM = {"task": "pendulum", "model": {"n_qubits": 2, "n_layers": 1, "hidden_sizes": [8]},
                 "control": {"total_steps": 40, "learning_starts": 20, "batch_size": 8, "buffer_size": 1000,
                             "critic_net_arch": [16], "eval_every": 1000, "checkpoint_every": None}}
#: A small qubit_pulse task: 4 segments, filter-function model on 40 fine steps.
SMALL_PULSE_META = {"n_segments": 4, "noise": {"time_steps": 40}, "eval": {"n_tasks": 4},
                    "baselines": {"robust_steps": 20, "optimum_steps": 20}}


def tiny(backend, gradient, algorithm, **extra):
    fields = {**TINY_PENDULUM, "backend": backend, "gradient": gradient, "algorithm": algorithm}
    for key, value in extra.items():
        fields[key] = {**fields.get(key, {}), **value} if isinstance(value, dict) else value
    return experiment(**fields)


# ---------------------------------------------------------------------------------------------
# The environment


def test_qubit_pulse_passes_gymnasium_env_checker_and_is_registered():
    from gymnasium.utils.env_checker import check_env

    import envs  # noqa: F401 - registers QubitPulse-v0

    env = gym.make("QubitPulse-v0", meta={"n_segments": 4, "noise": {"time_steps": 40}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its physical action bounds draw a recommendation, not an error
        check_env(env.unwrapped, skip_render_check=True)
    obs, _ = env.reset(seed=1)
    assert obs.shape == (9,) and obs[0] == 0 and not obs[1:].any()
    rewards, ends = [], []
    for k in range(4):
        obs, r, terminated, truncated, info = env.step(np.array([1.0, -2.0], dtype=np.float32))
        rewards.append(r)
        ends.append(terminated)
        assert not truncated and obs[0] == pytest.approx((k + 1) / 4)
    assert ends == [False, False, False, True] and rewards[:3] == [0.0, 0.0, 0.0] and 0 < rewards[3] <= 1
    assert obs[1:3] == pytest.approx([1.0 / env.unwrapped.max_amplitude, -2.0 / env.unwrapped.max_amplitude])
    with pytest.raises(RuntimeError, match="ended"):
        env.step(np.zeros(2, dtype=np.float32))


def test_qubit_pulse_draws_its_tasks_from_the_qubit_meta_distribution():
    """Same seed, same task as the TaskDistribution qubit_meta samples (gymnasium seeds np_random as default_rng)."""
    exp = experiment(name="q", task="qubit_pulse", backend="classical", gradient="backprop",
                     meta={"noise": {"ranges": {"alpha": [0.5, 2.0], "gamma_phi": [0.01, 0.2], "omega_c": [0.1, 10.0],
                                                "detuning": [-1.0, 1.0]}, "time_steps": 50}})
    env = QubitPulseEnv(exp.meta)
    env.reset(seed=123)
    expected = exp.meta.noise.distribution().sample(1, np.random.default_rng(123))[0]
    assert env.tasks.tasks[0] == expected
    env.reset()
    assert env.tasks.tasks[0] != expected  # a new task per episode


def test_qubit_pulse_reward_is_the_qubit_meta_fidelity_of_the_pulse():
    """The env's final reward against qubit_meta's own task factory (meta.train.task_factory) on the same task."""
    from meta.train import task_factory

    exp = experiment(name="q", task="qubit_pulse", backend="classical", gradient="backprop",
                     meta={"n_segments": 5, "noise": {"simulation": "trajectories", "trajectories": 64, "time_steps": 50,
                                                      "ranges": {"alpha": [1.0, 2.0], "A": [0.1, 1.0], "omega_c": [0.5, 5.0]}}})
    env = QubitPulseEnv(exp.meta)
    env.reset(seed=7)
    pulse = np.random.default_rng(0).uniform(-4, 4, size=(5, 2))
    for u in pulse:
        _, reward, *_ = env.step(u.astype(np.float32))
    pulse32 = pulse.astype(np.float32).astype(np.float64)  # what the Box action carried
    factory = task_factory(exp)
    # the same task and the same trajectories (noise drawn from the seed the env drew after the task)
    rng = np.random.default_rng(7)
    params = factory.distribution.sample(1, rng)
    tasks = factory.make(params, np.random.default_rng(int(rng.integers(2**63))))
    with torch.no_grad():
        expected = float(tasks.fidelity(torch.as_tensor(pulse32)[None])[0])
    assert reward == pytest.approx(expected, abs=1e-12)
    assert 0.0 < reward < 1.0


def test_qubit_pulse_reward_golden_pure_dephasing():
    """No control, identity target, markovian dephasing gamma, no relaxation: F = (2 + exp(-gamma T)) / 3
    (docs/CONVENTIONS.md §3); the log reward is -log10(1 - F)."""
    gamma = 0.1
    meta = {"target_gate": "identity", "n_segments": 3,
            "noise": {"simulation": "markovian", "transverse_coupling": 0.0,
                      "ranges": {"alpha": [1.0, 1.0], "gamma_phi": [gamma, gamma], "omega_c": [1.0, 1.0]}}}
    expected = (2 + math.exp(-gamma)) / 3
    for reward_kind, value in (("fidelity", expected), ("log_infidelity", -math.log10(1 - expected))):
        env = QubitPulseEnv(meta, reward=reward_kind)
        env.reset(seed=0)
        for _ in range(3):
            _, reward, terminated, _, info = env.step(np.zeros(2, dtype=np.float32))
        assert terminated and info["fidelity"] == pytest.approx(expected, abs=1e-10)
        assert reward == pytest.approx(value, rel=1e-9)
        assert episode_fidelity(reward, reward_kind) == pytest.approx(expected, abs=1e-9)
    assert infidelity_reward(1.0) == 12.0


# ---------------------------------------------------------------------------------------------
# SB3 with this project's actor: every algorithm x backend, exact circuit counts


def grad_evals_per_update(body: ActorBody, gradient: str, batch: int, spsa_directions: int = 1) -> int:
    """Circuits behind one actor gradient of a batch: one forward pass, plus what the method adds."""
    if not isinstance(body.model, ReUploadingPQC):
        return 0
    n_params = sum(p.numel() for p in body.model.parameters())
    extra = {"backprop": 0, "adjoint": 0, "parameter-shift": 2 * body.model.spec.n_gate_angles,
             "spsa": 2 * spsa_directions + 1, "finite-diff": 2 * n_params + 1}[gradient]
    return batch * (1 + extra)


SMOKE = [("classical", "backprop", "sac"), ("classical", "spsa", "td3"), ("classical", "finite-diff", "ddpg"),
         ("tensorcircuit", "backprop", "sac"), ("tensorcircuit", "parameter-shift", "td3"), ("tensorcircuit", "spsa", "ddpg"),
         ("pennylane", "finite-diff", "sac"), ("pennylane", "adjoint", "td3"), ("pennylane", "backprop", "ddpg")]


class Recorder(NullReporter):
    def __init__(self):
        self.values: dict[str, list[tuple[int, float]]] = {}
        self.saved: dict[int, bytes] = {}

    def metrics(self, values, step):
        for key, value in values.items():
            self.values.setdefault(key, []).append((step, value))

    def checkpoint(self, state, episode):
        buf = io.BytesIO()
        torch.save(state, buf)
        self.saved[episode] = buf.getvalue()


@pytest.mark.parametrize("backend,gradient,algorithm", SMOKE)
def test_every_algorithm_and_backend_trains_with_exact_counts(backend, gradient, algorithm):
    exp = tiny(backend, gradient, algorithm, control={"total_steps": 220})  # one 200-step episode, and 20 steps
    rec = Recorder()
    result = train(exp, 0, rec)
    metrics = result.final_metrics()
    assert metrics["final/env_steps"] == 220 and metrics["final/updates"] == 200  # steps 21..220 each update once
    actor_updates = {"sac": 200, "td3": 100, "ddpg": 200}[algorithm]  # TD3 updates the actor every 2nd step
    from control.sb3 import ContinuousRun

    run = ContinuousRun(exp, 0, NullReporter())  # only to read the actor's layout
    body = run.model.actor.body
    run.close()
    assert metrics["final/grad_circuit_evals"] == actor_updates * grad_evals_per_update(body, gradient, 8)
    if backend == "classical":
        assert metrics["final/total_circuit_evals"] == 0
    else:
        # acting from step 20 on (1 circuit each), critic targets (8 per update), one evaluation (10 episodes
        # of 200 steps, batched), on top of the gradients
        assert metrics["final/total_circuit_evals"] == metrics["final/grad_circuit_evals"] + 200 + 200 * 8 + 200 * 10
    assert math.isfinite(metrics["final/eval_return"]) and -2000 < metrics["final/eval_return"] < 0
    for key in ("rollout/ep_rew_mean", "rollout/episode_return", "train/actor_loss", "train/critic_loss",
                "eval/return", "time/fps", "grad/circuit_evals"):
        assert key in rec.values, key
    assert ("train/ent_coef" in rec.values) == (algorithm == "sac")
    assert [s for s, _ in rec.values["eval/return"]] == [220]
    assert [s for s, _ in rec.values["rollout/episode_return"]] == [200]
    assert [s for s, _ in rec.values["train/critic_loss"]] == [200, 220]  # the last updates are logged at the end too
    if backend != "classical":
        assert sum(v for _, v in rec.values["grad/circuit_evals"]) == metrics["final/grad_circuit_evals"]


def test_the_actor_is_ours_and_the_critics_are_classical():
    from control.sb3 import ContinuousRun

    for algorithm, actor_class in (("sac", ProjectSACActor), ("td3", ProjectTD3Actor)):
        run = ContinuousRun(tiny("tensorcircuit", "backprop", algorithm), 0, NullReporter())
        policy = run.model.policy
        assert isinstance(policy.actor, actor_class) and isinstance(policy.actor.body.model, ReUploadingPQC)
        for critic in (policy.critic, policy.critic_target):
            assert not any(isinstance(m, (ActorBody, ReUploadingPQC)) for m in critic.modules())
        assert len(run.bodies) == (2 if algorithm == "td3" else 1)  # TD3's actor target: its own copy
        run.close()


# ---------------------------------------------------------------------------------------------
# The actor's gradient methods


def actor_gradient(exp, seed=0):
    """d/dtheta sum(W * body(obs)) for a fixed batch and weights W, by the experiment's method."""
    body = ActorBody(exp, 3, 2, np.array([1.0, 1.0, 8.0]), seed)
    gen = torch.Generator().manual_seed(42)
    obs = torch.rand(5, 3, generator=gen, dtype=torch.float64) * 2 - 1
    weights = torch.randn(5, 2, generator=gen, dtype=torch.float64)
    (body(obs) * weights).sum().backward()
    return torch.cat([p.grad.reshape(-1) for p in body.parameters()]), body


@pytest.mark.parametrize("backend,gradient", [("tensorcircuit", "parameter-shift"), ("tensorcircuit", "finite-diff"),
                                              ("pennylane", "backprop"), ("pennylane", "adjoint"),
                                              ("pennylane", "parameter-shift"), ("pennylane", "finite-diff")])
def test_actor_gradients_agree_with_tensorcircuit_backprop(backend, gradient):
    model = {"n_qubits": 2, "n_layers": 2}
    reference, _ = actor_gradient(experiment(task="pendulum", backend="tensorcircuit", gradient="backprop", model=model))
    grad, _ = actor_gradient(experiment(task="pendulum", backend=backend, gradient=gradient, model=model))
    assert torch.allclose(grad, reference, atol=1e-6, rtol=0)
    assert reference.abs().max() > 1e-2


def test_classical_actor_finite_differences_match_backprop():
    bp, _ = actor_gradient(experiment(task="pendulum", backend="classical", gradient="backprop", model={"hidden_sizes": [6]}))
    fd, _ = actor_gradient(experiment(task="pendulum", backend="classical", gradient="finite-diff", model={"hidden_sizes": [6]}))
    assert torch.allclose(fd, bp, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", ["classical", "tensorcircuit"])
def test_actor_spsa_is_the_directional_derivative_along_its_direction(backend):
    """One direction d: SPSA = ((f(x + c d) - f(x - c d)) / 2c) d = (grad f . d) d + O(c^2), with d the first
    draw of the body's generator (the run's ``actor_spsa`` stream); the estimated parameters are the policy model's."""
    from gradients import rademacher_directions

    fields = {"task": "pendulum", "backend": backend, "model": {"n_qubits": 2, "n_layers": 1, "hidden_sizes": [6]}}
    bp, body = actor_gradient(experiment(gradient="backprop", **fields))
    sp, _ = actor_gradient(experiment(gradient="spsa", spsa={"c": 1e-4}, **fields))
    n_model = sum(p.numel() for p in body.model.parameters())
    d = rademacher_directions(1, n_model, seed_streams(0, SEED_STREAMS)["actor_spsa"].torch())[0]
    expected = (bp[:n_model] @ d) * d
    assert torch.allclose(sp[:n_model], expected, atol=1e-6, rtol=0)
    assert torch.allclose(sp[n_model:], bp[n_model:], atol=1e-12)  # the linear readout map: exact
    assert not torch.allclose(sp[:n_model], bp[:n_model], atol=1e-3)  # one direction is not the gradient


# ---------------------------------------------------------------------------------------------
# Determinism and resume


def eval_returns(rec: Recorder) -> list[float]:
    return [v for _, v in rec.values["eval/return"]]


@pytest.mark.parametrize("backend", ["classical", "tensorcircuit"])
def test_same_seed_same_evaluation_returns(backend):
    exp = tiny(backend, "backprop", "sac", control={"total_steps": 60, "eval_every": 20})
    a, b, c = Recorder(), Recorder(), Recorder()
    ra, rb = train(exp, 3, a), train(exp, 3, b)
    train(exp, 4, c)
    assert len(eval_returns(a)) == 3 and eval_returns(a) == eval_returns(b)
    assert a.values["train/actor_loss"] == b.values["train/actor_loss"]
    for key, value in ra.policy_state.items():
        assert torch.equal(rb.policy_state[key], value), key
    assert eval_returns(c) != eval_returns(a)


class Cut(Exception):
    pass


class CutAfterCheckpoint(Recorder):
    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def checkpoint(self, state, episode):
        super().checkpoint(state, episode)
        if episode == self.at:
            raise Cut


@pytest.mark.parametrize("algorithm,task", [("sac", "pendulum"), ("td3", "pendulum"), ("sac", "qubit_pulse")])
def test_resumed_run_equals_uninterrupted_run(algorithm, task):
    """Cut right after a checkpoint (torch.save, then torch.load with weights_only), resume: the same
    evaluations, episodes, updates and weights as a run never cut."""
    control = {"total_steps": 600, "learning_starts": 100, "eval_every": 100, "checkpoint_every": 200,
               "action_noise_std": 0.1 if algorithm == "td3" else None}
    extra = {"task": task, "control": control}
    if task == "qubit_pulse":
        extra.update(meta=SMALL_PULSE_META, control={**control, "total_steps": 120, "learning_starts": 20,
                                                     "eval_every": 40, "checkpoint_every": 50})
    exp = tiny("classical", "backprop", algorithm, **extra)
    full_rec = Recorder()
    full = train(exp, 5, full_rec)
    cut_at = sorted(full_rec.saved)[1]
    cut = CutAfterCheckpoint(cut_at)
    with pytest.raises(Cut):
        train(exp, 5, cut)
    state = torch.load(io.BytesIO(cut.saved[cut_at]), weights_only=True)  # nothing but tensors and plain data
    resumed_rec = Recorder()
    resumed = train(exp, 5, resumed_rec, resume=state)
    assert min(s for s, _ in resumed_rec.values["rollout/episode_return"]) > cut_at  # continues after the checkpoint
    assert resumed.history.evals == full.history.evals and resumed.history.episodes == full.history.episodes
    assert resumed.updates == full.updates and resumed.env_steps == full.env_steps == exp.control.total_steps
    for key, value in full.policy_state.items():
        assert torch.equal(resumed.policy_state[key], value), key
    if task == "qubit_pulse":
        assert resumed.final_metrics()["final/fidelity"] == full.final_metrics()["final/fidelity"]


def test_resume_refuses_a_checkpoint_of_another_algorithm():
    exp = tiny("classical", "backprop", "sac", control={"total_steps": 220, "checkpoint_every": 200})
    rec = Recorder()
    train(exp, 0, rec)
    state = torch.load(io.BytesIO(rec.saved[200]), weights_only=True)
    with pytest.raises(ValueError, match="not a continuous-td3 checkpoint"):
        train_continuous(tiny("classical", "backprop", "td3"), 0, NullReporter(), resume=state)


# ---------------------------------------------------------------------------------------------
# qubit_pulse against the qubit baselines, logging, config errors


def test_qubit_pulse_run_reports_the_learned_pulse_beside_the_baselines():
    exp = tiny("classical", "backprop", "sac", task="qubit_pulse", meta=SMALL_PULSE_META,
               control={"total_steps": 40, "learning_starts": 20})
    result = train(exp, 0)
    m = result.final_metrics()
    assert result.pulse.shape == (4, 2) and result.pulse.abs().max() <= exp.meta.max_amplitude
    # the held-out tasks and the pulse give the reported fidelity (the qubit_meta validation tasks of this seed)
    from envs.qubit_pulse import pulse_task_factory
    from meta.train import SEED_STREAMS as META_STREAMS

    tasks = pulse_task_factory(exp.meta).sample(4, seed_streams(0, META_STREAMS)["validation"].numpy())
    with torch.no_grad():
        assert m["final/fidelity"] == pytest.approx(float(tasks.fidelity(result.pulse.expand(4, -1, -1)).mean()), abs=1e-12)
    assert m["final/gap_to_robust"] == pytest.approx(m["final/fidelity"] - m["final/fidelity_robust"])
    assert m["final/fidelity_optimum"] >= max(m["final/fidelity"], m["final/fidelity_robust"]) - 1e-9
    assert "final/steps_to_threshold" not in m and "final/reached_threshold" not in m  # no default threshold


def test_reporter_output_forwards_numbers_and_stops_on_non_finite_losses():
    rec = Recorder()
    out = ReporterOutput(rec)
    out.write({"train/actor_loss": np.float32(1.5), "time/fps": 12, "note": "text", "flag": True}, {}, 7)
    assert rec.values == {"train/actor_loss": [(7, 1.5)], "time/fps": [(7, 12.0)], "time/env_steps_per_s": [(7, 12.0)]}
    with pytest.raises(NonFiniteError, match="non-finite train/critic_loss at step 9"):
        out.write({"train/critic_loss": float("nan")}, {}, 9)


def test_steps_to_threshold_is_the_first_evaluation_that_reaches_it():
    exp = tiny("classical", "backprop", "sac", control={"total_steps": 60, "eval_every": 20, "threshold": -1e9})
    m = train(exp, 0).final_metrics()
    assert m["final/reached_threshold"] == 1.0 and m["final/steps_to_threshold"] == 20
    m = train(tiny("classical", "backprop", "sac", control={"total_steps": 40, "threshold": 0.0}), 0).final_metrics()
    assert m["final/reached_threshold"] == 0.0 and "final/steps_to_threshold" not in m


@pytest.mark.parametrize("fields,needle", [
    ({"task": "cartpole", "algorithm": "sac"}, "field 'algorithm': 'sac' does not apply to task 'cartpole'; allowed: reinforce, dqn"),
    ({"task": "pendulum", "algorithm": "dqn"}, "field 'algorithm': 'dqn' does not apply to task 'pendulum'; allowed: sac, td3, ddpg"),
    ({"task": "pendulum", "algorithm": "td3", "gradient": "parameter-shift"},
     "field 'gradient': 'parameter-shift' is not available on backend 'classical'; allowed: backprop, spsa, finite-diff"),
    ({"task": "pendulum", "backend": "tensorcircuit", "gradient": "adjoint"},
     "field 'gradient': 'adjoint' is not available on backend 'tensorcircuit'"),
    ({"task": "qubit_pulse"}, "field 'meta.noise': task 'qubit_pulse' needs a noise section"),
    ({"task": "qubit_pulse", "meta": {"n_segments": 4}}, "field 'meta.noise': task 'qubit_pulse' needs a noise section"),
    ({"task": "pendulum", "control": {"eval_episodes": 5}}, "field 'control.eval_episodes'"),
    ({"task": "pendulum", "algorithm": "sac", "control": {"policy_delay": 2}}, "field 'control.policy_delay': applies to algorithm 'td3' only"),
])
def test_bad_control_configs_give_one_line(fields, needle):
    raw = {"experiments": [{"name": "bad", "backend": "classical", "gradient": "backprop", **fields}]}
    with pytest.raises(ConfigError) as err:
        load_config(raw=raw)
    assert len(err.value.lines) == 1 and needle in err.value.lines[0], err.value.lines


def test_the_shipped_control_configs_validate():
    from conftest import ROOT

    pendulum = load_config(ROOT / "configs" / "pendulum.yaml")
    names = {e.name for e in pendulum.experiments}
    assert {"classical_sac", "classical_td3", "classical_ddpg", "tc_sac", "pl_sac"} <= names
    by_name = {e.name: e for e in pendulum.experiments}
    assert by_name["classical_td3"].control.learning_starts == 10_000 and by_name["classical_td3"].control.gamma == 0.98
    assert by_name["classical_sac"].control.total_steps == 20_000 and by_name["classical_sac"].control.learning_rate == 1e-3
    pulse = load_config(ROOT / "configs" / "qubit_pulse.yaml")
    assert all(e.task == "qubit_pulse" for e in pulse.experiments)


# ---------------------------------------------------------------------------------------------
# run.py end to end: statuses, time limit, --resume, summary


def test_sweep_times_out_a_pendulum_run_after_its_checkpoint_and_resume_finishes_it(tmp_path):
    """``python run.py`` on a pendulum config: the run hangs after its first checkpoint (test-only fault),
    is killed at its time limit (TIMED_OUT), and ``--resume`` continues it in the same MLflow run from
    that checkpoint: every step's metrics once, the same evaluations as an uninterrupted run."""
    import os
    import subprocess
    import sys

    import yaml
    from conftest import ROOT
    from mlflow.tracking import MlflowClient

    exp_fields = {"name": "pend", "task": "pendulum", "algorithm": "sac", "backend": "classical", "gradient": "backprop",
                  "timeout_s": 90, "model": {"hidden_sizes": [8]},  # the first checkpoint comes within seconds of the start
                  "control": {"total_steps": 600, "learning_starts": 100, "batch_size": 8, "critic_net_arch": [16],
                              "eval_every": 200, "checkpoint_every": 200}}
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump({"mlflow": {"experiment_name": "e2e"}, "experiments": [exp_fields]}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)

    def sweep(script, *args, extra=None):
        return subprocess.run([sys.executable, str(script), "-c", "sweep.yaml", *args], cwd=tmp_path, capture_output=True,
                              text=True, timeout=600, env={**env, **(extra or {})})

    first = sweep(ROOT / "tests" / "run_with_faults.py", extra={"QMLBENCH_INJECT_FAULT": "pend-seed0:hang-after-checkpoint"})
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment_id = client.get_experiment_by_name("e2e").experiment_id
    (run,) = [r for r in client.search_runs([experiment_id]) if r.info.run_name == "pend-seed0"]
    assert run.data.tags["status"] == "TIMED_OUT" and run.data.tags["checkpoint_episode"] == "200"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/return")] == [200, 400]

    second = sweep(ROOT / "run.py", "--resume")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "final_eval_return" in second.stdout and "steps_to_threshold" in second.stdout and "pend-seed0" in second.stdout
    resumed = client.get_run(run.info.run_id)
    assert resumed.data.tags["status"] == "PASSED" and resumed.data.tags["resumed_from_episode"] == "200"
    evals = sorted(client.get_metric_history(run.info.run_id, "eval/return"), key=lambda m: m.step)
    assert [m.step for m in evals] == [200, 400, 600]  # each step once: nothing lost, nothing twice
    for key in ("rollout/episode_return", "train/critic_loss", "rollout/ep_rew_mean"):
        assert [m.step for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)] == [200, 400, 600]
    uninterrupted = train(experiment(**{**exp_fields, "name": "u"}), 0)
    assert [m.value for m in evals] == [v for _, v, _ in uninterrupted.history.evals]
    assert resumed.data.metrics["final/eval_return"] == uninterrupted.final_eval_return
    assert resumed.data.metrics["final/env_steps"] == 600
