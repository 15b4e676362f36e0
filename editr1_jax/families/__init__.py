"""Base-model families behind one interface (`base.Family`); importing the package registers each one."""

from editr1_jax.families import kontext  # noqa: F401  (registers "kontext")
from editr1_jax.families import qwen_image  # noqa: F401  (registers "qwen_image_edit")
from editr1_jax.families.base import FAMILIES, Family, build, family_class, family_of_folder, lora_spec, register

__all__ = ["FAMILIES", "Family", "build", "family_class", "family_of_folder", "lora_spec", "register"]
