"""diffusers: serve a user's diffusers text-to-image pipeline folder (model_index.json at the top).

Imported with `atelier models import ./my-pipeline --name my-sd` (or POST /api/models/import)
and driven by the image engine like the shipped image families (families/base.py:
ImageServable). Loading:
  1. refuse pickle-based weights anywhere in the folder (only safetensors is ever loaded)
  2. check model_index.json: a diffusers pipeline class, components from diffusers or
     transformers only (never code shipped in the folder), each component's folder present
  3. DiffusionPipeline.from_pretrained(folder, use_safetensors=True, fp32, local files only)
Any failure is a ValueError naming the bad file or component (the server answers 503
model_load_failed with it; no traceback reaches the caller).

Same seed ⇒ same bytes, alone or in a micro-batch: the pipeline runs once per image, each
with its own `torch.Generator().manual_seed(seed)`, so no image's arithmetic depends on
what shares its batch. Progress: the engine expects steps 1..steps once per batch, with
previews of every image of the batch at a chosen step; so each image's latents are kept
after every step, and `on_step` is called during the LAST image's run, when every image's
latents at that step exist (a batch of one, the usual case, reports as it goes). The
"x0" handed to on_step is the batch of current latents (not a clean estimate); `preview`
decodes it through the VAE only when the engine asks for a preview.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from pathlib import Path

import numpy as np

from atelier.families.base import Family, refuse_pickles
from atelier.images.png import upscale as nearest

LIBRARIES = ("diffusers", "transformers")  # where a component's class may come from
UPSCALES = (1, 2, 4)


def _sizes(native: int) -> list[str]:
    """Served sizes: the native one first, then nearest-neighbour ×2 and ×4."""
    return [f"{native * f}x{native * f}" for f in UPSCALES]


def components(config: dict) -> dict[str, tuple[str, str]]:
    """model_index.json's components: {"unet": ("diffusers", "UNet2DConditionModel"), …} (unset ones left out)."""
    return {name: (v[0], v[1]) for name, v in config.items()
            if not name.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] is not None}


def native_size(folder: Path) -> int:
    """The pipeline's native image size read from its JSON files alone (no weights loaded):
    the denoiser's sample_size × 2 ** (number of VAE blocks − 1), as the pipelines compute it."""
    folder = Path(folder)
    for denoiser in ("unet", "transformer"):
        path = folder / denoiser / "config.json"
        if path.is_file():
            sample = _read_json(path, folder).get("sample_size")
            break
    else:
        raise ValueError("the pipeline has neither unet/config.json nor transformer/config.json")
    vae = _read_json(folder / "vae" / "config.json", folder) if (folder / "vae" / "config.json").is_file() else {}
    return _square(sample, "sample_size") * 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)


def facts(folder: Path) -> dict:
    """What describe() needs and model_index.json lacks, from JSON files only: merge into the
    version's stored config on import so /v1/models lists the sizes before any load."""
    return {"image_size": native_size(folder)}


def _read_json(path: Path, folder: Path) -> dict:
    name = path.relative_to(folder).as_posix()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"the pipeline has no {name}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{name} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{name} must hold a JSON object")
    return data


def _square(sample, what: str) -> int:
    if isinstance(sample, (list, tuple)) and len(sample) == 2 and sample[0] == sample[1]:
        sample = sample[0]
    if not isinstance(sample, int) or sample <= 0:
        raise ValueError(f"{what}={sample!r}: only square pipelines with a positive integer size are served")
    return sample


def check_folder(folder: Path) -> dict:
    """Steps 1–2 of loading: refuse pickles, code and unknown components; model_index.json's content."""
    folder = Path(folder)
    refuse_pickles(folder)
    code = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.py"))
    if code:
        raise ValueError(f"the pipeline folder holds code ({', '.join(code[:5])}); custom pipelines are not run")
    config = _read_json(folder / "model_index.json", folder)
    cls = config.get("_class_name")
    if not isinstance(cls, str):
        raise ValueError(f"model_index.json: _class_name={cls!r} must name a diffusers pipeline class")
    import diffusers.pipelines

    for name, (library, class_name) in components(config).items():
        # diffusers resolves a library named after one of its pipeline modules ("stable_diffusion") itself
        if library not in LIBRARIES and not hasattr(diffusers.pipelines, library):
            raise ValueError(f"model_index.json: component {name!r} comes from {library!r}; "
                             f"components may come from {' or '.join(LIBRARIES)} only (no outside code)")
        if not (folder / name).is_dir():
            raise ValueError(f"model_index.json names component {name!r} ({library} {class_name}) "
                             f"but the folder has no {name}/")
    return config


class Pipeline:
    """A diffusers text-to-image pipeline as the image engine drives it (families/base.py: ImageServable)."""

    multi_step, stepwise = True, False  # the pipeline runs its own loop, one image at a time

    def prompt_words(self, prompt: str) -> list[dict]:
        """A pipeline's tokenizer splits any word into pieces it has: none is ignored outright."""
        import re

        return [{"word": w, "known": True, "instead": []} for w in re.findall(r"[\w'-]+", prompt.lower())]

    def __init__(self, folder: Path):
        import torch
        from diffusers import DiffusionPipeline

        folder = Path(folder)
        config = check_folder(folder)
        try:
            with _quiet():
                pipe = DiffusionPipeline.from_pretrained(folder, use_safetensors=True, dtype=torch.float32,
                                                         local_files_only=True)
        except Exception as e:  # noqa: BLE001 — the library's errors become one line naming what is wrong
            text = str(e).replace(f"{folder}/", "").replace(str(folder), "the pipeline folder")
            raise ValueError(f"could not load the {config['_class_name']}: {type(e).__name__}: "
                             f"{text.strip().splitlines()[0] if text.strip() else 'no details'}") from None
        pipe.set_progress_bar_config(disable=True)
        params = inspect.signature(pipe.__call__).parameters
        needed = {"prompt", "num_inference_steps", "generator", "output_type", "height", "width"}
        if missing := sorted(needed - set(params)):
            raise ValueError(f"{type(pipe).__name__} is not a text-to-image pipeline: its call has no "
                             f"{', '.join(missing)}")
        required = [n for n, p in params.items() if p.default is inspect.Parameter.empty
                    and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n not in needed]
        if required:
            raise ValueError(f"{type(pipe).__name__} needs {', '.join(required)} besides a prompt; "
                             "only text-to-image pipelines are served")
        self.pipe, self.params = pipe, params
        # the size the pipeline draws by default: denoiser sample_size × vae_scale_factor (as its __call__ computes it)
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        sample = getattr(pipe, "default_sample_size", None) or getattr(getattr(denoiser, "config", None),
                                                                       "sample_size", None)
        self.native = _square(sample, "sample_size") * int(getattr(pipe, "vae_scale_factor", 8))
        self.sizes = _sizes(self.native)
        self.upscalers = ["nearest"]  # pixel-exact ×2, ×4; diffusers pipelines carry no Atelier upscaler
        self.sampler = type(pipe.scheduler).__name__

    def generate(self, prompts, seeds, *, steps, guidance, negative_prompts, on_step) -> np.ndarray:
        """(B, S, S, 3) uint8: one pipeline run per image, each from its own seeded generator."""
        import torch

        history: list[list] = []  # history[k][s]: latents of image k after step s + 1 (all but the last image)
        out = []
        for k, (prompt, seed) in enumerate(zip(prompts, seeds)):
            last, kept, reported = k == len(prompts) - 1, [], [0]

            def step_end(pipe, step_index, timestep, callback_kwargs, kept=kept, last=last, reported=reported):
                latents = callback_kwargs["latents"]  # (1, C, s, s), s = S / vae_scale_factor
                if not last:
                    kept.append(latents.detach().clone())
                    return callback_kwargs
                # steps 1..steps once per batch, with every image's latents at hand (a second-order
                # scheduler calls back more often than `steps`: its calls are spread over them)
                calls = max(len(pipe.scheduler.timesteps), 1)
                step = (step_index + 1) * steps // calls
                if on_step is not None and step > reported[0]:
                    reported[0] = step
                    on_step(step, torch.cat([h[step_index] for h in history] + [latents]))
                return callback_kwargs

            kwargs = {"prompt": prompt, "num_inference_steps": steps, "output_type": "np",
                      "generator": torch.Generator().manual_seed(seed), "height": self.native, "width": self.native}
            if "guidance_scale" in self.params:
                kwargs["guidance_scale"] = guidance[k]
            if negative_prompts[k]:
                if "negative_prompt" not in self.params:
                    raise ValueError(f"{type(self.pipe).__name__} takes no negative prompt")
                kwargs["negative_prompt"] = negative_prompts[k]
            if "callback_on_step_end" in self.params and on_step is not None:
                kwargs["callback_on_step_end"] = step_end
            with torch.no_grad():
                image = self.pipe(**kwargs).images  # (1, S, S, 3) float in [0, 1]
            out.append(_to_uint8(np.asarray(image)[0]))
            history.append(kept)
        return np.stack(out)

    def preview(self, x0) -> np.ndarray:
        """Latents (B, C, s, s) → (B, S, S, 3) uint8 through the VAE, one image at a time (batch-invariant)."""
        import torch

        vae = self.pipe.vae
        scale = getattr(vae.config, "scaling_factor", 1.0)
        out = []
        with torch.no_grad():
            for latents in x0:
                image = vae.decode(latents[None] / scale).sample[0]  # (3, S, S) in [-1, 1]
                out.append(_to_uint8((image / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).float().numpy()))
        return np.stack(out)

    def enlarge(self, image: np.ndarray, factor: int, method: str | None) -> np.ndarray:
        return nearest(image, factor)


@contextlib.contextmanager
def _quiet():
    """No loading progress bars on the server's stderr (diffusers' and transformers' tqdm), restored after."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    was = [(m, m.is_progress_bar_enabled()) for m in (diffusers_logging, transformers_logging)]
    for m, _ in was:
        m.disable_progress_bar()
    try:
        yield
    finally:
        for m, enabled in was:
            if enabled:
                m.enable_progress_bar()


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """[0, 1] floats → uint8, rounded as diffusers' numpy_to_pil does."""
    return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)


class Diffusers(Family):
    name = "diffusers"
    task = "image-generation"
    engine = "image"

    def describe(self, config: dict, files: dict) -> dict:
        """Pipeline class and scheduler from model_index.json; the sizes once the import recorded
        the native one (`facts`), as model_index.json alone does not say it."""
        scheduler = components(config).get("scheduler")
        out = {"pipeline": config.get("_class_name"), "scheduler": scheduler[1] if scheduler else None,
               "upscalers": ["nearest"]}
        if isinstance(config.get("image_size"), int):
            out["image_sizes"] = _sizes(config["image_size"])
        return out

    def import_facts(self, folder: Path) -> dict:
        return facts(Path(folder))

    def recognises(self, folder: Path) -> bool:
        return (Path(folder) / "model_index.json").is_file()

    def load(self, folder: Path) -> Pipeline:
        return Pipeline(Path(folder))

    def weight_bytes(self, folder: Path) -> int:
        """Every component's safetensors, in all subfolders."""
        return sum(p.stat().st_size for p in Path(folder).rglob("*.safetensors") if p.is_file())


family = Diffusers()
