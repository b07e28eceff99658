"""One configuration builds the model and the diffusion, in training and in detection alike.

Every field here is stored in the checkpoint (``checkpoint.py``); a checkpoint whose fields do not match these
dataclasses is refused. Presets:

- ``paper``: the structure of Fig. 2 (7 down / 7 up modules of 3 residual blocks, a 2-block bottleneck) at the
  paper's 512² slices, T = 1000, T_s = 550, K = 7, λ = 1.
- ``fast``: the same method with a lighter network at 256² (for CPU use and small GPUs).
- ``small``: a 128² network that trains on 2 CPU cores in about an hour; the first reference model.
- ``small256``: the ``small`` network at 256² (native resolution of 256² CTs), trained on t ≤ 350 only, with a
  held-out validation slab; trains on one CPU core in about two hours.
- ``small256-context``: ``small256`` in 2.5D — the slices 4 mm above and below are extra, jointly noised image
  channels (``ModelConfig.context_slices``); warm-started from a ``small256`` checkpoint (``--init``).
- ``demo``: a small network at 64² that trains on 2 CPU cores in minutes (``sacdiff demo``).
- ``tiny``: a few channels at 32², for tests only.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, get_args, get_origin, get_type_hints

from .errors import SACDiffError

# The choices of every string setting: one home, read by ``validate`` and by the command line's ``choices=``.
NoiseKind = Literal["simplex", "gaussian"]  # AnoDDPM / SAC-Diff simplex, or the DDPM baselines' Gaussian
Schedule = Literal["linear", "cosine"]
Sigma = Literal["posterior", "beta"]
ThresholdMode = Literal["adaptive", "fixed"]
ErrorMode = Literal["mean-of-errors", "error-of-mean", "min-of-errors"]
BackgroundRegion = Literal["body", "lung-shell", "lung"]  # where α's background statistics come from (postprocess)
ResidualSign = Literal["both", "hyperdense"]  # which sign of x − x̂ counts in E (detect.error_maps)
Precision = Literal["auto", "fp32", "bf16"]  # the network's arithmetic at detection (detect.network_dtype)


def choices(kind) -> tuple[str, ...]:
    """The allowed values of a ``Literal`` choice type, e.g. ``choices(ThresholdMode)``."""
    return get_args(kind)


@dataclass(frozen=True)
class ModelConfig:
    """Conditional residual UNet (Fig. 2). ``channels[i]`` is the width at resolution level i; the network has
    ``len(channels) - 1`` downsampling and as many upsampling modules."""

    channels: tuple[int, ...] = (32, 64, 64, 128, 128, 256, 256, 512)
    blocks_per_module: int = 3  # residual blocks in every down/up module (Fig. 2: 3)
    bottleneck_blocks: int = 2  # residual blocks in the bottleneck (Fig. 2: 2)
    conditional: bool = True  # early fusion [x_t ⊕ c] (Section 2.3); False = unconditional ablation baseline
    dropout: float = 0.0
    groups: int = 8  # GroupNorm groups (must divide every width)
    time_embed_dim: int = 0  # 0 = 4 × channels[0]
    # 2.5D (the paper's future work, issue 20): ``context_slices`` neighbouring slices on each side at multiples of
    # ``context_mm`` (at least one slice apart) are extra image channels, noised jointly with the slice — each
    # with its own field — and denoised with it (ε̂ for every channel); 0 = the 2D model of Fig. 2.
    context_slices: int = 0
    context_mm: float = 4.0

    @property
    def image_channels(self) -> int:
        """Channels of x₀, x_t and ε: the slice, then its neighbours (−d, +d, −2d, +2d, …)."""
        return 1 + 2 * self.context_slices

    @property
    def in_channels(self) -> int:
        return self.image_channels + (1 if self.conditional else 0)  # [x_t ⊕ c]: the slice's lung mask

    @property
    def size_multiple(self) -> int:
        """Input height/width must be a multiple of this (one halving per downsampling module)."""
        return 2 ** (len(self.channels) - 1)


@dataclass(frozen=True)
class NoiseConfig:
    """Noise of the forward and reverse process (Section 2.2, Appendix C)."""

    kind: NoiseKind = "simplex"  # "simplex" (AnoDDPM / SAC-Diff) or "gaussian" (DDPM baselines)
    octaves: int = 6  # N
    persistence: float = 0.8  # γ: amplitude ratio between successive octaves
    base_frequency: float = 2.0**-6  # ν: cycles per pixel of the first octave; each octave doubles it
    # Raw AnoDDPM octave sums have std ≈ 0.5 at the settings above. We divide by the measured std so that ε has
    # unit variance as the DDPM derivation assumes (x_T keeps unit variance). Stored in the checkpoint so that
    # detection uses exactly the convention the model was trained with.
    normalise: bool = True


@dataclass(frozen=True)
class DiffusionConfig:
    timesteps: int = 1000  # T_training
    schedule: Schedule = "linear"  # "linear" (DDPM, β from beta_start to beta_end) or "cosine" (Nichol & Dhariwal)
    beta_start: float = 1e-4
    beta_end: float = 0.02
    # σ_t² of the reverse step: "posterior" = β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t) (DDPM "fixed small", as
    # AnoDDPM), or "beta" = β_t ("fixed large").
    sigma: Sigma = "posterior"
    noise: NoiseConfig = field(default_factory=NoiseConfig)


@dataclass(frozen=True)
class PreprocessConfig:
    """How a CT becomes model input. Chest/lung window W = 1500, L = −600, i.e. [−1350, 150] HU → [−1, 1]:
    covers air, lung parenchyma, ground glass and consolidation (soft tissue up to +150 HU); bone saturates."""

    hu_min: float = -1350.0
    hu_max: float = 150.0
    image_size: int = 512  # slices are resampled in-plane to image_size × image_size (whole field of view)
    min_lung_fraction: float = 0.005  # a slice is a lung slice when ≥ this fraction of its pixels are lung


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 4
    steps: int = 100_000
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    augment: bool = True  # small rotations/scales and intensity jitter (few training volumes)
    mixed_precision: bool = True  # bf16 autocast on CUDA; ignored on CPU
    seed: int = 0
    save_every: int = 1000
    # Highest timestep drawn in training (0 = T). Detection only ever runs t ≤ T_s, so a model meant for
    # T_s ≤ max_timestep spends all its capacity there; detection refuses a larger T_s (validate()).
    max_timestep: int = 0
    # Validation hold-out: the lung slices of every training case are cut into slabs of HOLDOUT_SLAB consecutive
    # slices and every ``holdout_every``-th slab is kept out of training (0 = train on everything). The held-out
    # slices are listed in the checkpoint; `sacdiff validate` scores the model on them without any lesion label.
    holdout_every: int = 0
    # Share of each batch's slices given as an 8-bit lung-window JPEG would give them back
    # (``validate.eight_bit_slice``, the pictures of MedSeg-like datasets): the model learns that such a picture's
    # quantisation and clipping are healthy, where a model trained on HU alone reconstructs them as error. 0 = off.
    eight_bit_fraction: float = 0.0


@dataclass(frozen=True)
class DetectConfig:
    steps: int = 550  # T_sampling (Section 3.2)
    ensemble: int = 7  # K (Section 2.5); 1 = "SAC-Diff w/o Ensemble"
    lam: float = 1.0  # λ of the background-adaptive threshold (1 for COVID, −0.25 for ILD in the paper)
    threshold: ThresholdMode = "adaptive"  # "adaptive" (Section 2.4) or "fixed" (ablation rows without it)
    fixed_threshold: float = 0.05  # α when threshold == "fixed" (error units of the [−1, 1] image, squared)
    # The background E[c < 1] of α (Section 2.4): "body" = the body outside the lung (the paper's), "lung-shell" =
    # the body outside the lung within postprocess.SHELL_MM of it, which every chest image holds, cropped or not;
    # "lung" = the lung itself (robust statistics: they hold while less than half of the processed lung is abnormal)
    background: BackgroundRegion = "body"
    # E = mean_k (x − x̂₀ᵏ)²; or "error-of-mean": (x − mean_k x̂₀ᵏ)²; or "min-of-errors": min_k (x − x̂₀ᵏ)²
    error: ErrorMode = "mean-of-errors"
    crf: bool = True
    crf_iterations: int = 5
    morphology_radius: int = 1  # in-plane radius (pixels) of the erosion-then-dilation
    seed: int = 0
    batch_size: int = 0  # slices per forward chunk (× K members); 0 = automatic (all that fit in memory)
    # Respaced reverse chain (guided-diffusion's respace): 0 = every step T_s, T_s − 1, …, 1; n > 0 = n evenly
    # spaced steps from T_s to 1 with β recomputed from ᾱ at the kept steps. Fewer network evaluations.
    sampling_steps: int = 0
    crop_to_lung: bool = True  # run the UNet on the body's bounding box of the model grid only (+ margin of air)
    exclude_airways: bool = True  # trachea and main bronchi out of the lung mask, a given mask too (lung.airway_tree)
    # Harmonised reverse (THOR-style, ``Diffusion.partial_chain``): at the first n reverse steps x̂₀ is blended with
    # the query inside the lung where their residual is small, and re-noised. 0 = the paper's plain Alg. 2.
    harmonise_steps: int = 0
    # Radius (model-grid pixels) of the box filter applied to |x̂₀ − x| before the blend weight: thin structures
    # (vessels) that a deep step blurs weigh less than a lesion of the same contrast but larger size.
    harmonise_radius: int = 1
    # Shift tolerance of the error map (pixels of the model grid): a query pixel that lies between the min and max
    # of a reconstruction within this radius has no error (a vessel drawn one pixel off is not an anomaly). 0 = off.
    shift_tolerance: int = 0
    # Radius (model-grid pixels) of the box mean taken of the SIGNED residual x − x̂ before it is squared: a vessel
    # the reconstruction only blurred or shifted keeps its mass and averages out, a lesion it removed does not;
    # hyper- and hypodense residuals keep their sign until squared (neither is dropped). 0 = the paper's E.
    error_radius: int = 0
    # Inside the lung, E · (1 − w) with w from the query's 3D Frangi vesselness (``vessels.suppress_vessels``):
    # healthy vessels the reconstruction redrew a little off carry no E, blobs (nodules, masses) keep theirs.
    vessel_suppression: bool = False
    # Which residuals count in E: "both" (the paper's squared error) or "hyperdense", only x brighter than its
    # reconstruction (tissue the reconstruction removed: a mass; a vessel a deep chain invents is darker in x and
    # drops out). Hypodense disease (emphysema, cysts) is then not in this map: an experiment for combining depths.
    residual_sign: ResidualSign = "both"
    # The network's arithmetic (``detect.network_dtype``): "auto" = bf16 autocast on CUDA and on a CPU with AMX,
    # float32 on other CPUs; "bf16" and "fp32" force one. The rest of the chain (noise, updates, E) stays float32.
    precision: Precision = "auto"
    # A second, deeper reverse chain (round 24 of Resources/results/map-candidates.md): from T_s = deep_steps (0 = off)
    # with deep_sampling_steps respaced steps (0 = all), the same K, seed and noise fields, its residual averaged over
    # deep_error_radius pixels; its map is opened by a ball of deep_opening_mm (3D, in mm: a removed mass keeps its
    # error, a vessel thinner than the ball that the deep chain blurred or invented loses it) and E is the voxel-wise
    # maximum of the two maps — both squared residuals of the same image, so one unit. Uncertainty and the
    # pseudo-healthy image stay the first chain's.
    deep_steps: int = 0
    deep_sampling_steps: int = 0
    deep_error_radius: int = 0
    deep_opening_mm: float = 0.0


@dataclass(frozen=True)
class DetectOption:
    """One detection setting as a command line offers it: the ``DetectConfig`` field, its flag, help and fixed
    range (``low``/``high``, None = open; ``why`` ends the out-of-range message). The type, the choices (a
    ``Literal``) and the on/off form (a bool: ``--x/--no-x``) come from the field's annotation; ranges that depend on
    other settings are checked in ``_validate_detect``. Every command that detects builds its options from
    ``DETECT_OPTIONS``, ``detect_overrides`` turns the parsed values back into ``derive(cfg, detect=…)`` and
    ``detect_arguments`` the settings into flags (the Slicer module): a new detection setting is its field, one entry
    here, and — so that older checkpoints load — its ``_ADDED_LATER`` value."""

    field: str
    flag: str
    help: str
    low: Optional[float] = None
    high: Optional[float] = None
    why: str = ""


# In the order the commands list them (``cli._add_detect_options`` puts the command-only options around them: the
# noise family after "error", the lung-mask and output options before "batch_size"). A new option goes here.
DETECT_OPTIONS = (
    DetectOption("steps", "--steps", "T_s, partial-diffusion depth (default: the model's, paper 550)", 1, None,
                 " (T_s, the partial-diffusion depth)"),
    DetectOption("ensemble", "--ensemble", "K reconstructions (default: the model's, paper 7)", 1, 64,
                 " (each member costs a full reverse chain)"),
    DetectOption("lam", "--lambda", "λ of the background-adaptive threshold (default: the model's)", -100.0, 1000.0),
    DetectOption("threshold", "--threshold", "adaptive (Section 2.4) or fixed α"),
    DetectOption("fixed_threshold", "--fixed-threshold", "α for --threshold fixed", 0.0, 4.0,
                 " (E is a squared error of images in [−1, 1])"),
    DetectOption("background", "--background",
                 "where α's background statistics come from: body (the body outside the lung, Section 2.4) or "
                 "lung-shell (the body outside the lung within 5 mm of it: the same on images cut to the lungs) or "
                 "lung (the lung itself; default: the model's)"),
    DetectOption("error", "--error", "how members form E"),
    DetectOption("crf", "--crf", "dense CRF refinement (default on)"),
    DetectOption("seed", "--seed", "noise seed (default 0); same seed, same result", 0, 2**63 - 1),
    DetectOption("sampling_steps", "--sampling-steps",
                 "respaced reverse steps from T_s to 0 (0 = all T_s steps; default: the model's)"),
    DetectOption("harmonise_steps", "--harmonise-steps",
                 "harmonised reverse chain: at the first N reverse steps, blend the predicted healthy image with the "
                 "query where they agree inside the lung and re-noise (THOR-style; 0 = the paper's plain chain; "
                 "default: the model's)"),
    DetectOption("harmonise_radius", "--harmonise-radius",
                 "pixels over which the residual is averaged before the harmonisation weight (default: the model's, "
                 "1)", 0, 16),
    DetectOption("shift_tolerance", "--shift-tolerance",
                 "pixels of shift the error map forgives (0 = none; default: the model's)", 0, 4),
    DetectOption("error_radius", "--error-radius",
                 "pixels over which the signed residual is averaged before squaring: a vessel the reconstruction "
                 "blurred or shifted averages out, a removed lesion does not (0 = off; default: the model's)", 0, 8),
    DetectOption("vessel_suppression", "--vessel-suppression",
                 "inside the lung, lower E where the CT's 3D vesselness (Frangi) is high: healthy vessels the "
                 "reconstruction redrew a little off are not flagged, round lesions are (default: the model's, off)"),
    DetectOption("residual_sign", "--residual-sign",
                 "which residuals make E: both (default) or hyperdense (only the query brighter than its "
                 "reconstruction: hypodense disease drops out of this map; experimental)"),
    DetectOption("precision", "--precision",
                 "the network's arithmetic: auto (bf16 on CUDA and on a CPU with AMX, where it is ≈ 2× faster; "
                 "float32 on other CPUs), fp32, or bf16 (emulated and slower on a CPU without AMX; default: the "
                 "model's)"),
    DetectOption("deep_steps", "--deep-steps",
                 "T_s of a second, deeper chain whose opened map joins E by the voxel-wise maximum: solid lesions "
                 "the shallow chain redraws as vessels (0 = off; default: the model's)", 0, None,
                 " (0 = no deep chain)"),
    DetectOption("deep_sampling_steps", "--deep-sampling-steps",
                 "respaced reverse steps of the deep chain (0 = all; default: the model's)"),
    DetectOption("deep_error_radius", "--deep-error-radius",
                 "as --error-radius, for the deep chain's map (default: the model's)", 0, 8),
    DetectOption("deep_opening_mm", "--deep-opening",
                 "diameter (mm) of the ball that opens the deep chain's map: error survives where such a ball fits "
                 "(0 = no opening; default: the model's)", 0.0, 100.0),
    DetectOption("crop_to_lung", "--crop", "run the network on the body's bounding box only (default on)"),
    DetectOption("exclude_airways", "--exclude-airways",
                 "take the trachea and main bronchi out of the lung mask, the given one too (default on: air in a "
                 "large airway is not lung and lights up in E)"),
    DetectOption("batch_size", "--batch-size", "slices per forward chunk (× K); 0 = automatic from memory", 0, None,
                 " (0 = automatic)"),
)


# Named detection settings asked for on top of the model's own (``--profile``; explicit options still win). Each was
# chosen by a declared rule in Resources/results/map-candidates.md and is measured there.
DETECT_PROFILES = {
    # Rounds 24–25: a second chain from T_s 250 (5 respaced steps, error radius 2) whose map, opened by a 6 mm ball,
    # joins E by the maximum; α from the 5 mm shell at λ 16 (round 28: the shell's λ* on round 25's rows — α from the
    # lung, which scored higher there, rises with disease that fills the lung and hides it, round 27; round 29: the
    # same λ* on the shipped weights). It finds a solid tumour the default redraws as a vessel (nsclc_lung1 Dice 0.39,
    # oracle 0.84, against 0.08 / 0.20) but flags hilar soft tissue (ctmd_P001 slice AUROC 0.88 against 0.97) and
    # less diffuse infection (MedSeg pooled Dice 0.16 against 0.35); 45 network evaluations per slice instead of 30.
    "solid-lesions": {"lam": 16.0, "background": "lung-shell", "deep_steps": 250, "deep_sampling_steps": 5,
                      "deep_error_radius": 2, "deep_opening_mm": 6.0},
}


def detect_option_type(option: DetectOption):
    """The field's annotation: int, float, bool or a Literal of choices."""
    return get_type_hints(DetectConfig)[option.field]


def detect_overrides(values) -> dict:
    """``derive(cfg, detect=…)`` from parsed options (an argparse namespace or a dict keyed by field; None = keep the
    model's own setting)."""
    get = values.get if isinstance(values, dict) else lambda name: getattr(values, name, None)
    return {o.field: get(o.field) for o in DETECT_OPTIONS if get(o.field) is not None}


def detect_arguments(settings: dict) -> list[str]:
    """The command-line arguments that ask a detecting command for these settings (DetectConfig field → value, in
    the order given): the inverse of ``detect_overrides``, for front ends that start `sacdiff detect` (the Slicer
    module). A bool becomes ``--x`` / ``--no-x``; a float keeps every digit (``repr``)."""
    options = {o.field: o for o in DETECT_OPTIONS}
    arguments = []
    for name, value in settings.items():
        option = options.get(name)
        if option is None:
            raise SACDiffError(f"{name!r} is not a detection option; choose one of: {', '.join(options)}")
        if detect_option_type(option) is bool:
            arguments.append(option.flag if value else "--no-" + option.flag[2:])
        else:
            arguments += [option.flag, repr(float(value)) if isinstance(value, float) else str(value)]
    return arguments


@dataclass(frozen=True)
class SACDiffConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    detect: DetectConfig = field(default_factory=DetectConfig)


# Each preset: the preset it starts from (None: the paper's defaults above) and the settings it changes.
_PRESETS = {
    "paper": (None, {}),
    "fast": ("paper", {"model": {"channels": (32, 32, 64, 64, 128, 128, 256), "blocks_per_module": 2},
                       "preprocess": {"image_size": 256}, "detect": {"steps": 250, "ensemble": 3}}),
    # the first shipped reference model (128²): trains on CPU, detects in minutes
    "small": ("paper", {"model": {"channels": (16, 32, 64, 64, 128), "blocks_per_module": 2, "bottleneck_blocks": 1},
                        "preprocess": {"image_size": 128},
                        "detect": {"steps": 250, "ensemble": 3, "sampling_steps": 25},
                        "train": {"batch_size": 12, "steps": 5000, "lr": 5e-4, "warmup_steps": 100,
                                  "ema_decay": 0.995, "save_every": 250}}),
    # native resolution of 256² CTs (≈ 1.3–1.9 mm pixels), trained on t ≤ 350 with a hold-out; the shipped model
    "small256": ("small", {"preprocess": {"image_size": 256}, "detect": {"steps": 150, "sampling_steps": 10},
                           "train": {"batch_size": 4, "steps": 4000, "lr": 3e-4, "ema_decay": 0.998, "save_every": 200,
                                     "max_timestep": 350, "holdout_every": 5}}),
    # small256 in 2.5D: the slices 4 mm above and below as jointly noised channels (warm start from small256)
    "small256-context": ("small256", {"model": {"context_slices": 1, "context_mm": 4.0},
                                      "detect": {"steps": 100, "lam": 12.0}}),
    # small enough to train on 2 CPU cores in a couple of minutes (sacdiff demo --train-steps)
    "demo": ("paper", {"model": {"channels": (16, 32, 64, 64), "blocks_per_module": 1, "bottleneck_blocks": 1},
                       "preprocess": {"image_size": 64}, "detect": {"steps": 250, "ensemble": 3},
                       "train": {"batch_size": 16, "steps": 1500, "lr": 1e-3, "warmup_steps": 50, "ema_decay": 0.99,
                                 "save_every": 0}}),
    # tests
    "tiny": ("paper", {"model": {"channels": (8, 16, 16), "blocks_per_module": 1, "bottleneck_blocks": 1,
                                 "groups": 4},
                       "preprocess": {"image_size": 32}, "diffusion": {"timesteps": 100},
                       "detect": {"steps": 10, "ensemble": 2}, "train": {"batch_size": 4, "steps": 20, "save_every": 10}}),
}
PRESETS = tuple(_PRESETS)


def preset(name: str) -> SACDiffConfig:
    """The named preset: one of ``PRESETS`` (see the module docstring), a new validated config each call."""
    if name not in _PRESETS:
        raise SACDiffError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    base, changes = _PRESETS[name]
    cfg = SACDiffConfig() if base is None else preset(base)
    return derive(cfg, **changes) if changes else cfg


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples become lists) that torch.save(weights_only) and JSON both accept."""
    return dataclasses.asdict(cfg)


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise SACDiffError(f"config section {where!r} is not a mapping; the checkpoint is not a SACDiff checkpoint")
    known = {f.name: f for f in dataclasses.fields(cls)}
    data = {**{name: default for (c, name), default in _ADDED_LATER.items() if c is cls and name not in data}, **data}
    unknown = sorted(set(data) - set(known))
    missing = sorted(set(known) - set(data))
    if unknown or missing:
        raise SACDiffError(
            f"config section {where!r} does not match this version of SACDiff "
            f"(unknown fields: {unknown or 'none'}; missing fields: {missing or 'none'}); "
            "use the SACDiff version that wrote it or retrain the model"
        )
    kwargs = {}
    for name, f in known.items():
        value = data[name]
        sub = _SECTIONS.get((cls, name))
        if sub is not None:
            value = _build(sub, value, f"{where}.{name}")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


_ADDED_LATER = {  # fields added after checkpoint format 1: (section, name) → the value that reproduces older files
    (ModelConfig, "context_slices"): 0,  # 2D
    (ModelConfig, "context_mm"): 4.0,
    (TrainConfig, "max_timestep"): 0,
    (TrainConfig, "holdout_every"): 0,
    (TrainConfig, "eight_bit_fraction"): 0.0,
    (DetectConfig, "exclude_airways"): True,  # a detection default, not a training fact: the better one for all
    (DetectConfig, "harmonise_steps"): 0,  # the plain reverse chain of Alg. 2
    (DetectConfig, "harmonise_radius"): 1,
    (DetectConfig, "shift_tolerance"): 0,
    (DetectConfig, "error_radius"): 0,
    (DetectConfig, "background"): "body",  # Section 2.4's region
    (DetectConfig, "vessel_suppression"): False,  # the paper's E
    (DetectConfig, "residual_sign"): "both",  # the paper's E
    (DetectConfig, "precision"): "auto",  # bf16 where the hardware has it (what CUDA detections always ran)
    (DetectConfig, "deep_steps"): 0,  # one chain, the paper's
    (DetectConfig, "deep_sampling_steps"): 0,
    (DetectConfig, "deep_error_radius"): 0,
    (DetectConfig, "deep_opening_mm"): 0.0,
}

_SECTIONS = {
    (SACDiffConfig, "model"): ModelConfig,
    (SACDiffConfig, "diffusion"): DiffusionConfig,
    (SACDiffConfig, "preprocess"): PreprocessConfig,
    (SACDiffConfig, "train"): TrainConfig,
    (SACDiffConfig, "detect"): DetectConfig,
    (DiffusionConfig, "noise"): NoiseConfig,
}


def from_dict(data: dict) -> SACDiffConfig:
    """Inverse of :func:`to_dict`; refuses unknown or missing fields with a message naming them."""
    cfg = _build(SACDiffConfig, data, "config")
    validate(cfg)
    return cfg


def _non_finite(section, where: str) -> list[str]:
    """Names of the float fields (recursively) that hold NaN or infinity."""
    bad = []
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            bad += _non_finite(value, f"{where}.{f.name}")
        elif isinstance(value, float) and not math.isfinite(value):
            bad.append(f"{where}.{f.name} = {value}")
    return bad


def _check_finite(section, where: str) -> None:
    bad = _non_finite(section, where)
    if bad:
        raise SACDiffError(f"non-finite setting(s): {', '.join(bad)}; every number must be finite")


def _type_error(value, hint) -> Optional[str]:
    """What is wrong with ``value`` as a ``hint`` (bool, int, float, str, Literal, tuple[int, ...]), or None."""
    origin = get_origin(hint)
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "a whole number"
    if hint is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if hint is str or origin is Literal:
        return None if isinstance(value, str) else "a word"
    if origin is tuple:
        inner = get_args(hint)[0]
        if not isinstance(value, tuple) or not value:
            return "a list of numbers"
        return next((_type_error(v, inner) for v in value if _type_error(v, inner)), None)
    return None


def _check_types(section, where: str) -> None:
    """Every field of ``section`` (recursively) holds a value of its declared type: a checkpoint or a run folder
    that says ``"crf": "yes"`` or ``steps: 10.5`` is refused here, before any number is used."""
    hints = get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value = getattr(section, f.name)
        if dataclasses.is_dataclass(value):
            _check_types(value, f"{where}.{f.name}")
            continue
        problem = _type_error(value, hints[f.name])
        if problem:
            raise SACDiffError(f"setting {where}.{f.name} = {value!r} must be {problem}; the checkpoint or run was "
                               "edited or written by another program — use one written by SACDiff")


def _check_range(name: str, value, lo=None, hi=None, what: str = "") -> None:
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        span = f"≥ {lo}" if hi is None else f"≤ {hi}" if lo is None else f"in {lo}..{hi}"
        raise SACDiffError(f"{name} = {value} is out of range: it must be {span}{what}")


def derive(cfg: SACDiffConfig, **sections: dict) -> SACDiffConfig:
    """``cfg`` with options applied — the one way a preset or a checkpoint's config meets a command's options, e.g.
    ``derive(cfg, detect={"steps": 150, "lam": None}, diffusion={"noise": {"kind": "gaussian"}})``. A None value keeps
    the setting; an unknown section or name is an error; the result is a new, validated config (``cfg`` unchanged)."""

    def replace(section, values: dict, where: str):
        known = {f.name for f in dataclasses.fields(section)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SACDiffError(f"unknown setting(s) {', '.join(where + '.' + u for u in unknown)}")
        changes = {}
        for name, value in values.items():
            if value is None:
                continue
            current = getattr(section, name)
            changes[name] = (replace(current, value, f"{where}.{name}")
                             if dataclasses.is_dataclass(current) and isinstance(value, dict) else value)
        return dataclasses.replace(section, **changes)

    unknown = sorted(set(sections) - {f.name for f in dataclasses.fields(cfg)})
    if unknown:
        raise SACDiffError(f"unknown config section(s) {', '.join(unknown)}")
    out = replace(cfg, sections, "config")
    validate(out)
    return out


def detect_from_dict(data: dict) -> DetectConfig:
    """The detection settings of a finished run (its report's ``detect``), read as strictly as a checkpoint's
    config: unknown or missing fields named, every value range-checked."""
    det = _build(DetectConfig, data, "detect")
    _check_types(det, "detect")
    _check_finite(det, "detect")
    _validate_detect(det)
    return det


def _check_choices(items) -> None:
    for name, value, kind in items:
        if value not in choices(kind):
            raise SACDiffError(f"{name} {value!r} unknown; choose one of: {', '.join(choices(kind))}")


def _validate_detect(det: DetectConfig) -> None:
    """The checks that need nothing but the detection settings (the rest need the model: ``validate``)."""
    for option in DETECT_OPTIONS:  # the fixed ranges
        if option.low is not None or option.high is not None:
            _check_range(f"detect.{option.field} ({option.flag})", getattr(det, option.field), option.low,
                         option.high, option.why)
    _check_range("detect.sampling_steps (--sampling-steps)", det.sampling_steps, 0, det.steps,
                 f" (0 = every one of the T_s = {det.steps} steps)")
    _check_range("detect.crf_iterations", det.crf_iterations, 0, 100)
    _check_range("detect.morphology_radius", det.morphology_radius, 0, 50)
    reverse_steps = det.sampling_steps if 0 < det.sampling_steps < det.steps else det.steps
    _check_range("detect.harmonise_steps (--harmonise-steps)", det.harmonise_steps, 0, reverse_steps - 1,
                 f" (the chain has {reverse_steps} reverse steps and the last one is never harmonised)")
    if 0 < det.deep_steps <= det.steps:
        raise SACDiffError(f"the deep chain's T_s {det.deep_steps} (--deep-steps) must exceed the first chain's "
                           f"{det.steps} (--steps); give a larger --deep-steps, or --deep-steps 0 for one chain")
    _check_range("detect.deep_sampling_steps (--deep-sampling-steps)", det.deep_sampling_steps, 0,
                 det.deep_steps, f" (0 = every one of the deep chain's T_s = {det.deep_steps} steps)")
    if det.threshold == "fixed" and det.fixed_threshold <= 0:
        raise SACDiffError(f"fixed threshold α = {det.fixed_threshold} must be > 0 (E is a squared error)")
    _check_choices((("detect.threshold", det.threshold, ThresholdMode), ("detect.error", det.error, ErrorMode),
                    ("detect.background", det.background, BackgroundRegion),
                    ("detect.residual_sign", det.residual_sign, ResidualSign),
                    ("detect.precision", det.precision, Precision)))


def validate(cfg: SACDiffConfig) -> None:
    """Every setting type- and range-checked in one place (config files, checkpoints and command-line options
    alike)."""
    _check_types(cfg, "config")
    _check_finite(cfg, "config")
    m, d, p, det, t = cfg.model, cfg.diffusion, cfg.preprocess, cfg.detect, cfg.train
    _validate_detect(det)
    _check_range("train.steps (--steps)", t.steps, 1, None)
    _check_range("train.batch_size (--batch-size)", t.batch_size, 1, None)
    if t.lr <= 0:
        raise SACDiffError(f"learning rate {t.lr} must be > 0")
    _check_range("train.ema_decay", t.ema_decay, 0.0, 0.99999)
    _check_range("train.warmup_steps", t.warmup_steps, 0, None)
    _check_range("train.max_timestep", t.max_timestep, 0, d.timesteps, " (0 = every timestep)")
    _check_range("train.holdout_every", t.holdout_every, 0, None)
    _check_range("train.eight_bit_fraction (--eight-bit)", t.eight_bit_fraction, 0.0, 1.0)
    _check_range("diffusion.timesteps", d.timesteps, 2, None)
    if not 0 < d.beta_start < d.beta_end < 1:
        raise SACDiffError(f"β schedule {d.beta_start}..{d.beta_end} must satisfy 0 < β_start < β_end < 1")
    _check_range("noise.octaves", d.noise.octaves, 1, 12)
    if d.noise.persistence <= 0 or d.noise.base_frequency <= 0:
        raise SACDiffError("noise persistence and base frequency must be > 0")
    _check_range("preprocess.image_size", p.image_size, 8, 4096)
    _check_range("preprocess.min_lung_fraction", p.min_lung_fraction, 0.0, 0.99)
    if len(m.channels) < 2:
        raise SACDiffError("model.channels needs at least two levels")
    if any(c % m.groups for c in m.channels):
        raise SACDiffError(f"every model width {m.channels} must be divisible by model.groups={m.groups}")
    if p.image_size % m.size_multiple:
        raise SACDiffError(
            f"image_size {p.image_size} must be a multiple of {m.size_multiple} "
            f"(2^{len(m.channels) - 1} for {len(m.channels) - 1} downsampling modules)"
        )
    _check_choices((("noise kind", d.noise.kind, NoiseKind), ("schedule", d.schedule, Schedule),
                    ("sigma", d.sigma, Sigma)))
    if not 1 <= det.steps <= d.timesteps:
        raise SACDiffError(f"detection steps T_s={det.steps} must lie in 1..T={d.timesteps}")
    if det.deep_steps > d.timesteps:
        raise SACDiffError(f"deep chain T_s={det.deep_steps} (--deep-steps) must lie in 1..T={d.timesteps}")
    if cfg.train.max_timestep and not det.steps <= cfg.train.max_timestep <= d.timesteps:
        raise SACDiffError(
            f"detection steps T_s={det.steps} exceed the largest timestep this model was trained on "
            f"({cfg.train.max_timestep}); choose --steps ≤ {cfg.train.max_timestep}"
        )
    if cfg.train.max_timestep and det.deep_steps > cfg.train.max_timestep:
        raise SACDiffError(f"deep chain T_s={det.deep_steps} exceeds the largest timestep this model was trained on "
                           f"({cfg.train.max_timestep}); choose --deep-steps ≤ {cfg.train.max_timestep}")
    _check_range("preprocess.hu_min", p.hu_min, -2048.0, 0.0, " HU (the window's lower edge lies in air)")
    _check_range("preprocess.hu_max", p.hu_max, -900.0, 4000.0, " HU")
    if p.hu_max - p.hu_min < 100:
        raise SACDiffError(f"HU window [{p.hu_min}, {p.hu_max}] is narrower than 100 HU; it cannot hold lung tissue")
    _check_range("model.dropout", m.dropout, 0.0, 0.9)
    _check_range("model.groups", m.groups, 1, None)
    _check_range("model.blocks_per_module", m.blocks_per_module, 1, 16)
    _check_range("model.bottleneck_blocks", m.bottleneck_blocks, 0, 16)
    _check_range("model.context_slices", m.context_slices, 0, 4)
    _check_range("model.context_mm", m.context_mm, 0.1, 50.0, " (the distance between a slice and its neighbour)")
    _check_range("model.time_embed_dim", m.time_embed_dim, 0, 8192, " (0 = 4 × channels[0])")
    if any(c < 1 or c > 4096 for c in m.channels):
        raise SACDiffError(f"model.channels {m.channels}: every width must lie in 1..4096")
    _check_range("train.weight_decay", t.weight_decay, 0.0, 1.0)
    _check_range("train.grad_clip", t.grad_clip, 0.0, None, " (0 = off)")
    _check_range("train.save_every (--save-every)", t.save_every, 0, None, " (0 = only at the end)")
    _check_range("train.seed (--seed)", t.seed, 0, 2**63 - 1)
