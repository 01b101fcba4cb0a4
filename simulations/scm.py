"""Structural causal model of a multi-hospital chest X-ray world.

    lesion L ~ Bernoulli(prevalence_site)                 (the cause)
    label  Y = L xor Bernoulli(label_noise)               (annotation)
    S_c    = Y with prob. correlation_site, else 1 - Y    (each active confounder c)
    scene  = anatomy(sex) + lesion blob                   (sex is S_sex or a coin flip)
    image  = tag(S_tag) o denoise(S_denoising) o noise(site, S_noise) o blur(site) o contrast(site)

Confounders follow the MICCAT shortcut taxonomy: a burned-in corner tag, low-pass
denoising, a noise level, and patient sex/anatomy. Their link to Y is site-specific, so a
model that reads them instead of the lesion fails at a hospital where the link is reversed.
All functions are pure given their ``rng``.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter

from common.config import Acquisition, DataConfig, Site
from common.data import SiteData, Split, split_indices

SIZE = 28
# A 5x4 "L" laterality marker: a burned-in annotation a model can read instead of the lung.
TAG_PATTERN = np.array(
    [[1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=np.float32
)
DENOISING_SIGMA = 0.7
EXTRA_NOISE_STD = 0.08


def _grid() -> tuple[np.ndarray, np.ndarray]:
    axis = np.linspace(-1.0, 1.0, SIZE, dtype=np.float32)
    return np.meshgrid(axis, axis, indexing="ij")  # (yy, xx)


def _ellipse(yy, xx, *, cy, cx, ry, rx, softness: float = 0.08) -> np.ndarray:
    """Soft-edged ellipse masks; centre/radius arguments broadcast over a leading batch axis."""
    distance = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
    return 1.0 / (1.0 + np.exp(np.clip((distance - 1.0) / softness, -50.0, 50.0)))


def render_anatomy(*, female: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Chest-like scenes (n, 28, 28) in [0, 1]: thorax, dark lungs, heart, ribs, texture."""
    n = len(female)
    yy, xx = _grid()
    yy, xx = yy[None], xx[None]
    col = lambda v: np.asarray(v, dtype=np.float32)[:, None, None]  # noqa: E731
    width = col(np.where(female, 0.74, 0.86) + rng.normal(0, 0.03, n))
    shift_x, shift_y = col(rng.normal(0, 0.04, n)), col(rng.normal(0, 0.04, n))
    heart_size = col(np.where(female, 0.17, 0.22) + rng.normal(0, 0.02, n))

    body = 0.55 * _ellipse(yy, xx, cy=shift_y + 0.05, cx=shift_x, ry=1.05, rx=width)
    lungs = sum(
        _ellipse(yy, xx, cy=shift_y - 0.08, cx=shift_x + side * 0.42 * width, ry=0.6, rx=0.3 * width)
        for side in (-1, 1)
    )
    heart = _ellipse(yy, xx, cy=shift_y + 0.3, cx=shift_x + 0.12, ry=heart_size, rx=heart_size * 1.2)
    ribs = 0.06 * np.sin(yy * np.pi * 6.0 + col(rng.uniform(0, 2 * np.pi, n)))
    breast = 0.12 * col(female) * _ellipse(yy, xx, cy=shift_y + 0.45, cx=shift_x, ry=0.25, rx=width)
    coarse = rng.normal(0, 1, (n, 7, 7)).astype(np.float32)
    texture = 0.04 * np.kron(coarse, np.ones((4, 4), dtype=np.float32))
    texture = gaussian_filter(texture, sigma=(0, 1.5, 1.5))

    scene = body - 0.3 * lungs * (1 - heart) + 0.25 * heart + (ribs + texture) * lungs + breast
    return np.clip(scene, 0.0, 1.0).astype(np.float32)


def add_lesions(
    scenes: np.ndarray, *, lesion: np.ndarray, intensity: float, rng: np.random.Generator
) -> np.ndarray:
    """Add a small bright nodule inside one lung of every scene where ``lesion`` is 1."""
    n = len(scenes)
    yy, xx = _grid()
    side = rng.choice([-1.0, 1.0], n)
    cy = rng.uniform(-0.45, 0.3, n)
    cx = side * rng.uniform(0.22, 0.48, n)
    radius = rng.uniform(0.09, 0.15, n)  # in [-1, 1] units: 1.2-2 pixels
    amplitude = intensity * rng.uniform(0.8, 1.2, n) * lesion
    blob = np.exp(
        -((yy[None] - cy[:, None, None]) ** 2 + (xx[None] - cx[:, None, None]) ** 2)
        / (2 * radius[:, None, None] ** 2)
    )
    return np.clip(scenes + amplitude[:, None, None] * blob, 0.0, 1.0).astype(np.float32)


def confounder_states(
    labels: np.ndarray, *, correlation: float, rng: np.random.Generator
) -> np.ndarray:
    """Binary confounder states equal to the label with probability ``correlation``."""
    agree = rng.random(len(labels)) < correlation
    return np.where(agree, labels, 1 - labels).astype(np.int64)


def acquire(
    scenes: np.ndarray,
    *,
    acquisition: Acquisition,
    states: dict[str, np.ndarray],
    rng: np.random.Generator,
) -> np.ndarray:
    """The site's scanner and label-linked processing applied to scenes (n, 28, 28)."""
    n = len(scenes)
    image = np.clip(scenes, 0.0, 1.0) ** acquisition.gamma + acquisition.brightness
    if acquisition.blur_sigma > 0:
        image = gaussian_filter(image, sigma=(0, acquisition.blur_sigma, acquisition.blur_sigma))
    if acquisition.photon_count is not None:
        image = rng.poisson(np.clip(image, 0, None) * acquisition.photon_count) / acquisition.photon_count
    noise_std = acquisition.gaussian_noise + EXTRA_NOISE_STD * states.get("noise", np.zeros(n))
    image = image + rng.normal(0, 1, image.shape) * noise_std[:, None, None]
    if "denoising" in states:
        smoothed = gaussian_filter(image, sigma=(0, DENOISING_SIGMA, DENOISING_SIGMA))
        image = np.where(states["denoising"][:, None, None] == 1, smoothed, image)
    if "tag" in states:
        tagged = states["tag"] == 1
        image[tagged, 1 : 1 + TAG_PATTERN.shape[0], 1 : 1 + TAG_PATTERN.shape[1]] = np.maximum(
            image[tagged, 1:6, 1:5], TAG_PATTERN
        )
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def simulate_cases(
    *, n: int, site: Site, config: DataConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Draw ``n`` patients of one site: images (n, 28, 28), labels, confounder states."""
    lesion = (rng.random(n) < site.prevalence).astype(np.int64)
    noise = config.label_noise if site.label_noise is None else site.label_noise
    label_flip = rng.random(n) < noise
    labels = np.where(label_flip, 1 - lesion, lesion)
    states = {
        name: confounder_states(labels, correlation=site.correlation_of(name), rng=rng)
        for name in config.confounders
    }
    female = states["sex"] if "sex" in states else rng.integers(0, 2, n)
    scenes = add_lesions(
        render_anatomy(female=female, rng=rng), lesion=lesion, intensity=config.lesion_intensity, rng=rng
    )
    acquisition_states = {k: v for k, v in states.items() if k != "sex"}
    images = acquire(scenes, acquisition=site.acquisition, states=acquisition_states, rng=rng)
    states["lesion"] = lesion
    return images, labels, states


def site_seed(base_seed: int, site_index: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([base_seed, site_index])


def make_site(config: DataConfig, site_index: int, *, seed: int) -> SiteData:
    """Generate one hospital deterministically from (scenario seed, site index)."""
    site = config.sites[site_index]
    rng = np.random.default_rng(site_seed(seed, site_index))
    images, labels, states = simulate_cases(n=site.n_samples, site=site, config=config, rng=rng)
    recorded = {name: states[name] for name in site.records(config.confounders)}
    full = Split(images=images[:, None], labels=labels, recorded=recorded, confounders=states)
    parts = split_indices(
        site.n_samples, val_fraction=config.val_fraction, test_fraction=config.test_fraction, rng=rng
    )
    return SiteData(name=site.name, role=site.role, **{k: full.subset(v) for k, v in parts.items()})
