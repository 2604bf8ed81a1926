"""lorakit: parameter-efficient fine-tuning of LLMs from one YAML recipe."""

__version__ = "0.1.0"
