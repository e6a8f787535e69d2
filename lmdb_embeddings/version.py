"""The library version, kept in a module of its own so every layer can record it without cycles."""

__version__ = "0.1.0"
