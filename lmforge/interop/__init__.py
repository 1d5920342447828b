"""Hugging Face interop: model dirs (export/import) in the LlamaForCausalLM layout."""
