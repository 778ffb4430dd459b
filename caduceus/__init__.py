"""Caduceus DNA foundation model in plain PyTorch."""

from caduceus.configuration import CaduceusModelConfig
from caduceus.modeling import CaduceusForMaskedLM, CaduceusModel, CaduceusOutput
from caduceus.tokenizer import CaduceusTokenizer, reverse_complement

__all__ = [
    "CaduceusForMaskedLM",
    "CaduceusModel",
    "CaduceusModelConfig",
    "CaduceusOutput",
    "CaduceusTokenizer",
    "reverse_complement",
]
__version__ = "0.1.0"
