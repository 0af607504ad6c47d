"""peftlab: parameter-efficient fine-tuning with a per-layer spec, honest counting and saved adapters."""

__version__ = "0.1.0"  # first: submodules read it while the package is still importing

from peftlab import methods
from peftlab.backbone.zoo import load_model
from peftlab.core.peft_model import PeftModel, apply
from peftlab.core.spec import Spec
from peftlab.errors import AdapterLoadError, PeftlabError, SpecError
from peftlab.formats.loading import load
from peftlab.inference import generate
from peftlab.train.generation import Sampling

__all__ = [
    "AdapterLoadError",
    "PeftModel",
    "PeftlabError",
    "Sampling",
    "Spec",
    "SpecError",
    "__version__",
    "apply",
    "generate",
    "load",
    "load_model",
    "methods",
]
