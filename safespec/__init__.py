"""safespec: declarative, certified model developmental safety for CLIP fine-tuning.

The import is light on purpose: the spec language, the compiler and the CLI's validation commands work
without loading torch; the training stack is imported by the stages that need it.
"""

__version__ = "0.1.0"
