"""The two models of a DPO run on one copy of the base: the policy (the adapter being trained) and its reference.

  * From a base model: a new LoRA adapter is the policy; the reference is the base itself (the adapter disabled).
  * From a run folder (an SFT run): its adapter, loaded trainable, is the policy's starting point; the reference
    is the SFT model, a frozen copy of that adapter on the same base (trl's `ref` adapter: peft holds both, and
    trl switches to it for the reference pass). `preference.reference: base` makes the bare base the reference.

Either way the base weights (4-bit ones too, with QLoRA) exist once; the reference costs one adapter's weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lorakit.errors import LorakitError
from lorakit.models.start_point import (
    ADAPTER_WEIGHTS,
    StartRun,
    base_model_section,
    is_run_folder,
    read_start_run,
    source_names,
)

REFERENCE_ADAPTER = "ref"  # the name trl gives the frozen copy of a pretrained adapter (DPOTrainer.__init__)
POLICY_ADAPTER = "default"


@dataclass
class StartPoint:
    """What a DPO run starts from and measures against."""

    base: dict[str, Any]  # the base model's section, as load_model and load_tokenizer take it
    run: StartRun | None  # the run folder whose adapter is trained further, or None for a new adapter
    reference: str  # "sft" (the start run's model) or "base"

    @property
    def reference_text(self) -> str:
        if self.reference == "sft":
            return f"the SFT model: the base + a frozen copy of the adapter of {self.run.folder}"
        if self.run is not None:
            return "the base model alone (preference.reference: base), not the SFT model"
        return "the base model (the new adapter disabled)"

    def summary_rows(self) -> list[tuple[str, str]]:
        if self.run is None:
            start = f"{self.base['name_or_path']} with a new LoRA adapter"
        else:
            start = (f"{self.run.command} run {self.run.folder}: its adapter (r={self.run.lora.get('r')}) trained further, "
                     f"on the base {self.base['name_or_path']}")
        return [("start", start), ("reference", self.reference_text)]

    def to_record(self, data: dict[str, Any]) -> dict[str, Any]:
        return {
            "start": {"run": str(self.run.folder) if self.run else None,
                      "command": self.run.command if self.run else None,
                      "base_model": self.base["name_or_path"], "adapter_sha256": self.adapter_sha256()},
            "reference": self.reference,
            # The record names the true base, not the run folder the recipe points at.
            "base_model": {"name_or_path": self.base["name_or_path"], "revision": self.base.get("revision")},
            "stages": [*(self.run.stages if self.run else []),
                       {"command": "dpo", "datasets": source_names(data)}],
        }


    def adapter_sha256(self) -> str | None:
        """The start adapter's weights, by content: a resumed run must continue from the same ones."""
        import hashlib

        if self.run is None:
            return None
        return hashlib.sha256((self.run.folder / ADAPTER_WEIGHTS).read_bytes()).hexdigest()

    def refuse_changed_start(self, out, resuming: bool) -> None:
        """A run resumed after its SFT run was trained again would mix two starting points: refused."""
        from lorakit.training.run_dir import read_record

        recorded = ((read_record(out) or {}).get("start") or {}).get("adapter_sha256")
        if resuming and recorded and recorded != self.adapter_sha256():
            raise LorakitError(f"the adapter in {self.run.folder} changed since this run started from it; resuming "
                               "would continue from another starting point. Start over with --no-resume --overwrite")


def resolve_start(model_section: dict[str, Any], preference: dict[str, Any]) -> StartPoint:
    name = model_section["name_or_path"]
    run = read_start_run(name) if is_run_folder(name) else None
    reference = preference.get("reference") or ("sft" if run is not None else "base")
    if reference == "sft" and run is None:
        raise LorakitError("preference.reference: sft needs model.name_or_path to be a finished SFT run folder")
    return StartPoint(base=base_model_section(model_section, run), run=run, reference=reference)


def load_policy(start: StartPoint, quantization: dict | None, placement, lora: dict, *,
                gradient_checkpointing: bool = False) -> tuple[Any, Any]:
    """(model, peft_config for the trainer): the base (4-bit when the recipe says) with the start run's adapter
    loaded trainable, or the bare base and the LoraConfig of a new adapter."""
    from peft import LoraConfig

    from lorakit.models.inference import attach_adapter
    from lorakit.models.loading import load_model

    model = load_model(start.base, quantization, placement, gradient_checkpointing=gradient_checkpointing)
    if start.run is None:
        return model, LoraConfig(**lora)
    return attach_adapter(model, start.run.folder, start.base["name_or_path"], trainable=True), None


def use_chosen_reference(trainer, start: StartPoint) -> None:
    """Make the trainer's reference the one the recipe chose.

    trl copies a pretrained adapter into a frozen `ref` adapter and scores the reference with it; for
    `reference: base` that copy is removed, and trl then scores the reference with every adapter disabled.
    """
    if start.run is None:
        return
    model = trainer.accelerator.unwrap_model(trainer.model)
    if REFERENCE_ADAPTER not in model.peft_config:
        raise LorakitError(f"trl did not make its {REFERENCE_ADAPTER!r} reference adapter for the start run; this "
                           "trl version is not supported by lorakit dpo")
    if start.reference == "base":
        model.delete_adapter(REFERENCE_ADAPTER)
        model.set_adapter(POLICY_ADAPTER)
