"""Loading models and tokenizers (device, dtype, attention, quantization), inference helpers, merging."""
