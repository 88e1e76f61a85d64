"""Text prompts for class-conditional generation."""

from __future__ import annotations

from collections.abc import Sequence

from sdcil_jax.errors import GenerationError


def readable_name(class_name: str) -> str:
    """Class name as text: underscores become spaces, surrounding whitespace is dropped."""
    return " ".join(str(class_name).replace("_", " ").split())


def _check_templates(templates: Sequence[str]) -> list[str]:
    templates = list(templates)
    if not templates:
        raise GenerationError(
            "generation.prompt_templates is empty; give at least one template such as "
            "'a photo of a {}'."
        )
    return templates


def class_prompts(class_name: str, templates: Sequence[str]) -> list[str]:
    """One prompt per template for ``class_name``; image i uses ``prompts[i % len(prompts)]``."""
    name = readable_name(class_name)
    return [tpl.format(name) for tpl in _check_templates(templates)]


def prompts_for_indices(
    class_name: str, templates: Sequence[str], indices: Sequence[int]
) -> list[str]:
    """The prompt of each image index: template ``templates[i % len(templates)]``."""
    prompts = class_prompts(class_name, templates)
    return [prompts[int(i) % len(prompts)] for i in indices]
