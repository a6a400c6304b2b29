"""Training loops: hand-checked oracles, determinism, and every backend x gradient pair runs."""

import io

import numpy as np
import pytest
import torch
from conftest import experiment

from train import NullReporter, ReplayBuffer, discounted_returns, dqn_loss, reinforce_loss, train

TINY = {"model": {"n_qubits": 2, "n_layers": 1, "hidden_sizes": [8]},
        "training": {"episodes": 4, "episodes_per_batch": 2, "dqn": {"batch_size": 8, "buffer_size": 100}}}


def test_discounted_returns():
    assert np.allclose(discounted_returns(np.array([1.0, 1.0, 1.0]), 0.5), [1.75, 1.5, 1.0])
    assert np.allclose(discounted_returns(np.array([1.0, 2.0]), 1.0), [3.0, 2.0])


def test_reinforce_loss_matches_hand_computation_and_broadcasts():
    logits = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    actions, returns = torch.tensor([1, 1]), torch.tensor([1.0, -2.0])
    lp = torch.log_softmax(logits, -1)
    expected = -(lp[0, 1] * 1.0 + lp[1, 1] * -2.0) / 2
    fn = reinforce_loss(actions, returns, n_episodes=2)
    assert torch.isclose(fn(logits), expected)
    stacked = fn(torch.stack([logits, logits * 0]))
    assert stacked.shape == (2,) and torch.isclose(stacked[0], expected)


def test_dqn_loss_is_huber_on_chosen_actions():
    q = torch.tensor([[1.0, 5.0], [0.0, -1.0]])
    fn = dqn_loss(torch.tensor([1, 0]), torch.tensor([4.5, 3.0]))
    # |5-4.5| = 0.5 -> 0.125 ; |0-3| = 3 -> 2.5 ; mean 1.3125
    assert torch.isclose(fn(q), torch.tensor(1.3125))


def test_replay_buffer_wraps_around():
    buf = ReplayBuffer(3, 1)
    for i in range(5):
        buf.add([i], i % 2, float(i), [i + 1], i == 4)
    assert buf.size == 3 and sorted(buf.rewards) == [2.0, 3.0, 4.0]
    obs, act, rew, nxt, term = buf.sample(10, np.random.default_rng(0))
    assert obs.shape == (10, 1) and set(rew) <= {2.0, 3.0, 4.0} and np.allclose(nxt[:, 0], obs[:, 0] + 1)


@pytest.mark.parametrize("backend", ["classical", "tensorcircuit"])
@pytest.mark.parametrize("algorithm", ["reinforce", "dqn"])
def test_same_seed_same_returns(backend, algorithm):
    exp = experiment(backend=backend, gradient="backprop", algorithm=algorithm, **TINY)
    a, b = train(exp, 3), train(exp, 3)
    assert a.episode_returns == b.episode_returns
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(pa, pb)
    c = train(exp, 4)
    assert c.episode_returns != a.episode_returns


def test_reinforce_learns_on_classical_baseline():
    """A real learning signal: 60 episodes of REINFORCE lift the mean return well above random (~22)."""
    exp = experiment(backend="classical", gradient="backprop", algorithm="reinforce",
                     model={"hidden_sizes": [32]}, training={"episodes": 200, "episodes_per_batch": 10, "gamma": 0.99,
                                                            "lr": {"weights": 0.02}})
    result = train(exp, 0)
    assert np.mean(result.episode_returns[:20]) < 40
    assert np.mean(result.episode_returns[-20:]) > 100


@pytest.mark.parametrize("algorithm", ["reinforce", "dqn"])
@pytest.mark.parametrize("backend,gradient", [
    ("classical", "backprop"), ("classical", "spsa"), ("classical", "finite-diff"),
    ("pennylane", "backprop"), ("pennylane", "adjoint"), ("pennylane", "parameter-shift"), ("pennylane", "spsa"),
    ("pennylane", "finite-diff"), ("tensorcircuit", "backprop"), ("tensorcircuit", "parameter-shift"),
    ("tensorcircuit", "spsa"), ("tensorcircuit", "finite-diff"),
])
def test_every_pair_updates_its_parameters(algorithm, backend, gradient):
    exp = experiment(backend=backend, gradient=gradient, algorithm=algorithm, **TINY)
    result = train(exp, 0)
    assert len(result.episode_returns) == 4 and result.updates > 0
    fresh = train(experiment(backend=backend, gradient=gradient, algorithm=algorithm,
                             **{**TINY, "training": {**TINY["training"], "episodes": 1, "episodes_per_batch": 1,
                                                     "dqn": {"learning_starts": 10_000}}}), 0)
    moved = any(not torch.allclose(p, q) for p, q in zip(result.model.parameters(), fresh.model.parameters()))
    assert moved
    if backend != "classical":
        assert result.grad_circuit_evals > 0 and result.total_circuit_evals > result.grad_circuit_evals


def test_quantum_backends_train_identically():
    """Same seed, same model, same gradient method: PennyLane and TensorCircuit produce the same run."""
    runs = [train(experiment(backend=b, gradient="backprop", algorithm="reinforce", **TINY), 1) for b in ("pennylane", "tensorcircuit")]
    assert runs[0].episode_returns == runs[1].episode_returns
    for p, q in zip(runs[0].model.parameters(), runs[1].model.parameters()):
        assert torch.allclose(p, q, atol=1e-8)


@pytest.mark.parametrize("algorithm,gradient", [
    ("reinforce", "backprop"), ("reinforce", "parameter-shift"), ("reinforce", "spsa"), ("dqn", "backprop"), ("dqn", "finite-diff"),
])
def test_tensorcircuit_compiles_nothing_after_warm_up(algorithm, gradient):
    """Growing REINFORCE batches (1 to 3 episodes of any length) and every call site meet the shapes
    compiled during the first update; the counters reach the final metrics."""
    exp = experiment(backend="tensorcircuit", gradient=gradient, algorithm=algorithm, model={"n_qubits": 2, "n_layers": 1},
                     training={"episodes": 12, "episodes_per_batch": 3, "dqn": {"batch_size": 8, "buffer_size": 100}})
    result = train(exp, 0)
    metrics = result.final_metrics()
    assert result.updates > 1
    assert metrics["time/n_compiles"] >= 2 and metrics["time/compile_s"] > 0
    assert metrics["time/compiles_after_warmup"] == 0


class CheckpointRecorder(NullReporter):
    """Keeps every checkpoint as the bytes a worker would upload (saved with torch.save)."""

    def __init__(self):
        self.saved: dict[int, bytes] = {}
        self.logged: list[int] = []

    def metrics(self, values, step):
        self.logged.append(step)

    def checkpoint(self, state, episode):
        buf = io.BytesIO()
        torch.save(state, buf)
        self.saved[episode] = buf.getvalue()


@pytest.mark.parametrize("backend,tolerance", [("classical", 0.0), ("tensorcircuit", 1e-9)])
@pytest.mark.parametrize("algorithm,gradient", [("reinforce", "backprop"), ("dqn", "backprop"), ("dqn", "spsa")])
def test_resumed_run_equals_uninterrupted_run(algorithm, gradient, backend, tolerance):
    exp = experiment(backend=backend, gradient=gradient, algorithm=algorithm, model={"n_qubits": 2, "n_layers": 1, "hidden_sizes": [8]},
                     training={"episodes": 9, "episodes_per_batch": 2, "checkpoint_every": 4,
                               "dqn": {"batch_size": 8, "buffer_size": 100, "epsilon_decay": 0.7}})
    recorder = CheckpointRecorder()
    full = train(exp, 5, recorder)
    checkpoint_episode = 4  # REINFORCE: the batch boundary at episode 4
    assert sorted(recorder.saved) == [4, 8]
    state = torch.load(io.BytesIO(recorder.saved[checkpoint_episode]), weights_only=True)  # nothing but tensors and plain data
    resumed_recorder = CheckpointRecorder()
    resumed = train(exp, 5, resumed_recorder, resume=state)
    assert resumed_recorder.logged[0] == checkpoint_episode  # steps continue after the checkpoint
    assert resumed.episode_returns == full.episode_returns and resumed.env_steps == full.env_steps
    assert resumed.updates == full.updates and resumed.total_circuit_evals == full.total_circuit_evals
    for p, q in zip(resumed.model.parameters(), full.model.parameters(), strict=True):
        assert torch.allclose(p, q, atol=tolerance, rtol=0)
    assert recorder.saved[8] and resumed_recorder.saved.keys() == {8}


def test_resume_refuses_a_checkpoint_of_another_algorithm():
    recorder = CheckpointRecorder()
    exp = experiment(backend="classical", gradient="backprop", algorithm="reinforce", **{**TINY, "training": {
        **TINY["training"], "checkpoint_every": 2}})
    train(exp, 0, recorder)
    state = torch.load(io.BytesIO(recorder.saved[2]), weights_only=True)
    with pytest.raises(ValueError, match="not a dqn checkpoint"):
        train(experiment(backend="classical", gradient="backprop", algorithm="dqn", **TINY), 0, resume=state)


def test_poisoned_loss_fails_with_the_episode(monkeypatch):
    import train as train_module

    monkeypatch.setattr(train_module, "POISON_UPDATE", 2)
    exp = experiment(backend="classical", gradient="backprop", algorithm="reinforce", **TINY)
    with pytest.raises(train_module.NonFiniteError, match="^non-finite loss at episode 4$"):
        train(exp, 0)
