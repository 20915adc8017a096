"""Training protos <-> :mod:`training.config`, shared by the server and the client (no servicer, no TRL)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from knowserve.training.v1 import training_service_pb2 as pb
from services.common.errors import invalid_from_validation

if TYPE_CHECKING:
    from training.config import Hyperparameters, Resolved, RunConfig

LOSSES = {pb.LOSS_TYPE_GRPO: "grpo", pb.LOSS_TYPE_DAPO: "dapo", pb.LOSS_TYPE_DR_GRPO: "dr_grpo"}
LOSSES_BACK = {v: k for k, v in LOSSES.items()}


def hyper_to_proto(h: "Hyperparameters | Resolved", only: set[str] | None = None) -> pb.Hyperparameters:
    """The set fields of ``h`` (unset ones stay zero: "the default"); ``only`` keeps the algorithm's own."""
    fields = {k: v for k, v in h.model_dump(exclude_none=True).items() if only is None or k in only}
    loss = fields.pop("loss_type", None)
    hp = pb.Hyperparameters(**fields)
    if loss:
        hp.loss_type = LOSSES_BACK[loss]
    return hp


def hyper_from_proto(h: pb.Hyperparameters) -> "Hyperparameters":
    """Zero fields mean "the default" (None)."""
    from pydantic import ValidationError

    from training.config import Hyperparameters

    try:
        return _hyperparameters(Hyperparameters, h)
    except ValidationError as e:  # a value outside a field's choices or type: the field and what it takes
        raise invalid_from_validation(e, "hyperparameters.") from None


def _hyperparameters(cls, h: pb.Hyperparameters):
    return cls(
        learning_rate=h.learning_rate or None, max_steps=h.max_steps or None, group_size=h.group_size or None,
        batch_size=h.batch_size or None, beta=h.beta if h.HasField("beta") else None,
        loss_type=LOSSES.get(h.loss_type), sync_every=h.sync_every or None,
        max_completion_tokens=h.max_completion_tokens or None, temperature=h.temperature or None,
        use_lora=h.use_lora or None, lora_rank=h.lora_rank or None, seed=h.seed or None,
        num_epochs=h.num_epochs or None, max_length=h.max_length or None,
        completion_only_loss=h.completion_only_loss if h.HasField("completion_only_loss") else None,
        dpo_loss_type=h.dpo_loss_type or None,
        off_policy_mask_threshold=h.off_policy_mask_threshold if h.HasField("off_policy_mask_threshold") else None)


def options_to_proto(cfg: "RunConfig") -> pb.RunOptions:
    """The run options of a ``knowserve train`` config."""
    options = pb.RunOptions(max_tool_turns=cfg.max_tool_turns, retrieval_top_k=cfg.retrieval_top_k,
                            dataset_limit=cfg.dataset_limit, checkpoint_every=cfg.checkpoint_every,
                            prompt_format="" if cfg.prompt_format == "auto" else cfg.prompt_format,
                            generation_model=cfg.generation_model)
    if cfg.tool_protocol != "default":
        options.tool_protocol = cfg.tool_protocol
    if cfg.publish_gate is not None:
        g = cfg.publish_gate
        options.publish_gate.CopyFrom(pb.PublishGate(min_answers=g.min_answers, alpha=g.alpha,
                                                     window_seconds=g.window_seconds))
        if g.margin is not None:
            options.publish_gate.margin = g.margin
    return options


def options_from_proto(o: pb.RunOptions) -> dict:
    """RunConfig fields the request sets (zero values: the defaults)."""
    out: dict = {}
    if o.HasField("tool_protocol"):
        out["tool_protocol"] = o.tool_protocol
    for name in ("max_tool_turns", "retrieval_top_k", "dataset_limit", "checkpoint_every", "generation_model"):
        if getattr(o, name):
            out[name] = getattr(o, name)
    if o.prompt_format:
        out["prompt_format"] = o.prompt_format
    if o.HasField("publish_gate"):
        g = o.publish_gate
        out["publish_gate"] = {"min_answers": g.min_answers, "alpha": g.alpha, "window_seconds": g.window_seconds,
                               "margin": g.margin if g.HasField("margin") else None}
    return out
