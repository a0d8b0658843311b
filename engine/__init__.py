"""granucap: raw image-text pairs in, a pseudo-labelled open-vocabulary detection corpus out."""

__version__ = "0.1.0"
