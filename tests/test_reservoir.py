"""Algorithm R: uniform over positions, bounded memory, seeded; sampling trajectories."""

import tracemalloc

import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import chisquare

import timemachine as tm
from timemachine.fitting import Reservoir, reservoir_sample_trajectory
from timemachine.sensitivity import SensitivityTrajectory, simulate


def test_positions_are_uniform_chi_square():
    """10⁴ independent reservoirs of R = 10 over streams of 50: 10⁵ draws, 50 positions."""
    stream, capacity, runs = 50, 10, 10_000
    counts = np.zeros(stream, dtype=np.int64)
    for seed in range(runs):
        reservoir = Reservoir(capacity, seed=seed)
        for position in range(stream):
            reservoir.offer(position)
        held = reservoir.items
        assert len(held) == capacity and len(set(held)) == capacity
        counts[held] += 1
    assert counts.sum() == 100_000
    result = chisquare(counts)  # expected: uniform, 2000 per position
    assert result.pvalue > 0.001, (result, counts)
    # the same test rejects a sampler that favours late positions (a slot-choice bug
    # that draws j from [0, n_seen - 2] instead of [0, n_seen - 1])
    biased = np.zeros(stream, dtype=np.int64)
    rng = np.random.default_rng(0)
    for _ in range(runs):
        slots = list(range(capacity))
        for position in range(capacity, stream):
            j = rng.integers(0, position)
            if j < capacity:
                slots[j] = position
        biased[slots] += 1
    assert chisquare(biased).pvalue < 1e-6


def test_memory_is_constant_in_stream_length():
    def peak(n_items):
        reservoir = Reservoir(8, seed=1)
        tracemalloc.start()
        for i in range(n_items):
            reservoir.offer(np.full(512, float(i)))  # 4 KiB per item
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert len(reservoir) == 8 and reservoir.n_seen == n_items
        return top

    short, long = peak(1_000), peak(50_000)
    assert long < 1.2 * short + 8192, (short, long)
    assert long < 100 * 4096  # R items and a few in flight, not the stream


def test_deterministic_per_seed():
    def draw(seed):
        reservoir = Reservoir(5, seed=seed)
        for i in range(1000):
            reservoir.offer(i)
        return reservoir.items

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)
    short = Reservoir(5, seed=0)
    for i in range(3):
        short.offer(i)
    assert short.items == [0, 1, 2]
    with pytest.raises(tm.InputError, match="capacity must be an integer >= 1"):
        Reservoir(0)


def test_trajectory_sampling_streamed_equals_in_memory(tmp_path):
    """Frames (x, dx/dθ, step) of a streamed run (12 chunk files) match the in-memory run."""

    def energy(x, p):
        return 0.5 * p[0] * jnp.sum((x[1:] - x[:-1]) ** 2) + 0.5 * p[1] * jnp.sum(x**2)

    system = tm.System(np.full(4, 12.0), (), (), []).add_term(
        energy, ["custom/chain/k", "custom/trap/k"], [200.0, 10.0]
    )
    x0 = np.arange(12, dtype=float).reshape(4, 3) * 0.05
    integrator = tm.LangevinIntegrator(temperature=300.0, friction=5.0, dt=0.002, seed=2)
    kwargs = dict(wrt="custom/*", save_every=5, chunk_steps=50)
    memory = simulate(system, x0, integrator, 600, **kwargs)
    streamed = simulate(system, x0, integrator, 600, out_dir=tmp_path / "run", **kwargs)
    assert len(streamed.x.files) == 12
    streamed = SensitivityTrajectory.load(tmp_path / "run")

    x, dx, steps = reservoir_sample_trajectory(streamed, capacity=16, seed=9)
    x_mem, dx_mem, steps_mem = reservoir_sample_trajectory(memory, capacity=16, seed=9)
    assert x.shape == (16, 4, 3) and dx.shape == (16, 2, 4, 3) and steps.shape == (16,)
    np.testing.assert_array_equal(steps, steps_mem)
    np.testing.assert_array_equal(x, x_mem)
    np.testing.assert_array_equal(dx, dx_mem)
    assert np.all(np.diff(steps) > 0)
    frame = steps // 5 - 1
    np.testing.assert_array_equal(x, memory.x[frame])
    np.testing.assert_array_equal(dx, memory.dx_dtheta[frame])
    # another seed draws other frames; more capacity than frames returns them all
    assert not np.array_equal(reservoir_sample_trajectory(memory, 16, seed=10)[2], steps)
    everything = reservoir_sample_trajectory(memory, capacity=500, seed=0)
    np.testing.assert_array_equal(everything[2], memory.steps)
