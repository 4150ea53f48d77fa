"""``RefinerPipeline``: a trained refiner as a diffusers pipeline, applied exactly as ``refiner-rl refine`` applies it.

    from refiner_rl import RefinerPipeline

    pipe = RefinerPipeline.from_pretrained("outputs/demo/grpo")  # LoRA or full weights; base model from the folder
    pipe.enable_model_cpu_offload()                               # or pipe.to("cuda")
    image = pipe(draft=draft, reference=reference, mask=mask, prompt="Fix the pattern", seed=0).images[0]

The pipeline is built on the editor interface (:class:`~refiner_rl.policies.base.EditorPolicy`): its components
(transformer, codec or VAE, text encoders, tokenizers, scheduler) are the editor's own modules, registered with
diffusers so ``to()``, ``enable_model_cpu_offload()`` and ``components`` act on them; a call goes through
:mod:`refiner_rl.refine` (the records path of ``refine``: the same decoding, registration and sampler), so it gives
``refine``'s images for the same seed.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

# components the editors may have, and the order a model CPU offload runs them in
COMPONENTS = ("transformer", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "processor")
OFFLOAD_ORDER = ("text_encoder", "text_encoder_2", "transformer", "vae")


def _components(policy) -> dict:
    """The editor's modules and tokenizers by diffusers' names (the codec is ``vae``: the AutoencoderKL itself when it
    wraps one, so its encode/decode offload hooks fire), and a scheduler from its schedule config."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    out = {}
    for name, value in vars(policy).items():
        if name.startswith("_") or value is None:
            continue
        if name == "codec":
            out["vae"] = value.vae if hasattr(value, "vae") else CodecModule(value)
        elif name in COMPONENTS and (isinstance(value, torch.nn.Module) or name.startswith(("tokenizer", "processor"))):
            out[name] = value
    config = getattr(policy, "scheduler_config", None)
    if config is not None:
        out["scheduler"] = FlowMatchEulerDiscreteScheduler.from_config(config)
    return out


class CodecModule(torch.nn.Module):
    """A codec without an autoencoder (the tiny editors' lossless pixel codec) as a pipeline component: it has no
    weights, so it reports float32 and the device of its buffers (the CPU without any), as diffusers asks of one."""

    def __init__(self, codec):
        super().__init__()
        self.codec = codec

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return next((b.device for b in self.buffers()), torch.device("cpu"))


class RefinerPipeline(DiffusionPipeline):
    """A refiner-rl editor with the settings it was trained with (see the module docstring). Build it with
    :meth:`from_pretrained`; call it with a draft, a reference, an optional mask and the instruction."""

    _optional_components = ["text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "processor", "scheduler"]

    def __init__(
        self,
        transformer,
        vae,
        scheduler=None,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        processor=None,
        *,
        refiner=None,
    ):
        """``refiner``: a :class:`refiner_rl.refine.Refiner` whose editor owns the components given here
        (:meth:`from_pretrained` builds both)."""
        super().__init__()
        if refiner is None:
            raise ValueError("RefinerPipeline needs the refiner its components belong to: use from_pretrained(FOLDER)")
        components = dict(transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=text_encoder)
        components.update(tokenizer=tokenizer, text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
        components.update(processor=processor)
        self.register_modules(**components)
        self.model_cpu_offload_seq = "->".join(n for n in OFFLOAD_ORDER if components.get(n) is not None)
        self.refiner = refiner
        _follow_execution_device(refiner.policy, self)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, **kwargs) -> RefinerPipeline:
        """Load a refiner-rl output or checkpoint folder (a LoRA over the base model saved with it, or a full
        fine-tune). ``kwargs``: :func:`refiner_rl.refine.load_refiner`'s (``device``, ``torch_dtype``, ``base_model``,
        ``transformer_path``, ``tiny_model``, serving and sampler settings; unset: as the model was trained)."""
        from refiner_rl.refine import load_refiner

        kwargs.setdefault("device", "cpu")
        if "torch_dtype" in kwargs and not isinstance(kwargs["torch_dtype"], str):
            kwargs["torch_dtype"] = str(kwargs["torch_dtype"]).removeprefix("torch.")
        refiner = load_refiner(pretrained_model_name_or_path, **kwargs)
        return cls(**_components(refiner.policy), refiner=refiner)

    @property
    def device(self) -> torch.device:
        """Where the components are (an accelerator before the CPU); read from their parameters, since a codec without
        weights (the tiny editors' pixel codec) has no ``device`` of its own."""
        devices = [p.device for m in self.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters()]
        return next(
            (d for d in devices if d.type not in ("cpu", "meta")), devices[0] if devices else torch.device("cpu")
        )

    @property
    def settings(self) -> dict:
        """What the model is served with (base model, LoRA, registration, positions, guidance, sampler)."""
        return dict(self.refiner.served)

    @torch.no_grad()
    def __call__(
        self,
        draft,
        reference,
        mask=None,
        prompt: str = "",
        num_inference_steps: int | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ):
        """Refine ``draft`` inside ``mask`` (white = refine; None = the whole image) from ``reference``.

        Images may be PIL images, file paths, or ``[3, H, W]`` tensors in [0, 1] (8-bit quantised, as image files
        are). Noise: ``generator`` when given, else ``keyed_generator(seed, 0)`` (``seed`` default: the model's saved
        one, else 0), which is ``refiner-rl refine --seed SEED``'s for one image set. ``num_inference_steps`` None: as
        trained.
        ``output_type``: ``pil``, ``np`` (``[1, H, W, 3]`` float) or ``pt`` (``[1, 3, H, W]``)."""
        from dataclasses import replace

        from refiner_rl.distributed import keyed_generator
        from refiner_rl.refine import refine_batches, refine_dataset

        # 1. inputs as one record, served as ``refine`` serves records (resizing, registration)
        if isinstance(reference, (list, tuple)):
            if len(reference) != 1:
                raise ValueError(f"{len(reference)} references given; this project's editors take one")
            reference = reference[0]
        record = {"prompt": prompt, "draft": _pil(draft, "draft"), "reference": _pil(reference, "reference")}
        if mask is not None:
            record["mask"] = _pil(mask, "mask", grey=True)
        dataset = refine_dataset(self.refiner, [record])
        # 2. the sampler as trained, with this call's steps, seed and noise
        sampler = self.refiner.sampler
        if num_inference_steps is not None:
            sampler = replace(sampler, num_steps=int(num_inference_steps))
        if seed is not None:
            sampler = replace(sampler, seed=int(seed))
        policy = self.refiner.policy
        policy.dtype = self.transformer.dtype  # after pipe.to(dtype)
        codec = getattr(policy, "codec", None)
        for key, buf in getattr(codec, "_buffers", {}).items():  # a codec's own constants go where its VAE runs
            codec._buffers[key] = buf.to(self._execution_device) if buf is not None else None
        refiner = replace(self.refiner, sampler=sampler)
        # 3. sample (the records path of refine)
        noise = {0: generator if generator is not None else keyed_generator(sampler.seed, 0)}
        ((_, images),) = list(refine_batches(refiner, dataset, [0], generators=noise))
        images = images.float().clamp(0, 1)
        # 4. output
        if output_type == "pt":
            out = images
        elif output_type == "np":
            out = images.permute(0, 2, 3, 1).numpy()
        elif output_type == "pil":
            from torchvision.transforms.functional import to_pil_image

            out = [to_pil_image(im.mul(255).round().byte()) for im in images]
        else:
            raise ValueError(f"output_type must be pil, np or pt, got {output_type!r}")
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=out) if return_dict else (out,)


def _pil(image, name: str, grey: bool = False):
    """A PIL image (RGB, or L for a mask) from a PIL image, a path or a ``[C, H, W]`` tensor in [0, 1]."""
    from PIL import Image

    if isinstance(image, str):
        from refiner_rl.data.images import load_image

        return load_image(image, base_dir=None, where=name, mask=grey)
    if isinstance(image, torch.Tensor):
        from torchvision.transforms.functional import to_pil_image

        image = to_pil_image(image.detach().float().cpu().clamp(0, 1).mul(255).round().byte())
    if not isinstance(image, Image.Image):
        raise TypeError(f"{name}: expected a PIL image, a path or a tensor, got {type(image).__name__}")
    return image.convert("L" if grey else "RGB")


def _follow_execution_device(policy, pipe) -> None:
    """Make ``policy.device`` the pipeline's execution device, so tensors the editor makes (noise, ids) go where
    the modules run under ``enable_model_cpu_offload`` (they sit on the CPU between calls)."""
    cls = type(policy)
    if getattr(cls, "_follows_pipeline", False):
        policy._pipeline = pipe
        return
    policy.__class__ = type(cls.__name__, (cls,), {"_follows_pipeline": True, "device": property(_device)})
    policy._pipeline = pipe


def _device(self) -> torch.device:
    return self._pipeline._execution_device
