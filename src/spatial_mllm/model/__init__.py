"""The model in the transformers convention: config, model, processor, registered with the Auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration import IMAGE_TOKEN, RUN_INFO_FILE, SpatialMLLMConfig
from .modeling import SpatialMLLMForConditionalGeneration, SpatialMLLMModel
from .chat_templates import CHAT_TEMPLATES, PLAIN, VICUNA_SYSTEM, VICUNA_V1, template_names
from .conversation import IGNORE_INDEX, LabelMismatchError, Segment, TemplateError
from .image_transform import ImageTransform, pad_to_square
from .processing import SpatialMLLMProcessor
from .builder import add_image_token, build_model, image_processor_for
from .generation import fast_generation_kwargs

AutoConfig.register(SpatialMLLMConfig.model_type, SpatialMLLMConfig, exist_ok=True)
AutoModel.register(SpatialMLLMConfig, SpatialMLLMModel, exist_ok=True)
AutoModelForImageTextToText.register(SpatialMLLMConfig, SpatialMLLMForConditionalGeneration, exist_ok=True)
AutoProcessor.register(SpatialMLLMConfig, SpatialMLLMProcessor, exist_ok=True)

__all__ = [
    "CHAT_TEMPLATES",
    "IGNORE_INDEX",
    "IMAGE_TOKEN",
    "ImageTransform",
    "LabelMismatchError",
    "PLAIN",
    "RUN_INFO_FILE",
    "Segment",
    "SpatialMLLMConfig",
    "SpatialMLLMForConditionalGeneration",
    "SpatialMLLMModel",
    "SpatialMLLMProcessor",
    "TemplateError",
    "VICUNA_SYSTEM",
    "VICUNA_V1",
    "add_image_token",
    "build_model",
    "fast_generation_kwargs",
    "image_processor_for",
    "pad_to_square",
    "template_names",
]
