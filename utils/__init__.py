"""Shared package of the fine-tuning course.

Modules are named for what they hold: ``env`` (device, dtype, seeds, library noise), ``data`` (the
generated world and its instruction data), ``models`` (the tiny offline base), ``metrics``
(exact match, perplexity), ``checks`` (exercise checkers), ``quiz`` (the interview question bank).
"""

__version__ = "0.1.0"
