"""The Stable Diffusion model: its components, loaded one by one, and their pure forward functions.

With :mod:`sdcil_jax.generation.tiny`, the only module that knows about ``diffusers`` and
``transformers``. It loads, with their public ``from_pretrained(..., subfolder=...)``, exactly what
sampling uses: the CLIP tokenizer and text encoder, the UNet, the VAE and the scheduler's config (the
noise schedule). The safety checker, the feature extractor and PyTorch weights are never downloaded.
Everything else in :mod:`sdcil_jax.generation` calls :class:`SDModel`, :func:`unet_predict` and
:func:`vae_decode`, so replacing the SD implementation (another Flax port, a JAX-native UNet) means
rewriting these two files only.

Weights and dtype: the floating parameters are cast to ``generation.dtype`` after loading (the
modules also compute in that dtype), so bfloat16 holds half the memory of float32. For a hub id with
``dtype='bfloat16'`` and the default revision ``'flax'``, the revision ``generation.bf16_revision``
(default ``'bf16'``: the same SD v1.4 weights stored in bfloat16) is downloaded instead, half of the
float32 download; set ``generation.bf16_revision=''`` to load ``'flax'`` and cast.

Backends (see :mod:`sdcil_jax.generation.backends`):

- ``sd``: a hub id or a local ``save_pretrained`` folder.
- ``tiny_sd``: a small randomly initialised model built in code (:mod:`sdcil_jax.generation.tiny`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from sdcil_jax.errors import GenerationError
from sdcil_jax.generation.attention import KINDS, resolve
from sdcil_jax.generation.backends import BACKENDS, diffusion_backends
from sdcil_jax.generation.model import (  # noqa: F401  (re-exported: the model API lives there)
    DTYPES,
    SDModel,
    _cast,
    _diffusers,
    _silence_flax_deprecation,
    unet_predict,
    vae_decode,
)

FLAX_REVISION = "flax"  # generation.revision's default: float32 Flax weights of SD v1.4


def load_model(gen_cfg: Any) -> SDModel:
    """Load the diffusion model named by ``gen_cfg.backend`` (``sd`` or ``tiny_sd``).

    Applies ``gen_cfg.attention`` (resolved for JAX's default backend, see
    :func:`sdcil_jax.generation.attention.resolve`): ``memory_efficient`` sets diffusers' flag on the
    UNet; the kind is kept in :attr:`SDModel.attention`. Raises :class:`GenerationError` for missing
    folders, unreachable hubs and unusable weights.
    """
    dtype_name = str(gen_cfg.dtype)
    if dtype_name not in DTYPES:
        raise GenerationError(
            f"generation.dtype={dtype_name!r} is not supported; use one of {', '.join(DTYPES)}."
        )
    backend = str(gen_cfg.backend)
    if backend not in BACKENDS or not BACKENDS[backend].diffusion:
        raise GenerationError(
            f"generation.backend={backend!r} has no diffusion model; use one of "
            f"{', '.join(diffusion_backends())} (real_holdout copies real images and loads no model)."
        )
    if backend == "tiny_sd":
        from sdcil_jax.generation.tiny import tiny_model

        model = tiny_model(dtype_name)
    else:
        model = _load_sd(str(gen_cfg.model), effective_revision(gen_cfg), DTYPES[dtype_name])
    kind = attention_kind(gen_cfg)
    if kind == "memory_efficient":
        model = dataclasses.replace(model, unet=model.unet.clone(use_memory_efficient_attention=True))
    return dataclasses.replace(model, attention=kind)


def attention_kind(gen_cfg: Any, platform: str | None = None) -> str:
    """``generation.attention`` resolved for ``platform`` (default: JAX's default backend)."""
    kind = str(gen_cfg.get("attention", "auto"))
    if kind not in KINDS:
        raise GenerationError(
            f"generation.attention={kind!r} is not supported; use one of {', '.join(KINDS)}.")
    return resolve(kind, platform)


# --------------------------------------------------------------------------------------------
# sd: pretrained components from a local folder or the hub


def _looks_local(model: str) -> bool:
    """A folder path rather than a hub id ('owner/name')."""
    expanded = os.path.expanduser(model)
    if model.startswith(("/", ".", "~")) or os.path.exists(expanded) or "\\" in model:
        return True
    if model.count("/") > 1:
        return True
    parent = os.path.dirname(expanded)
    return bool(parent) and os.path.isdir(parent)  # a local path whose last part is missing


def effective_revision(gen_cfg: Any) -> str:
    """The revision actually loaded: ``bf16_revision`` for a bfloat16 hub model left on 'flax'."""
    revision = str(gen_cfg.revision or "")
    bf16 = str(gen_cfg.get("bf16_revision", "") or "")
    if (str(gen_cfg.backend) == "sd" and str(gen_cfg.dtype) == "bfloat16" and bf16
            and revision == FLAX_REVISION and not _looks_local(str(gen_cfg.model))):
        return bf16
    return revision


def _hub_offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    return env or bool(constants.HF_HUB_OFFLINE)


def _unreachable(model: str, revision: str, why: str) -> GenerationError:
    rev = f" --revision {revision}" if revision else ""
    return GenerationError(
        f"Stable Diffusion weights {model!r} could not be loaded: {why}; download them once "
        f"with network access (huggingface-cli download {model}{rev}) or set generation.model to "
        "a local pipeline folder."
    )


def _hub_preflight(model: str, revision: str) -> None:
    """Fail fast (no 20 s of retries) when a hub id cannot possibly be loaded."""
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    try:
        cached = huggingface_hub.try_to_load_from_cache(
            model, "unet/config.json", revision=revision or None
        )
    except (hf_errors.HFValidationError, ValueError):
        raise GenerationError(
            f"generation.model={model!r} is neither an existing local folder nor a valid hub id; "
            "fix the path or use a hub id like CompVis/stable-diffusion-v1-4."
        ) from None
    if isinstance(cached, str):
        return  # in the local HF cache: from_pretrained resolves it (offline too)
    if _hub_offline():
        raise _unreachable(
            model, revision, "the Hugging Face hub is offline (HF_HUB_OFFLINE) and the weights are "
            "not in the local HF cache"
        )
    try:
        huggingface_hub.model_info(model, revision=revision or None, timeout=10)
    except hf_errors.GatedRepoError:
        raise GenerationError(
            f"Hub model {model!r} is gated; accept its license on huggingface.co and log in with "
            "`huggingface-cli login`, or set generation.model to a local pipeline folder."
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise GenerationError(
            f"Hub model {model!r} does not exist (or is private); fix generation.model, e.g. "
            "CompVis/stable-diffusion-v1-4."
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise GenerationError(
            f"Hub model {model!r} has no revision {revision!r}; fix generation.revision (Flax "
            "weights of SD v1.4 are on revisions 'flax' and 'bf16'), or set "
            "generation.bf16_revision='' to load generation.revision."
        ) from None
    except Exception as exc:  # connection errors, timeouts, proxies: all mean "not reachable"
        raise _unreachable(
            model, revision, f"the Hugging Face hub could not be reached ({type(exc).__name__}) "
            "and the weights are not in the local HF cache"
        ) from None


def _load_components(path: str, dtype: Any, kwargs: dict) -> SDModel:
    """Each component with its own public ``from_pretrained`` (nothing else is downloaded)."""
    from transformers import CLIPTokenizer, FlaxCLIPTextModel

    _, unet_cls, vae_cls, scheduler_cls = _diffusers()
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kwargs)
    text_encoder, text_params = FlaxCLIPTextModel.from_pretrained(
        path, subfolder="text_encoder", dtype=dtype, _do_init=False, **kwargs)
    unet, unet_params = unet_cls.from_pretrained(path, subfolder="unet", dtype=dtype, **kwargs)
    vae, vae_params = vae_cls.from_pretrained(path, subfolder="vae", dtype=dtype, **kwargs)
    schedule = dict(scheduler_cls.load_config(path, subfolder="scheduler", **kwargs))
    params = {"text_encoder": text_params, "unet": unet_params, "vae": vae_params}
    return SDModel(tokenizer, text_encoder, unet, vae, schedule, _cast(params, dtype), dtype)


def _load_sd(model: str, revision: str, dtype: Any) -> SDModel:
    local = _looks_local(model)
    kwargs: dict[str, Any] = {}
    if local:
        path = os.path.expanduser(model)
        if not os.path.isdir(path):
            raise GenerationError(
                f"Local model folder {model} does not exist; set generation.model to a pipeline "
                "folder (written by save_pretrained, with model_index.json) or to a hub id."
            )
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise GenerationError(
                f"Local model folder {model} has no model_index.json; point generation.model to "
                "the folder that save_pretrained or huggingface-cli download wrote."
            )
    else:
        path = model
        _hub_preflight(model, revision)
        if revision:
            kwargs["revision"] = revision
    try:
        return _load_components(path, dtype, kwargs)
    except GenerationError:
        raise
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if local:
            raise GenerationError(
                f"Local model folder {model} could not be loaded as a Flax Stable Diffusion "
                f"pipeline ({reason}); check that it holds Flax weights saved with save_pretrained."
            ) from None
        why = f"loading from the hub or the HF cache failed ({reason})"
        raise _unreachable(model, revision, why) from None
    finally:
        _silence_flax_deprecation()


def diffusers_pipeline(model: SDModel, scheduler: str = "pndm") -> tuple[Any, dict]:
    """diffusers' own ``FlaxStableDiffusionPipeline`` over the same components (benchmarks only)."""
    import diffusers

    _silence_flax_deprecation()
    pipeline_cls = _diffusers()[0]
    cls = {"pndm": diffusers.FlaxPNDMScheduler, "ddim": diffusers.FlaxDDIMScheduler,
           "dpm_solver": diffusers.FlaxDPMSolverMultistepScheduler}[scheduler]
    sched = cls.from_config(model.scheduler_config)
    pipe = pipeline_cls(
        vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.unet,
        scheduler=sched, safety_checker=None, feature_extractor=None, dtype=model.dtype,
    )
    _silence_flax_deprecation()
    return pipe, {**model.params, "scheduler": sched.create_state()}
