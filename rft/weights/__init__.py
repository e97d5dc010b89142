"""Loaders and exporters for pretrained weights in third-party formats."""
