"""goose: distil a transformer teacher into a ternary-spiking RWKV-7-style student via an offline cache."""

__version__ = "0.1.0"
