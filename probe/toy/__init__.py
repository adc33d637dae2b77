"""The built-in toy world: a tiny Llama policy on single-digit addition, with tokenizer and AdamW state.

``build_toy_world()`` returns a cached HF checkpoint directory; ``probe.loading.toy_policy()``
loads it. The task's text reward is ``probe.toy.task:reward``.
"""

from probe.toy.task import make_prompt_texts, make_prompts, reward, reward_ids
from probe.toy.tokenizer import build_tokenizer, save_tokenizer
from probe.toy.world import ToyWorldConfig, build_toy_world, default_cache_root, load_toy_world_info, toy_world_dir

__all__ = [
    "ToyWorldConfig",
    "build_toy_world",
    "build_tokenizer",
    "default_cache_root",
    "load_toy_world_info",
    "make_prompt_texts",
    "make_prompts",
    "reward",
    "reward_ids",
    "save_tokenizer",
    "toy_world_dir",
]
