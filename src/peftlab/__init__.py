"""peftlab: parameter-efficient fine-tuning with a per-layer spec, honest counting and saved adapters."""

from peftlab import methods
from peftlab.backbone.zoo import load_model
from peftlab.core.peft_model import PeftModel, apply
from peftlab.core.spec import Spec
from peftlab.errors import AdapterLoadError, PeftlabError, SpecError
from peftlab.formats.loading import load

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
