"""Toucan: LLaMA-architecture base model -> Chinese chat assistant, from data to device."""

__version__ = "0.1.0"
