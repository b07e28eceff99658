"""Multi-octave simplex noise in torch (Section 2.2, Appendix C), and Gaussian noise for the DDPM baselines.

``SimplexNoise`` is OpenSimplex 2D — the algorithm of the ``opensimplex`` package (KdotJPG's OpenSimplex), with
its seeded permutation, gradients and normalisation — evaluated for whole batches of fields on any torch device.
The reference code walks a decision tree to pick, for each point, 4 of the 8 lattice vertices around its
rhombus super-cell; every vertex it skips has a non-positive attenuation ``2 − dx² − dy²``, so summing the
clamped kernel over all 8 candidates gives the same value (``Testing/test_noise.py`` checks this against
``opensimplex.noise2array`` to 1e-4) without per-point branches.

A field of the multi-octave noise (AnoDDPM's recipe) is

    ε(x, y) = Σ_{o=0}^{N−1} γ^o · simplex(ν 2^o x + a_o, ν 2^o y + b_o)          (ν = 2⁻⁶, N = 6, γ = 0.8)

with a random lattice offset (a_o, b_o) per octave and per field, drawn from a torch generator: one seed gives the
same fields on the same device. We use 2D noise with random offsets where AnoDDPM takes 2D slices of 3D noise; both
are stationary coherent fields, and 2D needs 8 lattice vertices per point instead of 26. The raw 2D sum has
std ≈ 0.60 (``RAW_OCTAVE_STD``; AnoDDPM's 3D slices ≈ 0.5); with ``normalise`` (our default, recorded in the
checkpoint) it is divided by that std so that ε has unit variance like the Gaussian ε of DDPM.
"""

from __future__ import annotations

import torch

from .config import NoiseConfig
from .progress import log

# Constants of OpenSimplex 2D (opensimplex/constants.py).
STRETCH_CONSTANT2 = -0.211324865405187  # (1/sqrt(2+1) - 1) / 2
SQUISH_CONSTANT2 = 0.366025403784439  # (sqrt(2+1) - 1) / 2
NORM_CONSTANT2 = 47.0
GRADIENTS2 = (5, 2, 2, 5, -5, 2, -2, 5, 5, -2, 2, -5, -5, -2, -2, -5)
# Lattice vertices (relative to the rhombus origin) that the reference algorithm chooses from.
VERTICES2 = ((0, 0), (1, 0), (0, 1), (1, 1), (-1, 1), (1, -1), (2, 0), (0, 2))

# Std (root mean square; the mean is 0) of the raw 6-octave sum at ν = 2⁻⁶, γ = 0.8: 0.5978 and 0.5959 over
# 512 fields of 64² for two seeds (Testing/test_noise.py re-measures it). Used when NoiseConfig.normalise is on and
# the octave settings are the paper's; other settings estimate it on the fly.
RAW_OCTAVE_STD = 0.597

# Offsets are drawn in [0, OFFSET_RANGE): the noise repeats every 256 lattice cells, so this covers its variety
# while keeping coordinates small enough for float32.
OFFSET_RANGE = 256.0


def opensimplex_permutation(seed: int) -> list[int]:
    """The permutation table of ``opensimplex`` for ``seed`` (its 64-bit LCG shuffle, ported exactly)."""

    def wrap64(v: int) -> int:  # C int64 overflow
        return (v + 2**63) % 2**64 - 2**63

    lcg_a, lcg_c = 6364136223846793005, 1442695040888963407
    s = int(seed)
    for _ in range(3):
        s = wrap64(s * lcg_a + lcg_c)
    source = list(range(256))
    perm = [0] * 256
    for i in range(255, -1, -1):
        s = wrap64(s * lcg_a + lcg_c)
        r = (s + 31) % (i + 1)  # Python's % is already non-negative here
        perm[i] = source[r]
        source[r] = source[i]
    return perm


def simplex2(x: torch.Tensor, y: torch.Tensor, grad_x: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
    """OpenSimplex 2D at points (x, y) of one shape, with the gradient tables of a seed (see SimplexNoise)."""
    # Place the point on the stretched grid and find its rhombus super-cell origin.
    stretch = (x + y) * STRETCH_CONSTANT2
    xsb = torch.floor(x + stretch)
    ysb = torch.floor(y + stretch)
    squish = (xsb + ysb) * SQUISH_CONSTANT2
    dx0 = x - (xsb + squish)
    dy0 = y - (ysb + squish)
    xsb = xsb.long()
    ysb = ysb.long()
    value = torch.zeros_like(x)
    for i, j in VERTICES2:
        dx = dx0 - (i + (i + j) * SQUISH_CONSTANT2)
        dy = dy0 - (j + (i + j) * SQUISH_CONSTANT2)
        attn = (2.0 - dx * dx - dy * dy).clamp_min(0.0)
        attn = attn * attn
        flat = ((xsb + i) & 0xFF) * 256 + ((ysb + j) & 0xFF)
        value = value + attn * attn * (grad_x[flat] * dx + grad_y[flat] * dy)
    return value / NORM_CONSTANT2


def _compiled_or_eager(fn):
    """``torch.compile(fn)``, falling back to ``fn`` for good (with one note on stderr) if compiling fails."""

    state = {"fn": None}

    def call(*args):
        if state["fn"] is None:
            try:
                state["fn"] = torch.compile(fn, dynamic=False)
            except Exception as exc:  # torch.compile unavailable on this platform
                log.info(f"note: simplex noise runs eagerly (torch.compile unavailable: {type(exc).__name__})")
                state["fn"] = fn
        if state["fn"] is fn:
            return fn(*args)
        try:
            return state["fn"](*args)
        except Exception as exc:  # e.g. no C++ compiler for inductor's CPU code
            log.info(f"note: simplex noise runs eagerly (compiling failed: {type(exc).__name__})")
            state["fn"] = fn
            return fn(*args)

    return call


class SimplexNoise:
    """OpenSimplex 2D for tensors. ``noise2(x, y)`` equals ``opensimplex.noise2`` for the same seed."""

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        perm = torch.tensor(opensimplex_permutation(self.seed), dtype=torch.long)
        # Gradient of every lattice vertex (xsb & 255, ysb & 255), as the reference's
        # index = perm[(perm[xsb & 0xFF] + ysb) & 0xFF] & 0x0E, flattened to one gather per component.
        a = torch.arange(256).view(256, 1)
        b = torch.arange(256).view(1, 256)
        index = perm[(perm[a] + b) & 0xFF] & 0x0E
        grads = torch.tensor(GRADIENTS2, dtype=torch.float64)
        self._grad_x = grads[index].flatten()
        self._grad_y = grads[index + 1].flatten()
        self._on_device: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def _tables(self, device, dtype):
        key = (str(device), dtype)
        if key not in self._on_device:
            self._on_device[key] = (self._grad_x.to(device, dtype), self._grad_y.to(device, dtype))
        return self._on_device[key]

    def noise2(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Noise at points (x, y) (broadcast together), in [−1, 1]; same dtype/device as the inputs."""
        x, y = torch.broadcast_tensors(x, y)
        grad_x, grad_y = self._tables(x.device, x.dtype)
        return self._kernel(x, y, grad_x, grad_y)

    _kernel = staticmethod(lambda x, y, grad_x, grad_y: simplex2(x, y, grad_x, grad_y))

    def compile(self) -> "SimplexNoise":
        """Use ``torch.compile`` for the per-point work (one fused loop instead of ~150 passes over the field:
        ≈ 8× faster on one CPU core at 512², bit-identical here). Compiles once per field shape (seconds), so it
        pays off where many fields of one shape are drawn (training, long detections). Falls back to eager, with
        one note, where compilation is unavailable (e.g. no C++ compiler)."""
        self._kernel = _compiled_or_eager(simplex2)
        return self

    def noise2array(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Like ``opensimplex.noise2array``: a (len(y), len(x)) grid."""
        return self.noise2(x.view(1, -1), y.view(-1, 1))

    def octaves(
        self,
        n: int,
        height: int,
        width: int,
        generator: torch.Generator,
        octaves: int = 6,
        persistence: float = 0.8,
        base_frequency: float = 2.0**-6,
        device=None,
        dtype=torch.float32,
    ) -> torch.Tensor:
        """``n`` independent multi-octave fields, shape (n, height, width), raw (not normalised)."""
        device = torch.device(device) if device is not None else generator.device
        offsets = torch.rand((octaves, 2, n, 1, 1), generator=generator, device=generator.device)
        offsets = (offsets * OFFSET_RANGE).to(device, dtype)
        ys = torch.arange(height, device=device, dtype=dtype).view(1, height, 1)
        xs = torch.arange(width, device=device, dtype=dtype).view(1, 1, width)
        field = torch.zeros((n, height, width), device=device, dtype=dtype)
        amplitude = 1.0
        for o in range(octaves):
            frequency = base_frequency * 2.0**o
            field += amplitude * self.noise2(xs * frequency + offsets[o, 0], ys * frequency + offsets[o, 1])
            amplitude *= persistence
        return field


class NoiseSampler:
    """Draws ε for the forward and reverse process from the family in ``NoiseConfig``: (n, channels, H, W) tensors,
    every channel its own field (a 2.5D model's neighbouring slices are noised jointly but independently)."""

    def __init__(self, cfg: NoiseConfig, seed: int = 0):
        self.cfg = cfg
        self.simplex = SimplexNoise(seed) if cfg.kind == "simplex" else None

    @property
    def scale(self) -> float:
        """Divisor that makes the octave sum unit-variance (1 when not normalising)."""
        if not self.cfg.normalise or self.cfg.kind != "simplex":
            return 1.0
        return raw_octave_std(self.cfg)

    def __call__(self, n, height, width, generator, device=None, dtype=torch.float32, channels: int = 1):
        device = torch.device(device) if device is not None else generator.device
        if self.simplex is None:
            return torch.randn((n, channels, height, width), generator=generator,
                               device=generator.device).to(device, dtype)
        cfg = self.cfg
        field = self.simplex.octaves(
            n * channels, height, width, generator, cfg.octaves, cfg.persistence, cfg.base_frequency, device, dtype
        )
        return (field / self.scale).view(n, channels, height, width)


def raw_octave_std(cfg: NoiseConfig) -> float:
    """Std of the raw octave sum: the measured constant at the paper's settings, else estimated on the fly
    from 256 fields of 64² with a fixed seed (deterministic)."""
    if (cfg.octaves, cfg.persistence, cfg.base_frequency) == (6, 0.8, 2.0**-6):
        return RAW_OCTAVE_STD
    gen = torch.Generator().manual_seed(12345)
    field = SimplexNoise(0).octaves(256, 64, 64, gen, cfg.octaves, cfg.persistence, cfg.base_frequency)
    return float(field.pow(2).mean().sqrt())
