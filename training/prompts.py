"""How a question becomes a prompt, for training rollouts and ``knowserve eval`` alike.

Two formats: ``chat`` (system + user messages, rendered by the served model's chat template) and ``demo`` (the demo
model's text prompt, :func:`training.demo_model.prompt_for`: its tokenizer has no chat template). ``auto`` picks
``demo`` for a model folder whose tokenizer has no chat template, else ``chat``.
"""

from __future__ import annotations

from pathlib import Path

FORMATS = ("auto", "chat", "demo")


def resolve_format(fmt: str, model_folder: str | Path) -> str:
    """``chat`` or ``demo`` for ``fmt`` (``auto`` decides by the model folder's tokenizer).

    >>> resolve_format("chat", "/nonexistent"), resolve_format("auto", "/nonexistent")
    ('chat', 'chat')
    """
    if fmt not in FORMATS:
        raise ValueError(f"prompt_format {fmt!r}: use one of {FORMATS}")
    if fmt != "auto":
        return fmt
    from training.demo_model import uses_demo_prompt

    return "demo" if uses_demo_prompt(model_folder) else "chat"


def render_prompt(question: str, fmt: str, system_prompt: str = ""):
    """The prompt a question becomes: the demo model's text prompt, or [system,] user chat messages.

    >>> render_prompt("Where is Paris?", "chat", "Be brief.")
    [{'role': 'system', 'content': 'Be brief.'}, {'role': 'user', 'content': 'Where is Paris?'}]
    >>> render_prompt("Where is Paris?", "demo")
    'Question: Where is Paris?\\nAnswer: <think>'
    """
    if fmt == "demo":
        from training.demo_model import prompt_for

        return prompt_for(question)
    return ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": question}]
