"""Run time: the compiled Module."""

from .module import Module

__all__ = ["Module"]
