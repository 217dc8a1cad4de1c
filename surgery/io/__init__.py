"""Files in and out: safetensors headers (safetensors.py), checkpoints and model refs
(checkpoint.py), hub header views (hub.py), the output-folder protocol (outdir.py), verify."""
