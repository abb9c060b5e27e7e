"""Offline: fine-tuning the item encoder, ONNX export, embedding the catalog (needs the `train` extra)."""
