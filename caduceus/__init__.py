"""Caduceus DNA foundation model in plain PyTorch."""

from caduceus.api import Caduceus, CaduceusConfig
from caduceus.configuration import CaduceusModelConfig
from caduceus.fine_tuning import CaduceusFineTuningModel
from caduceus.modeling import CaduceusForMaskedLM, CaduceusModel, CaduceusOutput
from caduceus.tokenizer import CaduceusTokenizer, reverse_complement

__all__ = [
    "Caduceus",
    "CaduceusConfig",
    "CaduceusFineTuningModel",
    "CaduceusForMaskedLM",
    "CaduceusModel",
    "CaduceusModelConfig",
    "CaduceusOutput",
    "CaduceusTokenizer",
    "reverse_complement",
]
__version__ = "0.1.0"
