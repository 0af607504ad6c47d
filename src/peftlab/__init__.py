"""peftlab: parameter-efficient fine-tuning with a per-layer spec, honest counting and saved adapters."""

from peftlab import methods
from peftlab.errors import AdapterLoadError, PeftlabError, SpecError
from peftlab.loading import load
from peftlab.peft_model import PeftModel, apply
from peftlab.spec import Spec
from peftlab.zoo import load_model

__version__ = "0.1.0"

__all__ = [
    "AdapterLoadError",
    "PeftModel",
    "PeftlabError",
    "Spec",
    "SpecError",
    "__version__",
    "apply",
    "load",
    "load_model",
    "methods",
]
