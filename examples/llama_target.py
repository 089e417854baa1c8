"""A target plugin: teaches eagle_trainer the Llama architecture (LlamaForCausalLM), from outside the package.

Llama's HF modules live where a Qwen3 dense model's do (model.layers, model.embed_tokens, model.norm, lm_head),
and its config has the standard key names, so the default TargetSpec fields describe it; a family that differs
says so in the fields (see eagle_trainer/registry.py TargetSpec). Load it in any command:

    eagle-data regenerate --plugin examples/llama_target.py --target path/to/llama ...
    eagle-train 'plugins=[examples/llama_target.py]' demo.enabled=false target.path=path/to/llama data.path=...

or name it in a package's `eagle_trainer.plugins` entry-point group, which every command reads at start-up.
"""

from eagle_trainer import registry

LLAMA = registry.register_target(registry.TargetSpec(architectures=("LlamaForCausalLM",)))
