"""Alignment: chat data, SFT with loss masking and packing, DPO, LoRA (peft)."""
