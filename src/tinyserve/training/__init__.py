"""The PyTorch side of tinyserve: data, architectures, training and export.

Nothing in the serving modules imports this package; it needs the ``train`` extra.
"""
