"""Diffusion samplers (PNDM/PLMS, DDIM, DPM-Solver++) as tables of per-step coefficients.

All three are *linear multistep* methods: every step evaluates the guided model once and the next
sample is a linear combination of a base sample and a few stored quantities. So the whole schedule is
computed once on the host (float64, numpy), and the denoising loop on the device is one body for all::

    out_i  = model(x_i, timesteps[i])                       # guided noise (or v) prediction
    d_i    = p[i] * x_i + q[i] * out_i                       # stored: eps (PNDM, DDIM) or x0 (DPM++)
    hist   = [d_i, d_{i-1}, ..., d_{i-K+1}]                  # newest first, K = order of the method
    base   = x_i, or the previous base if keep_base[i]       # PLMS' second step restarts from x_0
    x_{i+1} = a[i] * base + sum_j c[i, j] * hist[j]

The coefficients reproduce diffusers' Flax schedulers step for step (``tests/test_generation.py``
compares trajectories), with the same timesteps, ``steps_offset`` and final-alpha conventions:

- ``pndm``: PNDM with ``skip_prk_steps`` (the PLMS variant SD v1.x ships with), ``N + 1`` model
  evaluations for ``N`` steps, Adams-Bashforth of order 1 (then the trapezoidal restart), 2, 3, 4.
  (diffusers' Flax pipeline stops after ``N`` of the ``N + 1`` timesteps; the PyTorch pipeline and this
  module run all of them.)
- ``ddim``: deterministic DDIM (eta = 0), ``N`` evaluations.
- ``dpm_solver``: DPM-Solver++ multistep, second order (midpoint), first order on the first step and,
  below 15 steps, on the last; ``N`` evaluations.

Only the noise schedule is read from the model's scheduler config (``num_train_timesteps``,
``beta_start``, ``beta_end``, ``beta_schedule``, ``trained_betas``, ``steps_offset``,
``set_alpha_to_one``, ``prediction_type`` = ``epsilon`` or ``v_prediction``, ``timestep_spacing`` for
DPM-Solver++); the method itself is chosen by ``generation.scheduler``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from sdcil_jax.errors import GenerationError

SCHEDULERS = ("pndm", "ddim", "dpm_solver")

# The noise schedule of Stable Diffusion v1.x (its scheduler/scheduler_config.json).
SD_V1_SCHEDULE = {
    "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "trained_betas": None, "steps_offset": 1,
    "set_alpha_to_one": False, "skip_prk_steps": True, "clip_sample": False,
    "prediction_type": "epsilon",
}


@dataclasses.dataclass(frozen=True)
class SolverTable:
    """Per-step coefficients of a sampler (see the module docstring); S steps, K stored terms.

    Attributes:
      name: the scheduler's name.
      timesteps: (S,) int32, the timestep fed to the model at step i.
      keep_base: (S,) bool, reuse the previous base sample instead of x_i.
      p, q: (S,) float32, ``d_i = p x_i + q out_i``.
      a: (S,) float32, weight of the base sample.
      c: (S, K) float32, weights of the stored terms, newest first.
    """

    name: str
    timesteps: np.ndarray
    keep_base: np.ndarray
    p: np.ndarray
    q: np.ndarray
    a: np.ndarray
    c: np.ndarray

    @property
    def num_evaluations(self) -> int:
        """Model evaluations per image (each one is a guided UNet call on 2 latents)."""
        return int(len(self.timesteps))

    @property
    def order(self) -> int:
        return int(self.c.shape[1])


def _get(config: Mapping[str, Any], key: str, default: Any) -> Any:
    value = config.get(key, default)
    return default if value is None and default is not None else value


def alphas_cumprod(config: Mapping[str, Any]) -> np.ndarray:
    """``alpha_bar_t = prod_{s <= t} (1 - beta_s)`` (float64) from a diffusers scheduler config."""
    n = int(_get(config, "num_train_timesteps", 1000))
    trained = config.get("trained_betas")
    schedule = str(_get(config, "beta_schedule", "linear"))
    start, end = float(_get(config, "beta_start", 0.0001)), float(_get(config, "beta_end", 0.02))
    if trained is not None:
        betas = np.asarray(trained, np.float64)
    elif schedule == "linear":
        betas = np.linspace(start, end, n, dtype=np.float64)
    elif schedule == "scaled_linear":
        betas = np.linspace(start ** 0.5, end ** 0.5, n, dtype=np.float64) ** 2
    elif schedule == "squaredcos_cap_v2":
        def bar(t):
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = np.asarray([min(1 - bar((i + 1) / n) / bar(i / n), 0.999) for i in range(n)])
    else:
        raise GenerationError(
            f"The model's scheduler config has beta_schedule={schedule!r}, which this sampler does not "
            "implement; use a model with a linear, scaled_linear or squaredcos_cap_v2 schedule."
        )
    return np.cumprod(1.0 - betas)


def _prediction(config: Mapping[str, Any]) -> str:
    kind = str(_get(config, "prediction_type", "epsilon"))
    if kind not in ("epsilon", "v_prediction"):
        raise GenerationError(
            f"The model's scheduler config has prediction_type={kind!r}; the sampler supports "
            "'epsilon' and 'v_prediction' models."
        )
    return kind


def _table(name, timesteps, keep_base, p, q, a, c) -> SolverTable:
    return SolverTable(
        name=name, timesteps=np.asarray(timesteps, np.int32), keep_base=np.asarray(keep_base, bool),
        p=np.asarray(p, np.float32), q=np.asarray(q, np.float32), a=np.asarray(a, np.float32),
        c=np.asarray(c, np.float32),
    )


def _ddim(config: Mapping[str, Any], steps: int) -> SolverTable:
    """x' = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev) eps_hat, prev = t - T // N (eta = 0)."""
    if config.get("clip_sample"):
        raise GenerationError(
            "The model's scheduler config sets clip_sample=True, which the DDIM sampler here does not "
            "implement; use generation.scheduler='pndm' or 'dpm_solver'."
        )
    ab = alphas_cumprod(config)
    train_steps = len(ab)
    ratio = train_steps // steps
    offset = int(_get(config, "steps_offset", 0))
    final = 1.0 if config.get("set_alpha_to_one") else ab[0]
    timesteps = (np.arange(steps) * ratio)[::-1] + offset
    v_pred = _prediction(config) == "v_prediction"
    a, c = [], []
    for t in timesteps:
        prev = t - ratio
        ab_t, ab_p = ab[t], (ab[prev] if prev >= 0 else final)
        if v_pred:  # x0 = sqrt(ab) x - sqrt(1-ab) v ; eps = sqrt(ab) v + sqrt(1-ab) x
            a.append(math.sqrt(ab_p * ab_t) + math.sqrt((1 - ab_p) * (1 - ab_t)))
            c.append([math.sqrt(1 - ab_p) * math.sqrt(ab_t) - math.sqrt(ab_p) * math.sqrt(1 - ab_t)])
        else:  # x0 = (x - sqrt(1-ab) eps) / sqrt(ab)
            a.append(math.sqrt(ab_p / ab_t))
            c.append([math.sqrt(1 - ab_p) - math.sqrt(ab_p * (1 - ab_t) / ab_t)])
    n = len(timesteps)
    return _table("ddim", timesteps, np.zeros(n, bool), np.zeros(n), np.ones(n), a, c)


# Adams-Bashforth weights of PLMS, newest output first, by the step counter (counter 1 is the
# trapezoidal restart from x_0 with (e_1 + e_0) / 2; e_1 is then never used again).
_PLMS_WEIGHTS = {
    0: {0: 1.0},
    1: {0: 0.5, 1: 0.5},
    2: {0: 1.5, 2: -0.5},
    3: {0: 23 / 12, 1: -16 / 12, 3: 5 / 12},
    4: {0: 55 / 24, 1: -59 / 24, 2: 37 / 24, 4: -9 / 24},
}


def _pndm(config: Mapping[str, Any], steps: int) -> SolverTable:
    """PLMS: x' = sqrt(ab_p / ab_t) x - (ab_p - ab_t) e / (ab_t sqrt(1 - ab_p) + sqrt(ab_t (1 - ab_t) ab_p))

    with e the Adams-Bashforth combination of past noise predictions (``_PLMS_WEIGHTS``).
    """
    ab = alphas_cumprod(config)
    ratio = len(ab) // steps
    offset = int(_get(config, "steps_offset", 0))
    base_ts = np.arange(steps) * ratio + offset
    timesteps = np.concatenate([base_ts[:-1], base_ts[-2:-1], base_ts[-1:]])[::-1]
    v_pred = _prediction(config) == "v_prediction"
    order = 5  # counter >= 4 reaches back to e_{i-4} because e_1 is skipped
    a, c, keep = [], [], []
    for i, t_eval in enumerate(timesteps):
        t, prev = int(t_eval), max(int(t_eval) - ratio, 0)
        if i == 1:  # restart: from x_0 at t_0 = t + ratio to t
            t, prev = int(t_eval) + ratio, int(t_eval)
        if i >= 5:
            weights = {0: 55 / 24, 1: -59 / 24, 2: 37 / 24, 3: -9 / 24}
        else:
            weights = _PLMS_WEIGHTS[i]
        ab_t, ab_p = ab[t], ab[prev]
        coef_x = math.sqrt(ab_p / ab_t)
        coef_e = -(ab_p - ab_t) / (ab_t * math.sqrt(1 - ab_p) + math.sqrt(ab_t * (1 - ab_t) * ab_p))
        row = np.zeros(order)
        if v_pred:  # eps = sqrt(ab_t) v + sqrt(1 - ab_t) base, applied to the combined v
            coef_x += coef_e * math.sqrt(1 - ab_t)
            coef_e *= math.sqrt(ab_t)
        for j, w in weights.items():
            row[j] = coef_e * w
        a.append(coef_x)
        c.append(row)
        keep.append(i == 1)
    n = len(timesteps)
    return _table("pndm", timesteps, keep, np.zeros(n), np.ones(n), a, c)


def _dpm_timesteps(config: Mapping[str, Any], steps: int, train_steps: int) -> np.ndarray:
    spacing = str(_get(config, "timestep_spacing", "linspace"))
    if spacing == "linspace":
        return np.linspace(0, train_steps - 1, steps + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ratio = train_steps // (steps + 1)
        return (np.arange(steps + 1) * ratio)[::-1][:-1] + int(_get(config, "steps_offset", 0))
    if spacing == "trailing":
        return np.arange(train_steps, 0, -train_steps / steps).round().astype(np.int64) - 1
    raise GenerationError(
        f"The model's scheduler config has timestep_spacing={spacing!r}; use linspace, leading or "
        "trailing."
    )


def _dpm_solver(config: Mapping[str, Any], steps: int) -> SolverTable:
    """DPM-Solver++(2M), lambda = log(alpha / sigma), h = lambda_prev - lambda_t, r = h_last / h:

    x' = (sigma_prev / sigma_t) x - alpha_prev (e^{-h} - 1) (D0 + D1 / 2),
    D0 = x0_i, D1 = (x0_i - x0_{i-1}) / r   (D1 = 0 on first-order steps).
    """
    ab = alphas_cumprod(config)
    alpha, sigma = np.sqrt(ab), np.sqrt(1.0 - ab)
    lam = np.log(alpha) - np.log(sigma)
    timesteps = _dpm_timesteps(config, steps, len(ab))
    n = len(timesteps)
    v_pred = _prediction(config) == "v_prediction"
    lower_final = n < 15
    p, q, a, c = [], [], [], []
    for i, s0 in enumerate(timesteps):
        t = 0 if i == n - 1 else int(timesteps[i + 1])
        if v_pred:  # x0 = alpha x - sigma v
            p.append(alpha[s0])
            q.append(-sigma[s0])
        else:  # x0 = (x - sigma eps) / alpha
            p.append(1.0 / alpha[s0])
            q.append(-sigma[s0] / alpha[s0])
        h = lam[t] - lam[s0]
        phi = -alpha[t] * (math.exp(-h) - 1.0)
        first_order = i == 0 or (lower_final and i == n - 1)
        if first_order:
            c.append([phi, 0.0])
        else:
            r0 = (lam[s0] - lam[int(timesteps[i - 1])]) / h
            c.append([phi * (1.0 + 0.5 / r0), -phi * 0.5 / r0])
        a.append(sigma[t] / sigma[s0])
    return _table("dpm_solver", timesteps, np.zeros(n, bool), p, q, a, c)


_BUILDERS = {"pndm": _pndm, "ddim": _ddim, "dpm_solver": _dpm_solver}


def solver_table(name: str, config: Mapping[str, Any], num_inference_steps: int) -> SolverTable:
    """The coefficient table of scheduler ``name`` for ``num_inference_steps`` steps.

    Args:
      name: one of :data:`SCHEDULERS`.
      config: the model's scheduler config (a diffusers ``scheduler_config.json`` as a dict).
      num_inference_steps: N; the table has N rows (N + 1 for ``pndm``).
    """
    if name not in _BUILDERS:
        raise GenerationError(
            f"generation.scheduler={name!r} is not one of {', '.join(SCHEDULERS)}; pick one of those."
        )
    steps = int(num_inference_steps)
    train_steps = int(_get(config, "num_train_timesteps", 1000))
    if not 1 <= steps <= train_steps:
        raise GenerationError(
            f"generation.num_inference_steps={steps} is out of range for the {name} scheduler; use "
            f"1 to {train_steps}."
        )
    return _BUILDERS[name](config, steps)
