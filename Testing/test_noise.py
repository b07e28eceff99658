"""Simplex noise against the reference implementation (opensimplex) and its statistics."""

import numpy as np
import opensimplex
import pytest
import torch
from opensimplex.internals import _init

from SACDiffLib.config import NoiseConfig
from SACDiffLib.noise import RAW_OCTAVE_STD, NoiseSampler, SimplexNoise, opensimplex_permutation


@pytest.mark.parametrize("seed", [0, 42, -5, 2**40 + 3])
def test_permutation_equals_opensimplex(seed):
    perm, _ = _init(seed)
    assert opensimplex_permutation(seed) == perm.tolist()


@pytest.mark.parametrize("seed", [0, 42, -5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_single_octave_equals_opensimplex_noise2array(seed, dtype):
    x = np.linspace(-13.7, 21.3, 61)
    y = np.linspace(-30.0, 4.9, 47)
    opensimplex.seed(seed)
    reference = opensimplex.noise2array(x, y)
    ours = SimplexNoise(seed).noise2array(torch.tensor(x, dtype=dtype), torch.tensor(y, dtype=dtype))
    assert ours.shape == reference.shape == (47, 61)
    np.testing.assert_allclose(ours.double().numpy(), reference, atol=1e-4, rtol=0)


def test_pixel_grid_at_paper_base_frequency_equals_opensimplex():
    # The first octave of a 96² field: coordinates i·ν with ν = 2⁻⁶, as AnoDDPM's x / frequency.
    coords = np.arange(96) * 2.0**-6
    opensimplex.seed(7)
    reference = opensimplex.noise2array(coords, coords)
    ours = SimplexNoise(7).noise2array(torch.tensor(coords, dtype=torch.float32), torch.tensor(coords, dtype=torch.float32))
    np.testing.assert_allclose(ours.numpy(), reference, atol=1e-4, rtol=0)


def test_octave_sum_equals_opensimplex_octaves_at_the_same_offsets():
    seed, n, h, w = 3, 2, 20, 24
    noise = SimplexNoise(seed)
    fields = noise.octaves(n, h, w, torch.Generator().manual_seed(11), dtype=torch.float64)
    # Re-draw the same offsets the implementation drew, then build the sum with opensimplex.
    offsets = torch.rand((6, 2, n, 1, 1), generator=torch.Generator().manual_seed(11)).double() * 256.0
    opensimplex.seed(seed)
    for i in range(n):
        expected = np.zeros((h, w))
        amplitude = 1.0
        for o in range(6):
            f = 2.0**-6 * 2**o
            expected += amplitude * opensimplex.noise2array(
                np.arange(w) * f + float(offsets[o, 0, i]), np.arange(h) * f + float(offsets[o, 1, i])
            )
            amplitude *= 0.8
        np.testing.assert_allclose(fields[i].numpy(), expected, atol=1e-4, rtol=0)


def test_normalised_octaves_have_unit_variance():
    sampler = NoiseSampler(NoiseConfig(), seed=0)
    eps = sampler(512, 64, 64, torch.Generator().manual_seed(5), dtype=torch.float64)
    rms = float(eps.pow(2).mean().sqrt())
    assert eps.shape == (512, 1, 64, 64)
    assert abs(rms - 1.0) < 0.03, f"normalised simplex rms {rms} (RAW_OCTAVE_STD={RAW_OCTAVE_STD} out of date?)"
    assert abs(float(eps.mean())) < 0.05


def test_raw_octaves_keep_anoddpm_scale():
    sampler = NoiseSampler(NoiseConfig(normalise=False), seed=0)
    eps = sampler(256, 64, 64, torch.Generator().manual_seed(6))
    assert sampler.scale == 1.0
    assert 0.5 < float(eps.pow(2).mean().sqrt()) < 0.7


def test_same_seed_same_fields_and_members_differ():
    sampler = NoiseSampler(NoiseConfig(), seed=1)
    a = sampler(3, 32, 32, torch.Generator().manual_seed(9))
    b = sampler(3, 32, 32, torch.Generator().manual_seed(9))
    c = sampler(3, 32, 32, torch.Generator().manual_seed(10))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a[0], a[1])


def test_simplex_noise_is_spatially_coherent_unlike_gaussian():
    gen = torch.Generator().manual_seed(0)
    simplex = NoiseSampler(NoiseConfig(), 0)(8, 64, 64, gen)[:, 0]
    gauss = NoiseSampler(NoiseConfig(kind="gaussian"), 0)(8, 64, 64, gen)[:, 0]

    def lag1(f):
        return float((f[:, :, 1:] * f[:, :, :-1]).mean() / f.pow(2).mean())

    assert lag1(simplex) > 0.9  # neighbouring pixels almost equal: low-frequency corruption
    assert abs(lag1(gauss)) < 0.05
    assert abs(float(gauss.std()) - 1) < 0.05


def test_other_octave_settings_are_normalised_on_the_fly():
    cfg = NoiseConfig(octaves=3, persistence=0.5)
    eps = NoiseSampler(cfg, 0)(256, 64, 64, torch.Generator().manual_seed(2))
    assert abs(float(eps.pow(2).mean().sqrt()) - 1.0) < 0.1


def test_compiled_noise_equals_eager_noise():
    """SimplexNoise.compile (torch.compile, eager fallback) draws the same fields as the eager path."""
    eager, compiled = SimplexNoise(3), SimplexNoise(3).compile()
    a = eager.octaves(2, 48, 40, torch.Generator().manual_seed(5))
    b = compiled.octaves(2, 48, 40, torch.Generator().manual_seed(5))
    assert torch.allclose(a, b, atol=1e-6)
