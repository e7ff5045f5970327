"""A synthetic APOGEE survey with known truth: apStar files in the DR17 layout plus a catalog.

Why: a demonstration model can be trained by the project itself (the real astroNN weights are
not public here), and the whole pipeline (catalog -> queue -> worker -> distances) can be checked
end to end against distances that are known exactly.

What one star is (all relations are stated so a reader can check a row of the catalog by hand):

* Stellar parameters. 80 % giants (a quarter of them red-clump stars, logg ~ 2.45, Teff ~ 4750 K;
  the rest along the red-giant branch, logg uniform in [0.8, 3.5] with
  ``Teff = 4600 + 400 (logg - 2.5) - 300 [M/H] +- 80 K`` clipped to [3800, 5200] K, so metal-poor
  giants are hotter), mass uniform in [0.8, 2.0] Msun; 20 % dwarfs, Teff uniform in
  [4500, 6500] K, ``logg = 4.65 - 0.2 (Teff - 4500)/1000 +- 0.07`` clipped to [4.0, 4.7],
  ``mass = (Teff / 5772 K)^1.6`` Msun. [M/H]: 88 % N(-0.05, 0.22), 12 % uniform in
  [-1.5, -0.5], clipped to [-1.5, 0.4]; [alpha/M] 0.3 below [M/H] = -1 falling linearly to 0 at
  [M/H] = 0 (+- 0.05); [C/N] = 0.1 - 0.45 (M / Msun - 0.8) for giants (first dredge-up: the
  mass signal astroNN finds in real giants' CN and CO) and 0.1 for dwarfs (+- 0.05).
* Luminosity. ``R^2 = M / g`` (solar units) so ``L / Lsun = (M / Msun) 10^(logg_sun - logg)
  (Teff / Teff_sun)^4`` with Teff_sun = 5772 K, logg_sun = 4.438 (IAU 2015 B3);
  ``M_bol = 4.74 - 2.5 log10(L / Lsun)`` (IAU 2015 B2);
  ``BC_Ks = 1.47 + 0.65 (5772 - Teff) / 1000`` mag, a straight line through the Sun
  (M_bol,sun - M_Ks,sun = 4.74 - 3.27, Willmer 2018) and the V-K / BC_V colour-temperature
  relations of giants and dwarfs (BC_Ks ~ 2.3 at 4500 K, ~ 1.0 at 6500 K; good to ~ 0.1-0.2 mag
  over 3800-6500 K, which is all a synthetic truth needs); ``M_Ks = M_bol - BC_Ks``;
  ``fakemag = 10^(0.2 M_Ks + 2)``. (Red clump: M_Ks ~ -1.7; Sun: 3.27.)
* Photometry. ``E(B-V)`` log-uniform in [0.01, 1.0]; ``A_K = 0.3517 E(B-V)`` (the pipeline's own
  coefficient, astronn_dist.worker.science.distance.A_K_PER_EBV); Ks drawn uniformly in [7, 13.5] (APOGEE's
  range) further limited to distances of 50 pc - 20 kpc;
  ``dist = 10 pc * 10^((Ks - M_Ks - A_K) / 5)`` and the catalog Ks is recomputed as
  ``M_Ks + 5 log10(dist / 10 pc) + A_K`` so the relation holds to rounding. Photometry carries no
  noise: the pipeline's distance for a perfect fakemag is the true distance.
  ``H = Ks + (H-K)_0 + 0.60 A_K`` with ``(H-K)_0 = max(0.03, 0.08 + 0.1 (5000 - Teff)/1000)``
  and ``A_lambda / A_K = (lambda / 2.159 um)^-1.75`` (so A_H / A_K = 1.60).
* Missing photometry. A star is "missing" with probability ``missing_fraction``; then its Ks
  (45 %), its E(B-V) (45 %) or both (10 %) are NaN in the catalog and -9999.99 in the header
  (written as float32(-9999.99) = -9999.990234375, exactly like DR17). The truth columns
  (m_ks, dist, a_k) are always filled.
* Spectrum. ``flux = C(lambda) * exp(-sum_i d_i phi_i(lambda))`` with phi_i Gaussians (peak 1,
  sigma 1.35-1.9 pixels for lines, as APOGEE's R ~ 22,500) of a fixed line list
  (:func:`line_list`: the same ~5,400 components for every survey, seeded by a constant),
  ``d_i = -ln(1 - 0.75 (1 - exp(-tau_i)))`` (a single line saturates at depth 0.75) and
  ``log10 tau_i = log10 s_i + a_i [M/H] + alpha_i [alpha/M] + b_i (5040/Teff - 1)
  + c_i (logg - 2.5) + n_i [C/N]``: neutral metal lines (b > 0: stronger when cool),
  alpha-element lines, gravity-sensitive strong lines with pressure-broadened wings (c > 0, the
  wing component grows with g), ionised lines (c < 0: stronger at low gravity), CO band heads
  (luminosity sensitive, c < 0; carbon, n > 0), C I lines, OH and CN molecular forests (very
  Teff sensitive; CN follows nitrogen, n < 0) and the hydrogen Brackett series 11-20 (b < 0:
  strong only in warm dwarfs). Randomly placed lines keep 3 pixels away from the DR17
  continuum pixels (which were chosen where real spectra are line free), so the continuum fit
  behaves as on real spectra. Luminosity is therefore recoverable from the spectrum, as in real
  stars (tests/test_synth.py: a linear fit on 500 spectra gets M_Ks to ~0.5 mag; a small MLP on
  8,000 to ~8 % in fakemag). Line depths were tuned on the two real files: normalised median,
  scatter and 1st percentile 0.91 / 0.11 / 0.59 for a 3677 K, log g 0.5, [M/H] -0.29 giant (real
  0.92 / 0.12 / 0.56) and 0.99 / 0.056 / 0.76 for a 5226 K dwarf (real 0.99 / 0.056 / 0.74).
  The continuum C is a blackbody at Teff reddened by A_lambda, times a smooth instrument
  response (cubic, +-2 %), scaled so the median flux is
  ``740 * 10^(-0.4 (H - 10.44))`` in 10^-17 erg/s/cm^2/Angstrom with a 5 % calibration scatter
  (the two real files lie on this line: H = 10.32 -> 831, H = 10.58 -> 656).
* Noise and pixel flags, matched to the two real DR17 files (tests/test_synth.py compares them):
  photon-like errors ``err ~ C t(lambda) sqrt(F / C)`` with a throughput shape t rising to
  1.2x at the blue end and 2x at the red end, scaled so the median per-pixel S/N is the star's
  drawn SNR (log-uniform 50-300; the header SNR is the measured median of flux/err); fixed
  survey features with fixed wavelengths (OH sky lines: bit 12 SIG_SKYLINE, error x10-30; CO2 /
  H2O telluric bands: bit 13 SIG_TELLURIC; the Littrow ghost: bit 8), detector persistence on a
  half of the stars (bits 9-11 PERSIST_HIGH/MED/LOW, error x1.5-6 and a small flux excess),
  clusters of bad pixels (bits 0 BADPIX, 4 BADDARK, 5 BADFLAT, 14 NOT_ENOUGH_PSF, 7 NOSKY;
  error ~ 5e12 as DR17 writes it, with a few unflagged neighbours of large error), cosmic
  rays (bit 1), and the chip edges (bits 0+7 and a decaying unflagged error halo).

File layout (DR17, as the real files of samples/apstar): primary header with OBJID, K, H, SFD_EBV,
NVISITS, SNR, SNRVISn (0 for a single visit, as DR17), the wavelength solution and
``SYNTHETC = T`` (plus SYNSEED, SYNINDEX); HDU1 flux, HDU2 error
(float64), HDU3 bitmask (int64), each (rows, 8575) with rows = 2 + nvisits when nvisits > 1
(row 0 the coadd, row 1 the second combination, then the visits) and 2 when nvisits = 1 (row 1
all zeros, as in DR17). In the coadd and row 1 the chip gaps are NaN in flux and error with
bitmask 0; in visit rows they are 0. Each visit's chip edges are shifted by 0-5 pixels (its
radial-velocity shift) within the ranges the real visits show, and the coadd covers their
intersection, as in the real files (772-787 gap pixels; real 774 and 784).
HDUs 4-10 (sky, sky error, telluric, telluric error, LSF, two RV tables) are present but empty
(NAXIS = 0) so that the HDU count and indices match DR17 while the files stay small; nothing in
this project reads them.

Visit rows and row 1 are independent noise realisations of the same star at the visit S/N
(coadd S/N * sqrt(nvisits) spread by +-30 %) and at the coadd S/N; they are not combined into
the coadd. numpy and astropy only.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from astropy.io import fits

from astronn_dist.worker.science.distance import A_K_PER_EBV

N_PIXELS = 8575
CRVAL1 = 4.179
CDELT1 = 6e-6
LOG_WAVE = CRVAL1 + CDELT1 * np.arange(N_PIXELS)
"""log10 of the vacuum wavelength in Angstrom of each apStar pixel, (8575,)."""

HEADER_MISSING = float(np.float32(-9999.99))
"""The DR17 header value of a missing magnitude or E(B-V) (float32 -9999.99 = -9999.990234375)."""

CATALOG_NAME = "catalog.csv"
SPECTRA_DIR = "apstar"
CATALOG_COLUMNS = (
    "path", "spectrum_id", "k_mag", "ebv", "teff", "logg", "m_h", "alpha_m", "c_n", "mass",
    "m_ks", "fakemag", "dist", "a_k", "h_mag", "snr", "nvisits", "kind",
)  # fmt: skip

# The Sun (IAU 2015 B2/B3; Willmer 2018 for M_Ks).
TEFF_SUN = 5772.0
LOGG_SUN = 4.438
MBOL_SUN = 4.74
MKS_SUN = 3.27
BC_K_SUN = MBOL_SUN - MKS_SUN
BC_K_SLOPE = 0.65e-3
"""d BC_Ks / d(-Teff), mag per K."""

EXTINCTION_POWER = 1.75
"""A_lambda / A_K = (lambda / LAMBDA_K)^-EXTINCTION_POWER in the near infrared."""
LAMBDA_K = 21590.0  # Angstrom, 2MASS Ks

KS_RANGE = (7.0, 13.5)
DIST_RANGE = (50.0, 20_000.0)  # pc
EBV_RANGE = (0.01, 1.0)
SNR_RANGE = (50.0, 300.0)
GIANT_FRACTION = 0.8

# Pixel flags (APOGEE_PIXMASK). Bits 0-7 and 12 are the ones the continuum code masks.
BADPIX, CRPIX, BADDARK, BADFLAT, NOSKY = 1 << 0, 1 << 1, 1 << 4, 1 << 5, 1 << 7
LITTROW_GHOST, PERSIST_HIGH, PERSIST_MED, PERSIST_LOW = 1 << 8, 1 << 9, 1 << 10, 1 << 11
SIG_SKYLINE, SIG_TELLURIC, NOT_ENOUGH_PSF = 1 << 12, 1 << 13, 1 << 14
MASKED_BITS = 0xFF | SIG_SKYLINE
HUGE_ERROR = 4.5e12
"""DR17's error value for unusable pixels is of this order (4.5e12-5e13 in the real files)."""

# Visit coverage per chip, [start, stop) pixel: each edge lies in the range the visits of the two
# real DR17 files show, (lowest, highest); a visit's radial-velocity shift moves all six edges.
_CHIP_EDGES = (
    ((197, 202), (3320, 3324)),
    ((3533, 3538), (6126, 6130)),
    ((6291, 6295), (8378, 8382)),
)
_CHIP_WINDOWS = tuple((start[0], stop[0]) for start, stop in _CHIP_EDGES)
_MAX_VISIT_SHIFT = 5
_MAX_EDGE_FLAGGED = 10
_MAX_EDGE_HALO = 18
# With those limits every flagged or large-error edge pixel stays outside astroNN's DR17 kept
# pixels [246, 3274), [3585, 6080), [6344, 8335): the chips are never spoiled by the edges.

_LINE_LIST_SEED = 0x5A7A_2017
MAX_DEPTH = 0.75
"""Largest central depth of a single line (saturation at APOGEE's resolution)."""
WING_OFFSET = 2.0
"""log10 tau of a strong line's pressure wing below its core's, at logg = 2.5."""
_FEATURE_SEED = 0x5A7A_0012


# ---------------------------------------------------------------------------------------------
# Physical relations
# ---------------------------------------------------------------------------------------------


def bolometric_correction_ks(teff: np.ndarray | float) -> np.ndarray | float:
    """BC_Ks = M_bol - M_Ks [mag] for effective temperature ``teff`` [K] (any shape)."""
    return BC_K_SUN + BC_K_SLOPE * (TEFF_SUN - np.asarray(teff, dtype=float))


def absolute_ks(teff: np.ndarray | float, logg: np.ndarray | float, mass: np.ndarray | float):
    """M_Ks [mag] from Teff [K], log g [cgs] and mass [Msun] (see the module docstring)."""
    teff, logg, mass = (np.asarray(v, dtype=float) for v in (teff, logg, mass))
    log_l = np.log10(mass) + (LOGG_SUN - logg) + 4.0 * np.log10(teff / TEFF_SUN)
    m_bol = MBOL_SUN - 2.5 * log_l
    return m_bol - bolometric_correction_ks(teff)


def fakemag_from_absolute(m_ks: np.ndarray | float) -> np.ndarray | float:
    """astroNN's fakemag = 10^(0.2 M_Ks + 2) (a linear Ks luminosity)."""
    return 10.0 ** (0.2 * np.asarray(m_ks, dtype=float) + 2.0)


def extinction_ratio(wave_aa: np.ndarray | float) -> np.ndarray | float:
    """A_lambda / A_K at vacuum wavelength ``wave_aa`` [Angstrom]."""
    return (np.asarray(wave_aa, dtype=float) / LAMBDA_K) ** -EXTINCTION_POWER


def intrinsic_h_minus_k(teff: float) -> float:
    """(H - Ks)_0 [mag] of a star of ``teff`` [K], a rough colour-temperature line."""
    return max(0.03, 0.08 + 0.1 * (5000.0 - teff) / 1000.0)


# ---------------------------------------------------------------------------------------------
# Stars
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticStar:
    """One star's truth. Magnitudes in mag, dist in pc, teff in K, logg in cgs dex."""

    index: int
    spectrum_id: str
    kind: str  # "giant", "red_clump" or "dwarf"
    teff: float
    logg: float
    m_h: float
    alpha_m: float
    c_n: float
    mass: float
    m_ks: float
    fakemag: float
    dist: float
    ebv: float
    a_k: float
    ks: float  # true apparent Ks, always filled
    h_mag: float
    k_missing: bool
    ebv_missing: bool
    snr_target: float
    nvisits: int


def spectrum_id_for(seed: int, index: int) -> str:
    """The OBJID of star ``index`` of the survey drawn with ``seed`` (unique across seeds)."""
    return f"2MSYN{seed:04d}-{index:07d}"


def star_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of star ``index``: a star does not depend on how many others are drawn."""
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


def draw_star(
    rng: np.random.Generator,
    index: int,
    spectrum_id: str,
    *,
    missing_fraction: float = 0.03,
    visits: tuple[int, int] = (1, 4),
) -> SyntheticStar:
    """Draw one star's parameters and photometry (relations in the module docstring).

    Always consumes the same number of draws, so parameters do not depend on the options.
    """
    u = rng.random(16)
    z = rng.normal(size=6)
    m_h = -0.05 + 0.22 * z[3] if u[0] < 0.88 else -1.5 + u[1]
    m_h = float(np.clip(m_h, -1.5, 0.4))
    alpha_m = float(np.clip(0.3 * np.clip(-m_h, 0.0, 1.0) + 0.05 * z[4], -0.1, 0.4))

    if u[2] < GIANT_FRACTION:
        mass = 0.8 + 1.2 * u[3]
        if u[4] < 0.25:
            kind = "red_clump"
            logg = 2.45 + 0.08 * z[0]
            teff = 4750.0 - 200.0 * m_h + 80.0 * z[1]
        else:
            kind = "giant"
            logg = 0.8 + 2.7 * u[5]
            teff = 4600.0 + 400.0 * (logg - 2.5) - 300.0 * m_h + 80.0 * z[1]
        teff = float(np.clip(teff, 3800.0, 5200.0))
    else:
        kind = "dwarf"
        teff = 4500.0 + 2000.0 * u[6]
        logg = float(np.clip(4.65 - 0.2 * (teff - 4500.0) / 1000.0 + 0.07 * z[2], 4.0, 4.7))
        mass = (teff / TEFF_SUN) ** 1.6
    teff, logg, mass = float(teff), float(logg), float(mass)
    # First dredge-up: the more massive a giant, the more CN-processed its surface.
    c_n = (0.1 - 0.45 * (mass - 0.8) if kind != "dwarf" else 0.1) + 0.05 * z[5]

    m_ks = float(absolute_ks(teff, logg, mass))
    ebv = float(10.0 ** (math.log10(EBV_RANGE[0]) + u[7] * math.log10(EBV_RANGE[1] / EBV_RANGE[0])))
    a_k = A_K_PER_EBV * ebv
    ks_lo = max(KS_RANGE[0], m_ks + a_k + 5.0 * math.log10(DIST_RANGE[0] / 10.0))
    ks_hi = min(KS_RANGE[1], m_ks + a_k + 5.0 * math.log10(DIST_RANGE[1] / 10.0))
    ks_draw = ks_lo + (ks_hi - ks_lo) * u[8]
    dist = 10.0 * 10.0 ** ((ks_draw - m_ks - a_k) / 5.0)
    ks = m_ks + 5.0 * math.log10(dist / 10.0) + a_k
    h_mag = ks + intrinsic_h_minus_k(teff) + (float(extinction_ratio(16500.0)) - 1.0) * a_k

    k_missing = ebv_missing = False
    if u[9] < missing_fraction:
        k_missing = u[10] < 0.55
        ebv_missing = u[10] >= 0.45

    snr = float(SNR_RANGE[0] * (SNR_RANGE[1] / SNR_RANGE[0]) ** u[11])
    lo, hi = visits
    if not 1 <= lo <= hi:
        raise ValueError(f"visits must be (min, max) with 1 <= min <= max, got {visits!r}")
    choices = np.arange(lo, hi + 1)
    weights = 1.0 / choices  # fewer visits are commoner, as in APOGEE
    nvisits = int(choices[np.searchsorted(np.cumsum(weights) / weights.sum(), u[12])])

    return SyntheticStar(
        index=index, spectrum_id=spectrum_id, kind=kind, teff=teff, logg=logg, m_h=m_h,
        alpha_m=alpha_m, c_n=float(c_n), mass=mass, m_ks=m_ks,
        fakemag=float(fakemag_from_absolute(m_ks)), dist=dist, ebv=ebv, a_k=a_k, ks=ks,
        h_mag=h_mag, k_missing=k_missing, ebv_missing=ebv_missing, snr_target=snr,
        nvisits=nvisits,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The fixed line list and the absorption spectrum
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LineList:
    """Absorption components, each a Gaussian in pixel space with an optical-depth law.

    center: (L,) pixel; sigma: (L,) pixel, one of a few fixed widths (:data:`_NARROW_SIGMAS`
    and the broad components'); coef: (L, 6) the coefficients of
    ``log10 tau = coef @ [1, [M/H], [alpha/M], 5040/Teff - 1, logg - 2.5, [C/N]]``;
    group: (L,) name.
    """

    center: np.ndarray
    sigma: np.ndarray
    coef: np.ndarray
    group: np.ndarray


# Line widths (Gaussian sigma, pixels). APOGEE's R ~ 22,500 is ~3.2 pixels FWHM (sigma ~1.4);
# a few discrete widths let every width class be applied as one FFT convolution.
_NARROW_SIGMAS = (1.35, 1.55, 1.75)
_STRONG_SIGMA = 1.9
_WING_SIGMA = 8.0
_H_SIGMA, _H_WING_SIGMA = 5.0, 25.0


_CONTINUUM_CLEARANCE = 3
DR17_KEPT = ((246, 3274), (3585, 6080), (6344, 8335))
"""astroNN's DR17 chip ranges [start, stop): the 7514 pixels the normalised spectrum keeps."""


def dr17_continuum_pixels() -> np.ndarray:
    """The DR17 continuum mask (astroNN 1.1.0, worker/data) on the full grid: (8575,) bool."""
    kept = np.load(Path(__file__).parents[1] / "data" / "dr17_contmask.npy")  # worker/data
    full = np.zeros(N_PIXELS, dtype=bool)
    full[np.concatenate([np.arange(s, e) for s, e in DR17_KEPT])] = kept
    return full


def _pixel_of(wave_aa: np.ndarray | float) -> np.ndarray:
    return (np.log10(wave_aa) - CRVAL1) / CDELT1


@lru_cache(maxsize=1)
def line_list() -> LineList:
    """The survey's line list: fixed (seeded by a constant), identical for every survey."""
    rng = np.random.default_rng(_LINE_LIST_SEED)
    parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, str]] = []
    # The DR17 continuum pixels were chosen where real spectra are close to the continuum: keep
    # the randomly placed lines at least _CONTINUUM_CLEARANCE pixels away from them.
    near = np.convolve(dr17_continuum_pixels(), np.ones(2 * _CONTINUUM_CLEARANCE + 1), "same")
    allowed = np.flatnonzero(near == 0)

    def add(n, group, log_s, a, alpha, b, c, cn=0.0, sigma=None, centers=None):
        """n components; each coefficient a value or a (low, high) uniform range."""
        if centers is None:
            centers = rng.choice(allowed, n) + rng.uniform(-0.5, 0.5, n)
        centers = np.asarray(centers, dtype=float)
        def draw(v):  # a (low, high) range, or values
            return rng.uniform(*v, n) if isinstance(v, tuple) else np.broadcast_to(v, (n,))

        coef = np.stack([draw(v) for v in (log_s, a, alpha, b, c, cn)], axis=1).astype(float)
        sig = rng.choice(_NARROW_SIGMAS, n) if sigma is None else np.full(n, float(sigma))
        parts.append((centers, sig, coef, group))
        return centers, coef

    # Neutral metal lines (Fe I-like): stronger when cool, scale with [M/H].
    add(1500, "metal", (-2.4, -0.55), 1.0, 0.0, (0.3, 1.5), (-0.05, 0.05))
    # Alpha-element lines (Mg, Si, Ca, Ti, S).
    add(150, "alpha", (-2.3, -0.3), 1.0, 1.0, (0.2, 1.2), (-0.05, 0.05))
    # Strong gravity-sensitive lines (Mg I, Al I, K I-like): a core plus pressure-broadened
    # wings that grow with g (c + 0.5).
    centers, coef = add(30, "gravity", (-1.0, 0.0), 1.0, (0.0, 1.0), (0.3, 1.2), (0.15, 0.3),
                        sigma=_STRONG_SIGMA)  # fmt: skip
    add(30, "gravity_wing", coef[:, 0] - WING_OFFSET, coef[:, 1], coef[:, 2], coef[:, 3],
        coef[:, 4] + 0.5, coef[:, 5], sigma=_WING_SIGMA, centers=centers)  # fmt: skip
    # Ionised lines: stronger at low gravity (tau ~ g^-1/3) and slightly when warm.
    add(40, "ion", (-1.8, -0.5), 1.0, 0.0, (-0.8, 0.2), (-0.45, -0.25))
    # CO Delta v = 3 band heads (vacuum, Angstrom): lines pile up at the head, the band runs red;
    # luminosity sensitive (stronger in giants).
    for head in (15582.0, 15780.0, 15982.0, 16189.0, 16397.0, 16610.0, 16840.0):
        j = np.arange(1, 23)
        add(j.size, "CO", -1.5 - 0.04 * j + rng.normal(0.0, 0.15, j.size), 1.0, 0.0, (2.0, 3.0),
            (-0.3, -0.15), cn=0.5, sigma=1.5, centers=_pixel_of(head) + 1.2 * j**1.35)  # fmt: skip
    # High-excitation C I lines: stronger when warm, follow carbon.
    add(20, "C", (-1.6, -0.6), 1.0, 0.0, (-1.0, 0.0), (-0.1, 0.05), cn=0.5)
    # OH (oxygen: follows alpha) and CN forests: very Teff sensitive, CN also luminosity
    # sensitive and, carbon being locked in CO, following nitrogen (mass, through the first
    # dredge-up); with the weak metal lines they blanket a cool giant's spectrum.
    add(600, "OH", (-3.5, -2.0), (0.8, 1.0), 1.0, (3.5, 5.0), (-0.1, 0.05))
    add(2500, "CN", (-3.0, -1.8), (1.0, 1.3), 0.0, (2.2, 3.6), (-0.25, -0.05), cn=-0.5)
    # Hydrogen Brackett 11-4 ... 20-4 (vacuum): strong only in warm stars, broad, with wings
    # that grow with gravity.
    r_h = 1.09677583e-3  # Rydberg constant for hydrogen, 1/Angstrom
    n = np.arange(11, 21)
    bracket = _pixel_of(1.0 / (r_h * (1.0 / 16.0 - 1.0 / n**2)))
    log_s = -1.0 - 0.06 * (n - 11)
    add(n.size, "H", log_s, 0.0, 0.0, -4.0, 0.1, sigma=_H_SIGMA, centers=bracket)
    add(n.size, "H_wing", log_s - 0.7, 0.0, 0.0, -4.0, 0.4, sigma=_H_WING_SIGMA, centers=bracket)

    return LineList(
        center=np.concatenate([p[0] for p in parts]),
        sigma=np.concatenate([p[1] for p in parts]),
        coef=np.concatenate([p[2] for p in parts]),
        group=np.concatenate([np.full(p[0].size, p[3]) for p in parts]),
    )  # fmt: skip


def optical_depths(teff, logg, m_h, alpha_m, c_n=0.0) -> np.ndarray:
    """Line-centre optical depths tau: (N, L) for stars given as (N,) arrays (or scalars)."""
    teff, logg, m_h, alpha_m, c_n = np.broadcast_arrays(
        *(np.atleast_1d(np.asarray(v, dtype=float)) for v in (teff, logg, m_h, alpha_m, c_n))
    )
    design = np.stack(
        [np.ones_like(teff), m_h, alpha_m, 5040.0 / teff - 1.0, logg - 2.5, c_n], axis=1
    )
    return 10.0 ** (design @ line_list().coef.T)


_PAD = 128  # pixels of padding on each side: the widest kernel (6 x 25 px) never wraps around
_NFFT = 1 << int(math.ceil(math.log2(N_PIXELS + 2 * _PAD + 160)))


def absorption_spectra(teff, logg, m_h, alpha_m, c_n=0.0) -> np.ndarray:
    """Continuum-normalised model spectra exp(-sum tau phi): (N, 8575) float64 in (0, 1].

    Each width class is a comb of line strengths (split linearly between the two pixels around
    each centre) convolved with its Gaussian by FFT: cost independent of the number of lines.
    """
    lines = line_list()
    tau = optical_depths(teff, logg, m_h, alpha_m, c_n)
    n_star = tau.shape[0]
    # An unresolved line seen at R ~ 22,500 saturates at a central depth of about MAX_DEPTH:
    # depth = MAX_DEPTH (1 - exp(-tau)); overlapping lines multiply, approximated by adding
    # -ln(1 - depth) times the profile (exact at each line's centre).
    strength = -np.log1p(-MAX_DEPTH * -np.expm1(-tau))
    pos = lines.center + _PAD
    i0 = np.floor(pos).astype(np.int64)
    w1 = pos - i0
    freq = np.fft.rfftfreq(_NFFT)
    rows = (np.arange(n_star, dtype=np.int64) * _NFFT)[:, None]
    total = np.zeros((n_star, _NFFT // 2 + 1), dtype=np.complex128)
    for sigma in np.unique(lines.sigma):
        k = lines.sigma == sigma
        # Peak-1 Gaussian = sigma sqrt(2 pi) times the unit-area one.
        st = strength[:, k] * (sigma * math.sqrt(2.0 * math.pi))
        idx = np.concatenate([rows + i0[k], rows + i0[k] + 1], axis=1).ravel()
        val = np.concatenate([st * (1.0 - w1[k]), st * w1[k]], axis=1).ravel()
        comb = np.bincount(idx, weights=val, minlength=n_star * _NFFT).reshape(n_star, _NFFT)
        total += np.fft.rfft(comb, axis=1) * np.exp(-2.0 * (math.pi * sigma * freq) ** 2)
    depth = np.fft.irfft(total, n=_NFFT, axis=1)[:, _PAD : _PAD + N_PIXELS]
    return np.exp(-np.clip(depth, 0.0, None))


# ---------------------------------------------------------------------------------------------
# Fixed survey features (sky lines, telluric bands, Littrow ghost, persistence zones)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Features:
    sky: np.ndarray  # (S,) pixel centres of OH sky lines
    telluric: np.ndarray  # (T,) pixel centres of telluric absorption lines


@lru_cache(maxsize=1)
def _features() -> _Features:
    rng = np.random.default_rng(_FEATURE_SEED)
    coverage = np.concatenate([np.arange(s + 20, e - 20) for s, e in _CHIP_WINDOWS])
    sky = np.sort(rng.choice(coverage, 31, replace=False)).astype(float)
    tel: list[np.ndarray] = [
        # H2O at the blue end (1.51-1.52 um): a dozen lines.
        np.sort(rng.uniform(220, 570, 10)), rng.uniform(560, 1020, 3),
        # CO2 bands near 1.575 um and 1.605 um: regular series, spacing ~ 14-22 px.
        2818 + np.cumsum(np.linspace(12.0, 22.0, 34)),
        4191 + np.cumsum(np.linspace(12.0, 24.0, 36)),
        # Sparse H2O lines in the red, a small cluster at 1.64 um.
        np.array([5773.0, 5873.0, 5990.0, 6103.0, 6337.0, 6456.0, 6578.0, 6702.0]),
        np.array([7090.0, 7100.0, 7110.0, 7122.0, 7134.0, 7148.0]),
        np.array([7480.0, 7615.0, 7754.0, 7892.0, 8034.0, 8174.0]),
    ]  # fmt: skip
    telluric = np.concatenate(tel)
    telluric = telluric[(telluric > 200) & (telluric < 8370)]
    return _Features(sky=sky, telluric=telluric)


# ---------------------------------------------------------------------------------------------
# One star's arrays
# ---------------------------------------------------------------------------------------------


@dataclass
class _Flags:
    bitmask: np.ndarray  # (8575,) int64
    factor: np.ndarray  # (8575,) error multiplier, >= 1
    huge: np.ndarray  # (8575,) bool, error set to ~5e12
    bias: np.ndarray  # (8575,) fractional flux excess (persistence)

    def set(self, lo: int, hi: int, bits: int, factor: float = 1.0, huge: bool = False) -> None:
        lo, hi = max(int(lo), 0), min(int(hi), N_PIXELS)
        if hi <= lo:
            return
        self.bitmask[lo:hi] |= bits
        np.maximum(self.factor[lo:hi], factor, out=self.factor[lo:hi])
        if huge:
            self.huge[lo:hi] = True

    def halo(self, start: int, step: int, amplitude: float, ratio: float, length: int) -> None:
        """Unflagged pixels of decaying large error next to a bad region (DR17 resampling)."""
        k = np.arange(length)
        idx = start + step * k
        keep = (idx >= 0) & (idx < N_PIXELS)
        idx, k = idx[keep], k[keep]
        np.maximum(self.factor[idx], amplitude * ratio**k, out=self.factor[idx])


def _windows(shifts: np.ndarray) -> list[tuple[int, int]]:
    """Per chip [start, stop) covered by a visit with per-chip ``shifts`` (3,) in pixels."""
    return [
        (min(start[0] + int(d), start[1]), min(stop[0] + int(d), stop[1]))
        for (start, stop), d in zip(_CHIP_EDGES, shifts)
    ]


def _coverage(windows: list[tuple[int, int]]) -> np.ndarray:
    mask = np.zeros(N_PIXELS, dtype=bool)
    for s, e in windows:
        mask[s:e] = True
    return mask


def _draw_flags(rng: np.random.Generator, windows: list[tuple[int, int]]) -> _Flags:
    """The coadd's pixel flags and error multipliers (frequencies matched to the DR17 files)."""
    f = _Flags(
        bitmask=np.zeros(N_PIXELS, dtype=np.int64), factor=np.ones(N_PIXELS),
        huge=np.zeros(N_PIXELS, dtype=bool), bias=np.zeros(N_PIXELS),
    )  # fmt: skip
    feat = _features()
    # OH sky lines: nearly always flagged where they are; errors x10-30, now and then unusable.
    for c in feat.sky:
        if rng.random() < 0.93:
            w = int(rng.integers(3, 10))
            lo = int(round(c + rng.integers(-2, 3))) - w // 2
            f.set(lo, lo + w, SIG_SKYLINE, rng.uniform(10.0, 30.0), huge=rng.random() < 0.04)
            wing = rng.uniform(2.0, 6.0)  # the line's unflagged wings still carry sky noise
            f.halo(lo - 1, -1, wing, 0.6, 4)
            f.halo(lo + w, +1, wing, 0.6, 4)
    # Telluric lines: flagged, errors barely raised.
    for c in feat.telluric:
        if rng.random() < 0.8:
            w = int(rng.integers(3, 9))
            lo = int(round(c + rng.integers(-2, 3))) - w // 2
            f.set(lo, lo + w, SIG_TELLURIC, rng.uniform(1.0, 1.3))
    # Littrow ghost: a fixed ~60-pixel stretch, on some fibres.
    if rng.random() < 0.6:
        lo = 4374 + int(rng.integers(0, 20))
        f.set(lo, lo + int(rng.integers(50, 66)), LITTROW_GHOST)
    # Persistence (fibres on the persistent part of the detector; both real files have it): two
    # zones, low/med/high levels.
    if rng.random() < 0.5:
        lo = 3543 + int(rng.integers(0, 10))
        f.set(lo, lo + int(rng.integers(60, 110)), PERSIST_LOW, rng.uniform(1.5, 2.0))
        zone_hi = 6116 + int(rng.integers(0, 5))
        zone_lo = zone_hi - int(rng.integers(100, 620))
        f.set(zone_lo, zone_hi, PERSIST_LOW, rng.uniform(1.5, 2.0))
        med_lo = zone_hi - int(rng.integers(60, min(400, zone_hi - zone_lo) + 1))
        f.set(med_lo, zone_hi, PERSIST_MED, rng.uniform(2.0, 2.6))
        if rng.random() < 0.4:
            high_lo = med_lo + int(rng.integers(0, 20))
            f.set(high_lo, high_lo + int(rng.integers(30, 80)), PERSIST_HIGH, rng.uniform(3.0, 6.0))
        persist = (f.bitmask & (PERSIST_LOW | PERSIST_MED | PERSIST_HIGH)) != 0
        f.bias[persist] = rng.uniform(0.005, 0.03)
    # Bad-pixel clusters, with unflagged large-error neighbours.
    psf = BADPIX | NOT_ENOUGH_PSF
    combos = np.array([psf | BADDARK | BADFLAT, psf | BADFLAT, psf | BADDARK, BADPIX | NOSKY,
                       BADPIX, psf | BADDARK | BADFLAT | PERSIST_MED])  # fmt: skip
    for _ in range(int(rng.integers(3, 21))):
        s, e = windows[int(rng.integers(0, 3))]
        w = int(rng.integers(2, 9))
        lo = int(rng.integers(s + 30, e - 30 - w))
        f.set(lo, lo + w, int(rng.choice(combos, p=[0.35, 0.2, 0.15, 0.1, 0.1, 0.1])), huge=True)
        amp = rng.uniform(8.0, 25.0)
        f.halo(lo - 1, -1, amp, 0.45, 3)
        f.halo(lo + w, +1, amp, 0.45, 3)
    # Cosmic rays.
    if rng.random() < 0.3:
        for _ in range(int(rng.integers(1, 3))):
            lo = int(rng.integers(0, N_PIXELS - 3))
            f.set(lo, lo + int(rng.integers(2, 4)), CRPIX, rng.uniform(3.0, 8.0))
    # Chip edges: a few unusable pixels (NOSKY + BADPIX), then a decaying unflagged halo.
    for s, e in windows:
        for edge, step in ((s, +1), (e - 1, -1)):
            n = int(rng.integers(1, _MAX_EDGE_FLAGGED + 1))
            lo, hi = (edge, edge + n) if step > 0 else (edge - n + 1, edge + 1)
            f.set(lo, hi, NOSKY | (BADPIX if rng.random() < 0.85 else 0), huge=True)
            f.halo(edge + step * n, step, 10.0 ** rng.uniform(5.0, 6.2), rng.uniform(0.5, 0.6),
                   int(rng.integers(8, _MAX_EDGE_HALO + 1)))  # fmt: skip
    return f


def _throughput(rng: np.random.Generator) -> np.ndarray:
    """Relative error shape t(lambda) (8575,), as in the real files (per 250 pixels, relative to
    the quietest part): 1.25x falling to 1 across the blue chip, 1-1.1x on the green chip, and
    the red chip (a different detector) at 1.2x rising to 2.2x at its red end."""
    x = np.arange(N_PIXELS) / (N_PIXELS - 1)
    blue = rng.uniform(0.2, 0.3) * np.clip(1.0 - x / 0.3, 0.0, None) ** 1.5
    green = rng.uniform(0.05, 0.15) * np.clip((x - 0.45) / 0.25, 0.0, 1.0)
    red_x = np.clip((x - 0.72) / 0.26, 0.0, None)
    red = np.where(x >= 0.72, rng.uniform(0.15, 0.25) + rng.uniform(0.9, 1.3) * red_x**2, 0.0)
    return 1.0 + blue + green + red


def _continuum(
    star: SyntheticStar, absorption: np.ndarray, rng: np.random.Generator, coverage: np.ndarray
) -> np.ndarray:
    """C(lambda) (8575,) in 10^-17 erg/s/cm^2/Angstrom: reddened blackbody times a response.

    Scaled so that the median observed flux, C * absorption over the covered pixels, follows
    the H magnitude as the real files do, with a 5 % flux-calibration scatter.
    """
    wave = 10.0**LOG_WAVE
    planck = wave**-5.0 / np.expm1(1.438777e8 / (wave * star.teff))  # hc/k in Angstrom K
    reddening = 10.0 ** (-0.4 * star.a_k * extinction_ratio(wave))
    x = np.linspace(-1.0, 1.0, N_PIXELS)
    response = np.polynomial.chebyshev.chebval(x, np.r_[1.0, rng.normal(0.0, 0.02, 3)])
    shape = planck * reddening * response
    level = 740.0 * 10.0 ** (-0.4 * (star.h_mag - 10.44) + rng.normal(0.0, 0.02))
    return shape * (level / np.median((shape * absorption)[coverage]))


@dataclass
class StarArrays:
    """What goes into one apStar file: flux, err (float64) and bitmask (int64), (rows, 8575)."""

    flux: np.ndarray
    err: np.ndarray
    bitmask: np.ndarray
    snr: float
    snr_visits: list[float]


def star_arrays(
    star: SyntheticStar, absorption: np.ndarray, rng: np.random.Generator
) -> StarArrays:
    """The observed arrays of ``star`` given its normalised model ``absorption`` (8575,)."""
    nvis = star.nvisits
    shifts = rng.integers(0, _MAX_VISIT_SHIFT + 1, size=(nvis, 1)) + rng.integers(0, 2, (nvis, 3))
    shifts = np.minimum(shifts, _MAX_VISIT_SHIFT)
    visit_windows = [_windows(s) for s in shifts]
    coadd_windows = [(max(w[c][0] for w in visit_windows), min(w[c][1] for w in visit_windows))
                     for c in range(3)]  # fmt: skip
    cover = _coverage(coadd_windows)

    cont = _continuum(star, absorption, rng, cover)
    model = cont * absorption
    shape = _throughput(rng) * np.sqrt(absorption)  # err / C before scaling
    err_clean = cont * shape / (star.snr_target * np.median((absorption / shape)[cover]))

    flags = _draw_flags(rng, coadd_windows)
    # The header SNR is the median flux/err over all covered pixels, flagged ones included:
    # rescale so that median is the drawn S/N.
    snr_now = np.where(flags.huge, 0.0, model / (err_clean * flags.factor))
    err_clean *= np.median(snr_now[cover]) / star.snr_target
    noise_scale = np.where(flags.huge, 1.0, np.minimum(flags.factor, 5.0))
    bias = flags.bias * cont

    rows = 2 + nvis if nvis > 1 else 2
    flux = np.zeros((rows, N_PIXELS))
    err = np.zeros((rows, N_PIXELS))
    bitmask = np.zeros((rows, N_PIXELS), dtype=np.int64)

    huge_err = HUGE_ERROR * 10.0 ** rng.uniform(0.0, 1.0, N_PIXELS)
    flux[0] = model + bias + err_clean * noise_scale * rng.standard_normal(N_PIXELS)
    err[0] = np.where(flags.huge, huge_err, err_clean * flags.factor)
    bitmask[0] = flags.bitmask
    flux[0, ~cover] = np.nan
    err[0, ~cover] = np.nan
    bitmask[0, ~cover] = 0

    snr_visits: list[float] = []
    if nvis > 1:
        # Row 1, the second combination: no unusable-pixel errors and no flags, as in DR17.
        flux[1] = model + bias + err_clean * rng.standard_normal(N_PIXELS)
        err[1] = err_clean * np.where(flags.huge, 1.0, flags.factor)
        flux[1, ~cover] = np.nan
        err[1, ~cover] = np.nan
        weights = rng.uniform(0.7, 1.3, nvis)
        for v, windows in enumerate(visit_windows):
            inside = _coverage(windows)
            scale = math.sqrt(nvis) * weights[v]
            row = 2 + v
            noise = scale * err_clean * noise_scale * rng.standard_normal(N_PIXELS)
            flux[row] = model + bias + noise
            extra_edge = inside & ~cover  # covered by this visit only: unusable in DR17 too
            huge = flags.huge | extra_edge
            err[row] = np.where(huge, huge_err, scale * err_clean * flags.factor)
            bitmask[row] = flags.bitmask | np.where(extra_edge, BADPIX | NOSKY, 0)
            flux[row, ~inside] = 0.0
            err[row, ~inside] = 0.0
            bitmask[row, ~inside] = 0
            snr_visits.append(float(np.median(flux[row, inside] / err[row, inside])))
    else:
        snr_visits.append(0.0)  # DR17 writes SNRVIS1 = 0 when the only visit is the coadd

    snr = float(np.median(flux[0, cover] / err[0, cover]))
    return StarArrays(flux=flux, err=err, bitmask=bitmask, snr=snr, snr_visits=snr_visits)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

_FITS_BLOCK = 2880
_PLACEHOLDERS = (
    "sky", "sky uncertainty", "telluric", "telluric uncertainty", "LSF table", "RV table",
    "RV table for combined spectrum",
)  # fmt: skip


def _wcs_cards(header: fits.Header, bunit: str) -> fits.Header:
    header["CRVAL1"] = CRVAL1
    header["CDELT1"] = CDELT1
    header["CRPIX1"] = 1
    header["CTYPE1"] = "LOG-LINEAR"
    header["BUNIT"] = bunit
    return header


def _primary_header(star: SyntheticStar, arrays: StarArrays, seed: int) -> fits.Header:
    h = fits.Header()
    h["CRVAL1"] = (CRVAL1, "Start log10(wavelength) in subsequent HDUs")
    h["CDELT1"] = (CDELT1, "Dispersion in log10(wave) in subsequent HDUs")
    h["CRPIX1"] = (1, "Pixel of starting wavelength in subsequent HDUs")
    h["CTYPE1"] = ("LOG-LINEAR", "Logarithmic wavelength scale in subsequent HDUs")
    h["DC-FLAG"] = (1, "Logarithmic wavelength scale in subsequent HDUs")
    h["NWAVE"] = (N_PIXELS, "Number of wavelengths in subsequent HDUs")
    h["FIELD"] = ("SYNTH", "APOGEE field name")
    h["OBJID"] = (star.spectrum_id, "APOGEE object name")
    h["SNR"] = (arrays.snr, "Median S/N per apStar pixel")
    h["H"] = (star.h_mag, "2MASS H magnitude")
    h["H_ERR"] = (0.02, "2MASS H magnitude uncertainty")
    h["K"] = (HEADER_MISSING if star.k_missing else star.ks, "2MASS K magnitude")
    h["K_ERR"] = (HEADER_MISSING if star.k_missing else 0.02, "2MASS K magnitude uncertainty")
    h["SFD_EBV"] = (HEADER_MISSING if star.ebv_missing else star.ebv, "SFD E(B-V)")
    h["NVISITS"] = (star.nvisits, "Number of visit spectra combined flag")
    for v, snr in enumerate(arrays.snr_visits, start=1):
        h[f"SNRVIS{v}"] = (snr, f"Median S/N per apStar pixel, visit {v}")
    h["SYNTHETC"] = (True, "synthetic spectrum, not real data")
    h["SYNSEED"] = (seed, "synthetic survey seed")
    h["SYNINDEX"] = (star.index, "star index in the synthetic survey")
    h["HISTORY"] = "HDU1 : flux; HDU2 : flux uncertainty; HDU3 : pixel bitmask"
    h["HISTORY"] = "HDU4-10 : empty placeholders (sky, telluric, LSF, RV tables not simulated)"
    return h


@lru_cache(maxsize=1)
def _placeholder_bytes() -> bytes:
    """HDUs 4-10 as FITS bytes, rendered once: astropy spends ~5 ms per file writing them."""
    hdus: list[fits.PrimaryHDU | fits.ImageHDU] = [fits.PrimaryHDU()]
    for name in _PLACEHOLDERS:
        hdu = fits.ImageHDU()
        hdu.header["COMMENT"] = f"{name}: not simulated (synthetic placeholder)"
        hdus.append(hdu)
    buf = io.BytesIO()
    fits.HDUList(hdus).writeto(buf)
    return buf.getvalue()[_FITS_BLOCK:]  # each HDU is whole 2880-byte blocks: drop the primary


def write_star(path: Path, star: SyntheticStar, arrays: StarArrays, seed: int) -> None:
    """Write one apStar file in the DR17 layout (11 HDUs; 4-10 empty placeholders)."""
    hdus: list[fits.PrimaryHDU | fits.ImageHDU] = [
        fits.PrimaryHDU(header=_primary_header(star, arrays, seed))
    ]
    for data, bunit in (
        (arrays.flux, "Flux (10^-17 erg/s/cm^2/Ang)"),
        (arrays.err, "Err (10^-17 erg/s/cm^2/Ang)"),
        (arrays.bitmask, "Pixel bitmask"),
    ):
        hdu = fits.ImageHDU(data)
        _wcs_cards(hdu.header, bunit)
        hdus.append(hdu)
    with open(path, "wb") as fh:
        fits.HDUList(hdus).writeto(fh)
        fh.write(_placeholder_bytes())


def _catalog_row(star: SyntheticStar, rel_path: str, snr: float) -> dict[str, object]:
    return {
        "path": rel_path, "spectrum_id": star.spectrum_id,
        "k_mag": float("nan") if star.k_missing else star.ks,
        "ebv": float("nan") if star.ebv_missing else star.ebv,
        "teff": star.teff, "logg": star.logg, "m_h": star.m_h, "alpha_m": star.alpha_m,
        "c_n": star.c_n,
        "mass": star.mass, "m_ks": star.m_ks, "fakemag": star.fakemag, "dist": star.dist,
        "a_k": star.a_k, "h_mag": star.h_mag, "snr": snr, "nvisits": star.nvisits,
        "kind": star.kind,
    }  # fmt: skip


def write_survey(
    out_dir: Path,
    n: int,
    seed: int = 0,
    *,
    missing_fraction: float = 0.03,
    visits: tuple[int, int] = (1, 4),
    chunk: int = 256,
) -> Path:
    """Write ``n`` synthetic apStar files under ``out_dir/apstar/`` and ``out_dir/catalog.csv``.

    Deterministic given ``seed`` (>= 0); star ``i`` is the same whatever ``n`` (a survey of 10 is
    the first 10 stars of a survey of 1,000), and different seeds give independent stars with
    different OBJIDs. Returns the catalog path. Catalog columns: ``path`` (relative to the
    catalog's folder), ``spectrum_id`` (the OBJID), ``k_mag`` and ``ebv`` (NaN when missing),
    the truth ``teff`` [K], ``logg``, ``m_h``, ``alpha_m``, ``c_n``, ``mass`` [Msun],
    ``m_ks`` [mag], ``fakemag``, ``dist`` [pc], ``a_k`` [mag], ``h_mag``, and ``snr`` (the
    header SNR), ``nvisits``, ``kind``. ``visits``: (min, max) visits per star, drawn with
    probability ~ 1/nvisits; ``visits=(1, 1)`` gives the smallest files (2 rows, ~0.4 MB).
    ``chunk`` stars share one line-absorption computation.
    """
    if n < 0 or seed < 0:
        raise ValueError(f"n and seed must be >= 0, got n={n}, seed={seed}")
    if not 0.0 <= missing_fraction <= 1.0:
        raise ValueError(f"missing_fraction must be in [0, 1], got {missing_fraction}")
    if not 1 <= visits[0] <= visits[1]:
        raise ValueError(f"visits must be (min, max) with 1 <= min <= max, got {visits!r}")
    out_dir = Path(out_dir)
    spectra_dir = out_dir / SPECTRA_DIR
    spectra_dir.mkdir(parents=True, exist_ok=True)
    catalog = out_dir / CATALOG_NAME

    rows: list[dict[str, object]] = []
    for start in range(0, n, chunk):
        indices = range(start, min(start + chunk, n))
        rngs = [star_rng(seed, i) for i in indices]
        stars = [
            draw_star(rng, i, spectrum_id_for(seed, i), missing_fraction=missing_fraction,
                      visits=visits)
            for rng, i in zip(rngs, indices)
        ]  # fmt: skip
        absorption = absorption_spectra(
            [s.teff for s in stars], [s.logg for s in stars], [s.m_h for s in stars],
            [s.alpha_m for s in stars], [s.c_n for s in stars],
        )  # fmt: skip
        for k, (star, rng) in enumerate(zip(stars, rngs)):
            arrays = star_arrays(star, absorption[k], rng)
            name = f"apStar-dr17-{star.spectrum_id}.fits"
            write_star(spectra_dir / name, star, arrays, seed)
            rows.append(_catalog_row(star, f"{SPECTRA_DIR}/{name}", arrays.snr))

    with catalog.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CATALOG_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (repr(float(v)) if isinstance(v, (float, np.floating)) else v)
                             for k, v in row.items()})  # fmt: skip
    return catalog
