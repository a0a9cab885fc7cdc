"""ComfyUI-Unlearn's engine: constrained unlearning of diffusion models (RU / FU / LU), as LoRA adapters.

Pure torch / diffusers / peft — no ComfyUI import anywhere in this package. What users and nodes call is listed
here; everything else is private by convention.
"""

__version__ = "0.1.0"

from .denoiser import Denoiser, LoRALinear, TorchDenoiser, add_lora, rollout
from .dual import Constraint, DualVariable
from .estimate import log_ratio, nelbo, path_kl_terms
from .methods import METHODS, MethodSpec, get_method
from .schedule import NoiseSchedule
from .targets import (
    esd_target,
    eta_to_lambda,
    forward_kl_loss,
    lambda_to_eta,
    likelihood_ratio_target,
    likelihood_target,
    reverse_kl_target,
    siss_loss,
)
from .trainer import Cancelled, ConceptSpec, DataSpec, Problem, TrainConfig, Trainer, TrainResult

__all__ = [
    "__version__",
    "Denoiser", "TorchDenoiser", "LoRALinear", "add_lora", "rollout",
    "DualVariable", "Constraint",
    "path_kl_terms", "nelbo", "log_ratio",
    "METHODS", "MethodSpec", "get_method",
    "NoiseSchedule",
    "reverse_kl_target", "esd_target", "eta_to_lambda", "lambda_to_eta", "likelihood_ratio_target",
    "likelihood_target", "forward_kl_loss", "siss_loss",
    "Problem", "ConceptSpec", "DataSpec", "TrainConfig", "Trainer", "TrainResult", "Cancelled",
]
