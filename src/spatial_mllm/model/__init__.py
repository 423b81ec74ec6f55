"""The model in the transformers convention: config, model, processor, registered with the Auto classes."""

from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

from .configuration import IMAGE_TOKEN, RUN_INFO_FILE, SpatialMLLMConfig
from .modeling import SpatialMLLMForConditionalGeneration
from .processing import SpatialMLLMProcessor, pad_to_square
from .builder import add_image_token, build_model, image_processor_for

AutoConfig.register(SpatialMLLMConfig.model_type, SpatialMLLMConfig, exist_ok=True)
AutoModelForImageTextToText.register(SpatialMLLMConfig, SpatialMLLMForConditionalGeneration, exist_ok=True)
AutoProcessor.register(SpatialMLLMConfig, SpatialMLLMProcessor, exist_ok=True)

__all__ = [
    "IMAGE_TOKEN",
    "RUN_INFO_FILE",
    "SpatialMLLMConfig",
    "SpatialMLLMForConditionalGeneration",
    "SpatialMLLMProcessor",
    "add_image_token",
    "build_model",
    "image_processor_for",
    "pad_to_square",
]
