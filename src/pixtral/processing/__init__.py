from pixtral.processing.images import DEFAULT_MAX_PIXELS, LOCAL_POLICY, SERVER_POLICY, ImagePolicy, load_image
from pixtral.processing.loading import load_processor
from pixtral.processing.processor import Processor, StreamDecoder

__all__ = ["DEFAULT_MAX_PIXELS", "LOCAL_POLICY", "SERVER_POLICY", "ImagePolicy", "load_image",
           "load_processor", "Processor", "StreamDecoder"]
