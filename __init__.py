"""landmark-llama: landmark attention (Mohtashami & Jaggi, NeurIPS 2023) as a transformers model family.

Installed as the package `landmark_llama`; importing it registers the model type with the Auto classes, so a
saved folder also loads without `trust_remote_code` wherever this package is installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

# Absolute imports: pytest imports this file by path when collecting the repository (the root is the package),
# under whatever name the checkout's folder gives it; the installed package resolves the same files.
from landmark_llama.cache_landmark_llama import LandmarkRetrievalCache
from landmark_llama.configuration_landmark_llama import LandmarkLlamaConfig
from landmark_llama.modeling_landmark_llama import LandmarkLlamaForCausalLM, LandmarkLlamaModel


__version__ = "0.1.0"

AutoConfig.register(LandmarkLlamaConfig.model_type, LandmarkLlamaConfig, exist_ok=True)
AutoModel.register(LandmarkLlamaConfig, LandmarkLlamaModel, exist_ok=True)
AutoModelForCausalLM.register(LandmarkLlamaConfig, LandmarkLlamaForCausalLM, exist_ok=True)

__all__ = ["LandmarkLlamaConfig", "LandmarkLlamaModel", "LandmarkLlamaForCausalLM", "LandmarkRetrievalCache"]
