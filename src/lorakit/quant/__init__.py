"""Quantized bases: layers whose stored weights LoRAs never write (GGUF, fp8, scaled fp8), read through their own
dequantization; loading such files."""
