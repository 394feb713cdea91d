"""Run in a separate process that imports only diffusers (and torch, safetensors): load a fastdiff export the way
a user would and write the latents of one sample per loading route."""

import json
import sys

import torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file

out, teacher, prompt, dest = sys.argv[1:5]
recipe = json.load(open(f"{out}/fastdiff.json"))
kw = {"num_inference_steps": recipe["num_inference_steps"], "guidance_scale": recipe["guidance_scale"]}
results = {}
pipe = DiffusionPipeline.from_pretrained(f"{out}/pipeline")
results["pipeline"] = pipe(
    prompt, **kw, generator=torch.Generator().manual_seed(0), output_type="latent"
).images
if recipe["lora"]:
    for name, extra in [("lora_diffusers", {}), ("lora_kohya", {"weight_name": "kohya_lora.safetensors"})]:
        p = DiffusionPipeline.from_pretrained(teacher)
        p.load_lora_weights(f"{out}/lora", **extra)
        p.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        results[name] = p(
            prompt, **kw, generator=torch.Generator().manual_seed(0), output_type="latent"
        ).images
assert not any(m == "fastdiff" or m.startswith("fastdiff.") for m in sys.modules), "fastdiff was imported"
save_file({k: v.contiguous() for k, v in results.items()}, dest)
